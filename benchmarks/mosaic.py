"""Pallas backends on one GPU: our Triton block-sparse attention vs JAX's Triton and Mosaic GPU flash
attention vs cuDNN, at the same shapes (issue 14, item 4: "Kernels' future").

    PYTHONPATH=. python3 benchmarks/mosaic.py [--seq 8192,32768] [--head-dims 128,256] [--kv-heads 8,1]
                                              [--reps 7] [--out DIR]
    PYTHONPATH=. python3 benchmarks/mosaic.py --dry-run   # CPU: arguments, plan, tiny interpreted kernel

Rows per shape (B=1, N query heads, K kv heads, head dim H, T = S, bf16, causal, q pre-scaled so every
kernel runs with scale 1):
  sparse_full    our Triton kernel, `stream_jax.sparse_attention(..., backend="pallas")`, on the mask that
                 keeps every causal block (`window_mask(window=None)`): dense work through the sparse kernel
                 (it also returns block mass and lse). Best of num_warps {4, 8}. Above the register budget
                 the block mass comes from a second kernel pass (`fuses_mass`).
  sparse_full_fused  the same, block mass forced into the fused block_q x C register accumulator (the
                 kernel before the second pass existed; it spills at C = 512).
  sparse_stream  the same kernel on the default `StreamConfig` mask from `estimate_mask` (the density a
                 trace runs at); its TFLOP/s count kept blocks only. The Triton estimate kernel's time
                 (which made the mask) is in its config column.
  sparse_stream_mgpu  the Mosaic GPU ports on the same shapes: the attention kernel on that mask (best of
                 two launch orders; max |out diff| vs the Triton kernel), and the estimate kernel (its time
                 in the config column, its mask rows checked equal to the Triton kernel's).
  faithful_estimate  the estimate for `StreamConfig.faithful()` (mass scores, coverage 0.95, top_k 128):
                 the Mosaic GPU wide kernel's time, the Triton kernel's in its config column, and the share
                 of mask rows the two agree on. faithful_estimate_32 / _16: the same at 32 / 16-token blocks
                 (the wide kernel's 64-row tiles from each block's start, the rest masked).
                 faithful_estimate_p4 / _p8 / _p16: faithful(search_share=4 / 8 / 16) on the Mosaic GPU
                 kernel (the group pass, then each block's last round), against faithful(search_share=1)'s
                 time (one search per query block) on the same kernel, with both masks' mean kept counts.
  triton_mha     JAX's Pallas Triton flash attention (`jax.experimental.pallas.ops.gpu.attention.mha`;
                 it has no GQA, so it runs at K = N only). Best of two tiles.
  mosaic_flash   JAX's Pallas Mosaic GPU flash attention (`...ops.gpu.attention_mgpu.attention`, Hopper
                 wgmma, TMA, warp specialisation). Best of a few TuningConfigs. Always on float16 copies:
                 jax 0.11.2's kernel allocates float16 shared memory and refuses bfloat16.
  cudnn          `jax.nn.dot_product_attention(implementation="cudnn")`, the ceiling.
A kernel missing from this jax, or refusing a shape, gives a row "n/a: reason" instead of failing the run.

TFLOP/s: causal work 4 B N H T (T + 1) / 2 for the dense rows; kept blocks x 4 x 64 x 64 x H for
sparse_stream. Times: median over reps of the mean of a burst of calls (>= 20 ms of work) after a
warm-up, jitted, `block_until_ready` at the end of each burst. Correctness: max |out - cuDNN out| for
every dense row (and vs the XLA reference in --dry-run).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import math
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import stream_jax as sj
from stream_jax.kernels import estimate_triton as kestimate
from stream_jax.kernels import estimate_mosaic

KERNELS = ("sparse_full", "sparse_full_fused", "sparse_stream", "sparse_stream_mgpu", "faithful_estimate",
           "faithful_estimate_32", "faithful_estimate_16", "faithful_estimate_p4", "faithful_estimate_p8",
           "faithful_estimate_p16",
           "faithful_attention", "faithful_attention_32",
           "faithful_attention_16",
           "triton_mha", "mosaic_flash", "cudnn")
DENSE_WORK = ("sparse_full", "sparse_full_fused", "triton_mha", "mosaic_flash")  # rows checked vs cuDNN
LABELS = {
    "sparse_full": "ours: Triton block-sparse, all causal blocks",
    "sparse_full_fused": "ours, all causal blocks, mass forced into the fused register accumulator",
    "sparse_stream": "ours: Triton block-sparse, Stream mask",
    "sparse_stream_mgpu": "ours: Mosaic GPU block-sparse, Stream mask",
    "faithful_estimate": "ours: Mosaic GPU estimate, StreamConfig.faithful() (vs Triton)",
    "faithful_estimate_32": "ours: Mosaic GPU estimate, faithful() at 32-token blocks (vs Triton)",
    "faithful_estimate_16": "ours: Mosaic GPU estimate, faithful() at 16-token blocks (vs Triton)",
    "faithful_estimate_p4": "ours: Mosaic GPU estimate, faithful(search_share=4) (vs one search per query block)",
    "faithful_estimate_p8": "ours: Mosaic GPU estimate, faithful(search_share=8) (vs one search per query block)",
    "faithful_estimate_p16": "ours: Mosaic GPU estimate, faithful(search_share=16) (vs one search per query block)",
    "faithful_attention": "ours: Mosaic GPU block-sparse, faithful() mask (vs Triton)",
    "faithful_attention_32": "ours: Mosaic GPU block-sparse, faithful() mask at 32-token blocks (vs Triton)",
    "faithful_attention_16": "ours: Mosaic GPU block-sparse, faithful() mask at 16-token blocks (vs Triton)",
    "triton_mha": "JAX Pallas Triton flash (ops.gpu.attention.mha)",
    "mosaic_flash": "JAX Pallas Mosaic GPU flash (ops.gpu.attention_mgpu)",
    "cudnn": "cuDNN (jax.nn.dot_product_attention)",
}


def log(*args):
  print(*args, flush=True)


def ints(text):
  return [int(x) for x in str(text).split(",") if x.strip()]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seq", type=ints, default=[8192, 32768], help="sequence lengths T (comma-separated)")
  p.add_argument("--head-dims", type=ints, default=[128, 256], help="head dims H")
  p.add_argument("--kv-heads", type=ints, default=[8, 1], help="kv heads K")
  p.add_argument("--heads", type=int, default=8, help="query heads N")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"),
                 help="inputs of every kernel (the Mosaic example kernel runs float16 whatever this says: "
                      "its shared-memory scratch is float16-only in jax 0.11.2)")
  p.add_argument("--kernels", default=",".join(KERNELS), help=f"subset of {','.join(KERNELS)}")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--burst-ms", type=float, default=20.0, help="work per timed burst")
  p.add_argument("--out", default=None, help="folder for mosaic.json and mosaic.md")
  p.add_argument("--dry-run", action="store_true",
                 help="CPU: check arguments, print the plan, run the sparse kernel interpreted at a tiny "
                      "shape against the XLA reference; no GPU kernels")
  p.add_argument("--dry-skip-kernel", action="store_true",
                 help="with --dry-run: skip the interpreted kernel too (the fast test)")
  args = p.parse_args(argv)
  args.kernels = [x for x in args.kernels.split(",") if x]
  bad = [x for x in args.kernels if x not in KERNELS]
  if bad:
    p.error(f"unknown kernels {bad}; choose from {KERNELS}")
  for name in ("seq", "head_dims", "kv_heads"):
    if not getattr(args, name) or min(getattr(args, name)) < 1:
      p.error(f"--{name.replace('_', '-')} needs positive integers")
  bad_kv = [kv for kv in args.kv_heads if args.heads % kv]
  if bad_kv:
    p.error(f"--kv-heads {bad_kv} do not divide --heads {args.heads}")
  bad_t = [t for t in args.seq if t % 128]
  if bad_t:
    p.error(f"--seq {bad_t}: lengths must be multiples of 128 (the flash kernels' tiles)")
  return args


def shapes(args):
  return [(args.batch, args.heads, kv, h, t) for h in args.head_dims for kv in args.kv_heads
          for t in args.seq]


# ---- what this jax has ----

def probe():
  """Which Pallas GPU ops modules exist, and the signatures used here (printed on the GPU)."""
  info = {}
  try:
    ops = importlib.import_module("jax.experimental.pallas.ops.gpu")
    info["ops.gpu"] = sorted(n for n in dir(ops) if not n.startswith("_"))
    path = os.path.dirname(ops.__file__)
    info["ops.gpu files"] = sorted(f[:-3] for f in os.listdir(path) if f.endswith(".py"))
  except Exception as e:  # pylint: disable=broad-except
    info["ops.gpu"] = f"n/a: {type(e).__name__}: {e}"
  for mod, names in (("attention", ("mha", "BlockSizes")),
                     ("attention_mgpu", ("attention", "TuningConfig"))):
    try:
      m = importlib.import_module(f"jax.experimental.pallas.ops.gpu.{mod}")
      for name in names:
        obj = getattr(m, name, None)
        if obj is None:
          info[f"{mod}.{name}"] = "missing"
          continue
        try:
          sig = str(inspect.signature(obj))
        except (TypeError, ValueError):
          sig = "?"
        info[f"{mod}.{name}"] = sig
    except Exception as e:  # pylint: disable=broad-except
      info[mod] = f"n/a: {type(e).__name__}: {str(e)[:200]}"
  return info


# ---- data, timing ----

def make_qkv(b, n, kv, h, t, seed=0, dtype=jnp.bfloat16):
  kq, kk, kvk = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(kq, (b, t, n, h), jnp.float32) * h ** -0.5  # pre-scaled: scale 1 everywhere
  k = jax.random.normal(kk, (b, t, kv, h), jnp.float32)
  v = jax.random.normal(kvk, (b, t, kv, h), jnp.float32)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def timeit(fn, *args, reps=7, burst_ms=20.0):
  """Median over reps of the mean time (ms) of a burst of calls; compiled and warmed up first."""
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = (time.perf_counter() - t0) * 1e3
  inner = max(1, min(200, math.ceil(burst_ms / max(first, 1e-3))))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(inner):
      r = fn(*args)
    jax.block_until_ready(r)
    times.append((time.perf_counter() - t0) * 1e3 / inner)
  return statistics.median(times)


def causal_flops(b, n, h, t):
  return 4.0 * b * n * h * t * (t + 1) / 2


def first(x):
  return x[0] if isinstance(x, (tuple, list)) else x


# ---- the kernels (each returns (fn, args, config text) or raises) ----

def sparse_fn(mask, num_warps=None, fused_mass=None):
  """Our Triton kernel (the kernel module itself: on a Hopper GPU the public entry now runs the Mosaic
  port), default launch or a launch sweep / a forced mass path."""
  from stream_jax.kernels import blocksparse_triton as kattention  # pylint: disable=import-outside-toplevel

  def f(q, k, v, idx, cnt):
    m = sj.BlockMask(idx, cnt, mask.block_q, mask.block_k, mask.q_len, mask.k_len, mask.config)
    out, st = kattention.sparse_attention(q, k, v, m, scale=1.0, num_warps=num_warps, fused_mass=fused_mass)
    return out, st.mass, st.lse
  return jax.jit(f)


def estimate_fn(module, cfg, **launch):
  """The Triton (kernels.estimate_triton) or Mosaic GPU (kernels.estimate_mosaic) estimate kernel, called directly."""
  return jax.jit(lambda q, k: (lambda m: (m.indices, m.counts))(
      module.estimate_mask(q, k, cfg, scale=1.0, **launch)))


def mgpu_fn(mask, stages=None, order="qblk_last"):
  """The Mosaic GPU port of our kernel (kernels/blocksparse_mosaic.py) on the same mask."""
  from stream_jax.kernels import blocksparse_mosaic  # pylint: disable=import-outside-toplevel

  def f(q, k, v, idx, cnt):
    m = sj.BlockMask(idx, cnt, mask.block_q, mask.block_k, mask.q_len, mask.k_len, mask.config)
    out, st = blocksparse_mosaic.sparse_attention(q, k, v, m, scale=1.0, stages=stages, order=order)
    return out, st.mass, st.lse
  return jax.jit(f)


def triton_mha_candidates(h):
  from jax.experimental.pallas.ops.gpu import attention as tri  # pylint: disable=import-outside-toplevel
  sizes = [(128, 64, 8, 2), (64, 64, 4, 2)] if h <= 128 else [(64, 64, 4, 2), (128, 64, 8, 2)]
  for bq, bk, warps, stages in sizes:
    bs = tri.BlockSizes(block_q=bq, block_k=bk)
    fn = jax.jit(lambda q, k, v, bs=bs, warps=warps, stages=stages: tri.mha(
        q, k, v, None, sm_scale=1.0, causal=True, block_sizes=bs, num_warps=warps, num_stages=stages))
    yield fn, f"block {bq}x{bk}, {warps} warps, {stages} stages"


def mosaic_candidates(h):
  from jax.experimental.pallas.ops.gpu import attention_mgpu as mg  # pylint: disable=import-outside-toplevel
  fields = {f.name for f in __import__("dataclasses").fields(mg.TuningConfig)}
  tiles = [(64, 128, 2), (64, 64, 2), (64, 128, 3)] if h <= 128 else [(64, 64, 2), (64, 128, 2)]
  for bq, bkv, steps in tiles:
    kw = dict(block_q=bq, block_kv=bkv, max_concurrent_steps=steps)
    if "causal" in fields:
      kw["causal"] = True
    try:
      cfg = mg.TuningConfig(**kw)
    except Exception as e:  # pylint: disable=broad-except
      yield None, f"TuningConfig({kw}): {type(e).__name__}: {str(e)[:120]}"
      continue
    fn = jax.jit(lambda q, k, v, cfg=cfg: first(mg.attention(q, k, v, cfg)))
    yield fn, f"block_q {bq} (x2 warpgroups), block_kv {bkv}, {steps} stages"


def cudnn_fn():
  return jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=1.0, is_causal=True,
                                                              implementation="cudnn"))


def max_diff(a, b):
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def best_of(candidates, args_, reps, burst_ms, ref=None, label=""):
  """Times every candidate; returns the best (ms, config, diff vs ref) and the tried list."""
  tried, best = [], None
  for fn, conf in candidates:
    if fn is None:
      tried.append(f"{conf}: skipped")
      continue
    try:
      out = first(fn(*args_))
      diff = None if ref is None else max_diff(out.reshape(ref.shape), ref)
      del out
      ms = timeit(fn, *args_, reps=reps, burst_ms=burst_ms)
    except Exception as e:  # pylint: disable=broad-except
      msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
      log(f"  {label} [{conf}] FAILED {msg}")
      tried.append(f"{conf}: {msg}")
      continue
    log(f"  {label} [{conf}] {ms:.3f} ms" + ("" if diff is None else f", max|diff vs cuDNN| {diff:.3g}"))
    tried.append(f"{conf}: {ms:.3f} ms")
    if best is None or ms < best[0]:
      best = (ms, conf, diff)
  return best, tried


def bench_shape(shape, kernels, reps, burst_ms, dtype="bfloat16"):
  b, n, kv, h, t = shape
  log(f"\n## B={b} N={n} K={kv} H={h} T={t} {dtype}")
  q, k, v = make_qkv(b, n, kv, h, t, dtype=jnp.dtype(dtype))
  flops = causal_flops(b, n, h, t)
  rows = {}

  def row(name, ms=None, conf="", diff=None, flops_=flops, na=None, **extra):
    r = dict(kernel=name, B=b, N=n, K=kv, H=h, T=t, dtype=dtype, ms=ms, config=conf, diff=diff, na=na,
             **extra)
    r["tflops"] = None if ms is None else flops_ / ms / 1e9
    rows[name] = r
    return r

  ref = None
  if "cudnn" in kernels or any(x in kernels for x in DENSE_WORK):
    try:
      fn = cudnn_fn()
      ref = fn(q, k, v)
      if "cudnn" in kernels:
        ms = timeit(fn, q, k, v, reps=reps, burst_ms=burst_ms)
        row("cudnn", ms, "is_causal=True")
        log(f"  cudnn {ms:.3f} ms")
    except Exception as e:  # pylint: disable=broad-except
      msg = f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
      log(f"  cudnn {msg}")
      row("cudnn", na=msg)

  if "mosaic_flash" in kernels:
    try:
      # jax 0.11.2's attention_mgpu allocates its q/k/v shared-memory scratch as float16, so bf16
      # inputs fail ("src had type bfloat16 and dst had type float16"): it runs on float16 copies
      # (same tensor-core rate on Hopper).
      q16, k16, v16 = (x.astype(jnp.float16) for x in (q, k, v))
      best, tried = best_of(mosaic_candidates(h), (q16, k16, v16), reps, burst_ms, ref, "mosaic_flash")
      del q16, k16, v16
      if best and q.dtype != jnp.float16:
        best = (best[0], best[1] + "; float16 inputs", best[2])
      row("mosaic_flash", *(best or (None, "", None)), tried=tried,
          na=None if best else "n/a: every config failed: " + "; ".join(tried)[:300])
    except Exception as e:  # pylint: disable=broad-except
      row("mosaic_flash", na=f"n/a: {type(e).__name__}: {str(e)[:200]}")
      log(f"  mosaic_flash {rows['mosaic_flash']['na']}")

  if "triton_mha" in kernels and kv < n:
    row("triton_mha", na=f"n/a: no GQA in mha; with kv heads repeated it is the K={n} row's work")
  elif "triton_mha" in kernels:
    try:
      best, tried = best_of(triton_mha_candidates(h), (q, k, v), reps, burst_ms, ref, "triton_mha")
      row("triton_mha", *(best or (None, "", None)), tried=tried,
          na=None if best else "n/a: every config failed: " + "; ".join(tried)[:300])
    except Exception as e:  # pylint: disable=broad-except
      row("triton_mha", na=f"n/a: {type(e).__name__}: {str(e)[:200]}")
      log(f"  triton_mha {rows['triton_mha']['na']}")

  q3, k3, v3 = q[0], k[0], v[0]  # our kernels take [T, N, H] too; B = 1 here
  for name, fused in (("sparse_full", None), ("sparse_full_fused", True)):
    if name not in kernels:
      continue
    try:
      mask = sj.window_mask(n, t, t, block_q=64, block_k=64, window=None)
      cands = [(sparse_fn(mask, fused_mass=fused), "64x64 blocks, default launch (4 warps, 3 stages)"),
               (sparse_fn(mask, num_warps=8, fused_mass=fused), "64x64 blocks, 8 warps, 3 stages")]
      best, tried = best_of(cands, (q3, k3, v3, mask.indices, mask.counts), reps, burst_ms,
                            None if ref is None else ref[0], name)
      row(name, *(best or (None, "", None)), tried=tried,
          na=None if best else "n/a: every config failed: " + "; ".join(tried)[:300])
      del mask
    except Exception as e:  # pylint: disable=broad-except
      row(name, na=f"n/a: {type(e).__name__}: {str(e)[:200]}")
      log(f"  {name} {rows[name]['na']}")

  if "sparse_stream" in kernels:
    try:
      cfg = sj.StreamConfig()
      est = estimate_fn(kestimate, cfg)
      idx, cnt = est(q3, k3)
      est_ms = timeit(est, q3, k3, reps=reps, burst_ms=burst_ms)
      mask = sj.BlockMask(idx, cnt, cfg.block_q, cfg.block_k, t, t, cfg)
      density = float(np.asarray(sj.block_density(mask)).mean())
      kept = float(np.asarray(cnt, np.float64).sum()) * b
      fn = sparse_fn(mask)
      ms = timeit(fn, q3, k3, v3, idx, cnt, reps=reps, burst_ms=burst_ms)
      row("sparse_stream", ms, f"StreamConfig() mask, density {density:.4f}",
          flops_=kept * 4 * cfg.block_q * cfg.block_k * h, density=density, estimate_ms=est_ms)
      log(f"  sparse_stream {ms:.3f} ms (density {density:.4f}); estimate kernel {est_ms:.3f} ms")
      if "sparse_stream_mgpu" in kernels:
        by_stages = {}
        for stages, order in (((2, 2), "heads_last"), ((2, 2), "qblk_last")):  # (key, value buffers)
          try:
            by_stages[stages, order] = timeit(mgpu_fn(mask, stages, order), q3, k3, v3, idx, cnt,
                                              reps=reps, burst_ms=burst_ms)
          except Exception as e:  # pylint: disable=broad-except
            log(f"  sparse_stream_mgpu stages={stages} {order}: {type(e).__name__}: {str(e)[:200]}")
        best = min(by_stages, key=by_stages.get)
        diff = max_diff(first(mgpu_fn(mask, *best)(q3, k3, v3, idx, cnt)), first(fn(q3, k3, v3, idx, cnt)))
        tried = ", ".join(f"stages {k_} {v_:.3f} ms" for k_, v_ in by_stages.items())
        row("sparse_stream_mgpu", by_stages[best], f"StreamConfig() mask, Mosaic GPU kernel ({tried}); "
            f"max |out diff| vs Triton {diff:.2e}", flops_=kept * 4 * cfg.block_q * cfg.block_k * h,
            density=density, diff=diff)
        log(f"  sparse_stream_mgpu {tried} (Triton {ms:.3f} ms), out diff {diff:.2e}")
        by_depth = {}
        for depth in (2, 3, 4):  # the estimate kernel's key ring
          est_m = estimate_fn(estimate_mosaic, cfg, stages=depth)
          idx_m, cnt_m = est_m(q3, k3)
          same = float(np.mean(np.all(np.asarray(idx_m) == np.asarray(idx), -1)
                               & (np.asarray(cnt_m) == np.asarray(cnt))))
          by_depth[depth] = (timeit(est_m, q3, k3, reps=reps, burst_ms=burst_ms), same)
        depth = min(by_depth, key=lambda d: by_depth[d][0])
        est_m_ms, same = by_depth[depth]
        rows["sparse_stream_mgpu"].update(estimate_ms=est_m_ms, estimate_rows_equal=same, estimate_stages=depth,
                                          estimate_by_stages={d: v[0] for d, v in by_depth.items()})
        rows["sparse_stream_mgpu"]["config"] += f"; estimate key ring {depth}"
        log(f"  estimate: Triton {est_ms:.3f} ms, Mosaic GPU " +
            ", ".join(f"ring {d} {v[0]:.3f} ms (rows equal {v[1]:.4f})" for d, v in by_depth.items()) +
            f"; best {est_ms / est_m_ms:.2f}x Triton")
      del mask, idx, cnt
    except Exception as e:  # pylint: disable=broad-except
      row("sparse_stream", na=f"n/a: {type(e).__name__}: {str(e)[:200]}")
      log(f"  sparse_stream {rows['sparse_stream']['na']}")
  for name, blk in (("faithful_estimate", 64), ("faithful_estimate_32", 32), ("faithful_estimate_16", 16)):
    if name not in kernels:
      continue
    try:
      cfg = sj.StreamConfig.faithful(block_q=blk, block_k=blk, search_share=1)  # Triton searches per block
      est_t, est_m = estimate_fn(kestimate, cfg), estimate_fn(estimate_mosaic, cfg)
      (idx_t, cnt_t), (idx_m, cnt_m) = est_t(q3, k3), est_m(q3, k3)
      same = float(np.mean(np.all(np.asarray(idx_m) == np.asarray(idx_t), -1)
                           & (np.asarray(cnt_m) == np.asarray(cnt_t))))
      t_ms, m_ms = (timeit(f, q3, k3, reps=reps, burst_ms=burst_ms) for f in (est_t, est_m))
      row(name, m_ms, f"Triton {t_ms:.3f} ms ({t_ms / m_ms:.2f}x); rows equal {same:.4f}",
          flops_=0.0, estimate_ms=t_ms, estimate_rows_equal=same)
      log(f"  {name}: Triton {t_ms:.3f} ms, Mosaic GPU {m_ms:.3f} ms, rows equal {same:.4f}")
    except Exception as e:  # pylint: disable=broad-except
      row(name, na=f"n/a: {type(e).__name__}: {str(e)[:200]}")
      log(f"  {name} {rows[name]['na']}")
  for name, share in (("faithful_estimate_p4", 4), ("faithful_estimate_p8", 8), ("faithful_estimate_p16", 16)):
    if name not in kernels:
      continue
    try:
      base, cfg = sj.StreamConfig.faithful(search_share=1), sj.StreamConfig.faithful(search_share=share)
      est_b, est_s = estimate_fn(estimate_mosaic, base), estimate_fn(estimate_mosaic, cfg)
      est_k = estimate_fn(estimate_mosaic, cfg, keep_lse=not estimate_mosaic.KEEP_LSE)  # the other variant
      (_, cnt_b), (idx_s, cnt_s), (idx_k, cnt_k) = est_b(q3, k3), est_s(q3, k3), est_k(q3, k3)
      same = bool(np.array_equal(np.asarray(idx_s), np.asarray(idx_k)) and np.array_equal(np.asarray(cnt_s),
                                                                                          np.asarray(cnt_k)))
      b_ms, s_ms, k_ms = (timeit(f, q3, k3, reps=reps, burst_ms=burst_ms) for f in (est_b, est_s, est_k))
      kept_b, kept_s = float(np.asarray(cnt_b).mean()), float(np.asarray(cnt_s).mean())
      other = "row lse kept in shared memory" if not estimate_mosaic.KEEP_LSE else "candidates walked twice"
      row(name, s_ms, f"per block {b_ms:.3f} ms ({b_ms / s_ms:.2f}x); {other} {k_ms:.3f} ms (masks equal "
          f"{same}); kept {kept_s:.1f} vs {kept_b:.1f} blocks",
          flops_=0.0, estimate_ms=b_ms, other_variant_ms=k_ms, kept=kept_s, kept_per_block_search=kept_b)
      log(f"  {name}: per block {b_ms:.3f} ms, search_share={share} {s_ms:.3f} ms ({other}: {k_ms:.3f} ms, "
          f"masks equal {same}); kept {kept_s:.1f} vs {kept_b:.1f}")
    except Exception as e:  # pylint: disable=broad-except
      row(name, na=f"n/a: {type(e).__name__}: {str(e)[:200]}")
      log(f"  {name} {rows[name]['na']}")
  for name, blk in (("faithful_attention", 64), ("faithful_attention_32", 32), ("faithful_attention_16", 16)):
    if name not in kernels:
      continue
    try:
      cfg = sj.StreamConfig.faithful(block_q=blk, block_k=blk, search_share=1)
      idx, cnt = estimate_fn(kestimate, cfg)(q3, k3)
      mask = sj.BlockMask(idx, cnt, blk, blk, t, t, cfg)
      density = float(np.asarray(sj.block_density(mask)).mean())
      kept = float(np.asarray(cnt, np.float64).sum()) * b
      f_t, f_m = sparse_fn(mask), mgpu_fn(mask)
      (o_t, mass_t, _), (o_m, mass_m, _) = f_t(q3, k3, v3, idx, cnt), f_m(q3, k3, v3, idx, cnt)
      diff, d_mass = max_diff(o_m, o_t), max_diff(mass_m, mass_t)
      t_ms, m_ms = (timeit(f, q3, k3, v3, idx, cnt, reps=reps, burst_ms=burst_ms) for f in (f_t, f_m))
      row(name, m_ms, f"density {density:.4f}; Triton {t_ms:.3f} ms ({t_ms / m_ms:.2f}x); max |out diff| "
          f"{diff:.2e}, |mass diff| {d_mass:.2e}", flops_=kept * 4 * blk * blk * h, density=density,
          triton_ms=t_ms, diff=diff, mass_diff=d_mass)
      log(f"  {name}: Triton {t_ms:.3f} ms, Mosaic GPU {m_ms:.3f} ms, out diff {diff:.2e}, mass {d_mass:.2e}")
      del mask, idx, cnt
    except Exception as e:  # pylint: disable=broad-except
      row(name, na=f"n/a: {type(e).__name__}: {str(e)[:200]}")
      log(f"  {name} {rows[name]['na']}")
  del q, k, v, ref
  return [rows[x] for x in KERNELS if x in rows]


# ---- report ----

def fmt(x, spec=".2f"):
  return "—" if x is None else format(x, spec)


def markdown(rows):
  lines = ["| H | K | T | dtype | kernel | ms | TFLOP/s | time / Mosaic | time / cuDNN | max abs diff vs cuDNN "
           "| config |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  by_shape = {}
  for r in rows:
    by_shape.setdefault((r["H"], r["K"], r["T"]), {})[r["kernel"]] = r
  for (h, kv, t), group in by_shape.items():
    mos = (group.get("mosaic_flash") or {}).get("ms")
    cud = (group.get("cudnn") or {}).get("ms")
    for name in KERNELS:
      r = group.get(name)
      if r is None:
        continue
      if r["ms"] is None:
        lines.append(f"| {h} | {kv} | {t} | {r.get('dtype', '')} | {LABELS[name]} | {r['na'] or 'n/a'} "
                     "| | | | | |")
        continue
      ratio = lambda base: None if base is None else r["ms"] / base
      conf = r["config"]
      if name in ("sparse_stream", "sparse_stream_mgpu") and r.get("estimate_ms") is not None:
        conf += f"; estimate kernel {r['estimate_ms']:.2f} ms more; TFLOP/s on kept blocks"
      lines.append(f"| {h} | {kv} | {t} | {r.get('dtype', '')} | {LABELS[name]} | {r['ms']:.3f} | "
                   f"{fmt(r['tflops'], '.0f')} | "
                   f"{fmt(ratio(mos))} | {fmt(ratio(cud))} | {fmt(r['diff'], '.3g')} | {conf} |")
  return "\n".join(lines)


def headline(rows):
  """Per shape: sparse_full / mosaic, triton_mha / mosaic (time ratios)."""
  out = []
  by_shape = {}
  for r in rows:
    by_shape.setdefault((r["H"], r["K"], r["T"]), {})[r["kernel"]] = r
  for (h, kv, t), g in by_shape.items():
    ms = {k: g[k]["ms"] for k in g if g[k]["ms"] is not None}
    if "mosaic_flash" not in ms:  # the dense Mosaic kernel was not among --kernels: nothing to compare with
      continue
    parts = [f"{k}/mosaic {ms[k] / ms['mosaic_flash']:.2f}x" for k in DENSE_WORK + ("cudnn",)
             if k in ms and k != "mosaic_flash"]
    out.append(f"H={h} K={kv} T={t}: " + ", ".join(parts))
  return "\n".join(out)


def dry_run(args):
  """CPU smoke test: the plan, and our sparse kernel interpreted at a tiny shape vs the XLA reference."""
  plan = shapes(args)
  log(f"plan: {len(plan)} shapes x {len(args.kernels)} kernels: {plan}")
  b, n, kv, h, t = 1, 2, 1, 32, 256
  diff = None
  if not args.dry_skip_kernel:
    q, k, v = make_qkv(b, n, kv, h, t, dtype=jnp.float32)
    mask = sj.window_mask(n, t, t, block_q=64, block_k=64, window=None)
    out_p = sparse_fn(mask)(q[0], k[0], v[0], mask.indices, mask.counts)[0]
    out_x, _ = sj.sparse_attention(q[0], k[0], v[0], mask, scale=1.0, backend="xla")
    diff = max_diff(out_p, out_x)
    log(f"sparse kernel (interpreted) vs XLA reference at T={t}: max |diff| {diff:.3g}")
  common = dict(B=b, N=n, K=kv, H=h, T=t, dtype=args.dtype)
  rows = [dict(kernel="sparse_full", ms=1.0, config="dry", diff=diff, na=None,
               tflops=causal_flops(b, n, h, t) / 1e9, **common),
          dict(kernel="mosaic_flash", ms=None, config="", diff=None, na="n/a: dry run (no GPU)", tflops=None,
               **common)]
  return rows, diff


def save(out, results):
  if out:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "mosaic.json"), "w") as f:
      json.dump(results, f, indent=1, default=str)


def main(argv=None):
  args = parse_args(argv)
  results = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                 date=datetime.date.today().isoformat(), command=" ".join(sys.argv),
                 args={k: v for k, v in vars(args).items()})
  log(json.dumps({k: results[k] for k in ("device", "jax", "date", "args")}))
  info = probe()
  results["probe"] = info
  for key, val in info.items():
    log(f"{key}: {val}")
  if args.dry_run:
    rows, diff = dry_run(args)
    results["dry_run_diff"] = diff
  else:
    rows = []
    results["rows"] = rows
    for shape in shapes(args):
      try:
        rows += bench_shape(shape, args.kernels, args.reps, args.burst_ms, args.dtype)
      except Exception:  # pylint: disable=broad-except
        log(f"SHAPE {shape} FAILED\n" + traceback.format_exc())
      save(args.out, results)  # after every shape: a run cut short keeps what it measured
  results["rows"] = rows
  md = markdown(rows)
  hl = headline(rows)
  log("\n" + md + "\n\n" + hl)
  save(args.out, results)
  if args.out:
    with open(os.path.join(args.out, "mosaic.md"), "w") as f:
      f.write(md + "\n\n" + hl + "\n")
  return results


if __name__ == "__main__":
  main()
