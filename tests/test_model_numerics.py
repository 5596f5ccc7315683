"""Numerics of the Gemma port that ports get wrong, each against an independent reference (transformers'
PyTorch modules, or a naive numpy computation), plus the Stream/dense switch on a tiny random model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stream_jax import StreamConfig
from stream_jax.models import Gemma, PRESETS, forward, generate, init_params
from stream_jax.dense import dense_attention
from stream_jax.models.plans import make_plans
from stream_jax.models.layers import Embedder, RMSNorm, apply_rope
from tiny_models import tiny_config, tokens  # noqa: E402

torch = pytest.importorskip("torch", reason="torch (the numerics reference) is not installed")


# ---------------------------------------------------------------- embedding scale, norm, RoPE, window


@pytest.mark.parametrize("name", ["gemma3-270m", "gemma3-1b", "gemma3-4b", "gemma2-2b"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_embedding_scale_in_param_dtype(name, dtype):
  d = PRESETS[name].embed_dim
  emb = Embedder(vocab_size=3, embed_dim=d, dtype=dtype)
  params = {"params": {"input_embedding": jnp.ones((3, d), dtype)}}
  x = emb.apply(params, jnp.zeros((1, 1), jnp.int32), method=Embedder.encode)
  tdt = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
  want = float(torch.tensor(d ** 0.5).to(tdt).float())  # what transformers multiplies by
  assert x.dtype == dtype
  assert float(x[0, 0, 0]) == want
  if dtype == jnp.bfloat16 and d == 640:
    assert want != d ** 0.5  # the rounding is real: 25.25 vs 25.298


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rmsnorm_one_plus_weight_in_f32(dtype):
  from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 48)).astype(np.float32) * 3
  w = rng.normal(size=(48,)).astype(np.float32)
  ref = Gemma3RMSNorm(48, eps=1e-6)
  with torch.no_grad():
    ref.weight.copy_(torch.from_numpy(w))
  tdt = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
  want = ref(torch.from_numpy(x).to(tdt)).float().detach().numpy()
  got = RMSNorm(1e-6).apply({"params": {"scale": jnp.asarray(w)}}, jnp.asarray(x, dtype))
  assert got.dtype == dtype
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol, atol=tol)
  # and the +1 is there: zero weight is a plain RMS normalisation, not a zeroing
  z = RMSNorm(1e-6).apply({"params": {"scale": jnp.zeros(48)}}, jnp.asarray(x))
  np.testing.assert_allclose(np.sqrt((np.asarray(z) ** 2).mean(-1)), 1.0, rtol=1e-4)


def test_layer_pattern_and_rope_bases_per_layer_type():
  from transformers import Gemma2Config, Gemma3TextConfig
  for name, cfg in PRESETS.items():
    ref = (Gemma3TextConfig if cfg.family == "gemma3" else Gemma2Config)(
        num_hidden_layers=cfg.num_layers).layer_types
    assert cfg.layer_kinds == tuple("local" if t == "sliding_attention" else "global" for t in ref), name
    for i, kind in enumerate(cfg.layer_kinds):
      base, scale = cfg.rope(i)
      if cfg.family == "gemma2":
        assert (base, scale) == (10_000.0, 1.0)
      elif kind == "local":
        assert (base, scale) == (10_000.0, 1.0)
      else:
        big = name in ("gemma3-4b", "gemma3-12b", "gemma3-27b")
        assert (base, scale) == (1_000_000.0, 8.0 if big else 1.0), name
  assert PRESETS["gemma3-270m"].layer_kinds[4:6] == ("local", "global")
  assert PRESETS["gemma2-2b"].layer_kinds[:2] == ("local", "global")


@pytest.mark.parametrize("layer_type", ["sliding_attention", "full_attention"])
def test_rope_matches_transformers(layer_type):
  """Split-half RoPE, local base 10k, global base 1M with linear x8 scaling (4B+), vs transformers."""
  from transformers import Gemma3TextConfig
  from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding, apply_rotary_pos_emb
  h = 32
  hf = Gemma3TextConfig(head_dim=h, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                        num_hidden_layers=6, rope_scaling={"rope_type": "linear", "factor": 8.0})
  from stream_jax.models import from_hf_config
  cfg = from_hf_config(hf.to_dict())
  layer = 0 if layer_type == "sliding_attention" else 5
  assert cfg.layer_kinds[layer] == ("local" if layer == 0 else "global")
  base, scale = cfg.rope(layer)
  assert (base, scale) == ((10_000.0, 1.0) if layer == 0 else (1_000_000.0, 8.0))
  rot = Gemma3RotaryEmbedding(hf)
  pos = torch.arange(0, 3000, 7)[None]
  x = np.random.default_rng(1).normal(size=(1, pos.shape[1], 2, h)).astype(np.float32)
  xt = torch.from_numpy(x).transpose(1, 2)
  cos, sin = rot(xt, pos, layer_type=layer_type)
  want, _ = apply_rotary_pos_emb(xt, xt, cos, sin)
  want = want.transpose(1, 2).numpy()
  got = apply_rope(jnp.asarray(x), jnp.asarray(pos.numpy()[0]), base=base, scale=scale)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
  other = apply_rope(jnp.asarray(x), jnp.asarray(pos.numpy()[0]), base=1e6 if layer == 0 else 1e4)
  assert np.abs(np.asarray(other) - want).max() > 1e-2  # the base matters: the test can fail


@pytest.mark.parametrize("cap", [None, 2.0])
def test_dense_sliding_window_beyond_window(cap):
  """T > W, chunked over queries, GQA, softcap: against a naive per-query numpy loop."""
  rng = np.random.default_rng(0)
  b, t, n, kv, h, w = 2, 70, 4, 2, 8, 16
  q = rng.normal(size=(b, t, n, h)).astype(np.float32)
  k = rng.normal(size=(b, t, kv, h)).astype(np.float32)
  v = rng.normal(size=(b, t, kv, h)).astype(np.float32)
  pos = jnp.arange(t)
  got = dense_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_pos=pos, k_pos=pos, scale=0.3,
                        softcap=cap, window=w, q_chunk=32)
  want = np.zeros_like(q)
  for bi in range(b):
    for i in range(t):
      for hd in range(n):
        keys = np.arange(max(0, i - w + 1), i + 1)  # W keys including the query
        s = k[bi, keys, hd // (n // kv)] @ q[bi, i, hd] * 0.3
        if cap:
          s = cap * np.tanh(s / cap)
        p = np.exp(s - s.max())
        want[bi, i, hd] = (p / p.sum()) @ v[bi, keys, hd // (n // kv)]
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


# ---------------------------------------------------------------- model-level: dtype, Stream vs dense


def test_float16_rejected():
  cfg = tiny_config()
  p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float16), init_params(cfg))
  with pytest.raises(ValueError, match="float16"):
    forward(cfg, p16, tokens(1, 8))
  from stream_jax.models import load_model
  with pytest.raises(ValueError, match="float16"):
    load_model("gemma3-270m", dtype=jnp.float16)


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
@pytest.mark.parametrize("prune_local", [False, True])
def test_stream_keeping_everything_equals_dense(family, prune_local):
  cfg = tiny_config(family)
  params = init_params(cfg, seed=1, scale=0.2)
  x = tokens(2, 90)
  _run = forward(cfg, params, x)
  dense, tr = _run.logits, _run.trace
  assert tr is None
  keep_all = StreamConfig(block_q=16, block_k=16, top_k=8)  # nK = 6 <= top_k: every block is kept
  _run = forward(cfg, params, x, attention=keep_all, prune_local=prune_local)
  sparse, trace = _run.logits, _run.trace
  np.testing.assert_allclose(np.asarray(sparse), np.asarray(dense), atol=1e-5, rtol=1e-5)
  assert len(trace) == cfg.num_layers
  for i, lt in enumerate(trace.layers):
    assert lt.layer == i and lt.kind == cfg.layer_kinds[i]
    assert lt.mode == ("window" if lt.kind == "local" and not prune_local else "stream")
    assert lt.window == (cfg.sliding_window if lt.kind == "local" else None)
    assert lt.mask.indices.shape[:3] == (2, cfg.num_heads, 6)
    assert lt.mass.shape == lt.mask.indices.shape
    # each query block's mass sums to its number of queries
    np.testing.assert_allclose(np.asarray(lt.mass).sum(-1)[..., :-1], 16.0, rtol=1e-5)
  assert float(trace.kept_fraction(None)) == pytest.approx(1.0)
  # a mask that really prunes changes the output (the switch is live)
  _run = forward(cfg, params, x, attention=StreamConfig(block_q=16, block_k=16, top_k=1,
                                                                  window_blocks=1, sink_blocks=0))
  pruned, ptrace = _run.logits, _run.trace
  assert float(ptrace.kept_fraction("global")) < 0.6
  assert np.abs(np.asarray(pruned) - np.asarray(dense)).max() > 1e-3


def test_dense_layers_hidden_and_batch():
  cfg = tiny_config()
  params = init_params(cfg, seed=2, scale=0.2)
  x = tokens(2, 40)
  sc = StreamConfig(block_q=8, block_k=8, top_k=1, window_blocks=1, sink_blocks=0)
  _run = forward(cfg, params, x, return_hidden=True)
  dense, hd = _run.logits, _run.hidden
  assert hd.shape == (cfg.num_layers, 2, 40, cfg.embed_dim)  # each layer's output, no embeddings
  # every layer dense on the Stream path == dense forward; traces say "dense"
  _run = forward(cfg, params, x, attention=sc, dense_layers=range(cfg.num_layers),
                              return_hidden=True)
  all_dense, tr, hs = _run.logits, _run.trace, _run.hidden
  np.testing.assert_allclose(np.asarray(all_dense), np.asarray(dense), atol=1e-5)
  np.testing.assert_allclose(np.asarray(hs), np.asarray(hd), atol=1e-5, rtol=1e-5)
  assert all(l.mode == "dense" for l in tr.layers)
  # pruning only the last global layer: hidden states agree up to it, differ after
  _run = forward(cfg, params, x, attention=sc, dense_layers=range(5), return_hidden=True)
  tr5, h5 = _run.trace, _run.hidden
  assert [l.mode for l in tr5.layers] == ["dense"] * 5 + ["stream"]
  np.testing.assert_allclose(np.asarray(h5[:5]), np.asarray(hd[:5]), atol=1e-5, rtol=1e-5)
  assert np.abs(np.asarray(h5[5]) - np.asarray(hd[5])).max() > 1e-4
  # batch rows are independent: row-wise == batched
  _run = forward(cfg, params, x[1], attention=sc)
  single, t1 = _run.logits, _run.trace
  _run = forward(cfg, params, x, attention=sc)
  batched, tb = _run.logits, _run.trace
  assert single.shape == (1,) + batched.shape[1:]  # int[T] is a batch of one: always batched
  np.testing.assert_allclose(np.asarray(single[0]), np.asarray(batched[1]), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(t1.layers[5].mask.indices[0]),
                                np.asarray(tb.layers[5].mask.indices[1]))
  last = forward(cfg, params, x, last_only=True).logits
  np.testing.assert_allclose(np.asarray(last), np.asarray(dense[:, -1]), atol=1e-5)
  with pytest.raises(ValueError, match="dense_layers"):
    forward(cfg, params, x, attention=sc, dense_layers=[6])
  with pytest.raises(ValueError, match="attention"):
    forward(cfg, params, x, attention="sparse")


def test_bf16_forward_close_to_f32():
  cfg = tiny_config()
  params = init_params(cfg, seed=3, scale=0.2)
  pb = jax.tree_util.tree_map(lambda a: a if a.ndim == 1 else a.astype(jnp.bfloat16), params)
  x = tokens(1, 32)
  f32 = forward(cfg, params, x).logits
  b16 = forward(cfg, pb, x).logits
  assert b16.dtype == jnp.float32
  err = np.abs(np.asarray(b16) - np.asarray(f32)).max() / np.abs(np.asarray(f32)).max()
  assert err < 0.05


def test_kv_cache_generation_equals_full_forward():
  """Greedy decode through the KV cache == teacher-forced full forward over prompt + continuation: every
  generated token is the argmax of the full forward at the position before it (both layer kinds, T > W,
  Gemma 2 softcaps in the cached step)."""
  for family in ("gemma3", "gemma2"):
    cfg = tiny_config(family, window=8)
    params = init_params(cfg, seed=4, scale=0.3)
    prompt = np.asarray(tokens(2, 12, seed=5))
    g = generate(cfg, params, prompt, max_new_tokens=8, stop_ids=[])
    assert g.ids.shape == (2, 8)
    seq = np.concatenate([prompt, g.ids], axis=1)
    full = forward(cfg, params, seq).logits
    np.testing.assert_array_equal(np.asarray(full).argmax(-1)[:, 11:-1], g.ids)
    if family == "gemma3":  # Stream prefill with a keep-everything mask: the same continuation
      gs = generate(cfg, params, prompt, max_new_tokens=8, stop_ids=[],
                    attention=StreamConfig(block_q=4, block_k=4, top_k=4))
      np.testing.assert_array_equal(gs.ids, g.ids)
      assert gs.trace is not None and len(gs.trace) == cfg.num_layers


def test_stream_path_allocates_nothing_quadratic():
  """Compiled temp memory of the Stream forward (all layers, local ones through their block band) grows
  linearly in T: at 32k it is far below one T x T f32 matrix, and doubling T from 16k adds far less than
  the 3 x T^2 a quadratic buffer would. (Compile only: nothing runs.)"""
  cfg = tiny_config(layers=6, window=256)
  params = jax.eval_shape(lambda: init_params(cfg))
  from stream_jax.models.forward import _forward

  def temp(att, t):
    x = jax.ShapeDtypeStruct((1, t), jnp.int32)
    c = _forward.lower(params, x, None, config=cfg, dtype=jnp.dtype(jnp.float32), plans=make_plans(cfg, att),
                       last_only=True, return_hidden=False).compile()
    return c.memory_analysis().temp_size_in_bytes

  t = 32768
  tt = t * t * 4
  s16, s32 = temp(StreamConfig(), t // 2), temp(StreamConfig(), t)
  assert s32 < tt / 8, (s32, tt)
  assert s32 - s16 < 0.05 * (tt - tt / 4), (s16, s32)
  assert temp("dense", t) < tt / 8  # the dense path is flash style too (stream_jax.dense)


def test_traced_layers_compute_their_own_rope_tables():
  """A traced forward ties each layer's RoPE positions to its q (one optimization barrier per layer: XLA
  cannot share the cos / sin tables across layers and keep them to the trace's peak); a dense forward does
  not. The barrier is an identity: the traced logits equal those computed without it."""
  cfg = tiny_config(layers=3)
  params = init_params(cfg, seed=3, scale=0.2)
  x = tokens(1, 32)
  sc = StreamConfig(block_q=8, block_k=8, top_k=2, window_blocks=1, sink_blocks=0)

  def run(att):  # a fresh jit each call: traced anew, so a patched method is seen
    fn = jax.jit(lambda p, t: Gemma(cfg).apply(p, t, attention=att).logits)
    return fn.lower(params, x).as_text().count("optimization_barrier"), fn(params, x)

  (n_traced, with_barrier), (n_dense, _) = run(sc), run("dense")
  assert n_traced == cfg.num_layers and n_dense == 0
  from stream_jax.models import transformer  # pylint: disable=import-outside-toplevel
  qkv = transformer.SelfAttention.qkv
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(transformer.SelfAttention, "qkv", lambda self, a, pos, own_rope=False: qkv(self, a, pos))
    n_without, without = run(sc)
  assert n_without == 0
  np.testing.assert_array_equal(np.asarray(with_barrier), np.asarray(without))


def test_pure_apply_entry_equals_forward():
  """`Gemma(config).apply(params, tokens, attention=...)` (the design's data flow) == `forward`."""
  cfg = tiny_config()
  params = init_params(cfg, seed=6, scale=0.2)
  x = tokens(2, 24)
  sc = StreamConfig(block_q=8, block_k=8, top_k=1, window_blocks=1, sink_blocks=0)
  run = jax.jit(lambda p, t: Gemma(cfg).apply(p, t, attention=sc))(params, x)  # a TracedRun crosses jit
  ref = forward(cfg, params, x, attention=sc)
  np.testing.assert_allclose(np.asarray(run.logits), np.asarray(ref.logits), atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(run.trace.layers[5].mask.indices),
                                np.asarray(ref.trace.layers[5].mask.indices))
  dense = Gemma(cfg).apply(params, x)
  # the same pytree whatever the flags: a dense call has trace / hidden / probs None
  assert dense.trace is None and dense.hidden is None and dense.probs is None
  assert dense.logits.shape == (2, 24, cfg.vocab_size)
