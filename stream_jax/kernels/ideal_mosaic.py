"""Pallas Mosaic GPU (Hopper: TMA + wgmma) kernel of the true block mass rows of the ideal kept set: the port
of the Triton kernel in ideal_triton.py (same contract: `mass_rows`), which "pallas" and "auto" prefer on
Hopper (16, 32 and 64-token blocks), so the ideal trace does not depend on the Triton backend that Pallas
deprecates.

One CTA per (head, batch, pair of query blocks), three warpgroups: a producer streams the key blocks 0 ..
the pair's diagonal by TMA through a ring of `stages` buffers, and two consumers, one per query block, each
copy their 64 queries and lse into shared memory and take every key block from the same buffer (a key block
is read from HBM / L2 once per pair, and one consumer's exponentials overlap the other's product). A consumer
does one [64, H] x [H, 64] wgmma per block, p = exp(logit - lse) in registers, and puts the block's per-row
sums into column c % 64 of a [64, 64] register tile; the producer refills a buffer once both consumers have
read it. Every 64 key blocks one column reduction turns the tile into 64 block masses, stored as one row of
a shared-memory window of segments, which TMA copies out when it is full (or the row ends). Blocks wholly
below every row's causal edge (and no window) skip the mask. The logits never leave registers; HBM holds
only the chunk's [B, N, chunk, nK] rows, as with the Triton kernel.

Entries past a row's diagonal are left as the window held them; `mass_rows` zeroes them (one XLA select).

Blocks of 32 or 16 tokens keep the 64 x 64 tiles: a consumer's 64 queries are g = 64 / block query blocks and
each key tile g key blocks, so a tile's masses go out as g masked row sums (one column each) and a segment's
as g masked column sums (one row of masses per query block). Those lower with Lane semantics (the layouts are
set by hand; jax 0.11's layout search is what failed on the wide estimate kernel), 64-token blocks as before.

Limits (`unsupported`): float16 / bfloat16, 16 x 16, 32 x 32 or 64 x 64 blocks, head dims multiples of 64 up to
256, no key_mask.
"""

from __future__ import annotations

import functools
from typing import Optional, TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax

from stream_jax.kernels import common, mosaic_common
from stream_jax.mask import diagonal_blocks, num_blocks

if TYPE_CHECKING:
  from stream_jax.kernels.implementations import Call

BLOCK = 64  # query rows per consumer warpgroup (one wgmma tile) and keys per block
SEGMENT = mosaic_common.SEGMENT  # key blocks per column reduction (the register tile's columns)
WINDOW = 64  # segments per shared-memory window (16 KiB per compute warpgroup), copied out by TMA when full
DEFAULT_STAGES = 2  # key ring depth
PAIR = 2  # query tiles per CTA: one compute warpgroup each, sharing every key tile's load
BLOCKS = mosaic_common.BLOCKS  # query / key block sizes: 64 / block blocks per tile
LOG2E = 1.4426950408889634


def unsupported(call: Call) -> Optional[str]:
  """Why this kernel cannot take a call (kernels.implementations.Call), or None. Where it can, "pallas" and
  "auto" prefer it to Triton on Hopper."""
  reason = mosaic_common.limits(call, "block-mass")
  if reason:
    return reason
  if call.key_mask:
    return "the Pallas block-mass kernels take no key_mask (interventions run on the XLA path)"
  return None


def mass_rows(q: jax.Array, k: jax.Array, lse: jax.Array, first_block, *, n_rows: int, q_len: int, k_len: int,
              scale: float, softcap: Optional[float], window: Optional[int], block: int = BLOCK,
              stages: Optional[int] = None, segments_per_copy: int = WINDOW) -> jax.Array:
  """float32 [B, N, n_rows, nK]: the true mass rows of query blocks first_block .. first_block + n_rows - 1,
  the contract of `ideal_triton.mass_rows` with block x block blocks (GPU only, no interpret mode: its tests
  lower it for CUDA on the CPU and run it on the device, benchmarks/gpu_checks.py). Below 64 tokens
  `first_block` must be a multiple of 64 / block (the kernel's query tiles start on 64-token rows). Entries
  past each row's diagonal, and rows past the last query block, are zeros. `segments_per_copy`: the
  shared-memory window (a launch setting; the GPU checks make it small to cross windows on a short input)."""
  t, s = q_len, k_len
  if block not in BLOCKS:
    raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
  groups = BLOCK // block
  if isinstance(first_block, int) and first_block % groups:  # a traced start is the caller's (ideal.py's) promise
    raise ValueError(f"first_block must be a multiple of {groups} with {block}-token blocks, got {first_block}")
  first_tile = jnp.asarray(first_block, jnp.int32)
  if groups > 1:
    first_tile = first_tile // groups
  rows = _rows(q, k, lse, first_tile, n_rows=n_rows, groups=groups,
               scale=float(scale), softcap=None if softcap is None else float(softcap),
               window=None if window is None else int(window),
               stages=DEFAULT_STAGES if stages is None else int(stages), per_copy=int(segments_per_copy))
  n_q, n_k = num_blocks(t, block), num_blocks(s, block)
  rows = rows[..., :n_k]
  j = first_block + jnp.arange(n_rows, dtype=jnp.int32)
  diag = jnp.where(j < n_q, diagonal_blocks(t, s, block, block)[jnp.clip(j, 0, n_q - 1)], -1)
  keep = jnp.arange(n_k, dtype=jnp.int32)[None, :] <= diag[:, None]  # [n_rows, nK]
  return jnp.where(keep, rows, 0.0)


@functools.partial(jax.jit, static_argnames=("n_rows", "groups", "scale", "softcap", "window", "stages", "per_copy"))
def _rows(q, k, lse, first_tile, *, n_rows, groups, scale, softcap, window, stages, per_copy):
  import jax.experimental.pallas as pl  # noqa: PLC0415  (GPU-only module: imported where it runs)
  import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415

  b, t, n, h = q.shape
  s, kv = k.shape[1], k.shape[2]
  g = n // kv
  f = groups  # query blocks per query tile, key blocks per key tile
  n_k = num_blocks(s, BLOCK)  # key tiles
  n_seg = -(-n_k * f // SEGMENT)
  per_window = min(n_seg, max(per_copy // f, 1))
  n_seg = -(-n_seg // per_window) * per_window  # whole windows
  pairs = -(-n_rows // (PAIR * f))
  rows = pairs * PAIR * BLOCK
  start = first_tile * BLOCK
  n_q = num_blocks(t, BLOCK)
  # The kernel reads its query blocks from the whole q at the chunk's offset (a slice of a padded q would be
  # a copy of q, 4 GiB at 1M tokens); only a ragged T pads its last block. The chunk's lse (-inf past T:
  # those rows add nothing) and the keys in whole blocks.
  q = common.pad_axis(q, 1, n_q * BLOCK)
  lse_pad = jnp.pad(lse.astype(jnp.float32), ((0, 0), (0, 0), (0, rows)), constant_values=-jnp.inf)
  lse_c = lax.dynamic_slice_in_dim(lse_pad, start, rows, 2)
  k = common.pad_axis(k, 1, n_k * BLOCK)
  meta = jnp.full((mosaic_common.TMA_INT32,), first_tile, jnp.int32)
  offset = s - t
  dtype = q.dtype

  def kernel(q_ref, k_ref, lse_ref, meta_ref, o_ref, scratch):
    q_smem, k_smem, lse_smem, meta_smem, out_smem, bars, k_bars, k_free, turns = scratch
    hq, bb, pair = lax.axis_index("heads"), lax.axis_index("batch"), lax.axis_index("pair")
    wg = lax.axis_index("wg")
    kvh = lax.div(hq, jnp.int32(g))
    plgpu.copy_gmem_to_smem(meta_ref, meta_smem.at[wg], bars.at[wg])
    plgpu.barrier_wait(bars.at[wg])
    j0 = meta_smem[wg, 0] + pair * PAIR  # the pair's first query tile (past the last one: walks no key)
    # Both compute warpgroups walk the keys the pair's later block sees: the earlier block's extra diagonal
    # block is causally invisible to it (masses 0), and one walk keeps the shared ring in step.
    last_pos = jnp.minimum((j0 + PAIR) * BLOCK, t) - 1 + offset
    count = jnp.where(j0 * BLOCK < t, lax.div(last_pos, jnp.int32(BLOCK)) + 1, 0)  # key blocks 0 .. diagonal

    def fetch(c, slot):
      plgpu.copy_gmem_to_smem(k_ref.at[bb, pl.ds(c * BLOCK, BLOCK), kvh], k_smem.at[slot], k_bars.at[slot])

    @pl.when(wg == PAIR)
    def _memory():  # the producer: block c + stages refills block c's buffer once both consumers read it
      plgpu.set_max_registers(40, action="decrease")
      for c0 in range(stages):
        pl.when(c0 < count)(functools.partial(fetch, c0, c0))

      @pl.loop(0, jnp.maximum(count - stages, 0))
      def _(c):
        slot = lax.rem(c, jnp.int32(stages))
        plgpu.barrier_wait(k_free.at[slot])
        fetch(c + stages, slot)

    @pl.when(wg < PAIR)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      j = j0 + wg
      r = pair * PAIR + wg  # this tile's row of the chunk (its f query blocks' rows r f .. r f + f - 1)
      plgpu.copy_gmem_to_smem(lse_ref.at[bb, hq, pl.ds(r * BLOCK, BLOCK)], lse_smem.at[wg], bars.at[PAIR + 1 + wg])
      read = jnp.minimum(j, n_q - 1) * BLOCK
      plgpu.copy_gmem_to_smem(q_ref.at[bb, pl.ds(read, BLOCK), hq], q_smem.at[wg], bars.at[2 * PAIR + 1 + wg])
      first_pos = j * BLOCK + offset
      # Blocks every row sees whole need no mask (none with a window: it is masked throughout).
      free = jnp.int32(0) if window is not None else jnp.clip(lax.div(first_pos + 1, jnp.int32(BLOCK)), 0, count)

      wgl = plgpu.Layout.WGMMA
      rows_i = plgpu.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 0, layout=wgl)
      cols_i = plgpu.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 1, layout=wgl)
      q_pos = j * BLOCK + rows_i + offset
      plgpu.barrier_wait(bars.at[PAIR + 1 + wg])
      plgpu.barrier_wait(bars.at[2 * PAIR + 1 + wg])
      lse_v = plgpu.load(lse_smem.at[wg], (), layout=wgl.reduce(1))
      # A row that sees nothing (lse -inf, padding) gets a +inf normaliser: exp gives it 0 everywhere.
      norm2 = lax.broadcast_in_dim(jnp.where(lse_v > -jnp.inf, lse_v * LOG2E, jnp.inf), (BLOCK, BLOCK), [0])
      out_w = out_smem.at[wg]

      def store_segment(u, seg):
        # Pallas lowers the column sum (a reduction across warps) through one shared-memory scratch per CTA:
        # the consumers take turns, segment by segment (both store the same segments: they walk one count).
        pl.when(wg == 1)(lambda: plgpu.barrier_wait(turns.at[0]))
        pl.when((wg == 0) & (seg > 0))(lambda: plgpu.barrier_wait(turns.at[1]))
        if f == 1:
          col_sums = u.sum(axis=0)
        else:  # one row of masses per query block: its rows' column sums
          group = lax.div(rows_i, jnp.int32(BLOCK // f))
          col_sums = [jnp.where(group == i, u, 0.0).sum(axis=0) for i in range(f)]
        plgpu.barrier_arrive(turns.at[wg])
        if f == 1:
          out_w[lax.rem(seg, jnp.int32(per_window))] = col_sums
        else:
          for i in range(f):
            out_w[i, lax.rem(seg, jnp.int32(per_window))] = col_sums[i]

      if f == 1:
        dst = lambda w: o_ref.at[bb, hq, r, pl.ds(w * per_window, per_window)]  # noqa: E731
      else:
        dst = lambda w: o_ref.at[bb, hq, pl.ds(r * f, f), pl.ds(w * per_window, per_window)]  # noqa: E731
      segments = mosaic_common.MassSegments(cols_i, per_window=per_window, store=store_segment, out_smem=out_w,
                                            dst=dst, groups=f)

      def body(c, u, masked):
        slot = lax.rem(c, jnp.int32(stages))
        plgpu.barrier_wait(k_bars.at[slot])
        x = mosaic_common.qk_logits(q_smem.at[wg], k_smem.at[slot])
        plgpu.barrier_arrive(k_free.at[slot])  # logits read: the producer may refill the buffer
        x2 = mosaic_common.to_base2(x, scale=scale, softcap=softcap, log2e=LOG2E)
        p = jnp.exp2(jnp.minimum(x2 - norm2, 0.0))
        if masked:
          k_pos = c * BLOCK + cols_i
          visible = k_pos <= q_pos
          if window is not None:
            visible = visible & (q_pos - k_pos < window)
          p = jnp.where(visible, p, 0.0)
        return segments.add(u, c, p)

      segments.walk(body, free, count)

  def entry(q_ref, k_ref, lse_ref, meta_ref, o_ref):
    pl.run_scoped(
        lambda *scratch: kernel(q_ref, k_ref, lse_ref, meta_ref, o_ref, scratch),
        mosaic_common.tiled_smem((PAIR, BLOCK, h), dtype), mosaic_common.tiled_smem((stages, BLOCK, h), dtype),
        plgpu.SMEM((PAIR, BLOCK), jnp.float32), plgpu.SMEM((PAIR + 1, mosaic_common.TMA_INT32), jnp.int32),
        plgpu.SMEM((PAIR, per_window, SEGMENT) if f == 1 else (PAIR, f, per_window, SEGMENT), jnp.float32),
        plgpu.Barrier(num_barriers=3 * PAIR + 1), plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=PAIR, num_barriers=stages), plgpu.Barrier(num_barriers=PAIR),
        collective_axes="wg")

  out = plgpu.kernel(
      entry, out_type=jax.ShapeDtypeStruct((b, n, pairs * PAIR * f, n_seg, SEGMENT), jnp.float32),
      grid=(n, b, pairs), grid_names=("heads", "batch", "pair"), num_threads=PAIR + 1, thread_name="wg",
      compiler_params=mosaic_common.compiler_params(approx_math=True, lane=f > 1))(q, k, lse_c, meta)
  return out.reshape(b, n, pairs * PAIR * f, n_seg * SEGMENT)[:, :, :n_rows, :n_k * f]
