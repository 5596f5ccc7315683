"""Pallas Mosaic GPU (Hopper: TMA + wgmma) kernel of the true block mass rows of the ideal kept set: the port
of the Triton kernel in ideal_triton.py (same contract: `mass_rows`), which "pallas" and "auto" prefer on
Hopper for 64 x 64 blocks, so the ideal trace does not depend on the Triton backend that Pallas deprecates.

One CTA (one warpgroup) per (head, batch, query block of the chunk). It copies its 64 queries and their lse
into shared memory, then walks the key blocks 0 .. diagonal through a ring of `stages` key buffers (the TMA
copy of block c + stages is issued as soon as block c's product has read its buffer): one [64, H] x [H, 64]
wgmma per block, p = exp(logit - lse) in registers, and the block's per-row sums go into column c % 64 of a
[64, 64] register tile. Every 64 key blocks one column reduction turns that tile into 64 block masses, stored
as one row of a shared-memory window of segments, which TMA copies out when it is full (or the row ends).
Blocks wholly below every row's causal edge (and no window) skip the mask. The logits never leave registers;
HBM holds only the chunk's [B, N, chunk, nK] rows, as with the Triton kernel.

Entries past a row's diagonal are left as the window held them; `mass_rows` zeroes them (one XLA select).

Limits (`unsupported`): float16 / bfloat16, 64 x 64 blocks, head dims multiples of 64 up to 256, no key_mask.
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

BLOCK = 64  # query rows per CTA (one wgmma tile) and keys per block
SEGMENT = mosaic_common.SEGMENT  # key blocks per column reduction (the register tile's columns)
WINDOW = 128  # segments per shared-memory window (32 KiB), copied out by TMA when full
DEFAULT_STAGES = 2  # key ring depth
LOG2E = 1.4426950408889634


def unsupported(call: Call) -> Optional[str]:
  """Why this kernel cannot take a call (kernels.implementations.Call), or None. Where it can, "pallas" and
  "auto" prefer it to Triton on Hopper."""
  h = call.head_dim
  if call.dtype not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
    return f"the Mosaic GPU block-mass kernel takes float16 / bfloat16 inputs, got {call.dtype.name}"
  if (call.block_q, call.block_k) != (BLOCK, BLOCK):
    return f"the Mosaic GPU block-mass kernel needs 64 x 64 blocks, got {call.block_q} x {call.block_k}"
  if h % 64 or not 64 <= h <= 256:
    return f"the Mosaic GPU block-mass kernel needs a head dim in 64, 128, 192, 256, got {h}"
  if call.key_mask:
    return "the Pallas block-mass kernels take no key_mask (interventions run on the XLA path)"
  return None


def mass_rows(q: jax.Array, k: jax.Array, lse: jax.Array, first_block, *, n_rows: int, q_len: int, k_len: int,
              scale: float, softcap: Optional[float], window: Optional[int],
              stages: Optional[int] = None, segments_per_copy: int = WINDOW) -> jax.Array:
  """float32 [B, N, n_rows, nK]: the true mass rows of query blocks first_block .. first_block + n_rows - 1,
  the contract of `ideal_triton.mass_rows` with 64 x 64 blocks (GPU only, no interpret mode: its tests
  lower it for CUDA on the CPU and run it on the device, benchmarks/gpu_checks.py). Entries past each row's
  diagonal, and rows past the last query block, are zeros. `segments_per_copy`: the shared-memory window
  (a launch setting; the GPU checks make it small to cross windows on a short input)."""
  t, s = q_len, k_len
  rows = _rows(q, k, lse, jnp.asarray(first_block, jnp.int32), n_rows=n_rows, scale=float(scale),
               softcap=None if softcap is None else float(softcap),
               window=None if window is None else int(window),
               stages=DEFAULT_STAGES if stages is None else int(stages), per_copy=int(segments_per_copy))
  n_q, n_k = num_blocks(t, BLOCK), num_blocks(s, BLOCK)
  j = first_block + jnp.arange(n_rows, dtype=jnp.int32)
  diag = jnp.where(j < n_q, diagonal_blocks(t, s, BLOCK, BLOCK)[jnp.clip(j, 0, n_q - 1)], -1)
  keep = jnp.arange(n_k, dtype=jnp.int32)[None, :] <= diag[:, None]  # [n_rows, nK]
  return jnp.where(keep, rows, 0.0)


@functools.partial(jax.jit, static_argnames=("n_rows", "scale", "softcap", "window", "stages", "per_copy"))
def _rows(q, k, lse, first_block, *, n_rows, scale, softcap, window, stages, per_copy):
  import jax.experimental.pallas as pl  # noqa: PLC0415  (GPU-only module: imported where it runs)
  import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415

  b, t, n, h = q.shape
  s, kv = k.shape[1], k.shape[2]
  g = n // kv
  n_k = num_blocks(s, BLOCK)
  n_seg = -(-n_k // SEGMENT)
  per_window = min(n_seg, per_copy)
  n_seg = -(-n_seg // per_window) * per_window  # whole windows
  rows = n_rows * BLOCK
  start = first_block * BLOCK
  n_q = num_blocks(t, BLOCK)
  # The kernel reads its query block from the whole q at the chunk's offset (a slice of a padded q would be
  # a copy of q, 4 GiB at 1M tokens); only a ragged T pads its last block. The chunk's lse (-inf past T:
  # those rows add nothing) and the keys in whole blocks.
  q = common.pad_axis(q, 1, n_q * BLOCK)
  lse_pad = jnp.pad(lse.astype(jnp.float32), ((0, 0), (0, 0), (0, rows)), constant_values=-jnp.inf)
  lse_c = lax.dynamic_slice_in_dim(lse_pad, start, rows, 2)
  k = common.pad_axis(k, 1, n_k * BLOCK)
  meta = jnp.full((mosaic_common.TMA_INT32,), first_block, jnp.int32)
  offset = s - t
  dtype = q.dtype

  def kernel(q_ref, k_ref, lse_ref, meta_ref, o_ref, scratch):
    q_smem, k_smem, lse_smem, meta_smem, out_smem, bars, k_bars = scratch
    hq, bb, i = lax.axis_index("heads"), lax.axis_index("batch"), lax.axis_index("qblk")
    kvh = lax.div(hq, jnp.int32(g))
    plgpu.copy_gmem_to_smem(meta_ref, meta_smem, bars.at[0])
    plgpu.copy_gmem_to_smem(lse_ref.at[bb, hq, pl.ds(i * BLOCK, BLOCK)], lse_smem, bars.at[2])
    plgpu.barrier_wait(bars.at[0])
    j = meta_smem[0] + i  # this CTA's query block (past the last one: a block that walks no key)
    read = jnp.minimum(j, n_q - 1) * BLOCK
    plgpu.copy_gmem_to_smem(q_ref.at[bb, pl.ds(read, BLOCK), hq], q_smem, bars.at[1])
    first_pos = j * BLOCK + offset
    last_pos = jnp.minimum((j + 1) * BLOCK, t) - 1 + offset
    count = jnp.where(j * BLOCK < t, lax.div(last_pos, jnp.int32(BLOCK)) + 1, 0)  # key blocks 0 .. diagonal
    # Blocks every row sees whole need no mask (none with a window: it is masked throughout).
    free = jnp.int32(0) if window is not None else jnp.clip(lax.div(first_pos + 1, jnp.int32(BLOCK)), 0, count)

    def fetch(c, slot):
      plgpu.copy_gmem_to_smem(k_ref.at[bb, pl.ds(c * BLOCK, BLOCK), kvh], k_smem.at[slot], k_bars.at[slot])

    for c0 in range(stages):
      pl.when(c0 < count)(functools.partial(fetch, c0, c0))

    wg = plgpu.Layout.WGMMA
    row_l = wg.reduce(1)
    rows_i = plgpu.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 0, layout=wg)
    cols_i = plgpu.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 1, layout=wg)
    q_pos = j * BLOCK + rows_i + offset
    plgpu.barrier_wait(bars.at[1])
    plgpu.barrier_wait(bars.at[2])
    lse_v = plgpu.load(lse_smem, (), layout=row_l)
    # A row that sees nothing (lse -inf, padding) gets a +inf normaliser: exp gives it 0 everywhere.
    norm2 = lax.broadcast_in_dim(jnp.where(lse_v > -jnp.inf, lse_v * LOG2E, jnp.inf), (BLOCK, BLOCK), [0])

    def store_segment(u, seg):
      out_smem[lax.rem(seg, jnp.int32(per_window))] = u.sum(axis=0)

    segments = mosaic_common.MassSegments(cols_i, per_window=per_window, store=store_segment, out_smem=out_smem,
                                          dst=lambda w: o_ref.at[bb, hq, i, pl.ds(w * per_window, per_window)])

    def body(c, u, masked):
      x2 = mosaic_common.base2_logits(c, q_smem=q_smem, k_smem=k_smem, k_bars=k_bars, stages=stages,
                                      count=count, fetch=fetch, scale=scale, softcap=softcap, log2e=LOG2E)
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
        mosaic_common.tiled_smem((BLOCK, h), dtype), mosaic_common.tiled_smem((stages, BLOCK, h), dtype),
        plgpu.SMEM((BLOCK,), jnp.float32), plgpu.SMEM((mosaic_common.TMA_INT32,), jnp.int32),
        plgpu.SMEM((per_window, SEGMENT), jnp.float32),
        plgpu.Barrier(num_barriers=3), plgpu.Barrier(num_barriers=stages))

  out = plgpu.kernel(
      entry, out_type=jax.ShapeDtypeStruct((b, n, n_rows, n_seg, SEGMENT), jnp.float32),
      grid=(n, b, n_rows), grid_names=("heads", "batch", "qblk"),
      compiler_params=plgpu.CompilerParams(approx_math=True))(q, k, lse_c, meta)
  return out.reshape(b, n, n_rows, n_seg * SEGMENT)[..., :n_k]
