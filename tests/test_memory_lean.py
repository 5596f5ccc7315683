"""Memory-lean long context: the per-position work (MLP with its norms, full-length logits) runs over
chunks of positions (`stream_jax.models.layers.map_positions`) once T exceeds POSITION_CHUNK, with the same
results as the whole-sequence path and no [T, F] (or extra [T, V]) buffer in the compiled program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from stream_jax import StreamConfig
from stream_jax.models import Gemma, init_params
from stream_jax.models import layers
from tiny_models import tiny_config, tokens  # noqa: E402

UNCHUNKED = 1 << 30


def _run(cfg, params, tok, attention, chunk, monkeypatch, **kw):
  monkeypatch.setattr(layers, "POSITION_CHUNK", chunk)
  fn = jax.jit(lambda p, x: Gemma(cfg, jnp.float32).apply(p, x, attention, return_hidden=True, **kw))
  return fn(params, tok)


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_chunked_forward_equals_whole_sequence(family, monkeypatch):
  # T = 200 is no multiple of the 48-position chunk: four chunks and an 8-position remainder
  cfg = tiny_config(family, layers=2, layer_kinds=("local", "global"))
  params = init_params(cfg, jnp.float32, seed=1)
  tok = tokens(2, 200)
  for attention in ["dense", StreamConfig(block_q=16, block_k=16, top_k=2)]:
    whole = _run(cfg, params, tok, attention, UNCHUNKED, monkeypatch)
    chunked = _run(cfg, params, tok, attention, 48, monkeypatch)
    assert chunked.logits.shape == whole.logits.shape == (2, 200, cfg.vocab_size)
    np.testing.assert_allclose(chunked.logits, whole.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(chunked.hidden, whole.hidden, rtol=1e-5, atol=1e-5)
    if attention != "dense":
      for a, b in zip(chunked.trace.layers, whole.trace.layers):
        np.testing.assert_array_equal(a.mask.indices, b.mask.indices)
        np.testing.assert_allclose(a.mass, b.mass, rtol=1e-5, atol=1e-6)


def test_chunk_constant_and_short_inputs(monkeypatch):
  assert layers.POSITION_CHUNK == 8192
  cfg = tiny_config(layers=2)
  params = init_params(cfg, jnp.float32)
  tok = tokens(1, 40)
  # T <= chunk takes the plain path; T = 33 with chunk 32: one chunk and a one-position remainder
  for t in (40, 33):
    a = _run(cfg, params, tok[:, :t], "dense", UNCHUNKED, monkeypatch, last_only=True)
    b = _run(cfg, params, tok[:, :t], "dense", 32, monkeypatch, last_only=True)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-5)
  # initialising through the module at a long T creates the same parameter tree
  monkeypatch.setattr(layers, "POSITION_CHUNK", 8)
  shapes = jax.eval_shape(lambda: Gemma(cfg, jnp.float32).init(jax.random.key(0), tok))
  assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, params)


def _temp_bytes(cfg, t, chunk, monkeypatch, last_only=True):
  monkeypatch.setattr(layers, "POSITION_CHUNK", chunk)
  params = jax.eval_shape(lambda: init_params(cfg, jnp.float32))
  tok = jax.ShapeDtypeStruct((1, t), jnp.int32)
  fn = jax.jit(lambda p, x: Gemma(cfg, jnp.float32).apply(p, x, "dense", last_only=last_only))
  return fn.lower(params, tok).compile().memory_analysis().temp_size_in_bytes


def test_compiled_memory_has_no_t_by_f_buffer(monkeypatch):
  # a wide MLP (F = 64 D) so one [T, F] buffer dwarfs the attention side's few [T, D]-sized ones
  cfg = tiny_config(layers=2, hidden_dim=2048, vocab_size=2048)
  t = 16_384
  t_by_f = t * cfg.hidden_dim * 4
  whole = _temp_bytes(cfg, t, UNCHUNKED, monkeypatch)
  chunked = _temp_bytes(cfg, t, 1024, monkeypatch)
  print(f"temp bytes at T={t}: whole {whole:,}  chunked {chunked:,}  one [T, F] f32 {t_by_f:,}")
  assert whole > 2 * t_by_f  # gate, up, their product: the buffers the chunking removes
  assert chunked < 0.5 * t_by_f  # not one [T, F] buffer left
  assert chunked < whole / 6
  # full-length logits: the [T, V] output is the only buffer of that size (no temporary copy of it)
  full = _temp_bytes(cfg, t, 1024, monkeypatch, last_only=False)
  assert full < chunked + 0.5 * t * cfg.vocab_size * 4


class _Stack(nn.Module):
  """`depth` MLP blocks with residuals, each over position chunks: like the decoder's layers."""

  depth: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      mlp = layers.FeedForward(x.shape[-1], 4 * x.shape[-1], name=f"mlp_{i}")
      x = layers.map_positions(lambda m, xc: xc + m(xc), mlp, x, chunk=256)
    return x


def test_chunk_buffers_are_not_made_up_front():
  # each layer's loop works in place on its input: no per-layer [T, D] output buffer that XLA could build
  # ahead for every layer at once (what a zero-initialised buffer per layer did: 34 x [T, D] for Gemma 3 4B)
  x = jax.ShapeDtypeStruct((1, 8192, 64), jnp.float32)

  def temp(depth):
    model = _Stack(depth)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 64))))
    return jax.jit(model.apply).lower(params, x).compile().memory_analysis().temp_size_in_bytes

  t_by_d = 8192 * 64 * 4
  shallow, deep = temp(2), temp(8)
  print(f"temp bytes: 2 layers {shallow:,}  8 layers {deep:,}  one [T, D] {t_by_d:,}")
  assert deep < shallow + t_by_d
