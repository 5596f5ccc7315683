"""window_attention (the band's contiguous path) against a float64 brute-force oracle and against
sparse_attention over window_mask, the general path it stands in for; linear memory; bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stream_jax as sj
from reference import numpy_attention

CASES = [
    # t, n, kv, h, window, bq, bk, softcap, q_chunk, batched, suppress
    (128, 2, 1, 16, 32, 16, 16, None, 128, False, False),
    (300, 4, 2, 16, 37, 16, 32, None, 40, True, False),  # ragged T, bq < bk, chunk not a block multiple
    (257, 2, 1, 8, 100, 32, 16, 3.0, 64, True, True),  # bq > bk, softcap, suppressed keys
    (96, 2, 2, 8, 5, 16, 16, None, 16, False, True),  # window smaller than a block
    (70, 2, 1, 8, 500, 16, 16, None, 32, True, False),  # window longer than the sequence
    (1, 1, 1, 8, 3, 16, 16, None, 128, False, False),  # one token
]


def _inputs(seed, t, n, kv, h, batch):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  shape = (batch,) if batch else ()
  q = jax.random.normal(ks[0], shape + (t, n, h))
  k = jax.random.normal(ks[1], shape + (t, kv, h))
  v = jax.random.normal(ks[2], shape + (t, kv, h + 3))
  km = jax.random.uniform(ks[3], shape + (n, t)) > 0.3
  return q, k, v, km


def _oracle(q, k, v, allowed, scale, softcap, bq, bk, band):
  """float64 out [T, N, Hv], lse [N, T] and the band's mass [N, nQ, C] from the brute-force probabilities."""
  with np.errstate(invalid="ignore"):  # rows that see no key: NaN there, zeroed below
    out, probs = numpy_attention(q, k, v, allowed, scale, softcap)
  seen = allowed.any(-1)  # [N, T]
  out = np.where(seen.T[:, :, None], out, 0.0)
  probs = np.where(seen[:, :, None], probs, 0.0)
  logits = np.einsum("tnh,snh->nts", np.asarray(q, np.float64),
                     np.repeat(np.asarray(k, np.float64), q.shape[1] // k.shape[1], axis=1)) * scale
  if softcap is not None:
    logits = softcap * np.tanh(logits / softcap)
  with np.errstate(divide="ignore"):
    lse = np.log(np.where(allowed, np.exp(logits), 0.0).sum(-1))
  n, t, _ = probs.shape
  n_q, n_k = -(-t // bq), -(-t // bk)
  padded = np.zeros((n, n_q * bq, n_k * bk))
  padded[:, :t, :t] = probs
  blocks = padded.reshape(n, n_q, bq, n_k, bk).sum((2, 4))  # [N, nQ, nK]
  ids = np.asarray(band)  # [nQ, C]
  mass = np.where(ids >= 0, np.take_along_axis(blocks, np.maximum(ids, 0)[None].repeat(n, 0), -1), 0.0)
  return out, lse, mass


@pytest.mark.parametrize("case", CASES)
def test_equals_the_float64_oracle_and_the_gathered_sparse_path(case):
  t, n, kv, h, w, bq, bk, cap, chunk, batched, suppress = case
  batch = 2 if batched else 0
  q, k, v, km = _inputs(t + n, t, n, kv, h, batch)
  km = km if suppress else None
  out, stats = sj.window_attention(q, k, v, window=w, block_q=bq, block_k=bk, softcap=cap, key_mask=km,
                                   q_chunk=chunk)
  scale = h ** -0.5
  band = sj.window_mask(1, t, t, block_q=bq, block_k=bk, window=w).indices[0]
  pos = np.arange(t)
  causal = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < w)
  for i in range(max(batch, 1)):
    sel = (lambda x: x[i]) if batched else (lambda x: x)
    allowed = np.broadcast_to(causal, (n, t, t))
    if km is not None:
      allowed = allowed & np.asarray(sel(km))[:, None, :]
    want_out, want_lse, want_mass = _oracle(sel(q), sel(k), sel(v), allowed, scale, cap, bq, bk, band)
    np.testing.assert_allclose(np.asarray(sel(out)), want_out, atol=2e-5)
    np.testing.assert_allclose(np.asarray(sel(stats.mass)), want_mass, atol=2e-5)
    got_lse = np.asarray(sel(stats.lse))
    assert np.array_equal(np.isneginf(got_lse), np.isneginf(want_lse))  # rows that see no key
    np.testing.assert_allclose(got_lse[np.isfinite(want_lse)], want_lse[np.isfinite(want_lse)], atol=2e-5)
  # The general path over the same band mask: the same numbers.
  mask = sj.window_mask(n, t, t, block_q=bq, block_k=bk, window=w)
  if batched:
    mask = dataclasses.replace(mask, indices=jnp.broadcast_to(mask.indices, (batch,) + mask.indices.shape),
                               counts=jnp.broadcast_to(mask.counts, (batch,) + mask.counts.shape))
  ref_out, ref_stats = sj.sparse_attention(q, k, v, mask, softcap=cap, window=w, key_mask=km)
  np.testing.assert_allclose(out, ref_out, atol=1e-5)
  np.testing.assert_allclose(stats.mass, ref_stats.mass, atol=1e-5)
  np.testing.assert_allclose(stats.lse, ref_stats.lse, atol=1e-5)
  assert stats.mass.shape == ref_stats.mass.shape


def test_bf16_inputs_accumulate_in_f32():
  q, k, v, _ = _inputs(3, 200, 4, 1, 32, 1)
  lo = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  out, stats = sj.window_attention(*lo, window=64, block_q=16, block_k=16)
  ref, ref_stats = sj.window_attention(*[x.astype(jnp.float32) for x in lo], window=64, block_q=16,
                                       block_k=16)
  assert out.dtype == jnp.bfloat16 and stats.mass.dtype == jnp.float32
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=2e-2)
  np.testing.assert_allclose(stats.mass, ref_stats.mass, atol=1e-4)


def test_temp_memory_is_linear_in_t():
  """O(T x W): the compiled temporaries grow with T, never with T^2."""
  def temp(t):
    q = jax.ShapeDtypeStruct((1, t, 4, 64), jnp.float32)
    kk = jax.ShapeDtypeStruct((1, t, 1, 64), jnp.float32)
    f = jax.jit(lambda q, k: sj.window_attention(q, k, k, window=512, block_q=64, block_k=64))
    return f.lower(q, kk).compile().memory_analysis().temp_size_in_bytes
  small, large = temp(16_384), temp(65_536)
  assert large <= 4.5 * small
  assert large < 0.01 * 65_536 * 65_536 * 4


@pytest.mark.parametrize("kwargs, match", [
    (dict(window=0), "window must be an int >= 1"),
    (dict(window=2.5), "window must be an int >= 1"),
    (dict(block_q=24), "block_q must be a positive power of two"),
    (dict(q_chunk=0), "q_chunk must be an int >= 1"),
    (dict(softcap=-1.0), "softcap"),
    (dict(key_mask=jnp.ones((2, 10), bool)), r"key_mask must have shape \(2, 64\)"),
])
def test_bad_input_names_the_parameter(kwargs, match):
  q, k, v, _ = _inputs(0, 64, 2, 1, 8, 0)
  args = dict(window=16, block_q=16, block_k=16) | kwargs
  with pytest.raises(ValueError, match=match):
    sj.window_attention(q, k, v, **args)


def test_cross_attention_is_refused():
  q, _, _, _ = _inputs(0, 32, 2, 1, 8, 0)
  _, k, v, _ = _inputs(1, 64, 2, 1, 8, 0)
  with pytest.raises(ValueError, match="same length"):
    sj.window_attention(q, k, v, window=16, block_q=16, block_k=16)
