"""Gates on kept edges and attribution patching: the gated softmax against a float64 loop, the gradient
against finite differences of the gate, gate-0 ablations against the existing interventions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stream_jax import StreamConfig, intervene as I, sparse_attention
from stream_jax.attribution import drop_edge, edge_attribution, top_edges
from stream_jax.mask import window_mask
from stream_jax.models import forward, init_params
from tiny_models import tiny_config, tokens

SC = StreamConfig(block_q=8, block_k=8, top_k=2, sink_blocks=1, window_blocks=1)
T = 48


def _gated_reference(q, k, v, indices, gate, block_q, block_k):
  """float64 loop: p(s) = g[c(s)] exp(l_s) / sum g exp(l) over the kept, causally visible keys."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  t, n, h = q.shape
  out = np.zeros((t, n, v.shape[-1]))
  for hd in range(n):
    kv = hd // (n // k.shape[1])
    for i in range(t):
      j = i // block_q
      w, vals = [], []
      for c, blk in enumerate(indices[hd, j]):
        for s in range(blk * block_k, min((blk + 1) * block_k, t)) if blk >= 0 else ():
          if s <= i:
            w.append(gate[hd, j, c] * np.exp(q[i, hd] @ k[s, kv] / np.sqrt(h)))
            vals.append(v[s, kv])
      if w and sum(w) > 0:
        out[i, hd] = (np.array(w)[:, None] * np.array(vals)).sum(0) / sum(w)
  return out


def test_gated_sparse_attention_matches_a_float64_loop():
  rng = np.random.default_rng(0)
  t, n, kv, h = 40, 4, 2, 8
  q, k, v = (jnp.asarray(rng.normal(size=(t, m, h)), jnp.float32) for m in (n, kv, kv))
  mask = window_mask(n, t, t, block_q=8, block_k=8)
  gate = rng.uniform(0.0, 2.0, size=mask.indices.shape).astype(np.float32)
  gate[0, 3, 1] = 0.0  # an ablated edge
  out, stats = sparse_attention(q, k, v, mask, gate=jnp.asarray(gate))
  ref = _gated_reference(q, k, v, np.asarray(mask.indices), gate, 8, 8)
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)
  assert float(stats.mass[0, 3, 1]) == 0.0
  plain, _ = sparse_attention(q, k, v, mask)
  ones, _ = sparse_attention(q, k, v, mask, gate=jnp.ones(mask.indices.shape))
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(ones))
  with pytest.raises(ValueError, match=r"gate must have the shape of mask.indices"):
    sparse_attention(q, k, v, mask, gate=jnp.ones((4, 5, 2)))


@pytest.fixture(scope="module")
def tiny():
  cfg = tiny_config()
  params = init_params(cfg, seed=4, scale=0.3)
  x = tokens(1, T, seed=1)
  answer = 11
  metric = lambda run: run.logits[0, -1, answer]  # noqa: E731
  attr = edge_attribution(cfg, params, x, metric, attention=SC)
  return cfg, params, x, metric, attr


def _gated_metric(cfg, params, x, metric, masks, gates):
  run = forward(cfg, params, x, attention=SC, intervention=I.Intervention(masks=masks, gates=gates))
  return float(metric(run))


def test_edge_gradient_equals_a_finite_difference_of_the_gate(tiny):
  cfg, params, x, metric, attr = tiny
  plain = float(metric(forward(cfg, params, x, attention=SC)))
  assert abs(float(attr.value) - plain) < 1e-5  # all-ones gates and forced masks: the plain forward
  eps = 1e-2
  for e in top_edges(attr, 4) + top_edges(attr, 400)[-2:]:  # the strongest edges and two weak ones
    l, idx = e["layer"], (e["row"], e["head"], e["q_block"], e["slot"])
    ones = [None if g is None else np.ones(g.shape, np.float32) for g in attr.grads]
    up, down = [np.copy(a) if a is not None else None for a in ones], [
        np.copy(a) if a is not None else None for a in ones]
    up[l][idx] += eps
    down[l][idx] -= eps
    fd = (_gated_metric(cfg, params, x, metric, attr.masks, tuple(map(_j, up)))
          - _gated_metric(cfg, params, x, metric, attr.masks, tuple(map(_j, down)))) / (2 * eps)
    grad = float(attr.grads[l][idx])
    assert abs(grad - fd) <= 2e-2 * abs(fd) + 2e-4, (e, grad, fd)
  assert abs(float(attr.grads[top_edges(attr, 1)[0]["layer"]][
      tuple(top_edges(attr, 1)[0][k] for k in ("row", "head", "q_block", "slot"))])) > 1e-3


def _j(a):
  return None if a is None else jnp.asarray(a)


def test_a_zero_gate_is_the_forced_mask_without_the_block(tiny):
  cfg, params, x, metric, attr = tiny
  e = top_edges(attr, 1)[0]
  gates = [None] * cfg.num_layers
  g = np.ones(attr.grads[e["layer"]].shape, np.float32)
  g[e["row"], e["head"], e["q_block"], e["slot"]] = 0.0
  gates[e["layer"]] = jnp.asarray(g)
  gated = forward(cfg, params, x, attention=SC,
                  intervention=I.Intervention(masks=attr.masks, gates=tuple(gates)))
  dropped = drop_edge(attr.masks, e["layer"], e["row"], e["head"], e["q_block"], e["slot"])
  forced = forward(cfg, params, x, attention=SC, intervention=I.Intervention(masks=dropped))
  np.testing.assert_allclose(np.asarray(gated.logits), np.asarray(forced.logits), atol=1e-5)
  plain = float(attr.value)
  assert abs(float(metric(forced)) - plain) > 1e-4  # the edge mattered


def test_zero_gates_on_a_key_block_equal_the_drop_blocks_intervention(tiny):
  cfg, params, x, metric, attr = tiny
  layer, head, block = 5, 1, 2  # the global layer: key block 2 of head 1 wherever it is kept
  ids = np.asarray(attr.masks[layer].indices)
  assert (ids[0, head] == block).any()
  gates = [None] * cfg.num_layers
  g = np.ones(ids.shape, np.float32)
  g[0, head][ids[0, head] == block] = 0.0
  gates[layer] = jnp.asarray(g)
  gated = forward(cfg, params, x, attention=SC,
                  intervention=I.Intervention(masks=attr.masks, gates=tuple(gates)))
  drop = I.drop_blocks([block], block_k=SC.block_k, length=T, num_layers=cfg.num_layers,
                       num_heads=cfg.num_heads, layers=[layer], heads=[head])
  dropped = forward(cfg, params, x, attention=SC,
                    intervention=dataclasses.replace(drop, masks=attr.masks))
  np.testing.assert_allclose(np.asarray(gated.logits), np.asarray(dropped.logits), atol=1e-5)
  assert np.abs(np.asarray(gated.logits) - np.asarray(forward(cfg, params, x, attention=SC).logits)).max() > 1e-5


def test_attribution_estimates_real_ablations_on_a_tiny_model(tiny):
  cfg, params, x, metric, attr = tiny
  est, real = [], []
  for e in top_edges(attr, 12):
    dropped = drop_edge(attr.masks, e["layer"], e["row"], e["head"], e["q_block"], e["slot"])
    run = forward(cfg, params, x, attention=SC, intervention=I.Intervention(masks=dropped))
    est.append(e["estimate"])
    real.append(float(metric(run)) - float(attr.value))
  assert np.corrcoef(est, real)[0, 1] > 0.5


def test_bad_gates_name_the_argument(tiny):
  cfg, params, x, _, attr = tiny
  ones = tuple(None if g is None else jnp.ones(g.shape) for g in attr.grads)
  with pytest.raises(ValueError, match=r"gates\[0\] needs a forced mask"):
    forward(cfg, params, x, attention=SC, intervention=I.Intervention(gates=ones))
  bad = (jnp.ones((1, 4, 6, 9)),) + ones[1:]
  with pytest.raises(ValueError, match=r"gates\[0\] must have shape \[B, N, nQ, C\]"):
    forward(cfg, params, x, attention=SC, intervention=I.Intervention(masks=attr.masks, gates=bad))
  with pytest.raises(ValueError, match=r"gates\[0\]: gates weight the kept blocks"):
    forward(cfg, params, x, attention=SC, output="exact",
            intervention=I.Intervention(masks=attr.masks, gates=ones))
  with pytest.raises(ValueError, match=r"gates must have one entry"):
    forward(cfg, params, x, attention=SC, intervention=I.Intervention(masks=attr.masks, gates=ones[:2]))
  with pytest.raises(ValueError, match=r"slot 3 of layer 5, .* is padding"):
    drop_edge(attr.masks, 5, 0, 0, 0, 3)


def _grad_temp_bytes(t: int) -> int:
  """Compiled temporaries of the gated forward's backward pass (every layer gated) at length t."""
  from stream_jax.models.forward import _forward  # pylint: disable=import-outside-toplevel
  from stream_jax.models.plans import make_plans  # pylint: disable=import-outside-toplevel
  cfg = tiny_config(window=64)
  params = init_params(cfg, seed=0)
  stream = StreamConfig(block_q=32, block_k=32, top_k=4)
  plans = make_plans(cfg, stream)
  ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
  run = jax.eval_shape(lambda p, x: _forward(p, x, None, config=cfg, dtype=jnp.dtype(jnp.float32), plans=plans,
                                             last_only=True, return_hidden=False), params, ids)
  masks = tuple(l.mask for l in run["traces"])
  gates = tuple(jax.ShapeDtypeStruct(l.mass.shape, jnp.float32) for l in run["traces"])

  def metric(g, m, p, x):
    out = _forward(p, x, I.Intervention(masks=m, gates=g), config=cfg, dtype=jnp.dtype(jnp.float32), plans=plans,
                   last_only=True, return_hidden=False)
    return out["logits"][0, 5]
  grad = jax.jit(jax.grad(metric)).lower(gates, masks, params, ids).compile()
  return grad.memory_analysis().temp_size_in_bytes


def test_edge_gradients_take_memory_linear_in_t():
  """The backward pass through every kept edge stores the sparse forward's residuals, O(T): 4x the tokens
  take at most ~4.5x the temporaries (T x T probabilities would take 16x), below what dense attribution's
  probabilities alone would hold (every layer's and head's float32 T x T)."""
  small, large = _grad_temp_bytes(1024), _grad_temp_bytes(4096)
  print(f"backward temporaries: T=1024 {small:,} B, T=4096 {large:,} B ({large / small:.2f}x)")
  assert large <= 4.5 * small, (small, large)
  cfg = tiny_config()
  assert large < 0.5 * cfg.num_layers * cfg.num_heads * 4096 * 4096 * 4, large


def test_check_edges_ablates_the_top_and_random_edges_it_estimated():
  """stream_jax.experiments.edge_ablation, what colab/edge_attribution.ipynb runs on the 270M (that notebook
  is under -m slow), on the tiny model with a tokenizer: a needle prompt whose needle blocks are the
  sample's, the top edges by |AtP| then the random ones, and each row's measured change is a real forward
  without that edge."""
  from stream_jax.experiments.edge_ablation import check_edges, needle_prompt  # pylint: disable=import-outside-toplevel
  from test_experiments import tiny_model  # pylint: disable=import-outside-toplevel
  model = tiny_model()
  cfg = StreamConfig(block_q=16, block_k=16, top_k=2)
  prompt = needle_prompt(model, 200, cfg, max_written=1)
  assert prompt.ids.shape[0] == 1 and prompt.needle_blocks == prompt.sample.needle_blocks(16)
  check = check_edges(model, prompt, cfg, top=3, random=2)
  assert [r["random"] for r in check.rows] == [False] * 3 + [True] * 2 and check.num_edges > 5
  mags = [abs(r["estimate"]) for r in check.rows]
  assert mags[:3] == sorted(mags[:3], reverse=True) and min(mags[:3]) >= max(mags[3:])
  assert all(np.isfinite([r["estimate"], r["measured"]]).all() for r in check.rows)
  assert -1 <= check.spearman <= 1 or np.isnan(check.spearman)
  r = check.rows[0]
  attr = edge_attribution(model, model.params, prompt.ids, lambda run: run.logits[0, prompt.answer],
                          attention=cfg, last_only=True)
  masks = drop_edge(attr.masks, r["layer"], r["row"], r["head"], r["q_block"], r["slot"])
  ablated = forward(model, model.params, prompt.ids, attention=cfg, last_only=True,
                    intervention=I.Intervention(masks=masks))
  assert float(ablated.logits[0, prompt.answer]) - check.value == pytest.approx(r["measured"], abs=1e-6)
