"""A small local HTTP server for a viewer folder.

Why a server and not file://: the page fetches binary tiles on demand, and browsers block fetch() from
file:// pages (Chromium refuses any file:// fetch; Firefox only same-folder ones). A notebook or a
single-file export inlines the data instead (page.inline_html), which only suits small traces.
The server binds 127.0.0.1 only and serves the one folder, read-only.
"""

from __future__ import annotations

import functools
import http.server
import threading


class _Handler(http.server.SimpleHTTPRequestHandler):
  extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".bin": "application/octet-stream",
                    ".js": "text/javascript", ".json": "application/json"}

  def log_message(self, *args):  # quiet: one line per tile would flood the terminal
    pass

  def end_headers(self):
    self.send_header("Cache-Control", "no-cache")
    super().end_headers()


def serve(folder, port: int = 0, host: str = "127.0.0.1", background: bool = True):
  """Serves `folder` on http://host:port/ (port 0: any free one). Returns the server (its URL in
  `server.url`); background=True runs it in a daemon thread, else this call blocks until interrupted."""
  handler = functools.partial(_Handler, directory=str(folder))
  server = http.server.ThreadingHTTPServer((host, port), handler)
  server.daemon_threads = True
  server.url = f"http://{host}:{server.server_address[1]}/"
  if background:
    threading.Thread(target=server.serve_forever, daemon=True).start()
  else:
    try:
      server.serve_forever()
    except KeyboardInterrupt:
      pass
    finally:
      server.server_close()
  return server
