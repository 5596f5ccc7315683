"""Report folders: trace round-trip through orbax, atomic replacement, mount points, ownership (hashes)."""

import errno
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

import stream_jax as sj
from stream_jax import outdir
from stream_jax.outdir import remove_report
from stream_jax.report import MARKER, ReportPathError, ReportWarning, check_out_dir, write_report
from stream_jax.trace_io import load_trace
from stream_jax.trace import LayerTrace, Trace


def _trace():
  q = jax.random.normal(jax.random.PRNGKey(0), (2, 100, 4, 8))
  k = jax.random.normal(jax.random.PRNGKey(1), (2, 100, 2, 8))
  cfg = sj.StreamConfig(block_q=16, block_k=16, top_k=2)
  mask = sj.estimate_mask(q, k, cfg)
  _, stats = sj.sparse_attention(q, k, k, mask)
  local = sj.window_mask(4, 100, 100, block_q=16, block_k=16, window=32)
  local = jax.tree_util.tree_map(lambda x: np.broadcast_to(x, (2,) + x.shape), local)
  _, lstats = sj.sparse_attention(q, k, k, local, window=32)
  return Trace((LayerTrace(local, lstats.mass, 0, "local", "window", 32),
                LayerTrace(mask, stats.mass, 1, "global", "stream")))


def test_trace_round_trip_is_bit_identical(tmp_path):
  trace = _trace()
  out = write_report(tmp_path / "r", report={"x": np.float32(1.5), "cfg": sj.StreamConfig()},
                     summary={"kept": 0.5}, trace=trace)
  again = load_trace(out)
  assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(trace)
  for a, b in zip(jax.tree_util.tree_leaves(trace), jax.tree_util.tree_leaves(again)):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(a, b)
  assert again[1].mask.config == trace[1].mask.config
  assert json.loads((out / "report.json").read_text())["cfg"]["top_k"] == 16
  assert "kept" in (out / "index.html").read_text()


def test_failed_write_keeps_the_previous_report(tmp_path):
  out = write_report(tmp_path / "r", report={"run": 1}, summary={})

  class Broken:
    def savefig(self, *a, **k):
      raise RuntimeError("disk full")

  with pytest.raises(RuntimeError, match="disk full"):
    write_report(tmp_path / "r", report={"run": 2}, summary={}, figures={"f": Broken()}, force=True)
  assert json.loads((out / "report.json").read_text()) == {"run": 1}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["r"], "no temporary folder may be left"
  write_report(tmp_path / "r", report={"run": 3}, summary={}, force=True)
  assert json.loads((out / "report.json").read_text()) == {"run": 3}


def test_load_trace_names_a_missing_trace(tmp_path):
  with pytest.raises(FileNotFoundError, match="no saved trace"):
    load_trace(tmp_path)


def _user_folder(tmp_path):
  d = tmp_path / "project"
  d.mkdir()
  (d / "main.py").write_text("print('mine')")
  return d


@pytest.mark.parametrize("force", [False, True])
def test_foreign_folders_and_files_are_never_replaced(tmp_path, force):
  d = _user_folder(tmp_path)
  f = tmp_path / "results.csv"
  f.write_text("a,b\n")
  for target, match in ((d, "did not write"), (f, "existing file"), (f / "sub", "is a file")):
    with pytest.raises(ReportPathError, match=match):
      write_report(target, report={}, summary={}, force=force)
  assert (d / "main.py").read_text() == "print('mine')" and f.read_text() == "a,b\n"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["project", "results.csv"]


def test_previous_report_needs_force_and_user_files_protect_it(tmp_path):
  out = write_report(tmp_path / "r", report={"run": 1}, summary={})
  assert (out / MARKER).exists()
  with pytest.raises(ReportPathError, match="--force"):
    write_report(out, report={"run": 2}, summary={})
  write_report(out, report={"run": 2}, summary={}, force=True)
  assert json.loads((out / "report.json").read_text()) == {"run": 2}
  (out / "notes.txt").write_text("my notes")
  with pytest.raises(ReportPathError, match="notes.txt"):
    write_report(out, report={"run": 3}, summary={}, force=True)
  assert (out / "notes.txt").read_text() == "my notes"


def test_empty_folder_and_new_nested_folder_are_accepted(tmp_path):
  (tmp_path / "empty").mkdir()
  write_report(tmp_path / "empty", report={}, summary={})
  write_report(tmp_path / "a" / "b", report={}, summary={})
  assert (tmp_path / "a" / "b" / "report.json").exists()
  assert check_out_dir(tmp_path / "new") == (tmp_path / "new").absolute()


def test_index_html_uses_human_names_and_shows_intro_and_notes(tmp_path):
  out = write_report(tmp_path / "r", report={}, summary={"kl_mean": 0.01, "success@600": 50.0},
                     intro={"question": "What is the number?"}, notes={"pruning does nothing": "try --top-k 2"})
  html = (out / "index.html").read_text()
  assert "next-token KL, mean (nats)" in html and ">kl_mean<" not in html
  assert "needle retrieved at 600 tokens (%)" in html
  assert "What is the number?" in html and "try --top-k 2" in html


# ------------------------------------------------------------------ output folders: placement and ownership


def _busy_rename(monkeypatch, folder):
  """os.rename of `folder` (to or from) fails as on a mount point (a Docker volume): EBUSY."""
  real = os.rename

  def rename(src, dst, *a, **k):
    if pathlib.Path(src) == folder or pathlib.Path(dst) == folder:
      raise OSError(errno.EBUSY, "Device or resource busy", str(folder))
    return real(src, dst, *a, **k)
  monkeypatch.setattr(os, "rename", rename)


@pytest.mark.parametrize("previous", [False, True])
def test_failed_final_rename_falls_back_to_writing_in_place(tmp_path, monkeypatch, previous):
  out = tmp_path / "vol"
  if previous:
    write_report(out, report={"run": 1}, summary={}, figures={"old": lambda p: open(p, "wb").write(b"x")})
  else:
    out.mkdir()
  _busy_rename(monkeypatch, out)
  with pytest.warns(ReportWarning, match=r"--out .*vol: moving the finished report .*Errno 16.* in place"):
    write_report(out, report={"run": 2}, summary={}, trace=_trace(), force=previous)
  assert json.loads((out / "report.json").read_text()) == {"run": 2}
  assert not (out / "old.png").exists(), "the previous report's files are replaced"
  assert len(load_trace(out)) == 2
  assert sorted(p.name for p in tmp_path.iterdir()) == ["vol"], "no temporary folder may be left"
  assert not [p for p in out.iterdir() if p.name.startswith(".stream_jax-")]
  remove_report(out)  # the marker of an in-place report covers every file
  assert not out.exists()


def test_mount_point_is_detected_before_any_compute(tmp_path, monkeypatch):
  out = tmp_path / "vol"
  out.mkdir()
  real = os.path.ismount
  monkeypatch.setattr(os.path, "ismount", lambda p: pathlib.Path(p) == out or real(p))
  assert outdir.plan(out) == (out, outdir.IN_PLACE)
  _busy_rename(monkeypatch, out)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # planned, so no fallback notice
    write_report(out, report={"run": 1}, summary={})
    write_report(out, report={"run": 2}, summary={}, force=True)
  assert json.loads((out / "report.json").read_text()) == {"run": 2}
  assert outdir.plan(tmp_path / "new") == (tmp_path / "new", outdir.SWAP)


def test_a_finished_report_that_cannot_be_put_in_place_is_kept(tmp_path, monkeypatch):
  out = tmp_path / "r"
  monkeypatch.setattr(outdir, "_swap", lambda *a: (_ for _ in ()).throw(OSError(errno.EXDEV, "cross-device")))
  monkeypatch.setattr(outdir, "_in_place", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
  with pytest.warns(ReportWarning), pytest.raises(ReportPathError, match=r"--out .*r: the finished report is "
                                                  r"kept, complete, in .*I/O error") as e:
    write_report(out, report={"run": 1}, summary={})
  kept = pathlib.Path(re.search(r"complete, in (\S+);", str(e.value)).group(1))
  assert json.loads((kept / "report.json").read_text()) == {"run": 1} and (kept / MARKER).exists()


def test_no_space_is_refused_before_any_compute(tmp_path, monkeypatch):
  monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1 << 20))
  with pytest.raises(ReportPathError, match=r"--out .*: only 1 MiB free"):
    check_out_dir(tmp_path / "r")


@pytest.mark.parametrize("how", ["edited", "added", "folder", "legacy"])
def test_force_and_clean_refuse_a_report_a_user_changed(tmp_path, how):
  out = write_report(tmp_path / "r", report={"run": 1}, summary={}, trace=_trace())
  if how == "edited":
    (out / "index.html").write_text("<p>my annotations</p>")
  elif how == "added":
    (out / "trace" / "notes.txt").write_text("mine")
  elif how == "folder":
    (out / "plots").mkdir()
  else:  # a marker from before content hashes lists names only: edits cannot be ruled out
    meta = json.loads((out / MARKER).read_text())
    (out / MARKER).write_text(json.dumps({"written_by": "stream_jax", "files": sorted(meta["files"])}))
  before = sorted(p.relative_to(out) for p in out.rglob("*"))
  match = {"edited": r"were changed .*\(index.html\)", "added": r"did not write \(trace/notes.txt\)",
           "folder": r"did not write \(plots/\)", "legacy": "no content hashes"}[how]
  with pytest.raises(ReportPathError, match=match):
    write_report(out, report={"run": 2}, summary={}, force=True)
  with pytest.raises(ReportPathError, match=match):
    remove_report(out)
  assert outdir.clean([str(out)]) == 1
  assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
  assert json.loads((out / "report.json").read_text()) == {"run": 1}


def test_clean_removes_an_unchanged_report_and_nothing_else(tmp_path):
  out = write_report(tmp_path / "reports" / "demo", report={}, summary={}, trace=_trace())
  (tmp_path / "reports" / "mine.txt").write_text("mine")
  assert outdir.clean([str(out)]) == 0
  assert not out.exists() and (tmp_path / "reports" / "mine.txt").read_text() == "mine"
  assert outdir.clean([str(out)], missing_ok=True) == 0 and outdir.clean([str(out)]) == 1
  foreign = _user_folder(tmp_path)
  assert outdir.clean([str(foreign)]) == 1 and (foreign / "main.py").exists()


def test_make_clean_runs_the_standard_library_script(tmp_path):
  """`make clean` runs stream_jax/outdir.py with any python3, after .venv is gone: -I -S (no site-packages,
  no script folder on sys.path) proves it needs nothing else."""
  out = write_report(tmp_path / "demo", report={}, summary={})
  (out / "report.json").write_text("{}  ")
  script = pathlib.Path(outdir.__file__)
  run = lambda: subprocess.run([sys.executable, "-I", "-S", str(script), "clean", "--missing-ok", str(out)],
                               capture_output=True, text=True, timeout=60)
  r = run()
  assert r.returncode == 1 and "report.json" in r.stderr and out.exists(), r.stderr
  (out / "report.json").write_text("{}")
  r = run()
  assert r.returncode == 0 and not out.exists(), r.stderr
  makefile = (script.parent.parent / "Makefile").read_text()
  assert "stream_jax/outdir.py clean --missing-ok reports/demo" in makefile and "rm -rf reports" not in makefile


def test_a_report_without_trace_says_so_and_shows_its_conclusion(tmp_path):
  out = write_report(tmp_path / "r", report={}, summary={"tokens": 3},
                     conclusion="First paragraph.\n\nSecond paragraph.")
  html = (out / "index.html").read_text()
  assert "load_trace" not in html and "holds no trace" in html
  assert "What this run shows" in html and "<p>First paragraph.</p><p>Second paragraph.</p>" in html
  html = (write_report(tmp_path / "t", report={}, summary={}, trace=_trace()) / "index.html").read_text()
  assert "load_trace" in html and "What this run shows" not in html


def test_a_trace_can_feed_the_viewer_without_being_kept(tmp_path):
  """keep_trace=False (a sweep's report): the viewer maps the trace, the folder keeps no trace and says so."""
  out = write_report(tmp_path / "r", report={}, summary={}, trace=_trace(), viewer={}, keep_trace=False)
  html = (out / "index.html").read_text()
  assert "holds no trace" in html and 'href="viewer/index.html"' in html
  assert (out / "viewer" / "manifest.json").is_file() and not (out / "trace.json").exists()
  with pytest.raises(FileNotFoundError):
    load_trace(out)
  kept = write_report(tmp_path / "k", report={}, summary={}, trace=_trace(), viewer={})
  assert (kept / "trace.json").is_file() and (kept / "viewer" / "manifest.json").is_file()


def test_every_faithfulness_number_has_a_name_and_an_explanation():
  """The seven pruned-regime and coverage keys used to appear raw in the HTML."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from stream_jax.analysis.faithfulness import FaithfulnessReport  # pylint: disable=import-outside-toplevel
  from stream_jax.report import human  # pylint: disable=import-outside-toplevel
  z = jnp.linspace(0, 1, 10)
  rep = FaithfulnessReport(kl=z, top1=z, top5=z, kl_last=z[-1], top1_last=z[-1], top5_last=z[-1],
                           residual_error=z[:3], kept_per_layer=z[:3], kept_overall=z[3], kept_stream=z[4],
                           oracle_recall=z[:3], dense_mass_share=z[:3], pruned_from=4,
                           coverage_per_layer=z[:3])
  keys = list(rep.summary()) + ["needle_mass_dense", "needle_mass_stream", "near_tied_heads",
                                "success@600", "dense_prefill_and_answer_s", "total_seconds"]
  assert {"kl_pruned", "coverage_worst_layer"} <= set(keys)
  for key in keys:
    name, why = human(key)
    assert "_" not in name and why, key
