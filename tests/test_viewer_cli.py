"""`stream-jax view` and report folders with a viewer: resolving, exporting, serving (no browser needed)."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from stream_jax.report import MARKER, write_report
from stream_jax.trace_io import save_trace
from stream_jax.viewer import tiles

from test_viewer_export import synthetic_trace

CLI = [sys.executable, "-m", "stream_jax.cli"]


def run(*args, env=None):
  return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=900,
                        env=dict(os.environ, **(env or {})))


def test_view_exports_a_saved_trace_into_the_cache_once(tmp_path):
  trace = synthetic_trace(t=96)
  save_trace(tmp_path / "run", trace)
  env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
  r = run("view", str(tmp_path / "run"), "--export-only", env=env)
  assert r.returncode == 0, r.stderr
  assert "exporting the trace" in r.stdout
  folder = r.stdout.strip().splitlines()[-1].split("viewer folder: ")[1]
  assert folder.startswith(str(tmp_path / "cache" / "stream_jax" / "viewer"))
  m = json.loads(open(os.path.join(folder, "manifest.json")).read())
  assert [l["layer"] for l in m["layers"]] == [0, 1, 2] and m["text_chunk"] is None
  again = run("view", str(tmp_path / "run"), "--export-only", env=env)
  assert "exporting" not in again.stdout and folder in again.stdout, "the second call reuses the export"


def test_view_refuses_what_is_not_a_trace(tmp_path):
  r = run("view", str(tmp_path))
  assert r.returncode == 2 and "neither a viewer folder nor a report" in r.stderr
  r = run("view", str(tmp_path / "missing"))
  assert r.returncode == 2 and "does not exist" in r.stderr


def test_report_with_viewer_is_served(tmp_path):
  trace = synthetic_trace(t=96)
  pieces = [f"t{i} " for i in range(96)]
  out = write_report(tmp_path / "r", report={}, summary={}, trace=trace, viewer=dict(pieces=pieces))
  files = json.loads((out / MARKER).read_text())["files"]
  assert "viewer/manifest.json" in files and "viewer/index.html" in files  # replaced with the report (--force)
  assert 'href="viewer/index.html"' in (out / "index.html").read_text()
  proc = subprocess.Popen(CLI + ["view", str(out), "--no-browser"], stdout=subprocess.PIPE, text=True)
  try:
    url = None
    end = time.time() + 120
    while time.time() < end and url is None:
      line = proc.stdout.readline()
      if line.startswith("open "):
        url = line.split()[1]
    assert url and url.startswith("http://127.0.0.1:")
    m = json.loads(urllib.request.urlopen(url + "manifest.json", timeout=30).read())
    assert m["tokens"] == 96 and m["text_chunk"]
    tile = tiles.read_tile(urllib.request.urlopen(url + tiles.tile_path(1, 2, 0, 0), timeout=30).read())
    idx = np.asarray(trace[1].mask.indices)[2, 0]
    np.testing.assert_array_equal(tile["cols"][:tile["rowptr"][1]], idx[idx >= 0])
    assert b"BlockMap" in urllib.request.urlopen(url + "blockmap.js", timeout=30).read()
  finally:
    proc.terminate()
    proc.wait(timeout=30)


# The anchors report's viewer (`stream-jax view --export-only` on a real anchors run) is checked in
# tests/test_cli.py::test_trace_anchors_and_niah_on_small_inputs, on the anchors report that test writes anyway.
