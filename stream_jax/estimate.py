"""Hierarchical top-k block-mask estimation: the op entry `estimate_mask` and its XLA reference (the CPU
path and the oracle of the Pallas kernel in stream_jax/kernels/estimate_triton.py).

For each query head and query block the search range (key blocks strictly between the sink and the window)
is split into `branches` contiguous nodes; every round splits each kept node into halves and keeps the
top_k children by the score of a representative key block, until nodes are single blocks. That is
ceil(log2(nK / branches)) rounds of 2 x top_k block scores: O(T log T) time, O(nQ x top_k) state.

Scores are the model's own logits (scaled, soft-capped), maxed over the causally visible (query, key) pairs
of the (strided) query block and the representative block. Soft-capping is monotone, so it is applied to
the max, not to every logit.

On short inputs the XLA path makes the same scores another way: while a query block's causal row of
blocks, (nK + 1) / 2 on average, is shorter than what the search scores (2 x top_k a round), it computes
every causal block's score once in large chunked products (`_block_max_table`; the [N, nQ, nK] table, never
T x S) and the search looks them up. Same scores, same masks; on 2 CPU cores the estimate is 2.7x faster at
4k and 1.7x at 8k. From 16k (default config) the search's O(T log T) scoring is the cheaper one.
"""

from __future__ import annotations

import functools
from typing import Optional, TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax

from stream_jax import checks, numerics, table
from stream_jax.config import StreamConfig
from stream_jax.kernels import common, estimate_mosaic, estimate_triton, implementations, shares
from stream_jax.mask import BlockMask, from_candidates, num_blocks, to_blocks
from stream_jax.numerics import DEFAULT_Q_CHUNK, NEG_INF, num_rounds

if TYPE_CHECKING:  # shapes for readers and type checkers (no runtime dependency); enforced by checks
  from jaxtyping import Array, Float

__all__ = ["estimate_mask", "num_rounds"]

# The block-score table (short inputs): query / key blocks per product, and its cost per causal block
# relative to the search's gathered scoring (chunk granularity computes some blocks past the diagonal).
TABLE_Q_BLOCKS = 8
TABLE_K_BLOCKS = 8
TABLE_COST = 1.0


def estimate_mask(q: Float[Array, "*B T N H"], k: Float[Array, "*B S K H"],
                  config: StreamConfig = StreamConfig(), *, scale: Optional[float] = None,
                  softcap: Optional[float] = None, q_chunk: Optional[int] = DEFAULT_Q_CHUNK,
                  backend: str = "xla") -> BlockMask:
  """Per-head top-k key-block mask by hierarchical refinement.

  The one entry of the op: validates once, then runs one implementation (kernels/implementations.py): the
  XLA reference below, the Triton kernel (kernels/estimate_triton.py) or the Mosaic GPU port
  (kernels/estimate_mosaic.py), which assume valid inputs. NaN/inf in q or k are refused (ValueError)
  when the arrays are concrete; under jit they cannot be checked and give a mask that looks normal but
  is arbitrary.

  Args:
    q: [T, N, H] or [B, T, N, H] queries (RoPE already applied), the last T of S positions.
    k: [S, K, H] or [B, S, K, H] keys; query head n reads kv head n // (N / K).
    config: StreamConfig.
    scale: logit scale (the model's; default H ** -0.5); positive and finite.
    softcap: optional logit soft-cap `c * tanh(x / c)`, as the model applies it.
    q_chunk: query blocks scored per sequential step (memory bound, XLA path); None = all at once.
    backend: an implementation, "xla" (the reference), "triton" (interpreted off the GPU) or "mosaic"
      (Hopper: 16-bit inputs, 16 x 16, 32 x 32 or 64 x 64 blocks; the search with max or mass scores,
      coverage budgets, top_k <= 128, center or first representatives, the table with query_stride >= 2),
      or a policy: "pallas" (the
      Mosaic port where it takes the call, else Triton) or "auto" (the same on a GPU for 16-bit inputs,
      the reference otherwise and for what no kernel takes). See `kernels.implementations.choose`.

  With config.select="table" no search runs: every causal block is scored once by the true mass a sample
  of the queries gives it (stream_jax/table.py); "mosaic" (Hopper, query_stride >= 2) or "xla" runs it.

  Returns:
    BlockMask with indices int32[..., N, nQ, C] and counts int32[..., N, nQ], C = config.capacity.
  """
  if not isinstance(config, StreamConfig):
    raise TypeError(f"config must be a StreamConfig, got {type(config).__name__}")
  if config.layer_scales:
    raise ValueError("StreamConfig.layer_scales holds per-layer scales, and estimate_mask sees one layer: pass "
                     "config.for_layer(layer) (the model's plans do this for every layer)")
  if config.select == "ideal":
    raise ValueError(f"StreamConfig.select={config.select!r} ranks blocks by their true mass, which needs the "
                     "dense pass's log-sum-exp: call stream_jax.ideal_mask(q, k, lse, config), or run the "
                     "model with this config (it computes the lse)")
  _, _, _, _, h = checks.check_qkv(q, k)
  checks.check_finite("q", q)  # concrete arrays only; under jit NaN/inf are not detected
  checks.check_finite("k", k)
  checks.check_positive("scale", scale)
  checks.check_positive("softcap", softcap)
  checks.check_chunk(q_chunk)
  scale = numerics.resolve_scale(scale, h)
  impl = implementations.choose("estimate_mask", backend, implementations.Call.estimate(q, config))
  if config.select == "table":
    return table.table_mask(q, k, config, scale=scale, softcap=softcap, impl=impl)[0]
  if impl == "mosaic":
    return estimate_mosaic.estimate_mask(q, k, config, scale=scale, softcap=softcap)
  if impl == "triton":
    return estimate_triton.estimate_mask(q, k, config, scale=scale, softcap=softcap)
  return _estimate_xla(q, k, config, scale=scale, softcap=softcap, q_chunk=q_chunk)


def _estimate_xla(q, k, config: StreamConfig, *, scale: float, softcap, q_chunk) -> BlockMask:
  """The XLA reference (and CPU path) on validated inputs."""
  fn = functools.partial(_estimate, config=config, scale=scale, softcap=softcap, q_chunk=q_chunk)
  if q.ndim == 4:
    candidates, valid = jax.vmap(fn)(q, k)
  else:
    candidates, valid = fn(q, k)
  return from_candidates(candidates, valid, block_q=config.block_q, block_k=config.block_k,
                         q_len=q.shape[-3], k_len=k.shape[-3], config=config)


def _estimate(q, k, *, config, scale, softcap, q_chunk):
  """q [T, N, H], k [S, K, H] -> candidate block ids and validity, each [N, nQ, C]."""
  t, n, h = q.shape
  s, kv, _ = k.shape
  g = n // kv
  bq, bk = config.block_q, config.block_k
  n_q = num_blocks(t, bq)
  q_blocks = to_blocks(q, bq).reshape(n_q, bq, kv, g, h)  # [nQ, bq, K, G, H]
  k_blocks = to_blocks(k, bk)  # [nK, bk, K, H]

  # Short inputs: every causal block scored once, which is fewer block products than the search's
  # rescoring of 2 x top_k children a round; the search then looks the scores up (the same scores).
  table = None
  if _table_is_cheaper(config, num_blocks(s, bk)):
    table = _block_max_table(q, k, config=config, scale=scale, softcap=softcap)  # [N, nQ, nK]
    table = table.reshape(kv, g, n_q, -1).transpose(2, 0, 1, 3)  # [nQ, K, G, nK]

  block_fn = functools.partial(_estimate_block, config=config, scale=scale, softcap=softcap,
                               q_len=t, k_len=s)
  # vmap over query heads of a group (sharing k), then over kv heads.
  per_head = jax.vmap(block_fn, in_axes=(None, 1, None, 0), out_axes=0)  # G
  per_head = jax.vmap(per_head, in_axes=(None, 1, 2, 0), out_axes=0)  # K

  def chunk_fn(args):
    j, qb, rows = args  # j: [], qb: [bq, K, G, H], rows: [K, G, nK] table rows or None
    return per_head(j, qb, k_blocks, rows)  # [K, G, C] x2

  js = jnp.arange(n_q, dtype=jnp.int32)
  if q_chunk is None or q_chunk >= n_q:
    cand, valid = jax.vmap(chunk_fn)((js, q_blocks, table))
  else:
    cand, valid = lax.map(chunk_fn, (js, q_blocks, table), batch_size=q_chunk)
  # [nQ, K, G, C] -> [N, nQ, C]
  cand = cand.reshape(n_q, n, -1).transpose(1, 0, 2)
  valid = valid.reshape(n_q, n, -1).transpose(1, 0, 2)
  return cand, valid


def _estimate_block(j, q_block, k_blocks, table_row, *, config: StreamConfig, scale, softcap, q_len, k_len):
  """One (head, query block): q_block [bq, H], k_blocks [nK, bk, H], table_row [nK] (every block's score,
  or None: scored on demand) -> candidates [C], valid [C]."""
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

  if config.score == "mass":
    return _select_by_mass(q_rows, q_pos, k_blocks, diag=diag, lo=lo, hi=hi, n=n, config=config,
                           scale=scale, softcap=softcap)

  def score(ids):
    """Max visible logit of the scoring queries against key blocks `ids` [m] -> [m]."""
    if table_row is not None:
      return table_row[jnp.clip(ids, 0, n_k - 1)]
    kb = k_blocks[jnp.clip(ids, 0, n_k - 1)]  # [m, bk, H]
    logits = jnp.einsum("rh,mkh->mrk", q_rows, kb, preferred_element_type=jnp.float32)
    k_pos = ids[:, None] * bk + jnp.arange(bk, dtype=jnp.int32)  # [m, bk]
    visible = k_pos[:, None, :] <= q_pos[None, :, None]
    best = jnp.where(visible, logits, NEG_INF).max((1, 2)) * scale  # scale > 0: max commutes
    return numerics.softcap(best, softcap)

  if config.representative == "oracle":
    all_scores = score(jnp.arange(n_k, dtype=jnp.int32))  # [nK]: O(T) per query block, tests only

  def node_scores(start, size, parent=None):
    if config.representative == "oracle":
      out = _node_max(all_scores, start, size)
    elif config.representative == "center":
      out = score(start + (size - 1) // 2)
    else:  # first: the left child starts where its parent does, so it inherits the parent's score
      out = score(start) if parent is None else _inherit_left(parent, score(start[1::2]))
    return jnp.where(size > 0, out, NEG_INF)

  start, size, _ = _search(node_scores, lo=lo, n=n, config=config, n_k=n_k, score_first_level=(
      config.branches > top_k or config.representative == "first"))

  # Few candidates: keep the whole search range (early query blocks are dense).
  dense_ids = lo + jnp.arange(top_k, dtype=jnp.int32)
  searched = jnp.where(n > top_k, start, dense_ids)
  searched_ok = jnp.where(n > top_k, size > 0, dense_ids < hi)
  return _union(searched, searched_ok, diag, config)


def _table_is_cheaper(config: StreamConfig, n_k: int) -> bool:
  """Whether scoring every causal key block once (a query block's row: (nK + 1) / 2 blocks on average,
  TABLE_COST x that for the table's chunk granularity) takes fewer block products than the search's
  scores (2 x top_k children a round with center representatives, top_k with "first", plus a scored first
  level). Max-logit scores of every query row only; the oracle representative scores every block anyway."""
  if config.score != "max" or config.query_stride != 1:
    return False
  if config.representative == "oracle":
    return True
  rounds = num_rounds(n_k, config.branches)
  if config.representative == "first":
    searched = config.branches + rounds * config.top_k
  else:
    searched = rounds * 2 * config.top_k + (config.branches if config.branches > config.top_k else 0)
  return TABLE_COST * (n_k + 1) / 2 < searched


def _block_max_table(q, k, *, config: StreamConfig, scale, softcap):
  """q [T, N, H], k [S, K, H] -> float32 [N, nQ, nK]: every (query block, key block) pair's score, the max
  visible scaled (soft-capped) logit (-inf, soft-capped, where none is visible), as `score` defines it.

  Causal: a chunk of TABLE_Q_BLOCKS query blocks loops over chunks of TABLE_K_BLOCKS key blocks up to its
  diagonal, one [rows, H] x [H, keys] product each, so memory is the [N, nQ, nK] table plus one chunk's
  logits, never T x S."""
  t, n, h = q.shape
  s, kv, _ = k.shape
  g = n // kv
  bq, bk = config.block_q, config.block_k
  qc, kc = TABLE_Q_BLOCKS, TABLE_K_BLOCKS
  n_q, n_k = num_blocks(t, bq), num_blocks(s, bk)
  n_qc, n_kc = -(-n_q // qc), -(-n_k // kc)
  q_chunks = common.pad_axis(q, 0, n_qc * qc * bq).reshape(n_qc, qc * bq, kv, g, h)
  k_pad = common.pad_axis(k, 0, n_kc * kc * bk)
  offset = s - t

  def q_chunk_fn(args):
    i, rows = args  # rows [qc * bq, K, G, H]
    r = i * qc * bq + jnp.arange(qc * bq, dtype=jnp.int32)
    q_pos = jnp.where(r < t, r + offset, -1)  # -1 (padding) sees nothing
    last_pos = jnp.minimum((i + 1) * qc * bq, t) - 1 + offset

    def k_chunk_fn(c, table):
      keys = lax.dynamic_slice_in_dim(k_pad, c * kc * bk, kc * bk, 0)  # [kc * bk, K, H]
      logits = jnp.einsum("rkgh,skh->kgrs", rows, keys, preferred_element_type=jnp.float32)
      k_pos = c * kc * bk + jnp.arange(kc * bk, dtype=jnp.int32)
      visible = k_pos[None, :] <= q_pos[:, None]
      best = jnp.where(visible, logits, NEG_INF).reshape(kv, g, qc, bq, kc, bk).max((3, 5))
      return lax.dynamic_update_slice_in_dim(table, best, c * kc, axis=3)

    empty = jnp.full((kv, g, qc, n_kc * kc), NEG_INF, jnp.float32)
    return lax.fori_loop(0, last_pos // (kc * bk) + 1, k_chunk_fn, empty)

  table = lax.map(q_chunk_fn, (jnp.arange(n_qc, dtype=jnp.int32), q_chunks))  # [nQc, K, G, qc, nKc kc]
  table = table.transpose(1, 2, 0, 3, 4).reshape(n, n_qc * qc, n_kc * kc)[:, :n_q, :n_k]
  return numerics.softcap(table * scale, softcap)  # scale > 0: the max commutes with it


def _node_max(block_scores, start, size):
  """Max of per-block scores [nK] over each node [start, start + size) -> [m]."""
  ids = jnp.arange(block_scores.shape[0], dtype=jnp.int32)
  inside = (ids >= start[:, None]) & (ids < (start + size)[:, None])
  return jnp.where(inside, block_scores, NEG_INF).max(-1)


def _inherit_left(parent, right):
  """Children scores in position order when each left child reuses its parent's score."""
  return jnp.stack([parent, right], -1).reshape(-1)


def _search(node_scores, *, lo, n, config: StreamConfig, n_k: int, score_first_level: bool,
            track_dropped: bool = False):
  """The hierarchical refinement: first-level nodes, then halve and keep the top_k children per round.

  Returns the kept nodes (start, size, score), each [top_k], in position order, and, with track_dropped
  (scores are log shares), the summed estimated share of every node dropped on the way (score x size):
  dropped nodes and kept leaves partition the search range, so the two add up to the range's estimate.
  """
  top_k, branches = config.top_k, config.branches

  def keep_top(start, size, scores, dropped):
    _, sel = lax.top_k(scores, top_k)  # ties -> lower index = earlier position
    sel = jnp.sort(sel)  # keep nodes in position order
    if track_dropped:
      keep = jnp.zeros(scores.shape, bool).at[sel].set(True)
      dropped = dropped + shares.dropped_share(scores, size, keep)
    return start[sel], size[sel], scores[sel], dropped

  b = jnp.arange(branches, dtype=jnp.int32)
  start = lo + (b * n) // branches
  size = lo + ((b + 1) * n) // branches - start
  dropped = jnp.float32(0.0)
  if score_first_level:
    scores = node_scores(start, size)
    if branches > top_k:
      start, size, scores, dropped = keep_top(start, size, scores, dropped)
  else:
    scores = jnp.zeros((top_k,), jnp.float32)

  def round_fn(_, state):
    start, size, scores, dropped = state
    left = (size + 1) // 2
    c_start = jnp.stack([start, start + left], -1).reshape(-1)
    c_size = jnp.stack([left, size // 2], -1).reshape(-1)
    c_scores = node_scores(c_start, c_size, parent=scores)
    return keep_top(c_start, c_size, c_scores, dropped)

  start, size, scores, dropped = lax.fori_loop(0, num_rounds(n_k, branches), round_fn,
                                               (start, size, scores, dropped))
  return (start, size, scores, dropped) if track_dropped else (start, size, scores)


def _union(searched, searched_ok, diag, config: StreamConfig):
  """Candidates {sink} + {searched} + {window} and their validity, each [sink + top_k + window]."""
  sink = jnp.arange(config.sink_blocks, dtype=jnp.int32)
  window = diag - jnp.arange(config.window_blocks, dtype=jnp.int32)
  cand = jnp.concatenate([sink, searched, window])
  valid = jnp.concatenate([sink <= diag, searched_ok, window >= 0])
  return cand, valid


def _select_by_mass(q_rows, q_pos, k_blocks, *, diag, lo, hi, n, config: StreamConfig, scale, softcap):
  """Search by estimated attention mass, optionally keeping the fewest blocks that reach a coverage target.

  Per scoring query r and block b, l[b, r] = log-sum-exp of r's visible (scaled, soft-capped) logits over
  the block's keys: exp(l) is the block's unnormalised attention. The softmax denominator Z_r is
  estimated from the blocks kept by rule (sink, window: exact) plus the search range, which the
  "oracle" representative sums exactly and the others estimate from the first-level nodes (each node's
  representative block times the node's size). A block's score is log mean_r exp(l[b, r] - Z_r): its
  estimated share of the query block's attention. The arithmetic is kernels/shares.py, which the Pallas
  kernel runs too.
  """
  bk, top_k = config.block_k, config.top_k
  n_k = k_blocks.shape[0]
  row_ok = q_pos >= 0  # [R]
  log_rows = jnp.log(jnp.maximum(row_ok.sum(), 1).astype(jnp.float32))

  def row_lse(ids):
    """[m] block ids -> [m, R] per-row log-sum-exp over the block's visible keys (-inf if none)."""
    kb = k_blocks[jnp.clip(ids, 0, n_k - 1)]  # [m, bk, H]
    logits = jnp.einsum("rh,mkh->mrk", q_rows, kb, preferred_element_type=jnp.float32)
    logits = numerics.softcap(logits * scale, softcap)
    k_pos = ids[:, None] * bk + jnp.arange(bk, dtype=jnp.int32)  # [m, bk]
    visible = (k_pos[:, None, :] <= q_pos[None, :, None]) & (ids >= 0)[:, None, None]
    return shares.row_lse(logits, visible)

  # Blocks kept by rule (a window block that is also a sink counts once).
  sink = jnp.arange(config.sink_blocks, dtype=jnp.int32)
  window = diag - jnp.arange(config.window_blocks, dtype=jnp.int32)
  rule_ids = jnp.concatenate([jnp.where(sink <= diag, sink, -1),
                              jnp.where(window >= config.sink_blocks, window, -1)])
  rule_lse = shares.logsumexp(row_lse(rule_ids), axis=0)  # [R]

  if config.representative == "oracle":
    all_ids = jnp.arange(n_k, dtype=jnp.int32)
    in_range = (all_ids >= lo) & (all_ids < hi)
    all_lse = jnp.where(in_range[:, None], row_lse(all_ids), NEG_INF)  # [nK, R]
    search_lse = shares.logsumexp(all_lse, axis=0)
  else:
    branches = config.branches
    b = jnp.arange(branches, dtype=jnp.int32)
    start0 = lo + (b * n) // branches
    size0 = lo + ((b + 1) * n) // branches - start0
    rep0 = start0 if config.representative == "first" else start0 + (size0 - 1) // 2
    rep_lse = row_lse(jnp.where(size0 > 0, rep0, -1))  # [branches, R], -inf rows for empty nodes
    log_size = jnp.log(jnp.maximum(size0, 1).astype(jnp.float32))
    search_lse = shares.logsumexp(rep_lse + log_size[:, None], axis=0)
  z = shares.log_denominator(rule_lse, search_lse, row_ok)  # [R]

  def share(lse_rows):
    """[m, R] -> [m] log of the mean over scoring rows of exp(lse - Z): a block's estimated share."""
    return shares.log_share(lse_rows, z, row_ok, log_rows)

  if config.representative == "oracle":
    all_share = share(all_lse)

  def node_scores(start, size, parent=None):
    if config.representative == "oracle":
      out = _node_max(all_share, start, size)
    elif config.representative == "center":
      out = share(row_lse(start + (size - 1) // 2))
    else:
      out = share(row_lse(start)) if parent is None else _inherit_left(parent, share(row_lse(start[1::2])))
    return jnp.where(size > 0, out, NEG_INF)

  start, size, scores, dropped = _search(node_scores, lo=lo, n=n, config=config, n_k=n_k,
                                         score_first_level=True, track_dropped=True)
  dense_ids = lo + jnp.arange(top_k, dtype=jnp.int32)
  is_dense = n <= top_k
  searched = jnp.where(is_dense, dense_ids, start)
  searched_ok = jnp.where(is_dense, dense_ids < hi, size > 0)
  if config.adaptive:
    if config.representative == "oracle":
      scores = jnp.where(is_dense, all_share[jnp.clip(dense_ids, 0, n_k - 1)], scores)
    else:
      scores = jnp.where(is_dense, share(row_lse(jnp.where(dense_ids < hi, dense_ids, -1))), scores)
    if config.representative == "oracle":
      rest = jnp.exp(share(search_lse[None])[0]) - jnp.where(searched_ok, jnp.exp(scores), 0.0).sum()
    else:  # the search's partition: what it dropped, each node estimated by its representative x size
      rest = jnp.where(is_dense, 0.0, dropped)
    searched_ok &= shares.coverage_keep(scores, searched_ok, jnp.exp(share(rule_lse[None])[0]),
                                        jnp.maximum(rest, 0.0) * config.dropped_scale, config.coverage)
  return _union(searched, searched_ok, diag, config)
