"""Pallas (Triton) kernel of the true block mass rows of the ideal kept set: a private peer of the XLA
reference in `stream_jax/ideal.py` (`ideal_mask(..., backend="pallas")`), tested against it.

For a chunk of query blocks, one program per (query block, head, batch) computes the row
M[c] = sum_{i in block} sum_{s in c, visible} exp(logit[i, s] - lse[i]) for every key block c up to its
diagonal: the logits of a 64 x 64 tile live in registers only (no T x S, and no [rows, keys] chunk in HBM
as the XLA path writes), the row goes out in groups of GROUP key blocks (a GROUP-vector built in
registers, then one store), and groups past the diagonal are written as zeros. The caller selects the
kept set from the chunk's rows, so HBM holds [B, N, chunk, nK] floats at a time, O(T) per chunk.

The cost is one Q K^T over the causal blocks (no V, no online softmax state), about half of a causal
flash-attention pass.
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
from stream_jax.numerics import NEG_INF

if TYPE_CHECKING:
  from stream_jax.kernels.implementations import Call

# Key blocks per store of the output row.
GROUP = 16
LOG2E = 1.4426950408889634
# Launch settings, best of {4, 8} warps x {2, 3, 4} stages x {1, 2, 4} query blocks per program on an H200
# at 32k / 128k (8 heads, head dim 256, bf16; benchmarks/ideal_kernel.py: 88 ms at 128k against cuDNN
# attention's 129 ms). Four query blocks per program make a 256-row tile for the Q K^T product, at the price
# of the last block's diagonal group for the earlier ones.
DEFAULT_NUM_WARPS = 8
DEFAULT_NUM_STAGES = 3
DEFAULT_BLOCKS_PER_PROGRAM = 4


def unsupported(call: Call) -> Optional[str]:
  """Why the kernel cannot take a call (kernels.implementations.Call), or None."""
  if call.block_q < common.MIN_DOT or call.block_k < common.MIN_DOT:
    return (f"the Pallas block-mass kernel needs block_q, block_k >= {common.MIN_DOT}, got {call.block_q}, "
            f"{call.block_k}")
  if call.key_mask:
    return "the Pallas block-mass kernel takes no key_mask (interventions run on the XLA path)"
  return None


def mass_rows(q: jax.Array, k: jax.Array, lse: jax.Array, first_block, *, n_rows: int, block_q: int,
              block_k: int, q_len: int, k_len: int, scale: float, softcap: Optional[float],
              window: Optional[int], interpret: Optional[bool] = None, num_warps: Optional[int] = None,
              num_stages: Optional[int] = None, blocks_per_program: Optional[int] = None) -> jax.Array:
  """float32 [B, N, n_rows, nK]: the true mass rows of query blocks first_block .. first_block + n_rows - 1.

  q [B, T, N, H] and k [B, S, K, H] as the model has them (queries are the last T of S positions); lse
  float32 [B, N, T] the dense softmax's (-inf: the row gets no mass); first_block a traced int32 scalar
  (a chunk index of `lax.map`), n_rows static (a multiple of blocks_per_program). Rows past the last query
  block are zeros.
  """
  per = DEFAULT_BLOCKS_PER_PROGRAM if blocks_per_program is None else int(blocks_per_program)
  if n_rows % per:
    raise ValueError(f"n_rows={n_rows} must be a multiple of blocks_per_program={per}")
  b, t, n, h = q.shape
  s, kv = k.shape[1], k.shape[2]
  rows = n_rows * block_q
  hp = max(common.next_pow2(h), common.MIN_DOT)
  n_k = -(-s // block_k)
  n_groups = -(-n_k // GROUP)
  start = first_block * block_q
  # The chunk's query rows and their lse (zero / -inf past T), keys padded to whole groups.
  q_pad = common.pad_axis(common.pad_axis(q, 3, hp), 1, t + rows)
  q_c = lax.dynamic_slice_in_dim(q_pad, start, rows, 1)
  lse_pad = jnp.pad(lse.astype(jnp.float32), ((0, 0), (0, 0), (0, rows)), constant_values=NEG_INF)
  lse_c = lax.dynamic_slice_in_dim(lse_pad, start, rows, 2)
  k_p = common.pad_axis(common.pad_axis(k, 3, hp), 1, n_groups * GROUP * block_k)
  warps = DEFAULT_NUM_WARPS if num_warps is None else num_warps
  stages = DEFAULT_NUM_STAGES if num_stages is None else num_stages
  if jnp.dtype(q.dtype).itemsize >= 4 and num_stages is None:
    stages = 1  # f32 tiles are twice as large
  g = n // kv
  kernel = functools.partial(
      _kernel, per=per, block_q=block_q, block_k=block_k, q_len=t, k_len=k_len, n_groups=n_groups, scale=scale,
      softcap=softcap, window=window, precision=common.dot_precision(q.dtype))
  out = pl.pallas_call(
      kernel, grid=(n_rows // per, n, b),
      in_specs=[pl.BlockSpec((SQ, per * block_q, SQ, hp), lambda i, hq, bb: (bb, i, hq, 0)),
                pl.BlockSpec((SQ, n_groups * GROUP * block_k, SQ, hp), lambda i, hq, bb: (bb, 0, hq // g, 0)),
                pl.BlockSpec((SQ, SQ, per * block_q), lambda i, hq, bb: (bb, hq, i)),
                pl.BlockSpec((1,), lambda i, hq, bb: (0,))],
      out_specs=pl.BlockSpec((SQ, SQ, per, n_groups * GROUP), lambda i, hq, bb: (bb, hq, i, 0)),
      out_shape=jax.ShapeDtypeStruct((b, n, n_rows, n_groups * GROUP), jnp.float32),
      compiler_params=common.triton_params(warps, stages), interpret=common.resolve_interpret(interpret),
      name="stream_ideal_block_mass")(q_c, k_p, lse_c, jnp.reshape(first_block, (1,)).astype(jnp.int32))
  return out[..., :n_k]


def _kernel(q_ref, k_ref, lse_ref, first_ref, o_ref, *, per, block_q, block_k, q_len, k_len, n_groups, scale,
            softcap, window, precision):
  j0 = first_ref[0] + pl.program_id(0) * per  # this program's first query block
  rows = j0 * block_q + iota(per * block_q)
  q_pos = jnp.where(rows < q_len, rows + (k_len - q_len), -1)  # -1 sees nothing
  last = jnp.minimum((j0 + per) * block_q, q_len) - 1 + (k_len - q_len)
  diag_group = jnp.where((last >= 0) & (j0 * block_q < q_len), last // block_k // GROUP, -1)
  q = q_ref[...]
  lse = lse_ref[...]
  ok = lse > NEG_INF
  norm = jnp.where(ok, lse, 0.0)
  slots = iota(GROUP)
  which = iota(per * block_q) // block_q  # the query block of each row
  # Key groups every row of the program sees whole (causal, no window): their tiles need no mask. A row
  # that sees nothing gets a +inf normaliser there, so exp gives it 0; without a soft-cap the exponent is
  # taken base 2 with log2(e) folded into the scale and the normaliser (one multiply less per logit).
  first_pos = j0 * block_q + (k_len - q_len)
  free = 0 if window is not None else jnp.clip((first_pos + 1) // block_k // GROUP, 0, diag_group + 1)
  norm_free = jnp.where(ok, lse, jnp.inf)
  norm_free2 = norm_free * LOG2E

  def tile(blk, masked):
    kb = k_ref[pl.ds(blk * block_k, block_k), :]
    x = lax.dot_general(q, kb, (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32)
    if not masked:
      if softcap is None:
        return jnp.exp2(jnp.minimum(x * (scale * LOG2E) - norm_free2[:, None], 0.0))
      return jnp.exp(jnp.minimum(numerics.softcap(x * scale, softcap) - norm_free[:, None], 0.0))
    x = numerics.softcap(x * scale, softcap)
    k_pos = blk * block_k + iota(block_k)
    visible = (k_pos[None, :] <= q_pos[:, None]) & ok[:, None]
    if window is not None:
      visible &= q_pos[:, None] - k_pos[None, :] < window
    return jnp.where(visible, jnp.exp(jnp.minimum(x - norm[:, None], 0.0)), 0.0)

  # One loop over the key blocks of the free groups, one over the rest up to the diagonal group (so
  # Triton pipelines the key loads along the row); each group's masses collect in a GROUP-vector, stored
  # when the group ends.
  def body(blk, vecs, masked):
    c = lax.rem(blk, GROUP)
    row_sums = jnp.sum(tile(blk, masked), axis=1)  # [per * bq]
    vecs = tuple(jnp.where(slots == c, jnp.sum(jnp.where(which == r, row_sums, 0.0)),
                           jnp.where(c == 0, 0.0, v)) for r, v in enumerate(vecs))

    @pl.when(c == GROUP - 1)
    def _store():
      for r, v in enumerate(vecs):
        o_ref[r, pl.ds(blk + 1 - GROUP, GROUP)] = v

    return vecs

  zeros = tuple(jnp.zeros((GROUP,), jnp.float32) for _ in range(per))
  lax.fori_loop(0, free * GROUP, functools.partial(body, masked=False), zeros)
  lax.fori_loop(free * GROUP, (diag_group + 1) * GROUP, functools.partial(body, masked=True), zeros)

  def zero_body(gi, carry):
    for r in range(per):
      o_ref[r, pl.ds(gi * GROUP, GROUP)] = jnp.zeros((GROUP,), jnp.float32)
    return carry

  lax.fori_loop(diag_group + 1, n_groups, zero_body, None)
