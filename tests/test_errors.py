"""Bad input fails early with the parameter's name, never deep inside XLA."""

import jax.numpy as jnp
import numpy as np
import pytest

import stream_jax as sj

Q = jnp.zeros((64, 4, 16))
K = jnp.zeros((64, 2, 16))


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_q=0), "block_q"), (dict(block_q=48), "block_q"), (dict(block_k=-64), "block_k"),
    (dict(block_k=3), "block_k"), (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(sink_blocks=-1), "sink_blocks"), (dict(window_blocks=0), "window_blocks"),
    (dict(init_branches=4, top_k=8), "init_branches"), (dict(representative="median"), "representative"),
    (dict(query_stride=3), "query_stride"), (dict(query_stride=128, block_q=64), "query_stride"),
])
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sj.StreamConfig(**kwargs)


def test_config_is_hashable_and_static():
  assert hash(sj.StreamConfig()) == hash(sj.StreamConfig())
  assert sj.StreamConfig().capacity == 1 + 16 + 2


@pytest.mark.parametrize("q,k,exc,match", [
    (jnp.zeros((64, 3, 16)), K, ValueError, "multiple of kv heads"),
    (Q, jnp.zeros((64, 2, 8)), ValueError, "head dims"),
    (jnp.zeros((80, 4, 16)), K, ValueError, "T=80 > S=64"),
    (jnp.zeros((64, 16)), K, ValueError, "rank"),
    (Q, jnp.zeros((1, 64, 2, 16)), ValueError, "same rank"),
    (jnp.zeros((64, 4, 16), jnp.int32), K, TypeError, "q must be a floating-point"),
    (Q, np.zeros((64, 2, 16), bool), TypeError, "k must be a floating-point"),
    (jnp.zeros((2, 64, 4, 16)), jnp.zeros((3, 64, 2, 16)), ValueError, "batch sizes"),
])
def test_estimate_rejects_bad_shapes(q, k, exc, match):
  with pytest.raises(exc, match=match):
    sj.estimate_mask(q, k, sj.StreamConfig(block_q=16, block_k=16))


def test_estimate_rejects_bad_options():
  cfg = sj.StreamConfig(block_q=16, block_k=16)
  with pytest.raises(TypeError, match="config must be a StreamConfig"):
    sj.estimate_mask(Q, K, {"top_k": 4})
  with pytest.raises(ValueError, match="scale"):
    sj.estimate_mask(Q, K, cfg, scale=-1.0)
  with pytest.raises(ValueError, match="softcap"):
    sj.estimate_mask(Q, K, cfg, softcap=0.0)
  with pytest.raises(ValueError, match="q_chunk"):
    sj.estimate_mask(Q, K, cfg, q_chunk=0)
  with pytest.raises(ValueError, match="backend"):
    sj.estimate_mask(Q, K, cfg, backend="cuda")


def test_attention_rejects_mismatched_mask_and_values():
  cfg = sj.StreamConfig(block_q=16, block_k=16)
  mask = sj.estimate_mask(Q, K, cfg)
  with pytest.raises(ValueError, match="v must have shape"):
    sj.sparse_attention(Q, K, jnp.zeros((32, 2, 16)), mask)
  with pytest.raises(ValueError, match="mask was made for"):
    sj.sparse_attention(Q[:32], K, K, mask)
  with pytest.raises(ValueError, match="mask.indices must have shape"):
    sj.sparse_attention(jnp.zeros((64, 2, 16)), K, K, mask)
  with pytest.raises(TypeError, match="mask must be a BlockMask"):
    sj.sparse_attention(Q, K, K, mask.indices)
  with pytest.raises(ValueError, match="window"):
    sj.sparse_attention(Q, K, K, mask, window=0)


def test_dense_helpers_refuse_long_inputs():
  mask = sj.window_mask(1, 16_384, 16_384, block_q=64, block_k=64, window=512)
  with pytest.raises(ValueError, match="to_dense"):
    sj.to_dense(mask)
  with pytest.raises(ValueError, match="window must be >= 1"):
    sj.window_mask(1, 64, 64, block_q=16, block_k=16, window=0)
