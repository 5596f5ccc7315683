"""The intervention seam: attention suppression and forced masks, against independent references
(a per-query NumPy loop for the ops, transformers' Gemma 3 with a 4-D additive mask for the model)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stream_jax import StreamConfig, estimate_mask, intervene as I, sparse_attention
from stream_jax.dense import dense_attention
from stream_jax.mask import window_mask
from stream_jax.models import forward, generate, init_params
from stream_jax.models import forward as forward_mod  # noqa: F401  (the jitted entry's cache is read below)
from tiny_models import tiny_config, tokens


def _naive(q, k, v, visible, scale):
  """Per-query NumPy softmax over the visible keys: q [B, T, N, H], k/v [B, S, K, H], visible [B, N, T, S]."""
  b, t, n, _ = q.shape
  g = n // k.shape[2]
  out = np.zeros(q.shape[:3] + (v.shape[-1],), np.float64)
  for bi in range(b):
    for i in range(t):
      for hd in range(n):
        keys = np.nonzero(visible[bi, hd, i])[0]
        if not keys.size:
          continue
        s = k[bi, keys, hd // g] @ q[bi, i, hd] * scale
        p = np.exp(s - s.max())
        out[bi, i, hd] = (p / p.sum()) @ v[bi, keys, hd // g]
  return out


def _qkv(b=2, t=40, n=4, kv=2, h=8, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(b, t, n, h)).astype(np.float32), rng.normal(size=(b, t, kv, h)).astype(np.float32),
          rng.normal(size=(b, t, kv, h)).astype(np.float32))


def test_ops_per_head_key_mask_match_a_naive_loop():
  q, k, v = _qkv()
  b, t, n = q.shape[:3]
  rng = np.random.default_rng(1)
  keep = rng.random((b, n, t)) > 0.3
  keep[0, 1, :] = False  # a head that sees nothing: output 0, never NaN
  causal = np.tril(np.ones((t, t), bool))
  visible = causal[None, None] & keep[:, :, None, :]
  want = _naive(q, k, v, visible, 0.3)
  pos = jnp.arange(t)
  flash = dense_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_pos=pos, k_pos=pos, scale=0.3,
                          k_valid=jnp.asarray(keep), q_chunk=16, k_chunk=8)
  probs_path = dense_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_pos=pos, k_pos=pos,
                               scale=0.3, k_valid=jnp.asarray(keep), return_probs=True)[0]
  full = window_mask(n, t, t, block_q=8, block_k=8)  # every causal block kept
  full = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (b,) + x.shape), full)
  sparse, stats = sparse_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), full, scale=0.3,
                                   key_mask=jnp.asarray(keep))
  for got in (flash, probs_path, sparse):
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
  assert np.isneginf(np.asarray(stats.lse)[0, 1]).all() and float(np.asarray(stats.mass)[0, 1].sum()) == 0.0


def _hf_gemma3(window=64):
  torch = pytest.importorskip("torch")
  from transformers import Gemma3ForCausalLM, Gemma3TextConfig
  cfg = Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20,
                         sliding_window=window, max_position_embeddings=512, pad_token_id=0)
  model = Gemma3ForCausalLM(cfg).eval()
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.copy_(torch.randn(p.shape, generator=g) * 0.3)
  model.config._attn_implementation = "eager"
  return torch, model


def test_suppression_matches_transformers_with_an_additive_mask(tmp_path):
  """Suppressing key spans in every layer and head == transformers' Gemma 3 fed a 4-D additive mask that
  hides those key columns (T below the window, so local and global layers share that mask)."""
  torch, model = _hf_gemma3()
  from stream_jax.models import load_model
  model.save_pretrained(tmp_path)
  loaded = load_model(str(tmp_path), jnp.float32, progress=False, tokenizer=False)
  t = 40
  x = np.random.default_rng(0).integers(3, 128, size=(2, t))
  spans = [[(4, 9)], [(10, 13), (20, 26)]]
  iv = I.suppress_spans(spans, length=t, num_layers=3, num_heads=4)
  got = np.asarray(forward(loaded, loaded.params, x, intervention=iv).logits)
  keys = np.asarray(iv.keys[0])  # [B, S]
  allowed = np.tril(np.ones((t, t), bool))[None] & ~keys[:, None, :]
  allowed |= np.eye(t, dtype=bool)[None] & ~allowed.any(-1, keepdims=True)  # (no row here is empty)
  add = np.where(allowed, 0.0, torch.finfo(torch.float32).min).astype(np.float32)[:, None]
  with torch.no_grad():
    want = model(input_ids=torch.from_numpy(x), attention_mask=torch.from_numpy(add)).logits.numpy()
  err = np.abs(got - want).max() / np.abs(want).max()
  assert err < 2e-4, err
  plain = np.asarray(forward(loaded, loaded.params, x).logits)
  assert np.abs(plain - want).max() > 1e-2  # the suppression really changed the model


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_suppression_in_sparse_exact_dense_and_generation(family):
  cfg = tiny_config(family, window=16)
  p = init_params(cfg, seed=1, scale=0.3)
  x = tokens(2, 48)
  spans = [[(8, 16)], [(20, 30)]]  # row 0: exactly key block 1
  iv = I.suppress_spans(spans, length=48, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                        layers=[1, 2, 5], heads=[0, 3])
  dense = np.asarray(forward(cfg, p, x, intervention=iv).logits)
  base = np.asarray(forward(cfg, p, x).logits)
  np.testing.assert_array_equal(dense[0, :8], base[0, :8])  # causal: earlier positions cannot change
  assert np.abs(dense[0, 16:] - base[0, 16:]).max() > 1e-3
  keep_all = StreamConfig(block_q=8, block_k=8, top_k=8)  # nK = 6: every block kept
  sparse = forward(cfg, p, x, attention=keep_all, intervention=iv)
  np.testing.assert_allclose(np.asarray(sparse.logits), dense, atol=2e-5)
  pruning = StreamConfig(block_q=8, block_k=8, top_k=1, sink_blocks=1, window_blocks=1)
  exact = forward(cfg, p, x, attention=pruning, output="exact", intervention=iv)
  np.testing.assert_allclose(np.asarray(exact.logits), dense, atol=2e-5)
  # suppressed keys hold no mass in the layers / heads that suppress them, and coverage stays finite
  lt = exact.trace.layers[5]
  idx, mass = np.asarray(lt.mask.indices), np.asarray(lt.mass)
  assert np.isfinite(np.asarray(lt.coverage)).all()
  assert (idx[0, 0] == 1).any() and (idx[0, 1] == 1).any()  # block 1 is kept by both heads ...
  assert mass[0, 0][idx[0, 0] == 1].sum() == 0.0  # ... head 0 suppresses it: no mass
  assert mass[0, 1][idx[0, 1] == 1].sum() > 0.1  # head 1 does not
  # decoding keeps the suppression: greedy tokens == argmax of the suppressed teacher-forced forward
  g = generate(cfg, p, np.asarray(x), max_new_tokens=5, stop_ids=[], intervention=iv)
  seq = np.concatenate([np.asarray(x), g.ids], 1)
  iv_seq = I.suppress_spans(spans, length=seq.shape[1], num_layers=cfg.num_layers,
                            num_heads=cfg.num_heads, layers=[1, 2, 5], heads=[0, 3])
  full = np.asarray(forward(cfg, p, seq, intervention=iv_seq).logits)
  np.testing.assert_array_equal(full.argmax(-1)[:, 47:-1], g.ids)


def test_suppressing_everything_visible_is_defined_and_forced_masks_apply():
  cfg = tiny_config()
  p = init_params(cfg, seed=2, scale=0.3)
  x = tokens(1, 32)
  iv = I.suppress_spans([(0, 6)], length=32, num_layers=cfg.num_layers, num_heads=cfg.num_heads)
  for attention in ("dense", StreamConfig(block_q=8, block_k=8, top_k=1)):
    run = forward(cfg, p, x, attention=attention, intervention=iv)
    assert np.isfinite(np.asarray(run.logits)).all()  # queries 0..5 see nothing: attention output 0
  sc = StreamConfig(block_q=8, block_k=8, top_k=1, sink_blocks=0, window_blocks=1)
  ref = forward(cfg, p, x, attention=sc)
  q, k = np.zeros((1, 32, 4, 8), np.float32), np.zeros((1, 32, 2, 8), np.float32)
  other = estimate_mask(jnp.asarray(q), jnp.asarray(k), sc.replace(window_blocks=2))  # a different mask
  forced = forward(cfg, p, x, attention=sc, intervention=I.force_masks({5: other}, num_layers=6))
  np.testing.assert_array_equal(np.asarray(forced.trace.layers[5].mask.indices), np.asarray(other.indices))
  np.testing.assert_array_equal(np.asarray(forced.trace.layers[0].mask.indices),
                                np.asarray(ref.trace.layers[0].mask.indices))
  assert np.abs(np.asarray(forced.logits) - np.asarray(ref.logits)).max() > 1e-4


def test_new_values_reuse_the_compiled_forward():
  cfg = tiny_config()
  p = init_params(cfg, seed=3, scale=0.3)
  x = tokens(2, 24)
  from stream_jax.models.forward import _forward
  make = lambda lo: I.suppress_spans([[(lo, lo + 3)], [(lo + 1, lo + 5)]], length=24, num_layers=6,
                                     num_heads=4)
  forward(cfg, p, x, intervention=make(2))
  size = _forward._cache_size()
  outs = [np.asarray(forward(cfg, p, x, intervention=make(lo)).logits) for lo in (3, 7, 11)]
  assert _forward._cache_size() == size  # only values changed: no recompilation
  assert np.abs(outs[0] - outs[1]).max() > 1e-4


def test_intervened_stream_forward_allocates_nothing_quadratic():
  """Compiled temp memory with a suppression grows linearly in T (compile only, nothing runs)."""
  cfg = tiny_config(layers=2, window=256).replace(layer_kinds=("local", "global"))
  params = jax.eval_shape(lambda: init_params(cfg))
  from stream_jax.models.forward import _forward
  from stream_jax.models.plans import make_plans

  def temp(t):
    iv = jax.eval_shape(lambda: I.suppress_spans([(100, 200)], length=t, num_layers=2, num_heads=4))
    c = _forward.lower(params, jax.ShapeDtypeStruct((1, t), jnp.int32), iv, config=cfg,
                       dtype=jnp.dtype(jnp.float32), plans=make_plans(cfg, StreamConfig()), last_only=True,
                       return_hidden=False).compile()
    return c.memory_analysis().temp_size_in_bytes

  t = 32768
  tt = t * t * 4
  s16, s32 = temp(t // 2), temp(t)
  assert s32 < tt / 8, (s32, tt)
  assert s32 - s16 < 0.05 * (tt - tt / 4), (s16, s32)


@pytest.mark.parametrize("call, match", [
    (lambda: I.suppress_spans([], length=10, num_layers=2, num_heads=4), "spans is empty"),
    (lambda: I.suppress_spans([(3, 12)], length=10, num_layers=2, num_heads=4), r"spans\[0\]"),
    (lambda: I.suppress_spans([(3, 5)], length=10, num_layers=2, num_heads=4, layers=[2]), "layers entry"),
    (lambda: I.suppress_spans([(3, 5)], length=10, num_layers=2, num_heads=4, heads=[-1]), "heads entry"),
    (lambda: I.suppress_spans([(3, 5)], length=10, num_layers=2, num_heads=4, layers=[]), "layers is empty"),
    (lambda: I.drop_blocks([3], block_k=4, length=10, num_layers=2, num_heads=4), "block ids"),
    (lambda: I.drop_blocks({5: [0]}, block_k=4, length=10, num_layers=2, num_heads=4), "blocks layer"),
    (lambda: I.force_masks({}, num_layers=2), "masks is empty"),
])
def test_bad_interventions_name_the_argument(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_interventions_that_do_not_fit_the_call_are_refused():
  cfg = tiny_config()
  p = init_params(cfg, seed=5)
  x = tokens(2, 24)
  with pytest.raises(ValueError, match="T = 24"):
    forward(cfg, p, x, intervention=I.suppress_spans([(1, 3)], length=20, num_layers=6, num_heads=4))
  with pytest.raises(ValueError, match=r"\[L, N\] = \[6, 4\]"):
    forward(cfg, p, x, intervention=I.suppress_spans([(1, 3)], length=24, num_layers=5, num_heads=4))
  with pytest.raises(ValueError, match="batch rows"):
    forward(cfg, p, x, intervention=I.suppress_spans([[(1, 3)]] * 3, length=24, num_layers=6, num_heads=4))
  m = window_mask(4, 24, 24, block_q=8, block_k=8)
  with pytest.raises(ValueError, match="needs a Stream call"):
    forward(cfg, p, x, intervention=I.force_masks({1: m}, num_layers=6))
  with pytest.raises(TypeError, match="Intervention"):
    forward(cfg, p, x, intervention={"keys": None})
