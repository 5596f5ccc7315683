"""Trace: what a Stream forward pass keeps of each layer's attention.

A Trace is a pytree (jit/vmap/orbax friendly): per layer, the BlockMask the layer attended through and the
block-level attention mass, both O(T). Layer metadata (index, local/global, how it ran) is static.
Arrays carry a leading batch axis B when the model ran on a batch.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

from stream_jax.mask import BlockMask, kept_fraction

LayerKind = Literal["global", "local"]
# "stream": the layer's output is attention over the estimated mask (the paper's sparse model);
# "window": exact sliding window as a block band; "dense": the layer ran dense attention and its trace
# holds the estimated mask with the mass that mask's attention gives (normalised over the kept blocks);
# "exact": the layer ran dense attention and its trace holds the estimated mask with the mass the dense
# softmax gives each kept block (normalised by the dense denominator: rows sum to the coverage).
LayerMode = Literal["stream", "window", "dense", "exact"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerTrace:
  """One layer: mask.indices [..., N, nQ, C], mass float32[..., N, nQ, C], and coverage float32[..., N, nQ]
  (the share of each query block's dense attention inside its kept blocks; None unless the trace was
  exact or asked for it)."""

  mask: BlockMask
  mass: jax.Array
  layer: int = dataclasses.field(metadata=dict(static=True))
  kind: LayerKind = dataclasses.field(metadata=dict(static=True))
  mode: LayerMode = dataclasses.field(metadata=dict(static=True))
  window: Optional[int] = dataclasses.field(default=None, metadata=dict(static=True))
  coverage: Optional[jax.Array] = None

  def kept_fraction(self) -> jax.Array:
    """float32[..., N] kept token interactions over those the layer's own rule allows."""
    return kept_fraction(self.mask, self.window)


class Layers(tuple):
  """A Trace's layers: a tuple (and pytree node) whose out-of-range index names the valid range instead of
  a bare "tuple index out of range"."""

  __slots__ = ()

  def __getitem__(self, i):
    try:
      return super().__getitem__(i)
    except IndexError:
      n = len(self)
      raise IndexError(f"layer index {i} is out of range: this trace has {n} layers (valid: 0 to {n - 1}, or "
                       f"-{n} to -1)" if n else f"layer index {i}: this trace has no layers") from None
    except TypeError:
      raise TypeError(f"layer index must be an integer or a slice, got {type(i).__name__} {i!r}") from None


jax.tree_util.register_pytree_node(Layers, lambda x: (tuple(x), None), lambda _, children: Layers(children))

_KINDS = ("global", "local", None)
_MODES = ("stream", "window", "dense", "exact", None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Trace:
  """All layers of one forward pass, in layer order (`layers[i]` is layer i)."""

  layers: tuple[LayerTrace, ...]

  def __post_init__(self):
    if not isinstance(self.layers, Layers):
      object.__setattr__(self, "layers", Layers(self.layers))

  def __len__(self):
    return len(self.layers)

  def __getitem__(self, i) -> LayerTrace:
    return self.layers[i]

  def select(self, kind: Optional[LayerKind] = None, mode: Optional[LayerMode] = None):
    """The layers of one kind and/or mode (None: any); an unknown kind or mode is an error, not an empty
    selection (which would read as "nothing pruned")."""
    if kind not in _KINDS:
      raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if mode not in _MODES:
      raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    return tuple(l for l in self.layers
                 if (kind is None or l.kind == kind) and (mode is None or l.mode == mode))

  def nbytes(self) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(self)))

  def kept_fraction(self, kind: Optional[LayerKind] = "global") -> jax.Array:
    """Mean kept fraction over the selected layers and heads (1.0 = dense)."""
    fr = [jnp.mean(l.kept_fraction()) for l in self.select(kind=kind)]
    return jnp.mean(jnp.stack(fr)) if fr else jnp.float32(1.0)

  def _repr_html_(self) -> str:
    """Notebook display: the interactive viewer inline for small traces, a summary otherwise."""
    from stream_jax.viewer.notebook import trace_html  # pylint: disable=import-outside-toplevel
    return trace_html(self)

  def coverage(self, kind: Optional[LayerKind] = "global", start_block: int = 0) -> Optional[jax.Array]:
    """Mean coverage over the selected layers, heads and query blocks from `start_block` on (None when
    the trace carries no coverage)."""
    cov = [l.coverage[..., start_block:] for l in self.select(kind=kind) if l.coverage is not None]
    return jnp.mean(jnp.stack([jnp.mean(c) for c in cov])) if cov else None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TracedRun:
  """What one forward pass returns: the same pytree whatever the flags, always with a batch axis B.

  logits: float32[B, T, V] ([B, V] with last_only).
  trace: the Trace of a Stream call (None for attention="dense").
  hidden: the residual stream after each layer, before the final norm, [L, B, T, D] in the model dtype
    (None unless return_hidden): layer l's output is hidden[l]; the embeddings are not included.
  probs: dense_impl="capture" only: per layer the attention probabilities [B, N, T, S] (T x S per head:
    the dense capture Stream replaces, kept for measurements); None otherwise.
  hooked: the extras named hooks emitted (stream_jax.hooks), {name: {layer: pytree}}; None without hooks.

  A pytree, so a TracedRun crosses jit / vmap / device_put; `row(b)` drops the batch axis for
  single-prompt analysis.
  """

  logits: jax.Array
  trace: Optional[Trace] = None
  hidden: Optional[jax.Array] = None
  probs: Optional[tuple[jax.Array, ...]] = None
  hooked: Optional[dict] = None

  def _repr_html_(self) -> Optional[str]:
    """Notebook display of the trace (batch row 0); None (plain repr) without a trace."""
    if self.trace is None:
      return None
    from stream_jax.viewer.notebook import trace_html  # pylint: disable=import-outside-toplevel
    return trace_html(self.trace)

  @property
  def batch_size(self) -> int:
    return int(self.logits.shape[0])

  def row(self, b: int) -> "TracedRun":
    """Batch row b with the batch axis removed (hidden [L, T, D], trace arrays [N, ...]; hooks' extras are
    kept as they are: their shapes are the hook's)."""
    size = self.batch_size
    if not -size <= b < size:
      raise IndexError(f"row index b={b} out of range for a batch of {size}")
    take = lambda x: x[b]
    return TracedRun(
        logits=self.logits[b],
        trace=None if self.trace is None else jax.tree_util.tree_map(take, self.trace),
        hidden=None if self.hidden is None else self.hidden[:, b],
        probs=None if self.probs is None else tuple(p[b] for p in self.probs), hooked=self.hooked)
