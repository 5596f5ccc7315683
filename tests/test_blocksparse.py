"""Block-sparse attention against dense attention, and block mass against the exact dense block mass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stream_jax as sj
from reference import numpy_attention


def _qkv(seed, t, s, n, kv, h, dtype=jnp.float32):
  a, b, c = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(a, (t, n, h), dtype), jax.random.normal(b, (s, kv, h), dtype),
          jax.random.normal(c, (s, kv, h), dtype))


CASES = [
    # t, s, n, kv, h, bq, bk, softcap, window
    (128, 128, 2, 1, 16, 16, 16, None, None),
    (100, 100, 4, 2, 8, 16, 8, None, None),  # ragged, GQA, bq != bk
    (77, 150, 2, 2, 16, 8, 16, 50.0, None),  # S > T, softcap
    (200, 200, 2, 1, 8, 16, 32, None, 40),  # sliding window
]


@pytest.mark.parametrize("case", CASES)
def test_full_mask_equals_dense_and_mass_equals_block_mass(case):
  t, s, n, kv, h, bq, bk, softcap, window = case
  q, k, v = _qkv(sum(case[:5]), t, s, n, kv, h)
  mask = sj.window_mask(n, t, s, block_q=bq, block_k=bk, window=None)
  out, stats = jax.jit(lambda *a: sj.sparse_attention(*a, softcap=softcap, window=window))(q, k, v, mask)
  ref = sj.reference_attention(q, k, v, softcap=softcap, window=window)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
  dense_mass = sj.dense_block_mass(q, k, block_q=bq, block_k=bk, softcap=softcap, window=window)
  np.testing.assert_allclose(stats.mass, sj.take_blocks(dense_mass, mask), atol=1e-5)
  valid_rows = np.minimum(bq, t - np.arange(mask.num_q_blocks) * bq)
  np.testing.assert_allclose(stats.mass.sum(-1), np.broadcast_to(valid_rows, (n, len(valid_rows))),
                             rtol=1e-5)
  # and against an independent float64 computation
  pos = np.arange(t) + s - t
  allowed = np.arange(s)[None, :] <= pos[:, None]
  if window is not None:
    allowed &= pos[:, None] - np.arange(s)[None, :] < window
  ref64, _ = numpy_attention(q, k, v, np.broadcast_to(allowed, (n, t, s)), h ** -0.5, softcap)
  np.testing.assert_allclose(out, ref64, atol=2e-5)


@pytest.mark.parametrize("rep", ["center", "oracle"])
def test_sparse_mask_equals_dense_restricted_to_the_same_tokens(rep):
  t, s, n, kv, h = 300, 300, 4, 2, 16
  q, k, v = _qkv(1, t, s, n, kv, h)
  cfg = sj.StreamConfig(block_q=16, block_k=16, top_k=3, representative=rep)
  mask = sj.estimate_mask(q, k, cfg)
  out, stats = sj.sparse_attention(q, k, v, mask)
  allowed = np.asarray(sj.to_dense(mask))
  assert allowed.mean() < 0.5, "the test needs a really sparse mask"
  ref64, probs = numpy_attention(q, k, v, allowed, h ** -0.5)
  np.testing.assert_allclose(out, ref64, atol=2e-5)
  np.testing.assert_allclose(out, sj.reference_attention(q, k, v, token_mask=allowed), atol=1e-5)
  # mass: the restricted probabilities summed per kept block
  n_q = mask.num_q_blocks
  pad = np.pad(probs, [(0, 0), (0, n_q * 16 - t), (0, mask.num_k_blocks * 16 - s)])
  block = pad.reshape(n, n_q, 16, -1, 16).sum((2, 4))
  np.testing.assert_allclose(stats.mass, sj.take_blocks(jnp.asarray(block), mask), atol=1e-5)


def test_window_mask_gives_exact_local_attention_in_linear_memory():
  t, n, h, w = 500, 2, 8, 64
  q, k, v = _qkv(4, t, t, n, 1, h)
  mask = sj.window_mask(n, t, t, block_q=32, block_k=16, window=w)
  assert mask.capacity == (32 + w - 2) // 16 + 2  # O(W / block_k), independent of T
  np.testing.assert_array_equal(sj.to_dense(mask, window=w),
                                np.broadcast_to(np.asarray(sj.to_dense(
                                    sj.window_mask(n, t, t, block_q=32, block_k=16), window=w)),
                                                (n, t, t)))
  out, _ = sj.sparse_attention(q, k, v, mask, window=w)
  np.testing.assert_allclose(out, sj.reference_attention(q, k, v, window=w), atol=1e-5)


def test_batch_rank4_and_bf16():
  b, t, n, kv, h = 2, 130, 4, 2, 16
  q, k, v = _qkv(2, b * t, b * t, n, kv, h, jnp.bfloat16)
  q, k, v = q.reshape(b, t, n, h), k.reshape(b, t, kv, h), v.reshape(b, t, kv, h)
  cfg = sj.StreamConfig(block_q=16, block_k=16, top_k=2)
  mask = sj.estimate_mask(q, k, cfg)
  out, stats = sj.sparse_attention(q, k, v, mask)
  assert out.dtype == jnp.bfloat16 and out.shape == q.shape
  assert stats.mass.shape == mask.indices.shape and stats.lse.shape == (b, n, t)
  for i in range(b):
    one = jax.tree_util.tree_map(lambda x: x[i], mask)
    o, s = sj.sparse_attention(q[i], k[i], v[i], one)
    np.testing.assert_array_equal(out[i], o)
    np.testing.assert_allclose(stats.mass[i], s.mass, atol=1e-6)
    ref = sj.reference_attention(q[i].astype(jnp.float32), k[i].astype(jnp.float32),
                             v[i].astype(jnp.float32), token_mask=sj.to_dense(one))
    np.testing.assert_allclose(np.asarray(o, np.float32), ref, atol=3e-2)


def test_chunked_equals_unchunked():
  q, k, v = _qkv(8, 400, 400, 2, 1, 8)
  mask = sj.estimate_mask(q, k, sj.StreamConfig(block_q=16, block_k=16, top_k=2))
  a, sa = sj.sparse_attention(q, k, v, mask, q_chunk=None)
  b, sb = sj.sparse_attention(q, k, v, mask, q_chunk=7)
  np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_allclose(sa.mass, sb.mass, atol=1e-6)


def test_row_without_keys_is_zero_not_nan():
  q, k, v = _qkv(0, 32, 32, 1, 1, 8)
  idx = jnp.full((1, 2, 1), -1, jnp.int32)
  mask = sj.BlockMask(idx, jnp.zeros((1, 2), jnp.int32), 16, 16, 32, 32)
  out, stats = sj.sparse_attention(q, k, v, mask)
  assert np.isfinite(out).all() and (np.asarray(out) == 0).all()
  assert (np.asarray(stats.mass) == 0).all() and np.isneginf(stats.lse).all()
