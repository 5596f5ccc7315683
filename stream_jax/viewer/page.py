"""The viewer page: readable HTML/CSS/JS kept in static/ (no build step), copied next to the data, or
inlined with the data into one self-contained HTML document (notebooks, file://)."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import re
import shutil

STATIC = pathlib.Path(__file__).parent / "static"
ASSETS = ("index.html", "viewer.css", "data.js", "blockmap.js", "textview.js", "routes.js", "app.js")


def write_page(folder) -> None:
  """Copies the page's files into a viewer folder."""
  for name in ASSETS:
    shutil.copyfile(STATIC / name, pathlib.Path(folder) / name)


def _data_files(folder: pathlib.Path) -> list[str]:
  skip = set(ASSETS)
  return sorted(str(p.relative_to(folder)).replace(os.sep, "/") for p in folder.rglob("*")
                if p.is_file() and p.name not in skip)


def inline_html(folder) -> str:
  """One HTML document holding the page and every data file of `folder` (base64): works from file:// and
  in a notebook output, where a fetch of the tiles would be blocked or have nowhere to go."""
  folder = pathlib.Path(folder)
  embed = {name: base64.b64encode((folder / name).read_bytes()).decode("ascii") for name in _data_files(folder)}
  html = (STATIC / "index.html").read_text()
  css = (STATIC / "viewer.css").read_text()
  html = html.replace('<link rel="stylesheet" href="viewer.css">', f"<style>\n{css}</style>")
  data = json.dumps(embed).replace("</", "<\\/")
  scripts = [f"<script>window.SJV_EMBED = {data};</script>"]
  for name in ASSETS[2:]:
    scripts.append(f"<script>\n{(STATIC / name).read_text()}</script>")
  html = re.sub(r'(<script src="[a-z]+\.js"></script>\s*)+', lambda _: "\n".join(scripts) + "\n", html)
  return html
