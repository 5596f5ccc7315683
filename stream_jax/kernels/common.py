"""What the Pallas kernels share: the backend choice (Triton), padding to power-of-two tiles, small
in-register vector helpers (Triton has no gather, sort or top_k on values).

The kernels are written against the Pallas Triton backend. jax 0.10 and 0.11 pick different default
Pallas GPU backends (Triton vs Mosaic GPU), so every `pallas_call` here passes explicit Triton compiler
parameters, which selects Triton on both. A Mosaic GPU port replaces `estimate.py` / `attention.py`
behind the same two functions (`estimate_mask`, `sparse_attention`).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

# A block dimension squeezed out of the kernel's view (`None` before pl.squeezed existed).
SQ = getattr(__import__("jax.experimental.pallas", fromlist=["squeezed"]), "squeezed", None)
# Triton's tl.dot needs every dimension >= 16.
MIN_DOT = 16


def next_pow2(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


def triton_params(num_warps: int, num_stages: int):
  """Explicit Triton compiler params (the class name moved between jax versions)."""
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=import-outside-toplevel
  cls = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")
  return cls(num_warps=num_warps, num_stages=num_stages)


def resolve_interpret(interpret: Optional[bool]) -> bool:
  """None -> interpret mode unless the default backend is a GPU."""
  if interpret is None:
    return jax.default_backend() != "gpu"
  return bool(interpret)


def dot_precision(dtype) -> Optional[lax.Precision]:
  """f32 inputs: full f32 products (Triton's default would be TF32); 16-bit inputs: native."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pad `axis` of x at the end to `size` (no copy when already that size)."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, extra)
  return jnp.pad(x, pad)


def as_batched(q, *rest):
  """Adds a batch axis of 1 to [T, N, H]-style inputs; returns (batched arrays, had_batch)."""
  if q.ndim == 4:
    return (q,) + tuple(rest), True
  return (q[None],) + tuple(r[None] for r in rest), False


# ---- in-kernel helpers on small 1-D vectors (lower to Triton: iota, where, reductions) ----

def iota(n: int) -> jax.Array:
  return lax.broadcasted_iota(jnp.int32, (n,), 0)


def take(vec: jax.Array, i) -> jax.Array:
  """vec[i] for a traced scalar i (exact: one selected value plus zeros)."""
  return jnp.sum(jnp.where(iota(vec.shape[0]) == i, vec, jnp.zeros_like(vec)))


def gather(vec: jax.Array, idx: jax.Array, ok: Optional[jax.Array] = None) -> jax.Array:
  """vec[idx] for an index vector (one-hot reduction; 0 where nothing is selected)."""
  hit = idx[:, None] == iota(vec.shape[0])[None, :]
  if ok is not None:
    hit = hit & ok[:, None]
  return jnp.sum(jnp.where(hit, vec[None, :], jnp.zeros_like(vec)[None, :]), axis=1)


def ranked_before(x: jax.Array) -> jax.Array:
  """bool[L, L]: [i, j] = x[j] ranks before x[i] (larger, or equal and earlier: `lax.top_k`'s and a stable
  descending sort's order). Row sums are ranks: top-k and ordered prefixes without a sort."""
  me, other = iota(x.shape[0])[:, None], iota(x.shape[0])[None, :]
  return (x[None, :] > x[:, None]) | ((x[None, :] == x[:, None]) & (other < me))


def count_true(mask: jax.Array, axis: int) -> jax.Array:
  return jnp.sum(mask.astype(jnp.int32), axis=axis)
