"""Block-sparse attention over a BlockMask: the op entry `sparse_attention` and its XLA reference (the CPU
path and the oracle of the Pallas kernels, kernels/blocksparse_triton.py and blocksparse_mosaic.py);
block-level attention mass; the small-input references (`reference_attention`, `dense_block_mass`) built on
stream_jax.dense.

Each query block attends to its C kept key blocks only: the C x block_k keys are gathered and one exact
softmax runs over them in fp32 (the one-step case of the online softmax: C is small and static), so memory
is O(T x C x block_k), chunked over query blocks. The attention probability each kept block receives,
summed over the block's queries, is the sparse "attention pattern" the analysis modules consume.
"""

from __future__ import annotations

import functools
from typing import Optional, TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax

from stream_jax import checks, dense, numerics
from stream_jax.kernels import blocksparse_mosaic, blocksparse_triton, implementations
from stream_jax.mask import DENSE_LIMIT, BlockMask, num_blocks, query_positions, to_blocks
from stream_jax.numerics import DEFAULT_Q_CHUNK, NEG_INF, AttentionStats

if TYPE_CHECKING:  # shapes for readers and type checkers (no runtime dependency); enforced by checks
  from jaxtyping import Array, Bool, Float

__all__ = ["AttentionStats", "block_coverage", "dense_block_mass", "reference_attention", "sparse_attention"]


def sparse_attention(q: Float[Array, "*B T N H"], k: Float[Array, "*B S K H"], v: Float[Array, "*B S K Hv"],
                     mask: BlockMask, *, scale: Optional[float] = None, softcap: Optional[float] = None,
                     window: Optional[int] = None, q_chunk: Optional[int] = DEFAULT_Q_CHUNK,
                     backend: str = "xla", lse_ref: Optional[Float[Array, "*B N T"]] = None,
                     key_mask: Optional[Bool[Array, "*B N S"]] = None,
                     gate: Optional[Float[Array, "*B N nQ C"]] = None
                     ) -> tuple[Float[Array, "*B T N Hv"], AttentionStats]:
  """Exact softmax attention over the token set a BlockMask keeps.

  The one entry of the op: validates once, then runs one implementation (kernels/implementations.py): the
  XLA reference below, the Triton kernel (kernels/blocksparse_triton.py) or the Mosaic GPU port
  (kernels/blocksparse_mosaic.py), which assume valid inputs.

  Args:
    q: [T, N, H] or [B, T, N, H]; k: [S, K, H] / [B, S, K, H]; v: [S, K, Hv] / [B, S, K, Hv].
    mask: BlockMask over (T, S) with indices [..., N, nQ, C]. Block ids must be -1 or in [0, nK): a
      concrete mask is checked (ValueError); under jit the ids are traced values and are not checked
      (out-of-range ids would be clamped by the gather), so check hand-made masks outside jit.
    scale: logit scale (default H ** -0.5); softcap: optional `c * tanh(x / c)` on logits.
    window: sliding window W (query sees keys with pos(q) - pos(k) < W), None = global causal.
    q_chunk: query blocks per sequential step (memory bound); None = all at once.
    backend: an implementation, "xla" (the reference), "triton" (block sizes >= 16; interpreted off the
      GPU) or "mosaic" (Hopper: 16-bit inputs, 16 x 16, 32 x 32 or 64 x 64 blocks), or a policy: "pallas"
      (the Mosaic port where it takes the call, else Triton) or "auto" (the same on a GPU for 16-bit
      inputs, the reference otherwise and for what no kernel takes). See `kernels.implementations.choose`.
      A key_mask or gate runs on the reference under either policy (the kernels take neither).
    lse_ref: optional float32[..., N, T] log softmax denominators of a reference attention over the
      same logits (dense attention's, for an exact trace): block mass becomes exp(logit - lse_ref)
      summed, the reference's probability, instead of the kept softmax's. The output is unchanged.
    key_mask: optional bool[..., N, S], False where head n may not see key s inside its kept blocks
      (an intervention's attention suppression; the rest renormalise). A query left with no visible key
      gets output 0, mass 0 and lse -inf. Runs on the XLA path (the kernel takes no key mask).
    gate: optional float[..., N, nQ, C] >= 0, a weight on each kept block's softmax terms (shape of
      `mass`): a query's probability of key s in slot c is gate[c] exp(logit) / sum_c' gate[c'] sum exp(.).
      All ones is plain attention; 0 drops the block for that query block and head with the rest
      renormalised (what a forced mask without the block, or a suppression of its keys, gives); the
      derivative at 1 is attribution patching's first-order estimate of that ablation. The XLA path.

  Returns:
    out [..., T, N, Hv] in q's dtype, and AttentionStats (mass [..., N, nQ, C], lse [..., N, T]).
  """
  t, s, n, _, h = checks.check_qkv(q, k, v)
  _check_mask(mask, t, s, n, q.shape[:-3])
  lse_ref = checks.per_head("lse_ref", lse_ref, q.shape[:-3], n, t, "queries", jnp.float32)
  key_mask = checks.per_head("key_mask", key_mask, q.shape[:-3], n, s, "keys", bool)
  if gate is not None and tuple(gate.shape) != tuple(mask.indices.shape):
    raise ValueError(f"gate must have the shape of mask.indices (and of stats.mass) [..., N, nQ, C] = "
                     f"{tuple(mask.indices.shape)}, got {tuple(gate.shape)}")
  checks.check_positive("scale", scale)
  checks.check_positive("softcap", softcap)
  checks.check_window(window)
  checks.check_chunk(q_chunk)
  scale = numerics.resolve_scale(scale, h)
  intervened = key_mask is not None or gate is not None
  if intervened and backend in implementations.POLICIES:
    backend = "xla"
  call = implementations.Call.attention(q, v, mask, key_mask=key_mask is not None, gate=gate is not None)
  impl = implementations.choose("sparse_attention", backend, call)
  if impl == "mosaic":
    return blocksparse_mosaic.sparse_attention(q, k, v, mask, scale=scale, softcap=softcap, window=window,
                                               lse_ref=lse_ref)
  if impl == "triton":
    return blocksparse_triton.sparse_attention(q, k, v, mask, scale=scale, softcap=softcap, window=window,
                                               lse_ref=lse_ref)
  return _sparse_xla(q, k, v, mask, scale=scale, softcap=softcap, window=window, q_chunk=q_chunk,
                     lse_ref=lse_ref, key_mask=key_mask, gate=gate)


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "window", "q_chunk"))
def _sparse_xla(q, k, v, mask: BlockMask, *, scale: float, softcap, window, q_chunk, lse_ref,
                key_mask=None, gate=None):
  """The XLA reference (and CPU path) on validated inputs, compiled as one program (eager callers would
  otherwise dispatch its loops op by op)."""
  fn = functools.partial(_sparse, block_q=mask.block_q, block_k=mask.block_k, scale=scale,
                         softcap=softcap, window=window, q_chunk=q_chunk)
  if q.ndim == 4:
    out, mass, lse = jax.vmap(fn)(q, k, v, mask.indices, lse_ref, key_mask, gate)
  else:
    out, mass, lse = fn(q, k, v, mask.indices, lse_ref, key_mask, gate)
  return out, AttentionStats(mass=mass, lse=lse)


def _check_mask(mask, t, s, n, batch):
  if not isinstance(mask, BlockMask):
    raise TypeError(f"mask must be a BlockMask, got {type(mask).__name__}")
  if (mask.q_len, mask.k_len) != (t, s):
    raise ValueError(f"mask was made for q_len={mask.q_len}, k_len={mask.k_len} but q, k have "
                     f"T={t}, S={s}")
  want = tuple(batch) + (n, num_blocks(t, mask.block_q))
  if tuple(mask.indices.shape[:-1]) != want:
    raise ValueError(f"mask.indices must have shape {want} + (C,) for these q, k "
                     f"([batch,] heads, query blocks), got {mask.indices.shape}")
  checks.check_block_ids(mask.indices, mask.num_k_blocks)  # concrete masks; under jit ids are not checked


def _sparse(q, k, v, indices, lse_ref, key_mask, gate=None, *, block_q, block_k, scale, softcap, window, q_chunk):
  """q [T, N, H], k/v [S, K, *], indices [N, nQ, C], lse_ref [N, T] (NaN rows: none) or None, key_mask
  bool[N, S] or None, gate float[N, nQ, C] or None -> out [T, N, Hv], mass [N, nQ, C], lse [N, T]. Without lse_ref the reference
  probabilities are not computed (one exp per kept logit saved)."""
  t, n, h = q.shape
  s, kv, hv = v.shape
  g = n // kv
  n_q = num_blocks(t, block_q)
  q_blocks = to_blocks(q, block_q).reshape(n_q, block_q, kv, g, h)
  k_blocks = to_blocks(k, block_k)  # [nK, bk, K, H]
  v_blocks = to_blocks(v, block_k)
  # [nK, bk, K, G] (padding keys come out False; the causal rule hides them anyway)
  km_blocks = None if key_mask is None else to_blocks(key_mask.T, block_k).reshape(-1, block_k, kv, g)
  idx = indices.reshape(kv, g, n_q, -1).transpose(2, 0, 1, 3)  # [nQ, K, G, C]
  gt = None if gate is None else gate.astype(jnp.float32).reshape(kv, g, n_q, -1).transpose(2, 0, 1, 3)
  q_pos = query_positions(t, s, block_q)  # [nQ, bq]
  ref = None
  if lse_ref is not None:
    ref = jnp.pad(lse_ref, [(0, 0), (0, n_q * block_q - t)], constant_values=jnp.nan)
    ref = ref.reshape(kv, g, n_q, block_q).transpose(2, 0, 1, 3)  # [nQ, K, G, bq]

  def one(qb, ids, gate_row, ref_row, pos, kb, vb, km):
    """qb [bq, H], ids [C], ref_row [bq] or None, pos [bq], kb/vb [nK, bk, *], km bool[nK, bk] or None -> out
    [bq, Hv], mass [C], lse [bq]."""
    safe = jnp.maximum(ids, 0)
    keys, vals = kb[safe], vb[safe]  # [C, bk, *]
    logits = jnp.einsum("qh,ckh->cqk", qb, keys, preferred_element_type=jnp.float32)
    logits = numerics.softcap(logits * scale, softcap)  # [C, bq, bk]
    k_pos = safe[:, None] * block_k + jnp.arange(block_k, dtype=jnp.int32)  # [C, bk]
    visible = (ids[:, None, None] >= 0) & (k_pos[:, None, :] <= pos[None, :, None])
    if window is not None:
      visible &= pos[None, :, None] - k_pos[:, None, :] < window
    if km is not None:
      visible &= km[safe][:, None, :]
    if gate_row is None:
      probs, lse = numerics.masked_softmax(logits, visible, axes=(0, 2))
    else:
      probs, lse = numerics.masked_softmax(logits, visible, axes=(0, 2), weights=gate_row[:, None, None])
    out = jnp.einsum("cqk,ckh->qh", probs, vals.astype(jnp.float32))
    if ref_row is None:
      return out.astype(q.dtype), probs.sum((1, 2)), lse[0, :, 0]
    # Reference probabilities where a reference normaliser is given (finite), else the kept softmax's.
    finite = jnp.isfinite(ref_row)[None, :, None]
    ref_probs = jnp.where(visible & finite, jnp.exp(jnp.minimum(
        jnp.where(visible, logits, 0.0) - jnp.where(finite, ref_row[None, :, None], 0.0), 0.0)), 0.0)
    probs = jnp.where(jnp.isnan(ref_row)[None, :, None], probs, ref_probs)
    return out.astype(q.dtype), probs.sum((1, 2)), lse[0, :, 0]

  per_head = jax.vmap(one, in_axes=(1, 0, 0, 0, None, None, None, 2), out_axes=(1, 0, 0))  # G
  per_head = jax.vmap(per_head, in_axes=(1, 0, 0, 0, None, 2, 2, 2), out_axes=(1, 0, 0))  # K

  def block_fn(args):
    qb, ids, gate_b, ref_b, pos = args
    return per_head(qb, ids, gate_b, ref_b, pos, k_blocks, v_blocks, km_blocks)

  if q_chunk is None or q_chunk >= n_q:
    out, mass, lse = jax.vmap(block_fn)((q_blocks, idx, gt, ref, q_pos))
  else:
    out, mass, lse = lax.map(block_fn, (q_blocks, idx, gt, ref, q_pos), batch_size=q_chunk)
  # out [nQ, bq, K, G, Hv]; mass [nQ, K, G, C]; lse [nQ, K, G, bq]
  out = out.reshape(n_q * block_q, n, hv)[:t]
  mass = mass.reshape(n_q, n, -1).transpose(1, 0, 2)
  lse = lse.reshape(n_q, n, block_q).transpose(1, 0, 2).reshape(n, -1)[:, :t]
  return out, mass, lse


def block_coverage(lse_kept: jax.Array, lse_ref: jax.Array, block_q: int) -> jax.Array:
  """float32[..., N, nQ]: the share of each query block's reference attention that the kept keys hold.

  Per query the kept share is exp(lse_kept - lse_ref) (the kept softmax denominator over the reference
  one); a block's coverage is its mean over the block's valid queries. With dense attention as the
  reference this is DESIGN §10's coverage: 1.0 where nothing is pruned. Inputs [..., N, T].
  """
  block_q = checks.as_int("block_q", block_q, lo=1, what=" (queries per block)")
  if lse_kept.shape != lse_ref.shape:
    raise ValueError(f"lse_kept and lse_ref must have the same shape, got {lse_kept.shape} vs "
                     f"{lse_ref.shape}")
  if lse_kept.ndim < 1 or lse_kept.shape[-1] < 1:
    raise ValueError(f"lse_kept must have shape [..., N, T] with T >= 1, got {lse_kept.shape}")
  t = lse_kept.shape[-1]
  n_q = num_blocks(t, block_q)
  ok = jnp.isfinite(lse_ref) & (lse_kept > NEG_INF)
  share = jnp.where(ok, jnp.exp(jnp.minimum(jnp.where(ok, lse_kept - lse_ref, 0.0), 0.0)), 0.0)
  pad = [(0, 0)] * (share.ndim - 1) + [(0, n_q * block_q - t)]
  share = jnp.pad(share, pad).reshape(share.shape[:-1] + (n_q, block_q))
  rows = jnp.pad(jnp.isfinite(lse_ref), pad).reshape(share.shape)
  return share.sum(-1) / jnp.maximum(rows.sum(-1), 1)


def reference_attention(q: Float[Array, "*B T N H"], k: Float[Array, "*B S K H"],
                        v: Float[Array, "*B S K Hv"], *, scale: Optional[float] = None,
                        softcap: Optional[float] = None, window: Optional[int] = None,
                        token_mask: Optional[Bool[Array, "*B N T S"]] = None, return_probs: bool = False):
  """Dense reference of `sparse_attention` (same inputs; small T only): `stream_jax.dense.dense_attention`
  in float32 on its T x S path, with the queries the last T of the S positions.

  `token_mask` bool[..., N, T, S] further restricts the keys (e.g. `to_dense(mask)`), which makes this the
  dense reference of a given mask. Returns out [..., T, N, Hv] in q's dtype (and probs float32[..., N, T, S]).
  """
  t, s, n, _, h = checks.check_qkv(q, k, v)
  checks.check_positive("scale", scale)
  if n * t * s > 4 * DENSE_LIMIT:
    raise ValueError(f"reference_attention builds N x T x S = {n} x {t} x {s} logits, above the reference "
                     f"limit {4 * DENSE_LIMIT}; use sparse_attention for long inputs")
  batch = q.shape[:-3]
  b = batch[0] if batch else 1
  f32 = lambda x: x.astype(jnp.float32).reshape((b,) + x.shape[-3:])  # the reference computes in f32
  if token_mask is not None:
    token_mask = jnp.broadcast_to(jnp.asarray(token_mask, bool), (b, n, t, s))
  out, probs = dense.dense_attention(
      f32(q), f32(k), f32(v), q_pos=jnp.arange(t) + (s - t), k_pos=jnp.arange(s),
      scale=numerics.resolve_scale(scale, h), softcap=softcap, window=window, token_mask=token_mask,
      return_probs=True)
  out = out.astype(q.dtype).reshape(batch + out.shape[1:])
  probs = probs.reshape(batch + probs.shape[1:])
  return (out, probs) if return_probs else out


def dense_block_mass(q: Float[Array, "*B T N H"], k: Float[Array, "*B S K H"], *, block_q: int,
                     block_k: int, scale: Optional[float] = None, softcap: Optional[float] = None,
                     window: Optional[int] = None) -> Float[Array, "*B N nQ nK"]:
  """Exact dense attention mass per (query block, key block): float32[..., N, nQ, nK] (small inputs)."""
  t, s, _, _, _ = checks.check_qkv(q, k)
  v = jnp.zeros(k.shape[:-1] + (1,), k.dtype)
  _, probs = reference_attention(q, k, v, scale=scale, softcap=softcap, window=window, return_probs=True)
  n_q, n_k = num_blocks(t, block_q), num_blocks(s, block_k)
  pad = [(0, 0)] * (probs.ndim - 2) + [(0, n_q * block_q - t), (0, n_k * block_k - s)]
  probs = jnp.pad(probs, pad)
  probs = probs.reshape(probs.shape[:-2] + (n_q, block_q, n_k, block_k))
  return probs.sum((-3, -1))
