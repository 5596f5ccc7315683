"""The dense implementations the benchmarks compare (xla, cudnn, capture) and logits from hidden states."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stream_jax import StreamConfig
from stream_jax.models import forward, init_params, logits_from_hidden
from tiny_models import tiny_config, tokens


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_capture_returns_the_probabilities_of_the_dense_forward(family):
  cfg = tiny_config(family, window=8)
  params = init_params(cfg, jnp.float32, seed=1)
  x = tokens(2, 40)
  ref = forward(cfg, params, x).logits
  _run = forward(cfg, params, x, dense_impl="capture")
  logits, probs = _run.logits, _run.probs
  np.testing.assert_allclose(logits, ref, atol=1e-5)
  assert len(probs) == cfg.num_layers and probs[0].shape == (2, cfg.num_heads, 40, 40)
  p = np.asarray(probs[0])
  np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
  assert np.triu(p[0, 0], 1).max() == 0, "causal"
  local = cfg.layer_kinds.index("local")
  rows, cols = np.nonzero(np.asarray(probs[local])[0, 0] > 0)
  assert (rows - cols).max() < cfg.sliding_window, "local layers keep their window"


def test_cudnn_impl_equals_xla_and_refuses_softcap():
  cfg = tiny_config("gemma3", window=8)
  params = init_params(cfg, jnp.float32, seed=2)
  x = tokens(1, 33)
  ref = forward(cfg, params, x).logits
  _run = forward(cfg, params, x, dense_impl="cudnn")
  fast, trace = _run.logits, _run.trace  # XLA's implementation off GPU
  assert trace is None
  np.testing.assert_allclose(fast, ref, atol=1e-4)
  with pytest.raises(ValueError, match="soft-cap"):
    forward(tiny_config("gemma2"), init_params(tiny_config("gemma2")), x, dense_impl="cudnn")
  with pytest.raises(ValueError, match="dense_impl must be one of"):
    forward(cfg, params, x, dense_impl="flash")
  with pytest.raises(ValueError, match="attention='dense' calls only"):
    forward(cfg, params, x, attention=StreamConfig(block_q=16, block_k=16), dense_impl="capture")


def test_logits_from_hidden_equal_the_forward_logits():
  cfg = tiny_config("gemma2")
  params = init_params(cfg, jnp.float32, seed=3)
  x = tokens(2, 20)
  _run = forward(cfg, params, x, return_hidden=True)
  logits, hidden = _run.logits, _run.hidden
  np.testing.assert_allclose(logits_from_hidden(cfg, params, hidden[-1]), logits, atol=1e-5)
  np.testing.assert_allclose(logits_from_hidden(cfg, params, hidden[-1, 0, 3]), logits[0, 3], atol=1e-5)
  last = forward(cfg, params, x, last_only=True).logits
  np.testing.assert_allclose(last, logits[:, -1], atol=1e-5)


def test_pallas_backend_in_the_model_equals_xla():
  """The model's Stream path through the Pallas kernels (interpret mode off GPU) matches the XLA path."""
  cfg = tiny_config("gemma3", window=32, head_dim=32)
  params = init_params(cfg, jnp.float32, seed=1)
  x = tokens(1, 150)
  sc = StreamConfig(block_q=16, block_k=16, top_k=2)
  _run = forward(cfg, params, x, attention=sc)
  a, ta = _run.logits, _run.trace
  _run = forward(cfg, params, x, attention=sc, backend="pallas")
  b, tb = _run.logits, _run.trace
  np.testing.assert_allclose(a, b, atol=1e-5)
  for la, lb in zip(ta.layers, tb.layers):
    np.testing.assert_array_equal(la.mask.indices, lb.mask.indices)
    np.testing.assert_allclose(la.mass, lb.mass, atol=1e-5)
