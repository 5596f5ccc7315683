"""BlockMask helpers against token-level counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stream_jax as sj
from stream_jax.mask import causal_interactions


@pytest.mark.parametrize("t,s,window", [(100, 100, None), (70, 130, None), (200, 200, 37)])
def test_causal_interactions_brute_force(t, s, window):
  pos = np.arange(t) + s - t
  allowed = np.arange(s)[None, :] <= pos[:, None]
  if window is not None:
    allowed &= pos[:, None] - np.arange(s)[None, :] < window
  assert causal_interactions(t, s, window) == allowed.sum()


@pytest.mark.parametrize("window", [None, 40])
def test_kept_interactions_match_the_dense_token_mask(window):
  key = jax.random.PRNGKey(0)
  q = jax.random.normal(key, (230, 2, 8))
  k = jax.random.normal(jax.random.PRNGKey(1), (250, 1, 8))
  mask = sj.estimate_mask(q, k, sj.StreamConfig(block_q=16, block_k=8, top_k=3))
  dense = np.asarray(sj.to_dense(mask, window=window))
  np.testing.assert_array_equal(sj.kept_interactions(mask, window), dense.sum((-2, -1)))
  frac = sj.kept_fraction(mask, window)
  np.testing.assert_allclose(frac, dense.sum((-2, -1)) / causal_interactions(230, 250, window), rtol=1e-6)
  assert (np.asarray(frac) < 1).all()
  full = sj.window_mask(2, 230, 250, block_q=16, block_k=8, window=window)
  np.testing.assert_allclose(sj.kept_fraction(full, window), 1.0, rtol=1e-6)
  np.testing.assert_allclose(sj.block_density(full), 1.0) if window is None else None


def test_block_dense_and_masks_equal():
  mask = sj.window_mask(1, 64, 64, block_q=16, block_k=16)
  blocks = np.asarray(sj.to_block_dense(mask))[0]
  np.testing.assert_array_equal(blocks, np.tril(np.ones((4, 4), bool)))
  assert sj.masks_equal(mask, mask)
  other = sj.window_mask(1, 64, 64, block_q=16, block_k=16, window=16)
  assert not sj.masks_equal(mask, other)
  assert "kept_fraction=1.0000" in sj.describe(mask)


def test_blockmask_is_a_pytree_with_static_layout():
  mask = sj.window_mask(2, 64, 64, block_q=16, block_k=16)
  leaves, treedef = jax.tree_util.tree_flatten(mask)
  assert len(leaves) == 2
  again = jax.tree_util.tree_unflatten(treedef, leaves)
  assert sj.masks_equal(mask, again)
  doubled = jax.jit(lambda m: m)(mask)
  assert doubled.block_q == 16 and doubled.q_len == 64


def test_kept_fraction_at_lengths_past_int32_interaction_counts():
  """131,072 tokens have 8.6e9 causal pairs: more than int32 holds."""
  t = 131_072
  mask = sj.window_mask(1, t, t, block_q=64, block_k=64, window=1024)
  assert causal_interactions(t, t) > 2**31
  np.testing.assert_allclose(sj.kept_fraction(mask, 1024), 1.0, rtol=1e-5)
  # without the window rule every key of the band's blocks up to the query counts
  pos = np.arange(t, dtype=np.int64)
  band_start = np.maximum(pos // 64 * 64 - 1024 + 1, 0) // 64 * 64
  expect = (pos - band_start + 1).sum() / causal_interactions(t, t)
  np.testing.assert_allclose(sj.kept_fraction(mask), expect, rtol=1e-5)
