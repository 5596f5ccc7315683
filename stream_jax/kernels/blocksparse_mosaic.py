"""Pallas Mosaic GPU (Hopper: TMA + wgmma) kernel of block-sparse attention with block-level attention mass:
the port of the Triton kernel in blocksparse_triton.py (same contract, same outputs), which `backend="pallas"`
runs on Hopper GPUs: 1.13-1.28x the Triton kernel's speed on Stream masks (H100, benchmarks/RESULTS.md,
"Pallas backends").

One CTA (one warpgroup, 128 threads) per (batch, query block, head). It copies its row of the block table
and its 64 queries into shared memory, then walks its kept key blocks in table order through a ring of
key buffers and a ring of value buffers (`stages` = (key depth, value depth)): the TMA copy of block
c + depth into a key buffer is issued as soon as block c's QK product has read it, into a value buffer
as soon as its PV product has, so loads overlap the tensor-core work. Logits come from wgmma (fp32 accumulation),
then scale, soft-cap, causal / window mask and an fp32 online softmax in registers.

Block mass: next to the output accumulator each row keeps u[r, c], the sum over slot c's keys of
exp(logit - m_r), rescaled with the output's correction whenever m_r grows (the Triton kernel's fused
accumulator, here a [64, C] wgmma-layout array: C / 8 floats a thread for a Stream mask's C = 32 slots).
At the end mass[c] = sum_r u[r, c] / l_r (or the reference normaliser's share with `lse_ref`), one
column reduction for all slots. Above MAX_SLOTS (faithful() and table() keep up to 131 blocks) that
accumulator would not fit in registers beside the output's: each step instead puts its block's per-row
log-sum-exp (base 2, exact: no later rescale) into column c % 64 of a [64, 64] register tile, stored to
shared memory every 64 blocks, and at the end mass[c] = sum_r exp2(a[r, c] - n_r), 64 slots at a time, with
n_r the row's normaliser.

Blocks of 16 and 32 tokens: a wgmma tile has 64 rows, so a query block's tile starts at its first row and
the rows past the block are computed and dropped (q is padded by 64 - block), and each step puts 64 / block
kept blocks side by side in one 64-key tile (that many TMA copies into slices of one buffer, one barrier
expecting them all; slots past the count copy block 0 and are masked). The products are the 64-token
kernel's; the step count falls by 64 / block, so a kept block costs a quarter or half a step, not a step.
Still, the dropped rows cost 64 / block of each product: on an H200 this path took 1.15x (32-token) and
1.5x (16-token) Triton's time on faithful() masks, where the 64-token one is 1.3x faster
(benchmarks/RESULTS.md); "auto" runs it anyway on Hopper, where Pallas' Triton backend is deprecated.

Limits (the wrapper refuses anything else, so the caller can fall back to Triton): float16 / bfloat16,
16 x 16, 32 x 32 or 64 x 64 blocks, head dims multiples of 64 up to 256. Past MAX_SMEM_SLOTS kept blocks the
kernel runs on chunks of them (`_in_slot_chunks`), at twice the work.
"""

from __future__ import annotations

import functools
from typing import Optional, TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax

from stream_jax import numerics
from stream_jax.kernels import common, mosaic_common
from stream_jax.mask import BlockMask, num_blocks
from stream_jax.numerics import NEG_INF, AttentionStats

if TYPE_CHECKING:
  from stream_jax.kernels.implementations import Call

TILE = 64  # rows of a wgmma tile per warpgroup: a query block's tile, and a step's keys
MAX_SLOTS = 64  # kept blocks per query block whose [64, C] mass accumulator lives in registers
MAX_SMEM_SLOTS = 192  # per-block row log-sum-exps in shared memory ([C, 64] floats, 48 KiB at 192); beyond, chunks
DEFAULT_STAGES = 2  # K/V ring depth (2 keeps two CTAs per SM at head dim 128)
# Launch grid orders: which CTAs run together decides what the L2 cache shares. "qblk_last" (the query
# blocks of one head side by side: they read the same kv head's sink, window and often top-k blocks) is
# 1.2-1.5x faster than "heads_last" at 32k+ with 4-16 kv heads (H100), equal with one kv head.
GRID_ORDERS = {"heads_last": ("batch", "qblk", "heads"), "qblk_last": ("heads", "batch", "qblk")}


def unsupported(call: Call) -> Optional[str]:
  """Why this kernel cannot take a call (kernels.implementations.Call), or None. Where it can, "pallas" and
  "auto" prefer it to Triton on Hopper: at 64-token blocks 1.13-1.35x Triton's speed on every Stream-mask
  shape measured (H100, H200); at 16 / 32-token blocks slower (see above), but not deprecated."""
  reason = mosaic_common.limits(call, "attention")
  if reason:
    return reason
  if call.head_dim_v % 64 or not 64 <= call.head_dim_v <= 256:
    return f"the Mosaic GPU attention kernel needs a value head dim in 64, 128, 192, 256, got {call.head_dim_v}"
  if call.key_mask or call.gate:
    return "the Pallas attention kernels take no key_mask or gate (interventions run on the XLA path)"
  return None


def sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: BlockMask, *,
                     scale: Optional[float] = None, softcap: Optional[float] = None,
                     window: Optional[int] = None, lse_ref: Optional[jax.Array] = None,
                     stages=None, order: str = "qblk_last") -> tuple[jax.Array, AttentionStats]:
  """The Mosaic GPU peer of `kernels.blocksparse_triton.sparse_attention` (same arguments and outputs; GPU only:
  the CPU tests lower it for CUDA and run it in jax's GPU interpreter, benchmarks/gpu_checks.py on the device).
  Checks nothing beyond `unsupported`, which the caller asks first."""
  t, n, h = q.shape[-3:]
  if lse_ref is None:
    lse_ref = jnp.full(q.shape[:-3] + (n, t), jnp.nan, jnp.float32)
  stages = DEFAULT_STAGES if stages is None else stages
  stages = (stages, stages) if isinstance(stages, int) else tuple(int(x) for x in stages)
  run = functools.partial(
      _attention, q, k, v, block=mask.block_q, scale=numerics.resolve_scale(scale, h),
      softcap=None if softcap is None else float(softcap), window=None if window is None else int(window),
      stages=stages, order=order)
  if mask.indices.shape[-1] <= MAX_SMEM_SLOTS:
    out, mass, lse = run(mask.indices, mask.counts, lse_ref)
  else:
    out, mass, lse = _in_slot_chunks(run, mask.indices, mask.counts, lse_ref)
  return out, AttentionStats(mass=mass, lse=lse)


def _in_slot_chunks(run, indices, counts, lse_ref):
  """Past MAX_SMEM_SLOTS kept blocks a row's per-block log-sum-exps would not fit in shared memory: the kernel
  takes the kept blocks MAX_SMEM_SLOTS at a time, the outputs merge by their log-sum-exps, and each chunk runs
  again under the merged normaliser (or lse_ref where it has one) for its masses. Twice the work, for masks
  wider than any StreamConfig preset keeps (131)."""
  width = MAX_SMEM_SLOTS
  starts = range(0, indices.shape[-1], width)

  def chunk(c0, ref):
    idx = indices[..., c0:c0 + width]
    return run(idx, jnp.clip(counts - c0, 0, idx.shape[-1]).astype(counts.dtype), ref)

  nan = jnp.full_like(lse_ref, jnp.nan)
  outs, _, lses = zip(*(chunk(c0, nan) for c0 in starts))
  lse = functools.reduce(jnp.logaddexp, lses)  # [.., N, T]; -inf where no chunk sees a key
  weight = [jnp.where(lse == -jnp.inf, 0.0, jnp.exp(x - lse)) for x in lses]
  out = sum(o.astype(jnp.float32) * jnp.swapaxes(w, -1, -2)[..., None] for o, w in zip(outs, weight))
  ref = jnp.where(jnp.isnan(lse_ref), lse, lse_ref)
  mass = jnp.concatenate([chunk(c0, ref)[1] for c0 in starts], axis=-1)
  return out.astype(outs[0].dtype), mass, lse


@functools.partial(jax.jit, static_argnames=("block", "scale", "softcap", "window", "stages", "order"))
def _attention(q, k, v, indices, counts, lse_ref, *, block, scale, softcap, window, stages, order):
  import jax.experimental.pallas as pl  # noqa: PLC0415  (GPU-only module: imported where it runs)
  import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415

  k_stages, v_stages = stages
  per = TILE // block  # kept blocks per step: their keys side by side in one 64-key tile

  (q, k, v, indices, counts, lse_ref), batched = common.as_batched(q, k, v, indices, counts, lse_ref)
  b, t, n, h = q.shape
  s, kv, hv = v.shape[1], v.shape[2], v.shape[3]
  g = n // kv
  cap = indices.shape[-1]
  n_q, n_k = num_blocks(t, block), num_blocks(s, block)
  # A query block's 64-row tile starts at its first row; rows past the block are computed and dropped, so
  # the inputs run 64 - block rows past the last block.
  q = common.pad_axis(q, 1, n_q * block + TILE - block)
  k = common.pad_axis(k, 1, n_k * block)
  v = common.pad_axis(v, 1, n_k * block)
  lse_ref = common.pad_axis(lse_ref.astype(jnp.float32), 2, n_q * block + TILE - block)  # rows see no key
  width = -(-cap // per) * per  # slots, in whole steps
  big = width > MAX_SLOTS  # the masses go through shared memory (module docstring)
  parts = -(-width // TILE)  # 64-slot tiles of the big path
  slots = parts * TILE if big else mosaic_common.tma_length(width)  # mass row length
  table_len = mosaic_common.tma_length(width + 1)  # block ids, then the count last
  table = jnp.concatenate([
      indices.astype(jnp.int32), jnp.full(indices.shape[:-1] + (table_len - cap - 1,), -1, jnp.int32),
      counts.astype(jnp.int32)[..., None]], axis=-1)  # [B, N, nQ, table_len]: ids, then the count last
  offset = s - t  # queries are the last t of the s positions
  dtype = q.dtype
  log2e = 1.4426950408889634

  def kernel(q_ref, k_ref, v_ref, table_ref, ref_ref, o_ref, mass_ref, lse_out_ref, scratch):
    (q_smem, k_smem, v_smem, o_smem, tab_smem, ref_smem, row_smem, mass_smem, lse_smem, misc_bars, k_bars,
     v_bars) = scratch
    o_smem = q_smem if o_smem is None else o_smem  # the queries are dead once the loop is done
    bb, i, hq = lax.axis_index("batch"), lax.axis_index("qblk"), lax.axis_index("heads")
    kvh = lax.div(hq, jnp.int32(g))
    plgpu.copy_gmem_to_smem(table_ref.at[bb, hq, i], tab_smem, misc_bars.at[0])
    plgpu.copy_gmem_to_smem(q_ref.at[bb, pl.ds(i * block, TILE), hq], q_smem, misc_bars.at[1])
    plgpu.copy_gmem_to_smem(ref_ref.at[bb, hq, pl.ds(i * block, TILE)], ref_smem, misc_bars.at[2])
    plgpu.barrier_wait(misc_bars.at[0])
    count = tab_smem[table_len - 1]
    steps = lax.div(count + (per - 1), jnp.int32(per))

    def fetch(src, dst, bars, c, slot):  # step c's kept blocks (past the count: block 0, masked) into a tile
      for j in range(per):
        blk = jnp.maximum(tab_smem[c * per + j], 0)
        to = dst.at[slot] if per == 1 else dst.at[slot, pl.ds(j * block, block)]
        plgpu.copy_gmem_to_smem(src.at[bb, pl.ds(blk * block, block), kvh], to, bars.at[slot])

    fetch_k = functools.partial(fetch, k_ref, k_smem, k_bars)
    fetch_v = functools.partial(fetch, v_ref, v_smem, v_bars)
    for c0 in range(max(k_stages, v_stages)):
      if c0 < k_stages:
        pl.when(c0 < steps)(functools.partial(fetch_k, c0, c0))
      if c0 < v_stages:
        pl.when(c0 < steps)(functools.partial(fetch_v, c0, c0))
    plgpu.barrier_wait(misc_bars.at[1])

    wg = plgpu.Layout.WGMMA
    row = wg.reduce(1)  # one value per row of a wgmma tile
    rows = plgpu.broadcasted_iota(jnp.int32, (TILE, TILE), 0, layout=wg)
    cols = plgpu.broadcasted_iota(jnp.int32, (TILE, TILE), 1, layout=wg)
    slot_ids = None if big else plgpu.broadcasted_iota(jnp.int32, (TILE, slots), 1, layout=wg)
    part_of = None if per == 1 else lax.div(cols, jnp.int32(block))  # which of the step's blocks a key is

    def store_part(u, part):  # the big path's tile of 64 slots' per-row log-sum-exps, to shared memory
      lse_smem[part] = u
    q_row = i * block + rows
    q_pos = q_row + offset
    row_ok = (q_row < t) if per == 1 else (q_row < t) & (rows < block)

    def step(c, carry):
      acc, m_i, l_i, u = carry
      k_slot, v_slot = lax.rem(c, jnp.int32(k_stages)), lax.rem(c, jnp.int32(v_stages))
      ids = [tab_smem[c * per + j] for j in range(per)]
      plgpu.barrier_wait(k_bars.at[k_slot])

      x = mosaic_common.qk_logits(q_smem, k_smem.at[k_slot]) * scale
      # The logits are read back, so the QK product is done with this key buffer: refill it now, a
      # softmax and a PV product ahead of the value buffer's refill.
      pl.when(c + k_stages < steps)(functools.partial(fetch_k, c + k_stages, k_slot))
      if softcap is not None:
        x = jnp.tanh(x * (1.0 / softcap)) * softcap
      if per == 1:
        k_pos = ids[0] * block + cols
        visible = (k_pos <= q_pos) & row_ok
      else:  # each key's block id, and the slots past the count hidden
        blk = ids[0]
        for j in range(1, per):
          blk = jnp.where(part_of == j, ids[j], blk)
        k_pos = blk * block + (cols - part_of * block)
        visible = (k_pos <= q_pos) & row_ok & (c * per + part_of < count)
      if window is not None:
        visible = visible & (q_pos - k_pos < window)
      x = jnp.where(visible, x * log2e, -jnp.inf)  # base 2 from here on
      m_new = jnp.maximum(m_i, x.max(axis=1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that saw nothing yet
      corr = jnp.exp2(m_i - m_safe)
      p = jnp.exp2(x - lax.broadcast_in_dim(m_safe, x.shape, [0]))  # 0 where invisible
      row_sum = p.sum(axis=1)
      sums = [row_sum] if per == 1 else [jnp.where(part_of == j, p, 0.0).sum(axis=1) for j in range(per)]
      l_i = l_i * corr + row_sum
      acc = acc * lax.broadcast_in_dim(corr, acc.shape, [0])
      if big:  # each block's per-row log-sum-exp, base 2 (log2 of its sum relative to m, plus m), column c % 64
        col = lax.rem(c * per, jnp.int32(TILE))
        for j, sum_j in enumerate(sums):
          u = jnp.where(cols == col + j, lax.broadcast_in_dim(jnp.log2(sum_j) + m_safe, u.shape, [0]), u)
        full = (col + per == TILE)
        for part in range(parts):  # a full tile goes to shared memory (the last, partial one after the loop)
          pl.when(full & (lax.div(c * per, jnp.int32(TILE)) == part))(functools.partial(store_part, u, part))
      else:
        u = u * lax.broadcast_in_dim(corr, u.shape, [0])
        for j, sum_j in enumerate(sums):
          u = u + jnp.where(slot_ids == c * per + j, lax.broadcast_in_dim(sum_j, u.shape, [0]), 0.0)
      plgpu.barrier_wait(v_bars.at[v_slot])
      acc = mosaic_common.pv_accumulate(acc, p.astype(dtype), v_smem.at[v_slot])  # the buffer is free again
      pl.when(c + v_stages < steps)(functools.partial(fetch_v, c + v_stages, v_slot))
      return acc, m_new, l_i, u

    init = (plgpu.layout_cast(jnp.zeros((TILE, hv), jnp.float32), wg),
            plgpu.layout_cast(jnp.full((TILE,), -jnp.inf, jnp.float32), row),
            plgpu.layout_cast(jnp.zeros((TILE,), jnp.float32), row),
            plgpu.layout_cast(jnp.zeros((TILE, TILE if big else slots), jnp.float32), wg))
    acc, m_i, l_i, u = lax.fori_loop(0, steps, step, init)
    if big:
      written = steps * per
      last = lax.div(written - 1, jnp.int32(TILE))
      for part in range(parts):
        pl.when((count > 0) & (lax.rem(written, jnp.int32(TILE)) != 0) & (last == part))(
            functools.partial(store_part, u, part))

    seen = l_i > 0.0
    inv = jnp.where(seen, 1.0 / jnp.where(seen, l_i, 1.0), 0.0)
    o_smem[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
    m_safe = jnp.where(m_i == -jnp.inf, 0.0, m_i)
    ln2 = 0.6931471805599453
    lse = jnp.where(seen, (jnp.log(jnp.where(seen, l_i, 1.0)) + m_safe * ln2), -jnp.inf)
    row_smem[...] = lse
    plgpu.commit_smem()
    own = (lambda ref: ref) if per == 1 else (lambda ref: ref.at[pl.ds(0, block)])  # the block's rows
    plgpu.copy_smem_to_gmem(own(o_smem), o_ref.at[bb, pl.ds(i * block, block), hq])
    plgpu.copy_smem_to_gmem(row_smem, lse_out_ref.at[bb, hq, i])

    # Block mass: u / l (the kept softmax) or, with a reference normaliser, u exp(m - lse_ref) (clamped
    # at 1, as the other backends do); NaN reference rows use the kept one.
    plgpu.barrier_wait(misc_bars.at[2])
    ref = plgpu.load(ref_smem, (), layout=row)
    has_ref = ref == ref  # not NaN
    ref_ok = seen & (ref > NEG_INF)
    if big:
      # mass[c] = sum_r exp2(a[r, c] - n_r): n_r = max(ref, m) with a reference (to_ref's clamp below), the
      # row's own lse without, +inf where the row's factor is 0.
      own_lse = jnp.where(seen, m_safe + jnp.log2(jnp.where(seen, l_i, 1.0)), jnp.inf)
      norm = jnp.where(has_ref, jnp.where(ref_ok, jnp.maximum(jnp.where(ref_ok, ref, 0.0) * log2e, m_safe),
                                          jnp.inf), own_lse)
      norm = lax.broadcast_in_dim(norm, (TILE, TILE), [0])
      plgpu.commit_smem()  # the tiles were stored by every thread; read back in the same layout
      for part in range(parts):
        a = plgpu.load(lse_smem.at[part], (), layout=wg, optimized=False)
        p = jnp.where(cols + part * TILE < count, jnp.exp2(a - norm), 0.0)
        mass_smem[part] = p.sum(axis=0)
    else:
      to_ref = jnp.where(ref_ok, jnp.exp(jnp.minimum(m_safe * ln2 - jnp.where(ref_ok, ref, 0.0), 0.0)), 0.0)
      factor = jnp.where(has_ref, to_ref, inv)
      mass_smem[...] = (u * lax.broadcast_in_dim(factor, u.shape, [0])).sum(axis=0)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(mass_smem, mass_ref.at[bb, hq, i])
    plgpu.wait_smem_to_gmem(0)

  def entry(q_ref, k_ref, v_ref, table_ref, ref_ref, o_ref, mass_ref, lse_out_ref):
    tiled = mosaic_common.tiled_smem
    pl.run_scoped(
        lambda *scratch: kernel(q_ref, k_ref, v_ref, table_ref, ref_ref, o_ref, mass_ref, lse_out_ref,
                                scratch),
        tiled((TILE, h), dtype), tiled((k_stages, TILE, h), dtype), tiled((v_stages, TILE, hv), dtype),
        None if hv == h else tiled((TILE, hv), dtype),
        plgpu.SMEM((table_len,), jnp.int32), plgpu.SMEM((TILE,), jnp.float32),
        plgpu.SMEM((TILE,), jnp.float32),
        plgpu.SMEM((parts, TILE) if big else (slots,), jnp.float32),
        plgpu.SMEM((parts, TILE, TILE), jnp.float32) if big else None,
        plgpu.Barrier(num_barriers=3), plgpu.Barrier(num_arrivals=per, num_barriers=k_stages),
        plgpu.Barrier(num_arrivals=per, num_barriers=v_stages))

  sizes = dict(batch=b, qblk=n_q, heads=n)
  out, mass, lse = plgpu.kernel(
      entry,
      out_type=[jax.ShapeDtypeStruct((b, n_q * block, n, hv), dtype),
                jax.ShapeDtypeStruct((b, n, n_q) + ((parts, TILE) if big else (slots,)), jnp.float32),
                jax.ShapeDtypeStruct((b, n, n_q, TILE), jnp.float32)],
      grid=tuple(sizes[x] for x in GRID_ORDERS[order]), grid_names=GRID_ORDERS[order],
      compiler_params=plgpu.CompilerParams(approx_math=True),
      )(q, k, v, table, lse_ref)
  out = out[:, :t]
  mass = mass.reshape(b, n, n_q, slots)[..., :cap]
  lse = lse[..., :block].reshape(b, n, n_q * block)[..., :t]
  if not batched:
    out, mass, lse = out[0], mass[0], lse[0]
  return out, mass, lse
