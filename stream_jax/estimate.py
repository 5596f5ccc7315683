"""Hierarchical top-k block-mask estimation (XLA reference and CPU path).

For each query head and query block the search range (key blocks strictly between the sink and the window)
is split into `branches` contiguous nodes; every round splits each kept node into halves and keeps the
top_k children by the score of a representative key block, until nodes are single blocks. That is
ceil(log2(nK / branches)) rounds of 2 x top_k block scores: O(T log T) time, O(nQ x top_k) state.

Scores are the model's own logits (scaled, soft-capped), maxed over the causally visible (query, key) pairs
of the (strided) query block and the representative block. Soft-capping is monotone, so it is applied to
the max, not to every logit.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from stream_jax import checks
from stream_jax.backend import resolve_backend
from stream_jax.config import StreamConfig
from stream_jax.mask import BlockMask, from_candidates, num_blocks, to_blocks

NEG_INF = float("-inf")
# Query blocks scored per step of the sequential map: bounds the per-round logits buffer
# (q_chunk x 2 top_k x block_q x block_k floats per head) whatever T is.
DEFAULT_Q_CHUNK = 64


def num_rounds(num_k_blocks: int, branches: int) -> int:
  """Refinement rounds until the widest first-level node is one block."""
  widest = -(-num_k_blocks // branches)
  return max(0, math.ceil(math.log2(widest))) if widest > 1 else 0


def estimate_mask(q: jax.Array, k: jax.Array, config: StreamConfig = StreamConfig(), *,
                  scale: Optional[float] = None, softcap: Optional[float] = None,
                  q_chunk: Optional[int] = DEFAULT_Q_CHUNK, backend: str = "xla") -> BlockMask:
  """Per-head top-k key-block mask by hierarchical refinement.

  Args:
    q: [T, N, H] or [B, T, N, H] queries (RoPE already applied), the last T of S positions.
    k: [S, K, H] or [B, S, K, H] keys; query head n reads kv head n // (N / K).
    config: StreamConfig.
    scale: logit scale (the model's; default H ** -0.5).
    softcap: optional logit soft-cap `c * tanh(x / c)`, as the model applies it.
    q_chunk: query blocks scored per sequential step (memory bound); None = all at once.
    backend: "xla" (this reference), "pallas" (GPU kernel, stream_jax.kernels) or "auto".

  Returns:
    BlockMask with indices int32[..., N, nQ, C] and counts int32[..., N, nQ], C = config.capacity.
  """
  if not isinstance(config, StreamConfig):
    raise TypeError(f"config must be a StreamConfig, got {type(config).__name__}")
  t, s, _, _, h = checks.check_qkv(q, k)
  checks.check_positive("scale", scale)
  checks.check_positive("softcap", softcap)
  checks.check_chunk(q_chunk)
  scale = h ** -0.5 if scale is None else float(scale)
  if resolve_backend(backend) == "pallas":
    from stream_jax.kernels import estimate as pallas_estimate  # pylint: disable=import-outside-toplevel
    return pallas_estimate.estimate_mask(q, k, config, scale=scale, softcap=softcap)
  fn = functools.partial(_estimate, config=config, scale=scale, softcap=softcap, q_chunk=q_chunk)
  if q.ndim == 4:
    candidates, valid = jax.vmap(fn)(q, k)
  else:
    candidates, valid = fn(q, k)
  return from_candidates(candidates, valid, block_q=config.block_q, block_k=config.block_k,
                         q_len=t, k_len=s, config=config)


def _estimate(q, k, *, config, scale, softcap, q_chunk):
  """q [T, N, H], k [S, K, H] -> candidate block ids and validity, each [N, nQ, C]."""
  t, n, h = q.shape
  s, kv, _ = k.shape
  g = n // kv
  bq, bk = config.block_q, config.block_k
  n_q = num_blocks(t, bq)
  q_blocks = to_blocks(q, bq).reshape(n_q, bq, kv, g, h)  # [nQ, bq, K, G, H]
  k_blocks = to_blocks(k, bk)  # [nK, bk, K, H]

  block_fn = functools.partial(_estimate_block, config=config, scale=scale, softcap=softcap,
                               q_len=t, k_len=s)
  # vmap over query heads of a group (sharing k), then over kv heads.
  per_head = jax.vmap(block_fn, in_axes=(None, 1, None), out_axes=0)  # G
  per_head = jax.vmap(per_head, in_axes=(None, 1, 2), out_axes=0)  # K

  def chunk_fn(args):
    j, qb = args  # j: [], qb: [bq, K, G, H]
    return per_head(j, qb, k_blocks)  # [K, G, C] x2

  js = jnp.arange(n_q, dtype=jnp.int32)
  if q_chunk is None or q_chunk >= n_q:
    cand, valid = jax.vmap(chunk_fn)((js, q_blocks))
  else:
    cand, valid = lax.map(chunk_fn, (js, q_blocks), batch_size=q_chunk)
  # [nQ, K, G, C] -> [N, nQ, C]
  cand = cand.reshape(n_q, n, -1).transpose(1, 0, 2)
  valid = valid.reshape(n_q, n, -1).transpose(1, 0, 2)
  return cand, valid


def _estimate_block(j, q_block, k_blocks, *, config: StreamConfig, scale, softcap, q_len, k_len):
  """One (head, query block): q_block [bq, H], k_blocks [nK, bk, H] -> candidates [C], valid [C]."""
  bq, bk, top_k = config.block_q, config.block_k, config.top_k
  n_k = k_blocks.shape[0]
  offset = k_len - q_len

  # The query rows that score: every stride-th row counted back from the last valid one, so that the
  # last query, which sees every key of the search range, always takes part.
  last_row = jnp.minimum((j + 1) * bq, q_len) - 1 - j * bq
  rows = last_row - jnp.arange(bq // config.query_stride, dtype=jnp.int32) * config.query_stride
  q_pos = jnp.where(rows >= 0, rows + j * bq + offset, -1)  # -1 sees nothing
  q_rows = q_block[jnp.maximum(rows, 0)]

  last_pos = j * bq + last_row + offset
  diag = last_pos // bk
  lo = config.sink_blocks
  hi = diag - config.window_blocks + 1  # exclusive end of the search range
  n = jnp.maximum(hi - lo, 0)

  def score(ids):
    """Max visible logit of the scoring queries against key blocks `ids` [m] -> [m]."""
    kb = k_blocks[jnp.clip(ids, 0, n_k - 1)]  # [m, bk, H]
    logits = jnp.einsum("rh,mkh->mrk", q_rows, kb, preferred_element_type=jnp.float32)
    k_pos = ids[:, None] * bk + jnp.arange(bk, dtype=jnp.int32)  # [m, bk]
    visible = k_pos[:, None, :] <= q_pos[None, :, None]
    best = jnp.where(visible, logits, NEG_INF).max((1, 2)) * scale  # scale > 0: max commutes
    if softcap is not None:
      best = softcap * jnp.tanh(best / softcap)
    return best

  if config.representative == "oracle":
    all_scores = score(jnp.arange(n_k, dtype=jnp.int32))  # [nK]: O(T) per query block, tests only

  def node_scores(start, size, parent=None):
    if config.representative == "oracle":
      ids = jnp.arange(n_k, dtype=jnp.int32)
      inside = (ids >= start[:, None]) & (ids < (start + size)[:, None])
      out = jnp.where(inside, all_scores, NEG_INF).max(-1)
    elif config.representative == "center":
      out = score(start + (size - 1) // 2)
    else:  # first: the left child starts where its parent does, so it inherits the parent's score
      if parent is None:
        out = score(start)
      else:
        right = score(start[1::2])
        out = jnp.stack([parent, right], -1).reshape(-1)
    return jnp.where(size > 0, out, NEG_INF)

  def keep_top(start, size, scores):
    _, sel = lax.top_k(scores, top_k)  # ties -> lower index = earlier position
    sel = jnp.sort(sel)  # keep nodes in position order
    return start[sel], size[sel], scores[sel]

  branches = config.branches
  b = jnp.arange(branches, dtype=jnp.int32)
  start = lo + (b * n) // branches
  size = lo + ((b + 1) * n) // branches - start
  if branches > top_k or config.representative == "first":
    scores = node_scores(start, size)
    if branches > top_k:
      start, size, scores = keep_top(start, size, scores)
  else:
    scores = jnp.zeros((top_k,), jnp.float32)

  def round_fn(_, state):
    start, size, scores = state
    left = (size + 1) // 2
    c_start = jnp.stack([start, start + left], -1).reshape(-1)
    c_size = jnp.stack([left, size // 2], -1).reshape(-1)
    c_scores = node_scores(c_start, c_size, parent=scores)
    return keep_top(c_start, c_size, c_scores)

  rounds = num_rounds(n_k, branches)
  start, size, _ = lax.fori_loop(0, rounds, round_fn, (start, size, scores))

  # Few candidates: keep the whole search range (early query blocks are dense).
  dense_ids = lo + jnp.arange(top_k, dtype=jnp.int32)
  searched = jnp.where(n > top_k, start, dense_ids)
  searched_ok = jnp.where(n > top_k, size > 0, dense_ids < hi)

  sink = jnp.arange(config.sink_blocks, dtype=jnp.int32)
  window = diag - jnp.arange(config.window_blocks, dtype=jnp.int32)
  cand = jnp.concatenate([sink, searched, window])
  valid = jnp.concatenate([sink <= diag, searched_ok, window >= 0])
  return cand, valid
