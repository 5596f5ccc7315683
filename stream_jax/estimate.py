"""Hierarchical top-k block-mask estimation: the op entry `estimate_mask` and its XLA reference (the CPU
path and the oracle of the Pallas kernel in stream_jax/kernels/estimate_triton.py).

For each query head and query block the search range (key blocks strictly between the sink and the window)
is split into `branches` contiguous nodes; every round splits each kept node into halves and keeps the
top_k children by the score of a representative key block, until nodes are single blocks. That is
ceil(log2(nK / branches)) rounds of 2 x top_k block scores: O(T log T) time, O(nQ x top_k) state.

With StreamConfig.search_share = P, P neighbouring query blocks run the first level and all rounds but the
last together (scored by every P-th of their queries, over the first one's range) and each scores the last
round's children, single blocks, with its own queries: the rounds' cost is shared P ways (`_estimate_group`).

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

  With config.search_share = P > 1, P neighbouring query blocks run the search's upper rounds together
  and each scores the last round with its own queries ("mosaic" or "xla"; the Triton kernel runs one search
  per query block). "auto" (`StreamConfig.faithful()`) picks P from the length (`StreamConfig.for_length`)
  after the implementation is chosen; the mask's config records the number that ran. With
  config.select="table" no search runs: every causal block is scored once by the true mass a sample of the
  queries gives it (stream_jax/table.py); "mosaic" (Hopper, query_stride >= 2) or "xla" runs it.

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
  config = config.for_length(k.shape[-3], shares=impl != "triton")  # search_share="auto" -> a number
  if config.select == "table":
    return table.table_mask(q, k, config, scale=scale, softcap=softcap, impl=impl)[0]
  if impl == "mosaic":
    return estimate_mosaic.estimate_mask(q, k, config, scale=scale, softcap=softcap)
  if impl == "triton":
    return estimate_triton.estimate_mask(q, k, config, scale=scale, softcap=softcap)
  return _estimate_xla(q, k, config, scale=scale, softcap=softcap, q_chunk=q_chunk)


@functools.partial(jax.jit, static_argnames=("config", "scale", "softcap", "q_chunk"))
def _estimate_xla(q, k, config: StreamConfig, *, scale: float, softcap, q_chunk) -> BlockMask:
  """The XLA reference (and CPU path) on validated inputs; compiled as one program (called eagerly, its
  loops and vmaps would dispatch op by op: 7x slower at 300 tokens on CPU)."""
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

  rounds = num_rounds(num_blocks(s, bk), config.branches)
  if config.search_share > 1 and rounds >= 1:
    return _estimate_shared(q, k, config=config, scale=scale, softcap=softcap, q_chunk=q_chunk,
                            rounds=rounds)

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


def _estimate_shared(q, k, *, config: StreamConfig, scale, softcap, q_chunk, rounds: int):
  """`_estimate` with config.search_share = P > 1: groups of P query blocks share the upper rounds."""
  t, n, h = q.shape
  s, kv, _ = k.shape
  g = n // kv
  share_n, bq = config.search_share, config.block_q
  n_q = num_blocks(t, bq)
  n_g = -(-n_q // share_n)
  q_groups = common.pad_axis(q, 0, n_g * share_n * bq).reshape(n_g, share_n, bq, kv, g, h)
  k_blocks = to_blocks(k, config.block_k)  # [nK, bk, K, H]

  group_fn = functools.partial(_estimate_group, config=config, scale=scale, softcap=softcap, q_len=t,
                               k_len=s, rounds=rounds)
  per_head = jax.vmap(group_fn, in_axes=(None, 2, None), out_axes=0)  # G: qg [P, bq, G, H]
  per_head = jax.vmap(per_head, in_axes=(None, 2, 2), out_axes=0)  # K: qg [P, bq, K, G, H]

  def chunk_fn(args):
    p, qg = args
    return per_head(p, qg, k_blocks)  # [K, G, P, C] x2

  ps = jnp.arange(n_g, dtype=jnp.int32)
  if q_chunk is None or q_chunk >= n_q:
    cand, valid = jax.vmap(chunk_fn)((ps, q_groups))
  else:
    cand, valid = lax.map(chunk_fn, (ps, q_groups), batch_size=max(q_chunk // share_n, 1))

  def blocks_first(x):  # [nG, K, G, P, C] -> [N, nQ, C]
    x = x.transpose(0, 3, 1, 2, 4).reshape(n_g * share_n, n, -1)[:n_q]
    return x.transpose(1, 0, 2)

  return blocks_first(cand), blocks_first(valid)


def _estimate_group(p, q_group, k_blocks, *, config: StreamConfig, scale, softcap, q_len, k_len, rounds: int):
  """One (head, group p of P = search_share query blocks): q_group [P, bq, H] -> candidates [P, C], valid
  [P, C].

  The group's rows (every P-th of each member's scoring rows: a tile as large as one member's) run the
  first level and all rounds but the last over the first member's search range, which every member's
  range holds; the blocks after it up to the last member's diagonal count exactly in their denominators.
  Each member then scores, with its own rows and exactly, the kept nodes' children (single blocks: the
  last round) and the few blocks between the shared range and its own window, and keeps its top_k (or its
  coverage budget) of those.
  """
  share_n, bq, bk, stride = config.search_share, config.block_q, config.block_k, config.query_stride
  js = p * share_n + jnp.arange(share_n, dtype=jnp.int32)
  rows_fn = functools.partial(_scoring_rows, block_q=bq, q_len=q_len, k_len=k_len)
  own_rows, own_pos, last_pos = jax.vmap(functools.partial(rows_fn, stride=stride, count=bq // stride))(
      js, q_group)  # [P, R, H], [P, R], [P]
  g_rows, g_pos, _ = jax.vmap(functools.partial(rows_fn, stride=stride * share_n,
                                                count=bq // (stride * share_n)))(js, q_group)
  diag = last_pos // bk  # [P]
  shared_hi = diag[0] - config.window_blocks + 1  # end of the first member's range
  after = shared_hi + jnp.arange(shares.gap_blocks(config) + config.window_blocks, dtype=jnp.int32)
  rule_ids = jnp.concatenate([jnp.arange(config.sink_blocks, dtype=jnp.int32),
                              jnp.where((after >= config.sink_blocks) & (after <= diag[-1]), after, -1)])
  nodes = _search_block(g_rows.reshape(-1, g_rows.shape[-1]), g_pos.reshape(-1), diag[0], k_blocks, None,
                        config=config, scale=scale, softcap=softcap, rounds=rounds - 1, nodes_only=True,
                        rule_ids=rule_ids)
  own = functools.partial(_own_round, nodes=nodes, shared_hi=shared_hi, k_blocks=k_blocks, config=config,
                          scale=scale, softcap=softcap)
  return jax.vmap(own)(own_rows, own_pos, diag)


def _own_round(q_rows, q_pos, diag, *, nodes, shared_hi, k_blocks, config: StreamConfig, scale, softcap):
  """A member's last round: the shared nodes' children and the blocks from shared_hi to its own window,
  scored by its own rows q_rows [R, H] at q_pos [R] -> candidates [C], valid [C].

  With mass scores each row's softmax denominator is its rule blocks (exact) plus its search range, which
  the candidates cover exactly except for what the shared rounds dropped: that part is taken to be the
  same fraction of the shared range as the shared rounds estimated for the group (dropped / (dropped +
  kept nodes))."""
  start, size, node_scores, dropped = nodes
  top_k, bk = config.top_k, config.block_k
  lo = config.sink_blocks
  hi = diag - config.window_blocks + 1
  n = jnp.maximum(hi - lo, 0)
  c_start, c_size = _halves(start, size)  # [2 top_k] single blocks before shared_hi
  gap = shared_hi + jnp.arange(shares.gap_blocks(config), dtype=jnp.int32)
  cand = jnp.concatenate([c_start, gap])
  in_pool = jnp.concatenate([c_size > 0, jnp.zeros(gap.shape, bool)])
  ok = jnp.concatenate([c_size > 0, (gap >= lo) & (gap < hi)])
  ids = jnp.where(ok, cand, -1)
  dense_ids = lo + jnp.arange(top_k, dtype=jnp.int32)
  is_dense = n <= top_k  # few candidates: keep the whole range (early query blocks are dense)
  dense_ok = dense_ids < hi

  if config.score == "max":
    scores = jnp.where(ok, _block_max(q_rows, q_pos, k_blocks, ids, block_k=bk, scale=scale,
                                      softcap=softcap), NEG_INF)
    _, sel = lax.top_k(scores, top_k)  # ties -> lower index = earlier position
    sel = jnp.sort(sel)
    return _union(jnp.where(is_dense, dense_ids, cand[sel]), jnp.where(is_dense, dense_ok, ok[sel]),
                  diag, config)

  row_lse = functools.partial(_block_row_lse, q_rows, q_pos, k_blocks, block_k=bk, scale=scale,
                              softcap=softcap)
  row_ok = q_pos >= 0
  log_rows = jnp.log(jnp.maximum(row_ok.sum(), 1).astype(jnp.float32))
  cand_lse = row_lse(ids)  # [2 top_k + gap, R]
  rule_lse = shares.logsumexp(row_lse(_rule_ids(diag, config)), axis=0)  # [R]
  kept_est = jnp.sum(jnp.where(size > 0, jnp.exp(node_scores) * size.astype(jnp.float32), 0.0))
  missed = shares.missed_share(dropped, kept_est)
  pool_lse = shares.logsumexp(jnp.where(in_pool[:, None], cand_lse, NEG_INF), axis=0)
  gap_lse = shares.logsumexp(jnp.where(in_pool[:, None], NEG_INF, cand_lse), axis=0)
  search_lse = shares.logaddexp(pool_lse - jnp.log1p(-missed), gap_lse)
  if config.adaptive:
    dense_lse = row_lse(jnp.where(dense_ok, dense_ids, -1))  # [top_k, R]
    search_lse = jnp.where(is_dense, shares.logsumexp(dense_lse, axis=0), search_lse)
  z = shares.log_denominator(rule_lse, search_lse, row_ok)
  cand_share = jnp.where(ok, shares.log_share(cand_lse, z, row_ok, log_rows), NEG_INF)
  _, sel = lax.top_k(cand_share, top_k)
  sel = jnp.sort(sel)
  searched = jnp.where(is_dense, dense_ids, cand[sel])
  searched_ok = jnp.where(is_dense, dense_ok, ok[sel])
  if config.adaptive:
    scores = jnp.where(is_dense, shares.log_share(dense_lse, z, row_ok, log_rows), cand_share[sel])
    keep = jnp.zeros(cand_share.shape, bool).at[sel].set(True)
    pool = jnp.sum(jnp.where(in_pool, jnp.exp(cand_share), 0.0))
    rest = shares.dropped_share(cand_share, ok.astype(jnp.int32), keep) + pool * (missed / (1.0 - missed))
    rest = jnp.where(is_dense, 0.0, rest)
    rule_share = jnp.exp(shares.log_share(rule_lse[None], z, row_ok, log_rows)[0])
    searched_ok &= shares.coverage_keep(scores, searched_ok, rule_share, rest * config.dropped_scale,
                                        config.coverage)
  return _union(searched, searched_ok, diag, config)


def _rule_ids(diag, config: StreamConfig):
  """The blocks kept by rule, sink then window, -1 where absent (a window block that is a sink counts
  once)."""
  sink = jnp.arange(config.sink_blocks, dtype=jnp.int32)
  window = diag - jnp.arange(config.window_blocks, dtype=jnp.int32)
  return jnp.concatenate([jnp.where(sink <= diag, sink, -1),
                          jnp.where(window >= config.sink_blocks, window, -1)])


def _estimate_block(j, q_block, k_blocks, table_row, *, config: StreamConfig, scale, softcap, q_len, k_len):
  """One (head, query block): q_block [bq, H], k_blocks [nK, bk, H], table_row [nK] (every block's score,
  or None: scored on demand) -> candidates [C], valid [C]."""
  stride = config.query_stride
  q_rows, q_pos, last_pos = _scoring_rows(j, q_block, stride=stride, count=config.block_q // stride,
                                          block_q=config.block_q, q_len=q_len, k_len=k_len)
  return _search_block(q_rows, q_pos, last_pos // config.block_k, k_blocks, table_row, config=config,
                       scale=scale, softcap=softcap)


def _scoring_rows(j, q_block, *, stride: int, count: int, block_q: int, q_len: int, k_len: int):
  """The query rows of block j that score: every stride-th row counted back from its last valid one, so
  that the last query, which sees every key of the search range, always takes part.

  Returns the rows [count, H], their key positions [count] (-1: a padding row, which sees nothing) and the
  block's last position."""
  last_row = jnp.minimum((j + 1) * block_q, q_len) - 1 - j * block_q
  rows = last_row - jnp.arange(count, dtype=jnp.int32) * stride
  offset = k_len - q_len
  q_pos = jnp.where(rows >= 0, rows + j * block_q + offset, -1)
  return q_block[jnp.maximum(rows, 0)], q_pos, j * block_q + last_row + offset


def _block_logits(q_rows, q_pos, k_blocks, ids, *, block_k: int):
  """Raw logits float32 [m, R, bk] of rows q_rows [R, H] (at q_pos [R]) against key blocks `ids` [m], and
  which (row, key) pairs are causally visible."""
  kb = k_blocks[jnp.clip(ids, 0, k_blocks.shape[0] - 1)]  # [m, bk, H]
  logits = jnp.einsum("rh,mkh->mrk", q_rows, kb, preferred_element_type=jnp.float32)
  k_pos = ids[:, None] * block_k + jnp.arange(block_k, dtype=jnp.int32)  # [m, bk]
  return logits, k_pos[:, None, :] <= q_pos[None, :, None]


def _block_max(q_rows, q_pos, k_blocks, ids, *, block_k: int, scale, softcap):
  """Max visible logit of rows q_rows [R, H] (at q_pos [R]) against key blocks `ids` [m] -> [m]."""
  logits, visible = _block_logits(q_rows, q_pos, k_blocks, ids, block_k=block_k)
  best = jnp.where(visible, logits, NEG_INF).max((1, 2)) * scale  # scale > 0: max commutes
  return numerics.softcap(best, softcap)


def _block_row_lse(q_rows, q_pos, k_blocks, ids, *, block_k: int, scale, softcap):
  """[m] block ids -> [m, R] each row's log-sum-exp over the block's visible keys (-inf if none or id <
  0)."""
  logits, visible = _block_logits(q_rows, q_pos, k_blocks, ids, block_k=block_k)
  return shares.row_lse(numerics.softcap(logits * scale, softcap), visible & (ids >= 0)[:, None, None])


def _search_block(q_rows, q_pos, diag, k_blocks, table_row, *, config: StreamConfig, scale, softcap,
                  rounds: Optional[int] = None, nodes_only: bool = False, rule_ids=None):
  """The search for one (head, query block, or group of them) scored by q_rows [R, H] at q_pos [R] over
  the range before `diag`'s window -> candidates [C], valid [C]; with nodes_only, the kept nodes after
  `rounds` rounds (start, size, score, estimated dropped share) instead. rule_ids: the blocks outside the
  range that mass scores count exactly in each row's denominator (default: sink and `diag`'s window)."""
  top_k = config.top_k
  n_k = k_blocks.shape[0]
  lo = config.sink_blocks
  hi = diag - config.window_blocks + 1  # exclusive end of the search range
  n = jnp.maximum(hi - lo, 0)

  if config.score == "mass":
    return _select_by_mass(q_rows, q_pos, k_blocks, diag=diag, lo=lo, hi=hi, n=n, config=config,
                           scale=scale, softcap=softcap, rounds=rounds, nodes_only=nodes_only,
                           rule_ids=rule_ids)

  def score(ids):
    """Max visible logit of the scoring queries against key blocks `ids` [m] -> [m]."""
    if table_row is not None:
      return table_row[jnp.clip(ids, 0, n_k - 1)]
    return _block_max(q_rows, q_pos, k_blocks, ids, block_k=config.block_k, scale=scale, softcap=softcap)

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

  start, size, scores = _search(node_scores, lo=lo, n=n, config=config, n_k=n_k, score_first_level=(
      config.branches > top_k or config.representative == "first"), rounds=rounds)
  if nodes_only:
    return start, size, scores, jnp.float32(0.0)

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
            track_dropped: bool = False, rounds: Optional[int] = None):
  """The hierarchical refinement: first-level nodes, then halve and keep the top_k children per round.

  Runs `rounds` rounds (None: until nodes are single blocks, num_rounds(n_k, branches)).
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
    c_start, c_size = _halves(start, size)
    c_scores = node_scores(c_start, c_size, parent=scores)
    return keep_top(c_start, c_size, c_scores, dropped)

  rounds = num_rounds(n_k, branches) if rounds is None else rounds
  start, size, scores, dropped = lax.fori_loop(0, rounds, round_fn,
                                               (start, size, scores, dropped))
  return (start, size, scores, dropped) if track_dropped else (start, size, scores)


def _halves(start, size):
  """Each node's two children in position order (start and size, each [2 m]); the left takes the odd
  block."""
  left = (size + 1) // 2
  return (jnp.stack([start, start + left], -1).reshape(-1),
          jnp.stack([left, size // 2], -1).reshape(-1))


def _union(searched, searched_ok, diag, config: StreamConfig):
  """Candidates {sink} + {searched} + {window} and their validity, each [sink + top_k + window]."""
  sink = jnp.arange(config.sink_blocks, dtype=jnp.int32)
  window = diag - jnp.arange(config.window_blocks, dtype=jnp.int32)
  cand = jnp.concatenate([sink, searched, window])
  valid = jnp.concatenate([sink <= diag, searched_ok, window >= 0])
  return cand, valid


def _select_by_mass(q_rows, q_pos, k_blocks, *, diag, lo, hi, n, config: StreamConfig, scale, softcap,
                    rounds: Optional[int] = None, nodes_only: bool = False, rule_ids=None):
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

  row_lse = functools.partial(_block_row_lse, q_rows, q_pos, k_blocks, block_k=bk, scale=scale,
                              softcap=softcap)

  rule_ids = _rule_ids(diag, config) if rule_ids is None else rule_ids
  rule_lse = shares.logsumexp(row_lse(rule_ids), axis=0)  # [R] blocks kept by rule

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
                                         score_first_level=True, track_dropped=True, rounds=rounds)
  if nodes_only:
    return start, size, scores, dropped
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
