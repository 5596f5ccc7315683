"""The mass-score arithmetic both estimators share (stream_jax/kernels/shares.py) against independent
definitions: numpy's log-sum-exp in float64, and the coverage budget as a stable sort plus a cumulative sum."""

import jax.numpy as jnp
import numpy as np
import pytest

from stream_jax.kernels import shares


def _np_lse(x, axis):
  with np.errstate(divide="ignore"):
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.log(np.sum(np.exp(x - m), axis=axis)) + np.squeeze(m, axis)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_logsumexp_and_logaddexp_match_float64_with_masked_terms(axis):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, 9)) * 20
  x[rng.random(x.shape) < 0.4] = -np.inf
  x[2, :] = -np.inf  # a row that sees nothing
  x[:, 3] = -np.inf
  got = np.asarray(shares.logsumexp(jnp.asarray(x, jnp.float32), axis))
  want = _np_lse(x, axis)
  assert not np.isnan(got).any()
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
  ok = np.isfinite(want)
  np.testing.assert_allclose(got[ok], want[ok], rtol=1e-6, atol=1e-5)
  a, b = x[:, 0], x[:, 1]
  got = np.asarray(shares.logaddexp(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
  with np.errstate(divide="ignore"):
    want = np.logaddexp(a, b)
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
  np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-6, atol=1e-5)


def test_log_share_is_the_mean_share_over_scoring_rows():
  rng = np.random.default_rng(1)
  lse = rng.normal(size=(5, 8))
  z = rng.normal(size=8) + 2
  row_ok = rng.random(8) < 0.7
  got = np.asarray(shares.log_share(jnp.asarray(lse, jnp.float32), jnp.asarray(z, jnp.float32),
                                    jnp.asarray(row_ok), jnp.log(jnp.float32(row_ok.sum()))))
  want = np.log(np.exp(lse - z)[:, row_ok].mean(-1))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_coverage_keep_is_the_shortest_prefix_of_the_stable_sort(seed):
  """The rank comparison keeps exactly what sorting by share (ties: earlier slot first) and keeping the
  shortest prefix whose cumulative share, with the rule blocks', reaches target x total would keep."""
  rng = np.random.default_rng(seed)
  n = 16
  scores = np.log(rng.random(n)).astype(np.float32)
  scores[rng.integers(0, n, 4)] = scores[0]  # exact ties
  ok = rng.random(n) < 0.8
  rule, rest, target = float(rng.random()), float(rng.random()), float(rng.uniform(0.3, 0.99))
  got = np.asarray(shares.coverage_keep(jnp.asarray(scores), jnp.asarray(ok), rule, rest, target))
  mass = np.where(ok, np.exp(scores.astype(np.float64)), 0.0)
  order = np.argsort(-mass, kind="stable")
  before = rule + np.cumsum(mass[order]) - mass[order]
  keep = np.zeros(n, bool)
  keep[order] = (before < target * (rule + mass.sum() + rest)) & (mass[order] > 0)
  np.testing.assert_array_equal(got, keep)
  assert not got[~ok].any()


def test_dropped_share_counts_only_dropped_non_empty_nodes():
  scores = jnp.log(jnp.asarray([0.1, 0.2, 0.3, 0.4], jnp.float32))
  size = jnp.asarray([2, 0, 3, 1], jnp.int32)
  keep = jnp.asarray([False, False, True, False])
  np.testing.assert_allclose(float(shares.dropped_share(scores, size, keep)), 0.1 * 2 + 0.4 * 1, rtol=1e-6)
