"""The small Flax building blocks of a decoder: RMSNorm, RoPE, embedder, gated MLP.

Numerics follow the reference (transformers' Gemma2/Gemma3/Llama/Qwen modules) because that is what the
checkpoints were trained with: Gemma norms in f32 with a `(1 + w)` scale, Llama/Qwen norms normalised in
f32 then scaled by `w` in the activation dtype, RoPE angles in f32 (Llama-3 frequency scaling computed like
transformers), the Gemma embedding scale rounded to the parameter dtype (bf16: sqrt(640) = 25.25).

Long sequences: per-position work whose intermediates are wider than the residual stream (the gated MLP's
[T, F] gate / up / product, the [T, V] logits) runs over chunks of POSITION_CHUNK positions through
`map_positions`, so a forward's activation memory stays a few copies of [T, D] plus one [chunk, F].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Positions per chunk of the per-position work (`map_positions`): a sequence longer than this runs its MLP
# (with the norms around it) and its full-length logits chunk by chunk. 8192 keeps one chunk's MLP
# intermediates small (Gemma 3 27B, F = 21504: 8192 x 21504 x 2 bytes = 336 MiB each in bf16) while the
# matmuls stay large enough to run at full speed; shorter sequences take the plain path unchanged.
POSITION_CHUNK = 8192


class RMSNorm(nn.Module):
  """offset (Gemma): x * rsqrt(mean(x^2) + eps) * (1 + scale), in f32, cast back to x's dtype.
  no offset (Llama, Qwen): normalised in f32, cast to x's dtype, then times scale (as transformers does).

  Gemma stores `scale` around 0 (the +1 is applied here); llama.cpp's GGUF stores 1 + scale.
  """

  eps: float = 1e-6
  offset: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.zeros_init() if self.offset else nn.initializers.ones_init()
    scale = self.param("scale", init, (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    if not self.offset:
      return y.astype(x.dtype) * scale.astype(x.dtype)
    return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def llama3_inv_freq(inv: np.ndarray, factor: float, low: float, high: float, original: int) -> np.ndarray:
  """float32[H/2] inverse frequencies under Llama-3 RoPE scaling: unchanged for short wavelengths
  (< original / high), divided by `factor` for long ones (> original / low), a smooth blend in between
  (the rule of transformers' `_compute_llama3_parameters`, in f32 like it)."""
  inv = inv.astype(np.float32)
  wavelen = np.float32(2 * np.pi) / inv
  low_wavelen, high_wavelen = np.float32(original / low), np.float32(original / high)
  scaled = np.where(wavelen > low_wavelen, inv / np.float32(factor), inv)
  smooth = (np.float32(original) / wavelen - np.float32(low)) / np.float32(high - low)
  smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def llama3_factors(inv: np.ndarray, *llama3) -> np.ndarray:
  """float32[H/2] divisors inv / llama3_inv_freq(inv): what llama.cpp stores as the `rope_freqs` tensor."""
  return (inv.astype(np.float32) / llama3_inv_freq(inv, *llama3)).astype(np.float32)


def rope_inv_freq(head_dim: int, base: float, scale: float = 1.0, llama3=None) -> np.ndarray:
  """float32[H/2] inverse frequencies; linear position scaling divides them by `scale`; `llama3`
  (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings) applies Llama-3 scaling."""
  exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv = np.float32(1.0) / (np.float32(base) ** exponent)
  if llama3 is not None:
    inv = llama3_inv_freq(inv, *llama3)
  return (inv / np.float32(scale)).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float = 10_000.0, scale: float = 1.0,
               inv_freq=None) -> jax.Array:
  """Split-half (NEOX) rotary embedding over the full head dim.

  Args:
    x: [B, T, N, H]; positions: int[B, T] or int[T] absolute positions.
    inv_freq: optional float32[H/2] inverse frequencies (e.g. `GemmaConfig.rope_inv_freq`); else from
      base and scale.
  Returns:
    [B, T, N, H] in x's dtype (angles, cos and sin computed in f32, then cast like the reference).
  """
  h = x.shape[-1]
  inv = jnp.asarray(rope_inv_freq(h, base, scale) if inv_freq is None else inv_freq, jnp.float32)
  pos = jnp.asarray(positions).astype(jnp.float32)
  if pos.ndim == 1:
    pos = pos[None, :]
  ang = pos[..., None] * inv  # [B, T, H/2]
  ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]  # [B, T, 1, H]
  cos, sin = jnp.cos(ang).astype(x.dtype), jnp.sin(ang).astype(x.dtype)
  x1, x2 = x[..., : h // 2], x[..., h // 2:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos + rotated * sin


class Embedder(nn.Module):
  """Token embedding, tied with the output projection unless `tied=False` (then `output_embedding`
  [V, D] is the lm_head).

  encode: int[B, T] -> [B, T, D], scaled by sqrt(D) *in the parameter dtype* when `scale` (Gemma);
  decode: [B, T, D] -> float32[B, T, V] logits.
  """

  vocab_size: int
  embed_dim: int
  dtype: jnp.dtype = jnp.float32
  scale: bool = True
  tied: bool = True

  def setup(self):
    shape = (self.vocab_size, self.embed_dim)
    self.input_embedding = self.param("input_embedding", nn.initializers.normal(0.02), shape, self.dtype)
    if not self.tied:
      self.output_embedding = self.param("output_embedding", nn.initializers.normal(0.02), shape, self.dtype)

  def encode(self, tokens: jax.Array) -> jax.Array:
    x = jnp.take(self.input_embedding, tokens, axis=0)
    if not self.scale:
      return x
    return x * jnp.asarray(np.sqrt(self.embed_dim), dtype=x.dtype)

  def decode(self, x: jax.Array) -> jax.Array:
    w = self.input_embedding if self.tied else self.output_embedding
    return jnp.einsum("...d,vd->...v", x, w, preferred_element_type=jnp.float32)


class FeedForward(nn.Module):
  """Gated MLP: linear(act(x W_gate) * (x W_up)); act = tanh-GELU (GeGLU, Gemma) or SiLU (SwiGLU).

  gating_einsum: [2, F, D] (gate, up); linear: [F, D].
  """

  embed_dim: int
  hidden_dim: int
  dtype: jnp.dtype = jnp.float32
  activation: str = "gelu_tanh"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.normal(0.02)
    w_gating = self.param("gating_einsum", init, (2, self.hidden_dim, self.embed_dim), self.dtype)
    w_linear = self.param("linear", init, (self.hidden_dim, self.embed_dim), self.dtype)
    gate = jnp.einsum("btd,fd->btf", x, w_gating[0])
    up = jnp.einsum("btd,fd->btf", x, w_gating[1])
    act = jax.nn.silu(gate) if self.activation == "silu" else jax.nn.gelu(gate, approximate=True)
    return jnp.einsum("btf,fd->btd", act * up, w_linear)


def map_positions(fn, module, x: jax.Array, *, out_tail=None, out_dtype=None, chunk=None) -> jax.Array:
  """`fn(module, x)` for a per-position `fn` ([B, t, ...] -> [B, t, *out_tail], every position computed
  from its own row alone), run over chunks of `chunk` positions (default POSITION_CHUNK) when x is longer.

  A Flax lifted scan (parameters broadcast, not copied) walks the chunks; each step reads [B, chunk, ...]
  and writes fn's result in place with a dynamic-update-slice. When fn keeps x's shape and dtype (the MLP
  block) the loop reads and writes one buffer, a copy of x: nothing else of size T is live; otherwise
  (logits) it writes into a fresh output buffer, made after x (an optimisation barrier keeps XLA from
  building every layer's buffer up front). T need not be a multiple of `chunk`: the last T mod chunk
  positions run as one short piece. out_tail / out_dtype: the output's trailing shape / dtype (default x's).
  """
  chunk = POSITION_CHUNK if chunk is None else int(chunk)
  t = x.shape[1]
  if t <= chunk or module.is_initializing():
    return fn(module, x)
  out_tail = tuple(x.shape[2:]) if out_tail is None else tuple(out_tail)
  out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
  n, rest = divmod(t, chunk)
  in_place = out_tail == tuple(x.shape[2:]) and out_dtype == x.dtype
  if in_place:
    buf = x  # read chunk i, write chunk i: the chunks are disjoint, so each is read before it is written
  else:
    buf, x = jax.lax.optimization_barrier((jnp.zeros(x.shape[:2] + out_tail, out_dtype), x))

  def body(mdl, out, start):
    src = out if in_place else x
    y = fn(mdl, jax.lax.dynamic_slice_in_dim(src, start, chunk, axis=1))
    return jax.lax.dynamic_update_slice_in_dim(out, y.astype(out_dtype), start, axis=1), None

  scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False})
  out, _ = scan(module, buf, jnp.arange(n, dtype=jnp.int32) * chunk)
  if rest:
    tail = fn(module, jax.lax.slice_in_dim(x, n * chunk, t, axis=1)).astype(out_dtype)
    out = jax.lax.dynamic_update_slice_in_dim(out, tail, n * chunk, axis=1)
  return out
