"""Sharded forward on 4 fake CPU devices equals the one-device forward; the benchmark's CPU mode runs.

XLA_FLAGS=--xla_force_host_platform_device_count=4 must be set before jax initialises, so both run in
subprocesses (started together: each is mostly one compile thread, and the machine has two cores).
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("sharding_bench")
  cmds = {"checks": [sys.executable, str(ROOT / "tests" / "sharding_checks.py")],
          "bench": [sys.executable, str(ROOT / "benchmarks" / "sharding.py"), "--small", "--out", str(out)]}
  procs = {k: subprocess.Popen(c, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for k, c in cmds.items()}
  results = {}
  for k, p in procs.items():
    try:
      text, _ = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      p.kill()
      text, _ = p.communicate()
    results[k] = (p.returncode, text)
  return results, out


def test_sharded_forward_equals_one_device(runs):
  rc, text = runs[0]["checks"]
  assert rc == 0 and "ALL OK" in text, text[-4000:]
  for what in ("dense data=2 model=2", "sparse data=1 model=4", "exact data=4 model=1", "orbax round-trip",
               "pallas data=4 (shard_map)", "bad meshes"):
    assert f"ok {what}" in text


def test_benchmark_small_mode(runs):
  import json
  rc, text = runs[0]["bench"]
  assert rc == 0, text[-4000:]
  assert "| phase | config | mesh |" in text and "speed-up vs 1 device" in text
  rows = json.loads((runs[1] / "sharding_small.json").read_text())["rows"]
  assert [(r["phase"], r["mesh"]["data"], r["mesh"]["model"]) for r in rows] == [
      ("sweep", 1, 1), ("sweep", 4, 1), ("tp", 1, 1), ("tp", 1, 4)]
  assert not [r for r in rows if "error" in r]
  assert rows[1]["trace_spec"] == "P('data',)" and rows[3]["trace_spec"] == "P(None, 'model')"
  assert rows[1]["speedup"] > 0 and rows[3]["speedup"] > 0
  # tensor parallelism splits the weights: each device holds about a quarter of the attention and MLP
  assert rows[3]["memory_bytes"] < 0.6 * rows[2]["memory_bytes"]
