"""Interventions: per-layer overrides of one forward pass, for causal tests through the trace.

A trace says where attention went; an intervention asks whether it mattered. `Intervention` is a pytree
handed to `forward(..., intervention=...)` (and `generate`): it suppresses attention to chosen keys in
chosen layers and heads, and/or forces a layer's block mask, leaving everything else as configured. Its
arrays are data, so a sweep over sentences or blocks reuses one compiled executable (only shapes are
static).

Suppression is factorised so that it stays O(T): `keys` bool[Lk, Bk, S] (Lk in {1, L}, Bk in {1, B}) says
which key positions are suppressed, `heads` bool[L, N] in which layers and heads. Head n of layer l gives
key s of batch row b zero probability iff heads[l, n] and keys[l or 0, b or 0, s]; the remaining keys of the
row renormalise, as in Thought Anchors' attention suppression (logits set to -inf before the softmax). A
query whose every visible key is suppressed attends to nothing: its attention output is 0 (the result of an
empty softmax sum, the same as a row with no visible key), never NaN.

A forced mask replaces the estimated mask of a Stream layer (sparse or exact output): the layer attends
through it (sparse) or reports the dense probability of its blocks (exact).

Gates weight each kept block's softmax terms, per layer, shaped like the layer's mass [B|1, N, nQ, C]:
ones are the plain forward, 0 drops that block for that query block and head with the rest renormalised
(the same definition as suppression and as a forced mask without the block), so a gradient at ones is
attribution patching's estimate of each edge's ablation (stream_jax.attribution). Sparse-output Stream
layers only; gate the layers of a forward whose masks are forced, so that every gate has a fixed edge.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stream_jax import checks
from stream_jax.mask import BlockMask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Intervention:
  """Per-layer overrides of one forward pass (see the module docstring).

  keys: bool[Lk, Bk, S] suppressed key positions (Lk = 1 or L, Bk = 1 or B), or None.
  heads: bool[L, N] the layers and heads where `keys` are suppressed, or None (with keys None).
  masks: per layer a BlockMask to attend through instead of the estimated one, or None; None: no forced
    masks. Its structure (which layers are forced) is static; its indices are data.
  """

  keys: Optional[jax.Array] = None
  heads: Optional[jax.Array] = None
  masks: Optional[tuple[Optional[BlockMask], ...]] = None
  gates: Optional[tuple[Optional[jax.Array], ...]] = None

  @property
  def suppresses(self) -> bool:
    return self.keys is not None

  def layer(self, l: int) -> tuple[Optional[jax.Array], Optional[BlockMask]]:
    """Layer l's (suppressed bool[Bk, N, S] or None, forced BlockMask or None)."""
    sup = None
    if self.keys is not None:
      keys = self.keys[l if self.keys.shape[0] > 1 else 0]  # [Bk, S]
      sup = self.heads[l][None, :, None] & keys[:, None, :]
    mask = None if self.masks is None else self.masks[l]
    return sup, mask

  def gate(self, l: int) -> Optional[jax.Array]:
    """Layer l's gate float[B|1, N, nQ, C] on its kept blocks, or None."""
    return None if self.gates is None else self.gates[l]

  def check(self, *, num_layers: int, num_heads: int, batch: int, length: int) -> None:
    """Validates the shapes against a model and its input (clear errors naming the argument)."""
    if self.keys is not None:
      keys, heads = self.keys, self.heads
      if heads is None or keys.ndim != 3 or heads.ndim != 2:
        raise ValueError("intervention.keys must be bool[Lk, Bk, S] with intervention.heads bool[L, N], got "
                         f"keys {getattr(keys, 'shape', None)}, heads {getattr(heads, 'shape', None)}")
      if heads.shape != (num_layers, num_heads):
        raise ValueError(f"intervention.heads must have shape [L, N] = [{num_layers}, {num_heads}] for this "
                         f"model, got {heads.shape}")
      if keys.shape[0] not in (1, num_layers):
        raise ValueError(f"intervention.keys has {keys.shape[0]} layer rows; allowed: 1 (all layers) or "
                         f"L = {num_layers}")
      if keys.shape[1] not in (1, batch):
        raise ValueError(f"intervention.keys has {keys.shape[1]} batch rows; allowed: 1 (every row) or "
                         f"B = {batch}")
      if keys.shape[2] != length:
        raise ValueError(f"intervention.keys covers S = {keys.shape[2]} key positions; the input has "
                         f"T = {length} tokens (they must be equal)")
    if self.masks is not None:
      if len(self.masks) != num_layers:
        raise ValueError(f"intervention.masks must have one entry (BlockMask or None) per layer: "
                         f"{num_layers}, got {len(self.masks)}")
      for l, m in enumerate(self.masks):
        if m is not None and (m.q_len != length or m.k_len != length):
          raise ValueError(f"intervention.masks[{l}] covers q_len={m.q_len}, k_len={m.k_len}; the input has "
                           f"T = {length} tokens")
    if self.gates is not None:
      if len(self.gates) != num_layers:
        raise ValueError(f"intervention.gates must have one entry (float[B, N, nQ, C] or None) per layer: "
                         f"{num_layers}, got {len(self.gates)}")
      for l, g in enumerate(self.gates):
        if g is None:
          continue
        mask = None if self.masks is None else self.masks[l]
        if mask is None:
          raise ValueError(f"intervention.gates[{l}] needs a forced mask for layer {l} (intervention.masks"
                           f"[{l}]): a gate weights fixed edges, and an estimated mask could move under it")
        shape = tuple(getattr(g, "shape", ()))
        want = tuple(mask.indices.shape[-3:])
        if len(shape) != 4 or shape[0] not in (1, batch) or shape[1:] != want:
          raise ValueError(f"intervention.gates[{l}] must have shape [B, N, nQ, C] = [{batch} or 1, "
                           f"{', '.join(map(str, want))}] (the forced mask's), got {shape}")

  def pad_keys(self, length: int) -> "Intervention":
    """Keys extended with unsuppressed positions up to `length` (a KV cache longer than the prompt)."""
    if self.keys is None or self.keys.shape[-1] >= length:
      return self
    pad = length - self.keys.shape[-1]
    return dataclasses.replace(self, keys=jnp.pad(self.keys, ((0, 0), (0, 0), (0, pad))))


def _where(num_layers: int, num_heads: int, layers, heads) -> np.ndarray:
  """bool[L, N] from layer ids (None: all) and head ids (None: all) or an explicit bool[L, N]."""
  if heads is not None and np.ndim(heads) == 2:
    where = np.asarray(heads, bool)
    if where.shape != (num_layers, num_heads):
      raise ValueError(f"heads as a bool[L, N] array must have shape [{num_layers}, {num_heads}], got "
                       f"{where.shape}")
    if layers is not None:
      raise ValueError("pass either layers + heads ids or heads as a bool[L, N] array, not both")
    return where
  rows = _selection(layers, num_layers, "layers", " (a layer of the model)", "layer")
  cols = _selection(heads, num_heads, "heads", " (a query head)", "head")
  return rows[:, None] & cols[None, :]


def _selection(ids, size: int, name: str, what: str, noun: str) -> np.ndarray:
  """bool[size]: every entry for ids None, else the given ids (checked, at least one)."""
  out = np.zeros(size, bool)
  if ids is None:
    out[:] = True
    return out
  ids = np.asarray(list(ids) if not np.isscalar(ids) else [ids])
  if ids.size == 0:
    raise ValueError(f"{name} is empty: name at least one {noun} (or None for all)")
  for i in ids:
    checks.check_index(f"{name} entry", int(i), size, what)
  out[ids.astype(int)] = True
  return out


def _span_keys(spans, length: int, name: str) -> np.ndarray:
  if np.size(spans) == 0:
    raise ValueError(f"{name} is empty: give at least one (start, end) token span")
  spans = checks.check_spans(name, spans, length)
  keys = np.zeros(length, bool)
  for s, e in spans:
    keys[s:e] = True
  return keys


def suppress_spans(spans, *, length: int, num_layers: int, num_heads: int, layers=None,
                   heads=None) -> Intervention:
  """Suppress attention to token spans.

  Args:
    spans: int[k, 2] (start, end) token spans, suppressed together in one batch row; or a list of such
      span lists, one per batch row (a batched intervention: row b suppresses its own spans).
    length: T, the number of tokens of the input.
    num_layers, num_heads: the model's L and N (e.g. `config.num_layers`, `config.num_heads`).
    layers: layer ids to intervene on (None: every layer).
    heads: head ids in those layers (None: every head), or a bool[L, N] array of (layer, head) pairs.
  """
  rows, batched = _rows(spans, 2)
  keys = np.stack([_span_keys(r, length, f"spans[{b}]" if batched else "spans") for b, r in enumerate(rows)])
  where = _where(num_layers, num_heads, layers, heads)
  return Intervention(keys=jnp.asarray(keys[None]), heads=jnp.asarray(where))


def drop_blocks(blocks, *, block_k: int, length: int, num_layers: int, num_heads: int, layers=None,
                heads=None) -> Intervention:
  """Suppress attention to whole key blocks (ids of `block_k` tokens) in the chosen layers and heads.

  blocks: key-block ids (one batch row), or a list of id lists (one per batch row); or, per layer, a
  mapping {layer: ids} (different blocks in different layers: e.g. random kept blocks of each layer).
  """
  checks.as_int("block_k", block_k, lo=1)
  n_blocks = -(-length // block_k)

  def block_keys(ids, name):
    ids = np.asarray(list(ids), np.int64).reshape(-1)
    if ids.size == 0:
      raise ValueError(f"{name} is empty: give at least one key-block id")
    bad = ids[(ids < 0) | (ids >= n_blocks)]
    if bad.size:
      raise ValueError(f"{name} has block ids {bad.tolist()} outside [0, {n_blocks}) (T = {length} tokens in "
                       f"blocks of {block_k})")
    keys = np.zeros(n_blocks * block_k, bool).reshape(n_blocks, block_k)
    keys[ids] = True
    return keys.reshape(-1)[:length]

  where = _where(num_layers, num_heads, layers, heads)
  if isinstance(blocks, Mapping):
    keys = np.zeros((num_layers, 1, length), bool)
    for l, ids in blocks.items():
      checks.check_index("blocks layer", int(l), num_layers, " (a layer of the model)")
      keys[int(l), 0] = block_keys(ids, f"blocks[{l}]")
    where = where & keys.any(-1).any(-1)[:, None]
    return Intervention(keys=jnp.asarray(keys), heads=jnp.asarray(where))
  rows, batched = _rows(blocks, 1)
  keys = np.stack([block_keys(r, f"blocks[{b}]" if batched else "blocks") for b, r in enumerate(rows)])
  return Intervention(keys=jnp.asarray(keys[None]), heads=jnp.asarray(where))


def force_masks(masks: Mapping[int, BlockMask], *, num_layers: int) -> Intervention:
  """Attend through given masks in the named layers ({layer: BlockMask}; Stream calls)."""
  if not masks:
    raise ValueError("masks is empty: give {layer: BlockMask} for at least one layer")
  out: list[Optional[BlockMask]] = [None] * num_layers
  for l, m in masks.items():
    checks.check_index("masks layer", int(l), num_layers, " (a layer of the model)")
    if not isinstance(m, BlockMask):
      raise TypeError(f"masks[{l}] must be a stream_jax.BlockMask, got {type(m).__name__}")
    out[int(l)] = m
  return Intervention(masks=tuple(out))


def _rows(x, item_ndim: int) -> tuple[list, bool]:
  """(rows, batched): x is one item (an array of rank item_ndim: [k, 2] spans or [k] block ids) or a list of
  such items, one per batch row (ragged lengths allowed)."""
  if isinstance(x, (np.ndarray, jax.Array)) or not isinstance(x, Sequence) or not len(x):
    return [x], False
  try:
    if np.ndim(x) == item_ndim:
      return [x], False
  except ValueError:  # ragged: a list of rows
    pass
  if all(isinstance(r, (Sequence, np.ndarray)) and np.ndim(r) == item_ndim for r in x):
    return list(x), True
  return [x], False
