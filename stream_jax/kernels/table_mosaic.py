"""Pallas Mosaic GPU (Hopper: TMA + wgmma) kernel of the block-score table (stream_jax/table.py): for the
sampled queries of a chunk of query blocks, each one's log-sum-exp over its visible keys and then every
causal key block's true mass, summed per query block. "pallas" and "auto" run StreamConfig.select="table"
through it on Hopper.

One CTA (one warpgroup) per (head, batch, tile of 64 sampled queries: block_q / query_stride from each of
query_stride consecutive query blocks). It walks the key blocks 0 .. the tile's last diagonal twice
through a ring of `stages` key buffers, one [64, H] x [H, 64] wgmma per block: first an online max / sum
in registers gives each query's lse, then p = exp(logit - lse) per block, whose per-row sums go into
column c % 64 of a [64, 64] register tile. Every 64 key blocks, one masked column reduction per query block
of the tile turns the tile into that block's 64 masses, stored in a shared-memory window that TMA copies
out when full (or the row ends). The logits never leave registers; HBM holds the chunk's [B, N, chunk, nK]
rows, as with the ideal set's kernel (ideal_mosaic.py), whose walk this one shares.

Blocks of 32 or 16 tokens keep the 64-key tiles: each holds 64 / b key blocks, whose masses go into the
segment tile as 64 / b masked row sums (ideal_mosaic's way, through `MassSegments`); a tile of 64 sampled
queries then spans 64 / (b / query_stride) query blocks. Those lower with Lane semantics.

Limits (`unsupported`): float16 / bfloat16, 16 x 16, 32 x 32 or 64 x 64 blocks, query_stride >= 2 dividing
the block (a tile spans whole query blocks), head dims multiples of 64 up to 256.
"""

from __future__ import annotations

import functools
from typing import Optional, TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax

from stream_jax.kernels import mosaic_common
from stream_jax.mask import diagonal_blocks, num_blocks

if TYPE_CHECKING:
  from stream_jax.kernels.implementations import Call

BLOCK = 64  # sampled queries per CTA (one wgmma tile) and keys per tile (64 / block key blocks)
SEGMENT = mosaic_common.SEGMENT  # key blocks per column reduction (the register tile's columns)
WINDOW_FLOATS = 16384  # masses per shared-memory window (64 KiB), copied out by TMA when full
DEFAULT_STAGES = 2  # key ring depth
LOG2E = 1.4426950408889634


def unsupported(call: Call) -> Optional[str]:
  """Why this kernel cannot take a call (kernels.implementations.Call), or None."""
  config = call.config
  reason = mosaic_common.limits(call, "table")
  if reason:
    return reason
  if config.query_stride < 2 or call.block_q % config.query_stride:
    return ("the Mosaic GPU table kernel needs query_stride >= 2 dividing block_q (its 64-query tile spans whole "
            f"query blocks), got {config.query_stride}")
  return None


def mass_rows(q_rows: jax.Array, k: jax.Array, pos: jax.Array, first_block, *, stride: int, q_len: int,
              scale: float, softcap: Optional[float], block: int = BLOCK, stages: Optional[int] = None,
              window_floats: int = WINDOW_FLOATS) -> jax.Array:
  """float32 [B, N, n_rows, nK]: the sampled true mass rows of query blocks first_block .. + n_rows - 1
  (blocks of `block` tokens, queries and keys).

  q_rows [B, n_rows x block / stride, N, H]: the chunk's sampled queries (`table.sampled_rows` order), a
  whole number of 64-query tiles; pos int32 [n_rows x block / stride]: their positions among the S keys (-1:
  no query); k [B, S, K, H]. Entries
  past each row's diagonal, and rows past the last query block, are zeros. GPU only (no interpret mode:
  its tests lower it for CUDA on the CPU and run it on the device, benchmarks/gpu_checks.py).
  `window_floats`: the shared-memory window (a launch setting; the GPU checks make it small)."""
  r = block // stride
  n_rows = pos.shape[0] // r
  s = k.shape[1]
  rows = _rows(q_rows, k, pos.astype(jnp.int32), stride=int(stride), block=int(block), scale=float(scale),
               softcap=None if softcap is None else float(softcap),
               stages=DEFAULT_STAGES if stages is None else int(stages), window_floats=int(window_floats))
  n_q, n_k = num_blocks(q_len, block), num_blocks(s, block)
  rows = rows[..., :n_k]
  j = first_block + jnp.arange(n_rows, dtype=jnp.int32)
  diag = jnp.where(j < n_q, diagonal_blocks(q_len, s, block, block)[jnp.clip(j, 0, n_q - 1)], -1)
  keep = jnp.arange(n_k, dtype=jnp.int32)[None, :] <= diag[:, None]  # [n_rows, nK]
  return jnp.where(keep, rows, 0.0)


@functools.partial(jax.jit, static_argnames=("stride", "block", "scale", "softcap", "stages", "window_floats"))
def _rows(q_rows, k, pos, *, stride, block, scale, softcap, stages, window_floats):
  import jax.experimental.pallas as pl  # noqa: PLC0415  (GPU-only module: imported where it runs)
  import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415

  b, rows, n, h = q_rows.shape
  s, kv = k.shape[1], k.shape[2]
  g = n // kv
  f = BLOCK // block  # key blocks per 64-key tile
  r = block // stride  # sampled queries per query block
  per_tile = BLOCK // r  # query blocks per tile
  n_tiles = rows // BLOCK
  n_k = num_blocks(s, BLOCK)  # 64-key tiles
  n_seg = -(-n_k * f // SEGMENT)
  per_window = max(1, min(n_seg, window_floats // (per_tile * SEGMENT)))
  n_seg = -(-n_seg // per_window) * per_window  # whole windows
  k = jnp.pad(k, ((0, 0), (0, n_k * BLOCK - s), (0, 0), (0, 0)))
  # Per tile: key blocks to walk (to the last query's diagonal) and those every sampled query sees whole.
  tile_pos = pos.reshape(n_tiles, BLOCK)
  last = tile_pos.max(-1)
  first = jnp.where(tile_pos >= 0, tile_pos, jnp.iinfo(jnp.int32).max).min(-1)
  count = jnp.where(last >= 0, last // BLOCK + 1, 0)
  free = jnp.where(last >= 0, jnp.clip((first + 1) // BLOCK, 0, count), 0)
  meta = jnp.zeros((n_tiles, mosaic_common.TMA_INT32), jnp.int32).at[:, 0].set(count).at[:, 1].set(free)
  dtype = q_rows.dtype

  def kernel(q_ref, k_ref, pos_ref, meta_ref, o_ref, scratch):
    q_smem, k_smem, pos_smem, meta_smem, out_smem, bars, k_bars = scratch
    hq, bb, i = lax.axis_index("heads"), lax.axis_index("batch"), lax.axis_index("tile")
    kvh = lax.div(hq, jnp.int32(g))
    plgpu.copy_gmem_to_smem(meta_ref.at[i], meta_smem, bars.at[0])
    plgpu.copy_gmem_to_smem(q_ref.at[bb, pl.ds(i * BLOCK, BLOCK), hq], q_smem, bars.at[1])
    plgpu.copy_gmem_to_smem(pos_ref.at[pl.ds(i * BLOCK, BLOCK)], pos_smem, bars.at[2])
    plgpu.barrier_wait(bars.at[0])
    count, free = meta_smem[0], meta_smem[1]

    def fetch(c, slot):
      plgpu.copy_gmem_to_smem(k_ref.at[bb, pl.ds(c * BLOCK, BLOCK), kvh], k_smem.at[slot], k_bars.at[slot])

    def prime():
      for c0 in range(stages):
        pl.when(c0 < count)(functools.partial(fetch, c0, c0))

    prime()
    wg = plgpu.Layout.WGMMA
    row_l = wg.reduce(1)
    rows_i = plgpu.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 0, layout=wg)
    cols_i = plgpu.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 1, layout=wg)
    plgpu.barrier_wait(bars.at[1])
    plgpu.barrier_wait(bars.at[2])
    pos_v = plgpu.load(pos_smem, (), layout=row_l)
    q_pos = lax.broadcast_in_dim(pos_v, (BLOCK, BLOCK), [0])

    def logits2(c, masked):  # base-2 logits of block c (and, when masked, what each query sees)
      x2 = mosaic_common.base2_logits(c, q_smem=q_smem, k_smem=k_smem, k_bars=k_bars, stages=stages,
                                      count=count, fetch=fetch, scale=scale, softcap=softcap, log2e=LOG2E)
      if not masked:
        return x2, None
      return x2, (c * BLOCK + cols_i) <= q_pos

    def lse_body(c, carry, masked):
      m_i, l_i = carry
      x2, visible = logits2(c, masked)
      if masked:
        x2 = jnp.where(visible, x2, -jnp.inf)
      m_new = jnp.maximum(m_i, x2.max(axis=1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that saw nothing yet
      p = jnp.exp2(x2 - lax.broadcast_in_dim(m_safe, x2.shape, [0]))
      return m_new, l_i * jnp.exp2(m_i - m_safe) + p.sum(axis=1)

    init = (plgpu.layout_cast(jnp.full((BLOCK,), -jnp.inf, jnp.float32), row_l),
            plgpu.layout_cast(jnp.zeros((BLOCK,), jnp.float32), row_l))
    carry = lax.fori_loop(0, free, functools.partial(lse_body, masked=False), init)
    m_i, l_i = lax.fori_loop(free, count, functools.partial(lse_body, masked=True), carry)
    # A query that sees nothing, or none (pos -1), gets a +inf normaliser: exp gives it 0 everywhere.
    ok = (l_i > 0.0) & (pos_v >= 0)
    lse2 = jnp.where(ok, m_i + jnp.log2(jnp.where(ok, l_i, 1.0)), jnp.inf)
    norm2 = lax.broadcast_in_dim(lse2, (BLOCK, BLOCK), [0])
    prime()  # the second walk starts again at block 0 (the first left no copy in flight)

    def store_segment(u, seg):
      at = lax.rem(seg, jnp.int32(per_window))
      for blk in range(per_tile):  # one masked column reduction per query block of the tile
        mine = (rows_i >= blk * r) & (rows_i < (blk + 1) * r)
        out_smem.at[blk][at] = jnp.where(mine, u, 0.0).sum(axis=0)

    window_of = lambda w: o_ref.at[bb, hq, pl.ds(i * per_tile, per_tile), pl.ds(w * per_window, per_window)]  # noqa: E731
    segments = mosaic_common.MassSegments(cols_i, per_window=per_window, store=store_segment, out_smem=out_smem,
                                          dst=window_of, groups=f)

    def mass_body(c, u, masked):
      x2, visible = logits2(c, masked)
      p = jnp.exp2(jnp.minimum(x2 - norm2, 0.0))
      if masked:
        p = jnp.where(visible, p, 0.0)
      return segments.add(u, c, p)

    segments.walk(mass_body, free, count)

  def entry(q_ref, k_ref, pos_ref, meta_ref, o_ref):
    pl.run_scoped(
        lambda *scratch: kernel(q_ref, k_ref, pos_ref, meta_ref, o_ref, scratch),
        mosaic_common.tiled_smem((BLOCK, h), dtype), mosaic_common.tiled_smem((stages, BLOCK, h), dtype),
        plgpu.SMEM((BLOCK,), jnp.int32), plgpu.SMEM((mosaic_common.TMA_INT32,), jnp.int32),
        plgpu.SMEM((per_tile, per_window, SEGMENT), jnp.float32),
        plgpu.Barrier(num_barriers=3), plgpu.Barrier(num_barriers=stages))

  out = plgpu.kernel(
      entry, out_type=jax.ShapeDtypeStruct((b, n, n_tiles * per_tile, n_seg, SEGMENT), jnp.float32),
      grid=(n, b, n_tiles), grid_names=("heads", "batch", "tile"),
      compiler_params=mosaic_common.compiler_params(approx_math=True, lane=f > 1))(q_rows, k, pos, meta)
  return out.reshape(b, n, n_tiles * per_tile, n_seg * SEGMENT)[..., :n_k * f]
