"""Kept sets in standard formats: jax.experimental.sparse.BCOO, PyTorch FlexAttention block masks, dense
block matrices; and back to a BlockMask, to force it into a forward (`intervene.force_masks`).

Block semantics are the same everywhere: query block j holds query rows [j*block_q, (j+1)*block_q), key
block c holds key positions [c*block_k, (c+1)*block_k); queries are the last q_len of k_len positions. A
kept block is *partial* where causality (or a sliding window) cuts it, so the FlexAttention export lists
every kept block as a partial block (kv_num_blocks / kv_indices) with the causal mask_mod, never as a
"full" block. Exports are O(T) except the dense ones, which refuse large inputs naming their limit.
"""

from __future__ import annotations

from typing import Optional, TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse

from stream_jax.mask import DENSE_LIMIT, BlockMask, check_layout, from_candidates, num_blocks, query_positions

if TYPE_CHECKING:
  from jaxtyping import Array, Float, Int

__all__ = ["BLOCK_MATRIX_LIMIT", "from_bcoo", "from_block_matrix", "from_flex_blocks", "from_torch_block_mask",
           "to_bcoo", "to_block_matrix", "to_flex_blocks", "to_token_bcoo", "to_torch_block_mask"]

# Most query blocks x key blocks per head a dense block matrix may have (e.g. 1024 x 1024: 64k tokens in
# blocks of 64); longer inputs stay sparse (to_bcoo).
BLOCK_MATRIX_LIMIT = 1 << 20


def _values(mask: BlockMask, mass) -> jax.Array:
  if mass is None:
    return jnp.where(mask.indices >= 0, 1.0, 0.0).astype(jnp.float32)
  mass = jnp.asarray(mass)
  if mass.shape != mask.indices.shape:
    raise ValueError(f"mass must have the shape of mask.indices {tuple(mask.indices.shape)} ([..., N, nQ, C], "
                     f"e.g. a LayerTrace's mass), got {tuple(mass.shape)}")
  return jnp.where(mask.indices >= 0, mass, 0).astype(jnp.float32)


def to_bcoo(mask: BlockMask, mass: Optional[Float[Array, "*B N nQ C"]] = None) -> sparse.BCOO:
  """BCOO float32[..., N, nQ, nK]: the kept blocks with their mass (1.0 without mass).

  Every axis but the last is a BCOO batch axis with nse = C (the mask's own layout: O(T), no sorting);
  padding slots are stored at key index nK, which BCOO treats as out of bounds (padding).
  """
  n_k = mask.num_k_blocks
  ids = jnp.where(mask.indices >= 0, mask.indices, n_k).astype(jnp.int32)[..., None]
  return sparse.BCOO((_values(mask, mass), ids), shape=tuple(mask.indices.shape[:-1]) + (n_k,),
                     indices_sorted=True, unique_indices=True)


def _capacity(counts: np.ndarray, capacity: Optional[int]) -> int:
  most = int(counts.max()) if counts.size else 0
  if capacity is None:
    return max(most, 1)
  if not isinstance(capacity, (int, np.integer)) or capacity < max(most, 1):
    raise ValueError(f"capacity must be an int >= the most blocks any query block keeps ({max(most, 1)}), "
                     f"got {capacity!r}")
  return int(capacity)


def _from_ids(ids: np.ndarray, valid: np.ndarray, *, block_q, block_k, q_len, k_len, capacity) -> BlockMask:
  """BlockMask from per-row candidate ids [..., N, nQ, W] (any order, duplicates allowed)."""
  m = from_candidates(jnp.asarray(ids, jnp.int32), jnp.asarray(valid), block_q=block_q, block_k=block_k,
                      q_len=q_len, k_len=k_len)
  counts = np.asarray(m.counts)
  cap = _capacity(counts, capacity)
  idx = np.asarray(m.indices)
  if cap <= idx.shape[-1]:
    idx = idx[..., :cap]
  else:
    idx = np.concatenate([idx, np.full(idx.shape[:-1] + (cap - idx.shape[-1],), -1, np.int32)], -1)
  return BlockMask(jnp.asarray(idx), jnp.asarray(counts), block_q, block_k, q_len, k_len, None)


def _check_block_shape(name: str, shape, n_q: int, n_k: int, block_q, block_k, q_len, k_len):
  if len(shape) < 3 or tuple(shape[-2:]) != (n_q, n_k):
    raise ValueError(f"{name} must have shape [..., N, nQ, nK] = [..., N, {n_q}, {n_k}] for q_len={q_len}, "
                     f"k_len={k_len} in blocks of {block_q} x {block_k}, got {tuple(shape)}")


def from_bcoo(matrix: sparse.BCOO, *, block_q: int, block_k: int, q_len: int, k_len: int,
              capacity: Optional[int] = None) -> BlockMask:
  """BlockMask from a BCOO [..., N, nQ, nK] (any layout): its stored in-bounds entries are the kept blocks
  (explicit zeros included: a kept block may hold no mass). capacity: C of the result (default: the most
  blocks any query block keeps)."""
  if not isinstance(matrix, sparse.BCOO):
    raise TypeError(f"matrix must be a jax.experimental.sparse.BCOO, got {type(matrix).__name__}")
  check_layout(block_q, block_k, q_len, k_len)
  n_q, n_k = num_blocks(q_len, block_q), num_blocks(k_len, block_k)
  _check_block_shape("matrix", matrix.shape, n_q, n_k, block_q, block_k, q_len, k_len)
  if matrix.n_dense:
    raise ValueError(f"matrix must have no dense axes (n_dense=0), got n_dense={matrix.n_dense}")
  # Flat COO coordinates [nse, ndim] (fewer batch axes is always an efficient layout change); entries out
  # of bounds are BCOO padding.
  coords = np.asarray(sparse.bcoo_update_layout(matrix, n_batch=0).indices).reshape(-1, matrix.ndim)
  coords = coords[((coords >= 0) & (coords < np.asarray(matrix.shape))).all(-1)]
  lead = matrix.shape[:-1]
  rows = np.ravel_multi_index(tuple(coords[:, :-1].T), lead) if coords.size else np.zeros(0, np.int64)
  pairs = np.unique(np.stack([rows, coords[:, -1]], -1), axis=0) if coords.size else np.zeros((0, 2), np.int64)
  counts = np.bincount(pairs[:, 0], minlength=int(np.prod(lead)))
  slot = np.arange(len(pairs)) - np.concatenate([[0], np.cumsum(counts)[:-1]])[pairs[:, 0]]
  ids = np.full((int(np.prod(lead)), max(int(counts.max(initial=0)), 1)), -1, np.int64)
  ids[pairs[:, 0], slot] = pairs[:, 1]
  ids = ids.reshape(lead + (-1,))
  return _from_ids(ids, ids >= 0, block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len,
                   capacity=capacity)


def to_token_bcoo(mask: BlockMask, window: Optional[int] = None) -> sparse.BCOO:
  """BCOO float32[..., N, T, S] of the token pairs the mask keeps (1.0), the token rule applied (causal,
  optional sliding window W). nse = nQ x C x block_q x block_k per head: small inputs only (refused above
  DENSE_LIMIT stored entries per head)."""
  nse = mask.num_q_blocks * mask.capacity * mask.block_q * mask.block_k
  if nse > DENSE_LIMIT:
    raise ValueError(f"to_token_bcoo stores nQ x C x block_q x block_k = {nse} entries per head, above the "
                     f"limit {DENSE_LIMIT}; use to_bcoo (block level) for long inputs")
  pos = query_positions(mask.q_len, mask.k_len, mask.block_q)  # [nQ, bq], -1 padding
  keys = mask.indices[..., None] * mask.block_k + jnp.arange(mask.block_k, dtype=jnp.int32)  # [.., nQ, C, bk]
  rows = jnp.arange(mask.num_q_blocks * mask.block_q, dtype=jnp.int32).reshape(pos.shape)  # [nQ, bq]
  q_pos = pos[:, :, None, None]  # [nQ, bq, 1, 1]
  k = keys[..., :, None, :, :]  # [..., nQ, 1, C, bk]
  ok = (mask.indices[..., :, None, :, None] >= 0) & (q_pos >= 0) & (k <= q_pos) & (k < mask.k_len)
  if window is not None:
    ok &= q_pos - k < window
  shape = ok.shape
  r = jnp.broadcast_to(rows[:, :, None, None], shape)
  k = jnp.broadcast_to(k, shape)
  lead = shape[:-4]
  r = jnp.where(ok, r, mask.q_len).reshape(lead + (-1,))
  k = jnp.where(ok, k, mask.k_len).reshape(lead + (-1,))
  data = ok.astype(jnp.float32).reshape(lead + (-1,))
  return sparse.BCOO((data, jnp.stack([r, k], -1)), shape=lead + (mask.q_len, mask.k_len))


def to_flex_blocks(mask: BlockMask) -> dict:
  """FlexAttention's block-mask arrays (numpy): kv_num_blocks int32[B, N, nQ], kv_indices int32[B, N, nQ, C]
  (the first kv_num_blocks entries of a row are its kept blocks, ascending; padding 0), block_size
  (block_q, block_k) = FlexAttention's BLOCK_SIZE (Q, KV), seq_lengths (q_len, k_len). Every kept block is
  a partial block: pair it with the causal mask_mod (`to_torch_block_mask` does). A mask without a batch
  axis gets B = 1. torch's `BlockMask.from_kv_blocks` reads the width of kv_indices as the number of key
  blocks, so pad it to nK columns before handing it over (`to_torch_block_mask` does; O(nQ x nK), torch's
  own layout)."""
  idx, counts = np.asarray(mask.indices), np.asarray(mask.counts)
  if idx.ndim == 3:
    idx, counts = idx[None], counts[None]
  if idx.ndim != 4:
    raise ValueError(f"mask.indices must be [N, nQ, C] or [B, N, nQ, C] for FlexAttention, got {idx.shape}")
  return dict(kv_num_blocks=counts.astype(np.int32), kv_indices=np.maximum(idx, 0).astype(np.int32),
              block_size=(mask.block_q, mask.block_k), seq_lengths=(mask.q_len, mask.k_len))


def _numpy(x, name):
  if x is None:
    return None
  if hasattr(x, "detach"):  # a torch tensor
    x = x.detach().cpu().numpy()
  x = np.asarray(x)
  if not np.issubdtype(x.dtype, np.integer):
    raise ValueError(f"{name} must hold integers, got dtype {x.dtype}")
  return x


def from_flex_blocks(kv_num_blocks, kv_indices, *, block_size, q_len: int, k_len: int,
                     full_kv_num_blocks=None, full_kv_indices=None,
                     capacity: Optional[int] = None) -> BlockMask:
  """BlockMask [B, N, nQ, C] from FlexAttention block-mask arrays (numpy or torch): kv_num_blocks [B, N, nQ],
  kv_indices [B, N, nQ, W]; full blocks (full_kv_*) join the kept set (a full block is a kept block whose
  mask_mod is all True). block_size: FlexAttention's BLOCK_SIZE, an int or (Q, KV)."""
  bq, bk = (block_size, block_size) if np.isscalar(block_size) else tuple(int(b) for b in block_size)
  check_layout(bq, bk, q_len, k_len)
  n_q, n_k = num_blocks(q_len, bq), num_blocks(k_len, bk)
  parts = [("kv", kv_num_blocks, kv_indices)]
  if (full_kv_num_blocks is None) != (full_kv_indices is None):
    raise ValueError("pass both full_kv_num_blocks and full_kv_indices, or neither")
  if full_kv_num_blocks is not None:
    parts.append(("full_kv", full_kv_num_blocks, full_kv_indices))
  ids, valid = [], []
  for name, num, idx in parts:
    num, idx = _numpy(num, f"{name}_num_blocks"), _numpy(idx, f"{name}_indices")
    if idx.ndim != 4 or idx.shape[2] != n_q or num.shape != idx.shape[:3]:
      raise ValueError(f"{name}_indices must be [B, N, nQ, W] with nQ = {n_q} (q_len={q_len} in blocks of {bq}) "
                       f"and {name}_num_blocks [B, N, nQ], got {idx.shape} and {num.shape}")
    if (num < 0).any() or (num > idx.shape[-1]).any():
      raise ValueError(f"{name}_num_blocks must be in [0, {idx.shape[-1]}] (the width of {name}_indices)")
    ok = np.arange(idx.shape[-1]) < num[..., None]
    bad = idx[ok & ((idx < 0) | (idx >= n_k))]
    if bad.size:
      raise ValueError(f"{name}_indices has block ids {sorted(set(bad.tolist()))[:5]} outside [0, {n_k}) "
                       f"(k_len={k_len} in blocks of {bk})")
    ids.append(idx)
    valid.append(ok)
  return _from_ids(np.concatenate(ids, -1), np.concatenate(valid, -1), block_q=bq, block_k=bk, q_len=q_len,
                   k_len=k_len, capacity=capacity)


def causal_mask_mod(q_len: int, k_len: int, window: Optional[int] = None):
  """FlexAttention mask_mod of the token rule: query row q (absolute position q + k_len - q_len) sees key
  kv iff kv <= its position (and position - kv < window)."""
  offset = k_len - q_len

  def mask_mod(b, h, q_idx, kv_idx):  # pylint: disable=unused-argument
    pos = q_idx + offset
    ok = kv_idx <= pos
    return ok if window is None else ok & (pos - kv_idx < window)

  return mask_mod


def to_torch_block_mask(mask: BlockMask, window: Optional[int] = None, device: str = "cpu"):
  """A torch FlexAttention BlockMask of the kept set: `BlockMask.from_kv_blocks` on `to_flex_blocks`'s
  arrays (partial blocks only) with the causal (sliding-window) mask_mod, so `flex_attention(q, k, v,
  block_mask=...)` attends like `sparse_attention(..., mask, window=window)`. The mask_mod also looks the
  block up in the kept set: torch's eager (uncompiled) flex_attention applies only the mask_mod and ignores
  the block lists (torch 2.13 on CPU), and with the lookup both paths give the same attention. The lookup
  is the dense block matrix (torch's own O(nQ x nK) layout; refused above BLOCK_MATRIX_LIMIT). Needs torch."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("to_torch_block_mask needs PyTorch with torch.nn.attention.flex_attention "
                      "(pip install torch); to_flex_blocks gives the same arrays without it") from e
  arrays = to_flex_blocks(mask)
  idx = arrays["kv_indices"]
  width = max(idx.shape[-1], mask.num_k_blocks)
  arrays["kv_indices"] = np.pad(idx, [(0, 0)] * 3 + [(0, width - idx.shape[-1])])
  kept = np.asarray(to_block_matrix(mask))
  kept = torch.as_tensor(kept[None] if kept.ndim == 3 else kept, device=device)  # [B, N, nQ, nK]
  causal = causal_mask_mod(mask.q_len, mask.k_len, window)
  bq, bk = mask.block_q, mask.block_k

  def mask_mod(b, h, q_idx, kv_idx):
    return causal(b, h, q_idx, kv_idx) & kept[b, h, q_idx // bq, kv_idx // bk]

  t = lambda x: torch.as_tensor(x, dtype=torch.int32, device=device)  # noqa: E731
  return TorchBlockMask.from_kv_blocks(t(arrays["kv_num_blocks"]), t(arrays["kv_indices"]),
                                       BLOCK_SIZE=arrays["block_size"], mask_mod=mask_mod,
                                       seq_lengths=arrays["seq_lengths"])


def from_torch_block_mask(block_mask, capacity: Optional[int] = None) -> BlockMask:
  """BlockMask from a torch FlexAttention BlockMask (partial and full blocks both kept; its mask_mod is not
  read: the token rule is the causal one of the forward it is forced into)."""
  q_len, k_len = (int(x) for x in block_mask.seq_lengths)
  return from_flex_blocks(block_mask.kv_num_blocks, block_mask.kv_indices, block_size=block_mask.BLOCK_SIZE,
                          q_len=q_len, k_len=k_len, full_kv_num_blocks=block_mask.full_kv_num_blocks,
                          full_kv_indices=block_mask.full_kv_indices, capacity=capacity)


def to_block_matrix(mask: BlockMask, mass: Optional[Float[Array, "*B N nQ C"]] = None) -> jax.Array:
  """Dense block matrix [..., N, nQ, nK]: bool kept blocks (mass None: lossless), or float32 mass at the
  kept blocks and 0 elsewhere (a kept block with zero mass then reads as not kept). Small inputs only:
  refused above BLOCK_MATRIX_LIMIT query blocks x key blocks per head."""
  n_q, n_k = mask.num_q_blocks, mask.num_k_blocks
  if n_q * n_k > BLOCK_MATRIX_LIMIT:
    raise ValueError(f"to_block_matrix: nQ x nK = {n_q} x {n_k} blocks per head is above BLOCK_MATRIX_LIMIT = "
                     f"{BLOCK_MATRIX_LIMIT}; use to_bcoo for long inputs (or larger blocks)")
  hit = mask.indices[..., None] == jnp.arange(n_k, dtype=jnp.int32)  # [..., N, nQ, C, nK]
  if mass is None:
    return hit.any(-2)
  return jnp.einsum("...ck,...c->...k", hit.astype(jnp.float32), _values(mask, mass))


def from_block_matrix(matrix: Int[Array, "*B N nQ nK"], *, block_q: int, block_k: int, q_len: int,
                      k_len: int, capacity: Optional[int] = None) -> BlockMask:
  """BlockMask from a dense block matrix [..., N, nQ, nK] (bool or numbers: nonzero = kept; numpy, jax or
  torch). capacity: C of the result (default: the most blocks any query block keeps)."""
  check_layout(block_q, block_k, q_len, k_len)
  if hasattr(matrix, "detach"):
    matrix = matrix.detach().cpu().numpy()
  matrix = np.asarray(matrix)
  n_q, n_k = num_blocks(q_len, block_q), num_blocks(k_len, block_k)
  _check_block_shape("matrix", matrix.shape, n_q, n_k, block_q, block_k, q_len, k_len)
  if n_q * n_k > BLOCK_MATRIX_LIMIT:
    raise ValueError(f"from_block_matrix: nQ x nK = {n_q} x {n_k} is above BLOCK_MATRIX_LIMIT = "
                     f"{BLOCK_MATRIX_LIMIT}; use from_bcoo or from_flex_blocks for long inputs")
  kept = matrix != 0
  ids = np.broadcast_to(np.arange(n_k, dtype=np.int32), kept.shape)
  return _from_ids(ids, kept, block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len, capacity=capacity)
