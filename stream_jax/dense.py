"""Exact dense causal attention: the one dense implementation of the library, the model, the references
and the traces (`dense_attention`).

Flash style by default: queries in chunks of `q_chunk` (an outer `lax.map`), keys in chunks of `k_chunk`
with an f32 online softmax (running max and sum). For each query chunk only the contiguous range of key
chunks between the first and the last chunk that *can* hold a visible key is visited (a `fori_loop` with
traced bounds), decided from each key chunk's min/max position. The rule is exact for any positions (a
chunk outside the range has no visible key) and, for sorted positions as in the forward pass and the KV
cache, it is the causal triangle (global layers: chunks above the diagonal are never computed) or the
window band (local layers: O(T x W) work). Nothing T x S is allocated. The per-query log-sum-exp comes out
of the same pass, which is what exact traces normalise kept-block mass by.

The T x S path (`return_probs=True`, or a `token_mask`) materialises the probabilities [B, N, T, S]: it is
what `output_attentions=True` stores, the measurement path of the "capture" benchmark and the small-input
reference of sparse attention. It is the only T x S path in stream_jax, and Stream never takes it.
"""

from __future__ import annotations

from typing import Optional, TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax

from stream_jax import checks, numerics
from stream_jax.numerics import NEG_INF

if TYPE_CHECKING:  # shapes for readers and type checkers (no runtime dependency); enforced by checks
  from jaxtyping import Array, Bool, Float, Int

# Measured on XLA:CPU (2 cores) at the 270M heads, 8k tokens: 256 x 256 beats 512 x 512 by ~10% on global
# layers and ~40% on 512-key windows (less wasted band). Any sizes give the same numbers.
Q_CHUNK = 256
K_CHUNK = 256
_I32_MAX = jnp.iinfo(jnp.int32).max
_I32_MIN = jnp.iinfo(jnp.int32).min


def dense_attention(q: Float[Array, "B T N H"], k: Float[Array, "B S K H"], v: Float[Array, "B S K Hv"], *,
                    q_pos: Int[Array, "T"], k_pos: Int[Array, "S"], scale: float,
                    softcap: Optional[float] = None, window: Optional[int] = None,
                    k_valid: Optional[Bool[Array, "B S"] | Bool[Array, "B N S"]] = None,
                    token_mask: Optional[Bool[Array, "B N T S"]] = None, return_lse: bool = False,
                    return_probs: bool = False, q_chunk: int = Q_CHUNK, k_chunk: int = K_CHUNK):
  """Causal (sliding-window) softmax attention, exact.

  Args:
    q: [B, T, N, H]; k: [B, S, K, H]; v: [B, S, K, Hv] (GQA: query head n reads kv head n // (N // K)).
    q_pos: int[T], k_pos: int[S] absolute positions; key s is visible to query t iff
      k_pos[s] <= q_pos[t] and, with `window` W, q_pos[t] - k_pos[s] < W (W keys including itself).
    scale, softcap: logits are x = (q . k) * scale in f32, then softcap * tanh(x / softcap) if given.
    k_valid: optional bool[B, S] (e.g. the filled part of a KV cache) or bool[B, N, S] per query head
      (an intervention's attention suppression: the other keys renormalise).
    token_mask: optional bool[B, N, T, S] further restricting the keys (e.g. `to_dense(mask)`, to make
      this the dense reference of sparse attention). T x S itself, so it takes the T x S path.
    return_lse: also return the natural-log softmax denominator over visible keys.
    return_probs: also return the probabilities [B, N, T, S] in q's dtype (the T x S path: p is rounded
      to q's dtype before the PV product, as a model that keeps its attention weights does).
    q_chunk, k_chunk: flash tile sizes; temporaries are O(B x N x q_chunk x k_chunk).
  Returns:
    out [B, T, N, Hv] in q's dtype (f32 accumulation), then lse float32[B, N, T] if return_lse, then probs
    if return_probs. A row that sees no key has out 0, lse -inf and probabilities 0.
  """
  _check(q, k, v, q_pos, k_pos, k_valid, token_mask)
  checks.check_positive("scale", scale, allow_none=False)
  checks.check_positive("softcap", softcap)
  checks.check_window(window)
  q_pos, k_pos = q_pos.astype(jnp.int32), k_pos.astype(jnp.int32)
  if return_probs or token_mask is not None:
    out, lse, probs = _dense_probs(q, k, v, q_pos, k_pos, scale=scale, softcap=softcap, window=window,
                                   k_valid=k_valid, token_mask=token_mask)
  else:
    out, lse = _dense_flash(q, k, v, q_pos, k_pos, scale=scale, softcap=softcap, window=window,
                            k_valid=k_valid, q_chunk=q_chunk, k_chunk=k_chunk)
    probs = None
  extra = ((lse,) if return_lse else ()) + ((probs,) if return_probs else ())
  return (out,) + extra if extra else out


def _check(q, k, v, q_pos, k_pos, k_valid, token_mask) -> None:
  if getattr(q, "ndim", None) != 4:
    raise ValueError(f"q must have shape [B, T, N, H], got {getattr(q, 'shape', type(q).__name__)}")
  t, s, n, _, _ = checks.check_qkv(q, k, v)
  b = q.shape[0]
  if q_pos.shape != (t,) or k_pos.shape != (s,):
    raise ValueError(f"q_pos {q_pos.shape} / k_pos {k_pos.shape} must be int[T] / int[S] = [{t}] / [{s}]")
  if k_valid is not None and k_valid.shape not in ((b, s), (b, n, s)):
    raise ValueError(f"k_valid must have shape [B, S] = {(b, s)} or [B, N, S] = {(b, n, s)}, got "
                     f"{k_valid.shape}")
  if token_mask is not None and token_mask.shape != (b, n, t, s):
    raise ValueError(f"token_mask must have shape [B, N, T, S] = {(b, n, t, s)}, got {token_mask.shape}")


def _dense_probs(q, k, v, q_pos, k_pos, *, scale, softcap, window, k_valid, token_mask):
  """The T x S path: (out [B, T, N, Hv], lse [B, N, T], probs [B, N, T, S] in q's dtype)."""
  b, t, n, h = q.shape
  s, kv, hv = v.shape[1:]
  g = n // kv
  qg = q.reshape(b, t, kv, g, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
  logits = numerics.softcap(logits * scale, softcap)  # [B, K, G, T, S]
  visible = k_pos[None, :] <= q_pos[:, None]  # [T, S]
  if window is not None:
    visible &= q_pos[:, None] - k_pos[None, :] < window
  visible = visible[None, None, None]
  if k_valid is not None:
    visible = visible & _per_head(k_valid, n, kv)[:, :, :, None, :]
  if token_mask is not None:
    visible = visible & token_mask.astype(bool).reshape(b, kv, g, t, s)
  probs, lse = numerics.masked_softmax(logits, visible, axes=-1)
  probs = probs.astype(q.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
  return (out.reshape(b, t, n, hv).astype(q.dtype), lse.reshape(b, n, t),
          probs.reshape(b, n, t, s))


def _per_head(k_valid: jax.Array, n: int, kv: int) -> jax.Array:
  """bool[B, S] -> [B, 1, 1, S]; bool[B, N, S] -> [B, K, G, S] (query head n = k * G + g)."""
  k_valid = k_valid.astype(bool)
  if k_valid.ndim == 2:
    return k_valid[:, None, None, :]
  return k_valid.reshape(k_valid.shape[0], kv, n // kv, k_valid.shape[-1])


def _pad_to(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _dense_flash(q, k, v, q_pos, k_pos, *, scale, softcap, window, k_valid, q_chunk, k_chunk):
  """The flash path: (out [B, T, N, Hv], lse [B, N, T]) in O(q_chunk x k_chunk) temporaries."""
  b, t, n, h = q.shape
  _, s, kv, hv = v.shape
  g = n // kv
  cq, ck = min(q_chunk, t), min(k_chunk, s)
  nq, nk = -(-t // cq), -(-s // ck)

  # Queries: [nq, B, K, cq * G, H] (rows ordered (t, g)), so each tile is one plain batched matmul.
  qs = _pad_to(q.reshape(b, t, kv, g, h), 1, nq * cq).reshape(b, nq, cq, kv, g, h)
  qs = qs.transpose(1, 0, 3, 2, 4, 5).reshape(nq, b, kv, cq * g, h)
  qp = _pad_to(q_pos, 0, nq * cq, _I32_MIN).reshape(nq, cq)
  q_ok = _pad_to(jnp.ones((t,), bool), 0, nq * cq, False).reshape(nq, cq)
  # Keys: [B, K, S', H]; padding keys are invalid and never widen a chunk's position range.
  ks = _pad_to(k, 1, nk * ck).transpose(0, 2, 1, 3)
  vs = _pad_to(v, 1, nk * ck).transpose(0, 2, 1, 3)
  kp = _pad_to(k_pos, 0, nk * ck, _I32_MAX)
  k_ok = _pad_to(jnp.ones((s,), bool), 0, nk * ck, False)
  # [B|1, K, G|1, S']: per kv head and group, so per-head masks (interventions) index like the logits
  kvalid = k_ok[None, None, None] if k_valid is None else _pad_to(_per_head(k_valid, n, kv), 3, nk * ck,
                                                                   False) & k_ok
  k_lo = jnp.where(k_ok, kp, _I32_MAX).reshape(nk, ck).min(1)
  k_hi = jnp.where(k_ok, kp, _I32_MIN).reshape(nk, ck).max(1)
  chunks = jnp.arange(nk, dtype=jnp.int32)

  def q_step(args):
    qc, qpc, qokc = args  # [B, K, cq*G, H], [cq], [cq]
    q_lo = jnp.where(qokc, qpc, _I32_MAX).min()
    q_hi = jnp.where(qokc, qpc, _I32_MIN).max()
    needed = k_lo <= q_hi
    if window is not None:
      needed &= k_hi > q_lo - window  # q_lo is a real position: no int32 wrap-around
    first = jnp.where(needed, chunks, nk).min()
    last = jnp.where(needed, chunks, -1).max()

    def k_step(j, carry):
      acc, m, l = carry  # [B, K, cq*G, Hv], [B, K, cq*G] x2, f32
      kc = lax.dynamic_slice_in_dim(ks, j * ck, ck, axis=2)
      vc = lax.dynamic_slice_in_dim(vs, j * ck, ck, axis=2)
      kpc = lax.dynamic_slice_in_dim(kp, j * ck, ck)
      x = jnp.einsum("bkrh,bksh->bkrs", qc, kc, preferred_element_type=jnp.float32)
      x = numerics.softcap(x * scale, softcap)
      vis = kpc[None, :] <= qpc[:, None]  # [cq, ck]
      if window is not None:
        vis &= qpc[:, None] - kpc[None, :] < window
      vis = vis[None, None, :, None, :] & lax.dynamic_slice_in_dim(kvalid, j * ck, ck, axis=3)[
          :, :, None, :, :]  # [B|1, K|1, cq, G|1, ck]
      x = jnp.where(vis, x.reshape(b, kv, cq, g, ck), NEG_INF).reshape(b, kv, cq * g, ck)
      m_new = jnp.maximum(m, x.max(-1))
      m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)  # a row with nothing visible yet stays 0
      p = jnp.exp(x - m_safe[..., None])
      corr = jnp.exp(m - m_safe)
      l = l * corr + p.sum(-1)
      pv = jnp.einsum("bkrs,bksh->bkrh", p.astype(v.dtype), vc, preferred_element_type=jnp.float32)
      return acc * corr[..., None] + pv, m_new, l

    init = (jnp.zeros((b, kv, cq * g, hv), jnp.float32), jnp.full((b, kv, cq * g), NEG_INF, jnp.float32),
            jnp.zeros((b, kv, cq * g), jnp.float32))
    acc, m, l = lax.fori_loop(first, last + 1, k_step, init)
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), NEG_INF)
    return out.astype(q.dtype), lse

  out, lse = lax.map(q_step, (qs, qp, q_ok))  # [nq, B, K, cq*G, Hv], [nq, B, K, cq*G]
  out = out.reshape(nq, b, kv, cq, g, hv).transpose(1, 0, 3, 2, 4, 5).reshape(b, nq * cq, n, hv)[:, :t]
  lse = lse.reshape(nq, b, kv, cq, g).transpose(1, 2, 4, 0, 3).reshape(b, n, nq * cq)[..., :t]
  return out, lse
