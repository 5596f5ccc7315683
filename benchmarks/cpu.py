"""CPU forward times of the real Gemma 3 270M: dense attention vs Stream, logits at the last position.

Loads the embedded GGUF (`stream_jax.models.load_model()`, f32 on CPU; converted once, cached after), runs
`forward(..., last_only=True)` on random token ids at each length with attention="dense", with
attention=StreamConfig() and with output="exact" (the dense model, traced), and prints the first call's time (compile + run) and the best warm time.
Also times one global and one local layer's dense attention alone (`stream_jax.dense.dense_attention` at
the model's head shapes), which is where the dense forward's time goes.

  python benchmarks/cpu.py --lengths 4k,8k,16k
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scaling import parse_lengths  # noqa: E402

import stream_jax as sj  # noqa: E402
from stream_jax.dense import dense_attention  # noqa: E402
from stream_jax.models import forward, load_model  # noqa: E402


def timed(fn, reps: int) -> tuple[float, float]:
  """(first call seconds, best of `reps` warm calls), device-synchronised. Best, not median: the 2-core
  machine is shared, and other processes only ever add time."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  warm = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    warm.append(time.perf_counter() - t0)
  return first, min(warm)


def attention_only(cfg, t: int, window, reps: int) -> float:
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, t, cfg.num_heads, cfg.head_dim)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, t, cfg.num_kv_heads, cfg.head_dim)), jnp.float32)
  pos = jnp.arange(t, dtype=jnp.int32)
  f = jax.jit(lambda q, k: dense_attention(q, k, k, q_pos=pos, k_pos=pos, scale=cfg.attn_scale,
                                           window=window))
  return timed(lambda: f(q, k), reps)[1]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--lengths", type=parse_lengths, default=parse_lengths("4k,8k,16k"))
  ap.add_argument("--reps", type=int, default=2, help="warm calls per cell (best)")
  ap.add_argument("--variants", default="dense,stream,exact", help="comma list of dense, stream, exact "
                  "(exact: forward(..., attention=StreamConfig(), output='exact'): the dense model, traced)")
  args = ap.parse_args(argv)
  variants = args.variants.split(",")
  model = load_model(progress=False, tokenizer=False)
  cfg = model.config
  print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores ({platform.processor() or '?'}), "
        f"jax {jax.__version__}, model {model.source} ({jnp.dtype(model.dtype).name})", flush=True)
  header = ("| T | " + " | ".join(f"{v} first call (s) | {v} warm (s)" for v in variants)
            + "".join(f" | {v} / dense" for v in variants if v != "dense" and "dense" in variants)
            + " | global layer attn (s) | local layer attn (s) |")
  rows = []
  for t in args.lengths:
    tokens = np.random.default_rng(t).integers(3, cfg.vocab_size, size=(1, t)).astype(np.int32)
    tokens[:, 0] = 2  # BOS
    tokens = jnp.asarray(tokens)
    cells = {}
    for name in variants:
      attention = "dense" if name == "dense" else sj.StreamConfig()
      output = "exact" if name == "exact" else "sparse"
      first, warm = timed(lambda: forward(model, model.params, tokens, attention=attention, output=output,
                                          last_only=True).logits, args.reps)
      cells[name] = (first, warm)
      print(f"T={t} {name}: first {first:.1f} s, warm {warm:.1f} s (load average {os.getloadavg()[0]:.1f})",
            flush=True)
    g = attention_only(cfg, t, None, args.reps)
    loc = attention_only(cfg, t, cfg.sliding_window, args.reps)
    ratios = "".join(f" | {cells[v][1] / cells['dense'][1]:.2f}x" for v in variants
                     if v != "dense" and "dense" in variants)
    rows.append(f"| {t} | " + " | ".join(f"{cells[v][0]:.1f} | {cells[v][1]:.1f}" for v in variants)
                + f"{ratios} | {g:.2f} | {loc:.2f} |")
    print(rows[-1], flush=True)
  print()
  print(header)
  print("|" + "---|" * header.count(" |"))
  print("\n".join(rows))


if __name__ == "__main__":
  main()
