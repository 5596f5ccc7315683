"""Where the ideal trace's time goes, per global layer, against cuDNN's attention (one GPU).

Gemma-3-4B-like heads (8 query heads, 4 kv heads, head dim 256, bf16, 64-token blocks), random inputs:
  cudnn          causal flash attention with its lse (what the exact pass runs anyway)
  rows           the Triton block-mass kernel alone (every causal block's true mass; summed so it runs)
                 for launch settings (warps, stages, query blocks per program, query blocks per chunk)
  mosaic rows    its Mosaic GPU port (kernels/ideal_mosaic.py; Hopper) for key-ring depths (--mosaic-stages)
  table          estimate_mask with StreamConfig.table(query_stride=Q) on the Mosaic GPU kernel
                 (kernels/table_mosaic.py: lse and masses of every Q-th query, selection), for --table-strides,
                 against the search of StreamConfig.faithful() (the Triton kernel)
  select         the selection of StreamConfig.ideal() from given rows (XLA: top_k, the budget, the ids)
  ideal          stream_jax.ideal_mask(..., backend=B) end to end (rows + selection), B triton and mosaic, at
                 each of --blocks (16 / 32 / 64-token blocks)

  python benchmarks/ideal_kernel.py --seq 32768,131072 --launch 8:3:4:64
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import stream_jax as sj
from stream_jax import ideal
from stream_jax.kernels import ideal_mosaic, ideal_triton, mosaic_common


def timed(fn, *args, reps=5):
  out = jax.block_until_ready(fn(*args))  # compile + warm-up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  del out
  return statistics.median(times) * 1e3


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seq", default="32768,131072")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--launch", default="4:3:1:64,8:3:1:64,4:2:2:64,8:3:2:64,8:2:2:128",
                 help="warps:stages:blocks_per_program:chunk settings of the rows kernel")
  p.add_argument("--mosaic-stages", default="2,3", help="key-ring depths of the Mosaic rows kernel (Hopper)")
  p.add_argument("--table-strides", default="4,8,16", help="query strides of StreamConfig.table() (Hopper)")
  p.add_argument("--blocks", default="64", help="block sizes (16, 32, 64) of the ideal_mask end-to-end rows (and, "
                 "below 64, of table() estimates at --table-strides that divide them)")
  p.add_argument("--only-ideal", action="store_true", help="only the ideal_mask end-to-end rows (and cuDNN)")
  args = p.parse_args(argv)
  n, kv, h = 8, 4, 256
  cfg = sj.StreamConfig.ideal()
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; N={n} K={kv} H={h} bf16, {cfg}", flush=True)
  print("| T | what | ms | x cudnn |\n|---:|---|---:|---:|")
  for t in [int(x) for x in args.seq.split(",")]:
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, t, n, h)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(1, t, kv, h)) * 2.0, jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(1, t, kv, h)), jnp.bfloat16)
    scale = h ** -0.5

    @jax.jit
    def cudnn(q, k, v):
      return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn",
                                          return_residual=True)

    base = timed(cudnn, q, k, v, reps=args.reps)
    print(f"| {t:,} | cudnn attention + lse | {base:.1f} | 1.00 |", flush=True)
    _, lse = cudnn(q, k, v)
    lse = jnp.swapaxes(lse.astype(jnp.float32).reshape(1, t, n), 1, 2)
    n_q = -(-t // 64)
    hopper = mosaic_common.no_hopper() is None
    if args.only_ideal:
      _ideal_rows(args, t, cfg, base, q, k, lse, scale, hopper)
      continue
    for launch in [x for x in args.launch.split(",") if x]:
      warps, stages, per, chunk = (int(x) for x in launch.split(":"))
      chunk = min(chunk, n_q)

      @jax.jit
      def rows(q, k, lse, warps=warps, stages=stages, per=per, chunk=chunk):
        def one(i, acc):
          r = ideal_triton.mass_rows(q, k, lse, i * chunk, n_rows=chunk, block_q=64, block_k=64, q_len=t,
                                   k_len=t, scale=scale, softcap=None, window=None, num_warps=warps,
                                   num_stages=stages, blocks_per_program=per)
          return acc + r.sum()
        return lax.fori_loop(0, -(-n_q // chunk), one, jnp.float32(0))

      try:
        ms = timed(rows, q, k, lse, reps=args.reps)
        print(f"| {t:,} | rows kernel (warps {warps}, stages {stages}, {per} block(s)/program, chunk {chunk}) "
              f"| {ms:.1f} | {ms / base:.2f} |", flush=True)
      except Exception as e:  # pylint: disable=broad-except
        print(f"| {t:,} | rows kernel {launch} | failed: {str(e).splitlines()[0][:150]} | |", flush=True)

    for stages in [int(x) for x in args.mosaic_stages.split(",") if x] if hopper else []:
      chunk = min(64, n_q)

      @jax.jit
      def mrows(q, k, lse, stages=stages, chunk=chunk):
        def one(i, acc):
          r = ideal_mosaic.mass_rows(q, k, lse, i * chunk, n_rows=chunk, q_len=t, k_len=t, scale=scale,
                                     softcap=None, window=None, stages=stages)
          return acc + r.sum()
        return lax.fori_loop(0, -(-n_q // chunk), one, jnp.float32(0))

      try:
        ms = timed(mrows, q, k, lse, reps=args.reps)
        print(f"| {t:,} | mosaic rows kernel (stages {stages}, chunk {chunk}) | {ms:.1f} | {ms / base:.2f} |",
              flush=True)
      except Exception as e:  # pylint: disable=broad-except
        print(f"| {t:,} | mosaic rows kernel stages {stages} | failed: {str(e).splitlines()[0][:150]} | |",
              flush=True)

    n_k = n_q
    table = jnp.asarray(rng.random((n, 64, n_k)), jnp.float32)

    @jax.jit
    def select(table):
      diag = jnp.arange(64, dtype=jnp.int32) + n_k - 64
      valid = jnp.full((64,), 64.0)
      def one(i, acc):
        ids, mass, cov = ideal._select_chunk(table + i, diag, valid, config=cfg)  # pylint: disable=protected-access
        return acc + mass.sum() + ids.sum() + cov.sum()
      return lax.fori_loop(0, -(-n_q // 64), one, jnp.float32(0))

    ms = timed(select, table, reps=args.reps)
    print(f"| {t:,} | selection (XLA, worst-case rows) | {ms:.1f} | {ms / base:.2f} |", flush=True)
    _ideal_rows(args, t, cfg, base, q, k, lse, scale, hopper)
    estimates = [("faithful() search", sj.StreamConfig.faithful(), "auto")]
    estimates += [(f"table(query_stride={qs})", sj.StreamConfig.table(query_stride=int(qs)), "mosaic")
                  for qs in args.table_strides.split(",") if qs and hopper]
    for label, config, backend in estimates:
      est = jax.jit(functools.partial(sj.estimate_mask, config=config, scale=scale, backend=backend))
      _timed_row(t, f"estimate: {label} ({backend})", base, lambda q, k, est=est: est(q, k).counts, q, k,
                 reps=args.reps)
  return 0


def _ideal_rows(args, t, cfg, base, q, k, lse, scale, hopper):
  """ideal_mask end to end per block size and backend (Triton, and the Mosaic GPU port on Hopper)."""
  for block in [int(x) for x in args.blocks.split(",") if x]:
    config = cfg.replace(block_q=block, block_k=block)
    for backend in ("triton", "mosaic") if hopper else ("triton",):
      full = jax.jit(functools.partial(sj.ideal_mask, config=config, scale=scale, backend=backend))
      _timed_row(t, f"ideal_mask end to end, {block}-token blocks ({backend})", base,
                 lambda q, k, l, full=full: full(q, k, l).coverage, q, k, lse, reps=args.reps)
    if block == 64:
      continue  # the 64-token table's rows are the main run's
    for qs in [int(x) for x in args.table_strides.split(",") if x]:
      if qs < 2 or block % qs:
        continue
      config = sj.StreamConfig.table(query_stride=qs, block_q=block, block_k=block)
      for backend in ("mosaic", "xla") if hopper else ("xla",):
        if backend == "xla" and t > 32768:
          continue  # the XLA table is O(T^2 / stride) in large products: 32k is enough to compare
        est = jax.jit(functools.partial(sj.estimate_mask, config=config, scale=scale, backend=backend))
        _timed_row(t, f"estimate: table(query_stride={qs}), {block}-token blocks ({backend})", base,
                   lambda q, k, est=est: est(q, k).counts, q, k, reps=args.reps)


def _timed_row(t, label, base, fn, *args, reps):
  """One table row: fn's median time and its ratio to cuDNN's, or why it failed (the run goes on)."""
  try:
    ms = timed(fn, *args, reps=reps)
    print(f"| {t:,} | {label} | {ms:.1f} | {ms / base:.2f} |", flush=True)
  except Exception as e:  # pylint: disable=broad-except
    print(f"| {t:,} | {label} | failed: {str(e).splitlines()[0][:300]} | |", flush=True)


if __name__ == "__main__":
  sys.exit(main())
