"""What every attention path shares: the masked-logit value, soft-capping, the masked softmax, the stats
pytree and default tile sizes. The bottom of the import graph: it imports jax only, so the reference ops
(estimate.py, attention.py, dense.py) and the Pallas kernels (kernels/) both build on it without importing
each other.

NEG_INF is -inf, not a large finite number. -inf is the identity of max and log-sum-exp, so "this query
sees no key" is exact: its lse is -inf, exp(-inf) = 0 adds no mass, and a node scored -inf never beats a
real one in top_k. A finite stand-in (-1e30) would leak: a fully masked row would softmax to a uniform
distribution over keys it must not see, and its lse would look like a real, very small normaliser. The
price is guards wherever -inf meets arithmetic, all of them in `masked_softmax` and the online-softmax
loops: subtract a row max only where it is finite, divide by a denominator only where it is > 0. With
them a fully masked row gives probabilities 0, output 0 and lse -inf, NaN-free.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")
# Query blocks scored (estimate) or attended (sparse attention) per sequential step: bounds the
# per-step buffers (q_chunk x C x block_q x block_k floats per head) whatever T is.
DEFAULT_Q_CHUNK = 64


def softcap(x: jax.Array, cap: Optional[float]) -> jax.Array:
  """Gemma's logit soft-cap `cap * tanh(x / cap)`; identity when cap is None. Monotone, so applying it to a
  max equals the max of the capped values (the estimator relies on that)."""
  return x if cap is None else cap * jnp.tanh(x / cap)


def resolve_scale(scale: Optional[float], head_dim: int) -> float:
  """The logit scale: the caller's, or the standard H ** -0.5."""
  return head_dim ** -0.5 if scale is None else float(scale)


def masked_softmax(logits: jax.Array, visible: jax.Array, axes,
                   weights: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """Softmax over `axes` restricted to `visible` (f32): (probs, lse with `axes` kept as size 1).

  A row that sees nothing gets probabilities 0 and lse -inf (see the module docstring). `weights` (>= 0,
  broadcast to logits) scale each term before normalising: w exp(x) / sum w exp(x), i.e. logits + log w
  without the log, so a weight of 0 drops a term and the derivative at w = 1 stays finite.
  """
  logits = jnp.where(visible, logits, NEG_INF)
  m = logits.max(axes, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(visible, jnp.exp(logits - m), 0.0)
  if weights is not None:
    p = p * weights
  denom = p.sum(axes, keepdims=True)
  seen = denom > 0
  probs = p / jnp.where(seen, denom, 1.0)
  lse = jnp.where(seen, jnp.log(jnp.where(seen, denom, 1.0)) + m, NEG_INF)
  return probs, lse


def num_rounds(num_k_blocks: int, branches: int) -> int:
  """Refinement rounds of the mask search until the widest first-level node is one block (the reference
  estimator and its kernel must agree on it)."""
  widest = -(-num_k_blocks // branches)
  return max(0, math.ceil(math.log2(widest))) if widest > 1 else 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionStats:
  """What sparse attention reports besides its output.

  mass: float32[..., N, nQ, C] attention probability per kept key block summed over the block's queries
    (a row sums to the number of valid queries of the block; 0 at padding slots). With `lse_ref` the
    probability is the reference softmax's (e.g. dense attention's), so a row sums to what the kept
    blocks hold of it.
  lse: float32[..., N, T] log-sum-exp of each query's kept logits (the softmax normaliser).
  """

  mass: jax.Array
  lse: jax.Array
