"""Retrieval routes: how needle blocks reach the final position through the kept blocks of every layer.

Two views, both on the compact trace (per layer: indices and mass [N, nQ, C]; never T x T):

* needle mass: per layer and head, the share of the final query block's attention that lands on key blocks
  holding needle tokens (block resolution: a block counts whole if any needle token is in it);
* route: a walk from the final query block down the layers along kept blocks weighted by their mass, an
  attention rollout (Abnar & Zuidema, 2020) restricted to what the mask kept and pruned per step (threshold
  or top-m edges): flow[l][b] is the share of the final position's information at layer l's input that sits
  in block b. Edges that also lie on a path going up from a needle block form the route graph: the layered
  paths that carry the needle to the output.

Comparing successful and failed retrievals then shows which layers/heads carry needle mass only in successes.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stream_jax.mask import num_blocks
from stream_jax import checks

if TYPE_CHECKING:  # annotations only: the analysis reads traces, it needs no trace code at run time
  from stream_jax.trace import LayerTrace, Trace


SINK_BLOCK = 0  # the attention sink: the block holding BOS


def select_batch(trace: Trace, b: int) -> Trace:
  """The trace of sample b of a batched trace (arrays lose their leading axis)."""
  return jax.tree_util.tree_map(lambda x: x[b], trace)


def span_blocks(spans, block: int, length: int) -> jax.Array:
  """bool[nB]: blocks holding at least one token of the given [start, end) token spans."""
  n = num_blocks(length, block)
  lo = jnp.arange(n) * block
  hi = jnp.minimum(lo + block, length)
  spans = jnp.asarray(spans, jnp.int32).reshape(-1, 2)
  hit = (spans[:, :1] < hi[None]) & (spans[:, 1:] > lo[None]) & (spans[:, 1:] > spans[:, :1])
  return hit.any(0)


def _rows(layer: LayerTrace) -> jax.Array:
  """float32[nQ] valid queries per query block."""
  m = layer.mask
  n = m.num_q_blocks
  return (jnp.minimum((jnp.arange(n) + 1) * m.block_q, m.q_len) - jnp.arange(n) * m.block_q).astype(
      jnp.float32)


def block_share(layer: LayerTrace) -> jax.Array:
  """float32[..., N, nQ, C] mass / queries of the block: each row of a head sums to 1 (its attention)."""
  return layer.mass / _rows(layer)[:, None]


def needle_mass(layer: LayerTrace, needle: jax.Array, query_block: int = -1) -> jax.Array:
  """float32[..., N] share of query block `query_block`'s attention on key blocks where needle[b] (bool[nK])."""
  share = block_share(layer)[..., query_block, :]  # [..., N, C]
  idx = layer.mask.indices[..., query_block, :]
  hit = jnp.where(idx >= 0, needle[jnp.maximum(idx, 0)], False)
  return jnp.where(hit, share, 0.0).sum(-1)


def trace_needle_mass(trace: Trace, spans, query_block: int = -1) -> jax.Array:
  """float32[L, ..., N]: needle mass at the final query block, per layer and head.

  spans: int[k, 2] token spans of the needle(s) (e.g. the value spans of a NiahSample), inside the
    traced tokens (checked when concrete).
  """
  checks.check_spans("spans", spans, trace.layers[0].mask.k_len)
  out = []
  for l in trace.layers:
    needle = span_blocks(spans, l.mask.block_k, l.mask.k_len)
    out.append(needle_mass(l, needle, query_block))
  return jnp.stack(out)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Route:
  """A route from the final query block down to layer 0's input (one sample, no batch axis).

  flow: float32[L + 1, nB] share of the final position's information at the input of layer l in block b
    (flow[L] is the final block, one-hot); pruned edges lose their share, so rows sum to <= 1.
  edges: per layer float32[N, nQ, C_l], the weight of the kept edge key block indices[l][n, j, c] -> query
    block j (0 where pruned); mean over heads, so a layer's edges and residual sum to that layer's flow.
    Per-layer tuples: local (window) and global layers have different capacities C_l.
  on_route: per layer bool[N, nQ, C_l], kept edges on a path that starts at a needle block.
  carried: bool[L + 1, nB] blocks that needle information reaches along kept edges (and the residual).
  needle_flow: float32[L + 1] flow on needle blocks per layer.
  indices: per layer int32[N, nQ, C_l], the masks' block ids (to read edges without the trace).

  Block 0 (BOS) is the attention sink: most heads park mass there whatever the prompt, so heavy edges into
  block 0 say little about retrieval (`SINK_BLOCK`; the route figure marks it).
  """

  flow: jax.Array
  edges: tuple[jax.Array, ...]
  on_route: tuple[jax.Array, ...]
  carried: jax.Array
  needle_flow: jax.Array
  indices: tuple[jax.Array, ...]

  def edge_list(self, min_weight: float = 0.0, only_route: bool = True) -> list[tuple[int, int, int, int, float]]:
    """(layer, head, key block, query block, weight) of the kept (route) edges, heaviest first."""
    out = []
    for layer, (e, on, idx) in enumerate(zip(self.edges, self.on_route, self.indices)):
      e, idx = np.asarray(e), np.asarray(idx)
      sel = (e > min_weight) & (np.asarray(on) if only_route else True)
      out += [(layer, int(n), int(idx[n, j, c]), int(j), float(e[n, j, c])) for n, j, c in zip(*np.nonzero(sel))]
    return sorted(out, key=lambda x: -x[-1])


def _layer_step(flow, share, indices, *, residual, threshold, top_m):
  """flow [nB] at a layer's output -> (flow at its input [nB], kept edge weights [N, nQ, C])."""
  n_heads, n_q, _ = share.shape
  e = (1.0 - residual) * flow[:n_q][None, :, None] * share / n_heads
  e = jnp.where(indices >= 0, e, 0.0)
  keep = e > threshold
  if top_m is not None:
    m = min(top_m, e.size)
    cut = jax.lax.top_k(e.ravel(), m)[0][-1]
    keep &= e >= cut
  e = jnp.where(keep, e, 0.0)
  down = residual * flow + jnp.zeros_like(flow).at[jnp.maximum(indices, 0).ravel()].add(e.ravel())
  return down, e


def route(trace: Trace, needle_spans, *, residual: float = 0.5, threshold: float = 1e-3,
          top_m: Optional[int] = None, final_block: int = -1) -> Route:
  """Walks from the final query block down every layer along kept blocks weighted by mass.

  Args:
    trace: one sample's Trace (use select_batch for a batch); every layer needs block_q == block_k and
      q_len == k_len (query and key blocks are the same positions).
    needle_spans: int[k, 2] token spans of the needle(s).
    residual: share of the flow that stays in place through the residual stream at each layer (0.5:
      attention rollout; 0: attention-only paths).
    threshold: prune edges lighter than this share of the final position's information.
    top_m: also keep at most the m heaviest edges per layer.
    final_block: the query block to start from (default the last).
  """
  layers = trace.layers
  for l in layers:
    m = l.mask
    if m.block_q != m.block_k or m.q_len != m.k_len:
      raise ValueError(f"route needs block_q == block_k and q_len == k_len (layer {l.layer}: block_q="
                       f"{m.block_q}, block_k={m.block_k}, q_len={m.q_len}, k_len={m.k_len})")
    if l.mass.ndim != 3:
      raise ValueError(f"route works on one sample; layer {l.layer} has mass of shape {l.mass.shape} "
                       "(use select_batch)")
  checks.check_spans("needle_spans", needle_spans, layers[0].mask.k_len)
  n_b = layers[0].mask.num_k_blocks
  needle = span_blocks(needle_spans, layers[0].mask.block_k, layers[0].mask.k_len)
  flow = jnp.zeros((n_b,), jnp.float32).at[final_block].set(1.0)
  flows, edges = [flow], []
  for l in reversed(layers):
    flow, e = _layer_step(flow, block_share(l), l.mask.indices, residual=residual, threshold=threshold,
                          top_m=top_m)
    flows.append(flow)
    edges.append(e)
  flows = jnp.stack(flows[::-1])  # [L + 1, nB], index l = input of layer l
  edges = tuple(edges[::-1])  # per layer [N, nQ, C_l]
  carried = [needle]
  on_route = []
  for i, l in enumerate(layers):  # upward: needle information spreads along kept edges
    idx = l.mask.indices
    src = jnp.where(idx >= 0, carried[-1][jnp.maximum(idx, 0)], False) & (edges[i] > 0)
    on_route.append(src)
    reached = src.any((0, 2))  # [nQ]
    carried.append(carried[-1] | jnp.pad(reached, (0, n_b - reached.shape[0])))
  carried = jnp.stack(carried)
  needle_flow = (flows * needle[None]).sum(-1)
  indices = tuple(l.mask.indices for l in layers)
  return Route(flows, edges, tuple(on_route), carried, needle_flow, indices)


# ---------------------------------------------------------------------------------------------------------
# Success vs failure
# ---------------------------------------------------------------------------------------------------------

def needle_visible(trace: Trace, spans, query_block: int = -1) -> np.ndarray:
  """bool[L]: whether some query of `query_block` can attend to some needle token, per layer.

  A local layer with window W lets query i see key s only if i - s < W: a needle further back than that
  from every query of the block is out of its reach, so its heads carry no needle mass there whatever the
  model does, and comparing them between prompts says nothing about retrieval. Global layers see every
  earlier token.
  """
  spans = np.asarray(spans, np.int64).reshape(-1, 2)
  out = []
  for l in trace.layers:
    m = l.mask
    n_q = m.num_q_blocks
    j = query_block % n_q
    last_q = min((j + 1) * m.block_q, m.q_len) - 1
    ok = spans[:, 0] <= last_q  # causal: some needle token at or before the block's last query
    if l.window is not None:  # the closest pair: the latest visible needle token, the earliest query after it
      s_max = np.minimum(spans[:, 1], last_q + 1) - 1
      ok &= np.maximum(j * m.block_q, s_max) - s_max < l.window
    out.append(bool(ok.any()))
  return np.asarray(out, bool)


@dataclasses.dataclass(frozen=True)
class RouteComparison:
  """Needle mass at the final block, successes vs failures.

  success, failure: float32[L, N] mean needle mass (NaN when the group is empty, and for heads excluded
  because they cannot see the needle in some sample: `excluded_layers`); diff = success - failure;
  layer_success, layer_failure: float32[L] means over heads; heads: (layer, head, success, failure) with the
  largest positive differences first (carried in successes but not in failures); lost_layer: the layer
  where the gap of the per-layer needle mass is largest (None when nothing is comparable: no success, no
  failure, or no layer that sees the needle).
  """

  success: np.ndarray
  failure: np.ndarray
  diff: np.ndarray
  layer_success: np.ndarray
  layer_failure: np.ndarray
  heads: tuple[tuple[int, int, float, float], ...]
  lost_layer: Optional[int]
  n_success: int
  n_failure: int
  excluded_layers: tuple[int, ...] = ()

  @property
  def comparable(self) -> bool:
    """Both groups hold a sample and some layer sees the needle in all of them."""
    return self.lost_layer is not None

  def format(self, n: int = 8) -> str:
    lines = [f"successes={self.n_success} failures={self.n_failure}"]
    if not (self.n_success and self.n_failure):
      lines.append("nothing to compare: needs at least one success and one failure")
      return "\n".join(lines)
    if self.excluded_layers:
      lines.append(f"layers {_ranges(self.excluded_layers)} left out: their window cannot reach the needle "
                   "from the final query block in every sample")
    if not self.comparable:
      lines.append("nothing to compare: no layer sees the needle in every sample")
      return "\n".join(lines)
    lines.append("layer  needle mass (success)  (failure)")
    for l, (s, f) in enumerate(zip(self.layer_success, self.layer_failure)):
      if l not in self.excluded_layers:
        lines.append(f"{l:5d}  {s:21.4f}  {f:9.4f}")
    lines.append(f"largest gap at layer {self.lost_layer}; heads carrying the needle in successes more than in "
                 "failures:")
    lines += [f"  L{l}H{h}: success {s:.3f}, failure {f:.3f}" for l, h, s, f in self.heads[:n]]
    return "\n".join(lines)


def _ranges(ids: Sequence[int]) -> str:
  """1,2,3,5 -> '1-3, 5'."""
  out, ids = [], sorted(ids)
  i = 0
  while i < len(ids):
    j = i
    while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
      j += 1
    out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
    i = j + 1
  return ", ".join(out)


def compare(needle_mass: Sequence, success: Sequence[bool], top: int = 10,
            visible: Optional[Sequence] = None) -> RouteComparison:
  """needle_mass: per sample float[L, N] (e.g. trace_needle_mass of each sample); success: bool per sample;
  visible: per sample bool[L] (`needle_visible`): layers that cannot see the needle in any sample are left
  out (NaN), so heads blind to the needle by construction never rank as carrying it.

  Compare only like with like: samples of one length and needle depth (`compare_groups` splits them).
  """
  nm = np.stack([np.asarray(x, np.float64) for x in needle_mass])
  ok = np.asarray(success, bool)
  if nm.ndim != 3 or len(ok) != len(nm):
    raise ValueError(f"needle_mass must be [samples, L, N] with one success flag per sample, got {nm.shape}, "
                     f"{ok.shape}")
  seen = np.ones(nm.shape[1], bool)
  if visible is not None:
    vis = np.asarray(visible, bool).reshape(len(nm), -1)
    if vis.shape[1] != nm.shape[1]:
      raise ValueError(f"visible must be bool[samples, L] with L = {nm.shape[1]}, got {vis.shape}")
    seen = vis.all(0)
  mean = lambda x: x.mean(0) if len(x) else np.full(nm.shape[1:], np.nan)
  s, f = mean(nm[ok]), mean(nm[~ok])
  s[~seen], f[~seen] = np.nan, np.nan
  diff = s - f
  order = np.argsort(-np.nan_to_num(diff, nan=-np.inf), axis=None)[:top]
  heads = tuple((int(i // nm.shape[2]), int(i % nm.shape[2]), float(s.flat[i]), float(f.flat[i]))
                for i in order if np.isfinite(diff.flat[i]))
  ls, lf = s.mean(-1), f.mean(-1)
  gap = ls - lf
  lost = int(np.nanargmax(gap)) if np.isfinite(gap).any() else None
  return RouteComparison(s, f, diff, ls, lf, heads, lost, int(ok.sum()), int((~ok).sum()),
                         tuple(int(i) for i in np.nonzero(~seen)[0]))


@dataclasses.dataclass(frozen=True)
class GroupComparison:
  """Success vs failure within one group of like prompts (one length and needle depth)."""

  length: int
  depth: Optional[float]  # requested depth in percent; None: random per sample (`depths` lists them)
  depths: tuple[float, ...]  # the samples' actual needle depths (percent of the prompt)
  comparison: RouteComparison


@dataclasses.dataclass(frozen=True)
class GroupedComparison:
  """`compare_groups`: one RouteComparison per (length, depth) group, and what could not be compared."""

  groups: tuple[GroupComparison, ...]

  @property
  def n_success(self) -> int:
    return sum(g.comparison.n_success for g in self.groups)

  @property
  def n_failure(self) -> int:
    return sum(g.comparison.n_failure for g in self.groups)

  @property
  def comparable(self) -> tuple[GroupComparison, ...]:
    """Groups with a success, a failure and a layer that sees the needle in all their samples."""
    return tuple(g for g in self.groups if g.comparison.comparable)

  def warnings(self) -> list[str]:
    """What the reader must not conclude: no comparable group, or successes and failures only at
    different lengths / depths."""
    out = []
    if not self.comparable:
      lengths = {}
      for g in self.groups:
        c = g.comparison
        lengths[_where(g)] = f"{c.n_success} success(es), {c.n_failure} failure(s)"
      what = "; ".join(f"{k}: {v}" for k, v in lengths.items())
      out.append("nothing comparable: no length and depth has both a success and a failure whose needle "
                 f"some layer can see ({what}); differences between lengths or depths are not differences "
                 "between retrieval and its failure")
    for g in self.comparable:
      if g.depth is None and len(set(np.round(g.depths))) > 1:
        out.append(f"{_where(g)}: needle depth is random per sample ({min(g.depths):.0f}%-"
                   f"{max(g.depths):.0f}%), so depth differs between successes and failures; fix the needle "
                   "depths for a controlled comparison")
    return out

  def format(self, n: int = 8) -> str:
    lines = []
    for g in self.groups:
      lines.append(f"-- {_where(g)} (needle depth {', '.join(f'{d:.0f}%' for d in g.depths)}) --")
      lines.append(g.comparison.format(n))
    lines += [f"warning: {w}" for w in self.warnings()]
    return "\n".join(lines)


def _where(g: GroupComparison) -> str:
  return f"{g.length} tokens" + ("" if g.depth is None else f", depth {g.depth:g}%")


def compare_groups(needle_mass: Sequence, success: Sequence[bool], lengths: Sequence[int],
                   depths: Sequence[Optional[float]], actual_depths: Sequence[float],
                   visible: Optional[Sequence] = None, top: int = 10) -> GroupedComparison:
  """Success vs failure per (length, requested depth) group, each over the layers that see the needle in
  all its samples (`compare` with `visible`): a failure at a length where local layers cannot reach the
  needle is never set against a success at a length where they can."""
  keys = list(dict.fromkeys((int(n), d) for n, d in zip(lengths, depths)))
  groups = []
  for n, d in keys:
    idx = [i for i, key in enumerate(zip(lengths, depths)) if (int(key[0]), key[1]) == (n, d)]
    vis = None if visible is None else [visible[i] for i in idx]
    groups.append(GroupComparison(n, d, tuple(float(actual_depths[i]) for i in idx), compare(
        [needle_mass[i] for i in idx], [success[i] for i in idx], top=top, visible=vis)))
  return GroupedComparison(tuple(groups))
