"""Gradients through the kept edges: attribution patching (AtP) over the sparse attention graph.

An edge of a trace is one kept block: (layer, batch row, head, query block j, slot c) with key block
`mask.indices[b, n, j, c]`. Every edge gets a gate (stream_jax.intervene: a weight on the block's softmax
terms, renormalised), all ones in the plain forward; gate 0 is the ablation of the edge, the same forward
as a forced mask without that block. The derivative of a metric at gates = 1 is AtP's first-order estimate
of each ablation: effect ~ -d metric / d gate, for every edge from one forward and one backward pass.

Masks are forced to the trace's in every gated layer, so an edge stays the same edge while gates move (an
estimated mask could re-select under an ablation). Memory is that of the sparse forward and its backward:
O(T x C x block_k) per layer, nothing T x T (the XLA path).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stream_jax import checks
from stream_jax.intervene import Intervention
from stream_jax.mask import BlockMask
from stream_jax.trace import Trace, TracedRun

__all__ = ["EdgeAttribution", "drop_edge", "edge_attribution", "top_edges"]


@dataclasses.dataclass(frozen=True)
class EdgeAttribution:
  """What `edge_attribution` returns.

  value: the metric of the plain (all-ones) forward.
  grads: per layer float32[B, N, nQ, C], d metric / d gate (0 at padding slots), or None (ungated layer).
  masks: per layer the BlockMask the edges belong to (the trace's, forced in the gated forward).
  trace: the trace of the plain forward.
  """

  value: jax.Array
  grads: tuple[Optional[jax.Array], ...]
  masks: tuple[Optional[BlockMask], ...]
  trace: Trace

  def estimate(self, layer: int) -> jax.Array:
    """float32[B, N, nQ, C]: AtP's estimate of metric(edge ablated) - metric(plain), i.e. -grad."""
    g = self.grads[layer]
    if g is None:
      raise ValueError(f"layer {layer} was not gated (gated layers: "
                       f"{[l for l, x in enumerate(self.grads) if x is not None]})")
    return -g


def edge_attribution(model, params, tokens: jax.Array, metric: Callable[[TracedRun], jax.Array], *,
                     attention, layers: Optional[Sequence[int]] = None, **forward_kwargs) -> EdgeAttribution:
  """d metric / d gate for every kept edge of the chosen layers (one forward to trace, one to backprop).

  Args:
    model, params, tokens: as for `stream_jax.models.forward` (tokens int[B, T] or int[T]).
    metric: TracedRun -> scalar (e.g. `lambda run: run.logits[0, -1, answer_id]`); differentiated, so it
      must be a jax function of the run's arrays.
    attention: a StreamConfig (sparse output: the trace's blocks are the model's edges).
    layers: layer ids to gate (None: every layer; local layers gate their window band's blocks).
    **forward_kwargs: passed to `forward` (e.g. last_only=True, prune_local, backend="xla").
  """
  from stream_jax.models.forward import forward  # pylint: disable=import-outside-toplevel
  plain = forward(model, params, tokens, attention=attention, **forward_kwargs)
  if plain.trace is None:
    raise ValueError("edge_attribution needs a Stream call: attention=StreamConfig(...), not 'dense'")
  num_layers = len(plain.trace)
  chosen = set(range(num_layers)) if layers is None else {
      checks.check_index("layers entry", l, num_layers, " (a layer of the model)") for l in layers}
  masks = tuple(l.mask for l in plain.trace.layers)
  ones = tuple(jnp.ones(l.mass.shape, jnp.float32) if i in chosen else None
               for i, l in enumerate(plain.trace.layers))

  def gated(gates):
    run = forward(model, params, tokens, attention=attention,
                  intervention=Intervention(masks=masks, gates=gates), **forward_kwargs)
    return jnp.asarray(metric(run), jnp.float32).reshape(())

  value, grads = jax.value_and_grad(gated)(ones)
  grads = tuple(None if g is None else jnp.where(m.indices >= 0, g, 0.0) for g, m in zip(grads, masks))
  return EdgeAttribution(value=value, grads=grads, masks=masks, trace=plain.trace)


def drop_edge(masks: Sequence[Optional[BlockMask]], layer: int, row: int, head: int, q_block: int,
              slot: int) -> tuple[Optional[BlockMask], ...]:
  """The masks with one edge removed (slot `slot` of query block `q_block`, head `head`, batch row `row` of
  layer `layer`), the rest of the row shifted left so ids stay ascending and -1 padded: force them with
  `Intervention(masks=...)` to measure the edge's real ablation (DESIGN §10's "indices -> -1")."""
  m = masks[layer]
  if m is None:
    raise ValueError(f"masks[{layer}] is None: layer {layer} has no mask to drop an edge from")
  idx = np.array(m.indices)
  for name, value, size in (("row", row, idx.shape[0]), ("head", head, idx.shape[1]),
                            ("q_block", q_block, idx.shape[2]), ("slot", slot, idx.shape[3])):
    checks.check_index(name, int(value), size, "")
  line = idx[row, head, q_block]
  if line[slot] < 0:
    raise ValueError(f"slot {slot} of layer {layer}, row {row}, head {head}, query block {q_block} is padding "
                     f"(this row keeps {int((line >= 0).sum())} blocks): nothing to drop")
  kept = np.delete(line, slot)
  idx[row, head, q_block] = np.concatenate([kept, [-1]])
  counts = np.array(m.counts)
  counts[row, head, q_block] -= 1
  out = list(masks)
  out[layer] = dataclasses.replace(m, indices=jnp.asarray(idx), counts=jnp.asarray(counts))
  return tuple(out)


def top_edges(attr: EdgeAttribution, k: int) -> list[dict]:
  """The k edges with the largest |AtP estimate|, largest first: dicts with layer, row, head, q_block,
  slot, key_block and estimate (metric change predicted for ablating the edge)."""
  k = checks.as_int("k", k, lo=1)
  rows = []
  for l, g in enumerate(attr.grads):
    if g is None:
      continue
    est = -np.asarray(g)
    ids = np.asarray(attr.masks[l].indices)
    where = np.argwhere(ids >= 0)
    for b, n, j, c in where:
      rows.append((abs(est[b, n, j, c]), l, b, n, j, c, int(ids[b, n, j, c]), float(est[b, n, j, c])))
  rows.sort(key=lambda r: -r[0])
  return [dict(layer=l, row=int(b), head=int(n), q_block=int(j), slot=int(c), key_block=kb, estimate=e)
          for _, l, b, n, j, c, kb, e in rows[:k]]
