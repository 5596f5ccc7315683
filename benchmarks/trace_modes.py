"""The two ways to trace, side by side: what each trace mode costs against a plain forward, in one run.

For a Gemma 3 config with random bf16 weights (made on the device) and each length, every mode runs in a
process of its own (so the device peak is that mode's alone; an out-of-memory costs one point):

  plain           plain forward, cuDNN attention (the speed floor: no trace)
  sparse          StreamConfig(): the paper's top_k 16, the output computed from the kept blocks
  exact           StreamConfig(), output="exact": dense output, the k16 trace observes it (with coverage)
  faithful        StreamConfig.faithful(): estimated adaptive budget (coverage 0.95, cap 128), sparse output;
                  its search's upper rounds shared by 8 query blocks from 64k tokens (search_share="auto")
  faithful_exact  StreamConfig.faithful(), output="exact"
  ideal_exact     StreamConfig.ideal(), output="exact": dense output, the ideal kept set from the dense
                  pass's lse (true mass, exact coverage 0.95); its block-mass pass on the Pallas kernel
  ideal_exact_xla the same with the block-mass pass on the XLA path (backend="xla" for the trace)
  oracle_exact    the ideal set the old way: faithful() with representative="oracle" (XLA, O(T^2) scoring)
  faithful_q<Q>   StreamConfig.faithful(query_stride=Q): the estimator scores with every Q-th query of a
                  block (2, 4, 8: 1/Q of its scoring work); faithful_q<Q>_exact with output="exact"
  faithful_p<P>   StreamConfig.faithful(search_share=P): P neighbouring query blocks share the search's
                  upper rounds (2, 4, 8) at every length; faithful_p1: one search per query block; on
                  Hopper the Mosaic estimate kernel runs them
  table           StreamConfig.table(): every causal block scored once by the true mass every 4th query
                  gives it, no search, no dense pass, sparse output; table_q<Q> samples every Q-th query;
                  table_exact / table_q<Q>_exact with output="exact"

Median of --repeats timed runs after one warm-up (device-synchronised, logits at the last position only),
the device allocator's peak, the compiled executable's memory, the trace's size, kept fraction and mean
coverage of the global layers. Ratios are against `plain` at the same length, from the same run.

  python benchmarks/trace_modes.py --lengths 32k,128k
  python benchmarks/trace_modes.py --lengths 1m --modes plain,sparse,ideal_exact --repeats 0
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402  pylint: disable=wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import scaling  # noqa: E402  pylint: disable=wrong-import-position
import stream_jax as sj  # noqa: E402  pylint: disable=wrong-import-position
from stream_jax.models import forward, get_config  # noqa: E402  pylint: disable=wrong-import-position

MODES = ("plain", "sparse", "exact", "faithful", "faithful_exact", "ideal_exact", "ideal_exact_xla",
         "oracle_exact", "faithful_q2", "faithful_q4", "faithful_q8", "faithful_q4_exact", "faithful_p1",
         "faithful_p2", "faithful_p4", "faithful_p8", "faithful_p16", "table", "table_exact",
         "table_q4", "table_q8", "table_q16", "table_q32", "table_q8_exact", "table_q16_exact")


def mode_kwargs(mode: str) -> dict:
  """The `forward` arguments of a mode (logits at the last position only)."""
  gpu = jax.default_backend() == "gpu"
  kw = dict(last_only=True, backend="auto")
  if mode == "plain":
    return dict(kw, attention="dense", dense_impl="cudnn" if gpu else "xla")
  if mode.startswith("faithful_q"):
    stream = sj.StreamConfig.faithful(query_stride=int(mode.split("_")[1][1:]))
  elif mode.startswith("faithful_p"):
    stream = sj.StreamConfig.faithful(search_share=int(mode.split("_")[1][1:]))
  elif mode.startswith("table"):
    part = mode.split("_")
    stream = sj.StreamConfig.table(**({"query_stride": int(part[1][1:])} if part[1:2] and part[1] != "exact"
                                      else {}))
  else:
    stream = {"sparse": sj.StreamConfig(), "exact": sj.StreamConfig(), "faithful": sj.StreamConfig.faithful(),
              "faithful_exact": sj.StreamConfig.faithful(), "ideal_exact": sj.StreamConfig.ideal(),
              "ideal_exact_xla": sj.StreamConfig.ideal(),
              "oracle_exact": sj.StreamConfig.faithful(representative="oracle")}[mode]
  kw.update(attention=stream)
  if "exact" in mode:
    kw.update(output="exact")
  if mode in ("ideal_exact_xla", "oracle_exact"):
    kw.update(backend="xla")
  return kw


def run_point(config_name: str, mode: str, t: int, repeats: int) -> dict:
  config = get_config(config_name)
  if t > config.max_length:  # speed and memory past the trained context (random weights: no quality claim)
    config = config.replace(context_length=t)
  params = scaling.device_random_params(config, jnp.bfloat16)
  tokens = jnp.asarray(np.random.default_rng(t).integers(3, config.vocab_size, size=(1, t)), jnp.int32)
  kw = mode_kwargs(mode)
  fn = jax.jit(lambda p, x: forward(config, p, x, **kw))
  t0 = time.perf_counter()
  compiled = fn.lower(params, tokens).compile()
  compile_s = time.perf_counter() - t0
  times, out = [], None
  for _ in range(repeats + 1):
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(params, tokens))
    times.append(time.perf_counter() - t0)
  row = dict(mode=mode, T=t, compile_s=compile_s, time_s=statistics.median(times[1:] if repeats else times),
             peak_bytes=scaling.peak_device_bytes(), memory_bytes=scaling._memory(compiled),  # pylint: disable=protected-access
             device=jax.devices()[0].device_kind, repeats=repeats)
  if out.trace is not None:
    row["trace_bytes"] = out.trace.nbytes()
    row["kept_fraction"] = float(out.trace.kept_fraction("global"))
    cov = out.trace.coverage("global")
    if cov is not None:
      row["coverage"] = float(cov)
  return row


def run_isolated(args, mode: str, t: int) -> dict:
  cmd = [sys.executable, __file__, "--worker", "--config", args.config, "--modes", mode, "--lengths", str(t),
         "--repeats", str(args.repeats)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.point_timeout)
  except subprocess.TimeoutExpired:
    return dict(mode=mode, T=t, error=f"timeout after {args.point_timeout:.0f} s")
  for line in proc.stdout.splitlines():
    if line.startswith("ROW "):
      return json.loads(line[4:])
  tail = [l for l in (proc.stderr or "").splitlines() if l.strip()]
  err = tail[-1][:200] if tail else f"exit {proc.returncode}"
  if "RESOURCE_EXHAUSTED" in (proc.stderr or "") or "out of memory" in (proc.stderr or "").lower():
    err = "OOM: " + err
  return dict(mode=mode, T=t, error=err)


def table(rows) -> str:
  plain = {r["T"]: r["time_s"] for r in rows if r["mode"] == "plain" and "time_s" in r}
  lines = ["| T | mode | time (s) | x plain | device peak | compiled memory | trace | kept (global) | "
           "coverage (global) |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['T']:,} | {r['mode']} | {r['error']} | | | | | | |")
      continue
    ratio = f"{r['time_s'] / plain[r['T']]:.2f}" if r["T"] in plain else ""
    lines.append(f"| {r['T']:,} | {r['mode']} | {r['time_s']:.3f} | {ratio} | "
                 f"{scaling.fmt_bytes(r['peak_bytes'])} | {scaling.fmt_bytes(r['memory_bytes'])} | "
                 f"{scaling.fmt_bytes(r['trace_bytes']) if 'trace_bytes' in r else ''} | "
                 f"{r.get('kept_fraction', float('nan')):.3f} | {r.get('coverage', float('nan')):.3f} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="gemma3-4b", help="Gemma preset (random bf16 weights), e.g. gemma3-1b")
  p.add_argument("--lengths", type=scaling.parse_lengths, default=scaling.parse_lengths("32k,128k"),
                 help="comma-separated token counts (k = 1024, m = 1024^2); default 32k,128k")
  p.add_argument("--modes", default="plain,sparse,exact,faithful,faithful_exact,ideal_exact",
                 help=f"comma-separated, of {', '.join(MODES)}")
  p.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up (0: time one run)")
  p.add_argument("--point-timeout", type=float, default=580.0, help="seconds per (mode, length) process")
  p.add_argument("--out", default="benchmarks/out", help="folder for trace_modes_<config>.json")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  bad = [m for m in modes if m not in MODES]
  if bad:
    p.error(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
  if args.repeats < 0:
    p.error("--repeats must be >= 0")
  if args.worker:
    try:
      row = run_point(args.config, modes[0], args.lengths[0], args.repeats)
    except Exception as e:  # pylint: disable=broad-except
      row = dict(mode=modes[0], T=args.lengths[0], error=(str(e).splitlines() or [type(e).__name__])[0][:200])
    print("ROW " + json.dumps(row), flush=True)
    return [row]
  print(f"config {args.config}, random bf16 weights, jax {jax.__version__}, modes {modes}", flush=True)
  rows = []
  for t in args.lengths:
    for m in modes:
      row = run_isolated(args, m, t)
      rows.append(row)
      print(json.dumps(row), flush=True)
  device = next((r["device"] for r in rows if "device" in r), "?")
  text = table(rows)
  print(f"\n{args.config} on {device}\n\n{text}\n", flush=True)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  meta = dict(date=datetime.date.today().isoformat(), device=device, jax=jax.__version__, config=args.config,
              command=" ".join(["python", "benchmarks/trace_modes.py"] + list(argv or sys.argv[1:])), rows=rows)
  (out / f"trace_modes_{args.config}.json").write_text(json.dumps(meta, indent=1))
  return rows


if __name__ == "__main__":
  main()
