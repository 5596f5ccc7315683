"""StreamConfig: the knobs of hierarchical top-k block-mask estimation.

Frozen and hashable so it can be a static argument of `jax.jit`; validated on construction so a bad value
fails here, with the parameter's name, rather than deep inside XLA.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Literal, Mapping, Optional

from stream_jax.numerics import num_rounds

Representative = Literal["center", "first", "oracle"]
REPRESENTATIVES = ("center", "first", "oracle")
MAX_SIZE = 1 << 20  # larger block sizes or counts are typos; they would fail later as out-of-memory
Score = Literal["max", "mass"]
SCORES = ("max", "mass")
Select = Literal["search", "ideal", "table"]
SELECTS = ("search", "ideal", "table")
# search_share="auto" (StreamConfig.faithful()'s): (rounds, P) steps: the search's upper rounds shared by P
# query blocks where it runs at least that many rounds, else per query block. Measured on faithful()'s
# estimate per global layer (H100, 8 q / 4 kv heads, head dim 256, Mosaic GPU): sharing by 8 takes 1.17x
# less time at 32k (2 rounds), 1.43x at 64k (3), 1.68x at 128k (4), 2.18x at 256k, 2.55x at 512k and
# 2.93x at 1M (7), by 16 3.45x at 1M; on the real 270M at 32k both keep the per-block search's kept
# fraction and true coverage (benchmarks/RESULTS.md).
AUTO = "auto"
AUTO_SHARES = ((3, 8), (7, 16))


def _is_pow2(x: int) -> bool:
  return x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class StreamConfig:
  """How a block-sparse mask is estimated.

  Defaults, and why:
    block_q = block_k = 64: a block is a few sentences of text, fine enough for analysis, and 64-row tiles
      keep the matmuls of the estimator and of the attention kernels on tensor cores.
    top_k = 16, coverage = None: the published method's setting, a fixed 16 searched key blocks per
      query block by max logit; the Pallas estimate kernel implements it, and the scaling benchmarks time
      it. It is fast but not faithful at long context. Measured (benchmarks/faithfulness.py, the real
      Gemma 3 270M, two real-prose sources, 32k tokens, metrics over the pruned positions, f32): it keeps
      7% of the global layers' causal pairs for next-token KL 0.08-0.21 nats and top-1 agreement
      0.87-0.88. For analysis prefer `StreamConfig.faithful()` (coverage 0.95, top_k 128, mass scores):
      31% kept for KL 0.004-0.009 and top-1 0.970-0.977, where fixed k = 64 keeps 24% for KL 0.025-0.033
      and fixed k = 128 keeps 45% for KL 0.007-0.010: sharp heads need few blocks and diffuse heads many,
      which a fixed k cannot serve. coverage = 0.9 keeps 23% (KL 0.006-0.015, top-1 0.958-0.965).
    sink_blocks = 1: the first block (BOS, the "attention sink") takes a large share of the mass in every
      head; always keeping it costs one block.
    window_blocks = 2: the diagonal block and the one before it, so every query sees at least block_k
      recent keys.
    init_branches = None (= top_k): the width of the first level of the search tree.
    representative = "center": on text-like keys (contiguous spans that share a topic, so neighbouring
      blocks correlate) it finds 0.90-0.92 of the oracle's searched blocks against 0.88-0.90 for "first"
      (tests/test_estimate.py); "first" is cheaper (the left child reuses its parent's score) and is
      better on keys without locality.
    query_stride = 1: score with every query of the block; 2 or 4 halve or quarter the estimator's FLOPs.
    search_share = 1 (faithful(): "auto"): every query block runs its own search. The search scores
      2 x top_k nodes a round and its rounds grow as log T (at 1M tokens and top_k 128, 1,920 representative
      blocks per query block); search_share = P runs all but the last round once for P neighbouring query
      blocks, scored by every P-th of their scoring queries, and each query block scores the last round's
      children (single blocks) and the few blocks between the shared range and its own window with its own
      queries, and keeps its own set: about (branches + 2 top_k (rounds - 1)) / P + 2 top_k blocks per
      query block (675 at 1M for P = 4, 471 for P = 8). On the real 270M at 4k the budget's true coverage
      moves by at most 0.001 (tests/test_estimate.py); at 32k sharing by 8 or 16 keeps the kept fraction and
      true coverage within 0.002 (benchmarks/RESULTS.md). "auto" decides per call from its length
      (AUTO_SHARES): P = 8 once the search has 3 rounds (from 64k tokens at faithful()'s 64-token blocks
      and cap 128: its estimate 1.43x faster at 64k, 2.9x at 1M), 16 from 7 rounds (1M: 3.45x), else 1.
    score = None: "mass" with a coverage target, else "max". "max": a block's score is its max visible
      logit (the paper's); "mass" estimates the attention probability the block receives (per scoring
      query a log-sum-exp over the block's keys, normalised by an estimate of the query's softmax
      denominator), which tracks what the kept blocks hold (at 32k, fixed k = 64: KL 0.011-0.031 with
      "mass" against 0.025-0.033 with "max").
    select = "search": the hierarchical search estimates the kept set (the paper's, O(T log T)). "ideal"
      ranks the search range's blocks by their *true* attention mass, from the dense pass's log-sum-exp
      (stream_jax/ideal.py): one more Q K^T over the causal blocks, and the kept set, its mass and its
      coverage are exact. It is the right choice with output="exact" (the dense pass runs anyway); with
      sparse outputs it measures the best any selector of the budget can do. See `StreamConfig.ideal()`.
      "table" scores every causal block once, by the true attention mass it gets from a sample of each
      query block's queries (every query_stride-th, each under its own exact softmax over all its visible
      keys), and keeps the ideal set of that sample (stream_jax/table.py): no dense pass and no search, two
      Q Kᵀ passes over the causal blocks for 1 / query_stride of the queries. The coverage target then
      holds for the sampled queries, and what it misses on the others is the sampling error, not an
      estimate's bias. See `StreamConfig.table()`.
    coverage: None keeps top_k searched blocks per query block. A target in (0, 1] makes the budget
      adaptive: top_k becomes the most a query block may keep, and each (head, query block) keeps the
      fewest searched blocks, by estimated mass, whose estimated share of the attention (sink and window
      included) reaches the target. Needs score="mass".

  Integer fields take Python or numpy integers (stored as int, so equal configs hash equally); booleans,
  floats and values above 2**20 are refused.

  Attributes:
    block_q: queries per query block (power of two).
    block_k: keys per key block (power of two).
    top_k: key blocks kept by the search per query block (besides sink and window).
    sink_blocks: leading key blocks always kept (>= 0).
    window_blocks: key blocks ending at the diagonal block always kept (>= 1: the diagonal is needed).
    init_branches: nodes of the first level (>= top_k); None means top_k.
    representative: which key block scores a node: "center" (its middle block), "first" (its first
      block; the left child reuses its parent's score), "oracle" (max over every block: the exact
      top-k, O(T^2) time, for tests and small inputs).
    query_stride: score with every query_stride-th query of the block, counted back from its last
      valid query (power of two dividing block_q).
    search_share: neighbouring query blocks that run the search's upper rounds together (power of two, at
      most block_q / query_stride: the shared rounds score every search_share-th of each one's rows);
      select="search" and center or first representatives only. Or "auto": chosen per call from the
      length (`for_length`; 1 where sharing does not apply, and on the Triton kernel, which runs one
      search per query block).
    score: "max" (max logit of the representative block) or "mass" (estimated attention mass).
    coverage: None (fixed k) or the adaptive target share of attention in (0, 1].
    select: "search" (estimate the kept set), "ideal" (rank blocks by their true mass) or "table" (rank
      them by the true mass a sample of the queries gives them).
    dropped_scale: with a coverage budget, the search's estimate of the mass it dropped (each dropped
      node's representative block x the node's size) is multiplied by this before the budget compares.
      Attention is heavy-tailed, so a node's representative under-estimates the node's mean and the
      budget stops early (asked 0.95, the 270M's kept blocks held 0.89-0.90 at 32k); a scale > 1 keeps
      more. `stream_jax.experiments.calibration.calibrate_budget` learns it per model from an exact pass.
    layer_scales: per-layer dropped_scale, ((layer id, scale), ...) (a dict is accepted); layers not named
      use dropped_scale. One scale cannot serve every layer (at 32k the 270M's layer 11 needs 12 where
      layer 17 needs 2, and the easy layers then keep far more than they need), so `calibrate_budget`
      fits one per layer. The model's plans resolve it (`for_layer`); an op on one layer's q / k takes
      `config.for_layer(layer)`.
  """

  block_q: int = 64
  block_k: int = 64
  top_k: int = 16
  sink_blocks: int = 1
  window_blocks: int = 2
  init_branches: int | None = None
  representative: Representative = "center"
  query_stride: int = 1
  search_share: int | Literal["auto"] = 1
  score: Optional[Score] = None
  coverage: Optional[float] = None
  select: Select = "search"
  dropped_scale: float = 1.0
  layer_scales: tuple[tuple[int, float], ...] = ()

  def __post_init__(self):
    # Integers of any kind (numpy's too) become plain ints; booleans, floats and absurd sizes are refused.
    for name in ("block_q", "block_k", "top_k", "sink_blocks", "window_blocks", "init_branches",
                 "query_stride", "search_share"):
      value = getattr(self, name)
      if (value is None and name == "init_branches") or (value == AUTO and name == "search_share"):
        continue
      if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = "an integer or 'auto'" if name == "search_share" else "an integer"
        raise ValueError(f"StreamConfig.{name} must be {kind}, got {value!r} ({type(value).__name__})")
      if int(value) > MAX_SIZE:
        raise ValueError(f"StreamConfig.{name} must be <= {MAX_SIZE} (2**20), got {value!r}")
      object.__setattr__(self, name, int(value))
    for name in ("block_q", "block_k"):
      value = getattr(self, name)
      if not isinstance(value, int) or not _is_pow2(value):
        raise ValueError(f"StreamConfig.{name} must be a positive power of two, got {value!r}")
    if not isinstance(self.top_k, int) or self.top_k < 1:
      raise ValueError(f"StreamConfig.top_k must be an integer >= 1, got {self.top_k!r}")
    if not isinstance(self.sink_blocks, int) or self.sink_blocks < 0:
      raise ValueError(f"StreamConfig.sink_blocks must be an integer >= 0, got {self.sink_blocks!r}")
    if not isinstance(self.window_blocks, int) or self.window_blocks < 1:
      raise ValueError(
          "StreamConfig.window_blocks must be an integer >= 1 (the diagonal block is always kept), "
          f"got {self.window_blocks!r}")
    if self.init_branches is not None and (
        not isinstance(self.init_branches, int) or self.init_branches < self.top_k):
      raise ValueError(
          f"StreamConfig.init_branches must be None or an integer >= top_k={self.top_k}, "
          f"got {self.init_branches!r}")
    if self.representative not in REPRESENTATIVES:
      raise ValueError(
          f"StreamConfig.representative must be one of {REPRESENTATIVES}, got {self.representative!r}")
    if (not isinstance(self.query_stride, int) or not _is_pow2(self.query_stride)
        or self.query_stride > self.block_q):
      raise ValueError(
          "StreamConfig.query_stride must be a power of two in [1, block_q="
          f"{self.block_q}], got {self.query_stride!r}")
    if self.search_share != AUTO and (not _is_pow2(self.search_share)
                                      or self.search_share > self.block_q // self.query_stride):
      raise ValueError(
          "StreamConfig.search_share must be 'auto' or a power of two in [1, block_q / query_stride="
          f"{self.block_q // self.query_stride}], got {self.search_share!r}")
    if self.coverage is not None:
      cov = self.coverage
      if isinstance(cov, bool) or not isinstance(cov, numbers.Real) or not 0.0 < float(cov) <= 1.0:
        raise ValueError(f"StreamConfig.coverage must be None or a number in (0, 1], got {cov!r}")
      object.__setattr__(self, "coverage", float(cov))
    if self.score is None:
      object.__setattr__(self, "score", "max" if self.coverage is None else "mass")
    if self.score not in SCORES:
      raise ValueError(f"StreamConfig.score must be None or one of {SCORES}, got {self.score!r}")
    ds = self.dropped_scale
    if isinstance(ds, bool) or not isinstance(ds, numbers.Real) or not 0.0 < float(ds) <= 1e4:
      raise ValueError(f"StreamConfig.dropped_scale must be a number in (0, 1e4], got {ds!r}")
    object.__setattr__(self, "dropped_scale", float(ds))
    object.__setattr__(self, "layer_scales", _layer_scales(self.layer_scales))
    if self.select not in SELECTS:
      raise ValueError(f"StreamConfig.select must be one of {SELECTS}, got {self.select!r}")
    if self.search_share not in (1, AUTO) and (self.select != "search" or self.representative == "oracle"):
      raise ValueError(
          f"StreamConfig.search_share={self.search_share} shares the search's rounds, so it needs "
          f"select='search' and a center or first representative, got select={self.select!r}, "
          f"representative={self.representative!r}")
    if self.coverage is not None and self.score != "mass":
      raise ValueError("StreamConfig.coverage (an adaptive budget) needs score='mass' (or None), got "
                       f"score={self.score!r}; pass coverage=None for a fixed top_k with max-logit scores")

  @classmethod
  def faithful(cls, **changes) -> "StreamConfig":
    """The measured best frontier point for analysis: an adaptive budget (coverage 0.95 of each query
    block's estimated attention, at most 128 searched blocks) with mass scores, and the search's upper
    rounds shared by 8 query blocks from 64k tokens, 16 at 1M (search_share="auto"). The Pallas estimate
    kernels run it on a GPU: at 128k (8 heads, head dim 256) 59 ms per layer on an H100's Mosaic kernel
    (99 ms searching per query block; 0.18 s on the Triton kernel, which always does), against 1.08 s for
    the XLA path. The 4B forward then costs 0.93x a plain one at 128k, and 1.16x the default sparse trace
    at 1M (H100; 1.54x searching per query block). Pass search_share=1 for one search per query block at
    every length. See the class docstring for the faithfulness numbers."""
    return cls(**{"top_k": 128, "coverage": 0.95, "search_share": AUTO, **changes})

  @classmethod
  def ideal(cls, **changes) -> "StreamConfig":
    """The ideal trace: each query block keeps the fewest key blocks, ranked by their true attention mass,
    that hold 95% of its attention (sink and window included; at most 128 searched blocks). With
    output="exact" the model's output is the dense one and the trace's mass and coverage are exact."""
    return cls(**{"top_k": 128, "coverage": 0.95, "select": "ideal", **changes})

  @classmethod
  def table(cls, **changes) -> "StreamConfig":
    """`faithful()`'s budget without its search: every causal block scored once by the true mass that
    every 4th query of its query block gives it, and the fewest heaviest blocks holding 95% of that
    sample's attention kept (at most 128 searched blocks). Measured (H200, Gemma 3 4B config, bf16): the
    forward takes 0.90x a plain cuDNN forward at 128k where faithful() takes 1.19x (the estimate per global
    layer 55 ms against the search's 181 ms and cuDNN attention's 127 ms); on the real 270M at 32k it holds
    0.922-0.926 of the true attention at 29-30% kept (faithful(): 0.918), next-token KL 0.0053-0.0074. The
    table is O(T^2 / query_stride): at 1M tokens it takes 2.3x the default sparse trace (faithful(): 1.16x;
    query_stride 32: 1.3x). On Hopper a Mosaic GPU kernel runs it; elsewhere the XLA path."""
    return cls(**{"top_k": 128, "coverage": 0.95, "select": "table", "query_stride": 4, **changes})

  @property
  def adaptive(self) -> bool:
    """Whether the kept count per query block follows a coverage target."""
    return self.coverage is not None

  @property
  def branches(self) -> int:
    """Width of the first level of the search tree."""
    return self.top_k if self.init_branches is None else self.init_branches

  @property
  def capacity(self) -> int:
    """C: kept key blocks per query block at most (sink + searched + window)."""
    return self.sink_blocks + self.top_k + self.window_blocks

  def for_layer(self, layer: int) -> "StreamConfig":
    """The config layer `layer` runs: its own dropped_scale (from layer_scales), no per-layer table (so
    layers with equal settings share one compiled op)."""
    if not self.layer_scales:
      return self
    return dataclasses.replace(self, dropped_scale=dict(self.layer_scales).get(int(layer), self.dropped_scale),
                               layer_scales=())

  def for_length(self, key_len: int, *, shares: bool = True) -> "StreamConfig":
    """The config a call over `key_len` keys runs: search_share="auto" resolved to a number (AUTO_SHARES: 8
    from 3 rounds, 16 from 7, else 1; at most block_q / query_stride; 1 wherever sharing does not apply, and
    where `shares` is False: an implementation that searches per query block). Each op entry resolves it,
    so masks record the number that ran."""
    if self.search_share != AUTO:
      return self
    rounds = num_rounds(-(-int(key_len) // self.block_k), self.branches)
    share = max([p for r, p in AUTO_SHARES if rounds >= r], default=1)
    if self.select != "search" or self.representative == "oracle" or not shares:
      share = 1
    return dataclasses.replace(self, search_share=min(share, self.block_q // self.query_stride))

  def replace(self, **changes) -> "StreamConfig":
    """A copy with `changes`; changing `coverage` without naming `score` re-derives the score (so
    `StreamConfig().replace(coverage=0.9)` is adaptive with mass scores, and back with coverage=None)."""
    if "coverage" in changes and "score" not in changes:
      changes["score"] = None
    return dataclasses.replace(self, **changes)


def _layer_scales(value) -> tuple[tuple[int, float], ...]:
  """((layer, scale), ...) sorted by layer, from a mapping or pairs (lists too: a trace's saved config)."""
  name = "StreamConfig.layer_scales"
  pairs = value.items() if isinstance(value, Mapping) else value
  try:
    pairs = [tuple(p) for p in pairs]
  except TypeError:
    raise ValueError(f"{name} must be a dict or pairs (layer id, scale), got {value!r}") from None
  out = {}
  for p in pairs:
    if len(p) != 2:
      raise ValueError(f"{name} must be a dict or pairs (layer id, scale), got the entry {p!r}")
    layer, scale = p
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 0 <= int(layer) <= MAX_SIZE:
      raise ValueError(f"{name}: layer ids must be integers >= 0, got {layer!r}")
    if (isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale))
        or not 0.0 < float(scale) <= 1e4):
      raise ValueError(f"{name}: scales must be numbers in (0, 1e4] (like StreamConfig.dropped_scale), got {scale!r} for "
                       f"layer {layer}")
    if int(layer) in out:
      raise ValueError(f"{name}: layer {int(layer)} is named twice")
    out[int(layer)] = float(scale)
  return tuple(sorted(out.items()))
