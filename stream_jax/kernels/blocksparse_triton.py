"""Pallas (Triton) kernel of block-sparse attention with block-level attention mass: a private peer of the
XLA reference behind `stream_jax.sparse_attention(..., backend="pallas")`, same contract, tested against it.

Grid (query block, head, batch), last query block first. A program loads its query block once, then
loops over its kept key blocks only (the count bounds the loop, so -1 padding is never touched):
each block is loaded from HBM by id, logits are scaled, soft-capped, masked causally (and by the sliding
window), and folded into an fp32 online softmax (running max m, normaliser l, output accumulator).

Block mass without atomics, two ways chosen by the number of kept slots C:
- fused (every Stream mask; the rule is `fuses_mass`): besides the output accumulator the program keeps
  u[r, c] = sum over the keys of block c of exp(logit - m_r) for each query row r, rescaled with the
  same correction as the accumulator whenever m_r grows. At the end mass[c] = sum_r u[r, c] / l_r. u is
  block_q x C floats in registers next to the block_q x Hv output accumulator, and every step touches
  all of it: at C = 512 (every causal block at 32k) it spilled and the kernel ran 12-14x slower than
  flash attention (H100, benchmarks/mosaic.py).
- second pass (larger C x Hv, dense-density masks): the first kernel is plain flash attention (out, lse); a
  second kernel recomputes each kept block's logits and, the normaliser now known, adds the block's
  probability sum straight into mass[c] (a C-vector, O(C) per step). One more QK product, no spill.
Either way every output element is written by exactly one program (deterministic).
"""

from __future__ import annotations

import functools
from typing import Optional, TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from stream_jax import numerics
from stream_jax.kernels import common
from stream_jax.kernels.common import SQ, iota
from stream_jax.mask import BlockMask, num_blocks
from stream_jax.numerics import NEG_INF, AttentionStats

if TYPE_CHECKING:
  from stream_jax.kernels.implementations import Call

# Best of {4, 8} warps x {2, 3} stages on an H100 at T=32k, H=256, 64 x 64 blocks (benchmarks/kernels.py).
DEFAULT_NUM_WARPS = 4
DEFAULT_NUM_STAGES = 3
F32_NUM_STAGES = 1
# The fused mass accumulator is used while block_q x (C + Hv) fp32 values (both accumulators, padded to
# powers of two) stay within this. Measured on an H100 (fp16, 64 x 64 blocks, every causal block, fused /
# second-pass ms): C=128 Hv=128 0.58/0.92, Hv=256 0.98/1.36; C=256 Hv=128 2.53/2.83, Hv=256 6.97/5.34;
# C=512 Hv=128 29.1/6.4, Hv=256 53.1/11.1 (benchmarks/RESULTS.md). Stream masks (C = 32) always fuse.
FUSED_MASS_FLOATS = 64 * (128 + 256)


def unsupported(call: Call) -> Optional[str]:
  """Why the kernel cannot run a call (kernels.implementations.Call), or None: Triton dots need both block
  sizes >= 16, and the kernel takes no intervention's key_mask or gate."""
  if call.block_q < common.MIN_DOT or call.block_k < common.MIN_DOT:
    return (f"the Pallas attention kernel needs block_q, block_k >= {common.MIN_DOT}, got "
            f"{call.block_q}, {call.block_k}")
  if call.key_mask or call.gate:
    return "the Pallas attention kernels take no key_mask or gate (interventions run on the XLA path)"
  return None


def sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: BlockMask, *,
                     scale: Optional[float] = None, softcap: Optional[float] = None,
                     window: Optional[int] = None, interpret: Optional[bool] = None,
                     num_warps: Optional[int] = None,
                     num_stages: Optional[int] = None,
                     lse_ref: Optional[jax.Array] = None,
                     fused_mass: Optional[bool] = None) -> tuple[jax.Array, AttentionStats]:
  """Exact softmax attention over the token set a BlockMask keeps (Pallas kernel).

  A private peer of the XLA reference: `stream_jax.sparse_attention(..., backend="pallas")` validates the
  inputs (and `unsupported(mask)`) and calls this. Call it directly only to set launch parameters (tests,
  benchmarks); it checks nothing.

  Args:
    q: [T, N, H] or [B, T, N, H]; k: [S, K, H] / [B, S, K, H]; v: [S, K, Hv] / [B, S, K, Hv].
    mask: BlockMask over (T, S) with indices [..., N, nQ, C] (block sizes >= 16).
    scale: logit scale (default H ** -0.5); softcap: optional `c * tanh(x / c)` on logits.
    window: sliding window W (query sees keys with pos(q) - pos(k) < W), None = global causal.
    interpret: run the kernel in Pallas interpret mode; None = interpret unless the default
      backend is a GPU (so the CPU tests and backend='pallas' off the GPU run it interpreted).
    num_warps, num_stages: Triton launch parameters (None: tuned defaults for q's dtype).
    lse_ref: optional float32[..., N, T] reference log softmax denominators (see
      `stream_jax.sparse_attention`): mass becomes the reference's probability; NaN rows use the kept one.
    fused_mass: accumulate block mass in the attention kernel (True) or in a second pass (False);
      None: `fuses_mass`.

  Returns:
    out [..., T, N, Hv] in q's dtype, and AttentionStats (mass [..., N, nQ, C], lse [..., N, T]).
  """
  t, n, h = q.shape[-3:]
  if lse_ref is None:
    lse_ref = jnp.full(q.shape[:-3] + (n, t), jnp.nan, jnp.float32)
  num_warps, num_stages = launch_params(q.dtype, num_warps, num_stages)
  out, mass, lse = _attention(
      q, k, v, mask.indices, mask.counts, lse_ref, block_q=mask.block_q, block_k=mask.block_k,
      scale=numerics.resolve_scale(scale, h), softcap=None if softcap is None else float(softcap),
      window=None if window is None else int(window), interpret=common.resolve_interpret(interpret),
      num_warps=num_warps, num_stages=num_stages,
      fused_mass=(fuses_mass(mask.block_q, mask.indices.shape[-1], v.shape[-1]) if fused_mass is None
                  else bool(fused_mass)))
  return out, AttentionStats(mass=mass, lse=lse)


def fuses_mass(block_q: int, slots: int, head_dim_v: int) -> bool:
  """Whether the block mass is accumulated inside the attention kernel (else a second pass computes it):
  while both in-register accumulators, block_q x (C + Hv) padded, fit FUSED_MASS_FLOATS."""
  hvp = max(common.next_pow2(head_dim_v), common.MIN_DOT)
  return block_q * (common.next_pow2(slots) + hvp) <= FUSED_MASS_FLOATS


def launch_params(dtype, num_warps: Optional[int], num_stages: Optional[int]) -> tuple[int, int]:
  """Tuned (warps, stages); float32 tiles are twice as large, so they get one fewer pipeline stage to fit
  shared memory (3 stages of f32 64 x 256 key and value tiles exceed the H100's 227 KiB)."""
  f32 = jnp.dtype(dtype).itemsize >= 4
  warps = DEFAULT_NUM_WARPS if num_warps is None else num_warps
  stages = (F32_NUM_STAGES if f32 else DEFAULT_NUM_STAGES) if num_stages is None else num_stages
  return warps, stages


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "scale", "softcap", "window",
                                             "interpret", "num_warps", "num_stages",
                                             "fused_mass"))
def _attention(q, k, v, indices, counts, lse_ref, *, block_q, block_k, scale, softcap, window, interpret,
               num_warps, num_stages, fused_mass):
  (q, k, v, indices, counts, lse_ref), batched = common.as_batched(q, k, v, indices, counts, lse_ref)
  b, t, n, h = q.shape
  s, kv, hv = v.shape[1], v.shape[2], v.shape[3]
  g = n // kv
  cap = indices.shape[-1]
  n_q, n_k = num_blocks(t, block_q), num_blocks(s, block_k)
  hp = max(common.next_pow2(h), common.MIN_DOT)
  hvp = max(common.next_pow2(hv), common.MIN_DOT)
  q = common.pad_axis(common.pad_axis(q, 3, hp), 1, n_q * block_q)
  k = common.pad_axis(common.pad_axis(k, 3, hp), 1, n_k * block_k)
  v = common.pad_axis(common.pad_axis(v, 3, hvp), 1, n_k * block_k)

  # One int32 row per (head, query block): the kept ids, then the count in the last slot.
  table_len = common.next_pow2(cap + 1)
  table = jnp.concatenate([
      indices.astype(jnp.int32),
      jnp.full(indices.shape[:-1] + (table_len - cap - 1,), -1, jnp.int32),
      counts.astype(jnp.int32)[..., None]], axis=-1)
  mass_len = common.next_pow2(cap)
  lse_ref = common.pad_axis(lse_ref.astype(jnp.float32), 2, n_q * block_q)

  last = n_q - 1
  common_kw = dict(block_q=block_q, block_k=block_k, q_len=t, k_len=s, n_q=n_q, scale=scale,
                   softcap=softcap, window=window, table_len=table_len,
                   precision=common.dot_precision(q.dtype))
  table_spec = pl.BlockSpec((SQ, SQ, SQ, table_len), lambda i, hq, bb: (bb, hq, last - i, 0))
  q_spec = pl.BlockSpec((SQ, block_q, SQ, hp), lambda i, hq, bb: (bb, last - i, hq, 0))
  k_spec = pl.BlockSpec((SQ, n_k * block_k, SQ, hp), lambda i, hq, bb: (bb, 0, hq // g, 0))
  v_spec = pl.BlockSpec((SQ, n_k * block_k, SQ, hvp), lambda i, hq, bb: (bb, 0, hq // g, 0))
  row_spec = pl.BlockSpec((SQ, SQ, block_q), lambda i, hq, bb: (bb, hq, last - i))
  mass_spec = pl.BlockSpec((SQ, SQ, SQ, mass_len), lambda i, hq, bb: (bb, hq, last - i, 0))
  out_sds = jax.ShapeDtypeStruct((b, n_q * block_q, n, hvp), q.dtype)
  row_sds = jax.ShapeDtypeStruct((b, n, n_q * block_q), jnp.float32)
  mass_sds = jax.ShapeDtypeStruct((b, n, n_q, mass_len), jnp.float32)
  call = functools.partial(pl.pallas_call, grid=(n_q, n, b),
                           compiler_params=common.triton_params(num_warps, num_stages), interpret=interpret)
  out_spec = pl.BlockSpec((SQ, block_q, SQ, hvp), lambda i, hq, bb: (bb, last - i, hq, 0))
  if fused_mass:
    out, mass, lse = call(
        functools.partial(_kernel, mass_len=mass_len, **common_kw),
        in_specs=[table_spec, q_spec, k_spec, v_spec, row_spec],
        out_specs=[out_spec, mass_spec, row_spec], out_shape=[out_sds, mass_sds, row_sds],
        name="stream_sparse_attention")(table, q, k, v, lse_ref)
  else:
    out, lse = call(
        functools.partial(_kernel, mass_len=None, **common_kw),
        in_specs=[table_spec, q_spec, k_spec, v_spec],
        out_specs=[out_spec, row_spec], out_shape=[out_sds, row_sds],
        name="stream_sparse_attention")(table, q, k, v)
    # Normaliser per row: the reference where one is given (-inf: the row gets no mass), else the kept.
    norm = jnp.where(jnp.isnan(lse_ref), lse, lse_ref)
    mass = call(
        functools.partial(_mass_kernel, mass_len=mass_len, **common_kw),
        in_specs=[table_spec, q_spec, k_spec, row_spec], out_specs=mass_spec, out_shape=mass_sds,
        name="stream_sparse_attention_mass")(table, q, k, norm)
  out = out[:, :t, :, :hv]
  mass = mass[..., :cap]
  lse = lse[..., :t]
  if not batched:
    out, mass, lse = out[0], mass[0], lse[0]
  return out, mass, lse


def _kernel(table_ref, q_ref, k_ref, v_ref, *refs, block_q, block_k, q_len, k_len, n_q, scale, softcap,
            window, mass_len, table_len, precision):
  """Online-softmax attention over the kept blocks; with `mass_len`, also the fused block mass (refs:
  lse_ref in, then out, mass, lse); without, refs are out, lse."""
  if mass_len is None:
    o_ref, lse_ref = refs
  else:
    ref_ref, o_ref, mass_ref, lse_ref = refs
  q = q_ref[...]  # [bq, Hp]
  q_pos = _query_positions(block_q, q_len, k_len, n_q)
  count = table_ref[table_len - 1]
  slots = None if mass_len is None else iota(mass_len)

  def body(c, carry):
    acc, m, l, u = carry
    blk = table_ref[c]
    x = _block_logits(q, k_ref, blk, q_pos, block_k=block_k, scale=scale, softcap=softcap, window=window,
                      precision=precision)
    vb = v_ref[pl.ds(blk * block_k, block_k), :]
    m_new = jnp.maximum(m, jnp.max(x, axis=1))
    m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)  # rows that saw nothing yet
    corr = jnp.exp(m - m_safe)
    p = jnp.exp(x - m_safe[:, None])  # 0 where invisible
    row_sum = jnp.sum(p, axis=1)
    l = l * corr + row_sum
    pv = lax.dot_general(p.astype(vb.dtype), vb, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)
    acc = acc * corr[:, None] + pv
    if u is not None:
      u = u * corr[:, None] + jnp.where(slots[None, :] == c, row_sum[:, None], 0.0)
    return acc, m_new, l, u

  init = (jnp.zeros((block_q, o_ref.shape[-1]), jnp.float32),
          jnp.full((block_q,), NEG_INF, jnp.float32),
          jnp.zeros((block_q,), jnp.float32),
          None if mass_len is None else jnp.zeros((block_q, mass_len), jnp.float32))
  acc, m, l, u = lax.fori_loop(0, count, body, init)
  seen = l > 0
  inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
  o_ref[...] = (acc * inv[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, jnp.log(jnp.where(seen, l, 1.0)) + m, NEG_INF)
  if mass_len is not None:
    # Mass under a reference normaliser where one is given: u / l -> u * exp(m - lse_ref).
    ref = ref_ref[...]
    has_ref = ref == ref  # not NaN
    ref_ok = seen & (ref > NEG_INF)
    to_ref = jnp.where(ref_ok, jnp.exp(jnp.minimum(m - jnp.where(ref_ok, ref, 0.0), 0.0)), 0.0)
    mass_ref[...] = jnp.sum(u * jnp.where(has_ref, to_ref, inv)[:, None], axis=0)


def _mass_kernel(table_ref, q_ref, k_ref, norm_ref, mass_ref, *, block_q, block_k, q_len, k_len, n_q, scale,
                 softcap, window, mass_len, table_len, precision):
  """Block mass once the per-row normaliser is known: mass[c] = sum over the block's visible logits of
  exp(min(logit - norm, 0)), added into a C-vector (O(C) per step, no per-row state)."""
  q = q_ref[...]
  q_pos = _query_positions(block_q, q_len, k_len, n_q)
  count = table_ref[table_len - 1]
  norm = norm_ref[...]
  ok = norm > NEG_INF  # -inf: this row gets no mass (a reference that saw nothing, or nothing kept)
  norm = jnp.where(ok, norm, 0.0)
  slots = iota(mass_len)

  def body(c, mass):
    x = _block_logits(q, k_ref, table_ref[c], q_pos, block_k=block_k, scale=scale, softcap=softcap,
                      window=window, precision=precision)
    p = jnp.where(ok[:, None], jnp.exp(jnp.minimum(x - norm[:, None], 0.0)), 0.0)  # 0 where invisible
    return mass + jnp.where(slots == c, jnp.sum(jnp.sum(p, axis=1)), 0.0)

  mass_ref[...] = lax.fori_loop(0, count, body, jnp.zeros((mass_len,), jnp.float32))


def _query_positions(block_q, q_len, k_len, n_q):
  """Key-axis positions of this program's query rows (queries are the last q_len of k_len); -1 for
  padding rows, which see nothing."""
  rows = (n_q - 1 - pl.program_id(0)) * block_q + iota(block_q)
  return jnp.where(rows < q_len, rows + (k_len - q_len), -1)


def _block_logits(q, k_ref, blk, q_pos, *, block_k, scale, softcap, window, precision):
  """Scaled, soft-capped logits [bq, bk] of kept key block `blk`; NEG_INF where causality (or the sliding
  window) hides a key. Both kernels compute them identically, so the two passes agree bit for bit."""
  kb = k_ref[pl.ds(blk * block_k, block_k), :]
  x = numerics.softcap(lax.dot_general(q, kb, (((1,), (1,)), ((), ())), precision=precision,
                                       preferred_element_type=jnp.float32) * scale, softcap)
  k_pos = blk * block_k + iota(block_k)
  visible = k_pos[None, :] <= q_pos[:, None]
  if window is not None:
    visible &= q_pos[:, None] - k_pos[None, :] < window
  return jnp.where(visible, x, NEG_INF)
