"""The ideal trace inside the model (StreamConfig.select="ideal"): exact output, kept sets equal to the float64
brute force on each global layer's own q and k, exact coverage; and the sparse variant."""

import jax.numpy as jnp
import numpy as np
import pytest

import stream_jax as sj
from stream_jax.models import forward
from stream_jax.models.params import init_params
from stream_jax.models.transformer import Gemma
import reference
from tiny_models import tiny_config, tokens


def layer_qk(cfg, params, hidden, layer, dtype=jnp.float32):
  """q, k of `layer` recomputed from the previous layer's output (hidden holds each layer's output)."""
  def qk(mdl, h):
    block = mdl.blocks[layer]
    return block.attn.qkv(block.pre_attention_norm(h), jnp.arange(h.shape[1]))
  q, k, _ = Gemma(cfg, dtype).apply(params, hidden[layer - 1], method=qk)
  return q, k


def check_ideal_layer(lt, q, k, cfg, model_cfg, t, coverage):
  """Kept sets equal brute force (outside ambiguous rows), mass and coverage are the dense ones."""
  m, kept, ambiguous = reference.ideal_kept_sets(q, k, cfg, scale=model_cfg.attn_scale,
                                                 softcap=model_cfg.attn_softcap)
  idx, mass, cov = (np.asarray(x) for x in (lt.mask.indices, lt.mass, lt.coverage))
  checked = 0
  for (n, j), want in kept.items():
    got = idx[n, j][idx[n, j] >= 0]
    np.testing.assert_allclose(mass[n, j, :len(got)], m[n, j, got], rtol=1e-3, atol=3e-5)
    rows = min(cfg.block_q, t - j * cfg.block_q)
    np.testing.assert_allclose(cov[n, j], m[n, j, got].sum() / rows, rtol=1e-3, atol=3e-5)
    if len(got) < cfg.capacity and coverage is not None:
      assert cov[n, j] >= coverage - 1e-4, (n, j)
    if (n, j) not in ambiguous:
      assert set(got.tolist()) == want, (n, j)
      checked += 1
  assert checked >= 0.95 * len(kept)
  return idx


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])  # gemma2: attention soft-cap
def test_ideal_exact_trace_on_a_tiny_model(family):
  mcfg = tiny_config(family, window=24)
  params = init_params(mcfg, seed=3, scale=0.3)
  x = tokens(1, 200)
  dense = forward(mcfg, params, x, return_hidden=True)
  cfg = sj.StreamConfig.ideal(block_q=8, block_k=8, top_k=6, coverage=0.8)
  run = forward(mcfg, params, x, attention=cfg, output="exact")
  np.testing.assert_allclose(np.asarray(run.logits), np.asarray(dense.logits), rtol=1e-5, atol=1e-5)
  glob = [lt for lt in run.trace.layers if lt.kind == "global"]
  assert glob and all(lt.mode == "exact" for lt in glob)
  for lt in glob:
    q, k = layer_qk(mcfg, params, dense.hidden, lt.layer)
    idx = check_ideal_layer(jax_first(lt), q[0], k[0], cfg, mcfg, 200, 0.8)
    assert (idx >= 0).sum(-1).min() < cfg.capacity  # the budget binds: fewer blocks than the cap


def jax_first(lt):
  """The layer trace of batch element 0."""
  import dataclasses
  mask = dataclasses.replace(lt.mask, indices=lt.mask.indices[0], counts=lt.mask.counts[0])
  return dataclasses.replace(lt, mask=mask, mass=lt.mass[0], coverage=lt.coverage[0])


def test_ideal_sparse_trace_attends_through_the_ideal_set():
  mcfg = tiny_config("gemma3", window=24)
  params = init_params(mcfg, seed=1, scale=0.3)
  x = tokens(1, 160)
  cfg = sj.StreamConfig.ideal(block_q=8, block_k=8, top_k=4, coverage=0.9)
  exact = forward(mcfg, params, x, attention=cfg, output="exact")
  sparse = forward(mcfg, params, x, attention=cfg)
  dense = forward(mcfg, params, x)
  first = next(lt for lt in sparse.trace.layers if lt.kind == "global")
  # the first global layer sees the same inputs in both modes: the same ideal set and true coverage
  ex = exact.trace.layers[first.layer]
  assert np.array_equal(np.asarray(first.mask.indices), np.asarray(ex.mask.indices))
  np.testing.assert_allclose(np.asarray(first.coverage), np.asarray(ex.coverage), rtol=1e-6)
  assert first.mode == "stream"
  # sparse mass is normalised over the kept blocks: each full query block's row sums to block_q
  np.testing.assert_allclose(np.asarray(first.mass).sum(-1)[..., :-1], 8.0, rtol=1e-4)
  assert np.abs(np.asarray(sparse.logits) - np.asarray(dense.logits)).max() > 1e-4  # pruned model differs


def test_estimate_mask_refuses_an_ideal_config():
  q = jnp.zeros((64, 2, 8))
  with pytest.raises(ValueError, match="ideal_mask"):
    sj.estimate_mask(q, q, sj.StreamConfig.ideal(block_q=16, block_k=16))


def test_ideal_preset_and_select_validation():
  c = sj.StreamConfig.ideal()
  assert (c.top_k, c.coverage, c.select, c.score) == (128, 0.95, "ideal", "mass")
  assert sj.StreamConfig.ideal(coverage=None).score == "max"
  with pytest.raises(ValueError, match="select"):
    sj.StreamConfig(select="best")
