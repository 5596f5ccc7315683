"""Report folders: trace round-trip through orbax, atomic replacement."""

import json

import jax
import numpy as np
import pytest

import stream_jax as sj
from stream_jax.report import MARKER, ReportPathError, check_out_dir, load_trace, write_report
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


def test_a_report_without_trace_says_so_and_shows_its_conclusion(tmp_path):
  out = write_report(tmp_path / "r", report={}, summary={"tokens": 3},
                     conclusion="First paragraph.\n\nSecond paragraph.")
  html = (out / "index.html").read_text()
  assert "load_trace" not in html and "holds no trace" in html
  assert "What this run shows" in html and "<p>First paragraph.</p><p>Second paragraph.</p>" in html
  html = (write_report(tmp_path / "t", report={}, summary={}, trace=_trace()) / "index.html").read_text()
  assert "load_trace" in html and "What this run shows" not in html


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
