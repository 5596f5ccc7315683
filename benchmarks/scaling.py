"""Scaling of a full Stream trace vs dense attention capture vs a plain dense forward.

For a Gemma 3 config with random bf16 weights and T in a range of lengths, measures in one run:
  plain          plain forward, fastest dense attention (cuDNN on GPU), logits at the last position;
  capture        dense forward that also returns every layer's attention probabilities (what
                 `output_attentions=True` does), until it runs out of memory;
  stream_xla     Stream traced forward (masks + block mass of every layer), XLA backend;
  stream_pallas  the same with the Pallas kernels (GPU only).
Reports compile time, median wall time (device-synchronised), time per token, the device's peak memory
(`memory_stats()["peak_bytes_in_use"]`, GPU) next to the compiled executable's memory (arguments + outputs +
temporaries, from `memory_analysis()`), trace size and kept fraction; ratios against `plain`, log-log slopes
over T (from --slope-from up), the dense-capture memory model for Gemma 3 4B / 27B, and a PNG plot.

--isolate runs every (variant, T) point in its own process with a time limit (--point-timeout): the device
peak is then that point's alone, and an out-of-memory or a hang costs one point, not the sweep. An
out-of-memory says what to chunk or shard.

  python benchmarks/scaling.py --config gemma3-4b --lengths 8k,32k,128k
  python benchmarks/scaling.py --config gemma3-1b --lengths 128k,1m,4m --variants stream_pallas --isolate
  python benchmarks/scaling.py --small          # CPU-sized smoke run (CI), under a minute
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time

# Let a long-context point use the whole card (JAX preallocates 75% by default); set before jax starts.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402  pylint: disable=wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position

import stream_jax as sj  # noqa: E402  pylint: disable=wrong-import-position
from stream_jax.models import forward, get_config, init_params  # noqa: E402  pylint: disable=wrong-import-position
from stream_jax.models import layers as model_layers  # noqa: E402  pylint: disable=wrong-import-position
from stream_jax.models.params import assemble, hf_shapes  # noqa: E402  pylint: disable=wrong-import-position

# exact_*: output="exact" (dense logits; the trace observes dense attention: mask, dense block mass,
# coverage), dense part through cuDNN on a GPU.
VARIANTS = ("plain", "capture", "stream_xla", "stream_pallas", "exact_xla", "exact_pallas")


def parse_lengths(text: str) -> list[int]:
  out = []
  for part in text.split(","):
    part = part.strip().lower()
    mult = 1
    if part.endswith("k"):
      part, mult = part[:-1], 1024
    elif part.endswith("m"):
      part, mult = part[:-1], 1024 * 1024
    value = int(float(part) * mult)
    if value < 1:
      raise argparse.ArgumentTypeError(f"--lengths: every length must be >= 1, got {part!r}")
    out.append(value)
  return out


def dense_capture_bytes(config, t: int, bytes_per: int = 2) -> int:
  """What `output_attentions=True` stores: layers x heads x T^2 probabilities (bf16 by default)."""
  return config.num_layers * config.num_heads * t * t * bytes_per


def stream_trace_bytes(config, t: int, stream: sj.StreamConfig) -> int:
  """Trace size from its shapes: per layer indices + mass [N, nQ, C] (4 bytes each) and counts [N, nQ]."""
  n_q = -(-t // stream.block_q)
  total = 0
  for kind in config.layer_kinds:
    if kind == "global":
      c = stream.capacity
    else:
      c = min(-(-t // stream.block_k), (stream.block_q + config.sliding_window - 2) // stream.block_k + 2)
    total += config.num_heads * n_q * (8 * c + 4)
  return total


def device_random_params(config, dtype, seed: int = 0, scale: float = 0.02) -> dict:
  """Random weights made on the device (seconds for a 4B model, where `init_params` draws them with numpy
  on the host): normal(0, scale) weights, normal(0, 0.1) norm scales (around 1 without the norm offset)."""
  key = jax.random.key(seed)
  t = {}
  for i, (name, shape) in enumerate(hf_shapes(config).items()):
    k = jax.random.fold_in(key, i)
    if name.endswith("norm.weight"):
      t[name] = jax.random.normal(k, shape, jnp.float32) * 0.1 + (0.0 if config.norm_offset else 1.0)
    else:
      t[name] = jax.random.normal(k, shape, dtype) * jnp.asarray(scale, dtype)  # no f32 copy on the device
  return {"params": assemble(config, t)}


def peak_device_bytes() -> int:
  """The device allocator's peak bytes in use since the process started (-1 where not reported)."""
  stats = jax.devices()[0].memory_stats() or {}
  return int(stats.get("peak_bytes_in_use", -1))


def oom_advice(config, t: int, variant: str) -> str:
  """What to chunk or shard when a point does not fit."""
  d, f = config.embed_dim, config.hidden_dim
  td = t * d * 2
  if variant == "capture":
    return (f"dense capture stores layers x heads x T^2 probabilities ({fmt_bytes(dense_capture_bytes(config, t))} "
            "in bf16): use a Stream trace instead")
  return (f"out of memory at T={t:,}: the activations are a few copies of [T, D] ({fmt_bytes(td)} each in "
          f"bf16; the MLP's [T, F] = {fmt_bytes(t * f * 2)} runs in chunks of "
          f"{model_layers.POSITION_CHUNK} positions, stream_jax.models.layers.POSITION_CHUNK). Shard the "
          "sequence or the heads over more devices (a jax.sharding mesh), keep last_only=True (no [T, V] "
          "logits), or trace a shorter T")


def _memory(compiled) -> int:
  m = compiled.memory_analysis()
  if m is None:
    return -1
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def run_one(variant, config, params, t, stream_cfg, repeats):
  """One point: compile, then one warm-up run and `repeats` timed runs (repeats=0: the first run is timed)."""
  tokens = jnp.asarray(np.random.default_rng(t).integers(3, config.vocab_size, size=(1, t)), jnp.int32)
  if t > config.max_length:  # speed and memory past the trained context (random weights: no quality claim)
    config = config.replace(context_length=t)
  kwargs = dict(last_only=True)
  if variant == "plain":
    kwargs.update(attention="dense", dense_impl="cudnn" if jax.default_backend() == "gpu" else "xla")
  elif variant == "capture":
    kwargs.update(attention="dense", dense_impl="capture")
  else:
    kwargs.update(attention=stream_cfg, backend="pallas" if variant.endswith("_pallas") else "xla")
    if variant.startswith("exact"):
      kwargs.update(output="exact")

  fn = jax.jit(lambda p, x: forward(config, p, x, **kwargs))
  t0 = time.perf_counter()
  compiled = fn.lower(params, tokens).compile()
  compile_s = time.perf_counter() - t0
  memory = _memory(compiled)
  times = []
  out = None
  for _ in range(repeats + 1):  # the first run warms up
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(params, tokens))
    times.append(time.perf_counter() - t0)
  timed = times[1:] if repeats else times
  row = dict(variant=variant, T=t, compile_s=compile_s, time_s=statistics.median(timed),
             memory_bytes=memory, peak_bytes=peak_device_bytes(), device=jax.devices()[0].device_kind)
  row["us_per_token"] = row["time_s"] / t * 1e6
  if variant.startswith(("stream", "exact")):
    row["trace_bytes"] = out.trace.nbytes()
    row["kept_fraction"] = float(out.trace.kept_fraction("global"))
    cov = out.trace.coverage("global")
    if cov is not None:
      row["coverage"] = float(cov)
  elif variant == "capture":
    row["trace_bytes"] = int(sum(np.prod(p.shape) * p.dtype.itemsize for p in out.probs))
  del out
  return row


def is_oom(e: BaseException) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def error_row(variant, config, t, e: BaseException) -> dict:
  if is_oom(e):
    advice = oom_advice(config, t, variant)
    print(f"OOM: {variant} at T={t:,}: {advice}", file=sys.stderr, flush=True)
    msg = f"OOM (needs > {fmt_bytes(dense_capture_bytes(config, t))} for probs)" if variant == "capture" \
        else "OOM"
    return dict(variant=variant, T=t, error=msg, advice=advice)
  return dict(variant=variant, T=t, error=str(e).splitlines()[0][:120] if str(e) else type(e).__name__)


def run_isolated(args, variant: str, t: int) -> dict:
  """One point in a child process (a fresh device: its own peak memory), killed after --point-timeout."""
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--config", args.config, "--lengths", str(t),
         "--variants", variant, "--repeats", str(args.repeats), "--top-k", str(args.top_k)]
  if args.coverage is not None:
    cmd += ["--coverage", str(args.coverage)]
  if args.small:
    cmd.append("--small")
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.point_timeout, check=False)
  except subprocess.TimeoutExpired:
    return dict(variant=variant, T=t, error=f"timeout after {args.point_timeout:.0f} s")
  rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
  if rows:
    rows[-1]["process_s"] = time.perf_counter() - t0
    return rows[-1]
  tail = (proc.stderr or proc.stdout).strip().splitlines()
  return dict(variant=variant, T=t, error=f"exit {proc.returncode}: {tail[-1][:160] if tail else ''}")


def slope(rows, key, t_min: int = 0):
  """Log-log slope of rows[key] over T, from T >= t_min (all points where fewer than two reach it)."""
  pts = [(r["T"], r[key]) for r in rows if r.get(key, -1) and r.get(key, -1) > 0]
  if len([p for p in pts if p[0] >= t_min]) >= 2:
    pts = [p for p in pts if p[0] >= t_min]
  if len(pts) < 2:
    return float("nan")
  x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
  return float(np.polyfit(x, y, 1)[0])


def fmt_bytes(b):
  if b is None or b < 0:
    return "-"
  for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
    if abs(b) < 1024:
      return f"{b:.1f} {unit}"
    b /= 1024
  return f"{b:.1f} EiB"


def table(rows, config_name, slope_from: int = 0):
  by = {(r["variant"], r["T"]): r for r in rows}
  lengths = sorted({r["T"] for r in rows})
  variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
  lines = [f"### {config_name}", "",
           "| T | variant | time (s) | us/token | vs plain | compile (s) | device peak | compiled memory | trace "
           "| kept frac |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for t in lengths:
    plain = by.get(("plain", t))
    for v in variants:
      r = by.get((v, t))
      if r is None:
        continue
      if "error" in r:
        lines.append(f"| {t:,} | {v} | {r['error']} | | | | | | | |")
        continue
      ratio = f"{r['time_s'] / plain['time_s']:.2f}x" if plain and "time_s" in plain else "-"
      kept = f"{r['kept_fraction']:.4f}" if "kept_fraction" in r else "-"
      if "coverage" in r:
        kept += f" (coverage {r['coverage']:.3f})"
      lines.append(f"| {t:,} | {v} | {r['time_s']:.4f} | {r['time_s'] / t * 1e6:.3f} | {ratio} | "
                   f"{r['compile_s']:.1f} | {fmt_bytes(r.get('peak_bytes', -1))} | "
                   f"{fmt_bytes(r['memory_bytes'])} | {fmt_bytes(r.get('trace_bytes'))} | {kept} |")
  lines.append("")
  lines.append(f"| variant | time slope (log-log, T >= {slope_from:,}) | device peak slope | compiled memory slope |")
  lines.append("|---|---:|---:|---:|")
  for v in variants:
    vr = [r for r in rows if r["variant"] == v and "error" not in r]
    lines.append(f"| {v} | {slope(vr, 'time_s', slope_from):.2f} | {slope(vr, 'peak_bytes', slope_from):.2f} | "
                 f"{slope(vr, 'memory_bytes', slope_from):.2f} |")
  for r in rows:
    if "advice" in r:
      lines.append(f"\nOOM, {r['variant']} at T={r['T']:,}: {r['advice']}")
  return "\n".join(lines)


def memory_model_table(stream_cfg):
  lines = ["| model | T | dense capture (bf16) | Stream trace | ratio |", "|---|---:|---:|---:|---:|"]
  for name in ("gemma3-4b", "gemma3-27b"):
    cfg = get_config(name)
    for t in (32 * 1024, 128 * 1024, 1024 * 1024):
      d, s = dense_capture_bytes(cfg, t), stream_trace_bytes(cfg, t, stream_cfg)
      lines.append(f"| {name} | {t:,} | {fmt_bytes(d)} | {fmt_bytes(s)} | {d / s:,.0f}x |")
  return "\n".join(lines)


def plot(rows, path, title):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for v in VARIANTS:
    vr = sorted((r for r in rows if r["variant"] == v and "error" not in r), key=lambda r: r["T"])
    if not vr:
      continue
    ts = [r["T"] for r in vr]
    axes[0].loglog(ts, [r["time_s"] for r in vr], "o-", label=v)
    peak = all(r.get("peak_bytes", -1) > 0 for r in vr)
    axes[1].loglog(ts, [(r["peak_bytes"] if peak else r["memory_bytes"]) / 2**30 for r in vr], "o-",
                   label=v + ("" if peak else " (compiled)"))
  axes[0].set(xlabel="tokens T", ylabel="seconds (median)", title="forward time")
  axes[1].set(xlabel="tokens T", ylabel="GiB (device peak, else compiled)", title="memory")
  for ax in axes:
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="gemma3-4b", help="Gemma preset (random weights), e.g. gemma3-1b")
  p.add_argument("--lengths", type=parse_lengths, default=parse_lengths("4k,8k,16k,32k,64k,128k"),
                 help="comma-separated token counts, k/m suffixes allowed (default 4k..128k)")
  p.add_argument("--variants", default=",".join(VARIANTS),
                 help=f"comma-separated subset of {','.join(VARIANTS)}")
  p.add_argument("--repeats", type=int, default=3,
                 help="timed runs per point after one warm-up (0: time the first run)")
  p.add_argument("--top-k", type=int, default=sj.StreamConfig().top_k, help="StreamConfig.top_k")
  p.add_argument("--coverage", type=float, default=None,
                 help="StreamConfig.coverage: an adaptive budget with mass scores (0.95 with --top-k 128 is "
                      "StreamConfig.faithful()); default: fixed top_k")
  p.add_argument("--out", default="benchmarks/out", help="folder for scaling.json / scaling_<config>.png")
  p.add_argument("--append", action="store_true",
                 help="add to the rows already in <out>/scaling_<config>.jsonl (split a sweep over runs)")
  p.add_argument("--small", action="store_true",
                 help="CPU smoke mode (CI): a 6-layer gemma3-270m-shaped f32 model, 4k vocabulary, T in "
                      "256..1024, 32-token blocks, top_k 4")
  p.add_argument("--isolate", action="store_true",
                 help="run every point in its own process (device peak per point; an OOM or hang costs one point)")
  p.add_argument("--point-timeout", type=float, default=600.0,
                 help="with --isolate: seconds before a point's process is killed")
  p.add_argument("--slope-from", type=parse_lengths, default=[131072],
                 help="log-log slopes over T from this length up (default 128k; all points if fewer reach it)")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  bad = [v for v in variants if v not in VARIANTS]
  if bad:
    p.error(f"--variants: unknown {bad}; choose from {VARIANTS}")
  if args.repeats < 0:
    p.error("--repeats must be >= 0")

  config = get_config(args.config)
  lengths = args.lengths
  try:
    stream_cfg = sj.StreamConfig(top_k=args.top_k, coverage=args.coverage)
  except ValueError as e:
    p.error(str(e))
  dtype = jnp.bfloat16
  if args.small:
    base = get_config("gemma3-270m")
    config = dataclasses.replace(base, num_layers=6, layer_kinds=base.layer_kinds[:6], vocab_size=4096,
                                 name="gemma3-270m-6layers")
    lengths = [256, 512, 1024]
    variants = [v for v in variants if not v.endswith("_pallas")]
    stream_cfg = sj.StreamConfig(block_q=32, block_k=32, top_k=4, coverage=args.coverage)
    dtype = jnp.float32  # bf16 matmuls are slow on CPUs
  elif not (args.isolate or args.worker) and jax.default_backend() != "gpu":
    # (an isolating parent leaves the device alone; its workers run what they are given)
    variants = [v for v in variants if not v.endswith("_pallas")]

  if args.worker:  # one point, in a process of its own (see run_isolated)
    params = (init_params(config, dtype=dtype, seed=0) if args.small
              else device_random_params(config, dtype, seed=0))
    t, v = lengths[0], variants[0]
    try:
      row = run_one(v, config, params, t, stream_cfg, args.repeats)
    except Exception as e:  # pylint: disable=broad-except
      row = error_row(v, config, t, e)
    print("ROW " + json.dumps(row), flush=True)
    return [row]

  out_dir = pathlib.Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  device = "(per point, isolated)" if args.isolate else \
      f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
  print(f"device: {device}, jax {jax.__version__}, "
        f"config {config.name} ({config.num_layers} layers, N={config.num_heads}, K={config.num_kv_heads}, "
        f"H={config.head_dim}, D={config.embed_dim}, F={config.hidden_dim}), {jnp.dtype(dtype).name}, "
        f"stream {stream_cfg}, position chunk {model_layers.POSITION_CHUNK}", flush=True)
  params = None
  if not args.isolate:
    params = init_params(config, dtype=dtype, seed=0) if args.small else device_random_params(config, dtype)
  name = config.name if args.coverage is None else f"{config.name}_coverage{args.coverage:g}"
  log = out_dir / f"scaling_{name}.jsonl"
  rows = [json.loads(line) for line in log.read_text().splitlines()] if args.append and log.exists() else []
  failed = set()
  with open(log, "a" if args.append else "w") as f:
    for t in lengths:
      for v in variants:
        if v in failed:
          rows.append(dict(variant=v, T=t, error="skipped (OOM at a shorter T)"))
          continue
        if args.isolate:
          row = run_isolated(args, v, t)
        else:
          try:
            row = run_one(v, config, params, t, stream_cfg, args.repeats)
          except Exception as e:  # pylint: disable=broad-except
            row = error_row(v, config, t, e)
        if row.get("error", "").startswith(("OOM", "timeout")):
          failed.add(v)
        rows.append(row)
        f.write(json.dumps(row) + "\n")
        f.flush()
        print(json.dumps(row), flush=True)
  device = next((r["device"] for r in rows if "device" in r), "?") if args.isolate else \
      jax.devices()[0].device_kind
  text = table(rows, f"{config.name}, {device}", args.slope_from[0])
  print()
  print(text)
  print()
  print(memory_model_table(sj.StreamConfig(top_k=args.top_k)))
  meta = dict(date=datetime.date.today().isoformat(), device=device, jax=jax.__version__, config=config.name,
              command=" ".join(sys.argv), position_chunk=model_layers.POSITION_CHUNK, rows=rows)
  meta["stream"] = repr(stream_cfg)
  (out_dir / f"scaling_{name}.json").write_text(json.dumps(meta, indent=1))
  plot(rows, out_dir / f"scaling_{name}.png", f"{name} on {device}")
  return rows


if __name__ == "__main__":
  main()
