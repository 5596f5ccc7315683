"""What the Mosaic GPU ports (blocksparse_mosaic.py, estimate_mosaic.py, ideal_mosaic.py) share: the Hopper
check, the swizzled shared-memory tiles their TMA copies and wgmma products read, the Q Kᵀ logits of a
query tile and a key tile, and the length of the int32 rows they copy by TMA. Which implementation runs is decided in kernels/implementations.py.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

TMA_INT32 = 32  # a warpgroup's TMA copies move multiples of 128 bytes: 32 int32 / float32


def no_hopper() -> Optional[str]:
  """Why the default device cannot run a Mosaic GPU port, or None on a Hopper GPU."""
  if jax.default_backend() != "gpu":
    return "the Mosaic GPU kernels run on a GPU only (no interpret mode)"
  cc = str(getattr(jax.devices()[0], "compute_capability", ""))
  if not cc.startswith("9."):
    return f"the Mosaic GPU kernels need a Hopper GPU (wgmma), got compute capability {cc or '?'}"
  return None


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
