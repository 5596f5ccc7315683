"""Pallas Mosaic GPU (Hopper: TMA + wgmma) kernel of hierarchical top-k mask estimation: the port of the
Triton kernel in estimate.py (same contract, the same masks row for row), which `backend="pallas"` runs on
Hopper GPUs: 1.28-1.41x the Triton kernel's speed (H100, head dims 128 and 256, 8k-128k tokens;
benchmarks/RESULTS.md, "Pallas backends").

One CTA (one warpgroup) per (batch, query block, head), query blocks of a head side by side (they read the
same kv head's blocks, which then stay in L2). The node lists of the search live in shared memory (start,
size, score: 64 slots). A round splits each kept node into its two halves, then scores the 2 x top_k
children: each child's representative key block comes in by TMA through a 2-deep ring, one [64, H] x
[H, 64] wgmma gives its logits, and the row maxima of the visible ones go into column c of a [64 rows,
64 children] array, so one column reduction scores every child of the round. Top-k needs no sort: a
child's rank is the number of children that beat it (higher score, or equal and earlier: `lax.top_k`'s
tie rule), a [64, 64] comparison; the kept ones are compacted in position order by prefix counts, as in
the Triton kernel. Node lists move between threads only through shared memory, each read separated from
the next write by a warpgroup barrier (`commit_smem`).

Past 64 node slots (top_k > 32 or branches > 64) and with score="mass" (coverage budgets too, so
`StreamConfig.faithful()`) a second kernel runs, `_estimate_wide`: the node lists are tiles of 64 slots (up to
4: 2 x 128 children), a round's children are scored 64 at a time into the [64 rows, 64 children] array, and
top-k, compaction and the coverage budget's ranking are L x L comparisons in 64 x 64 tiles. Mass scores follow
the Triton kernel and the XLA reference (kernels/shares.py, the same formulas in the same order): a walk over
the rule blocks and the first-level representatives gives each row's softmax denominator z, then a block's
score is log mean_r exp(lse_r - z_r) from its row log-sum-exps, one column reduction per 64 children; each
round adds the estimated share of the nodes it drops, and the budget keeps the fewest kept nodes whose
estimated share reaches the target. The first level is scored again once z is known: its dots are redone
rather than its row log-sum-exps kept (16 KiB of shared memory per 64 nodes, which at head dim 256 would
leave room for one CTA per SM instead of two; not measured). The max-score kernel with at most 64 slots
stays the first kernel, unchanged.

The wide kernel lowers with Lane semantics: jax 0.11's default (Warpgroup) searches the whole kernel for a
layout assignment, which on the H200 ran 2 minutes and found none; its layouts are all set by hand anyway. On an
H200 it equals the Triton kernel and the XLA reference in every row of `gpu_checks.py mgpu_estimate_wide` (8
configs) and runs `StreamConfig.faithful()` 1.8x faster than the Triton kernel: 12.2 against 21.6 ms at 32k,
100 against 181 ms at 128k (8 query / 4 kv heads, head dim 256; benchmarks/results/wide_estimate_h200/).

Below 64-token blocks, with query_stride > 1 or "first" representatives, the wide kernel runs (max scores
too): a block's 64-row query tile and each representative's 64-key tile start at the block's first token,
and the rows and keys past the block (the next blocks'), and the rows between the stride's, are masked. A
scored node costs one key-tile load and one 64-row product whatever the rows that score, so the time follows
the node count: on an H200 at 128k `faithful()` takes 101 ms per layer at every query and 99 ms at every 4th;
at 32 / 16-token blocks 236 / 528 ms against Triton's 359 / 711 (benchmarks/results/small_block_estimate_h200/).

With `search_share = P` (`_estimate_shared`, the XLA path's `estimate._estimate_shared` step for step) the wide
kernel runs twice. The group pass: one CTA per (head, group of P query blocks) searches with the group's
rows, every P-th of each block's scoring rows gathered into one 64-row tile beforehand (their positions and
the group's diagonal blocks come in beside them), over the first block's range, with the blocks after it up
to the last block's diagonal as rule blocks; it runs the first level and all rounds but the last and writes
the kept nodes and the share of the range its rounds dropped. The member pass: one CTA per query block
loads its group's nodes, splits them (the children are single blocks), appends the blocks between the
shared range and its own window, makes its denominators from those candidates exactly (the pool's divided
by 1 - the missed share), scores them with its own tile and keeps its top_k or coverage budget.

Limits (`unsupported`): float16 / bfloat16, 16 x 16, 32 x 32 or 64 x 64 blocks, representative "center" or
"first", top_k <= 128, branches <= 256, head dim a multiple of 64 up to 256.
"""

from __future__ import annotations

import functools
from typing import Optional, TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from stream_jax import numerics
from stream_jax.config import StreamConfig
from stream_jax.kernels import common, mosaic_common, shares
from stream_jax.mask import BlockMask, num_blocks
from stream_jax.numerics import num_rounds

if TYPE_CHECKING:
  from stream_jax.kernels.implementations import Call

BLOCK = 64
SLOTS = 64  # node slots in shared memory: 2 x top_k children, or the first level's branches
TILE = 64  # nodes per tile of the wide kernel's node lists (one column reduction, one 64 x 64 comparison)
MAX_TOP_K = 128  # the wide kernel's limits: 2 x top_k children in up to 4 tiles
MAX_BRANCHES = 256
# search_share's member pass with mass scores: keep each candidate's per-row log-sum-exps in shared memory
# between the denominators' walk and the scoring (True: 16 KiB per 64 candidates, one CTA per SM at head dim
# 256), or walk the candidates twice (False: two CTAs per SM, twice the products). Kept: faithful()'s estimate
# at 1M on an H100, 839 against 906 ms at search_share 4, 630 against 688 ms at 8 (benchmarks/RESULTS.md).
KEEP_LSE = True
DEFAULT_STAGES = 2  # key-block ring depth: 3 was within 2% at head dim 128, 4 slower; both 1.2-1.4x slower
# at 256 (one CTA per SM instead of two)


def unsupported(call: Call) -> Optional[str]:
  """Why this kernel cannot take a call (kernels.implementations.Call), or None. Where it can, "pallas" and
  "auto" prefer it to Triton on Hopper."""
  config = call.config
  reason = mosaic_common.limits(call, "estimate")
  if reason:
    return reason
  if config.representative not in ("center", "first"):
    return (f"the Mosaic GPU estimate kernel scores nodes by center or first representatives, got "
            f"{config.representative!r} (the oracle scores every block: the XLA path)")
  if config.top_k > MAX_TOP_K or config.branches > MAX_BRANCHES:
    return f"the Mosaic GPU estimate kernel needs top_k <= {MAX_TOP_K} and branches <= {MAX_BRANCHES}"
  return None


def _write_union(searched, out_s, dst, *, config: StreamConfig, diag, out_len: int):
  """Both kernels' output row: the sorted union {sink} + {searched} + {window} (three ascending disjoint runs;
  window blocks below sink_blocks repeat a sink block and are dropped), -1 padded, the count last, copied to
  `dst` by TMA. `searched(j)` -> (block id, kept?) of search slot j."""
  import jax.experimental.pallas as pl  # noqa: PLC0415  (GPU-only modules)
  import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415
  sink, top_k, wb = config.sink_blocks, config.top_k, config.window_blocks

  def emit(e, count):
    in_sink = e < sink
    in_search = (e >= sink) & (e < sink + top_k)
    s_val, s_ok = searched(jnp.clip(e - sink, 0, top_k - 1))
    w_val = diag - wb + 1 + (e - sink - top_k)
    val = jnp.where(in_sink, e, jnp.where(in_search, s_val, w_val))
    ok = jnp.where(in_sink, e <= diag, jnp.where(in_search, s_ok, (w_val >= 0) & (w_val >= sink)))

    @pl.when(ok)
    def _():
      out_s[count] = val

    return count + jnp.where(ok, 1, 0)

  count = lax.fori_loop(0, config.capacity, emit, jnp.int32(0))

  def pad(e, _):
    out_s[e] = jnp.int32(-1)

  lax.fori_loop(count, out_len - 1, pad, None)
  out_s[out_len - 1] = count
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(out_s, dst)
  plgpu.wait_smem_to_gmem(0)


def _narrow(config: StreamConfig) -> bool:
  """Whether the first kernel (max scores, <= 64 node slots, 64 x 64 blocks, every query row, center
  representatives) takes `config`; else the wide one."""
  return (config.score == "max" and 2 * config.top_k <= SLOTS and config.branches <= SLOTS
          and config.block_q == BLOCK and config.query_stride == 1 and config.representative == "center"
          and config.search_share == 1)


def estimate_mask(q: jax.Array, k: jax.Array, config: StreamConfig, *, scale: Optional[float] = None,
                  softcap: Optional[float] = None, stages: Optional[int] = None,
                  keep_lse: Optional[bool] = None) -> BlockMask:
  """The Mosaic GPU peer of `kernels.estimate_triton.estimate_mask` (same arguments and outputs; GPU only, no
  interpret mode: its tests lower it for CUDA on the CPU and run it on the device, gpu_checks.py). Checks
  nothing beyond `unsupported`, which the caller asks first. `stages` (the key ring's depth) and `keep_lse`
  (search_share's member pass: see KEEP_LSE; None = KEEP_LSE) are launch settings: same masks."""
  t, s, h = q.shape[-3], k.shape[-3], q.shape[-1]
  config = config.for_length(s)  # search_share="auto" -> a number (the op entry has done it already)
  if config.search_share > 1 and num_rounds(num_blocks(s, config.block_k), config.branches) >= 1:
    # no round: nothing to share (as on the XLA path)
    fn = functools.partial(_estimate_shared, keep_lse=KEEP_LSE if keep_lse is None else bool(keep_lse))
  else:
    fn = _estimate if _narrow(config) else _estimate_wide
  indices, counts = fn(
      q, k, config=config, scale=numerics.resolve_scale(scale, h), softcap=None if softcap is None else float(softcap),
      stages=DEFAULT_STAGES if stages is None else int(stages))
  return BlockMask(indices, counts, config.block_q, config.block_k, t, s, config)


@functools.partial(jax.jit, static_argnames=("config", "scale", "softcap", "stages"))
def _estimate(q, k, *, config: StreamConfig, scale, softcap, stages):
  import jax.experimental.pallas as pl  # noqa: PLC0415  (GPU-only module: imported where it runs)
  import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415

  (q, k), batched = common.as_batched(q, k)
  b, t, n, h = q.shape
  s, kv = k.shape[1], k.shape[2]
  g = n // kv
  n_q, n_k = num_blocks(t, BLOCK), num_blocks(s, BLOCK)
  q = common.pad_axis(q, 1, n_q * BLOCK)
  k = common.pad_axis(k, 1, n_k * BLOCK)
  top_k, branches, sink, wb = config.top_k, config.branches, config.sink_blocks, config.window_blocks
  cap = config.capacity
  out_len = mosaic_common.tma_length(cap + 1)  # block ids, then the count last
  rounds = num_rounds(n_k, branches)
  offset = s - t
  dtype = q.dtype
  # Searched blocks end below diag - window_blocks + 1. With queries on key-block boundaries (offset a
  # multiple of 64), or a window of >= 2 blocks, those keys precede every query of the block: no causal mask
  # per child (it was half the per-child work at head dim 128). Padded query rows are masked once a round.
  causal_free = offset % BLOCK == 0 or wb >= 2

  def kernel(q_ref, k_ref, o_ref, scratch):
    q_smem, k_smem, start_s, size_s, score_s, keep_s, slot_s, out_s, q_bar, k_bars = scratch
    hq, bb, i = lax.axis_index("heads"), lax.axis_index("batch"), lax.axis_index("qblk")
    kvh = lax.div(hq, jnp.int32(g))
    plgpu.copy_gmem_to_smem(q_ref.at[bb, pl.ds(i * BLOCK, BLOCK), hq], q_smem, q_bar.at[0])

    wg = plgpu.Layout.WGMMA
    row_l, col_l = wg.reduce(1), wg.reduce(0)  # a vector over the rows / over the columns of a tile

    # Vectors are made where they are used: a value with a layout and no use leaves layout inference
    # nothing to solve for (it fails on a kernel whose search is statically empty).
    def tile_iota(dim):
      return plgpu.broadcasted_iota(jnp.int32, (BLOCK, SLOTS), dim, layout=wg)

    def slot_iota():
      return plgpu.broadcasted_iota(jnp.int32, (SLOTS,), 0, layout=col_l)

    def column(ref):
      """A node list as a [64, SLOTS] tile, x[r, c] = ref[c] (a transposing load: not bank-conflict free)."""
      return lax.broadcast_in_dim(plgpu.load(ref, (), layout=col_l, optimized=False), (BLOCK, SLOTS), [1])

    def pick(ref, hit, zero):
      """Row r gets ref[c] for the one c with hit[r, c] (zero where none): a gather by one-hot sums."""
      return jnp.where(hit, column(ref), zero).sum(axis=1)

    last_pos = jnp.minimum((i + 1) * BLOCK, t) - 1 + offset
    diag = lax.div(last_pos, jnp.int32(BLOCK))
    lo = jnp.int32(sink)
    hi = diag - wb + 1  # exclusive end of the search range
    span = jnp.maximum(hi - lo, 0)

    def representative(c):
      blk = start_s[c] + lax.div(jnp.maximum(size_s[c] - 1, 0), jnp.int32(2))
      return jnp.clip(blk, 0, n_k - 1)

    def fetch(c, slot):
      plgpu.copy_gmem_to_smem(k_ref.at[bb, pl.ds(representative(c) * BLOCK, BLOCK), kvh], k_smem.at[slot],
                              k_bars.at[slot])

    def score_nodes(m):
      """score_s[c] = max visible scaled (soft-capped) logit of the query block against node c's
      representative key block, for c < m (-inf for empty nodes and c >= m)."""
      for c0 in range(stages):
        pl.when(c0 < m)(functools.partial(fetch, c0, c0))
      cols = tile_iota(1)
      if not causal_free:
        q_pos = i * BLOCK + tile_iota(0) + offset

      def body(c, best):
        slot = lax.rem(c, jnp.int32(stages))
        blk = representative(c)
        plgpu.barrier_wait(k_bars.at[slot])

        x = mosaic_common.qk_logits(q_smem, k_smem.at[slot])
        pl.when(c + stages < m)(functools.partial(fetch, c + stages, slot))  # logits read: slot free
        if causal_free:
          row_max = x.max(axis=1)
        else:
          row_max = jnp.where(blk * BLOCK + cols <= q_pos, x, -jnp.inf).max(axis=1)  # SLOTS == BLOCK
        return jnp.where(cols == c, lax.broadcast_in_dim(row_max, best.shape, [0]), best)

      best = lax.fori_loop(0, m, body, plgpu.layout_cast(jnp.full((BLOCK, SLOTS), -jnp.inf, jnp.float32), wg))
      if t % BLOCK:  # the last block's padded (zero) query rows must not score
        best = jnp.where(i * BLOCK + tile_iota(0) < t, best, -jnp.inf)
      best = best.max(axis=0) * scale  # scale > 0: the max commutes with it, and with the soft-cap
      if softcap is not None:
        best = jnp.tanh(best * (1.0 / softcap)) * softcap
      size = plgpu.load(size_s, (), layout=col_l, optimized=False)
      score_s[...] = jnp.where((size > 0) & (slot_iota() < m), best, -jnp.inf)
      plgpu.commit_smem()

    def keep_top():
      """Keep the top_k nodes of the SLOTS in score_s (ties -> earlier slot), compacted in slot order into
      slots 0..top_k-1 of start_s / size_s / score_s."""
      rows, cols = tile_iota(0), tile_iota(1)
      mine = lax.broadcast_in_dim(plgpu.load(score_s, (), layout=row_l), (SLOTS, SLOTS), [0])
      beats = (column(score_s) > mine) | ((column(score_s) == mine) & (cols < rows))
      keep = jnp.where(jnp.where(beats, 1, 0).sum(axis=1) < top_k, 1, 0)
      keep_s[...] = keep
      plgpu.commit_smem()
      before = jnp.where((column(keep_s) == 1) & (cols < rows), 1, 0).sum(axis=1)
      slot_s[...] = jnp.where(keep == 1, before, -1)
      plgpu.commit_smem()
      hit = column(slot_s) == rows
      new = (pick(start_s, hit, 0), pick(size_s, hit, 0), pick(score_s, hit, 0.0))
      plgpu.commit_smem()  # every thread has read the old lists before any is overwritten
      start_s[...], size_s[...], score_s[...] = new
      plgpu.commit_smem()

    def split():
      """Children 2p and 2p + 1 of each node p < top_k: its two halves, the left one taking the odd block.
      A vector step (a scalar loop in place would race: warps run apart, and one's child could overwrite
      a parent another has not read yet)."""
      d = tile_iota(0) - 2 * tile_iota(1)  # child r of parent c: d = 0 left, 1 right
      hit = (d == 0) | (d == 1)
      start, size = pick(start_s, hit, 0), pick(size_s, hit, 0)
      right = jnp.where(hit & (d == 1), 1, 0).sum(axis=1) == 1
      left = lax.div(size + 1, jnp.int32(2))
      plgpu.commit_smem()  # every thread has read the parents before any child overwrites them
      start_s[...] = jnp.where(right, start + left, start)
      size_s[...] = jnp.where(right, size - left, left)
      plgpu.commit_smem()

    # First level: `branches` near-equal contiguous nodes over the search range.
    def first_level(j, _):
      start = lo + lax.div(j * span, jnp.int32(branches))
      end = lo + lax.div((j + 1) * span, jnp.int32(branches))
      start_s[j] = start
      size_s[j] = jnp.where(j < branches, end - start, 0)

    lax.fori_loop(0, SLOTS, first_level, None)
    plgpu.commit_smem()
    plgpu.barrier_wait(q_bar.at[0])
    search = span > top_k  # else the whole range is kept (early query blocks are dense)

    if branches > top_k:
      @pl.when(search)
      def _():
        score_nodes(branches)
        keep_top()

    def round_body(_, carry):
      sizes = plgpu.load(size_s, (), layout=col_l, optimized=False)
      widest = jnp.where(slot_iota() < top_k, sizes, 0).max()

      @pl.when(search & (widest > 1))  # single-block nodes: later rounds change nothing
      def _():
        split()
        score_nodes(2 * top_k)
        keep_top()
      return carry

    lax.fori_loop(0, rounds, round_body, None)

    def searched(j):
      return (jnp.where(search, start_s[j], lo + j), jnp.where(search, size_s[j] > 0, lo + j < hi))

    _write_union(searched, out_s, o_ref.at[bb, hq, i], config=config, diag=diag, out_len=out_len)

  def entry(q_ref, k_ref, o_ref):
    pl.run_scoped(
        lambda *scratch: kernel(q_ref, k_ref, o_ref, scratch),
        mosaic_common.tiled_smem((BLOCK, h), dtype), mosaic_common.tiled_smem((stages, BLOCK, h), dtype),
        plgpu.SMEM((SLOTS,), jnp.int32), plgpu.SMEM((SLOTS,), jnp.int32), plgpu.SMEM((SLOTS,), jnp.float32),
        plgpu.SMEM((SLOTS,), jnp.int32), plgpu.SMEM((SLOTS,), jnp.int32), plgpu.SMEM((out_len,), jnp.int32),
        plgpu.Barrier(num_barriers=1), plgpu.Barrier(num_barriers=stages))

  out = plgpu.kernel(
      entry, out_type=jax.ShapeDtypeStruct((b, n, n_q, out_len), jnp.int32),
      grid=(n, b, n_q), grid_names=("heads", "batch", "qblk"),
      compiler_params=plgpu.CompilerParams(approx_math=False))(q, k)
  indices, counts = out[..., :cap], out[..., out_len - 1]
  if not batched:
    indices, counts = indices[0], counts[0]
  return indices, counts


def _tile_logsumexp(x: jax.Array, axis: int) -> jax.Array:
  """shares.logsumexp of a [64, 64] register tile over `axis` (-inf where every term is -inf), with the
  broadcasts a Mosaic GPU layout needs instead of kept dimensions."""
  m = x.max(axis=axis)
  m = jnp.where(m > -jnp.inf, m, 0.0)
  total = jnp.exp(x - lax.broadcast_in_dim(m, x.shape, [1 - axis])).sum(axis=axis)
  return jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + m, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("config", "scale", "softcap", "stages", "keep_lse"))
def _estimate_shared(q, k, *, config: StreamConfig, scale, softcap, stages, keep_lse: bool):
  """config.search_share = P (the XLA path's `estimate._estimate_shared`, step for step): the wide kernel
  runs each group's first level and all rounds but the last on the group's gathered rows ("group"), then
  each query block's last round from the group's kept nodes ("member")."""
  (q, k), batched = common.as_batched(q, k)
  t, s = q.shape[1], k.shape[1]
  rows, pos, meta = _group_rows(t, s, config)
  q_rows = jnp.take(q, jnp.asarray(rows), axis=1)  # [B, nG x 64, N, H]: a quarter of q at P = 4
  kw = dict(config=config, scale=scale, softcap=softcap, stages=stages)
  nodes, missed = _estimate_wide(q_rows, k, jnp.asarray(pos), jnp.asarray(meta), stage="group", q_len=t, **kw)
  m = missed[..., 0]  # what the member pass takes of it, made here (Mosaic GPU lowers no log1p)
  missed = missed.at[..., 1].set(jnp.log1p(-m)).at[..., 2].set(m / (1.0 - m))
  indices, counts = _estimate_wide(q, k, nodes, missed, stage="member", keep_lse=keep_lse, **kw)
  if not batched:
    indices, counts = indices[0], counts[0]
  return indices, counts


def _group_rows(t: int, s: int, config: StreamConfig):
  """A shared search's rows, as estimate._estimate_group takes them: for group p, every P-th of each
  member's scoring rows counted back from its last valid one (member by member), padded to a 64-row tile.

  Returns the rows' indices into q int32 [nG x 64], their key positions int32 [nG x 64] (-1: no row), and
  per group int32 [nG, 32]: its first member's diagonal key block (where the shared range ends, before its
  window) and its last member's (where the rule blocks after that range end)."""
  share_n, bq, stride = config.search_share, config.block_q, config.query_stride
  n_q = num_blocks(t, bq)
  n_g = -(-n_q // share_n)
  count = bq // (stride * share_n)
  j = np.arange(n_g)[:, None] * share_n + np.arange(share_n)[None, :]  # [nG, P] members
  last_row = np.minimum((j + 1) * bq, t) - 1 - j * bq
  r = last_row[..., None] - np.arange(count) * stride * share_n  # [nG, P, count]
  ok = r >= 0
  rows = np.zeros((n_g, BLOCK), np.int32)
  pos = np.full((n_g, BLOCK), -1, np.int32)
  rows[:, :share_n * count] = np.where(ok, j[..., None] * bq + r, 0).reshape(n_g, -1)
  pos[:, :share_n * count] = np.where(ok, j[..., None] * bq + r + s - t, -1).reshape(n_g, -1)
  diag = (j * bq + last_row + s - t) // bq  # [nG, P]
  meta = np.zeros((n_g, mosaic_common.TMA_INT32), np.int32)
  meta[:, 0], meta[:, 1] = diag[:, 0], diag[:, -1]
  return rows.reshape(-1), pos.reshape(-1), meta


@functools.partial(jax.jit, static_argnames=("config", "scale", "softcap", "stages", "stage", "q_len",
                                             "keep_lse"))
def _estimate_wide(q, k, *shared, config: StreamConfig, scale, softcap, stages, stage: str = "full",
                   q_len: Optional[int] = None, keep_lse: bool = False):
  """The wide kernel. stage "full": a search per query block -> (indices, counts). With search_share = P
  (`_estimate_shared`): "group" runs a group's first level and all rounds but the last, q being the
  groups' gathered rows (64 a group) and shared = (their key positions [nG x 64], the groups' diagonal
  blocks [nG, 32]), q_len the queries' length -> the kept nodes int32 [B, N, nG, 2 (start, size), tiles,
  64] and the share of the range their rounds dropped float32 [B, N, nG, 32] (slot 0); "member" runs each
  query block's last round from those (shared = (nodes, missed), missed's slots 1 and 2 holding log(1 -
  missed) and missed / (1 - missed)) -> (indices, counts); with mass scores and keep_lse its candidates'
  row log-sum-exps stay in shared memory between its two uses (see KEEP_LSE)."""
  import jax.experimental.pallas as pl  # noqa: PLC0415  (GPU-only module: imported where it runs)
  import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415

  group, member = stage == "group", stage == "member"
  (q, k), batched = common.as_batched(q, k)
  b, t, n, h = q.shape
  if group:
    n_tiles, t = t // BLOCK, q_len
  s, kv = k.shape[1], k.shape[2]
  g = n // kv
  blk_len, stride = config.block_q, config.query_stride  # square blocks (unsupported); 64-row tiles
  n_q, n_k = num_blocks(t, blk_len), num_blocks(s, blk_len)
  # Every block's tile is the 64 rows from its start (the next blocks' rows are masked): padded so the last
  # block's tile is inside the array.
  if not group:
    q = common.pad_axis(q, 1, n_q * blk_len + BLOCK - blk_len)
  k = common.pad_axis(k, 1, n_k * blk_len + BLOCK - blk_len)
  top_k, branches, sink, wb = config.top_k, config.branches, config.sink_blocks, config.window_blocks
  mass, adaptive = config.score == "mass", config.adaptive
  share_n = config.search_share
  cap = config.capacity
  out_len = mosaic_common.tma_length(cap + 1)  # block ids, then the count last
  rounds = num_rounds(n_k, branches) - (1 if group else 0)
  offset = s - t
  dtype = q.dtype
  gap = shares.gap_blocks(config) if member or group else 0  # blocks between the shared range and a window
  pool = 2 * top_k  # a member's candidates: the group's kept nodes' children, then the gap blocks
  keep_lse = member and mass and keep_lse
  cand_tiles = -(-(pool + gap) // TILE)
  chunks = -(-max(2 * top_k + (gap if member else 0), branches) // TILE)  # node-list tiles
  kept_chunks = -(-top_k // TILE)  # the tiles that hold the kept nodes
  causal_free = offset % blk_len == 0 or wb >= 2  # as in _estimate: searched blocks need no causal mask
  # log of a query block's scoring rows (every stride-th; the last block's valid ones), as the reference
  # takes it
  log_rows = tuple(float(np.log(np.float32(r))) for r in (
      blk_len // stride, min(blk_len // stride, (t - (n_q - 1) * blk_len - 1) // stride + 1)))
  row_mask = group or blk_len < BLOCK or stride > 1 or t % blk_len  # some tile rows never score

  def kernel(*refs):
    if group:
      q_ref, k_ref, pos_ref, meta_ref, nodes_ref, miss_ref, *scratch = refs
    elif member:
      q_ref, k_ref, nodes_ref, miss_ref, o_ref, *scratch = refs
    else:
      q_ref, k_ref, o_ref, *scratch = refs
    q_smem, k_smem, start_s, size_s, score_s, keep_s, slot_s, out_s, q_bar, k_bars = scratch[:10]
    if keep_lse:
      lse_s = scratch[-1]
    hq, bb, i = lax.axis_index("heads"), lax.axis_index("batch"), lax.axis_index("qblk")
    kvh = lax.div(hq, jnp.int32(g))
    plgpu.copy_gmem_to_smem(q_ref.at[bb, pl.ds(i * (BLOCK if group else blk_len), BLOCK), hq], q_smem,
                            q_bar.at[0])
    if group or member:
      pos_s, meta_s, miss_s, misc = scratch[10:14]
    if group:
      plgpu.copy_gmem_to_smem(pos_ref.at[pl.ds(i * BLOCK, BLOCK)], pos_s, misc.at[0])
      plgpu.copy_gmem_to_smem(meta_ref.at[i], meta_s, misc.at[1])
    if member:
      p = lax.div(i, jnp.int32(share_n))
      plgpu.copy_gmem_to_smem(nodes_ref.at[bb, hq, p, 0], start_s.at[pl.ds(0, kept_chunks)], misc.at[0])
      plgpu.copy_gmem_to_smem(nodes_ref.at[bb, hq, p, 1], size_s.at[pl.ds(0, kept_chunks)], misc.at[1])
      plgpu.copy_gmem_to_smem(miss_ref.at[bb, hq, p], miss_s, misc.at[2])

    wg = plgpu.Layout.WGMMA
    row_l, col_l = wg.reduce(1), wg.reduce(0)

    def tile_iota(dim):
      return plgpu.broadcasted_iota(jnp.int32, (BLOCK, TILE), dim, layout=wg)

    def slot_iota():
      return plgpu.broadcasted_iota(jnp.int32, (TILE,), 0, layout=col_l)

    def as_cols(ref):
      return plgpu.load(ref, (), layout=col_l, optimized=False)

    def column(ref):
      """A node-list tile as a [64, TILE] array, x[r, c] = ref[c] (a transposing load)."""
      return lax.broadcast_in_dim(as_cols(ref), (BLOCK, TILE), [1])

    def pick(ref, hit, zero):
      return jnp.where(hit, column(ref), zero).sum(axis=1)

    def node(ref, e):  # node e of a list
      return ref[lax.div(e, jnp.int32(TILE)), lax.rem(e, jnp.int32(TILE))]

    if group:  # the gathered rows' positions, a group's diagonal blocks (first and last member)
      plgpu.barrier_wait(misc.at[0])
      plgpu.barrier_wait(misc.at[1])
      diag, diag_last = meta_s[0], meta_s[1]

      def row_pos(tile):  # [64] or [64, TILE]: each tile row's key position
        pos = plgpu.load(pos_s, (), layout=row_l)
        return lax.broadcast_in_dim(pos, (BLOCK, TILE), [0]) if tile else pos

      def scoring(rows):
        return row_pos(rows.ndim == 2) >= 0

      group_log_rows = jnp.log(jnp.maximum(jnp.where(row_pos(False) >= 0, 1.0, 0.0).sum(), 1.0))
    else:
      last_row = jnp.minimum((i + 1) * blk_len, t) - 1 - i * blk_len  # the block's last valid query row
      last_pos = i * blk_len + last_row + offset
      diag = lax.div(last_pos, jnp.int32(blk_len))

      def scoring(rows):
        """Which tile rows score: every stride-th valid one counted back from the last (the reference's)."""
        ok = rows <= last_row
        return ok & (lax.rem(last_row - rows, jnp.int32(stride)) == 0) if stride > 1 else ok

    lo = jnp.int32(sink)
    hi = diag - wb + 1  # exclusive end of the search range
    span = jnp.maximum(hi - lo, 0)
    search = span > top_k  # else the whole range is kept (early query blocks are dense)
    if group:  # a group searches whatever its range (the XLA path's nodes_only search)
      search = jnp.bool_(True)
    if member:  # where the group's shared range ends: its first member's window
      first_pos = jnp.minimum((p * share_n + 1) * blk_len, t) - 1 + offset
      shared_hi = lax.div(first_pos, jnp.int32(blk_len)) - wb + 1

    def representative(e):
      blk = node(start_s, e)
      if config.representative == "center":
        blk = blk + lax.div(jnp.maximum(node(size_s, e) - 1, 0), jnp.int32(2))
      return jnp.clip(blk, 0, n_k - 1)

    def rule_block(e):  # the sink blocks, then the window's from the diagonal down (a group: the blocks after
      # its range up to its last member's diagonal)
      if group:
        return jnp.clip(jnp.where(e < sink, e, hi + (e - sink)), 0, n_k - 1)
      return jnp.clip(jnp.where(e < sink, e, diag - (e - sink)), 0, n_k - 1)

    def fetch(blk, buf):
      plgpu.copy_gmem_to_smem(k_ref.at[bb, pl.ds(blk * blk_len, BLOCK), kvh], k_smem.at[buf], k_bars.at[buf])

    def row_values(x, blk, masked):
      """Each query row's value of a key block from its logits x: the max visible logit (unscaled: the
      scale and soft-cap commute with it), or the log-sum-exp of its visible scaled, soft-capped ones."""
      if mass:
        x = numerics.softcap(x * scale, softcap)
      if masked:  # past the block's keys (the tile's next blocks) nothing is visible
        q_pos = row_pos(True) if group else i * blk_len + tile_iota(0) + offset
        x = jnp.where(blk * blk_len + tile_iota(1) <= q_pos, x, -jnp.inf)
      if blk_len < BLOCK:
        x = jnp.where(tile_iota(1) < blk_len, x, -jnp.inf)
      return _tile_logsumexp(x, 1) if mass else x.max(axis=1)

    def walk(count, block, masked, finish, acc):
      """Key blocks block(e), e < count, through the TMA ring: item e's row values go into column e % 64
      of a [64 rows, 64 items] tile, and finish(tile, a, acc) -> acc takes each tile a of 64 items."""
      for c0 in range(stages):
        pl.when(c0 < count)(lambda c0=c0: fetch(block(jnp.int32(c0)), c0))

      def chunk(a, acc):
        def item(c, tile):
          e = a * TILE + c
          buf = lax.rem(e, jnp.int32(stages))
          blk = block(e)
          plgpu.barrier_wait(k_bars.at[buf])
          x = mosaic_common.qk_logits(q_smem, k_smem.at[buf])
          pl.when(e + stages < count)(lambda: fetch(block(e + stages), buf))  # logits read: buffer free
          return jnp.where(tile_iota(1) == c, lax.broadcast_in_dim(row_values(x, blk, masked), tile.shape, [0]),
                           tile)

        tile = lax.fori_loop(0, jnp.minimum(count - a * TILE, TILE), item,
                             plgpu.layout_cast(jnp.full((BLOCK, TILE), -jnp.inf, jnp.float32), wg))
        return finish(tile, a, acc)

      return lax.fori_loop(0, lax.div(count + TILE - 1, jnp.int32(TILE)), chunk, acc)

    def log_shares(x, z):
      """[64 rows, 64 items] per-row log-sum-exps -> [64] each item's log share (shares.log_share)."""
      x = jnp.where(scoring(tile_iota(0)), x - lax.broadcast_in_dim(z, x.shape, [0]), -jnp.inf)
      if group:
        return _tile_logsumexp(x, 0) - group_log_rows
      return _tile_logsumexp(x, 0) - jnp.where(i == n_q - 1, log_rows[1], log_rows[0])

    def store_scores(best, a, count):
      """score_s tile a = best [64], -inf for empty nodes and nodes e >= count."""
      ok = (as_cols(size_s.at[a]) > 0) & (a * TILE + slot_iota() < count)
      score_s[a] = jnp.where(ok, best, -jnp.inf)

    def estimated(a, which):
      """The estimated share of tile a's nodes where `which` [64] holds: each node's share x its size."""
      size = as_cols(size_s.at[a])
      return jnp.where((size > 0) & which, jnp.exp(as_cols(score_s.at[a])) * size.astype(jnp.float32), 0.0).sum()

    def score_nodes(count, z):
      """score_s = each node's score (-inf for empty nodes and e >= count), nodes e < count."""
      def finish(tile, a, _):
        if mass:
          best = log_shares(tile, z)
        else:
          if row_mask:  # rows past the block or its last query, or between the stride's
            tile = jnp.where(scoring(tile_iota(0)), tile, -jnp.inf)
          best = tile.max(axis=0) * scale  # scale > 0: the max commutes with it, and with the soft-cap
          if softcap is not None:
            best = jnp.tanh(best * (1.0 / softcap)) * softcap
        store_scores(best, a, count)

      walk(count, representative, not causal_free, finish, None)
      plgpu.commit_smem()

    def keep_top(count, dropped):
      """Keep the top_k of nodes e < count by score_s (ties -> earlier node), compacted in node order into
      nodes 0..top_k-1 (the tiles past top_k keep stale nodes, never read); `dropped` adds the estimated
      share of the others (coverage budgets, and a shared search's rounds). An L x L rank comparison in
      64 x 64 tiles."""
      n_tiles = -(-count // TILE)
      rows, cols = tile_iota(0), tile_iota(1)
      keep = []
      for a in range(n_tiles):
        mine = lax.broadcast_in_dim(plgpu.load(score_s.at[a], (), layout=row_l), (BLOCK, TILE), [0])
        rank = 0
        for c in range(n_tiles):
          other = column(score_s.at[c])
          beats = (other >= mine) if c < a else (other > mine) if c > a else (
              (other > mine) | ((other == mine) & (cols < rows)))
          rank = rank + jnp.where(beats, 1, 0).sum(axis=1)
        keep.append(jnp.where(rank < top_k, 1, 0))
        keep_s[a] = keep[a]
      plgpu.commit_smem()
      if mass and (adaptive or group):
        for a in range(n_tiles):
          dropped = dropped + estimated(a, as_cols(keep_s.at[a]) == 0)
      for a in range(n_tiles):
        before = 0
        for c in range(a + 1):
          kept = column(keep_s.at[c]) == 1
          before = before + jnp.where(kept & (cols < rows) if c == a else kept, 1, 0).sum(axis=1)
        slot_s[a] = jnp.where(keep[a] == 1, before, -1)
      plgpu.commit_smem()
      new = []
      for d in range(kept_chunks):  # node d * 64 + r comes from a tile c >= d (kept ones only move down)
        hits = [(c, column(slot_s.at[c]) == d * TILE + rows) for c in range(d, n_tiles)]
        new.append(tuple(sum(pick(ref.at[c], hit, zero) for c, hit in hits)
                         for ref, zero in ((start_s, 0), (size_s, 0), (score_s, 0.0))))
      plgpu.commit_smem()  # every thread has read the old lists before any is overwritten
      for d, (start, size, score) in enumerate(new):
        start_s[d], size_s[d], score_s[d] = start, size, score
      plgpu.commit_smem()
      return dropped

    def split():
      """Children 2p and 2p + 1 of each node p < top_k: its two halves, the left one taking the odd block;
      child tile d's parents are in tile d // 2. A vector step (see _estimate)."""
      rows, cols = tile_iota(0), tile_iota(1)
      new = []
      for d in range(-(-2 * top_k // TILE)):
        c = d // 2
        diff = d * TILE + rows - 2 * (c * TILE + cols)  # child r of parent c: 0 left, 1 right
        hit = (diff == 0) | (diff == 1)
        start, size = pick(start_s.at[c], hit, 0), pick(size_s.at[c], hit, 0)
        right = jnp.where(hit & (diff == 1), 1, 0).sum(axis=1) == 1
        left = lax.div(size + 1, jnp.int32(2))
        new.append((jnp.where(right, start + left, start), jnp.where(right, size - left, left)))
      plgpu.commit_smem()  # every thread has read the parents before any child overwrites them
      for d, (start, size) in enumerate(new):
        start_s[d], size_s[d] = start, size
      plgpu.commit_smem()

    # First level: `branches` near-equal contiguous nodes over the search range, or (no search) its blocks.
    def first_level(j, _):
      start = lo + lax.div(j * span, jnp.int32(branches))
      end = lo + lax.div((j + 1) * span, jnp.int32(branches))
      slot_ref = (lax.div(j, jnp.int32(TILE)), lax.rem(j, jnp.int32(TILE)))
      start_s[slot_ref] = jnp.where(search, start, lo + j)
      size_s[slot_ref] = jnp.where(search, jnp.where(j < branches, end - start, 0), jnp.where(j < span, 1, 0))

    if member:  # the group's kept nodes' children, then the gap blocks; or (no search) the range's blocks
      plgpu.barrier_wait(misc.at[0])
      plgpu.barrier_wait(misc.at[1])
      plgpu.barrier_wait(misc.at[2])

      @pl.when(search)
      def _():
        split()

        def gap_node(e, _):
          blk = shared_hi + e
          slot_ref = (lax.div(pool + e, jnp.int32(TILE)), lax.rem(pool + e, jnp.int32(TILE)))
          start_s[slot_ref] = blk
          size_s[slot_ref] = jnp.where((blk >= lo) & (blk < hi), 1, 0)

        lax.fori_loop(0, gap, gap_node, None)

      pl.when(jnp.logical_not(search))(lambda: lax.fori_loop(0, chunks * TILE, first_level, None))
    else:
      lax.fori_loop(0, chunks * TILE, first_level, None)
    plgpu.commit_smem()
    plgpu.barrier_wait(q_bar.at[0])
    if member:
      first = jnp.where(search, pool + gap, span if adaptive else 0)  # the nodes z needs (all exact)
      scored = jnp.where(search, pool + gap, span if mass and adaptive else 0)
    else:
      first = jnp.where(search, branches, span if adaptive else 0)  # first-level nodes z needs
      scored = jnp.where(search, branches if branches > top_k else 0, span if mass and adaptive else 0)
    if group and mass and not (branches > top_k or rounds == 0):  # the kept nodes' scores, where no
      scored = jnp.where(span <= branches, branches, 0)  # round will rescore them (single-block nodes)
    z = rule_lse = None
    if mass:
      # The rows' softmax denominators z: the rule blocks (sink, window) exactly, the search range estimated
      # by its first-level nodes (each node's representative x its size), as the reference makes them.
      n_rule = sink + wb + (gap if group else 0)

      def rule_finish(tile, a, acc):
        e = a * TILE + tile_iota(1)
        if group:
          after = hi + (e - sink)
          ok = (e < n_rule) & jnp.where(e < sink, e <= diag_last, (after >= sink) & (after <= diag_last))
        else:
          ok = (e < sink + wb) & jnp.where(e < sink, e <= diag, diag - (e - sink) >= sink)
        return shares.logaddexp(acc, _tile_logsumexp(jnp.where(ok, tile, -jnp.inf), 1))

      def search_finish(tile, a, acc):
        size = as_cols(size_s.at[a])
        ok = lax.broadcast_in_dim((size > 0) & (a * TILE + slot_iota() < first), tile.shape, [1])
        log_size = lax.broadcast_in_dim(jnp.log(jnp.maximum(size, 1).astype(jnp.float32)), tile.shape, [1])
        return shares.logaddexp(acc, _tile_logsumexp(jnp.where(ok, tile + log_size, -jnp.inf), 1))

      def candidate_finish(tile, a, acc):  # a member's candidates, exact: the pool's and the gap's apart
        if keep_lse:
          lse_s[a] = tile
        in_pool = lax.broadcast_in_dim(a * TILE + slot_iota() < pool, tile.shape, [1])
        ok = lax.broadcast_in_dim((as_cols(size_s.at[a]) > 0) & (a * TILE + slot_iota() < first), tile.shape,
                                  [1])
        return (shares.logaddexp(acc[0], _tile_logsumexp(jnp.where(ok & in_pool, tile, -jnp.inf), 1)),
                shares.logaddexp(acc[1], _tile_logsumexp(jnp.where(ok & ~in_pool, tile, -jnp.inf), 1)))

      empty = plgpu.layout_cast(jnp.full((BLOCK,), -jnp.inf, jnp.float32), row_l)
      rule_lse = walk(n_rule if group else jnp.where(search | adaptive, sink + wb, 0), rule_block, True,
                      rule_finish, empty)
      if member:  # the pool holds all but what the shared rounds dropped: 1 - missed of the shared range
        pool_lse, gap_lse = walk(first, representative, not causal_free, candidate_finish, (empty, empty))
        search_lse = shares.logaddexp(pool_lse - jnp.where(search, miss_s[1], 0.0), gap_lse)
      else:
        search_lse = walk(first, representative, not causal_free, search_finish, empty)
      row_ok = scoring(plgpu.broadcasted_iota(jnp.int32, (BLOCK,), 0, layout=row_l))
      z = shares.log_denominator(rule_lse, search_lse, row_ok)

    def score_kept(count):
      """score_nodes from the row log-sum-exps the denominators' walk kept (a member, mass scores)."""
      for a in range(cand_tiles):
        store_scores(log_shares(plgpu.load(lse_s.at[a], (), layout=wg, optimized=False), z), a, count)
      plgpu.commit_smem()

    dropped = jnp.float32(0.0)
    if keep_lse:
      pl.when(scored > 0)(lambda: score_kept(scored))
    elif branches > top_k or (mass and adaptive) or member or group:
      pl.when(scored > 0)(lambda: score_nodes(scored, z))

    if member:
      def last_round(dropped):
        pool_share = jnp.float32(0.0)
        if mass and adaptive:  # the pool's estimate, for the share its parents' rounds dropped
          for a in range(-(-pool // TILE)):
            pool_share = pool_share + jnp.where(a * TILE + slot_iota() < pool, jnp.exp(as_cols(score_s.at[a])),
                                                0.0).sum()
        dropped = keep_top(pool + gap, dropped)
        if mass and adaptive:
          dropped = dropped + pool_share * miss_s[2]  # x missed / (1 - missed)
        return dropped

      dropped = lax.cond(search, last_round, lambda d: d, dropped)
    else:
      if branches > top_k:
        dropped = lax.cond(search, functools.partial(keep_top, branches), lambda d: d, dropped)

      def round_body(_, dropped):
        widest = 0
        for a in range(kept_chunks):
          widest = jnp.maximum(widest, jnp.where(a * TILE + slot_iota() < top_k, as_cols(size_s.at[a]), 0).max())

        def one_round(dropped):
          split()
          score_nodes(2 * top_k, z)
          return keep_top(2 * top_k, dropped)

        # single-block nodes: later rounds change nothing
        return lax.cond(search & (widest > 1), one_round, lambda d: d, dropped)

      dropped = lax.fori_loop(0, rounds, round_body, dropped)

    if group:  # the kept nodes and the share of the range the rounds dropped (shares.missed_share)
      missed = jnp.float32(0.0)
      if mass:
        kept_est = jnp.float32(0.0)
        for a in range(kept_chunks):
          kept_est = kept_est + estimated(a, a * TILE + slot_iota() < top_k)
        missed = shares.missed_share(dropped, kept_est)
      miss_s[0] = missed
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(start_s.at[pl.ds(0, kept_chunks)], nodes_ref.at[bb, hq, i, 0])
      plgpu.copy_smem_to_gmem(size_s.at[pl.ds(0, kept_chunks)], nodes_ref.at[bb, hq, i, 1])
      plgpu.copy_smem_to_gmem(miss_s, miss_ref.at[bb, hq, i])
      plgpu.wait_smem_to_gmem(0)
      return

    if adaptive:  # the fewest kept nodes whose estimated share reaches the target (shares.coverage_keep)
      rule_share = jnp.exp(log_shares(lax.broadcast_in_dim(rule_lse, (BLOCK, TILE), [0]), z)).max()
      rest = jnp.where(search, jnp.maximum(dropped, 0.0), 0.0) * config.dropped_scale

      def masses(a, layout):
        ok = (plgpu.load(size_s.at[a], (), layout=layout, optimized=False) > 0)
        return jnp.where(ok, jnp.exp(plgpu.load(score_s.at[a], (), layout=layout, optimized=False)), 0.0)

      total = rule_share
      for a in range(kept_chunks):
        total = total + masses(a, col_l).sum()
      total = total + rest
      rows, cols = tile_iota(0), tile_iota(1)
      covered = []
      for a in range(kept_chunks):
        mine = masses(a, row_l)
        mine2 = lax.broadcast_in_dim(mine, (BLOCK, TILE), [0])
        before = 0.0
        for c in range(kept_chunks):
          other = lax.broadcast_in_dim(masses(c, col_l), (BLOCK, TILE), [1])
          beats = (other >= mine2) if c < a else (other > mine2) if c > a else (
              (other > mine2) | ((other == mine2) & (cols < rows)))
          before = before + jnp.where(beats, other, 0.0).sum(axis=1)
        covered.append(jnp.where((rule_share + before < config.coverage * total) & (mine > 0), 1, 0))
      for a, keep in enumerate(covered):
        keep_s[a] = keep
      plgpu.commit_smem()

    def searched(j):  # the kept nodes in slot order (the budget's keep flags with coverage)
      ok = node(size_s, j) > 0
      if adaptive:
        ok = ok & (node(keep_s, j) == 1)
      return node(start_s, j), ok

    _write_union(searched, out_s, o_ref.at[bb, hq, i], config=config, diag=diag, out_len=out_len)

  def entry(*refs):
    lists = [plgpu.SMEM((chunks, TILE), x) for x in (jnp.int32, jnp.int32, jnp.float32, jnp.int32, jnp.int32)]
    extra = []
    if group or member:  # positions, a group's diagonals, the missed share; their barriers
      extra = [plgpu.SMEM((BLOCK,), jnp.int32), plgpu.SMEM((mosaic_common.TMA_INT32,), jnp.int32),
               plgpu.SMEM((mosaic_common.TMA_INT32,), jnp.float32), plgpu.Barrier(num_barriers=3)]
    if keep_lse:
      extra.append(plgpu.SMEM((cand_tiles, BLOCK, TILE), jnp.float32))
    pl.run_scoped(
        lambda *scratch: kernel(*refs, *scratch),
        mosaic_common.tiled_smem((BLOCK, h), dtype), mosaic_common.tiled_smem((stages, BLOCK, h), dtype),
        *lists, plgpu.SMEM((out_len,), jnp.int32),
        plgpu.Barrier(num_barriers=1), plgpu.Barrier(num_barriers=stages), *extra)

  params = mosaic_common.compiler_params(approx_math=False, lane=True)
  if group:
    nodes, missed = plgpu.kernel(
        entry, out_type=[jax.ShapeDtypeStruct((b, n, n_tiles, 2, kept_chunks, TILE), jnp.int32),
                         jax.ShapeDtypeStruct((b, n, n_tiles, mosaic_common.TMA_INT32), jnp.float32)],
        grid=(n, b, n_tiles), grid_names=("heads", "batch", "qblk"), compiler_params=params)(q, k, *shared)
    return nodes, missed
  out = plgpu.kernel(
      entry, out_type=jax.ShapeDtypeStruct((b, n, n_q, out_len), jnp.int32),
      grid=(n, b, n_q), grid_names=("heads", "batch", "qblk"),
      compiler_params=params)(q, k, *shared)
  indices, counts = out[..., :cap], out[..., out_len - 1]
  if not batched:
    indices, counts = indices[0], counts[0]
  return indices, counts
