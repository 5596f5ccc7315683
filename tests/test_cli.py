"""`stream-jax` through subprocess: every subcommand on small inputs, and bad inputs with their messages."""

import json
import pathlib
import subprocess
import sys

import pytest

from stream_jax.report import load_trace

CLI = [sys.executable, "-m", "stream_jax.cli"]


def run(*args, cwd=None):
  return subprocess.run(CLI + list(args), capture_output=True, text=True, cwd=cwd, timeout=900)


@pytest.mark.parametrize("args,message", [
    (["demo", "--top-k", "0"], "--top-k must be an integer >= 1"),
    (["demo", "--block-q", "48"], "--block-q must be a positive power of two"),
    (["demo", "--length", "-3"], "--length must be >= 1"),
    (["trace", "--file", "/no/such/file.txt"], "does not exist"),
    (["trace", "--text", "hi", "--model", "/no/such/model.gguf"], "neither a known name"),
    (["niah", "--variant", "nope"], "--variant must be one of"),
    (["niah", "--depths", "50,150"], "--depths are percentages"),
    (["anchors", "--file", "/no/such/cot.txt"], "does not exist"),
    (["trace"], "one of the arguments --text --file is required"),
])
def test_bad_inputs_exit_2_with_a_message(args, message):
  r = run(*args)
  assert r.returncode == 2, r.stderr
  assert message in r.stderr


def test_demo_writes_a_restorable_report(tmp_path):
  out = tmp_path / "demo"
  r = run("demo", "--length", "320", "--block-q", "32", "--block-k", "32", "--top-k", "2",
          "--max-new-tokens", "4", "--out", str(out))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "dense vs Stream, 320 tokens" in r.stdout and "Stream answer:" in r.stdout
  report = json.loads((out / "report.json").read_text())
  assert report["sample"]["length"] == 320
  assert 0 < report["faithfulness"]["kept_stream"] < 1
  trace = load_trace(out)
  assert len(trace) == 18 and trace[5].kind == "global"
  for name in ("index.html", "route.png", "needle_mass.png", "mask_layer5.png"):
    assert (out / name).stat().st_size > 0
  assert not list(tmp_path.glob(".demo.*")), "no temporary folder may be left"


def test_trace_anchors_and_niah_on_small_inputs(tmp_path):
  cot = tmp_path / "cot.txt"
  cot.write_text("<think>We need 17 * 23. First, 17 * 20 = 340. Then 17 * 3 = 51. Adding gives 391. "
                 "Let me double-check: 23 * 17 = 23 * 10 + 23 * 7 = 230 + 161 = 391. That matches. "
                 "So the product is 391. I am confident now.</think> The answer is 391.")
  r = run("anchors", "--file", str(cot), "--block-q", "16", "--block-k", "16", "--top-k", "2",
          "--out", str(tmp_path / "anchors"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "receiver heads" in r.stdout and (tmp_path / "anchors" / "vertical_scores.png").exists()

  r = run("trace", "--file", str(cot), "--block-q", "16", "--block-k", "16", "--top-k", "2",
          "--out", str(tmp_path / "trace"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "kl_mean" in r.stdout and (tmp_path / "trace" / "trace.json").exists()

  r = run("niah", "--lengths", "200", "--samples", "1", "--block-q", "16", "--block-k", "16",
          "--top-k", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "niah"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "string_match_all" in r.stdout
  rows = json.loads((tmp_path / "niah" / "report.json").read_text())["samples"]
  assert rows[0]["length"] == 200 and len(rows) == 1


def test_prompt_longer_than_the_context_is_refused(tmp_path):
  r = run("niah", "--lengths", "40000", "--samples", "1", "--out", str(tmp_path / "n"))
  assert r.returncode == 2 and "longer than the model's context" in r.stderr
