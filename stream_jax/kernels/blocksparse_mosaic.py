"""Pallas Mosaic GPU (Hopper: TMA + wgmma) kernel of block-sparse attention with block-level attention mass:
the port of the Triton kernel in attention.py (same contract, same outputs), which `backend="pallas"`
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

Limits (the wrapper refuses anything else, so the caller can fall back to Triton): float16 / bfloat16,
block_q = 64, block_k = 64, head dims multiples of 64 up to 256, C <= MAX_SMEM_SLOTS.
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

BLOCK = 64  # rows of a wgmma tile per warpgroup; the kernel's block_q and block_k
MAX_SLOTS = 64  # kept blocks per query block whose [64, C] mass accumulator lives in registers
MAX_SMEM_SLOTS = 192  # beyond: per-block row log-sum-exps in shared memory ([C, 64] floats, 48 KiB at 192)
DEFAULT_STAGES = 2  # K/V ring depth (2 keeps two CTAs per SM at head dim 128)
# Launch grid orders: which CTAs run together decides what the L2 cache shares. "qblk_last" (the query
# blocks of one head side by side: they read the same kv head's sink, window and often top-k blocks) is
# 1.2-1.5x faster than "heads_last" at 32k+ with 4-16 kv heads (H100), equal with one kv head.
GRID_ORDERS = {"heads_last": ("batch", "qblk", "heads"), "qblk_last": ("heads", "batch", "qblk")}


def unsupported(call: Call) -> Optional[str]:
  """Why this kernel cannot take a call (kernels.implementations.Call), or None. Where it can, "pallas" and
  "auto" prefer it to Triton on Hopper: 1.13-1.28x Triton's speed on every Stream-mask shape measured on an
  H100 (benchmarks/RESULTS.md)."""
  h, hv = call.head_dim, call.head_dim_v
  if call.dtype not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
    return f"the Mosaic GPU attention kernel takes float16 / bfloat16 inputs, got {call.dtype.name}"
  if (call.block_q, call.block_k) != (BLOCK, BLOCK):
    return f"the Mosaic GPU attention kernel needs 64 x 64 blocks, got {call.block_q} x {call.block_k}"
  if h % 64 or hv % 64 or not 64 <= h <= 256 or not 64 <= hv <= 256:
    return f"the Mosaic GPU attention kernel needs head dims in 64, 128, 192, 256, got {h}, {hv}"
  if call.slots > MAX_SMEM_SLOTS:
    return f"the Mosaic GPU attention kernel keeps at most {MAX_SMEM_SLOTS} blocks per row, got {call.slots}"
  if call.key_mask or call.gate:
    return "the Pallas attention kernels take no key_mask or gate (interventions run on the XLA path)"
  return None


def sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: BlockMask, *,
                     scale: Optional[float] = None, softcap: Optional[float] = None,
                     window: Optional[int] = None, lse_ref: Optional[jax.Array] = None,
                     stages=None, order: str = "qblk_last") -> tuple[jax.Array, AttentionStats]:
  """The Mosaic GPU peer of `kernels.blocksparse_triton.sparse_attention` (same arguments and outputs; GPU only,
  no interpret mode: its tests run on the device, benchmarks/gpu_checks.py). Checks nothing beyond
  `unsupported`, which the caller asks first."""
  t, n, h = q.shape[-3:]
  if lse_ref is None:
    lse_ref = jnp.full(q.shape[:-3] + (n, t), jnp.nan, jnp.float32)
  stages = DEFAULT_STAGES if stages is None else stages
  stages = (stages, stages) if isinstance(stages, int) else tuple(int(x) for x in stages)
  out, mass, lse = _attention(
      q, k, v, mask.indices, mask.counts, lse_ref, scale=numerics.resolve_scale(scale, h),
      softcap=None if softcap is None else float(softcap), window=None if window is None else int(window),
      stages=stages, order=order)
  return out, AttentionStats(mass=mass, lse=lse)


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "window", "stages", "order"))
def _attention(q, k, v, indices, counts, lse_ref, *, scale, softcap, window, stages, order):
  import jax.experimental.pallas as pl  # noqa: PLC0415  (GPU-only module: imported where it runs)
  import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415

  k_stages, v_stages = stages

  (q, k, v, indices, counts, lse_ref), batched = common.as_batched(q, k, v, indices, counts, lse_ref)
  b, t, n, h = q.shape
  s, kv, hv = v.shape[1], v.shape[2], v.shape[3]
  g = n // kv
  cap = indices.shape[-1]
  n_q, n_k = num_blocks(t, BLOCK), num_blocks(s, BLOCK)
  q = common.pad_axis(q, 1, n_q * BLOCK)
  k = common.pad_axis(k, 1, n_k * BLOCK)
  v = common.pad_axis(v, 1, n_k * BLOCK)
  lse_ref = common.pad_axis(lse_ref.astype(jnp.float32), 2, n_q * BLOCK)  # padding rows see no key
  big = cap > MAX_SLOTS  # the masses go through shared memory (module docstring)
  parts = -(-cap // BLOCK)  # 64-slot tiles of the big path
  slots = parts * BLOCK if big else mosaic_common.tma_length(cap)  # mass row length
  table_len = mosaic_common.tma_length(cap + 1)  # block ids, then the count last
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
    plgpu.copy_gmem_to_smem(q_ref.at[bb, pl.ds(i * BLOCK, BLOCK), hq], q_smem, misc_bars.at[1])
    plgpu.copy_gmem_to_smem(ref_ref.at[bb, hq, pl.ds(i * BLOCK, BLOCK)], ref_smem, misc_bars.at[2])
    plgpu.barrier_wait(misc_bars.at[0])
    count = tab_smem[table_len - 1]

    def fetch(src, dst, bars, c, slot):
      blk = tab_smem[c]
      plgpu.copy_gmem_to_smem(src.at[bb, pl.ds(blk * BLOCK, BLOCK), kvh], dst.at[slot], bars.at[slot])

    fetch_k = functools.partial(fetch, k_ref, k_smem, k_bars)
    fetch_v = functools.partial(fetch, v_ref, v_smem, v_bars)
    for c0 in range(max(k_stages, v_stages)):
      if c0 < k_stages:
        pl.when(c0 < count)(functools.partial(fetch_k, c0, c0))
      if c0 < v_stages:
        pl.when(c0 < count)(functools.partial(fetch_v, c0, c0))
    plgpu.barrier_wait(misc_bars.at[1])

    wg = plgpu.Layout.WGMMA
    row = wg.reduce(1)  # one value per row of a wgmma tile
    rows = plgpu.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 0, layout=wg)
    cols = plgpu.broadcasted_iota(jnp.int32, (BLOCK, BLOCK), 1, layout=wg)
    slot_ids = None if big else plgpu.broadcasted_iota(jnp.int32, (BLOCK, slots), 1, layout=wg)

    def store_part(u, part):  # the big path's tile of 64 slots' per-row log-sum-exps, to shared memory
      lse_smem[part] = u
    q_row = i * BLOCK + rows
    q_pos = q_row + offset
    row_ok = q_row < t

    def step(c, carry):
      acc, m_i, l_i, u = carry
      k_slot, v_slot = lax.rem(c, jnp.int32(k_stages)), lax.rem(c, jnp.int32(v_stages))
      blk = tab_smem[c]
      plgpu.barrier_wait(k_bars.at[k_slot])

      x = mosaic_common.qk_logits(q_smem, k_smem.at[k_slot]) * scale
      # The logits are read back, so the QK product is done with this key buffer: refill it now, a
      # softmax and a PV product ahead of the value buffer's refill.
      pl.when(c + k_stages < count)(functools.partial(fetch_k, c + k_stages, k_slot))
      if softcap is not None:
        x = jnp.tanh(x * (1.0 / softcap)) * softcap
      k_pos = blk * BLOCK + cols
      visible = (k_pos <= q_pos) & row_ok
      if window is not None:
        visible = visible & (q_pos - k_pos < window)
      x = jnp.where(visible, x * log2e, -jnp.inf)  # base 2 from here on
      m_new = jnp.maximum(m_i, x.max(axis=1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that saw nothing yet
      corr = jnp.exp2(m_i - m_safe)
      p = jnp.exp2(x - lax.broadcast_in_dim(m_safe, x.shape, [0]))  # 0 where invisible
      row_sum = p.sum(axis=1)
      l_i = l_i * corr + row_sum
      acc = acc * lax.broadcast_in_dim(corr, acc.shape, [0])
      if big:  # the block's per-row log-sum-exp, base 2 (log2 of its sum relative to m, plus m), column c % 64
        col = lax.rem(c, jnp.int32(BLOCK))
        u = jnp.where(cols == col, lax.broadcast_in_dim(jnp.log2(row_sum) + m_safe, u.shape, [0]), u)
        for part in range(parts):  # a full tile goes to shared memory (the last, partial one after the loop)
          pl.when((col == BLOCK - 1) & (lax.div(c, jnp.int32(BLOCK)) == part))(
              functools.partial(store_part, u, part))
      else:
        u = (u * lax.broadcast_in_dim(corr, u.shape, [0])
             + jnp.where(slot_ids == c, lax.broadcast_in_dim(row_sum, u.shape, [0]), 0.0))
      plgpu.barrier_wait(v_bars.at[v_slot])

      def pv(acc_ref):
        plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[v_slot])

      acc = pl.run_state(pv)(plgpu.ACC.init(acc))  # reading it back waits: the buffer is free again
      pl.when(c + v_stages < count)(functools.partial(fetch_v, c + v_stages, v_slot))
      return acc, m_new, l_i, u

    init = (plgpu.layout_cast(jnp.zeros((BLOCK, hv), jnp.float32), wg),
            plgpu.layout_cast(jnp.full((BLOCK,), -jnp.inf, jnp.float32), row),
            plgpu.layout_cast(jnp.zeros((BLOCK,), jnp.float32), row),
            plgpu.layout_cast(jnp.zeros((BLOCK, BLOCK if big else slots), jnp.float32), wg))
    acc, m_i, l_i, u = lax.fori_loop(0, count, step, init)
    if big:
      last = lax.div(count - 1, jnp.int32(BLOCK))
      for part in range(parts):
        pl.when((count > 0) & (lax.rem(count, jnp.int32(BLOCK)) != 0) & (last == part))(
            functools.partial(store_part, u, part))

    seen = l_i > 0.0
    inv = jnp.where(seen, 1.0 / jnp.where(seen, l_i, 1.0), 0.0)
    o_smem[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
    m_safe = jnp.where(m_i == -jnp.inf, 0.0, m_i)
    ln2 = 0.6931471805599453
    lse = jnp.where(seen, (jnp.log(jnp.where(seen, l_i, 1.0)) + m_safe * ln2), -jnp.inf)
    row_smem[...] = lse
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[bb, pl.ds(i * BLOCK, BLOCK), hq])
    plgpu.copy_smem_to_gmem(row_smem, lse_out_ref.at[bb, hq, pl.ds(i * BLOCK, BLOCK)])

    # Block mass: u / l (the kept softmax) or, with a reference normaliser, u exp(m - lse_ref) (clamped
    # at 1, as the other backends do); NaN reference rows use the kept one.
    plgpu.barrier_wait(misc_bars.at[2])
    ref = plgpu.load(ref_smem, (), layout=row)
    has_ref = ref == ref  # not NaN
    ref_ok = seen & (ref > NEG_INF)
    if big:
      # mass[c] = sum_r exp2(a[r, c] - n_r): n_r = max(ref, m) with a reference (to_ref's clamp below), the
      # row's own lse without, +inf where the row's factor is 0.
      own = jnp.where(seen, m_safe + jnp.log2(jnp.where(seen, l_i, 1.0)), jnp.inf)
      norm = jnp.where(has_ref, jnp.where(ref_ok, jnp.maximum(jnp.where(ref_ok, ref, 0.0) * log2e, m_safe),
                                          jnp.inf), own)
      norm = lax.broadcast_in_dim(norm, (BLOCK, BLOCK), [0])
      plgpu.commit_smem()  # the tiles were stored by every thread; read back in the same layout
      for part in range(parts):
        a = plgpu.load(lse_smem.at[part], (), layout=wg, optimized=False)
        p = jnp.where(cols + part * BLOCK < count, jnp.exp2(a - norm), 0.0)
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
        tiled((BLOCK, h), dtype), tiled((k_stages, BLOCK, h), dtype), tiled((v_stages, BLOCK, hv), dtype),
        None if hv == h else tiled((BLOCK, hv), dtype),
        plgpu.SMEM((table_len,), jnp.int32), plgpu.SMEM((BLOCK,), jnp.float32),
        plgpu.SMEM((BLOCK,), jnp.float32),
        plgpu.SMEM((parts, BLOCK) if big else (slots,), jnp.float32),
        plgpu.SMEM((parts, BLOCK, BLOCK), jnp.float32) if big else None,
        plgpu.Barrier(num_barriers=3), plgpu.Barrier(num_barriers=k_stages),
        plgpu.Barrier(num_barriers=v_stages))

  sizes = dict(batch=b, qblk=n_q, heads=n)
  out, mass, lse = plgpu.kernel(
      entry,
      out_type=[jax.ShapeDtypeStruct((b, n_q * BLOCK, n, hv), dtype),
                jax.ShapeDtypeStruct((b, n, n_q) + ((parts, BLOCK) if big else (slots,)), jnp.float32),
                jax.ShapeDtypeStruct((b, n, n_q * BLOCK), jnp.float32)],
      grid=tuple(sizes[x] for x in GRID_ORDERS[order]), grid_names=GRID_ORDERS[order],
      compiler_params=plgpu.CompilerParams(approx_math=True),
      )(q, k, v, table, lse_ref)
  out, mass, lse = out[:, :t], mass.reshape(b, n, n_q, slots)[..., :cap], lse[..., :t]
  if not batched:
    out, mass, lse = out[0], mass[0], lse[0]
  return out, mass, lse
