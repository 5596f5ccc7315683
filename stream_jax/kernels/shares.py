"""The mass-score arithmetic both estimators share: the XLA reference (stream_jax/estimate.py) and the Pallas
kernel (kernels/estimate_triton.py) with `score="mass"` and a coverage budget.

Written once, in ops Triton lowers (no sort, stack or isfinite), so that both make their decisions from
the same formulas in the same order: in interpret mode the kernel's masks equal the reference's, and on a
GPU they differ only where two estimates tie to within rounding.

Quantities, for one (head, query block) with scoring query rows r:
  lse[b, r]   log-sum-exp of row r's visible (scaled, soft-capped) logits over key block b's keys;
  z[r]        the estimated log softmax denominator of row r (rule blocks exact + the search range
              estimated from its first-level nodes);
  share(b)    log mean_r exp(lse[b, r] - z[r]): block b's estimated share of the query block's attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from stream_jax.kernels.common import ranked_before
from stream_jax.numerics import NEG_INF


def logsumexp(x: jax.Array, axis: int) -> jax.Array:
  """log sum exp over `axis`, -inf where every term is -inf (never NaN: -inf is the masked value)."""
  m = jnp.max(x, axis=axis, keepdims=True)
  m = jnp.where(m > NEG_INF, m, 0.0)
  total = jnp.sum(jnp.exp(x - m), axis=axis)
  m = jnp.sum(m, axis=axis)  # drops the kept axis (a size-1 reduction: Triton has no squeeze)
  return jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + m, NEG_INF)


def logaddexp(a: jax.Array, b: jax.Array) -> jax.Array:
  """Elementwise log(exp(a) + exp(b)), -inf where both are -inf."""
  m = jnp.maximum(a, b)
  m = jnp.where(m > NEG_INF, m, 0.0)
  total = jnp.exp(a - m) + jnp.exp(b - m)
  return jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + m, NEG_INF)


def row_lse(logits: jax.Array, visible: jax.Array) -> jax.Array:
  """[..., R, bk] scaled (soft-capped) logits -> [..., R] each row's log-sum-exp over its visible keys."""
  return logsumexp(jnp.where(visible, logits, NEG_INF), axis=-1)


def log_denominator(rule_lse: jax.Array, search_lse: jax.Array, row_ok: jax.Array) -> jax.Array:
  """[R] the estimated log softmax denominator z of each scoring row (0 where a row does not score or sees
  nothing: such rows are masked out of every share)."""
  z = logaddexp(rule_lse, search_lse)
  return jnp.where(row_ok & (z > NEG_INF), z, 0.0)


def log_share(lse: jax.Array, z: jax.Array, row_ok: jax.Array, log_rows) -> jax.Array:
  """[..., R] per-row log-sum-exps of a block -> [...] log of its mean share over the scoring rows."""
  return logsumexp(jnp.where(row_ok, lse - z, NEG_INF), axis=-1) - log_rows


def dropped_share(scores: jax.Array, size: jax.Array, keep: jax.Array) -> jax.Array:
  """The estimated share of the nodes a search round drops: each node's (log) share x its size in blocks.
  Dropped nodes and the kept leaves partition the search range, so this accounts for the rest of it."""
  est = jnp.where((size > 0) & jnp.logical_not(keep), jnp.exp(scores) * size.astype(jnp.float32), 0.0)
  return jnp.sum(est)


def coverage_keep(scores: jax.Array, ok: jax.Array, rule_share, rest_share, target: float) -> jax.Array:
  """bool[L]: the fewest candidates, by estimated share, that bring the kept share to `target`.

  The total is the rule blocks' share + the candidates' + the rest of the search range's, so an error in
  the denominator estimate cancels: only ratios of the same estimates are compared. A candidate is kept
  while the share of those ranked before it (larger share, or equal and earlier slot: a stable sort's
  order) is still short of the target; the rank is an L x L comparison instead of a sort.
  """
  mass = jnp.where(ok, jnp.exp(scores), 0.0)
  before = rule_share + jnp.sum(jnp.where(ranked_before(mass), mass[None, :], 0.0), axis=1)
  total = rule_share + jnp.sum(mass) + rest_share
  return (before < target * total) & (mass > 0)


# A shared search's estimate of the share of the range its rounds dropped, at most (a member's denominator
# divides its exact children's mass by 1 - this).
MAX_MISSED = 0.999


def missed_share(dropped, kept_est):
  """The share of a shared search's range that its rounds dropped, as the rounds estimated it: dropped /
  (dropped + the kept nodes' estimate), in [0, MAX_MISSED] (StreamConfig.search_share)."""
  return jnp.clip(dropped / jnp.maximum(dropped + kept_est, 1e-30), 0.0, MAX_MISSED)


def gap_blocks(config) -> int:
  """The most key blocks between a shared search's range (its first query block's) and a later member's
  window: (search_share - 1) x block_q / block_k, rounded up."""
  return -(-(config.search_share - 1) * config.block_q // config.block_k)
