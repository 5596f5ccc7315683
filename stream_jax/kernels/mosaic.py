"""What the two Mosaic GPU ports (attention_mgpu.py, estimate_mgpu.py) share: the choice between a port and
its Triton peer, the swizzled shared-memory tiles their TMA copies and wgmma products read, and the length
of the int32 rows they copy by TMA.

The ports run on Hopper only (wgmma, TMA) and have no interpret mode, so each has an environment switch:
`auto` (the default) runs the port on a Hopper GPU whenever it takes the inputs (both were measured faster
than their Triton peers on every shape tried), `triton` keeps the Triton kernel, `mosaic` makes an input
the port cannot take an error that says why.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp

CHOICES = ("auto", "triton", "mosaic")
TMA_INT32 = 32  # a warpgroup's TMA copies move multiples of 128 bytes: 32 int32 / float32


def runs_port(env: str, why_not: Optional[str]) -> bool:
  """Whether `backend="pallas"` runs the Mosaic GPU port: `why_not` is why the port cannot take these
  inputs (None if it can); `env` names the switch (STREAM_JAX_PALLAS_ATTENTION / _ESTIMATE)."""
  choice = os.environ.get(env, "auto")
  if choice not in CHOICES:
    raise ValueError(f"{env} must be auto (the default), triton or mosaic, got {choice!r}")
  if choice == "triton":
    return False
  why_not = why_not or no_hopper()
  if why_not and choice == "mosaic":
    raise ValueError(f"{env}=mosaic: {why_not}")
  return why_not is None


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
