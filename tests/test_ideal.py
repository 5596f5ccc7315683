"""The ideal kept set (stream_jax.ideal) against brute force in float64 numpy.

The oracle: dense probabilities from float64 logits -> block masses M[n, j, c] -> per (head, query block)
the rule blocks (sink, window) plus the searchable blocks by descending mass (ties by block id), top_k of
them, or the fewest whose mass with the rule blocks' reaches the target x the row total. Rows whose float64
decision sits within 1e-6 of the threshold are skipped (float32 may decide either way there).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stream_jax as sj
from stream_jax import dense
from stream_jax.ideal import ideal_mask
import reference

C = sj.StreamConfig


def _inputs(t, s, n, kv, h, seed, spread=1.5, dtype=jnp.float32, batch=None):
  rng = np.random.default_rng(seed)
  shape_q = ((batch,) if batch else ()) + (t, n, h)
  shape_k = ((batch,) if batch else ()) + (s, kv, h)
  q = rng.normal(size=shape_q)
  k = rng.normal(size=shape_k) * spread
  # a few keys every query likes: concentrated heads, so small budgets reach high coverage
  k[..., rng.choice(s, size=max(1, s // 50), replace=False), :, :] *= 3.0
  return jnp.asarray(q, dtype), jnp.asarray(k, dtype)


def _lse(q, k, scale, softcap=None, window=None, key_mask=None):
  t, s = q.shape[-3], k.shape[-3]
  pos = jnp.arange(t) + (s - t)
  v = jnp.zeros(k.shape[:-1] + (1,), q.dtype)
  qq, kk, vv = (x if x.ndim == 4 else x[None] for x in (q, k, v))
  km = None if key_mask is None else jnp.asarray(key_mask)[None]
  _, lse = dense.dense_attention(qq, kk, vv, q_pos=pos, k_pos=jnp.arange(s), scale=scale, softcap=softcap,
                                 window=window, k_valid=km, return_lse=True)
  return lse if q.ndim == 4 else lse[0]


def _brute(q, k, cfg, scale, softcap=None, window=None, key_mask=None):
  return reference.ideal_kept_sets(q, k, cfg, scale=scale, softcap=softcap, window=window, key_mask=key_mask)


CASES = [
    # t, s, n, kv, h, block, top_k, coverage, sink, window
    (640, 640, 4, 2, 32, 32, 4, None, 1, 2),
    (640, 640, 4, 2, 32, 32, 24, 0.9, 1, 2),
    (700, 700, 2, 1, 16, 16, 30, 0.5, 1, 1),  # ragged last block, 16-token blocks
    (500, 800, 4, 4, 32, 64, 3, 0.95, 2, 1),  # queries are the last 500 of 800 positions
    (256, 256, 2, 1, 16, 32, 2, None, 0, 1),  # no sink
]


@pytest.mark.parametrize("t,s,n,kv,h,block,top_k,coverage,sink,window", CASES)
def test_ideal_equals_brute_force(t, s, n, kv, h, block, top_k, coverage, sink, window):
  q, k = _inputs(t, s, n, kv, h, seed=t + top_k)
  cfg = C(block_q=block, block_k=block, top_k=top_k, coverage=coverage, sink_blocks=sink,
          window_blocks=window)
  scale = h ** -0.5
  res = ideal_mask(q, k, _lse(q, k, scale), cfg, scale=scale, query_blocks=3)
  m, kept, ambiguous = _brute(q, k, cfg, scale)
  idx, mass, cov = np.asarray(res.mask.indices), np.asarray(res.mass), np.asarray(res.coverage)
  assert idx.shape == (n, -(-t // block), cfg.capacity)
  assert np.array_equal(np.asarray(res.mask.counts), (idx >= 0).sum(-1))
  checked = 0
  for (hd, j), want in kept.items():
    row = idx[hd, j]
    got = row[row >= 0]
    assert np.all(np.diff(got) > 0) and np.all(row[len(got):] == -1)  # ascending, padded at the end
    np.testing.assert_allclose(mass[hd, j, :len(got)], m[hd, j, got], rtol=2e-4, atol=2e-6)
    rows = min(block, t - j * block)
    np.testing.assert_allclose(cov[hd, j], m[hd, j, got].sum() / rows, rtol=2e-4, atol=2e-6)
    if (hd, j) in ambiguous:
      continue
    assert set(got.tolist()) == want, (hd, j)
    checked += 1
  assert checked > 0.9 * len(kept)
  if coverage is not None:  # the budget binds somewhere and is met wherever the cap allows
    pruned = [key for key in kept if len(kept[key]) < cfg.capacity]
    assert all(cov[key] >= coverage - 1e-4 for key in pruned)


def test_batched_equals_per_example_and_bf16_runs():
  q, k = _inputs(384, 384, 4, 2, 32, seed=5, batch=2)
  cfg = C(block_q=32, block_k=32, top_k=5, coverage=0.8)
  lse = _lse(q, k, 32 ** -0.5)
  both = ideal_mask(q, k, lse, cfg)
  for b in range(2):
    one = ideal_mask(q[b], k[b], lse[b], cfg)
    assert np.array_equal(np.asarray(both.mask.indices[b]), np.asarray(one.mask.indices))
    np.testing.assert_allclose(np.asarray(both.mass[b]), np.asarray(one.mass), rtol=1e-6)
  res = ideal_mask(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), lse, cfg)
  assert res.mass.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(res.coverage)))


def test_softcap_and_jit():
  q, k = _inputs(256, 256, 2, 1, 16, seed=9, spread=4.0)
  cfg = C(block_q=16, block_k=16, top_k=3)
  scale, cap = 0.25, 5.0
  lse = _lse(q, k, scale, softcap=cap)
  res = jax.jit(lambda q, k, l: ideal_mask(q, k, l, cfg, scale=scale, softcap=cap))(q, k, lse)
  m, kept, _ = _brute(q, k, cfg, scale, softcap=cap)
  idx = np.asarray(res.mask.indices)
  for (hd, j), want in kept.items():
    assert set(idx[hd, j][idx[hd, j] >= 0].tolist()) == want


def test_window_and_key_mask():
  q, k = _inputs(512, 512, 4, 2, 16, seed=4)
  rng = np.random.default_rng(1)
  key_mask = rng.random((4, 512)) > 0.3
  key_mask[:, 0] = True
  cfg = C(block_q=32, block_k=32, top_k=3, coverage=0.8)
  lse = _lse(q, k, 0.25, window=200, key_mask=key_mask)
  res = ideal_mask(q, k, lse, cfg, scale=0.25, window=200, key_mask=jnp.asarray(key_mask))
  m, kept, ambiguous = _brute(q, k, cfg, 0.25, window=200, key_mask=key_mask)
  idx, mass = np.asarray(res.mask.indices), np.asarray(res.mass)
  for (hd, j), want in kept.items():
    got = idx[hd, j][idx[hd, j] >= 0]
    np.testing.assert_allclose(mass[hd, j, :len(got)], m[hd, j, got], rtol=2e-4, atol=2e-6)
    if (hd, j) not in ambiguous:
      assert set(got.tolist()) == want, (hd, j)


def test_ideal_beats_or_equals_the_oracle_estimator_of_the_same_budget():
  """The oracle representative with mass scores is the same selector computed the slow way (its own lse):
  the kept sets agree."""
  q, k = _inputs(512, 512, 4, 2, 32, seed=3)
  cfg = C(block_q=32, block_k=32, top_k=6, coverage=0.9, representative="oracle")
  est = sj.estimate_mask(q, k, cfg)
  res = ideal_mask(q, k, _lse(q, k, 32 ** -0.5), cfg)
  same = np.mean(np.all(np.asarray(est.indices) == np.asarray(res.mask.indices), -1))
  assert same > 0.97


@pytest.mark.parametrize("bad,match", [
    (dict(lse=np.zeros((4, 100), np.float32)), "lse must have shape"),
    (dict(query_blocks=0), "query_blocks"),
    (dict(config="x"), "StreamConfig"),
])
def test_bad_inputs_are_named(bad, match):
  q, k = _inputs(128, 128, 4, 2, 16, seed=0)
  kw = dict(lse=_lse(q, k, 0.25), config=C(block_q=16, block_k=16, top_k=2), query_blocks=2)
  kw.update(bad)
  with pytest.raises((ValueError, TypeError), match=match):
    ideal_mask(q, k, kw.pop("lse"), kw.pop("config"), **kw)


def test_memory_is_linear_in_t():
  """Compiled temporaries grow ~linearly with T (the chunk's rows of M are [N, chunk, nK]): 4x T must not
  cost 16x memory; at 16k a T x S float32 buffer per head would be 1 GiB."""
  def temp_bytes(t):
    q = jax.ShapeDtypeStruct((t, 4, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((t, 2, 64), jnp.bfloat16)
    lse = jax.ShapeDtypeStruct((4, t), jnp.float32)
    cfg = C(top_k=16, coverage=0.9)
    f = jax.jit(lambda q, k, l: ideal_mask(q, k, l, cfg))
    return f.lower(q, k, lse).compile().memory_analysis().temp_size_in_bytes
  small, big = temp_bytes(4096), temp_bytes(16384)
  assert big < 6 * small, (small, big)
  assert big < 16384 * 16384 * 4 / 8, big  # far under one T x S float32 buffer


# ------------------------------------------------------------------- the Triton block-mass kernel

@pytest.mark.parametrize("t,s,block,top_k,coverage,softcap,window", [
    (320, 320, 32, 3, 0.9, None, None),
    (300, 400, 16, 4, None, 5.0, None),  # ragged, queries the last 300 of 400, soft-cap
    (256, 256, 32, 2, 0.8, None, 100),  # sliding window
    (700, 700, 16, 6, 0.9, None, None),  # past two 16-block key groups: the unmasked (free) tiles, base 2
    (600, 640, 16, 6, None, 8.0, None),  # free tiles with a soft-cap
])
def test_kernel_interpreted_equals_the_xla_reference(t, s, block, top_k, coverage, softcap, window):
  q, k = _inputs(t, s, 4, 2, 32, seed=t + s)
  cfg = C(block_q=block, block_k=block, top_k=top_k, coverage=coverage)
  lse = _lse(q, k, 0.2, softcap=softcap, window=window)
  kw = dict(scale=0.2, softcap=softcap, window=window)
  ref = ideal_mask(q, k, lse, cfg, backend="xla", **kw)
  ker = ideal_mask(q, k, lse, cfg, backend="pallas", query_blocks=3, **kw)  # 3: a ragged last chunk
  same = np.all(np.asarray(ref.mask.indices) == np.asarray(ker.mask.indices), -1)
  assert same.mean() > 0.98, same.mean()  # summation order may swap a near-tie
  both = np.asarray(ref.mask.indices) >= 0
  np.testing.assert_allclose(np.asarray(ker.mass)[same], np.asarray(ref.mass)[same], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ker.coverage), np.asarray(ref.coverage), rtol=1e-3, atol=1e-5)
  assert both.any()


def test_kernel_refuses_a_key_mask_on_pallas_and_auto_falls_back():
  q, k = _inputs(128, 128, 2, 1, 16, seed=0)
  cfg = C(block_q=16, block_k=16, top_k=2)
  lse = _lse(q, k, 0.25)
  with pytest.raises(ValueError, match="key_mask"):
    ideal_mask(q, k, lse, cfg, key_mask=jnp.ones((2, 128), bool), backend="pallas")
  ideal_mask(q, k, lse, cfg, key_mask=jnp.ones((2, 128), bool), backend="auto")  # XLA off the GPU


@pytest.mark.parametrize("dtype,softcap,window", [(jnp.bfloat16, None, None), (jnp.float16, 50.0, 1024)])
def test_kernel_lowers_for_cuda(dtype, softcap, window):
  from cuda_lowering import lower_for_cuda
  from stream_jax import ideal
  q = jax.ShapeDtypeStruct((2, 4000, 8, 256), dtype)
  k = jax.ShapeDtypeStruct((2, 4100, 4, 256), dtype)
  lse = jax.ShapeDtypeStruct((2, 8, 4000), jnp.float32)
  cfg = C.ideal(top_k=32, coverage=0.9)
  fn = lambda q, k, l: ideal._ideal_kernel(q, k, l, config=cfg, scale=0.0625, softcap=softcap,  # noqa: E731
                                           window=window, query_blocks=16, interpret=False)
  text = lower_for_cuda(fn, q, k, lse)
  assert "triton" in text
