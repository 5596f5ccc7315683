"""Standard formats of a kept set: BCOO, FlexAttention block masks, dense block matrices; round trips, values
against a numpy scatter, FlexAttention's attention against sparse_attention, imported masks forced into a
forward."""

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import sparse

from stream_jax import StreamConfig, estimate_mask, reference_attention, formats, intervene as I, sparse_attention
from stream_jax.mask import masks_equal, to_dense, window_mask
from stream_jax.models import forward, init_params
from tiny_models import tiny_config, tokens

# Queries and keys of different block sizes (FlexAttention's BLOCK_SIZE is (Q, KV)); T not a multiple.
CFG = StreamConfig(block_q=16, block_k=8, top_k=2, sink_blocks=1, window_blocks=1)


def _case(b=2, t=60, n=4, kv=2, h=8, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, m, h)), jnp.float32) for m in (n, kv, kv))
  mask = estimate_mask(q, k, CFG)
  _, stats = sparse_attention(q, k, v, mask)
  return q, k, v, mask, stats.mass


def _layout(mask):
  return dict(block_q=mask.block_q, block_k=mask.block_k, q_len=mask.q_len, k_len=mask.k_len)


def test_bcoo_round_trip_and_values_equal_the_mass():
  _, _, _, mask, mass = _case()
  assert (np.asarray(mask.counts) < mask.num_k_blocks).any()  # really sparse somewhere
  m = formats.to_bcoo(mask, mass)
  assert m.shape == mask.indices.shape[:-1] + (mask.num_k_blocks,)
  ref = np.zeros(m.shape, np.float64)  # numpy scatter of the mass at the kept ids
  ids, ms = np.asarray(mask.indices), np.asarray(mass, np.float64)
  for pos in np.ndindex(ids.shape):
    if ids[pos] >= 0:
      ref[pos[:-1] + (ids[pos],)] += ms[pos]
  np.testing.assert_allclose(np.asarray(m.todense()), ref, rtol=1e-6)
  assert masks_equal(formats.from_bcoo(m, capacity=mask.capacity, **_layout(mask)), mask)
  # Another layout (no batch axes, nonzeros only) of the same kept set imports to the same mask.
  other = sparse.BCOO.fromdense(formats.to_block_matrix(mask).astype(jnp.float32))
  assert other.n_batch == 0
  assert masks_equal(formats.from_bcoo(other, capacity=mask.capacity, **_layout(mask)), mask)


def test_token_bcoo_is_the_token_rule():
  _, _, _, mask, _ = _case(b=1)
  for window in (None, 20):
    tok = formats.to_token_bcoo(mask, window=window)
    np.testing.assert_array_equal(np.asarray(tok.todense()) > 0, np.asarray(to_dense(mask, window=window)))


def test_flex_arrays_round_trip():
  _, _, _, mask, _ = _case()
  arrays = formats.to_flex_blocks(mask)
  assert arrays["kv_indices"].shape == mask.indices.shape and arrays["block_size"] == (16, 8)
  back = formats.from_flex_blocks(arrays["kv_num_blocks"], arrays["kv_indices"], block_size=arrays["block_size"],
                                  q_len=mask.q_len, k_len=mask.k_len, capacity=mask.capacity)
  assert masks_equal(back, mask)


def test_block_matrix_round_trip_values_and_limit():
  _, _, _, mask, mass = _case()
  dense = formats.to_block_matrix(mask)
  assert dense.dtype == jnp.bool_
  assert masks_equal(formats.from_block_matrix(dense, capacity=mask.capacity, **_layout(mask)), mask)
  np.testing.assert_allclose(np.asarray(formats.to_block_matrix(mask, mass)),
                             np.asarray(formats.to_bcoo(mask, mass).todense()), rtol=1e-6)
  big = window_mask(1, 1 << 17, 1 << 17, block_q=64, block_k=64, window=128)
  with pytest.raises(ValueError, match=r"BLOCK_MATRIX_LIMIT = 1048576"):
    formats.to_block_matrix(big)


def test_import_errors_name_the_argument():
  _, _, _, mask, _ = _case()
  arrays = formats.to_flex_blocks(mask)
  bad = arrays["kv_indices"].copy()
  bad[0, 0, 0, 0] = 99
  with pytest.raises(ValueError, match=r"kv_indices has block ids \[99\] outside \[0, 8\)"):
    formats.from_flex_blocks(arrays["kv_num_blocks"], bad, block_size=(16, 8), q_len=60, k_len=60)
  with pytest.raises(ValueError, match=r"capacity must be an int >= the most blocks"):
    formats.from_flex_blocks(arrays["kv_num_blocks"], arrays["kv_indices"], block_size=(16, 8), q_len=60,
                             k_len=60, capacity=1)
  with pytest.raises(ValueError, match=r"matrix must have shape \[..., N, nQ, nK\] = \[..., N, 4, 8\]"):
    formats.from_block_matrix(np.ones((4, 4, 7), bool), block_q=16, block_k=8, q_len=60, k_len=60)
  with pytest.raises(ValueError, match=r"mass must have the shape of mask.indices"):
    formats.to_bcoo(mask, jnp.ones((3,)))


def test_flex_attention_through_the_export_equals_sparse_attention():
  torch = pytest.importorskip("torch")
  from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention
  q, k, v, mask, _ = _case(b=2, t=64)
  tq, tk, tv = (torch.as_tensor(np.array(x)).transpose(1, 2) for x in (q, k, v))  # [B, N|K, T, H]
  for window in (None, 24):
    ours, _ = sparse_attention(q, k, v, mask, window=window)
    bm = formats.to_torch_block_mask(mask, window=window)
    theirs = flex_attention(tq, tk, tv, block_mask=bm, enable_gqa=True).transpose(1, 2).numpy()
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=2e-5)
    assert np.abs(np.asarray(reference_attention(q, k, v, window=window)) - theirs).max() > 1e-3  # not dense
    # The block lists themselves (what a compiled flex_attention skips by): torch's dense block view and
    # the token mask its mask_mod implies equal ours.
    np.testing.assert_array_equal(bm.to_dense().numpy().astype(bool), np.asarray(formats.to_block_matrix(mask)))
    token = create_mask(bm.mask_mod, 2, 4, 64, 64, device="cpu").numpy()
    np.testing.assert_array_equal(token, np.asarray(to_dense(mask, window=window)))
  assert masks_equal(formats.from_torch_block_mask(bm, capacity=mask.capacity), mask)
  # torch's own causal block mask (full + partial blocks) imports as every causally visible block.
  causal = create_block_mask(formats.causal_mask_mod(64, 64), 1, 4, 64, 64, device="cpu", BLOCK_SIZE=(16, 8))
  assert int(causal.full_kv_num_blocks.sum()) > 0
  got = formats.from_torch_block_mask(causal)
  np.testing.assert_array_equal(np.asarray(formats.to_block_matrix(got))[0], np.asarray(
      formats.to_block_matrix(window_mask(4, 64, 64, block_q=16, block_k=8))))


def test_an_imported_mask_forced_into_a_forward_reproduces_the_trace():
  cfg = tiny_config()
  params = init_params(cfg, seed=5, scale=0.3)
  x = tokens(1, 40, seed=2)
  sc = StreamConfig(block_q=8, block_k=8, top_k=1, sink_blocks=0, window_blocks=1)
  run = forward(cfg, params, x, attention=sc)
  layer = run.trace.layers[5]  # the global layer
  arrays = formats.to_flex_blocks(layer.mask)
  imported = formats.from_flex_blocks(arrays["kv_num_blocks"], arrays["kv_indices"],
                                      block_size=arrays["block_size"], q_len=40, k_len=40)
  forced = forward(cfg, params, x, attention=sc, intervention=I.force_masks({5: imported}, num_layers=6))
  np.testing.assert_allclose(np.asarray(forced.logits), np.asarray(run.logits), atol=1e-5)
  # A different imported kept set changes the output: every causal block.
  every = formats.from_block_matrix(formats.to_block_matrix(window_mask(4, 40, 40, block_q=8, block_k=8))[None],
                                    block_q=8, block_k=8, q_len=40, k_len=40)
  other = forward(cfg, params, x, attention=sc, intervention=I.force_masks({5: every}, num_layers=6))
  assert np.abs(np.asarray(other.logits) - np.asarray(run.logits)).max() > 1e-4
