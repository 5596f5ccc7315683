"""The small Flax building blocks of a Gemma decoder: RMSNorm, RoPE, embedder, gated MLP.

Numerics follow the reference (transformers' Gemma2/Gemma3 modules) because that is what the checkpoints
were trained with: norms in f32 with a `(1 + w)` scale, RoPE angles in f32, the embedding scale rounded to
the parameter dtype (bf16: sqrt(640) = 25.25, not 25.30).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) * (1 + scale), in f32, cast back to x's dtype.

  Gemma stores `scale` around 0 (the +1 is applied here); llama.cpp's GGUF stores 1 + scale.
  """

  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def rope_inv_freq(head_dim: int, base: float, scale: float = 1.0) -> np.ndarray:
  """float32[H/2] inverse frequencies; linear position scaling divides them by `scale`."""
  exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv = np.float32(1.0) / (np.float32(base) ** exponent)
  return (inv / np.float32(scale)).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float, scale: float = 1.0) -> jax.Array:
  """Split-half (NEOX) rotary embedding over the full head dim.

  Args:
    x: [B, T, N, H]; positions: int[B, T] or int[T] absolute positions.
  Returns:
    [B, T, N, H] in x's dtype (angles, cos and sin computed in f32, then cast like the reference).
  """
  h = x.shape[-1]
  inv = jnp.asarray(rope_inv_freq(h, base, scale))
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
  """Token embedding (tied with the output projection).

  encode: int[B, T] -> [B, T, D] scaled by sqrt(D) *in the parameter dtype* (as the reference does);
  decode: [B, T, D] -> float32[B, T, V] logits.
  """

  vocab_size: int
  embed_dim: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.input_embedding = self.param(
        "input_embedding", nn.initializers.normal(0.02), (self.vocab_size, self.embed_dim), self.dtype)

  def encode(self, tokens: jax.Array) -> jax.Array:
    x = jnp.take(self.input_embedding, tokens, axis=0)
    return x * jnp.asarray(np.sqrt(self.embed_dim), dtype=x.dtype)

  def decode(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("...d,vd->...v", x, self.input_embedding, preferred_element_type=jnp.float32)


class FeedForward(nn.Module):
  """GeGLU: linear(gelu_tanh(x W_gate) * (x W_up)).

  gating_einsum: [2, F, D] (gate, up); linear: [F, D].
  """

  embed_dim: int
  hidden_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.normal(0.02)
    w_gating = self.param("gating_einsum", init, (2, self.hidden_dim, self.embed_dim), self.dtype)
    w_linear = self.param("linear", init, (self.hidden_dim, self.embed_dim), self.dtype)
    gate = jnp.einsum("btd,fd->btf", x, w_gating[0])
    up = jnp.einsum("btd,fd->btf", x, w_gating[1])
    return jnp.einsum("btf,fd->btd", jax.nn.gelu(gate, approximate=True) * up, w_linear)
