"""The benchmark scripts' CPU modes run, so they cannot rot."""

import json
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import scaling  # noqa: E402


def test_scaling_small_mode(tmp_path, capsys):
  rows = scaling.main(["--small", "--repeats", "1", "--out", str(tmp_path)])
  out = capsys.readouterr().out
  assert "| variant | time slope" in out and "dense capture (bf16)" in out
  ok = [r for r in rows if "error" not in r]
  assert {r["variant"] for r in ok} == {"plain", "capture", "stream_xla"}
  stream = {r["T"]: r for r in ok if r["variant"] == "stream_xla"}
  capture = {r["T"]: r for r in ok if r["variant"] == "capture"}
  assert stream[1024]["kept_fraction"] < stream[256]["kept_fraction"] <= 1.0
  # the trace grows linearly, the captured probabilities quadratically
  assert stream[1024]["trace_bytes"] < 4.5 * stream[256]["trace_bytes"] * 2
  assert capture[1024]["trace_bytes"] == 16 * capture[256]["trace_bytes"]
  assert (tmp_path / "scaling_gemma3-270m-6layers.png").stat().st_size > 0
  saved = json.loads((tmp_path / "scaling_gemma3-270m-6layers.json").read_text())
  assert len(saved["rows"]) == len(rows)


def test_dense_capture_memory_model():
  from stream_jax.models import get_config
  cfg = get_config("gemma3-4b")
  t = 131_072
  assert scaling.dense_capture_bytes(cfg, t) == cfg.num_layers * cfg.num_heads * t * t * 2
