"""Notebook display (`_repr_html_` of Trace / TracedRun): the whole viewer inline for small traces, a summary
with the command to open the viewer otherwise.

Inline means the page and its data in one `<iframe srcdoc>`: Jupyter, JupyterLab and Colab run it without a
server or an extension, and the iframe keeps the page's script and style away from the notebook's.
Why not treescope or anywidget: both would add a dependency to draw what the page already draws, and
anywidget needs a live kernel connection (a saved notebook would show nothing).
"""

from __future__ import annotations

import html
import tempfile

import numpy as np

# Inline only while the embedded data stays small: base64 makes it 4/3 larger and it lives in the notebook.
INLINE_LIMIT = 4 << 20


def _entries(trace) -> int:
  return int(sum(np.asarray(l.mask.counts).sum() for l in trace.layers))


def trace_html(trace, *, limit: int = INLINE_LIMIT, **export_kw) -> str:
  """HTML for a notebook cell: an iframe with the viewer when the trace's tiles fit in `limit` bytes."""
  from stream_jax.viewer.export import export_viewer, folder_bytes  # pylint: disable=import-outside-toplevel
  from stream_jax.viewer.page import inline_html  # pylint: disable=import-outside-toplevel
  from stream_jax.viewer.summary import kept_share  # pylint: disable=import-outside-toplevel
  from stream_jax.viewer.export import one_sample  # pylint: disable=import-outside-toplevel
  trace = one_sample(trace, export_kw.pop("batch_index", 0))
  est = _entries(trace) * 14  # level 0 plus the pyramid: ~14 bytes per kept block
  if est <= limit:
    with tempfile.TemporaryDirectory(prefix="stream_jax_view_") as d:
      folder = export_viewer(d, trace, **export_kw)
      if folder_bytes(folder) <= 2 * limit:
        doc = inline_html(folder)
        return (f'<iframe srcdoc="{html.escape(doc, quote=True)}" style="width:100%;height:900px;'
                f'border:1px solid #ddd" sandbox="allow-scripts"></iframe>')
  rows = "".join(f"<tr><td>{l.layer}</td><td>{l.kind}</td><td>{l.mode}</td>"
                 f"<td>{np.mean(kept_share(l)):.4f}</td></tr>"
                 for l in trace.layers)
  m = trace.layers[0].mask
  return (f"<div><b>stream_jax Trace</b>: {len(trace.layers)} layers, {m.k_len:,} tokens, blocks "
          f"{m.block_q}x{m.block_k}, about {est / 1e6:.0f} MB of tiles: too large to show inline. Open the "
          "viewer with <code>stream_jax.viewer.show(trace)</code> (a local server) or save the trace and run "
          "<code>stream-jax view FOLDER</code>.<table><tr><th>layer</th><th>kind</th><th>mode</th>"
          f"<th>kept share (mean over heads)</th></tr>{rows}</table></div>")

