"""Named hooks inside the traced forward (stream_jax.hooks): identity hooks change nothing, replacements equal
the same change made by hand or by an intervention, extras are collected, new hook_args reuse the compiled
forward, a vmap over hook_args batches a sweep, and nothing T x T appears."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stream_jax import StreamConfig, hooks, intervene
from stream_jax.hooks import Hook
from stream_jax.models import forward, init_params
from stream_jax.models.forward import _forward

from tiny_models import tiny_config, tokens

CFG = tiny_config()
PARAMS = init_params(CFG, seed=3)
IDS = tokens(2, 96)
STREAM = StreamConfig(block_q=16, block_k=16, top_k=2, sink_blocks=1, window_blocks=1)
GLOBAL = [i for i, k in enumerate(CFG.layer_kinds) if k == "global"]


def _run(**kw):
  return forward(CFG, PARAMS, IDS, attention=STREAM, **kw)


def _same(a, b):
  np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))
  for la, lb in zip(a.trace.layers, b.trace.layers):
    np.testing.assert_array_equal(np.asarray(la.mask.indices), np.asarray(lb.mask.indices))
    np.testing.assert_array_equal(np.asarray(la.mass), np.asarray(lb.mass))


def _identity(x, layer, args):
  return x


def test_identity_hooks_at_every_point_change_nothing():
  base = _run()
  hooked = _run(hooks=[Hook(p, _identity, name=p) for p in hooks.POINTS])
  _same(base, hooked)
  assert hooked.hooked == {}  # nothing emitted


def test_extras_are_collected_by_name_and_layer_and_equal_what_the_run_returns():
  run = _run(return_hidden=True, hooks=(
      Hook("residual", lambda x, l, a: hooks.emit(x, x[:, -1])),
      Hook("trace", lambda tr, l, a: hooks.emit(tr, tr.mass.sum()), layers=tuple(GLOBAL), name="mass"),
      Hook("q", lambda q, l, a: hooks.emit(q, q.shape[2] * jnp.ones(())), layers=(0,), name="heads")))
  assert sorted(run.hooked) == ["heads", "mass", "residual"]
  assert sorted(run.hooked["residual"]) == list(range(CFG.num_layers))
  for l in range(CFG.num_layers):  # the residual after layer l is hidden[l]
    np.testing.assert_array_equal(np.asarray(run.hooked["residual"][l]), np.asarray(run.hidden[l][:, -1]))
  for l in GLOBAL:
    np.testing.assert_allclose(float(run.hooked["mass"][l]), float(run.trace.layers[l].mass.sum()), rtol=1e-6)
  assert float(run.hooked["heads"][0]) == CFG.num_heads and list(run.hooked["heads"]) == [0]


def test_replacing_the_attention_output_equals_zeroing_a_head_by_hand():
  """Head 1 of layer 2 silenced through "attention_out", compared with the same model whose output
  projection ignores head 1 at layer 2 (its rows of attn_vec_einsum zeroed)."""
  gain = jnp.ones(CFG.num_heads).at[1].set(0.0)
  hook = Hook("attention_out", lambda x, l, a: x * a["gain"][None, None, :, None].astype(x.dtype), layers=(2,))
  got = _run(hooks=(hook,), hook_args={"gain": gain})
  params = jax.tree_util.tree_map(lambda x: x, PARAMS)
  w = params["params"]["layer_2"]["attn"]["attn_vec_einsum"]["w"]
  params["params"]["layer_2"]["attn"]["attn_vec_einsum"]["w"] = w.at[1].set(0.0)
  want = forward(CFG, params, IDS, attention=STREAM)
  np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(got.logits) - np.asarray(_run().logits)).max() > 1e-4  # it did change something


def test_a_kept_hook_equals_the_forced_mask_intervention():
  base = _run()
  layer = GLOBAL[0]
  m = base.trace.layers[layer].mask
  keep_sink = m.__class__(jnp.where(m.indices == 0, 0, -1).astype(jnp.int32),
                          (m.indices == 0).sum(-1).astype(jnp.int32), m.block_q, m.block_k, m.q_len, m.k_len,
                          m.config)
  by_hook = _run(hooks=(hooks.force_kept([layer]),), hook_args={"forced": {layer: keep_sink}})
  by_intervention = _run(intervention=intervene.force_masks({layer: keep_sink}, num_layers=CFG.num_layers))
  _same(by_hook, by_intervention)
  np.testing.assert_array_equal(np.asarray(by_hook.trace.layers[layer].mask.indices), np.asarray(keep_sink.indices))
  assert np.abs(np.asarray(by_hook.logits) - np.asarray(base.logits)).max() > 1e-4


def test_a_visible_hook_equals_the_suppression_intervention():
  """Keys 10..29 hidden from every head of layers 1 and 3: suppress_keys as a hook and suppress_spans as an
  intervention give the same forward (and dropping a whole key block the same as drop_blocks)."""
  layers = (1, 3)
  keys = jnp.zeros((1, 1, IDS.shape[1]), bool).at[..., 10:30].set(True)
  by_hook = _run(hooks=(hooks.suppress_keys(layers),), hook_args={"suppressed": keys})
  by_intervention = _run(intervention=intervene.suppress_spans(
      [(10, 30)], length=IDS.shape[1], num_layers=CFG.num_layers, num_heads=CFG.num_heads, layers=layers))
  _same(by_hook, by_intervention)
  assert np.abs(np.asarray(by_hook.logits) - np.asarray(_run().logits)).max() > 1e-4
  block = jnp.zeros((1, 1, IDS.shape[1]), bool).at[..., 32:48].set(True)  # key block 2 of 16 tokens
  dropped = intervene.drop_blocks([2], block_k=16, length=IDS.shape[1], num_layers=CFG.num_layers,
                                  num_heads=CFG.num_heads, layers=layers)
  _same(_run(hooks=(hooks.suppress_keys(layers),), hook_args={"suppressed": block}), _run(intervention=dropped))


def test_new_hook_args_reuse_the_compiled_forward_and_vmap_batches_a_sweep():
  hook = Hook("attention_out", lambda x, l, a: x * a[None, None, :, None].astype(x.dtype), layers=(3,))
  _run(hooks=(hook,), hook_args=jnp.ones(CFG.num_heads))
  size = _forward._cache_size()
  outs = [_run(hooks=(hook,), hook_args=jnp.ones(CFG.num_heads).at[h].set(0.0)).logits for h in range(3)]
  assert _forward._cache_size() == size  # three new gains, no new compilation
  gains = jnp.ones((3, CFG.num_heads)).at[jnp.arange(3), jnp.arange(3)].set(0.0)
  swept = jax.vmap(lambda g: _run(hooks=(hook,), hook_args=g).logits)(gains)
  for h in range(3):
    np.testing.assert_allclose(np.asarray(swept[h]), np.asarray(outs[h]), rtol=1e-5, atol=1e-6)


def test_hooks_run_under_jit_of_the_whole_call():
  hook = Hook("residual", lambda x, l, a: hooks.emit(x, jnp.linalg.norm(x[:, -1], axis=-1)), layers=(5,))
  f = jax.jit(lambda p: forward(CFG, p, IDS, attention=STREAM, hooks=(hook,)).hooked["residual"][5])
  np.testing.assert_allclose(np.asarray(f(PARAMS)), np.asarray(_run(hooks=(hook,)).hooked["residual"][5]),
                             rtol=1e-6)


def test_hooks_allocate_nothing_t_by_t():
  """The compiled forward's temporaries with a hook at every point equal those without hooks."""
  cfg = tiny_config(layers=2)
  p = init_params(cfg, seed=0)
  ids = tokens(1, 2048)
  lower = lambda hk: _forward.lower(p, ids, None, None, config=cfg, dtype=jnp.dtype(jnp.float32),  # noqa: E731
                                    plans=_plans(cfg), last_only=True, return_hidden=False, hooks=hk)
  plain = lower(()).compile().memory_analysis().temp_size_in_bytes
  every = tuple(Hook(pt, _identity, name=pt) for pt in hooks.POINTS)
  with_hooks = lower(every).compile().memory_analysis().temp_size_in_bytes
  assert with_hooks <= 1.05 * plain + 1024, (with_hooks, plain)
  assert with_hooks < 2048 * 2048 * 4  # less than one T x T float32 buffer


def _plans(cfg):
  from stream_jax.models.plans import make_plans  # pylint: disable=import-outside-toplevel
  return make_plans(cfg, STREAM)


def test_bad_hooks_are_refused_with_their_name():
  with pytest.raises(ValueError, match="Hook.point must be one of"):
    Hook("logits", _identity)
  with pytest.raises(ValueError, match=r"layers \[9\] out of range: layers are 0..5"):
    _run(hooks=(Hook("q", _identity, layers=(9,)),))
  with pytest.raises(ValueError, match="two hooks named 'q' fire at the same layer"):
    _run(hooks=(Hook("q", _identity), Hook("q", _identity, layers=(1,))))
  with pytest.raises(ValueError, match=r"Hook\('k', name='k'\) at layer 0 must keep shapes and dtypes"):
    _run(hooks=(Hook("k", lambda x, l, a: x[:, :-1]),))
  with pytest.raises(TypeError, match="must return a BlockMask"):
    _run(hooks=(Hook("kept", lambda m, l, a: m.indices),))
