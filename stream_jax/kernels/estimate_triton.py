"""Pallas (Triton) kernel of hierarchical top-k mask estimation: a private peer of the XLA reference
behind `stream_jax.estimate_mask(..., backend="pallas")`, same contract, tested against it.

One program per (query head, query block), launched last query block first (the causal search is
longest there, so the long programs start early). A program loads its (strided) query block once and
runs every refinement round on chip: for each of the 2 x top_k children it loads the representative key
block straight from HBM by block id, does one [R, H] x [H, bk] dot, masks causally and keeps the max
(scaled, soft-capped). Top-k of the children needs no sort: a child's rank is the number of children
that beat it (higher score, or equal score and earlier position: `lax.top_k`'s tie rule), computed as a
2k x 2k comparison in registers; kept children are compacted in position order by prefix counts. Rounds
stop early once every node is a single block (further rounds provably keep the same nodes). The
program writes the sorted, de-duplicated union {sink} + {searched} + {window}, -1 padded, plus the count.

With score="mass" a block's score is its estimated share of the query block's attention (kernels/shares.py,
the reference's own arithmetic): the program first makes the rows' softmax denominators from the rule
blocks and one dot per first-level node (the node's representative stands for its size), keeps those
rows' log-sum-exps as the first level's scores, and adds up what every round drops; a coverage budget
then keeps the fewest searched blocks whose estimated share reaches the target (ranked, like top-k, by
an L x L comparison). The search's dots are the same; the exps make it ~1.7x the max-score kernel.

Output equals the reference bit for bit when both compute the same scores; on a GPU the dot's
accumulation order can differ from XLA's in the last bit, which can swap two blocks whose scores tie
to within rounding (the documented tie case).
"""

from __future__ import annotations

import functools
from typing import Optional, TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from stream_jax import numerics
from stream_jax.config import AUTO, StreamConfig
from stream_jax.kernels import common, shares
from stream_jax.kernels.common import SQ, count_true, gather, iota, take
from stream_jax.mask import BlockMask, num_blocks
from stream_jax.numerics import NEG_INF, num_rounds

if TYPE_CHECKING:
  from stream_jax.kernels.implementations import Call

# Best of {4, 8} warps on an H100 at T=32k, H=256, 64 x 64 blocks (benchmarks/kernels.py).
DEFAULT_NUM_WARPS = 4
DEFAULT_NUM_STAGES = 2
F32_NUM_STAGES = 1


def unsupported(call: Call) -> Optional[str]:
  """Why the kernel cannot run a call (kernels.implementations.Call), or None: Triton dots need
  block_k >= 16, and mass scores with the "oracle" representative (an exact sum over every block, for
  tests) run on the XLA path."""
  config = call.config
  if config.block_k < common.MIN_DOT:
    return f"the Pallas estimate kernel needs block_k >= {common.MIN_DOT}, got block_k={config.block_k}"
  if config.search_share not in (1, AUTO):  # AUTO resolves to 1 on this kernel (estimate.estimate_mask)
    return (f"the Pallas estimate kernel runs one search per query block; search_share="
            f"{config.search_share} (a search shared by neighbouring query blocks) runs on the XLA path")
  if config.score == "mass" and config.representative == "oracle":
    return ("the Pallas estimate kernel does not take score='mass' with representative='oracle' "
            "(an exact sum over every block)")
  return None


def estimate_mask(q: jax.Array, k: jax.Array, config: StreamConfig, *, scale: Optional[float] = None,
                  softcap: Optional[float] = None, interpret: Optional[bool] = None,
                  num_warps: Optional[int] = None, num_stages: Optional[int] = None) -> BlockMask:
  """Per-head top-k key-block mask by hierarchical refinement (Pallas kernel).

  A private peer of the XLA reference: `stream_jax.estimate_mask(..., backend="pallas")` validates the
  inputs (and `unsupported(config)`) and calls this. Call it directly only to set launch parameters
  (tests, benchmarks); it checks nothing.

  Args:
    q: [T, N, H] or [B, T, N, H] queries, the last T of S positions.
    k: [S, K, H] or [B, S, K, H] keys; query head n reads kv head n // (N / K).
    config: StreamConfig the kernel supports (see `unsupported`).
    scale: logit scale (default H ** -0.5); softcap: optional `c * tanh(x / c)`.
    interpret: run the kernel in Pallas interpret mode; None = interpret unless the default
      backend is a GPU (so the CPU tests and backend='pallas' off the GPU run it interpreted).
    num_warps, num_stages: Triton launch parameters (None: tuned defaults; float32 inputs get a single
      stage, since pipelined f32 key tiles do not fit shared memory).

  Returns:
    BlockMask with indices int32[..., N, nQ, C] (ascending, -1 padded) and counts int32[..., N, nQ].
  """
  t, s, h = q.shape[-3], k.shape[-3], q.shape[-1]
  config = config.for_length(s, shares=False)  # search_share="auto": one search per query block here
  num_warps = DEFAULT_NUM_WARPS if num_warps is None else num_warps
  if num_stages is None:
    num_stages = F32_NUM_STAGES if jnp.dtype(q.dtype).itemsize >= 4 else DEFAULT_NUM_STAGES
  indices, counts = _estimate(q, k, config=config, scale=numerics.resolve_scale(scale, h),
                              softcap=None if softcap is None else float(softcap),
                              interpret=common.resolve_interpret(interpret), num_warps=num_warps,
                              num_stages=num_stages)
  return BlockMask(indices, counts, config.block_q, config.block_k, t, s, config)


def query_rows(t: int, s: int, config: StreamConfig):
  """The scoring query rows of each query block, as the reference picks them.

  Returns (rows int32[nQ, RB] row ids into the padded query axis, pos int32[nQ, RB] absolute positions,
  -1 for rows that do not score), RB = max(block_q / query_stride, 16) (Triton's minimum dot size).
  """
  bq, stride = config.block_q, config.query_stride
  n_q = num_blocks(t, bq)
  r = bq // stride
  rb = max(r, common.MIN_DOT)
  j = jnp.arange(n_q, dtype=jnp.int32)[:, None]
  last_row = jnp.minimum((j + 1) * bq, t) - 1 - j * bq  # [nQ, 1]
  local = last_row - jnp.arange(rb, dtype=jnp.int32)[None, :] * stride  # [nQ, RB]
  ok = (local >= 0) & (jnp.arange(rb)[None, :] < r)
  rows = j * bq + jnp.maximum(local, 0)
  pos = jnp.where(ok, rows + (s - t), -1)
  return rows.astype(jnp.int32), pos.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "scale", "softcap", "interpret", "num_warps",
                                             "num_stages"))
def _estimate(q, k, *, config: StreamConfig, scale, softcap, interpret, num_warps, num_stages):
  (q, k), batched = common.as_batched(q, k)
  b, t, n, h = q.shape
  s, kv = k.shape[1], k.shape[2]
  g = n // kv
  bq, bk = config.block_q, config.block_k
  n_q, n_k = num_blocks(t, bq), num_blocks(s, bk)
  hp = max(common.next_pow2(h), common.MIN_DOT)

  q = common.pad_axis(common.pad_axis(q, 3, hp), 1, n_q * bq)
  k = common.pad_axis(common.pad_axis(k, 3, hp), 1, n_k * bk)
  rows, pos = query_rows(t, s, config)
  rb = rows.shape[1]
  if config.query_stride == 1 and rb == bq and config.score == "max":
    q_rows = q  # the rows are the block itself, in another order: a max does not care (a mean's rounding would)
    row_ids = jnp.arange(n_q * bq, dtype=jnp.int32).reshape(n_q, bq)
    pos = jnp.where(row_ids < t, row_ids + (s - t), -1).astype(jnp.int32)
  else:
    q_rows = jnp.take(q, rows.reshape(-1), axis=1)  # [B, nQ * RB, N, Hp]

  out_len = common.next_pow2(config.capacity + 1)
  kernel = functools.partial(
      _kernel, config=config, n_k=n_k, scale=scale, softcap=softcap, out_len=out_len,
      rounds=num_rounds(n_k, config.branches), precision=common.dot_precision(q.dtype))
  last = n_q - 1
  out = pl.pallas_call(
      kernel,
      grid=(n_q, n, b),
      in_specs=[
          pl.BlockSpec((SQ, rb, SQ, hp), lambda i, hq, bb: (bb, last - i, hq, 0)),
          pl.BlockSpec((SQ, rb), lambda i, hq, bb: (last - i, 0)),  # positions [nQ, RB]
          pl.BlockSpec((SQ, n_k * bk, SQ, hp), lambda i, hq, bb: (bb, 0, hq // g, 0)),
      ],
      out_specs=pl.BlockSpec((SQ, SQ, SQ, out_len), lambda i, hq, bb: (bb, hq, last - i, 0)),
      out_shape=jax.ShapeDtypeStruct((b, n, n_q, out_len), jnp.int32),
      compiler_params=common.triton_params(num_warps, num_stages),
      interpret=interpret,
      name="stream_estimate",
  )(q_rows, pos, k)
  indices = out[..., :config.capacity]
  counts = out[..., out_len - 1]
  if not batched:
    indices, counts = indices[0], counts[0]
  return indices, counts


def _kernel(q_ref, pos_ref, k_ref, o_ref, *, config: StreamConfig, n_k, scale, softcap, out_len,
            rounds, precision):
  bk, top_k, branches = config.block_k, config.top_k, config.branches
  kp = common.next_pow2(top_k)  # node slots (top_k real ones)
  rep = config.representative
  mass = config.score == "mass"

  q = q_ref[...]  # [RB, Hp]
  q_pos = pos_ref[...]  # [RB]
  last_pos = jnp.max(q_pos)  # the block's last valid query always scores
  diag = lax.div(last_pos, bk)
  lo = config.sink_blocks
  hi = diag - config.window_blocks + 1
  n = jnp.maximum(hi - lo, 0)

  def logits_of(blk):
    """Logits (unscaled) of the query rows against key block `blk` and which of them are visible."""
    blk = jnp.clip(blk, 0, n_k - 1)
    kb = k_ref[pl.ds(blk * bk, bk), :]  # [bk, Hp]
    logits = lax.dot_general(q, kb, (((1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)  # [RB, bk]
    k_pos = blk * bk + iota(bk)
    return logits, k_pos[None, :] <= q_pos[:, None]

  def block_lse(blk):
    """[RB] each query row's log-sum-exp over key block `blk`'s visible (soft-capped) logits."""
    logits, visible = logits_of(blk)
    return shares.row_lse(numerics.softcap(logits * scale, softcap), visible)

  if mass:
    row_ok = q_pos >= 0
    log_rows = jnp.log(jnp.maximum(count_true(row_ok, 0), 1).astype(jnp.float32))

  def score(blk):
    """The block's score: max visible scaled (soft-capped) logit, or its estimated log share (mass)."""
    if mass:
      return shares.log_share(block_lse(blk), z, row_ok, log_rows)
    logits, visible = logits_of(blk)
    # scale > 0 and the soft-cap is monotone: both commute with the max
    return numerics.softcap(jnp.max(jnp.where(visible, logits, NEG_INF)) * scale, softcap)

  if rep == "oracle":
    nkp = common.next_pow2(n_k)
    upto = jnp.minimum(diag + 1, n_k)  # later blocks are invisible: never inside a node
    all_scores = lax.fori_loop(
        0, upto, lambda b_, acc: jnp.where(iota(nkp) == b_, score(b_), acc),
        jnp.full((nkp,), NEG_INF, jnp.float32))

  def representative(start, size):
    """The key block that scores node(s) (start, size): its first, or its middle one ("center")."""
    return start if rep == "first" else start + lax.div(jnp.maximum(size - 1, 0), 2)

  def node_score(start, size):
    if rep == "oracle":
      ids = iota(all_scores.shape[0])
      inside = (ids >= start) & (ids < start + size)
      return jnp.max(jnp.where(inside, all_scores, NEG_INF))
    return score(representative(start, size))

  def node_scores(start, size, real, parent=None):
    """Scores of nodes (start, size) [L]; `real` leading slots are nodes, the rest padding."""
    length = start.shape[0]
    ids = iota(length)
    init = jnp.full((length,), NEG_INF, jnp.float32)

    def one(c, acc):
      sz = take(size, c)
      # Empty children skip their dot (both branches must yield traced values for Triton).
      val = lax.cond(sz > 0, lambda: node_score(take(start, c), sz),
                     lambda: sz.astype(jnp.float32) * 0.0 + NEG_INF)
      return jnp.where(ids == c, val, acc)

    if parent is None:
      return lax.fori_loop(0, real, one, init)
    # "first": a left child (even slot) starts where its parent does and inherits its score.
    inherited = gather(parent, lax.div(ids, 2))
    init = jnp.where((ids % 2 == 0) & (ids < real) & (size > 0), inherited, init)
    return lax.fori_loop(0, real // 2, lambda i, acc: one(2 * i + 1, acc), init)

  def keep_top(start, size, scores, dropped):
    """The top_k nodes by score (ties -> earlier slot), kept in slot order, as [kp] vectors; `dropped`
    adds the estimated share of the others (mass scores)."""
    length = scores.shape[0]
    me, other = iota(length)[:, None], iota(length)[None, :]
    keep = count_true(common.ranked_before(scores), 1) < top_k
    slot = count_true(keep[None, :] & (other < me), 1)  # position among the kept
    hit = keep[None, :] & (slot[None, :] == iota(kp)[:, None])  # [kp, L]

    def pick(x):
      return jnp.sum(jnp.where(hit, x[None, :], jnp.zeros_like(x)[None, :]), axis=1)

    if mass:
      dropped = dropped + shares.dropped_share(scores, size, keep)
    return pick(start), pick(size), pick(scores), dropped

  # First level: `branches` near-equal contiguous nodes over the search range.
  bp = common.next_pow2(branches)
  b_ids = iota(bp)
  start = lo + lax.div(b_ids * n, branches)
  size = jnp.where(b_ids < branches, lo + lax.div((b_ids + 1) * n, branches) - start, 0)
  dropped = jnp.float32(0.0)
  if mass:
    # Shares need the rows' softmax denominators z first: the rule blocks (sink, window) exactly, the search
    # range estimated by its first-level nodes (each node's representative x its size). One loop, one dot
    # site (each dot site is a separate unrolled copy for Triton: f32 ones compile slowly), gives the rule
    # blocks' and the representatives' row lse; the latter, once z is known, are the first level's scores.
    rule = config.sink_blocks + config.window_blocks
    r_ids = iota(common.next_pow2(rule))
    in_sink = r_ids < config.sink_blocks
    window = diag - (r_ids - config.sink_blocks)
    rule_blocks = jnp.where(in_sink, r_ids, window)
    rule_ok = (r_ids < rule) & jnp.where(in_sink, r_ids <= diag, window >= config.sink_blocks)
    rep0 = representative(start, size)
    no_row = jnp.full((q.shape[0],), NEG_INF, jnp.float32)

    def one_lse(e, acc):  # e < rule: rule block e; else first-level node e - rule
      rule_lse, rep_lse = acc
      is_rule = e < rule
      blk = jnp.where(is_rule, take(rule_blocks, e), take(rep0, e - rule))
      ok = jnp.where(is_rule, take(rule_ok.astype(jnp.int32), e), take(size, e - rule)) > 0
      row = lax.cond(ok, lambda: block_lse(blk), lambda: no_row)[None, :]
      return (jnp.where((r_ids == e)[:, None] & is_rule, row, rule_lse),
              jnp.where((b_ids == e - rule)[:, None], row, rep_lse))

    rule_lse, rep_lse = lax.fori_loop(
        0, rule + branches, one_lse,
        (jnp.full((r_ids.shape[0], q.shape[0]), NEG_INF, jnp.float32),
         jnp.full((bp, q.shape[0]), NEG_INF, jnp.float32)))  # [rp, RB], [bp, RB]
    rule_lse = shares.logsumexp(rule_lse, axis=0)  # [RB]
    log_size = jnp.log(jnp.maximum(size, 1).astype(jnp.float32))
    search_lse = shares.logsumexp(rep_lse + log_size[:, None], axis=0)
    z = shares.log_denominator(rule_lse, search_lse, row_ok)  # [RB]
    scores = jnp.where(size > 0, shares.log_share(rep_lse, z, row_ok, log_rows), NEG_INF)  # [bp]
    first_start, first_size, first_scores = start, size, scores
    if branches > top_k:
      start, size, scores, dropped = keep_top(start, size, scores, dropped)
  elif branches > top_k or rep == "first":
    scores = node_scores(start, size, branches)
    if branches > top_k:
      start, size, scores, dropped = keep_top(start, size, scores, dropped)
  else:
    scores = jnp.zeros((kp,), jnp.float32)

  c_ids = iota(2 * kp)
  parent_of = lax.div(c_ids, 2)
  is_right = c_ids % 2 == 1

  def round_cond(state):
    r, _, size, _, _ = state
    return (r < rounds) & (jnp.max(size) > 1)  # single-block nodes: later rounds change nothing

  def round_body(state):
    r, start, size, scores, dropped = state
    p_start, p_size = gather(start, parent_of), gather(size, parent_of)
    left = lax.div(p_size + 1, 2)
    c_start = jnp.where(is_right, p_start + left, p_start)
    c_size = jnp.where(is_right, lax.div(p_size, 2), left)
    c_scores = node_scores(c_start, c_size, 2 * top_k, scores if rep == "first" else None)
    start, size, scores, dropped = keep_top(c_start, c_size, c_scores, dropped)
    return r + 1, start, size, scores, dropped

  _, start, size, scores, dropped = lax.while_loop(
      round_cond, round_body, (jnp.int32(0), start, size, scores, dropped))

  # Few candidates: the whole search range (early query blocks are dense).
  slots = iota(kp)
  search = n > top_k
  searched = jnp.where(search, start, lo + slots)
  searched_ok = jnp.where(search, size > 0, lo + slots < hi) & (slots < top_k)
  if config.adaptive:  # the fewest candidates whose estimated share reaches the target
    # Early query blocks keep the whole search range (n <= top_k <= branches): each of its blocks is a
    # single-block first-level node, already scored.
    hit = (first_start[None, :] == (lo + slots)[:, None]) & (first_size == 1)[None, :] & (slots < n)[:, None]
    dense = jnp.where(slots < n, jnp.sum(jnp.where(hit, first_scores[None, :], 0.0), axis=1), NEG_INF)
    scores = jnp.where(search, scores, dense)
    rest = jnp.where(search, jnp.maximum(dropped, 0.0), 0.0)
    rule_share = jnp.exp(shares.log_share(rule_lse, z, row_ok, log_rows))  # sink + window, estimated
    searched_ok &= shares.coverage_keep(scores, searched_ok, rule_share, rest * config.dropped_scale,
                                        config.coverage)

  # Union {sink} + {searched} + {window}: three ascending disjoint runs (window blocks below
  # sink_blocks repeat a sink block and are dropped); compact the valid ones in order.
  sink, cap = config.sink_blocks, config.capacity
  e = iota(out_len)
  in_sink = e < sink
  in_search = (e >= sink) & (e < sink + top_k)
  in_window = (e >= sink + top_k) & (e < cap)
  s_val = gather(searched, e - sink, in_search)
  s_ok = gather(searched_ok.astype(jnp.int32), e - sink, in_search) > 0
  w_val = diag - config.window_blocks + 1 + (e - sink - top_k)
  val = jnp.where(in_sink, e, jnp.where(in_search, s_val, w_val))
  ok = ((in_sink & (e <= diag)) | (in_search & s_ok)
        | (in_window & (w_val >= 0) & (w_val >= sink)))
  dest = count_true(ok[None, :] & (e[None, :] < e[:, None]), 1)
  count = count_true(ok, 0)
  hit = ok[None, :] & (dest[None, :] == e[:, None])
  out = jnp.sum(jnp.where(hit, val[None, :], 0), axis=1)
  out = jnp.where(e < count, out, -1)
  o_ref[...] = jnp.where(e == out_len - 1, count, out).astype(jnp.int32)
