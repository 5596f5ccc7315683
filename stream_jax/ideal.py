"""The ideal kept set: key blocks ranked by their *true* attention mass, from the dense pass's log-sum-exp.

An estimator guesses which blocks matter; in exact mode the dense pass already fixes every probability, so
the trace need not guess (DESIGN §11). Given the per-query log-sum-exp `lse` of the dense softmax, the true
mass of key block c for query block j is

    M[j, c] = sum_{i in j} sum_{s in c, s visible to i} exp(logit[i, s] - lse[i]),

and the ideal kept set of (head, query block j) is, like the estimator's, the blocks kept by rule (the
`sink_blocks` first and the `window_blocks` ending at the diagonal) plus, from the search range between
them, either the `top_k` heaviest blocks (coverage None) or the fewest heaviest blocks whose mass, with the
rule blocks', reaches `coverage` x the row's total (at most top_k). Ties go to the lower block id. The kept
set is then the best any selector of the same budget can do, and the mass and coverage it reports are the
dense softmax's, not estimates.

Cost: one more Q K^T over the causal blocks (no V, no output) per pruned layer. Memory: query blocks are
processed in chunks; a chunk holds its rows of M ([N, chunk, nK] floats) and keeps only (ids, mass):
O(T) per chunk, nothing T x S. `ideal_mask` is the one entry; the XLA implementation is below it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax

from stream_jax import checks, numerics
from stream_jax.config import StreamConfig
from stream_jax.kernels import common, ideal_mosaic, ideal_triton, implementations
from stream_jax.mask import BlockMask, diagonal_blocks, num_blocks
from stream_jax.numerics import NEG_INF

if TYPE_CHECKING:  # shapes for readers and type checkers (no runtime dependency); enforced by checks
  from jaxtyping import Array, Float

__all__ = ["ideal_mask", "IdealTrace"]

# Query blocks per chunk (the chunk's rows of M are [N, chunk, nK]): the XLA path's and the kernel's (a
# launch of chunk x N programs fills a GPU), and key blocks per product of the XLA path.
QUERY_BLOCKS = 8
KERNEL_QUERY_BLOCKS = 64
KEY_BLOCKS = 8


class IdealTrace(NamedTuple):
  """The ideal kept set of one layer: mask [..., N, nQ, C], the true mass float32[..., N, nQ, C] of each
  kept block (0 in empty slots) and coverage float32[..., N, nQ] (kept mass over the query block's valid
  queries: exact, not estimated). A NamedTuple, so a pytree."""

  mask: BlockMask
  mass: jax.Array
  coverage: jax.Array


def ideal_mask(q: Float[Array, "*B T N H"], k: Float[Array, "*B S K H"], lse: Float[Array, "*B N T"],
               config: StreamConfig = StreamConfig(), *, scale: Optional[float] = None,
               softcap: Optional[float] = None, window: Optional[int] = None,
               key_mask: Optional[jax.Array] = None, query_blocks: Optional[int] = None,
               backend: str = "xla") -> IdealTrace:
  """Per (head, query block) the ideal kept set by true attention mass, with that mass and the coverage.

  Args:
    q: [T, N, H] or [B, T, N, H] queries (RoPE applied), the last T of S positions.
    k: [S, K, H] or [B, S, K, H] keys (query head n reads kv head n // (N / K)).
    lse: float32 [N, T] or [B, N, T]: each query's natural-log softmax denominator over its causally
      visible keys, from the dense pass (flash attention and cuDNN return it; `dense.dense_attention(...,
      return_lse=True)`). Masses are exp(logit - lse), so a wrong lse gives wrong masses.
    config: block sizes, sink / window rule blocks, top_k (the cap) and coverage (None: top_k by mass).
      The search fields (representative, score, init_branches, query_stride) play no part.
    scale, softcap: the model's logit scale (default H ** -0.5) and optional soft-cap.
    window: a sliding window of W keys (including the query), as the layer applies it; None: causal.
    key_mask: optional bool [N, S] or [B, N, S]: keys a head may see at all (an intervention's
      suppression; `lse` must be the pass's with the same keys hidden).
    query_blocks: query blocks per chunk (memory: N x query_blocks x nK floats per chunk); None: 8 on the
      XLA path, 64 in the kernel.
    backend: an implementation, "xla" (the reference), "triton" (the block-mass kernel,
      kernels/ideal_triton.py; interpreted off the GPU; no key_mask) or "mosaic" (its Hopper port,
      kernels/ideal_mosaic.py: 16-bit, square blocks of 16, 32 or 64 tokens), or a policy, "pallas" or "auto" (a kernel on a GPU
      for 16-bit inputs without a key_mask, the Mosaic port first). See `kernels.implementations.choose`.

  Returns:
    IdealTrace(mask, mass, coverage); mask.config is `config`.
  """
  if not isinstance(config, StreamConfig):
    raise TypeError(f"config must be a StreamConfig, got {type(config).__name__}")
  t, s, n, _, h = checks.check_qkv(q, k)
  batch = q.shape[:-3]
  if tuple(lse.shape) != batch + (n, t):
    raise ValueError(f"lse must have shape {batch + (n, t)} (batch, query heads, query length) to match q "
                     f"{tuple(q.shape)}, got {tuple(lse.shape)}")
  checks.check_finite("q", q)
  checks.check_finite("k", k)
  checks.check_positive("scale", scale)
  checks.check_positive("softcap", softcap)
  checks.check_window(window)
  has_key_mask = key_mask is not None
  if key_mask is None:
    key_mask = jnp.ones((1, s), bool)
  elif tuple(key_mask.shape) not in (batch + (n, s), (n, s)):
    raise ValueError(f"key_mask must have shape {batch + (n, s)} (or {(n, s)}), got {tuple(key_mask.shape)}")
  if batch and key_mask.ndim == 2:
    key_mask = jnp.broadcast_to(key_mask, batch + key_mask.shape)
  if query_blocks is not None and (isinstance(query_blocks, bool) or not isinstance(query_blocks, int)
                                   or query_blocks < 1):
    raise ValueError(f"query_blocks must be None or an integer >= 1, got {query_blocks!r}")
  scale = numerics.resolve_scale(scale, h)
  call = implementations.Call.ideal(q, config, key_mask=has_key_mask)
  impl = implementations.choose("ideal_mask", backend, call)
  if impl != "xla":
    idx, mass, cov = _ideal_kernel(q if batch else q[None], k if batch else k[None],
                                   (lse if batch else lse[None]).astype(jnp.float32), config=config,
                                   scale=scale, softcap=softcap, window=window,
                                   query_blocks=query_blocks or KERNEL_QUERY_BLOCKS, impl=impl)
    if not batch:
      idx, mass, cov = idx[0], mass[0], cov[0]
    counts = (idx >= 0).sum(-1).astype(jnp.int32)
    return IdealTrace(BlockMask(idx, counts, config.block_q, config.block_k, t, s, config), mass, cov)
  query_blocks = query_blocks or QUERY_BLOCKS
  fn = functools.partial(_ideal_xla, config=config, scale=scale, softcap=softcap, window=window,
                         query_blocks=query_blocks)
  args = (q, k, lse.astype(jnp.float32), jnp.asarray(key_mask, bool))
  idx, mass, cov = jax.vmap(fn)(*args) if batch else fn(*args)
  counts = (idx >= 0).sum(-1).astype(jnp.int32)
  mask = BlockMask(idx, counts, config.block_q, config.block_k, t, s, config)
  return IdealTrace(mask, mass, cov)


@functools.partial(jax.jit, static_argnames=("config", "scale", "softcap", "window", "query_blocks"))
def _ideal_xla(q, k, lse, key_mask, *, config: StreamConfig, scale, softcap, window, query_blocks):
  """q [T, N, H], k [S, K, H], lse [N, T], key_mask [N | 1, S] -> indices int32 [N, nQ, C], mass,
  coverage."""
  t, n, h = q.shape
  s, kv, _ = k.shape
  g = n // kv
  bq, bk = config.block_q, config.block_k
  qc, kc = query_blocks, KEY_BLOCKS
  n_q, n_k = num_blocks(t, bq), num_blocks(s, bk)
  n_qc, n_kc = -(-n_q // qc), -(-n_k // kc)
  offset = s - t
  q_chunks = common.pad_axis(q, 0, n_qc * qc * bq).reshape(n_qc, qc * bq, kv, g, h)
  lse_chunks = common.pad_axis(lse, 1, n_qc * qc * bq).reshape(kv, g, n_qc, qc * bq).transpose(2, 0, 1, 3)
  k_pad = common.pad_axis(k, 0, n_kc * kc * bk)
  km_pad = common.pad_axis(jnp.broadcast_to(key_mask, (n, s)), 1, n_kc * kc * bk).reshape(kv, g, -1)
  diag, rows_valid = _chunk_rows(t, s, bq, bk, qc, n_qc)

  def chunk_fn(args):
    i, rows, row_lse, diag_c, valid_c = args  # rows [qc bq, K, G, H], row_lse [K, G, qc bq]
    r = i * qc * bq + jnp.arange(qc * bq, dtype=jnp.int32)
    q_pos = jnp.where(r < t, r + offset, -1)  # -1 (padding) sees nothing
    last_pos = jnp.minimum((i + 1) * qc * bq, t) - 1 + offset
    ok_lse = jnp.where(jnp.isfinite(row_lse), row_lse, jnp.inf)  # a row that sees nothing adds nothing

    def k_chunk_fn(c, table):
      keys = lax.dynamic_slice_in_dim(k_pad, c * kc * bk, kc * bk, 0)  # [kc bk, K, H]
      km = lax.dynamic_slice_in_dim(km_pad, c * kc * bk, kc * bk, 2)  # [K, G, kc bk]
      logits = jnp.einsum("rkgh,skh->kgrs", rows, keys, preferred_element_type=jnp.float32)
      logits = numerics.softcap(logits * scale, softcap)
      k_pos = c * kc * bk + jnp.arange(kc * bk, dtype=jnp.int32)
      visible = k_pos[None, :] <= q_pos[:, None]
      if window is not None:
        visible &= q_pos[:, None] - k_pos[None, :] < window
      visible = visible & km[:, :, None, :]  # [K, G, rows, keys]
      p = jnp.where(visible, jnp.exp(jnp.minimum(logits - ok_lse[..., None], 0.0)), 0.0)  # p <= 1
      mass = p.reshape(kv, g, qc, bq, kc, bk).sum((3, 5))  # [K, G, qc, kc]
      return lax.dynamic_update_slice_in_dim(table, mass, c * kc, axis=3)

    table = jnp.zeros((kv, g, qc, n_kc * kc), jnp.float32)
    table = lax.fori_loop(0, last_pos // (kc * bk) + 1, k_chunk_fn, table)[..., :n_k]
    return _select_chunk(table, diag_c, valid_c, config=config)  # [K, G, qc, C] x2, [K, G, qc]

  out = lax.map(chunk_fn, (jnp.arange(n_qc, dtype=jnp.int32), q_chunks, lse_chunks, diag, rows_valid))
  return tuple(_from_chunks(x, (n,), n_q) for x in out)  # [nQc, K, G, qc, ...] -> [N, nQ, ...]


def _ideal_kernel(q, k, lse, *, config: StreamConfig, scale, softcap, window, query_blocks, interpret=None,
                  impl: str = "triton"):
  """Batched q [B, T, N, H], k [B, S, K, H], lse [B, N, T] through a block-mass kernel (`impl`: "triton"
  or "mosaic"), a chunk of query blocks at a time -> indices [B, N, nQ, C], mass, coverage [B, N, nQ]."""
  t, s = q.shape[1], k.shape[1]
  bq, bk = config.block_q, config.block_k
  n_q, n_k = num_blocks(t, bq), num_blocks(s, bk)
  # whole programs per chunk: the Triton kernel's query blocks, the Mosaic one's pair of 64-row tiles
  per = (ideal_triton.DEFAULT_BLOCKS_PER_PROGRAM if impl == "triton"
         else ideal_mosaic.PAIR * (ideal_mosaic.BLOCK // bq))
  qc = -(-min(query_blocks, n_q) // per) * per  # whole programs per chunk
  n_qc = -(-n_q // qc)
  diag, rows_valid = _chunk_rows(t, s, bq, bk, qc, n_qc)

  def mass_rows(first):  # [B, N, qc, nK]
    if impl == "mosaic":
      return ideal_mosaic.mass_rows(q, k, lse, first, n_rows=qc, q_len=t, k_len=s, scale=scale,
                                    softcap=softcap, window=window, block=bq)
    return ideal_triton.mass_rows(q, k, lse, first, n_rows=qc, block_q=bq, block_k=bk, q_len=t, k_len=s,
                                  scale=scale, softcap=softcap, window=window, interpret=interpret,
                                  blocks_per_program=per)

  def chunk_fn(args):
    i, diag_c, valid_c = args
    table = mass_rows(i * qc)
    return jax.vmap(functools.partial(_select_chunk, config=config), in_axes=(0, None, None))(
        table, diag_c, valid_c)

  out = lax.map(chunk_fn, (jnp.arange(n_qc, dtype=jnp.int32), diag, rows_valid))
  return tuple(_from_chunks(x, (q.shape[0], q.shape[2]), n_q) for x in out)  # [nQc, B, N, qc, ...]


def _from_chunks(x, lead: tuple[int, ...], n_q: int):
  """A chunked output [nQc, a, b, qc, ...] (a, b: kv heads and group, or batch and heads) -> [*lead, nQ,
  ...], the two middle axes reshaped to `lead` and the last chunk's padding blocks dropped."""
  x = jnp.moveaxis(x, 0, 2)
  x = x.reshape(lead + (x.shape[2] * x.shape[3],) + x.shape[4:])
  return lax.slice_in_dim(x, 0, n_q, axis=len(lead))


def _chunk_rows(t: int, s: int, bq: int, bk: int, qc: int, n_qc: int):
  """Per chunk of qc query blocks: each block's diagonal key block and its valid query rows (0 for the
  padding blocks of the last chunk), both [n_qc, qc]."""
  diag = common.pad_axis(diagonal_blocks(t, s, bq, bk), 0, n_qc * qc).reshape(n_qc, qc)
  rows_valid = jnp.clip(t - jnp.arange(n_qc * qc) * bq, 0, bq).astype(jnp.float32).reshape(n_qc, qc)
  return diag, rows_valid


def _select_chunk(table, diag_c, valid_c, *, config: StreamConfig):
  """Rows [..., qc, nK] of one chunk (diag_c, valid_c [qc]) -> ids, mass [..., qc, C], coverage [..., qc]."""
  select = jax.vmap(functools.partial(_select_row, config=config, n_k=table.shape[-1]), in_axes=(0, 0, 0))
  for _ in range(table.ndim - 2):
    select = jax.vmap(select, in_axes=(0, None, None))
  return select(table, diag_c, valid_c)


def _select_row(row, diag, valid_rows, *, config: StreamConfig, n_k: int):
  """One (head, query block): row float32[nK] of true masses -> (ids [C] ascending, -1 padded; their mass;
  coverage). Padding query blocks (valid_rows 0) keep nothing."""
  ids = jnp.arange(n_k, dtype=jnp.int32)
  lo, hi = config.sink_blocks, diag - config.window_blocks + 1  # the search range [lo, hi)
  causal = (ids <= diag) & (valid_rows > 0)
  rule = causal & ((ids < lo) | (ids >= hi))
  searchable = causal & ~rule
  top_k = min(config.top_k, n_k)
  vals, sel = lax.top_k(jnp.where(searchable, row, NEG_INF), top_k)  # descending, ties -> lower id
  take = vals > NEG_INF
  if config.adaptive:
    before = jnp.where(rule, row, 0.0).sum() + jnp.cumsum(jnp.where(take, vals, 0.0)) - jnp.where(take, vals, 0.0)
    take &= before < config.coverage * jnp.where(causal, row, 0.0).sum()
  keep = rule | jnp.zeros(n_k, bool).at[sel].max(take)
  cap = config.capacity
  kept = jnp.nonzero(keep, size=cap, fill_value=-1)[0].astype(jnp.int32)
  mass = jnp.where(kept >= 0, row[jnp.maximum(kept, 0)], 0.0)
  coverage = mass.sum() / jnp.maximum(valid_rows, 1.0)
  return kept, mass, coverage
