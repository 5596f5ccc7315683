"""GPU checks of the exact-trace path that CPU tests cannot make (run on the lent GPU, prints a report).

1. cuDNN's log-sum-exp residual (`jax.nn.dot_product_attention(..., return_residual=True)`) equals the
   exact XLA pass's (natural log, scaled logits), causal and sliding-window.
2. The Pallas kernels compile and run in float32 (shared memory), and their masks / attention match XLA.
3. Mass under a reference normaliser (`lse_ref`) from the Pallas kernel equals the XLA reference's.
4. Dense-density masks (more kept slots than the fused accumulator takes): the second mass pass equals the
   fused accumulator and the XLA reference, with and without `lse_ref`.
5. A random-weight Gemma 3 config: output="exact" logits equal attention="dense" (cuDNN and XLA).
6. The Mosaic GPU attention kernel (kernels/blocksparse_mosaic.py) equals the XLA reference: out, block mass
   and lse, float16 / bfloat16, GQA, ragged T, soft-cap, sliding window, lse_ref, 16 / 32 / 64-token blocks,
   masks past 192 kept blocks (chunks).
7. The Mosaic GPU estimate kernel (kernels/estimate_mosaic.py): masks equal the Triton kernel's and the XLA
   reference's, row for row (ragged T, no search round, soft-cap, wide first level, batch, exact ties); its wide
   kernel (`check_mgpu_estimate_wide`: mass scores, coverage budgets and top_k up to 128, `StreamConfig.faithful()`)
   the same, with each config's first call (compile + run) timed.
9. The Triton block-mass kernel of the ideal kept set (kernels/ideal_triton.py) equals the XLA reference
   (`ideal_mask`): kept sets row for row up to near-ties, masses and coverage; with the cuDNN lse.
10. Its Mosaic GPU port (kernels/ideal_mosaic.py, `check_mgpu_ideal`): the same comparison on 64 x 64
   blocks, and rows copied out through several shared-memory windows equal one window's.
8. The Triton estimate kernel with mass scores and coverage budgets (`StreamConfig.faithful()` and others)
   equals the XLA reference row for row, up to rows whose estimates tie within the GPU's rounding.

  python3 benchmarks/gpu_checks.py            # every check
  python3 benchmarks/gpu_checks.py mass mgpu_estimate   # only these (names: the functions' check_<name>)
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import stream_jax as sj
from stream_jax import dense
from stream_jax.models import forward, get_config, init_params


def _rand(shape, seed, dtype):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def check_cudnn_lse(t=4096, n=8, kv=4, h=256):
  for window in (None, 1024):
    q, k, v = (_rand((1, t, x, h), i, jnp.bfloat16) for i, x in enumerate((n, kv, kv)))
    pos = jnp.arange(t)
    _, lse_x = dense.dense_attention(q, k, v, q_pos=pos, k_pos=pos, scale=h ** -0.5, window=window,
                                     return_lse=True)
    local = None if window is None else (window - 1, 0)
    _, lse_c = jax.nn.dot_product_attention(q, k, v, scale=h ** -0.5, is_causal=True, local_window_size=local,
                                            implementation="cudnn", return_residual=True)
    lse_c = jnp.swapaxes(lse_c.reshape(1, t, n).astype(jnp.float32), 1, 2)
    print(f"cudnn lse vs xla lse (window={window}): max |diff| "
          f"{float(jnp.abs(lse_c - lse_x).max()):.3e}, |lse| ~ {float(jnp.abs(lse_x).mean()):.2f}")


def check_pallas_f32(t=8192, n=8, kv=4, h=256):
  cfg = sj.StreamConfig()
  for dtype in (jnp.float32, jnp.bfloat16):
    q, k, v = (_rand((t, x, h), 10 + i, dtype) for i, x in enumerate((n, kv, kv)))
    mx = sj.estimate_mask(q, k, cfg, backend="xla")
    mp = sj.estimate_mask(q, k, cfg, backend="pallas")
    rows = float(jnp.mean(jnp.all(mx.indices == mp.indices, -1)))
    _, lse_ref = dense.dense_attention(q[None], k[None], v[None], q_pos=jnp.arange(t), k_pos=jnp.arange(t),
                                       scale=h ** -0.5, return_lse=True)
    ox, sx = sj.sparse_attention(q, k, v, mx, backend="xla", lse_ref=lse_ref[0])
    op, sp = sj.sparse_attention(q, k, v, mx, backend="pallas", lse_ref=lse_ref[0])
    _, sp0 = sj.sparse_attention(q, k, v, mx, backend="pallas")
    _, sx0 = sj.sparse_attention(q, k, v, mx, backend="xla")
    print(f"{jnp.dtype(dtype).name}: pallas mask rows = xla {rows:.4f}; out max |diff| "
          f"{float(jnp.abs(ox.astype(jnp.float32) - op.astype(jnp.float32)).max()):.2e}; mass(lse_ref) "
          f"max |diff| {float(jnp.abs(sx.mass - sp.mass).max()):.2e}; mass(kept) max |diff| "
          f"{float(jnp.abs(sx0.mass - sp0.mass).max()):.2e}; coverage xla "
          f"{float(sj.block_coverage(sx.lse, lse_ref[0], 64).mean()):.4f} pallas "
          f"{float(sj.block_coverage(sp.lse, lse_ref[0], 64).mean()):.4f}")


def check_second_mass_pass(t=8192, n=8, kv=4, h=128):
  from stream_jax.kernels import blocksparse_triton as kattention  # pylint: disable=import-outside-toplevel
  for dtype in (jnp.bfloat16, jnp.float32):
    q, k, v = (_rand((t, x, h), 20 + i, dtype) for i, x in enumerate((n, kv, kv)))
    mask = sj.window_mask(n, t, t, block_q=64, block_k=64, window=None)  # every causal block: C = t / 64
    _, lse_ref = dense.dense_attention(q[None], k[None], v[None], q_pos=jnp.arange(t), k_pos=jnp.arange(t),
                                       scale=h ** -0.5, return_lse=True)
    for ref in (None, lse_ref[0]):
      _, sx = sj.sparse_attention(q, k, v, mask, backend="xla", lse_ref=ref)
      o2, s2 = kattention.sparse_attention(q, k, v, mask, lse_ref=ref, fused_mass=False)
      o1, s1 = kattention.sparse_attention(q, k, v, mask, lse_ref=ref, fused_mass=True)
      print(f"{jnp.dtype(dtype).name} C={mask.indices.shape[-1]} lse_ref={ref is not None}: second-pass mass "
            f"vs fused max |diff| {float(jnp.abs(s2.mass - s1.mass).max()):.2e}, vs xla "
            f"{float(jnp.abs(s2.mass - sx.mass).max()):.2e}; out identical "
            f"{bool(jnp.array_equal(o1, o2))}; lse max |diff| {float(jnp.abs(s1.lse - s2.lse).max()):.2e}")


MGPU_CASES = (
    # t, n, kv, h, dtype, softcap, window, lse_ref, config
    (512, 2, 1, 64, "float16", None, None, False, dict(top_k=2)),
    (1000, 4, 2, 128, "bfloat16", None, None, False, dict(top_k=4)),  # ragged T, GQA
    (2048, 4, 1, 256, "bfloat16", 30.0, None, True, dict()),  # soft-cap, reference normaliser
    (1536, 2, 2, 128, "float16", None, 300, False, dict(top_k=3)),  # sliding window
    (4096, 8, 4, 256, "bfloat16", None, None, True, dict(top_k=16)),
    # past 64 slots the masses go through shared memory (blocksparse_mosaic's big path)
    (16384, 8, 4, 256, "bfloat16", None, None, True, dict(top_k=128, coverage=0.95)),  # faithful()'s 131
    (12000, 4, 2, 128, "float16", 30.0, None, False, dict(top_k=80)),  # ragged, 83 slots, own normaliser
    (6000, 4, 1, 256, "bfloat16", None, 2000, True, dict(top_k=128)),  # window; rows with < 131 kept
    # 16 / 32-token blocks: a step's 64-key tile holds 4 / 2 kept blocks (TMA into slices of one buffer)
    (4096, 8, 4, 256, "bfloat16", None, None, True, dict(block_q=32, block_k=32, top_k=16)),
    (3000, 4, 2, 128, "float16", 30.0, 700, False, dict(block_q=16, block_k=16, top_k=13)),  # ragged, odd counts
    (16384, 8, 4, 256, "bfloat16", None, None, True, dict(block_q=16, block_k=16, top_k=128, coverage=0.95)),
    (9000, 4, 1, 128, "bfloat16", 50.0, None, False, dict(block_q=32, block_k=32, top_k=90)),  # shared memory
    # past 192 kept blocks: chunks of 192 merged by log-sum-exp, masses rerun under the merged normaliser
    (20000, 4, 2, 128, "bfloat16", None, None, True, dict(top_k=256)),
    (12000, 4, 1, 256, "bfloat16", 30.0, None, False, dict(block_q=32, block_k=32, top_k=200)),
)


def check_mgpu_attention(cases=MGPU_CASES):
  """Returns the number of failed cases (an exception or a difference above the tolerance)."""
  from stream_jax.kernels import blocksparse_mosaic  # pylint: disable=import-outside-toplevel
  from stream_jax.kernels.implementations import Call  # pylint: disable=import-outside-toplevel
  failed = 0
  for t, n, kv, h, dtype, cap, win, with_ref, cfg in cases:
    def run(t=t, n=n, kv=kv, h=h, dtype=dtype, cap=cap, win=win, with_ref=with_ref, cfg=cfg):
      q, k, v = (_rand((t, x, h), 30 + i, dtype) for i, x in enumerate((n, kv, kv)))
      mask = sj.estimate_mask(q, k, sj.StreamConfig(**cfg), softcap=cap)
      ref = None
      if with_ref:
        _, ref = dense.dense_attention(q[None], k[None], v[None], q_pos=jnp.arange(t), k_pos=jnp.arange(t),
                                       scale=h ** -0.5, softcap=cap, window=win, return_lse=True)
        ref = ref[0]
      why = blocksparse_mosaic.unsupported(Call.attention(q, v, mask))
      if why:
        raise ValueError(why)
      ox, sx = sj.sparse_attention(q, k, v, mask, softcap=cap, window=win, backend="xla", lse_ref=ref)
      om, sm = blocksparse_mosaic.sparse_attention(q, k, v, mask, softcap=cap, window=win, lse_ref=ref)
      d_out = float(jnp.abs(om.astype(jnp.float32) - ox.astype(jnp.float32)).max())
      d_mass = float(jnp.abs(sm.mass - sx.mass).max())
      finite = jnp.isfinite(sx.lse)
      d_lse = float(jnp.where(finite, jnp.abs(sm.lse - sx.lse), 0.0).max())
      same_inf = bool(jnp.array_equal(finite, jnp.isfinite(sm.lse)))
      ok = d_out < 3e-2 and d_mass < 2e-3 and d_lse < 2e-3 and same_inf
      return ok, f"out {d_out:.2e} mass {d_mass:.2e} lse {d_lse:.2e} (-inf rows agree: {same_inf})"
    failed += _case(f"mgpu T={t} N={n} K={kv} H={h} {dtype} softcap={cap} window={win} lse_ref={with_ref}",
                    run)
  return failed


def _case(label, run):
  """One GPU check case: `run()` returns (ok, detail). Prints the verdict; returns 1 if it failed or raised."""
  try:
    ok, detail = run()
  except Exception as e:  # pylint: disable=broad-except
    print(f"FAIL {label}: {type(e).__name__}: {str(e)[:600]}", flush=True)
    return 1
  print(f"{'ok  ' if ok else 'FAIL'} {label}: {detail}", flush=True)
  return int(not ok)


ESTIMATE_CASES = (
    # b, t, s - t, n, kv, h, dtype, softcap, config, integer-valued inputs
    (None, 1000, 0, 4, 2, 128, "bfloat16", None, dict(), False),  # ragged T, GQA, no search round
    (None, 4096, 0, 8, 4, 256, "bfloat16", 30.0, dict(), False),  # soft-cap
    (None, 4096, 0, 4, 1, 128, "float16", None, dict(top_k=8, init_branches=24), False),  # wide first level
    (None, 8192, 0, 8, 4, 256, "bfloat16", None, dict(top_k=32, window_blocks=3, sink_blocks=2), False),
    (2, 3000, 0, 4, 4, 64, "bfloat16", None, dict(top_k=4, sink_blocks=0, window_blocks=1), False),  # batch
    (None, 4096, 0, 4, 2, 128, "bfloat16", None, dict(), True),  # exact logits, ties by position
    (None, 16384, 0, 8, 4, 256, "bfloat16", None, dict(), False),
    # S > T off a block boundary with a 1-block window: the per-child causal mask
    (None, 1000, 100, 4, 2, 128, "bfloat16", None, dict(window_blocks=1), False),
    (None, 2000, 100, 4, 2, 256, "bfloat16", None, dict(window_blocks=1, top_k=8), False),
)
# The wide kernel (node lists in tiles of 64): mass scores, coverage budgets (keys sharpened), top_k past 32; each
# case's first call (compile + run) timed (the kernel lowers with Lane semantics: see estimate_mosaic).
WIDE_ESTIMATE_CASES = (
    (None, 2048, 0, 8, 4, 256, "bfloat16", None, dict(top_k=40, coverage=0.95), False),  # small first: compile time
    (None, 16384, 0, 8, 4, 256, "bfloat16", None, dict(top_k=128, coverage=0.95), False),  # = faithful()
    (None, 32768, 0, 8, 4, 256, "bfloat16", None, dict(top_k=128, coverage=0.95), False),  # two rounds
    (None, 9000, 100, 4, 2, 128, "float16", 30.0, dict(top_k=64, score="mass"), False),  # fixed k, soft-cap
    (2, 6000, 0, 4, 1, 64, "bfloat16", None, dict(top_k=40, init_branches=100, coverage=0.9, dropped_scale=2.0),
     False),  # batch, part-filled tiles, a first level wider than the children
    (None, 5000, 100, 4, 2, 128, "bfloat16", 50.0, dict(top_k=48, coverage=0.8, window_blocks=1), False),
    (None, 16384, 0, 8, 4, 128, "bfloat16", None, dict(top_k=128), False),  # max scores, 4 tiles of children
    (None, 8192, 0, 4, 2, 256, "bfloat16", None, dict(top_k=64, init_branches=256, score="mass"), False),
    # below 64-token blocks (a 64-row tile from each block's start, the rest masked), strided rows, "first"
    (None, 32768, 0, 8, 4, 256, "bfloat16", None, dict(top_k=128, coverage=0.95, block_q=32, block_k=32), False),
    (None, 16384, 0, 8, 4, 256, "bfloat16", None, dict(top_k=128, coverage=0.95, block_q=16, block_k=16), False),
    (None, 5000, 100, 4, 2, 128, "float16", 30.0, dict(top_k=48, coverage=0.9, query_stride=4,
                                                        representative="first", block_q=32, block_k=32), False),
    (None, 8192, 0, 8, 4, 256, "bfloat16", None, dict(top_k=128, coverage=0.95, query_stride=4), False),
    (2, 4096, 0, 4, 2, 128, "bfloat16", None, dict(block_q=16, block_k=16, window_blocks=1), False),  # max, mask
    (None, 4096, 0, 4, 2, 128, "bfloat16", None, dict(top_k=16, representative="first"), True),  # exact ties
    (None, 3000, 0, 4, 2, 64, "float16", None, dict(top_k=8, init_branches=24, representative="first",
                                                    coverage=0.8), False),
)
# search_share (a group pass on every P-th row of P blocks, then each block's last round): the Mosaic GPU kernel
# against the XLA reference (no Triton kernel takes it)
SHARED_ESTIMATE_CASES = (
    (None, 4096, 0, 4, 2, 128, "bfloat16", None, dict(top_k=16, coverage=0.9, search_share=4), False),  # compile
    (None, 32768, 0, 8, 4, 256, "bfloat16", None, dict(top_k=128, coverage=0.95, search_share=4), False),
    (None, 32768, 0, 8, 4, 256, "bfloat16", None, dict(top_k=128, coverage=0.95, search_share=8), False),
    (None, 32768, 0, 8, 4, 256, "bfloat16", None, dict(top_k=128, coverage=0.95, search_share=16), False),
    (None, 9000, 100, 4, 2, 128, "float16", 30.0, dict(top_k=64, score="mass", search_share=2), False),
    (2, 6000, 0, 4, 1, 64, "bfloat16", None, dict(top_k=40, init_branches=100, coverage=0.9, search_share=4),
     False),  # batch, a first level wider than the children
    (None, 5000, 100, 4, 2, 128, "bfloat16", 50.0, dict(top_k=48, coverage=0.8, window_blocks=1, search_share=4),
     False),  # the per-child causal mask
    (None, 16384, 0, 8, 4, 128, "bfloat16", None, dict(top_k=128, search_share=4), False),  # max scores
    (None, 16384, 0, 8, 4, 256, "bfloat16", None, dict(top_k=128, coverage=0.95, block_q=16, block_k=16,
                                                       search_share=4), False),
    (None, 5000, 100, 4, 2, 128, "float16", 30.0, dict(top_k=48, coverage=0.9, query_stride=4, representative="first",
                                                        block_q=32, block_k=32, search_share=8), False),
    (None, 4096, 0, 4, 2, 128, "bfloat16", None, dict(top_k=16, representative="first", search_share=2), True),
)
SHARPEN = 4.0  # keys scaled for coverage budgets, so that they keep fewer blocks than they may (as check_mass)


def check_mgpu_estimate_wide(cases=WIDE_ESTIMATE_CASES):
  """check_mgpu_estimate for the wide kernel (see WIDE_ESTIMATE_CASES)."""
  return check_mgpu_estimate(cases)


def check_mgpu_estimate_shared(cases=SHARED_ESTIMATE_CASES):
  """check_mgpu_estimate for config.search_share > 1 (see SHARED_ESTIMATE_CASES): against XLA only."""
  return check_mgpu_estimate(cases)


def check_mgpu_estimate(cases=ESTIMATE_CASES):
  """Masks of the Mosaic GPU estimate kernel vs the Triton kernel and the XLA reference (share of equal
  rows, at least 0.999: elsewhere two estimates tied within the GPU's rounding, or a block sat at the budget's
  threshold; integer inputs must match the reference in every row). Returns the failed case count. Its speed
  is benchmarks/mosaic.py's `sparse_stream_mgpu` row."""
  from stream_jax.kernels import estimate_triton as kestimate  # pylint: disable=import-outside-toplevel
  from stream_jax.kernels import estimate_mosaic  # pylint: disable=import-outside-toplevel
  from stream_jax.kernels.implementations import Call  # pylint: disable=import-outside-toplevel
  failed = 0
  for b, t, extra, n, kv, h, dtype, cap, cfg, integer in cases:
    def run(b=b, t=t, extra=extra, n=n, kv=kv, h=h, dtype=dtype, cap=cap, cfg=cfg, integer=integer):
      config = sj.StreamConfig(**cfg)
      lead = () if b is None else (b,)
      q = _rand(lead + (t, n, h), 50, dtype)
      k = _rand(lead + (t + extra, kv, h), 51, dtype)
      if config.adaptive:
        k = (k.astype(jnp.float32) * SHARPEN).astype(dtype)
      if integer:  # small integers: every logit exact in bf16 products and f32 sums, many exact ties
        q, k = (jnp.round(x * 1.5).clip(-3, 3).astype(dtype) for x in (q, k))
      why = estimate_mosaic.unsupported(Call.estimate(q, config))
      if why:
        raise ValueError(why)
      start = time.perf_counter()
      mm = jax.block_until_ready(estimate_mosaic.estimate_mask(q, k, config, softcap=cap))
      first = time.perf_counter() - start
      mx = sj.estimate_mask(q, k, config, softcap=cap, backend="xla")
      mt = mx if config.search_share > 1 else kestimate.estimate_mask(q, k, config, softcap=cap)  # no Triton
      rows = lambda a, b: float(jnp.mean(jnp.all(a.indices == b.indices, -1) & (a.counts == b.counts)))
      vs_t, vs_x, t_x = rows(mm, mt), rows(mm, mx), rows(mt, mx)
      ok = vs_x >= (1.0 if integer else 0.999) and vs_t >= 0.999
      kept = float(np.asarray(mx.counts).mean())
      return ok, (f"first call {first:.1f} s; rows equal to Triton {vs_t:.4f}, to XLA {vs_x:.4f} (Triton vs XLA "
                  f"{t_x:.4f}); kept {kept:.1f} of "
                  f"{config.capacity}, count diff vs XLA {float(jnp.abs(mm.counts - mx.counts).mean()):.4f}")
    failed += _case(f"mgpu estimate B={b} T={t} S={t + extra} N={n} K={kv} H={h} {dtype} softcap={cap} {cfg} "
                    f"integer={integer}", run)
  return failed


MASS_CASES = (
    # t, s - t, n, kv, h, dtype, softcap, config, integer-valued inputs
    (8192, 0, 8, 4, 256, "bfloat16", None, dict(top_k=128, coverage=0.95), False),  # = faithful()
    (32768, 0, 8, 4, 256, "bfloat16", None, dict(top_k=128, coverage=0.95), False),
    (4096, 100, 4, 1, 128, "float32", 30.0, dict(top_k=32, coverage=0.9), False),  # f32 dots, soft-cap, S > T
    (4096, 0, 4, 2, 128, "bfloat16", None, dict(top_k=16, score="mass"), True),  # fixed k, exact logits
    (3000, 0, 4, 2, 64, "float16", None, dict(top_k=8, init_branches=24, representative="first",
                                              coverage=0.8), False),
    (4096, 0, 4, 2, 256, "bfloat16", None, dict(top_k=32, coverage=0.9, query_stride=4), False),
)


def check_mass(cases=MASS_CASES, sharpen=4.0):
  """Masks of the Triton estimate kernel with mass scores vs the XLA reference (share of equal rows; keys
  scaled by `sharpen` so that the coverage budget keeps fewer blocks than it may). Returns failures."""
  from stream_jax.kernels import estimate_triton as kestimate  # pylint: disable=import-outside-toplevel
  failed = 0
  for t, extra, n, kv, h, dtype, cap, cfg, integer in cases:
    def run(t=t, extra=extra, n=n, kv=kv, h=h, dtype=dtype, cap=cap, cfg=cfg, integer=integer):
      config = sj.StreamConfig(**cfg)
      q = _rand((t, n, h), 60, dtype)
      k = (_rand((t + extra, kv, h), 61, dtype).astype(jnp.float32) * sharpen).astype(dtype)
      if integer:
        q, k = (jnp.round(x * 1.5).clip(-3, 3).astype(dtype) for x in (q, k))
      mt = kestimate.estimate_mask(q, k, config, softcap=cap)
      mx = sj.estimate_mask(q, k, config, softcap=cap, backend="xla")
      equal = float(jnp.mean(jnp.all(mt.indices == mx.indices, -1) & (mt.counts == mx.counts)))
      counts = np.asarray(mx.counts)
      return equal >= 0.999, (f"rows equal to XLA {equal:.5f}; kept blocks mean {counts.mean():.1f} of "
                              f"{config.capacity}, count diff {float(jnp.abs(mt.counts - mx.counts).mean()):.4f}")
    failed += _case(f"mass estimate T={t} S={t + extra} N={n} K={kv} H={h} {dtype} softcap={cap} {cfg} "
                    f"integer={integer}", run)
  return failed


IDEAL_CASES = [
    # t, extra keys, n, kv, h, dtype, softcap, window, config changes
    (16384, 0, 8, 4, 256, jnp.bfloat16, None, None, dict(block_q=64, block_k=64)),
    (8000, 300, 8, 4, 128, jnp.float16, None, None, dict(block_q=32, block_k=32, top_k=64)),
    (8192, 0, 4, 1, 256, jnp.bfloat16, 50.0, None, dict(block_q=16, block_k=16, top_k=256, coverage=0.9)),
    (8192, 0, 8, 4, 256, jnp.bfloat16, None, 1024, dict(top_k=16, coverage=None)),
]


MGPU_IDEAL_CASES = [
    (16384, 0, 8, 4, 256, jnp.bfloat16, None, None, dict(block_q=64, block_k=64)),
    (8000, 300, 8, 4, 128, jnp.float16, None, None, dict(top_k=64)),  # ragged T, S > T
    (8192, 0, 4, 1, 256, jnp.bfloat16, 50.0, None, dict(top_k=64, coverage=0.9)),  # soft-cap, one kv head
    (8192, 0, 8, 4, 256, jnp.bfloat16, None, 1024, dict(top_k=16, coverage=None)),  # window, fixed k
    (70000, 0, 4, 2, 64, jnp.bfloat16, None, None, dict(top_k=64)),  # 1,094 key blocks: 18 segments
    # 32 / 16-token blocks: 2 / 4 query and key blocks per 64 x 64 tile
    (8000, 300, 8, 4, 128, jnp.float16, None, None, dict(block_q=32, block_k=32, top_k=64)),  # ragged, S > T
    (8192, 0, 4, 1, 256, jnp.bfloat16, 50.0, None, dict(block_q=16, block_k=16, top_k=256, coverage=0.9)),
    (8192, 0, 8, 4, 256, jnp.bfloat16, None, 1000, dict(block_q=32, block_k=32, top_k=32, coverage=None)),
    (6000, 50, 4, 2, 64, jnp.bfloat16, 30.0, 700, dict(block_q=16, block_k=16, top_k=128)),  # window, soft-cap
]


def check_mgpu_ideal(cases=MGPU_IDEAL_CASES):
  """The Mosaic GPU block-mass kernel (kernels/ideal_mosaic.py) vs the XLA reference, and its rows with a
  small shared-memory window (several TMA copies per row) equal to one window's. Returns failures."""
  from stream_jax.kernels import ideal_mosaic  # pylint: disable=import-outside-toplevel
  failed = check_ideal(cases, backend="mosaic")

  def windows(t=70000, n=4, kv=2, h=64, block=64):
    q, k = _rand((1, t, n, h), 80, jnp.bfloat16), _rand((1, t, kv, h), 81, jnp.bfloat16)
    lse = jnp.full((1, n, t), 12.0, jnp.float32)  # any normaliser: both runs use the same
    f = 64 // block  # blocks per tile: a chunk starts on a tile
    kw = dict(n_rows=64, q_len=t, k_len=t, scale=h ** -0.5, softcap=None, window=None, block=block)
    first = ((t // block) - 64) // f * f  # the last 64 query blocks: 1,030-1,093 64-key tiles each
    one = ideal_mosaic.mass_rows(q, k, lse, first, **kw)
    many = ideal_mosaic.mass_rows(q, k, lse, first, segments_per_copy=4, **kw)
    odd = ideal_mosaic.mass_rows(q, k, lse, first + f, **dict(kw, n_rows=64 - f))  # pairs from an odd tile
    diff = float(jnp.abs(one - many).max())
    odd_diff = float(jnp.abs(one[:, :, f:] - odd).max())
    sums = one.sum(-1)  # under a made-up lse: shown, not checked
    return diff == 0.0 and odd_diff == 0.0, (f"{block}-token blocks, segments in windows of 4 vs one window: max "
                                             f"|diff| {diff:.1e}; {64 - f} rows from the next tile: {odd_diff:.1e}; "
                                             f"row sums {float(sums.min()):.3g}..{float(sums.max()):.3g}")

  for block in (64, 32, 16):
    failed += _case(f"mgpu ideal rows across shared-memory windows ({block}-token blocks)",
                    functools.partial(windows, block=block))
  return failed


MGPU_TABLE_CASES = [
    # t, extra, n, kv, h, dtype, softcap, config changes
    (16384, 0, 8, 4, 256, jnp.bfloat16, None, dict(query_stride=8)),  # every 8th query
    (8000, 300, 8, 4, 128, jnp.float16, None, dict(query_stride=4, top_k=64)),  # ragged T, S > T
    (8192, 0, 4, 1, 256, jnp.bfloat16, 50.0, dict(query_stride=16, coverage=0.9)),  # soft-cap, one kv head
    (8192, 0, 8, 4, 128, jnp.bfloat16, None, dict(query_stride=2, top_k=16, coverage=None)),  # fixed k
    (70000, 0, 4, 2, 64, jnp.bfloat16, None, dict(query_stride=64, top_k=64)),  # 1 query / block, 18 segments
    # 32 / 16-token blocks: 2 / 4 key blocks per 64-key tile
    (8000, 300, 8, 4, 128, jnp.float16, None, dict(block_q=32, block_k=32, query_stride=4, top_k=64)),  # ragged
    (8192, 0, 4, 1, 256, jnp.bfloat16, 50.0, dict(block_q=16, block_k=16, query_stride=2, top_k=256,
                                                  coverage=0.9)),  # soft-cap, one kv head
    (16384, 0, 8, 4, 128, jnp.bfloat16, None, dict(block_q=32, block_k=32, query_stride=8, top_k=128)),
]


def _kept_sets_agree(k_idx, x_idx, k_cov, x_cov):
  """A kernel's kept sets against the XLA path's: the rows equal (bool [..., nQ]), the largest coverage
  difference where they are (elsewhere a near-tie or a block at the budget's threshold went the other way
  under the GPU's summation order), and whether that passes (>= 99.5% equal, coverage within 2e-3)."""
  equal = np.asarray(jnp.all(k_idx == x_idx, -1))
  cov_err = float(np.abs(np.asarray(k_cov) - np.asarray(x_cov))[equal].max())
  return equal, cov_err, bool(equal.mean() >= 0.995 and cov_err < 2e-3)


def check_mgpu_table(cases=MGPU_TABLE_CASES, sharpen=4.0):
  """StreamConfig.select="table" through the Mosaic GPU kernel (kernels/table_mosaic.py) vs the XLA path:
  the kept sets and the sample's coverage; and its rows through small shared-memory windows equal to one
  window's. Returns failures."""
  from stream_jax import table  # pylint: disable=import-outside-toplevel
  from stream_jax.kernels import table_mosaic  # pylint: disable=import-outside-toplevel
  failed = 0
  for t, extra, n, kv, h, dtype, cap, changes in cases:
    def run(t=t, extra=extra, n=n, kv=kv, h=h, dtype=dtype, cap=cap, changes=changes):
      config = sj.StreamConfig.table(**changes)
      s = t + extra
      q = _rand((1, t, n, h), 70, dtype)
      k = (_rand((1, s, kv, h), 71, dtype).astype(jnp.float32) * sharpen).astype(dtype)
      kw = dict(scale=h ** -0.5, softcap=cap)
      km, kc = table.table_mask(q, k, config, impl="mosaic", **kw)
      xm, xc = table.table_mask(q, k, config, impl="xla", **kw)
      equal, cov_err, ok = _kept_sets_agree(km.indices, xm.indices, kc, xc)
      return ok, (f"rows equal {equal.mean():.5f}; max |coverage diff| {cov_err:.2e}; kept "
                  f"{float(np.asarray(xm.counts).mean()):.1f} of {config.capacity}; sample coverage "
                  f"{float(xc.mean()):.4f}")
    failed += _case(f"mgpu table T={t} S={t + extra} N={n} K={kv} H={h} {jnp.dtype(dtype).name} softcap={cap} "
                    f"{changes}", run)

  def windows(t=70000, n=4, kv=2, h=64, stride=8, block=64):
    q, k = _rand((1, t, n, h), 80, jnp.bfloat16), _rand((1, t, kv, h), 81, jnp.bfloat16)
    r = block // stride
    rows = table.sampled_rows(t, block, stride)[-64:].reshape(-1)  # the last 64 query blocks: r tiles
    q_rows = jnp.take(q, rows, axis=1)
    kw = dict(stride=stride, q_len=t, scale=h ** -0.5, softcap=None, block=block)
    first = -(-t // block) - 64
    one = table_mosaic.mass_rows(q_rows, k, rows, first, **kw)
    many = table_mosaic.mass_rows(q_rows, k, rows, first, window_floats=4 * (64 // r) * 64, **kw)
    diff = float(jnp.abs(one - many).max())
    sums = np.asarray(one.sum(-1))[0]  # each block's sampled queries' masses sum to their count
    want = np.asarray((rows.reshape(64, r) >= 0).sum(-1), np.float32)
    return diff == 0.0 and np.allclose(sums, want[None], rtol=2e-3), (
        f"{block}-token blocks, stride {stride}: windows of 4 segments vs one window: max |diff| {diff:.1e}; "
        f"row sums / sampled queries {(sums / want).min():.4f}-{(sums / want).max():.4f}")

  for block, stride in ((64, 8), (32, 4), (16, 2)):
    failed += _case(f"mgpu table rows across shared-memory windows ({block}-token blocks)",
                    functools.partial(windows, block=block, stride=stride))
  return failed


def check_ideal(cases=IDEAL_CASES, sharpen=4.0, backend="triton"):
  """The ideal kept set through a block-mass kernel (`backend`) vs the XLA reference, same lse (cuDNN's
  where it applies). Returns failures."""
  failed = 0
  for t, extra, n, kv, h, dtype, cap, window, changes in cases:
    def run(t=t, extra=extra, n=n, kv=kv, h=h, dtype=dtype, cap=cap, window=window, changes=changes):
      config = sj.StreamConfig.ideal(**changes)
      s = t + extra
      q = _rand((1, t, n, h), 70, dtype)
      k = (_rand((1, s, kv, h), 71, dtype).astype(jnp.float32) * sharpen).astype(dtype)
      v = _rand((1, s, kv, h), 72, dtype)
      _, lse = dense.dense_attention(q, k, v, q_pos=jnp.arange(t) + extra, k_pos=jnp.arange(s),
                                     scale=h ** -0.5, softcap=cap, window=window, return_lse=True)
      kw = dict(scale=h ** -0.5, softcap=cap, window=window)
      kr = sj.ideal_mask(q, k, lse, config, backend=backend, **kw)
      xr = sj.ideal_mask(q, k, lse, config, backend="xla", **kw)
      equal, cov_err, ok = _kept_sets_agree(kr.mask.indices, xr.mask.indices, kr.coverage, xr.coverage)
      mass_err = float(np.abs(np.asarray(kr.mass) - np.asarray(xr.mass))[equal].max())
      counts = np.asarray(xr.mask.counts)
      return ok, (f"rows equal {equal.mean():.5f}; max |mass diff| {mass_err:.2e}, |coverage diff| "
                  f"{cov_err:.2e}; kept {counts.mean():.1f} of {config.capacity}; coverage mean "
                  f"{float(xr.coverage.mean()):.4f}")
    failed += _case(f"ideal[{backend}] T={t} S={t + extra} N={n} K={kv} H={h} {jnp.dtype(dtype).name} softcap={cap} "
                    f"window={window} {changes}", run)
  return failed


def check_exact_forward(t=4096):
  base = get_config("gemma3-1b")
  config = dataclasses.replace(base, num_layers=6, layer_kinds=base.layer_kinds[:6], vocab_size=4096,
                               name="gemma3-1b-6layers")
  params = init_params(config, dtype=jnp.float32, seed=0)
  x = jnp.asarray(np.random.default_rng(0).integers(3, 4096, size=(1, t)), jnp.int32)
  dense_logits = forward(config, params, x, dense_impl="xla").logits
  for impl in ("cudnn", "xla"):
    for backend in ("pallas", "xla"):
      _run = forward(config, params, x, attention=sj.StreamConfig(), output="exact", dense_impl=impl,
                             backend=backend)
      exact, trace = _run.logits, _run.trace
      rel = float(jnp.abs(exact - dense_logits).max() / jnp.abs(dense_logits).max())
      print(f"exact (dense_impl={impl}, backend={backend}) vs dense logits: max rel diff {rel:.2e}; "
            f"coverage {float(trace.coverage()):.4f}, kept {float(trace.kept_fraction()):.4f}")


if __name__ == "__main__":
  import sys  # pylint: disable=import-outside-toplevel
  print(jax.devices()[0].device_kind, jax.__version__)
  names = sys.argv[1:] or ["cudnn_lse", "pallas_f32", "second_mass_pass", "exact_forward", "mgpu_attention",
                           "mgpu_estimate", "mgpu_estimate_wide", "mgpu_estimate_shared", "mass", "ideal", "mgpu_ideal",
                           "mgpu_table"]
  known = sorted(k[len("check_"):] for k in globals() if k.startswith("check_"))
  unknown = [name for name in names if name not in known]
  if unknown:
    sys.exit(f"unknown check(s) {unknown}; known: {known}")
  for name in names:
    globals()[f"check_{name}"]()
