"""Scaling of a full Stream trace vs dense attention capture vs a plain dense forward.

For a Gemma 3 config with random bf16 weights and T in a range of lengths, measures in one run:
  plain          plain forward, fastest dense attention (cuDNN on GPU), logits at the last position;
  capture        dense forward that also returns every layer's attention probabilities (what
                 `output_attentions=True` does), until it runs out of memory;
  stream_xla     Stream traced forward (masks + block mass of every layer), XLA backend;
  stream_pallas  the same with the Pallas kernels (GPU only).
Reports compile time, median wall time (device-synchronised), the compiled executable's memory
(arguments + outputs + temporaries, from `memory_analysis()`), trace size and kept fraction; ratios against
`plain`, log-log slopes over T, the dense-capture memory model for Gemma 3 4B / 27B, and a PNG plot.

  python benchmarks/scaling.py --config gemma3-4b --lengths 8k,32k,128k
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
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import stream_jax as sj
from stream_jax.models import forward, get_config, init_params

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


def _memory(compiled) -> int:
  m = compiled.memory_analysis()
  if m is None:
    return -1
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def run_one(variant, config, params, t, stream_cfg, repeats):
  tokens = jnp.asarray(np.random.default_rng(t).integers(3, config.vocab_size, size=(1, t)), jnp.int32)
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
  row = dict(variant=variant, T=t, compile_s=compile_s, time_s=statistics.median(times[1:]),
             memory_bytes=memory)
  extra = out[1]
  if variant.startswith(("stream", "exact")):
    row["trace_bytes"] = extra.nbytes()
    row["kept_fraction"] = float(extra.kept_fraction("global"))
    cov = extra.coverage("global")
    if cov is not None:
      row["coverage"] = float(cov)
  elif variant == "capture":
    row["trace_bytes"] = int(sum(np.prod(p.shape) * p.dtype.itemsize for p in extra))
  del out, extra
  return row


def slope(rows, key):
  pts = [(r["T"], r[key]) for r in rows if r.get(key, -1) and r.get(key, -1) > 0]
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


def table(rows, config_name):
  by = {(r["variant"], r["T"]): r for r in rows}
  lengths = sorted({r["T"] for r in rows})
  variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
  lines = [f"### {config_name}", "",
           "| T | variant | time (s) | vs plain | compile (s) | memory | trace | kept frac |",
           "|---:|---|---:|---:|---:|---:|---:|---:|"]
  for t in lengths:
    plain = by.get(("plain", t))
    for v in variants:
      r = by.get((v, t))
      if r is None:
        continue
      if "error" in r:
        lines.append(f"| {t:,} | {v} | {r['error']} | | | | | |")
        continue
      ratio = f"{r['time_s'] / plain['time_s']:.2f}x" if plain and "time_s" in plain else "-"
      kept = f"{r['kept_fraction']:.4f}" if "kept_fraction" in r else "-"
      if "coverage" in r:
        kept += f" (coverage {r['coverage']:.3f})"
      lines.append(f"| {t:,} | {v} | {r['time_s']:.4f} | {ratio} | {r['compile_s']:.1f} | "
                   f"{fmt_bytes(r['memory_bytes'])} | {fmt_bytes(r.get('trace_bytes'))} | {kept} |")
  lines.append("")
  lines.append("| variant | time slope (log-log) | memory slope |")
  lines.append("|---|---:|---:|")
  for v in variants:
    vr = [r for r in rows if r["variant"] == v and "error" not in r]
    lines.append(f"| {v} | {slope(vr, 'time_s'):.2f} | {slope(vr, 'memory_bytes'):.2f} |")
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
    axes[1].loglog(ts, [r["memory_bytes"] / 2**30 for r in vr], "o-", label=v)
  axes[0].set(xlabel="tokens T", ylabel="seconds (median)", title="forward time")
  axes[1].set(xlabel="tokens T", ylabel="GiB (compiled: args + outputs + temps)", title="memory")
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
  p.add_argument("--repeats", type=int, default=3, help="timed runs per point after one warm-up")
  p.add_argument("--top-k", type=int, default=sj.StreamConfig().top_k, help="StreamConfig.top_k")
  p.add_argument("--out", default="benchmarks/out", help="folder for scaling.json / scaling_<config>.png")
  p.add_argument("--append", action="store_true",
                 help="add to the rows already in <out>/scaling_<config>.jsonl (split a sweep over runs)")
  p.add_argument("--small", action="store_true",
                 help="CPU smoke mode (CI): a 6-layer gemma3-270m-shaped f32 model, 4k vocabulary, T in "
                      "256..1024, 32-token blocks, top_k 4")
  args = p.parse_args(argv)
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  bad = [v for v in variants if v not in VARIANTS]
  if bad:
    p.error(f"--variants: unknown {bad}; choose from {VARIANTS}")
  if args.repeats < 1:
    p.error("--repeats must be >= 1")

  config = get_config(args.config)
  lengths = args.lengths
  stream_cfg = sj.StreamConfig(top_k=args.top_k)
  dtype = jnp.bfloat16
  if args.small:
    base = get_config("gemma3-270m")
    config = dataclasses.replace(base, num_layers=6, layer_kinds=base.layer_kinds[:6], vocab_size=4096,
                                 name="gemma3-270m-6layers")
    lengths = [256, 512, 1024]
    variants = [v for v in variants if not v.endswith("_pallas")]
    stream_cfg = sj.StreamConfig(block_q=32, block_k=32, top_k=4)
    dtype = jnp.float32  # bf16 matmuls are slow on CPUs
  elif jax.default_backend() != "gpu":
    variants = [v for v in variants if not v.endswith("_pallas")]

  out_dir = pathlib.Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"config {config.name} ({config.num_layers} layers, N={config.num_heads}, K={config.num_kv_heads}, "
        f"H={config.head_dim}, D={config.embed_dim}), {jnp.dtype(dtype).name}, "
        f"stream {stream_cfg}", flush=True)
  params = init_params(config, dtype=dtype, seed=0)
  log = out_dir / f"scaling_{config.name}.jsonl"
  rows = [json.loads(line) for line in log.read_text().splitlines()] if args.append and log.exists() else []
  failed = set()
  with open(log, "a" if args.append else "w") as f:
    for t in lengths:
      for v in variants:
        if v in failed:
          rows.append(dict(variant=v, T=t, error="skipped (OOM at a shorter T)"))
          continue
        try:
          row = run_one(v, config, params, t, stream_cfg, args.repeats)
        except Exception as e:  # pylint: disable=broad-except
          msg = str(e).splitlines()[0][:120]
          if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
            failed.add(v)
            msg = f"OOM (needs > {fmt_bytes(dense_capture_bytes(config, t))} for probs)" if v == "capture" \
                else "OOM"
          row = dict(variant=v, T=t, error=msg)
        rows.append(row)
        f.write(json.dumps(row) + "\n")
        f.flush()
        print(json.dumps(row), flush=True)
  text = table(rows, f"{config.name}, {jax.devices()[0].device_kind}")
  print()
  print(text)
  print()
  print(memory_model_table(sj.StreamConfig(top_k=args.top_k)))
  meta = dict(date=datetime.date.today().isoformat(), device=jax.devices()[0].device_kind,
              jax=jax.__version__, config=config.name, command=" ".join(sys.argv), rows=rows)
  (out_dir / f"scaling_{config.name}.json").write_text(json.dumps(meta, indent=1))
  plot(rows, out_dir / f"scaling_{config.name}.png", f"{config.name} on {jax.devices()[0].device_kind}")
  return rows


if __name__ == "__main__":
  main()
