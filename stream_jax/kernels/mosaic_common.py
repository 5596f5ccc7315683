"""What the Mosaic GPU ports (blocksparse_mosaic.py, estimate_mosaic.py, ideal_mosaic.py, table_mosaic.py)
share: the Hopper check, the swizzled shared-memory tiles their TMA copies and wgmma products read, the Q Kᵀ
logits of a query tile and a key tile, the length of the int32 rows they copy by TMA, and the two
block-mass kernels' rows of masses written 64 key blocks at a time through a shared-memory window. Which
implementation runs is decided in kernels/implementations.py.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

TMA_INT32 = 32  # a warpgroup's TMA copies move multiples of 128 bytes: 32 int32 / float32
BLOCKS = (16, 32, 64)  # square block sizes the estimate, block-mass and table ports take (64-row tiles)


def no_hopper() -> Optional[str]:
  """Why the default device cannot run a Mosaic GPU port, or None on a Hopper GPU."""
  if jax.default_backend() != "gpu":
    return "the Mosaic GPU kernels run on a GPU only (no interpret mode)"
  cc = str(getattr(jax.devices()[0], "compute_capability", ""))
  if not cc.startswith("9."):
    return f"the Mosaic GPU kernels need a Hopper GPU (wgmma), got compute capability {cc or '?'}"
  return None


def limits(call, kernel: str) -> Optional[str]:
  """What the estimate, block-mass and table ports all refuse (kernels.implementations.Call), or None:
  inputs other than float16 / bfloat16 (wgmma), blocks other than 16 x 16, 32 x 32 or 64 x 64 (a 64-row
  tile holds whole blocks), head dims other than multiples of 64 up to 256 (swizzled tiles, registers)."""
  if call.dtype not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
    return f"the Mosaic GPU {kernel} kernel takes float16 / bfloat16 inputs, got {call.dtype.name}"
  if call.block_q != call.block_k or call.block_q not in BLOCKS:
    return (f"the Mosaic GPU {kernel} kernel needs 16 x 16, 32 x 32 or 64 x 64 blocks, got {call.block_q} x "
            f"{call.block_k}")
  if call.head_dim % 64 or not 64 <= call.head_dim <= 256:
    return f"the Mosaic GPU {kernel} kernel needs a head dim in 64, 128, 192, 256, got {call.head_dim}"
  return None


def compiler_params(*, approx_math: bool, lane: bool = False):
  """plgpu.CompilerParams; `lane` asks for Lane semantics, for kernels that set every register layout by hand:
  jax 0.11's default (Warpgroup) searches the whole kernel for a layout assignment, and on the H200 that
  search ran 2 minutes on the wide estimate kernel and found none."""
  import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415  (GPU-only module)
  if not lane:
    return plgpu.CompilerParams(approx_math=approx_math)
  return plgpu.CompilerParams(approx_math=approx_math, lowering_semantics=plgpu.LoweringSemantics.Lane)


def tma_length(n: int) -> int:
  """`n` 32-bit values rounded up to a length TMA can copy (a multiple of TMA_INT32)."""
  return -(-n // TMA_INT32) * TMA_INT32


def tiled_smem(shape: tuple[int, ...], dtype):
  """A shared-memory buffer tiled (8 rows x one swizzle width) and swizzled as TMA and wgmma want it: the
  widest swizzle (128 bytes) the minor dimension allows."""
  import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415  (GPU-only module)
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = min(128, shape[-1] * itemsize)
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle // itemsize)),
                                              plgpu.SwizzleTransform(swizzle)))


def qk_logits(q_smem, k_buf):
  """float32 [rows, keys]: the logits Q Kᵀ of a query tile and a key tile in shared memory, one wgmma into a
  scoped accumulator. Reading the accumulator back waits for the product, so `k_buf` is free to refill
  once this returns."""
  import jax.experimental.pallas as pl  # noqa: PLC0415  (GPU-only modules)
  import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415

  def qk(acc_ref):
    plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_buf, (1, 0)))
    return acc_ref[...]

  return pl.run_scoped(qk, plgpu.ACC((q_smem.shape[0], k_buf.shape[0]), jnp.float32))


def pv_accumulate(acc, p, v_buf):
  """float32 [rows, dv]: acc + P V, P a register tile of probabilities (the inputs' dtype) and V a value tile in
  shared memory, one wgmma into the accumulator. Reading it back waits for the product, so `v_buf` is free to
  refill once this returns."""
  import jax.experimental.pallas as pl  # noqa: PLC0415  (GPU-only modules)
  import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415

  def pv(acc_ref):
    plgpu.wgmma(acc_ref, p, v_buf)

  return pl.run_state(pv)(plgpu.ACC.init(acc))


def base2_logits(c, *, q_smem, k_smem, k_bars, stages: int, count, fetch, scale: float, softcap, log2e: float):
  """The block-mass kernels' step on key block c of a `stages`-deep TMA ring: wait for its buffer, take the
  logits, refill the buffer with block c + stages (`fetch(block, slot)`) once they are read, and return
  them scaled, soft-capped and in base 2 (logit x log2 e) for exp2."""
  import jax.experimental.pallas as pl  # noqa: PLC0415  (GPU-only modules)
  import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415
  slot = lax.rem(c, jnp.int32(stages))
  plgpu.barrier_wait(k_bars.at[slot])
  x = qk_logits(q_smem, k_smem.at[slot])
  pl.when(c + stages < count)(functools.partial(fetch, c + stages, slot))  # logits read: slot free
  return to_base2(x, scale=scale, softcap=softcap, log2e=log2e)


def to_base2(x, *, scale: float, softcap, log2e: float):
  """Logits scaled, soft-capped and in base 2 (x log2 e), for exp2: the block-mass kernels' normal form."""
  if softcap is None:
    return x * (scale * log2e)
  return jnp.tanh(x * (scale / softcap)) * (softcap * log2e)


SEGMENT = 64  # key blocks per column reduction of the block-mass kernels (their register tile's columns)


class MassSegments:
  """How ideal_mosaic.py and table_mosaic.py write a row of per-key-block masses without holding it: the
  per-row sums of block c go into column c % 64 of a [64, 64] register tile `u`; every 64 blocks
  `store(u, segment)` reduces the tile into a shared-memory window of `per_window` segments, and `copy(w)`
  sends window w to HBM by TMA when it is full (or the row ends).

  With `groups` g > 1 (key blocks of 64 / g tokens) a 64-key tile c holds g key blocks: their per-row sums
  go into columns (c g + i) % 64, and a segment fills every 64 / g tiles."""

  def __init__(self, cols, *, per_window: int, store, out_smem, dst, groups: int = 1):
    self.cols, self.per_window, self.store, self.out_smem, self.dst = cols, per_window, store, out_smem, dst
    self.groups = groups

  def copy(self, w):
    import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415  (GPU-only module)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(self.out_smem, self.dst(w))
    plgpu.wait_smem_to_gmem(0)
    plgpu.commit_smem()  # the window is free again before any thread writes it

  def add(self, u, c, p):
    """u with the per-row sums of tile c's masses p [64, 64] in column c % 64 (per key block: columns c g + i);
    stores (and copies) a full segment."""
    import jax.experimental.pallas as pl  # noqa: PLC0415  (GPU-only module)
    g = self.groups
    per_segment = SEGMENT // g  # tiles per segment
    col = lax.rem(c, jnp.int32(per_segment))
    if g == 1:
      u = jnp.where(self.cols == col, lax.broadcast_in_dim(p.sum(axis=1), u.shape, [0]), u)
    else:
      group = lax.div(self.cols, jnp.int32(SEGMENT // g))  # each column's key block within the tile
      for i in range(g):
        sums = jnp.where(group == i, p, 0.0).sum(axis=1)
        u = jnp.where(self.cols == col * g + i, lax.broadcast_in_dim(sums, u.shape, [0]), u)

    @pl.when(col == per_segment - 1)
    def _():
      seg = lax.div(c, jnp.int32(per_segment))
      self.store(u, seg)
      pl.when(lax.rem(seg, jnp.int32(self.per_window)) == self.per_window - 1)(
          functools.partial(self.copy, lax.div(seg, jnp.int32(self.per_window))))

    return u

  def walk(self, body, free, count):
    """Blocks 0 .. free - 1 through body(c, u, masked=False) (every row sees them whole), then free ..
    count - 1 with masked=True, from a zero tile; then `finish`."""
    import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415  (GPU-only module)
    u = plgpu.layout_cast(jnp.zeros((SEGMENT, SEGMENT), jnp.float32), plgpu.Layout.WGMMA)
    u = lax.fori_loop(0, free, functools.partial(body, masked=False), u)
    u = lax.fori_loop(free, count, functools.partial(body, masked=True), u)
    self.finish(u, count)

  def finish(self, u, count):
    """After tiles 0 .. count - 1: the last, partial segment stored and the last window copied."""
    import jax.experimental.pallas as pl  # noqa: PLC0415  (GPU-only module)
    columns = count if self.groups == 1 else count * self.groups  # key blocks written
    tail = lax.rem(columns, jnp.int32(SEGMENT))  # blocks in the last, partial segment

    @pl.when(tail > 0)
    def _():
      self.store(jnp.where(self.cols < tail, u, 0.0), lax.div(columns, jnp.int32(SEGMENT)))

    last_seg = lax.div(columns - 1, jnp.int32(SEGMENT))

    @pl.when((count > 0) & ((tail > 0) | (lax.rem(last_seg, jnp.int32(self.per_window)) != self.per_window - 1)))
    def _():
      self.copy(lax.div(last_seg, jnp.int32(self.per_window)))
