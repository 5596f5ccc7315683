"""Faithfulness: how close a Stream forward pass is to the dense one, and what its masks keep.

Output matching is the method's stated weak spot (a heuristic, no guarantee), so it is measured, never
assumed: next-token KL(dense || stream), top-1 agreement and top-5 overlap per position; relative error of
the residual stream per layer; the kept fraction of causal token interactions ("prunes 97%"); recall of the
exact (oracle) top-k blocks; and, at lengths where the dense block mass fits, the share of dense attention
mass that the kept blocks hold.

Every metric is a pure function of arrays (jit/vmap-able); `faithfulness_report` gathers them into one
pytree and `format_report` prints it. `run_faithfulness` drives a model through a forward callable, so it does
not depend on one model port's API.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stream_jax.config import StreamConfig
from stream_jax.mask import (BlockMask, causal_interactions, diagonal_blocks, kept_interactions,
                             take_blocks)
from stream_jax.trace import Trace, TracedRun


# ---------------------------------------------------------------------------------------------------------
# Output metrics: logits [..., T, V]
# ---------------------------------------------------------------------------------------------------------

def next_token_kl(dense_logits: jax.Array, stream_logits: jax.Array) -> jax.Array:
  """float32[..., T] KL(p_dense || p_stream) of the next-token distributions, in nats."""
  _same_shape(dense_logits, stream_logits)
  lp = jax.nn.log_softmax(dense_logits.astype(jnp.float32), axis=-1)
  lq = jax.nn.log_softmax(stream_logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


def top1_agreement(dense_logits: jax.Array, stream_logits: jax.Array) -> jax.Array:
  """bool[..., T] whether both argmax tokens are the same (`output_metrics` turns non-finite rows to NaN)."""
  _same_shape(dense_logits, stream_logits)
  return jnp.argmax(dense_logits, -1) == jnp.argmax(stream_logits, -1)


def topk_overlap(dense_logits: jax.Array, stream_logits: jax.Array, k: int = 5) -> jax.Array:
  """float32[..., T] |top-k(dense) ∩ top-k(stream)| / k (order ignored); NaN where either row is not finite."""
  _same_shape(dense_logits, stream_logits)
  _, a = jax.lax.top_k(dense_logits.astype(jnp.float32), k)
  _, b = jax.lax.top_k(stream_logits.astype(jnp.float32), k)
  hit = (a[..., :, None] == b[..., None, :]).any(-1)
  return jnp.where(_finite_rows(dense_logits, stream_logits), hit.sum(-1).astype(jnp.float32) / k, jnp.nan)


def _same_shape(dense_logits, stream_logits):
  if jnp.shape(dense_logits) != jnp.shape(stream_logits):
    raise ValueError(f"dense and stream logits must have the same shape [..., T, V], got "
                     f"{jnp.shape(dense_logits)} and {jnp.shape(stream_logits)}")


def _finite_rows(dense_logits, stream_logits):
  """bool[..., T]: both rows finite. A NaN row has an argmax too; it must not count as agreement."""
  return jnp.isfinite(dense_logits).all(-1) & jnp.isfinite(stream_logits).all(-1)


def residual_error(dense_hidden: Sequence[jax.Array], stream_hidden: Sequence[jax.Array]) -> jax.Array:
  """float32[L] ||h_stream - h_dense|| / ||h_dense|| per layer (Frobenius over batch, positions, features).

  Relative, so it compares across layers whose residual norms grow by orders of magnitude.
  """
  if len(dense_hidden) != len(stream_hidden):
    raise ValueError(f"dense and stream hidden states have {len(dense_hidden)} vs {len(stream_hidden)} "
                     "layers")
  out = []
  for d, s in zip(dense_hidden, stream_hidden):
    d, s = jnp.asarray(d, jnp.float32), jnp.asarray(s, jnp.float32)
    out.append(jnp.linalg.norm((s - d).ravel()) / jnp.maximum(jnp.linalg.norm(d.ravel()), 1e-30))
  return jnp.stack(out)


# ---------------------------------------------------------------------------------------------------------
# Mask metrics
# ---------------------------------------------------------------------------------------------------------

def searched_slots(mask: BlockMask) -> jax.Array:
  """bool[..., N, nQ, C] slots holding a block found by search, i.e. neither a sink nor a window block.

  Sink and window blocks are kept by rule, so counting them would inflate recall. Needs mask.config; a mask
  without one counts every valid slot.
  """
  valid = mask.indices >= 0
  cfg = mask.config
  if cfg is None:
    return valid
  diag = diagonal_blocks(mask.q_len, mask.k_len, mask.block_q, mask.block_k)  # [nQ]
  ruled = (mask.indices < cfg.sink_blocks) | (mask.indices > (diag - cfg.window_blocks)[:, None])
  return valid & ~ruled


def oracle_recall(mask: BlockMask, oracle: BlockMask, searched_only: bool = True) -> jax.Array:
  """float32[..., N] share of the oracle's kept blocks that `mask` keeps too (pooled over query blocks).

  With searched_only, only the oracle's searched blocks count (sink and window blocks are kept by rule by
  both). O(nQ x C^2): per query block, the C kept ids of each mask are compared pairwise. NaN where the
  oracle searched nothing.
  """
  if (mask.block_q, mask.block_k, mask.q_len, mask.k_len) != (
      oracle.block_q, oracle.block_k, oracle.q_len, oracle.k_len):
    raise ValueError("oracle_recall: the two masks have different layouts")
  a, b = mask.indices, oracle.indices
  want = searched_slots(oracle) if searched_only else b >= 0
  hit = ((b[..., :, None] == a[..., None, :]) & want[..., None]).any(-1)  # [..., N, nQ, Co]
  found = hit.sum((-2, -1)).astype(jnp.float32)
  total = want.sum((-2, -1))
  return jnp.where(total > 0, found / jnp.maximum(total, 1), jnp.nan)


def dense_mass_share(mask: BlockMask, dense_block_mass: jax.Array) -> jax.Array:
  """float32[..., N] share of the dense attention mass [..., N, nQ, nK] that falls in the kept blocks."""
  kept = take_blocks(dense_block_mass, mask).sum((-2, -1))
  return kept / jnp.maximum(dense_block_mass.sum((-2, -1)), 1e-30)


@dataclasses.dataclass(frozen=True)
class KeptFractions:
  """Kept fraction of causal token interactions (1.0 = dense).

  per_head: float32[L, ..., N] kept / allowed under each layer's own rule (window for local layers).
  per_layer: float32[L] mean over heads (and batch).
  overall: kept / causally allowed (full causal, no window) summed over every layer and head: the share of
    the dense model's attention that the traced forward computes.
  stream: mean of per_layer over the layers whose mask was estimated (modes "stream" and "exact"): the
    pruning rate of the method itself.
  """

  per_head: jax.Array
  per_layer: jax.Array
  overall: jax.Array
  stream: jax.Array


# Layer modes whose mask the estimator chose (an exact layer's output is dense, its mask is estimated).
ESTIMATED_MODES = ("stream", "exact")


def kept_fractions(trace: Trace) -> KeptFractions:
  """Kept fractions of a Trace, per head, per layer and overall."""
  per_head = jnp.stack([l.kept_fraction() for l in trace.layers])
  per_layer = per_head.reshape(per_head.shape[0], -1).mean(-1)
  kept = sum(kept_interactions(l.mask, l.window).sum() for l in trace.layers)
  allowed = sum(causal_interactions(l.mask.q_len, l.mask.k_len) * np.prod(l.mask.counts.shape[:-1])
                for l in trace.layers)
  stream_ids = [i for i, l in enumerate(trace.layers) if l.mode in ESTIMATED_MODES]
  stream = per_layer[jnp.asarray(stream_ids)].mean() if stream_ids else jnp.float32(1.0)
  return KeptFractions(per_head, per_layer, kept / float(allowed), stream)  # allowed > 2**31 from 65k


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FaithfulnessReport:
  """Dense vs Stream on the same tokens. Arrays; None where the input was not given.

  kl, top1, top5: float32[..., T] per position; *_last: the same at the last position ([...]).
  residual_error: float32[L] relative error of each layer's residual output.
  kept_per_layer: float32[L]; kept_per_head: float32[L, ..., N]; kept_overall, kept_stream: scalars
    (see KeptFractions).
  oracle_recall: float32[L] per layer (mean over heads and batch) recall of the oracle top-k blocks.
  dense_mass_share: float32[L] share of the dense attention mass inside the kept blocks.
  pruned_from: first position of the pruned regime (see `pruned_start`); the *_pruned summary numbers
    average over positions from there on, where the sparse model can differ from dense.
  coverage_per_layer: float32[L] mean coverage of the trace's layers over the pruned regime's query
    blocks (NaN for layers without coverage and for exact window layers, which prune nothing).
  """

  kl: jax.Array
  top1: jax.Array
  top5: jax.Array
  kl_last: jax.Array
  top1_last: jax.Array
  top5_last: jax.Array
  residual_error: Optional[jax.Array] = None
  kept_per_layer: Optional[jax.Array] = None
  kept_per_head: Optional[jax.Array] = None
  kept_overall: Optional[jax.Array] = None
  kept_stream: Optional[jax.Array] = None
  oracle_recall: Optional[jax.Array] = None
  dense_mass_share: Optional[jax.Array] = None
  pruned_from: Optional[int] = None
  coverage_per_layer: Optional[jax.Array] = None

  def summary(self) -> dict:
    """Scalar numbers (floats) for tables and logs."""
    out = {
        "kl_mean": float(jnp.mean(self.kl)), "kl_last": float(jnp.mean(self.kl_last)),
        "top1_mean": float(jnp.mean(self.top1)), "top1_last": float(jnp.mean(self.top1_last)),
        "top5_mean": float(jnp.mean(self.top5)), "top5_last": float(jnp.mean(self.top5_last)),
    }
    if self.pruned_from is not None:
      t = self.kl.shape[-1]
      out["pruned_from"] = float(self.pruned_from)
      if self.pruned_from < t:
        out["kl_pruned"] = float(jnp.mean(self.kl[..., self.pruned_from:]))
        out["kl_pruned_p99"] = float(jnp.percentile(self.kl[..., self.pruned_from:], 99))
        out["top1_pruned"] = float(jnp.mean(self.top1[..., self.pruned_from:]))
        out["top5_pruned"] = float(jnp.mean(self.top5[..., self.pruned_from:]))
    if self.coverage_per_layer is not None and bool(jnp.any(jnp.isfinite(self.coverage_per_layer))):
      out["coverage_pruned"] = float(jnp.nanmean(self.coverage_per_layer))
      out["coverage_worst_layer"] = float(jnp.nanmin(self.coverage_per_layer))
    if self.residual_error is not None:
      out["resid_err_last_layer"] = float(self.residual_error[-1])
      out["resid_err_max"] = float(jnp.max(self.residual_error))
    if self.kept_overall is not None:
      out["kept_overall"] = float(self.kept_overall)
      out["kept_stream"] = float(self.kept_stream)
    if self.oracle_recall is not None:
      out["oracle_recall"] = float(jnp.nanmean(self.oracle_recall))
    if self.dense_mass_share is not None:
      out["dense_mass_share"] = float(jnp.nanmean(self.dense_mass_share))
    return out


def faithfulness_report(dense_logits: jax.Array, stream_logits: jax.Array, *,
                        trace: Optional[Trace] = None,
                        dense_hidden: Optional[Sequence[jax.Array]] = None,
                        stream_hidden: Optional[Sequence[jax.Array]] = None,
                        oracle_masks: Optional[Sequence[Optional[BlockMask]]] = None,
                        dense_block_masses: Optional[Sequence[Optional[jax.Array]]] = None,
                        top_k: int = 5, pruned_from: Optional[int] = None) -> FaithfulnessReport:
  """All faithfulness metrics in one pytree.

  Args:
    dense_logits, stream_logits: [..., T, V] logits of the dense and the Stream forward.
    trace: the Stream forward's Trace (for kept fractions, and the masks that recall/mass compare).
    dense_hidden, stream_hidden: per-layer residual outputs, each [..., T, D].
    oracle_masks: per layer, the mask that representative="oracle" gives on the same q, k (None for layers
      to skip, e.g. exact local layers).
    dense_block_masses: per layer, the exact dense block mass [..., N, nQ, nK] (short T only; None to skip).
    top_k: k of the top-k overlap.
    pruned_from: first position of the pruned regime (`pruned_start(T, config)`): the summary then also
      gives KL / top-1 / top-5 over it, and coverage over its query blocks.
  """
  outputs = output_metrics(dense_logits, stream_logits, top_k)
  return _report(outputs, trace=trace, dense_hidden=dense_hidden, stream_hidden=stream_hidden,
                 oracle_masks=oracle_masks, dense_block_masses=dense_block_masses, pruned_from=pruned_from)


def output_metrics(dense_logits: jax.Array, stream_logits: jax.Array, top_k: int = 5):
  """(kl, top1, top5) float32[..., T] each; NaN at positions where either logits row is not finite."""
  ok = _finite_rows(dense_logits, stream_logits)
  return (jnp.where(ok, next_token_kl(dense_logits, stream_logits), jnp.nan),
          jnp.where(ok, top1_agreement(dense_logits, stream_logits).astype(jnp.float32), jnp.nan),
          topk_overlap(dense_logits, stream_logits, top_k))


def output_metrics_from_hidden(dense_final: jax.Array, stream_final: jax.Array,
                               logits_fn: Callable[[jax.Array], jax.Array], *, chunk: int = 256,
                               top_k: int = 5, on_chunk: Optional[Callable[[int], None]] = None):
  """(kl, top1, top5) float32[..., T] from final residual streams [..., T, D], `chunk` positions at a time.

  A 262k-token vocabulary makes full logits 1 MiB per position (4 GiB at 4k tokens); logits_fn (the model's
  final norm + unembedding) runs on chunks so only chunk x V logits exist at once. The last chunk is padded
  to the chunk size (one compiled shape, not two). on_chunk(n): called after each chunk with its number of
  positions (a progress bar's update).

  logits_fn may be a `jax.tree_util.Partial` holding the parameters (e.g. `Partial(f, params)` with
  f(params, h)): they are then an argument of the compiled function. A plain closure over the parameters
  makes them compile-time constants (a 262k x 640 embedding is 0.7 GB that XLA folds on each compile: at
  4k tokens that took longer than both forwards together).
  """
  if isinstance(logits_fn, jax.tree_util.Partial):
    metrics = jax.jit(lambda f, d, s: output_metrics(f(d), f(s), top_k))
    fn = functools.partial(metrics, logits_fn)
  else:
    fn = jax.jit(lambda d, s: output_metrics(logits_fn(d), logits_fn(s), top_k))
  t = dense_final.shape[-2]
  chunk = max(1, min(chunk, t))
  parts = []
  for i in range(0, t, chunk):
    d, s = dense_final[..., i:i + chunk, :], stream_final[..., i:i + chunk, :]
    n = d.shape[-2]
    if n < chunk:  # pad with copies of the last row; the padded metrics are dropped below
      pad = [(0, 0)] * (d.ndim - 2) + [(0, chunk - n), (0, 0)]
      d, s = jnp.pad(d, pad, mode="edge"), jnp.pad(s, pad, mode="edge")
    out = fn(d, s)
    parts.append(tuple(x[..., :n] for x in out))
    if on_chunk is not None:
      jax.block_until_ready(out)
      on_chunk(n)
  return tuple(jnp.concatenate([p[k] for p in parts], axis=-1) for k in range(3))


def faithfulness_report_from_hidden(dense_hidden: Sequence[jax.Array], stream_hidden: Sequence[jax.Array],
                                    logits_fn: Callable[[jax.Array], jax.Array], *, chunk: int = 256,
                                    top_k: int = 5, on_chunk: Optional[Callable[[int], None]] = None,
                                    **kw) -> FaithfulnessReport:
  """`faithfulness_report` for long inputs: output metrics from the last hidden states through logits_fn
  in chunks (on_chunk: progress, see `output_metrics_from_hidden`); every hidden state also gives the
  per-layer residual error. kw: trace, oracle_masks, dense_block_masses, pruned_from."""
  outputs = output_metrics_from_hidden(dense_hidden[-1], stream_hidden[-1], logits_fn, chunk=chunk,
                                       top_k=top_k, on_chunk=on_chunk)
  return _report(outputs, dense_hidden=dense_hidden, stream_hidden=stream_hidden, **kw)


def pruned_start(q_len: int, config: StreamConfig, top_k: Optional[int] = None) -> int:
  """First position of the pruned regime: the first query block with more searchable key blocks than
  top_k (visible blocks strictly between the sink and the window blocks); q_len if there is none.

  Before it every query block keeps every visible block, so the sparse model equals dense there and
  averages over all positions flatter it: faithfulness is measured from here on.
  """
  k = config.top_k if top_k is None else top_k
  for j in range(-(-q_len // config.block_q)):
    last = min((j + 1) * config.block_q, q_len) - 1
    if last // config.block_k - config.window_blocks + 1 - config.sink_blocks > k:
      return j * config.block_q
  return q_len


def _report(outputs, *, trace=None, dense_hidden=None, stream_hidden=None, oracle_masks=None,
            dense_block_masses=None, pruned_from: Optional[int] = None) -> FaithfulnessReport:
  kl, top1, top5 = outputs
  fields = dict(kl=kl, top1=top1, top5=top5, kl_last=kl[..., -1], top1_last=top1[..., -1],
                top5_last=top5[..., -1], pruned_from=pruned_from)
  if dense_hidden is not None and stream_hidden is not None:
    fields["residual_error"] = residual_error(dense_hidden, stream_hidden)
  if trace is not None:
    kf = kept_fractions(trace)
    fields.update(kept_per_layer=kf.per_layer, kept_per_head=kf.per_head, kept_overall=kf.overall,
                  kept_stream=kf.stream)

    def per_layer(values, fn):
      if len(values) != len(trace.layers):
        raise ValueError(f"got {len(values)} per-layer entries for a trace of {len(trace.layers)} layers")
      return jnp.stack([jnp.nan if v is None else jnp.nanmean(fn(l.mask, v))
                        for l, v in zip(trace.layers, values)]).astype(jnp.float32)

    if any(l.coverage is not None for l in trace.layers):
      first = 0 if pruned_from is None else pruned_from // trace.layers[0].mask.block_q
      fields["coverage_per_layer"] = jnp.stack([
          jnp.float32(jnp.nan) if l.coverage is None or first >= l.coverage.shape[-1] or l.mode == "window"
          else jnp.mean(l.coverage[..., first:]) for l in trace.layers]).astype(jnp.float32)
    if oracle_masks is not None:
      fields["oracle_recall"] = per_layer(oracle_masks, oracle_recall)
    if dense_block_masses is not None:
      fields["dense_mass_share"] = per_layer(dense_block_masses, dense_mass_share)
  return FaithfulnessReport(**fields)


def format_report(report: FaithfulnessReport, title: str = "faithfulness") -> str:
  """A printable table: summary numbers, then one row per layer where per-layer numbers exist."""
  s = report.summary()
  lines = [f"== {title} =="]
  lines += [f"  {k:<22s} {v:10.4f}" for k, v in s.items()]
  cols = [(name, getattr(report, attr)) for name, attr in (
      ("kept", "kept_per_layer"), ("coverage", "coverage_per_layer"), ("resid_err", "residual_error"),
      ("oracle_rec", "oracle_recall"), ("dense_mass", "dense_mass_share")) if getattr(report, attr) is not None]
  if cols:
    lines.append("  layer " + " ".join(f"{n:>10s}" for n, _ in cols))
    for i in range(len(cols[0][1])):
      lines.append(f"  {i:5d} " + " ".join(f"{float(v[i]):10.4f}" for _, v in cols))
  return "\n".join(lines)


def format_rows(rows: Sequence[dict], keys: Sequence[str]) -> str:
  """A table of several reports' summaries (e.g. one row per length): rows of {key: value}."""
  head = " ".join(f"{k:>14s}" for k in keys)
  body = [" ".join(f"{r[k]:>14.4f}" if isinstance(r.get(k), float) else f"{str(r.get(k, '')):>14s}"
                   for k in keys) for r in rows]
  return "\n".join([head] + body)


# ---------------------------------------------------------------------------------------------------------
# Driving a model
# ---------------------------------------------------------------------------------------------------------

# forward(tokens, attention) -> TracedRun (stream_jax.trace: logits [B, T, V], trace or None, hidden
# [L, B, T, D] or None); attention is "dense" or a StreamConfig. The models' own entry fits directly:
# `lambda t, a: model.forward(t, attention=a, return_hidden=True)`; any other port returns a TracedRun.
Forward = Callable[[jax.Array, object], TracedRun]


def oracle_masks(trace: Trace, oracle_trace: Trace) -> list[Optional[BlockMask]]:
  """Per layer, the oracle run's mask where the Stream run estimated one (None for window/dense layers):
  the `oracle_masks` argument of the reports."""
  return [o.mask if l.mode in ESTIMATED_MODES else None
          for l, o in zip(trace.layers, oracle_trace.layers)]


def run_faithfulness(forward: Forward, tokens: jax.Array, config: StreamConfig = StreamConfig(), *,
                     oracle: bool = False, top_k: int = 5) -> FaithfulnessReport:
  """Runs `forward` dense and with Stream(config) on the same tokens and reports faithfulness.

  With oracle=True a third forward runs with representative="oracle" (exact top-k, O(T^2) scoring) and its
  masks serve as the recall reference. Its later layers see slightly different inputs than the Stream run
  (their predecessors attended through other masks); layer 0's comparison is exact.
  """
  dense, stream = forward(tokens, "dense"), forward(tokens, config)
  masks = None
  if oracle and stream.trace is not None:
    masks = oracle_masks(stream.trace, forward(tokens, config.replace(representative="oracle")).trace)
  return compare_runs(dense, stream, oracle_masks=masks, top_k=top_k)


def compare_runs(dense: TracedRun, stream: TracedRun, *, oracle_masks=None, top_k: int = 5,
                 pruned_from: Optional[int] = None) -> FaithfulnessReport:
  """The faithfulness report of two TracedRuns of the same tokens (dense, then Stream)."""
  return faithfulness_report(dense.logits, stream.logits, trace=stream.trace, dense_hidden=dense.hidden,
                             stream_hidden=stream.hidden, oracle_masks=oracle_masks, top_k=top_k,
                             pruned_from=pruned_from)
