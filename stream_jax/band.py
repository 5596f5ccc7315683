"""Exact sliding-window attention with its block mass (`window_attention`): the XLA path of a Stream call's
unpruned local layers, equal to `sparse_attention(q, k, v, window_mask(...), window=W)`.

The window's band mask keeps, for each query block, the contiguous run of key blocks the window spans, so
the gathered [C, bq, bk] tiles of the general sparse path (one gather per kept block, small matmuls: 2.9x
the dense window's time on XLA:CPU) are not needed. Each chunk of query blocks takes one contiguous slice
of keys instead (the window before the chunk plus the chunk), one [rows, L] softmax with L = chunk +
round_up(W - 1, block_k), and the mass of every (query block, key block) pair is a reshape-sum of the same
probabilities, read out in the band mask's slot order. O(T x W) work and memory; nothing T x T.
"""

from __future__ import annotations

import functools
from typing import Optional, TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from stream_jax import checks, numerics
from stream_jax.mask import check_layout, num_blocks, window_mask
from stream_jax.numerics import AttentionStats

if TYPE_CHECKING:  # shapes for readers and type checkers (no runtime dependency); enforced by checks
  from jaxtyping import Array, Bool, Float

# Query rows per step (rounded to whole blocks). Measured on XLA:CPU (2 cores) at the 270M's local layers
# (4 query heads, head dim 256, W = 512, 64-token blocks), 8k tokens: 64-192 rows within 10% (0.22-0.25 s,
# dense windowed attention 0.20 s, the gathered sparse path 0.45 s); 512 rows 0.47 s (cache misses).
Q_CHUNK = 128


def window_attention(q: Float[Array, "*B T N H"], k: Float[Array, "*B T K H"], v: Float[Array, "*B T K Hv"],
                     *, window: int, block_q: int, block_k: int, scale: Optional[float] = None,
                     softcap: Optional[float] = None, key_mask: Optional[Bool[Array, "*B N T"]] = None,
                     q_chunk: int = Q_CHUNK) -> tuple[Float[Array, "*B T N Hv"], AttentionStats]:
  """Causal sliding-window self-attention (queries and keys at positions 0..T-1) and its block mass.

  Args:
    q: [T, N, H] or [B, T, N, H]; k: [T, K, H] / [B, T, K, H]; v: [T, K, Hv] / [B, T, K, Hv].
    window: W >= 1, a query at t sees keys t - W < s <= t.
    block_q, block_k: the block layout of the mass (powers of two), as in `window_mask`.
    scale: logit scale (default H ** -0.5); softcap: optional `c * tanh(x / c)` on logits.
    key_mask: optional bool[..., N, T], False where head n may not see key s (the rest renormalise).
    q_chunk: query rows per sequential step (rounded up to whole blocks); bounds the temporaries to
      O(N x q_chunk x (q_chunk + W)).
  Returns:
    out [..., T, N, Hv] in q's dtype and AttentionStats: mass float32[..., N, nQ, C] with slot c of query
    block i the key block `window_mask(...).indices[..., i, c]` (0 where that id is -1), lse [..., N, T].
  """
  t, s, n, _, h = checks.check_qkv(q, k, v)
  if s != t:
    raise ValueError(f"window_attention is self-attention: q and k must have the same length, got T={t} "
                     f"and S={s}; use sparse_attention with window_mask for other shapes")
  if not isinstance(window, int) or isinstance(window, bool) or window < 1:
    raise ValueError(f"window must be an int >= 1 (keys including the query itself), got {window!r}")
  check_layout(block_q, block_k, t, s)
  checks.check_positive("scale", scale)
  checks.check_positive("softcap", softcap)
  if isinstance(q_chunk, bool) or not isinstance(q_chunk, (int, np.integer)) or q_chunk < 1:
    raise ValueError(f"q_chunk must be an int >= 1 (query rows per step), got {q_chunk!r}")
  key_mask = checks.per_head("key_mask", key_mask, q.shape[:-3], n, s, "keys", bool)
  batched = q.ndim == 4
  if not batched:
    q, k, v = q[None], k[None], v[None]
    key_mask = None if key_mask is None else key_mask[None]
  band = window_mask(1, t, t, block_q=block_q, block_k=block_k, window=window).indices[0]  # [nQ, C]
  out, mass, lse = _window(q, k, v, key_mask, band, window=window, block_q=block_q, block_k=block_k,
                           scale=numerics.resolve_scale(scale, h), softcap=softcap, q_chunk=q_chunk)
  if not batched:
    out, mass, lse = out[0], mass[0], lse[0]
  return out, AttentionStats(mass=mass, lse=lse)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


@functools.partial(jax.jit, static_argnames=("window", "block_q", "block_k", "scale", "softcap", "q_chunk"))
def _window(q, k, v, key_mask, band, *, window, block_q, block_k, scale, softcap, q_chunk):
  """Validated [B, ...] inputs, band int32[nQ, C] -> out [B, T, N, Hv], mass [B, N, nQ, C], lse [B, N, T]."""
  b, t, n, h = q.shape
  kv, hv = v.shape[2], v.shape[3]
  g = n // kv
  n_q, cap = band.shape
  # A chunk is whole query blocks and whole key blocks, so its key slice starts on a key block.
  unit = max(block_q, block_k)
  cq = min(_round_up(q_chunk, unit), _round_up(n_q * block_q, unit))
  n_c = -(-t // cq)
  front = _round_up(window - 1, block_k)  # keys before a chunk's first query that its window can reach
  span = front + cq  # keys one chunk reads
  qb_per_c = cq // block_q

  pad_q = lambda x: jnp.pad(x, [(0, 0), (0, n_c * cq - t)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
  pad_k = lambda x: jnp.pad(x, [(0, 0), (front, n_c * cq - t)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
  qs = pad_q(q).reshape(b, n_c, cq, kv, g, h).swapaxes(0, 1)  # [nC, B, cq, K, G, H]
  ks, vs = pad_k(k), pad_k(v)  # [B, front + nC cq, K, *]
  kms = None if key_mask is None else pad_k(jnp.swapaxes(key_mask, 1, 2)).reshape(b, -1, kv, g)
  # Slot c of query block i reads key block band[i, c]; relative to its chunk's key slice that is
  # band - chunk_start_block, with chunk_start_block = i0 * bq / bk - front / bk.
  ids = jnp.pad(band, [(0, n_c * qb_per_c - n_q), (0, 0)], constant_values=-1)
  ids = ids.reshape(n_c, qb_per_c, cap)
  rows = jnp.arange(cq, dtype=jnp.int32)
  cols = jnp.arange(span, dtype=jnp.int32)

  def chunk(args):
    i, qc, ids_c = args
    q0 = i * cq
    kc = lax.dynamic_slice_in_dim(ks, q0, span, axis=1)  # padded coordinates: key q0 - front + j
    vc = lax.dynamic_slice_in_dim(vs, q0, span, axis=1)
    logits = jnp.einsum("bqkgh,bskh->bkgqs", qc, kc, preferred_element_type=jnp.float32)
    logits = numerics.softcap(logits * scale, softcap)  # [B, K, G, cq, span]
    q_pos = q0 + rows[:, None]
    k_pos = q0 - front + cols[None, :]
    visible = (k_pos >= 0) & (k_pos <= q_pos) & (q_pos - k_pos < window) & (q_pos < t)
    visible = visible[None, None, None]
    if kms is not None:
      km = lax.dynamic_slice_in_dim(kms, q0, span, axis=1)  # [B, span, K, G]
      visible = visible & km.transpose(0, 2, 3, 1)[:, :, :, None, :]
    probs, lse = numerics.masked_softmax(logits, visible, axes=-1)
    out = jnp.einsum("bkgqs,bskh->bqkgh", probs, vc.astype(jnp.float32))
    blocks = probs.reshape(b, kv, g, qb_per_c, block_q, span // block_k, block_k).sum((4, 6))
    rel = ids_c - (q0 - front) // block_k  # [qb_per_c, C]
    mass = jnp.take_along_axis(blocks, jnp.broadcast_to(jnp.maximum(rel, 0), blocks.shape[:3] + rel.shape),
                               axis=-1)
    mass = jnp.where(ids_c >= 0, mass, 0.0)
    return out.astype(q.dtype), mass, lse[..., 0]

  out, mass, lse = lax.map(chunk, (jnp.arange(n_c, dtype=jnp.int32), qs, ids))
  # out [nC, B, cq, K, G, Hv]; mass [nC, B, K, G, qb, C]; lse [nC, B, K, G, cq]
  out = out.swapaxes(0, 1).reshape(b, n_c * cq, n, hv)[:, :t]
  mass = mass.transpose(1, 2, 3, 0, 4, 5).reshape(b, n, n_c * qb_per_c, cap)[:, :, :n_q]
  lse = lse.transpose(1, 2, 3, 0, 4).reshape(b, n, n_c * cq)[:, :, :t]
  return out, mass, lse
