"""Explore a saved trace in the browser or a notebook: tiles (the block-map pyramid), export (the viewer
folder), page (the readable HTML/JS), server (a local HTTP server), notebook (`_repr_html_`).

    folder = export_viewer("run1/viewer", trace, text=text, offsets=offsets, sentences=sents)
    show(folder)                       # serves it on 127.0.0.1 and opens the browser
"""

from stream_jax.viewer.export import export_viewer, is_viewer
from stream_jax.viewer.page import inline_html
from stream_jax.viewer.server import serve
from stream_jax.viewer.notebook import trace_html


def show(trace_or_folder, *, port: int = 0, open_browser: bool = True, **export_kw):
  """Serves a viewer folder (exporting a Trace first, into a temporary folder) and opens it; returns the
  server (stop it with `server.shutdown()`)."""
  import tempfile  # pylint: disable=import-outside-toplevel
  import webbrowser  # pylint: disable=import-outside-toplevel
  folder = trace_or_folder
  if not isinstance(trace_or_folder, (str, bytes)) and not hasattr(trace_or_folder, "__fspath__"):
    folder = export_viewer(tempfile.mkdtemp(prefix="stream_jax_view_"), trace_or_folder, **export_kw)
  server = serve(folder, port=port)
  if open_browser:
    webbrowser.open(server.url)
  return server


__all__ = ["export_viewer", "inline_html", "is_viewer", "serve", "show", "trace_html"]
