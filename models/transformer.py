"""Gemma 2 / Gemma 3 / Llama / Qwen2 / Qwen3 text decoder in Flax linen, with the attention implementation
chosen per call. One module for every family: the config's switches select the norm offset, post-norms,
embedding scale, MLP activation, lm_head, q/k/v biases and QK-norm; attention always goes through the same
`attend` / plans / trace.

Parameter tree (shapes; names follow google-deepmind/gemma):
  embedder/input_embedding [V, D]            final_norm/scale [D]
  layer_{i}/pre_attention_norm/scale [D]     layer_{i}/post_attention_norm/scale [D]
  layer_{i}/pre_ffw_norm/scale [D]           layer_{i}/post_ffw_norm/scale [D]
  layer_{i}/attn/q_einsum/w [N, D, H]        layer_{i}/attn/kv_einsum/w [2, K, D, H]
  layer_{i}/attn/attn_vec_einsum/w [N, H, D] layer_{i}/attn/{query,key}_norm/scale [H]  (Gemma 3)
  layer_{i}/mlp/gating_einsum [2, F, D]      layer_{i}/mlp/linear [F, D]
Other families: no post_attention_norm / post_ffw_norm (pre-norms only); layer_{i}/attn/q_einsum/b [N, H]
and kv_einsum/b [2, K, H] (Qwen2 biases); embedder/output_embedding [V, D] (untied lm_head).
Norm scales are f32 (the `(1 + w)` is applied in f32); everything else has the model dtype.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from stream_jax import dense as dense_lib, numerics
from stream_jax import hooks as hooks_lib
from stream_jax.intervene import Intervention
from stream_jax.models.attend import attend
from stream_jax.models.plans import Attention, LayerPlan, make_plans
from stream_jax.models.decoder_config import GemmaConfig
from stream_jax.models.layers import Embedder, FeedForward, RMSNorm, apply_rope, map_positions
from stream_jax.trace import LayerTrace, Trace, TracedRun

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)


def check_dtype(dtype) -> jnp.dtype:
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float16:
    raise ValueError("float16 is not supported: Gemma 3 activations overflow fp16 (the residual stream "
                     "exceeds 65504); use bfloat16 or float32")
  if dtype not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
    raise ValueError(f"dtype must be bfloat16 or float32, got {dtype}")
  return dtype


class Einsum(nn.Module):
  """A weight `w` of a given shape used through one einsum, plus an optional bias `b` of shape
  `bias_shape` spanning the output axes `bias_axes` (e.g. [2, K, H] on axes (0, 3, 4) of [2, B, T, K, H])."""

  shape: tuple[int, ...]
  dtype: jnp.dtype = jnp.float32
  bias_shape: Optional[tuple[int, ...]] = None
  bias_axes: tuple[int, ...] = ()

  @nn.compact
  def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
    w = self.param("w", nn.initializers.normal(0.02), self.shape, self.dtype)
    y = jnp.einsum(eqn, x, w)
    if self.bias_shape is not None:
      b = self.param("b", nn.initializers.zeros_init(), self.bias_shape, self.dtype)
      full = [1] * y.ndim
      for axis, size in zip(self.bias_axes, self.bias_shape):
        full[axis] = size
      y = y + b.reshape(full)
    return y


class SelfAttention(nn.Module):
  """Projections, QK-norm, RoPE, then `attend` (whole sequence) or attention over a KV cache."""

  config: GemmaConfig
  layer: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    c = self.config
    d, n, k, h = c.embed_dim, c.num_heads, c.num_kv_heads, c.head_dim
    bias = c.qkv_bias
    self.q_einsum = Einsum((n, d, h), self.dtype, (n, h) if bias else None, (2, 3))  # btnh
    self.kv_einsum = Einsum((2, k, d, h), self.dtype, (2, k, h) if bias else None, (0, 3, 4))  # cbtkh
    self.attn_vec_einsum = Einsum((n, h, d), self.dtype)
    if c.use_qk_norm:
      self.query_norm = RMSNorm(c.rms_eps, c.norm_offset)
      self.key_norm = RMSNorm(c.rms_eps, c.norm_offset)

  def qkv(self, x: jax.Array, positions: jax.Array, own_rope: bool = False):
    """x [B, T, D], positions int[T] -> q [B, T, N, H], k, v [B, T, K, H] (normed, RoPE'd).

    own_rope: tie the positions to this layer's q (an optimization barrier; values unchanged), so XLA cannot
    compute each RoPE base's cos / sin tables once and keep them through the whole forward (four bf16[T, H]
    tables: 2 GiB at 1M tokens of a 4B model). A traced forward asks for it: its peak, where the trace's
    buffers sit beside the layer's q / k / v, falls by 1.0 (exact output) to 1.9 GiB (sparse); a dense
    forward's peak rose 1.7 GiB with it (H200, benchmarks/RESULTS.md), so the dense call keeps the shared
    tables."""
    c = self.config
    q = self.q_einsum("btd,ndh->btnh", x)
    kv = self.kv_einsum("btd,ckdh->cbtkh", x)
    k, v = kv[0], kv[1]
    if c.use_qk_norm:
      q, k = self.query_norm(q), self.key_norm(k)
    inv = c.rope_inv_freq(self.layer)
    if own_rope:
      positions = jax.lax.optimization_barrier((positions, q))[0]
    q = apply_rope(q, positions, inv_freq=inv)
    k = apply_rope(k, positions, inv_freq=inv)
    return q, k, v

  def __call__(self, x: jax.Array, plan: LayerPlan, suppress=None, forced=None, gate=None,
               hook: Optional[Callable] = None):
    """Whole sequence: x [B, T, D] -> (out [B, T, D], LayerTrace | None, (k, v)); suppress / forced / gate:
    this layer's intervention (see `attend`); hook: the layer's named hook points (stream_jax.hooks.
    LayerHooks: hook(point, value) -> value)."""
    c = self.config
    t = x.shape[1]
    q, k, v = self.qkv(x, jnp.arange(t, dtype=jnp.int32), own_rope=plan.stream is not None)
    if hook is not None:
      q, k, v = hook("q", q), hook("k", k), hook("v", v)
      if hook.has("visible"):  # the suppression materialised only for a hook that asks for it
        b, n = q.shape[0], q.shape[2]
        seen = jnp.ones((b, n, t), bool) if suppress is None else ~jnp.broadcast_to(suppress, (b, n, t))
        suppress = ~hook("visible", seen)
    out, trace = attend(plan, q, k, v, scale=c.attn_scale, cap=c.attn_softcap, suppress=suppress,
                        forced=forced, gate=gate,
                        on_kept=None if hook is None else functools.partial(hook, "kept"))
    if hook is not None:
      if isinstance(trace, LayerTrace):  # (a dense call has none; dense_impl="capture" gives probabilities)
        trace = hook("trace", trace)
      out = hook("attention_out", out)
    return self.attn_vec_einsum("btnh,nhd->btd", out), trace, (k, v)

  def extend(self, x: jax.Array, start: jax.Array, cache: tuple[jax.Array, jax.Array], suppress=None):
    """Cached step: x [B, T, D] at positions start..start+T-1; cache k, v [B, S, K, H] (S static).

    Writes the new keys/values into the cache and attends densely to the filled part (minus the keys an
    intervention suppresses: bool[B|1, N, S]).
    Returns (out [B, T, D], new cache).
    """
    c = self.config
    t = x.shape[1]
    q_pos = start + jnp.arange(t, dtype=jnp.int32)
    q, k, v = self.qkv(x, q_pos)
    k_cache = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), start, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), start, axis=1)
    k_pos = jnp.arange(k_cache.shape[1], dtype=jnp.int32)
    visible = None if suppress is None else jnp.broadcast_to(~suppress, (x.shape[0],) + suppress.shape[1:])
    out = dense_lib.dense_attention(q, k_cache, v_cache, q_pos=q_pos, k_pos=k_pos, scale=c.attn_scale,
                                    softcap=c.attn_softcap, window=c.window(self.layer), k_valid=visible)
    return self.attn_vec_einsum("btnh,nhd->btd", out), (k_cache, v_cache)


class Block(nn.Module):
  """Pre(/post)-normed attention and feed-forward with residuals (post-norms: Gemma only)."""

  config: GemmaConfig
  layer: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    c = self.config
    self.pre_attention_norm = RMSNorm(c.rms_eps, c.norm_offset)
    self.pre_ffw_norm = RMSNorm(c.rms_eps, c.norm_offset)
    if c.post_norms:
      self.post_attention_norm = RMSNorm(c.rms_eps, c.norm_offset)
      self.post_ffw_norm = RMSNorm(c.rms_eps, c.norm_offset)
    self.attn = SelfAttention(c, self.layer, self.dtype)
    self.mlp = FeedForward(c.embed_dim, c.hidden_dim, self.dtype, c.activation)

  def _post(self, norm: str, x):
    return getattr(self, norm)(x) if self.config.post_norms else x

  def _ffw(self, x):
    """x + post_norm(mlp(pre_norm(x))), over chunks of positions on long inputs (`map_positions`): no
    [T, F] intermediate."""
    return map_positions(lambda blk, xc: xc + blk._post("post_ffw_norm", blk.mlp(blk.pre_ffw_norm(xc))),
                         self, x)

  def __call__(self, x: jax.Array, plan: LayerPlan, suppress=None, forced=None, gate=None, hook=None):
    a, trace, kv = self.attn(self.pre_attention_norm(x), plan, suppress, forced, gate, hook)
    x = x + self._post("post_attention_norm", a)
    x = self._ffw(x)
    return (x if hook is None else hook("residual", x)), trace, kv

  def extend(self, x, start, cache, suppress=None):
    a, cache = self.attn.extend(self.pre_attention_norm(x), start, cache, suppress)
    x = x + self._post("post_attention_norm", a)
    return self._ffw(x), cache


class Gemma(nn.Module):
  """The decoder. `__call__` runs a whole sequence; `extend` runs new tokens against a KV cache.

  `Gemma(config, dtype).apply(params, tokens, attention=...)` is the pure entry; `stream_jax.models.forward`
  wraps it with jit (static config and attention plan) and input checks.
  """

  config: GemmaConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    c = self.config
    self.embedder = Embedder(c.vocab_size, c.embed_dim, self.dtype, c.embed_scale, c.tie_embeddings)
    self.blocks = [Block(c, i, self.dtype, name=f"layer_{i}") for i in range(c.num_layers)]
    self.final_norm = RMSNorm(c.rms_eps, c.norm_offset)

  def logits(self, x):
    """Residual states [..., D] -> float32 logits [..., V] (final norm, unembedding, final soft-cap);
    [B, T, D] inputs longer than POSITION_CHUNK run chunk by chunk: the output is the only [T, V] buffer."""
    def one(mdl, xc):
      logits = mdl.embedder.decode(mdl.final_norm(xc))
      return numerics.softcap(logits, mdl.config.final_softcap)
    if x.ndim != 3:
      return one(self, x)
    return map_positions(one, self, x, out_tail=(self.config.vocab_size,), out_dtype=jnp.float32)

  def __call__(self, tokens: jax.Array, attention: Attention = "dense", *, dense_layers=(),
               prune_local: bool = False, backend: str = "xla", last_only: bool = False,
               return_hidden: bool = False, output: str = "sparse", coverage: bool = False) -> TracedRun:
    """`Gemma(config).apply(params, tokens [B, T], attention="dense" | StreamConfig, ...)` -> TracedRun;
    the same contract as `stream_jax.models.forward` (which adds jit and input checks)."""
    plans = make_plans(self.config, attention, dense_layers, prune_local, backend, None, output, coverage,
                       dtype=self.dtype)
    return traced_run(self.run(tokens, plans, last_only=last_only, return_hidden=return_hidden), plans)

  def run(self, tokens: jax.Array, plans: tuple[LayerPlan, ...], *, last_only: bool = False,
          return_hidden: bool = False, return_kv: bool = False,
          intervention: Optional[Intervention] = None, hooks: tuple[hooks_lib.Hook, ...] = (),
          hook_args=None):
    """tokens int[B, T] -> dict(logits float32[B, T, V] (or [B, V] if last_only), traces (per layer,
    None on dense layers of a dense call; the probabilities with dense_impl="capture"), hidden
    [L, B, T, D] (the residual stream after each layer, before the final norm), kv (per layer (k, v)
    [B, T, K, H]), hooked (the hooks' extras by name and layer, when hooks are given))."""
    x = self.embedder.encode(tokens)
    hidden, traces, kvs, extras = [], [], [], {}
    for i, (block, plan) in enumerate(zip(self.blocks, plans)):
      suppress, forced = (None, None) if intervention is None else intervention.layer(i)
      gate = None if intervention is None else intervention.gate(i)
      hook = None
      if any(h.at(i) for h in hooks):
        hook = hooks_lib.LayerHooks(hooks, i, hook_args, extras)
      x, trace, kv = block(x, plan, suppress, forced, gate, hook)
      traces.append(trace)
      if return_hidden:
        hidden.append(x)
      if return_kv:
        kvs.append(kv)
    out = dict(logits=self.logits(x[:, -1:])[:, 0] if last_only else self.logits(x),
               traces=tuple(traces))
    if return_hidden:
      out["hidden"] = jnp.stack(hidden)
    if return_kv:
      out["kv"] = tuple(kvs)
    if hooks:
      out["hooked"] = extras
    return out

  def extend(self, tokens: jax.Array, start: jax.Array, cache, *, last_only: bool = True,
             intervention: Optional[Intervention] = None):
    """tokens int[B, T] at positions start.. with cache (per layer (k, v) [B, S, K, H]) ->
    (logits float32[B, V] or [B, T, V], new cache). An intervention's keys span the cache (S)."""
    x = self.embedder.encode(tokens)
    new = []
    for i, (block, kv) in enumerate(zip(self.blocks, cache)):
      suppress = None if intervention is None else intervention.layer(i)[0]
      x, kv = block.extend(x, start, kv, suppress)
      new.append(kv)
    logits = self.logits(x[:, -1:])[:, 0] if last_only else self.logits(x)
    return logits, tuple(new)


def traced_run(out: dict, plans: tuple[LayerPlan, ...]) -> TracedRun:
  """The TracedRun of `Gemma.run`'s outputs under `plans`."""
  traces = tuple(out["traces"])
  stream = plans[0].stream is not None
  capture = not stream and plans[0].dense_impl == "capture"
  return TracedRun(logits=out["logits"], trace=Trace(layers=traces) if stream else None,
                   hidden=out.get("hidden"), probs=traces if capture else None, hooked=out.get("hooked"))
