"""The overview's numbers per layer and head: kept share, coverage, anchor (receiver) score, needle mass.

Computed once at export in O(nQ x C) per head (closed forms, no [nQ, bq, C] intermediate), so a 1M-token
trace's overview costs seconds; the values equal the library's (`LayerTrace.kept_fraction`,
`anchors.kurtosis` of `trace_vertical_scores`, `routes.trace_needle_mass`).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from stream_jax.mask import causal_interactions
from stream_jax.trace import LayerTrace, Trace

# Vertical scores build a sentence x sentence matrix per head: above this many sentences they are skipped.
MAX_SENTENCES = 4096


def _ramp_sum(x: np.ndarray, length: np.ndarray) -> np.ndarray:
  """sum_{u=0}^{x} clip(u, 0, length), 0 for x < 0 (int64, elementwise)."""
  x = np.maximum(x, -1)
  inside = np.minimum(x, length)
  return np.where(x < 0, 0, inside * (inside + 1) // 2 + np.maximum(x - length, 0) * length)


def kept_share(layer: LayerTrace) -> np.ndarray:
  """float64[N] kept (query, key) token pairs over those the layer's rule allows, as
  `layer.kept_fraction()`: per kept block the visible keys of a query form an interval, whose length summed
  over the block's queries is a difference of ramp sums."""
  m = layer.mask
  idx = np.asarray(m.indices).astype(np.int64)
  n_q = m.num_q_blocks
  off = m.k_len - m.q_len
  j = np.arange(n_q, dtype=np.int64)
  p0 = (off + j * m.block_q)[:, None]
  p1 = (off + np.minimum((j + 1) * m.block_q, m.q_len) - 1)[:, None]
  s0 = np.maximum(idx, 0) * m.block_k
  length = np.minimum(m.block_k, m.k_len - s0)
  n = _ramp_sum(p1 + 1 - s0, length) - _ramp_sum(p0 - s0, length)
  if layer.window is not None:
    w = layer.window
    n = n - (_ramp_sum(p1 + 1 - w - s0, length) - _ramp_sum(p0 - w - s0, length))
  n = np.where(idx >= 0, n, 0)
  return n.sum((-2, -1)) / float(causal_interactions(m.q_len, m.k_len, layer.window))


def coverage(layer: LayerTrace) -> Optional[np.ndarray]:
  """float64[N] mean coverage over query blocks (None when the trace has none)."""
  return None if layer.coverage is None else np.asarray(layer.coverage, np.float64).mean(-1)


def overview(trace: Trace, *, sentence_spans=None, needle_spans=None, top_heads: int = 20) -> dict:
  """{"kept": [L][N], "coverage": [L][N] | None, "anchor": [L][N] | None, "receivers": [[l, h], ...],
  "needle": [L][N] | None, "vertical": float32[L, N, S] | None, "importance": float32[S] | None}."""
  out = dict(kept=np.stack([kept_share(l) for l in trace.layers]))
  cov = [coverage(l) for l in trace.layers]
  out["coverage"] = (None if all(c is None for c in cov) else
                     np.stack([np.full(out["kept"].shape[1], np.nan) if c is None else c for c in cov]))
  out.update(anchor=None, receivers=[], vertical=None, importance=None, needle=None)
  if sentence_spans is not None and 0 < len(sentence_spans) <= MAX_SENTENCES:
    from stream_jax.analysis import anchors  # pylint: disable=import-outside-toplevel
    v = anchors.trace_vertical_scores(trace, np.asarray(sentence_spans, np.int32))
    heads, kurt = anchors.receiver_heads(v, top_heads)
    out.update(vertical=np.asarray(v, np.float32), anchor=np.asarray(kurt, np.float64),
               receivers=np.asarray(heads).tolist(),
               importance=np.asarray(anchors.sentence_importance(v, heads), np.float32))
  if needle_spans is not None and len(needle_spans):
    from stream_jax.analysis import routes  # pylint: disable=import-outside-toplevel
    out["needle"] = np.asarray(routes.trace_needle_mass(trace, np.asarray(needle_spans, np.int32)), np.float64)
  return out
