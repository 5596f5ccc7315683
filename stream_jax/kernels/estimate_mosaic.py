"""Pallas Mosaic GPU (Hopper: TMA + wgmma) kernel of hierarchical top-k mask estimation: the port of the
Triton kernel in estimate.py (same contract, the same masks row for row), which `backend="pallas"` runs on
Hopper GPUs: 1.28-1.41x the Triton kernel's speed (H100, head dims 128 and 256, 8k-128k tokens;
benchmarks/RESULTS.md, "Pallas backends").

One CTA (one warpgroup) per (batch, query block, head), query blocks of a head side by side (they read the
same kv head's blocks, which then stay in L2). The node lists of the search live in shared memory (start,
size, score: 64 slots). A round splits each kept node into its two halves, then scores the 2 x top_k
children: each child's representative key block comes in by TMA through a 2-deep ring, one [64, H] x
[H, 64] wgmma gives its logits, and the row maxima of the visible ones go into column c of a [64 rows,
64 children] array, so one column reduction scores every child of the round. Top-k needs no sort: a
child's rank is the number of children that beat it (higher score, or equal and earlier: `lax.top_k`'s
tie rule), a [64, 64] comparison; the kept ones are compacted in position order by prefix counts, as in
the Triton kernel. Node lists move between threads only through shared memory, each read separated from
the next write by a warpgroup barrier (`commit_smem`).

Limits (`unsupported`): float16 / bfloat16, 64 x 64 blocks, query_stride 1, score "max", representative
"center", top_k <= 32, branches <= 64, head dim a multiple of 64 up to 256.
"""

from __future__ import annotations

import functools
from typing import Optional, TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax

from stream_jax import numerics
from stream_jax.config import StreamConfig
from stream_jax.kernels import common, mosaic_common
from stream_jax.mask import BlockMask, num_blocks
from stream_jax.numerics import num_rounds

if TYPE_CHECKING:
  from stream_jax.kernels.implementations import Call

BLOCK = 64
SLOTS = 64  # node slots in shared memory: 2 x top_k children, or the first level's branches
DEFAULT_STAGES = 2  # key-block ring depth: 3 was within 2% at head dim 128, 4 slower; both 1.2-1.4x slower
# at 256 (one CTA per SM instead of two)


def unsupported(call: Call) -> Optional[str]:
  """Why this kernel cannot take a call (kernels.implementations.Call), or None. Where it can, "pallas" and
  "auto" prefer it to Triton on Hopper."""
  h, config = call.head_dim, call.config
  if call.dtype not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
    return f"the Mosaic GPU estimate kernel takes float16 / bfloat16 inputs, got {call.dtype.name}"
  if (config.block_q, config.block_k, config.query_stride) != (BLOCK, BLOCK, 1):
    return "the Mosaic GPU estimate kernel needs 64 x 64 blocks and query_stride 1"
  if config.score != "max" or config.representative != "center":  # (a coverage budget implies "mass")
    return "the Mosaic GPU estimate kernel scores by max logit with center representatives and a fixed top_k"
  if 2 * config.top_k > SLOTS or config.branches > SLOTS:
    return f"the Mosaic GPU estimate kernel needs top_k <= {SLOTS // 2} and branches <= {SLOTS}"
  if h % 64 or not 64 <= h <= 256:
    return f"the Mosaic GPU estimate kernel needs a head dim in 64, 128, 192, 256, got {h}"
  return None


def estimate_mask(q: jax.Array, k: jax.Array, config: StreamConfig, *, scale: Optional[float] = None,
                  softcap: Optional[float] = None, stages: Optional[int] = None) -> BlockMask:
  """The Mosaic GPU peer of `kernels.estimate_triton.estimate_mask` (same arguments and outputs; GPU only, no
  interpret mode: its tests lower it for CUDA on the CPU and run it on the device, gpu_checks.py). Checks
  nothing beyond `unsupported`, which the caller asks first."""
  t, s, h = q.shape[-3], k.shape[-3], q.shape[-1]
  indices, counts = _estimate(q, k, config=config, scale=numerics.resolve_scale(scale, h),
                              softcap=None if softcap is None else float(softcap),
                              stages=DEFAULT_STAGES if stages is None else int(stages))
  return BlockMask(indices, counts, config.block_q, config.block_k, t, s, config)


@functools.partial(jax.jit, static_argnames=("config", "scale", "softcap", "stages"))
def _estimate(q, k, *, config: StreamConfig, scale, softcap, stages):
  import jax.experimental.pallas as pl  # noqa: PLC0415  (GPU-only module: imported where it runs)
  import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415

  (q, k), batched = common.as_batched(q, k)
  b, t, n, h = q.shape
  s, kv = k.shape[1], k.shape[2]
  g = n // kv
  n_q, n_k = num_blocks(t, BLOCK), num_blocks(s, BLOCK)
  q = common.pad_axis(q, 1, n_q * BLOCK)
  k = common.pad_axis(k, 1, n_k * BLOCK)
  top_k, branches, sink, wb = config.top_k, config.branches, config.sink_blocks, config.window_blocks
  cap = config.capacity
  out_len = mosaic_common.tma_length(cap + 1)  # block ids, then the count last
  rounds = num_rounds(n_k, branches)
  offset = s - t
  dtype = q.dtype
  # Searched blocks end below diag - window_blocks + 1. With queries on key-block boundaries (offset a
  # multiple of 64), or a window of >= 2 blocks, those keys precede every query of the block: no causal mask
  # per child (it was half the per-child work at head dim 128). Padded query rows are masked once a round.
  causal_free = offset % BLOCK == 0 or wb >= 2

  def kernel(q_ref, k_ref, o_ref, scratch):
    q_smem, k_smem, start_s, size_s, score_s, keep_s, slot_s, out_s, q_bar, k_bars = scratch
    hq, bb, i = lax.axis_index("heads"), lax.axis_index("batch"), lax.axis_index("qblk")
    kvh = lax.div(hq, jnp.int32(g))
    plgpu.copy_gmem_to_smem(q_ref.at[bb, pl.ds(i * BLOCK, BLOCK), hq], q_smem, q_bar.at[0])

    wg = plgpu.Layout.WGMMA
    row_l, col_l = wg.reduce(1), wg.reduce(0)  # a vector over the rows / over the columns of a tile

    # Vectors are made where they are used: a value with a layout and no use leaves layout inference
    # nothing to solve for (it fails on a kernel whose search is statically empty).
    def tile_iota(dim):
      return plgpu.broadcasted_iota(jnp.int32, (BLOCK, SLOTS), dim, layout=wg)

    def slot_iota():
      return plgpu.broadcasted_iota(jnp.int32, (SLOTS,), 0, layout=col_l)

    def column(ref):
      """A node list as a [64, SLOTS] tile, x[r, c] = ref[c] (a transposing load: not bank-conflict free)."""
      return lax.broadcast_in_dim(plgpu.load(ref, (), layout=col_l, optimized=False), (BLOCK, SLOTS), [1])

    def pick(ref, hit, zero):
      """Row r gets ref[c] for the one c with hit[r, c] (zero where none): a gather by one-hot sums."""
      return jnp.where(hit, column(ref), zero).sum(axis=1)

    last_pos = jnp.minimum((i + 1) * BLOCK, t) - 1 + offset
    diag = lax.div(last_pos, jnp.int32(BLOCK))
    lo = jnp.int32(sink)
    hi = diag - wb + 1  # exclusive end of the search range
    span = jnp.maximum(hi - lo, 0)

    def representative(c):
      blk = start_s[c] + lax.div(jnp.maximum(size_s[c] - 1, 0), jnp.int32(2))
      return jnp.clip(blk, 0, n_k - 1)

    def fetch(c, slot):
      plgpu.copy_gmem_to_smem(k_ref.at[bb, pl.ds(representative(c) * BLOCK, BLOCK), kvh], k_smem.at[slot],
                              k_bars.at[slot])

    def score_nodes(m):
      """score_s[c] = max visible scaled (soft-capped) logit of the query block against node c's
      representative key block, for c < m (-inf for empty nodes and c >= m)."""
      for c0 in range(stages):
        pl.when(c0 < m)(functools.partial(fetch, c0, c0))
      cols = tile_iota(1)
      if not causal_free:
        q_pos = i * BLOCK + tile_iota(0) + offset

      def body(c, best):
        slot = lax.rem(c, jnp.int32(stages))
        blk = representative(c)
        plgpu.barrier_wait(k_bars.at[slot])

        x = mosaic_common.qk_logits(q_smem, k_smem.at[slot])
        pl.when(c + stages < m)(functools.partial(fetch, c + stages, slot))  # logits read: slot free
        if causal_free:
          row_max = x.max(axis=1)
        else:
          row_max = jnp.where(blk * BLOCK + cols <= q_pos, x, -jnp.inf).max(axis=1)  # SLOTS == BLOCK
        return jnp.where(cols == c, lax.broadcast_in_dim(row_max, best.shape, [0]), best)

      best = lax.fori_loop(0, m, body, plgpu.layout_cast(jnp.full((BLOCK, SLOTS), -jnp.inf, jnp.float32), wg))
      if t % BLOCK:  # the last block's padded (zero) query rows must not score
        best = jnp.where(i * BLOCK + tile_iota(0) < t, best, -jnp.inf)
      best = best.max(axis=0) * scale  # scale > 0: the max commutes with it, and with the soft-cap
      if softcap is not None:
        best = jnp.tanh(best * (1.0 / softcap)) * softcap
      size = plgpu.load(size_s, (), layout=col_l, optimized=False)
      score_s[...] = jnp.where((size > 0) & (slot_iota() < m), best, -jnp.inf)
      plgpu.commit_smem()

    def keep_top():
      """Keep the top_k nodes of the SLOTS in score_s (ties -> earlier slot), compacted in slot order into
      slots 0..top_k-1 of start_s / size_s / score_s."""
      rows, cols = tile_iota(0), tile_iota(1)
      mine = lax.broadcast_in_dim(plgpu.load(score_s, (), layout=row_l), (SLOTS, SLOTS), [0])
      beats = (column(score_s) > mine) | ((column(score_s) == mine) & (cols < rows))
      keep = jnp.where(jnp.where(beats, 1, 0).sum(axis=1) < top_k, 1, 0)
      keep_s[...] = keep
      plgpu.commit_smem()
      before = jnp.where((column(keep_s) == 1) & (cols < rows), 1, 0).sum(axis=1)
      slot_s[...] = jnp.where(keep == 1, before, -1)
      plgpu.commit_smem()
      hit = column(slot_s) == rows
      new = (pick(start_s, hit, 0), pick(size_s, hit, 0), pick(score_s, hit, 0.0))
      plgpu.commit_smem()  # every thread has read the old lists before any is overwritten
      start_s[...], size_s[...], score_s[...] = new
      plgpu.commit_smem()

    def split():
      """Children 2p and 2p + 1 of each node p < top_k: its two halves, the left one taking the odd block.
      A vector step (a scalar loop in place would race: warps run apart, and one's child could overwrite
      a parent another has not read yet)."""
      d = tile_iota(0) - 2 * tile_iota(1)  # child r of parent c: d = 0 left, 1 right
      hit = (d == 0) | (d == 1)
      start, size = pick(start_s, hit, 0), pick(size_s, hit, 0)
      right = jnp.where(hit & (d == 1), 1, 0).sum(axis=1) == 1
      left = lax.div(size + 1, jnp.int32(2))
      plgpu.commit_smem()  # every thread has read the parents before any child overwrites them
      start_s[...] = jnp.where(right, start + left, start)
      size_s[...] = jnp.where(right, size - left, left)
      plgpu.commit_smem()

    # First level: `branches` near-equal contiguous nodes over the search range.
    def first_level(j, _):
      start = lo + lax.div(j * span, jnp.int32(branches))
      end = lo + lax.div((j + 1) * span, jnp.int32(branches))
      start_s[j] = start
      size_s[j] = jnp.where(j < branches, end - start, 0)

    lax.fori_loop(0, SLOTS, first_level, None)
    plgpu.commit_smem()
    plgpu.barrier_wait(q_bar.at[0])
    search = span > top_k  # else the whole range is kept (early query blocks are dense)

    if branches > top_k:
      @pl.when(search)
      def _():
        score_nodes(branches)
        keep_top()

    def round_body(_, carry):
      sizes = plgpu.load(size_s, (), layout=col_l, optimized=False)
      widest = jnp.where(slot_iota() < top_k, sizes, 0).max()

      @pl.when(search & (widest > 1))  # single-block nodes: later rounds change nothing
      def _():
        split()
        score_nodes(2 * top_k)
        keep_top()
      return carry

    lax.fori_loop(0, rounds, round_body, None)

    # The sorted union {sink} + {searched} + {window}: three ascending disjoint runs.
    def emit(e, count):
      in_sink = e < sink
      in_search = (e >= sink) & (e < sink + top_k)
      j = jnp.clip(e - sink, 0, top_k - 1)
      s_val = jnp.where(search, start_s[j], lo + j)
      s_ok = jnp.where(search, size_s[j] > 0, lo + j < hi)
      w_val = diag - wb + 1 + (e - sink - top_k)
      val = jnp.where(in_sink, e, jnp.where(in_search, s_val, w_val))
      ok = jnp.where(in_sink, e <= diag, jnp.where(in_search, s_ok, (w_val >= 0) & (w_val >= sink)))

      @pl.when(ok)
      def _():
        out_s[count] = val

      return count + jnp.where(ok, 1, 0)

    count = lax.fori_loop(0, cap, emit, jnp.int32(0))

    def pad(e, _):
      out_s[e] = jnp.int32(-1)

    lax.fori_loop(count, out_len - 1, pad, None)
    out_s[out_len - 1] = count
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_s, o_ref.at[bb, hq, i])
    plgpu.wait_smem_to_gmem(0)

  def entry(q_ref, k_ref, o_ref):
    pl.run_scoped(
        lambda *scratch: kernel(q_ref, k_ref, o_ref, scratch),
        mosaic_common.tiled_smem((BLOCK, h), dtype), mosaic_common.tiled_smem((stages, BLOCK, h), dtype),
        plgpu.SMEM((SLOTS,), jnp.int32), plgpu.SMEM((SLOTS,), jnp.int32), plgpu.SMEM((SLOTS,), jnp.float32),
        plgpu.SMEM((SLOTS,), jnp.int32), plgpu.SMEM((SLOTS,), jnp.int32), plgpu.SMEM((out_len,), jnp.int32),
        plgpu.Barrier(num_barriers=1), plgpu.Barrier(num_barriers=stages))

  out = plgpu.kernel(
      entry, out_type=jax.ShapeDtypeStruct((b, n, n_q, out_len), jnp.int32),
      grid=(n, b, n_q), grid_names=("heads", "batch", "qblk"),
      compiler_params=plgpu.CompilerParams(approx_math=False))(q, k)
  indices, counts = out[..., :cap], out[..., out_len - 1]
  if not batched:
    indices, counts = indices[0], counts[0]
  return indices, counts
