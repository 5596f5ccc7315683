"""No T x T anywhere on the Stream path: compiled memory of the estimator and the attention is linear."""

import jax
import jax.numpy as jnp
import pytest

import stream_jax as sj

CFG = sj.StreamConfig()


def _compiled_temp_bytes(t):
  q = jax.ShapeDtypeStruct((t, 1, 64), jnp.float32)
  est = jax.jit(lambda q, k: sj.estimate_mask(q, k, CFG)).lower(q, q).compile()
  mask = jax.eval_shape(lambda q, k: sj.estimate_mask(q, k, CFG), q, q)
  att = jax.jit(lambda q, k, v, m: sj.sparse_attention(q, k, v, m)).lower(q, q, q, mask).compile()
  return est.memory_analysis().temp_size_in_bytes, att.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("which", [0, 1], ids=["estimate_mask", "sparse_attention"])
def test_temp_memory_is_linear_in_t(which):
  small, large = 16_384, 65_536
  m_small = _compiled_temp_bytes(small)[which]
  m_large = _compiled_temp_bytes(large)[which]
  print(f"temp bytes at T={small}: {m_small:,}  T={large}: {m_large:,}  ratio {m_large / m_small:.2f}")
  assert m_large <= 4.5 * m_small
  # one T x T float32 buffer at 65,536 would be 17 GB; the whole working set stays under 1% of that
  assert m_large < 0.01 * large * large * 4
