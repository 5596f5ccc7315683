"""BlockMask: which key blocks each query block attends to, per head.

The mask is O(T) (nQ x C block ids per head), never T x T. Queries are the last `q_len` of `k_len`
positions: query row i sits at absolute position i + k_len - q_len. Token rule: query i sees key s iff
block(s) is listed for block(i), s <= pos(i) and, with a sliding window W, pos(i) - s < W.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from stream_jax.config import StreamConfig

# Above this many query x key positions `to_dense` refuses: the point of the library is not to build them.
DENSE_LIMIT = 1 << 26


def num_blocks(length: int, block: int) -> int:
  return -(-length // block)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMask:
  """Kept key blocks per (head, query block).

  Attributes:
    indices: int32[..., N, nQ, C] kept key-block ids, ascending, -1 padded at the end.
    counts: int32[..., N, nQ] number of valid entries of `indices`.
    block_q, block_k, q_len, k_len: static metadata (pytree aux data, so jit-friendly).
    config: the StreamConfig that estimated it (None for constructed masks).
  """

  indices: jax.Array
  counts: jax.Array
  block_q: int = dataclasses.field(metadata=dict(static=True))
  block_k: int = dataclasses.field(metadata=dict(static=True))
  q_len: int = dataclasses.field(metadata=dict(static=True))
  k_len: int = dataclasses.field(metadata=dict(static=True))
  config: Optional[StreamConfig] = dataclasses.field(default=None, metadata=dict(static=True))

  @property
  def num_q_blocks(self) -> int:
    return num_blocks(self.q_len, self.block_q)

  @property
  def num_k_blocks(self) -> int:
    return num_blocks(self.k_len, self.block_k)

  @property
  def capacity(self) -> int:
    return self.indices.shape[-1]

  @property
  def offset(self) -> int:
    """Absolute position of query row 0."""
    return self.k_len - self.q_len

  def __repr__(self):
    return (f"BlockMask(indices={getattr(self.indices, 'shape', None)}, block_q={self.block_q}, "
            f"block_k={self.block_k}, q_len={self.q_len}, k_len={self.k_len}, config={self.config})")


def check_layout(block_q: int, block_k: int, q_len: int, k_len: int):
  for name, value in (("block_q", block_q), ("block_k", block_k)):
    if not isinstance(value, (int, np.integer)) or value < 1 or value & (value - 1):
      raise ValueError(f"{name} must be a positive power of two, got {value!r}")
  if q_len < 1:
    raise ValueError(f"q_len must be >= 1, got {q_len}")
  if k_len < q_len:
    raise ValueError(f"k_len must be >= q_len (queries are the last q_len positions), got "
                     f"q_len={q_len}, k_len={k_len}")


def query_positions(q_len: int, k_len: int, block_q: int) -> jax.Array:
  """int32[nQ, block_q] absolute positions of query rows; -1 marks padding rows."""
  n_q = num_blocks(q_len, block_q)
  rows = jnp.arange(n_q * block_q, dtype=jnp.int32)
  return jnp.where(rows < q_len, rows + (k_len - q_len), -1).reshape(n_q, block_q)


def diagonal_blocks(q_len: int, k_len: int, block_q: int, block_k: int) -> jax.Array:
  """int32[nQ] the key block holding each query block's last valid position."""
  n_q = num_blocks(q_len, block_q)
  last = jnp.minimum((jnp.arange(n_q, dtype=jnp.int32) + 1) * block_q, q_len) - 1
  return (last + (k_len - q_len)) // block_k


def _sorted_unique(candidates: jax.Array, valid: jax.Array, sentinel: int):
  """Sort the valid candidates ascending along the last axis, drop duplicates, pad with -1."""
  keys = jnp.sort(jnp.where(valid, candidates, sentinel), axis=-1)
  dup = jnp.concatenate([jnp.zeros_like(keys[..., :1], bool), keys[..., 1:] == keys[..., :-1]], -1)
  keys = jnp.sort(jnp.where(dup, sentinel, keys), axis=-1)
  ok = keys < sentinel
  return jnp.where(ok, keys, -1).astype(jnp.int32), ok.sum(-1).astype(jnp.int32)


def from_candidates(candidates: jax.Array, valid: jax.Array, *, block_q: int, block_k: int,
                    q_len: int, k_len: int, config: Optional[StreamConfig] = None) -> BlockMask:
  """BlockMask from unsorted, possibly duplicated candidate block ids `[..., N, nQ, C]`."""
  indices, counts = _sorted_unique(candidates, valid, num_blocks(k_len, block_k))
  return BlockMask(indices, counts, block_q, block_k, q_len, k_len, config)


def band_capacity(block_q: int, block_k: int, window: int) -> int:
  """Key blocks a query block's W-key window can touch (before clipping to the grid): the capacity of
  `window_mask`'s band."""
  return (block_q + window - 2) // block_k + 2


def window_mask(num_heads: int, q_len: int, k_len: int, *, block_q: int, block_k: int,
                window: Optional[int] = None) -> BlockMask:
  """The exact block cover of causal (optionally sliding-window) attention.

  With `window=None` this keeps every causally visible block (O(nQ x nK): for tests and short inputs);
  with a window W it keeps the O(W / block_k) blocks that W keys span, so exact local attention costs
  O(T x W) through `sparse_attention(..., window=W)`.
  """
  check_layout(block_q, block_k, q_len, k_len)
  n_q, n_k = num_blocks(q_len, block_q), num_blocks(k_len, block_k)
  diag = diagonal_blocks(q_len, k_len, block_q, block_k)
  first_pos = jnp.arange(n_q, dtype=jnp.int32) * block_q + (k_len - q_len)
  if window is None:
    cap = n_k
    lo = jnp.zeros_like(diag)
  else:
    if window < 1:
      raise ValueError(f"window must be >= 1 (keys including the query itself), got {window}")
    lo = jnp.maximum(first_pos - window + 1, 0) // block_k
    cap = min(n_k, band_capacity(block_q, block_k, window))
  ids = lo[:, None] + jnp.arange(cap, dtype=jnp.int32)[None, :]
  valid = ids <= diag[:, None]
  indices = jnp.where(valid, ids, -1).astype(jnp.int32)
  counts = valid.sum(-1).astype(jnp.int32)
  indices = jnp.broadcast_to(indices, (num_heads,) + indices.shape)
  counts = jnp.broadcast_to(counts, (num_heads,) + counts.shape)
  return BlockMask(indices, counts, block_q, block_k, q_len, k_len, None)


def causal_interactions(q_len: int, k_len: int, window: Optional[int] = None) -> int:
  """Number of (query, key) token pairs that causal (sliding-window) attention allows."""
  pos = np.arange(k_len - q_len, k_len, dtype=np.int64)
  seen = pos + 1 if window is None else np.minimum(pos + 1, window)
  return int(seen.sum())


def kept_interactions(mask: BlockMask, window: Optional[int] = None) -> jax.Array:
  """int[..., N] (query, key) token pairs the mask keeps, with the causal (and window) rule applied.

  O(T x C) work: per query row and kept block, the number of visible keys is an interval length.
  """
  pos = query_positions(mask.q_len, mask.k_len, mask.block_q)  # [nQ, bq]
  start = mask.indices * mask.block_k  # [..., N, nQ, C]
  end = jnp.minimum(start + mask.block_k, mask.k_len)  # exclusive
  hi = jnp.minimum(end[..., None, :], pos[:, :, None] + 1)  # [..., N, nQ, bq, C]
  lo = start[..., None, :]
  if window is not None:
    lo = jnp.maximum(lo, pos[:, :, None] - window + 1)
  n = jnp.maximum(hi - lo, 0)
  n = jnp.where((mask.indices[..., None, :] >= 0) & (pos[:, :, None] >= 0), n, 0)
  return n.astype(jnp.float32).sum((-3, -2, -1))


def kept_fraction(mask: BlockMask, window: Optional[int] = None) -> jax.Array:
  """float32[..., N] kept token interactions / causally allowed ones (1.0 = dense)."""
  total = causal_interactions(mask.q_len, mask.k_len, window)  # above 2**31 from T = 65,536 on
  return kept_interactions(mask, window) / float(total)


def block_density(mask: BlockMask) -> jax.Array:
  """float32[..., N] kept blocks / causally visible blocks."""
  diag = diagonal_blocks(mask.q_len, mask.k_len, mask.block_q, mask.block_k)
  visible = (diag + 1).sum()
  return mask.counts.sum(-1) / visible


def to_block_dense(mask: BlockMask) -> jax.Array:
  """bool[..., N, nQ, nK]: block-level picture of the mask (for plots and tests)."""
  n_k = mask.num_k_blocks
  if mask.num_q_blocks * n_k > DENSE_LIMIT:
    raise ValueError(f"to_block_dense: nQ x nK = {mask.num_q_blocks} x {n_k} is above the limit "
                     f"{DENSE_LIMIT}; use the sparse indices instead")
  hit = mask.indices[..., None] == jnp.arange(n_k, dtype=jnp.int32)
  return hit.any(-2)


def to_dense(mask: BlockMask, window: Optional[int] = None) -> jax.Array:
  """bool[..., N, T, S]: the token-level mask. Only for small inputs (tests, toy plots)."""
  if mask.q_len * mask.k_len > DENSE_LIMIT:
    raise ValueError(f"to_dense: q_len x k_len = {mask.q_len} x {mask.k_len} is above the limit "
                     f"{DENSE_LIMIT} positions; the point of a BlockMask is not to build T x S")
  blocks = to_block_dense(mask)  # [..., N, nQ, nK]
  rows = jnp.arange(mask.q_len) // mask.block_q
  cols = jnp.arange(mask.k_len) // mask.block_k
  token = blocks[..., rows, :][..., cols]
  pos = jnp.arange(mask.q_len) + mask.offset
  allowed = jnp.arange(mask.k_len)[None, :] <= pos[:, None]
  if window is not None:
    allowed &= pos[:, None] - jnp.arange(mask.k_len)[None, :] < window
  return token & allowed


def masks_equal(a: BlockMask, b: BlockMask) -> bool:
  """Same layout and the same kept blocks (padding included)."""
  same_layout = (a.block_q, a.block_k, a.q_len, a.k_len) == (b.block_q, b.block_k, b.q_len, b.k_len)
  return bool(same_layout and a.indices.shape == b.indices.shape
              and np.array_equal(np.asarray(a.indices), np.asarray(b.indices))
              and np.array_equal(np.asarray(a.counts), np.asarray(b.counts)))


def describe(mask: BlockMask, window: Optional[int] = None) -> str:
  """One-line human summary."""
  if not isinstance(mask, BlockMask):
    raise TypeError(f"describe needs a BlockMask, got {type(mask).__name__}")
  frac = np.asarray(kept_fraction(mask, window))
  return (f"BlockMask heads={mask.indices.shape[:-2]} q_len={mask.q_len} k_len={mask.k_len} "
          f"blocks={mask.block_q}x{mask.block_k} nQ={mask.num_q_blocks} nK={mask.num_k_blocks} "
          f"C={mask.capacity} kept_fraction={frac.mean():.4f}")


def to_blocks(x: jax.Array, block: int) -> jax.Array:
  """[L, ...] -> [ceil(L / block), block, ...], zero-padded at the end."""
  n = num_blocks(x.shape[0], block)
  pad = n * block - x.shape[0]
  if pad:
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
  return x.reshape((n, block) + x.shape[1:])


def take_blocks(block_matrix: jax.Array, mask: BlockMask) -> jax.Array:
  """float[..., N, nQ, nK] -> [..., N, nQ, C]: values at the kept blocks (0 at padding slots).

  E.g. with the exact dense block mass this gives the share of dense attention the mask keeps.
  """
  taken = jnp.take_along_axis(block_matrix, jnp.maximum(mask.indices, 0), axis=-1)
  return jnp.where(mask.indices >= 0, taken, 0)
