"""Calibrating the estimator's coverage budget against exact coverage, per model and layer (DESIGN §11).

An adaptive config keeps, per head and query block, the fewest searched blocks whose *estimated* share
reaches the target; the share of the dropped search range is estimated from one representative block per
dropped node, which under-estimates heavy-tailed attention, so the budget stops early: asked 0.95, the
real 270M's kept blocks held 0.89-0.90 of the true attention at 32k. `StreamConfig.dropped_scale`
multiplies that estimate, and layers differ (at 32k layer 11 needs 12 where layer 17 needs 2), so
`calibrate_budget` fits one scale per pruned layer (`StreamConfig.layer_scales`): the smallest of a grid
whose true coverage (an exact pass: output="exact" makes each trace's coverage the true share of the
estimator's kept set), mean over the pruned query blocks, reaches the target.

With exact output every layer's input is the dense model's whatever the kept sets are, so the layers
calibrate independently and at once: each pass runs every layer at its own candidate, a bisection over the
grid per layer (ceil(log2(len(scales) + 1)) passes). `budget_coverage` is the measurement: run it on
held-out text to check that the calibration transfers.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from stream_jax.config import StreamConfig
from stream_jax.experiments.settings import InputError, Settings, check_length

# Geometric-ish, 1 to 32: five passes cover it; at 32k the 270M's layers needed 2 to 12+ (RESULTS.md).
SCALES = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 24.0, 32.0)


@dataclasses.dataclass(frozen=True)
class BudgetCoverage:
  """One exact pass's measurement of a config's kept sets, per pruned layer (global layers, in order).

  coverage: mean true coverage over heads and the pruned query blocks (the kept blocks' dense share).
  kept: kept fraction of the layer's causal pairs (the whole sequence).
  """

  layers: tuple[int, ...]
  coverage: tuple[float, ...]
  kept: tuple[float, ...]

  @property
  def kept_mean(self) -> float:
    """Kept fraction, mean over the layers (= Trace.kept_fraction("global"))."""
    return float(np.mean(self.kept))

  def of(self, layer: int) -> float:
    return self.coverage[self.layers.index(layer)]

  def kept_of(self, layer: int) -> float:
    return self.kept[self.layers.index(layer)]


@dataclasses.dataclass(frozen=True)
class Calibration:
  """The calibrated config and how it was found.

  config: the input config with `layer_scales` set, one scale per pruned layer (the grid's largest where
    none reached the target: then that layer is in `unreached`, and the cap (top_k) or the block size is
    what limits its coverage).
  coverage: the calibration text's true coverage per layer at the chosen scales (measured, not predicted).
  passes: every exact pass, (the per-layer scales it ran, its BudgetCoverage).
  """

  config: StreamConfig
  coverage: BudgetCoverage
  unreached: tuple[int, ...]
  passes: tuple[tuple[tuple[tuple[int, float], ...], BudgetCoverage], ...]

  @property
  def reached(self) -> bool:
    return not self.unreached


def budget_coverage(model, tokens, config: StreamConfig, *, backend: str = "auto") -> BudgetCoverage:
  """The true coverage and kept fraction, per global layer, of `config`'s estimated kept sets on `tokens`
  (one exact forward; coverage over the pruned query blocks)."""
  from stream_jax.analysis.faithfulness import pruned_start  # pylint: disable=import-outside-toplevel
  from stream_jax.models import forward  # pylint: disable=import-outside-toplevel
  if config.coverage is None:
    raise ValueError("budget_coverage measures an adaptive budget: config.coverage must be set, got None")
  ids = np.asarray(tokens).reshape(-1)
  start = pruned_start(len(ids), config)
  if start >= len(ids):
    raise ValueError(f"{len(ids)} tokens never prune at block_q={config.block_q}, top_k={config.top_k}: "
                     "calibrate on a longer text (or a smaller top_k / block)")
  trace = forward(model, model.params, ids, attention=config, output="exact", last_only=True,
                  backend=backend).trace
  layers = trace.select(kind="global")
  return BudgetCoverage(tuple(l.layer for l in layers),
                        tuple(float(np.asarray(l.coverage, np.float64)[..., start // config.block_q:].mean())
                              for l in layers),
                        tuple(float(np.mean(np.asarray(l.kept_fraction(), np.float64))) for l in layers))


def calibrate_budget(model, tokens, config: StreamConfig, *, scales: Sequence[float] = SCALES,
                     backend: str = "auto", progress: bool = True) -> Calibration:
  """Per global layer, the smallest `dropped_scale` of `scales` whose exact coverage on `tokens` (mean over
  the pruned query blocks) reaches config.coverage; returned as `config.replace(layer_scales=...)`."""
  if config.coverage is None or config.select == "ideal":
    raise ValueError("calibrate_budget calibrates the estimator's adaptive budget: pass a config with "
                     f"coverage set and select 'search' or 'table', got coverage={config.coverage}, "
                     f"select={config.select!r}")
  grid = sorted({float(s) for s in scales})
  if not grid or grid[0] <= 0:
    raise ValueError(f"scales must be positive numbers, got {list(scales)}")
  from stream_jax.experiments.settings import progress_bar  # pylint: disable=import-outside-toplevel
  n = len(grid)
  bar = progress_bar(int(np.ceil(np.log2(n + 1))), "calibrating the coverage budget", "exact pass", progress)
  layers = model.config.global_layers
  if not layers:
    raise ValueError(f"{model.config.name} has no global layer: nothing prunes, nothing to calibrate")
  # Per layer, grid indices <= lo miss the target and indices >= hi reach it (hi = n: none known yet); a
  # layer that has converged re-runs its choice (the pass runs anyway).
  lo, hi, seen, passes = dict.fromkeys(layers, -1), dict.fromkeys(layers, n), {}, []
  try:
    while any(hi[l] - lo[l] > 1 for l in layers):
      tried = {l: (lo[l] + hi[l]) // 2 if hi[l] - lo[l] > 1 else min(hi[l], n - 1) for l in layers}
      got = budget_coverage(model, tokens, config.replace(layer_scales={l: grid[i] for l, i in tried.items()}),
                            backend=backend)
      passes.append((tuple((l, grid[i]) for l, i in tried.items()), got))
      for l, i in tried.items():
        seen[l, i] = (got.of(l), got.kept_of(l))
        if got.of(l) >= config.coverage:
          hi[l] = min(hi[l], i)
        else:
          lo[l] = max(lo[l], i)
      bar.update(1)
  finally:
    bar.close()
  chosen = {l: min(hi[l], n - 1) for l in layers}
  coverage = BudgetCoverage(layers, tuple(seen[l, chosen[l]][0] for l in layers),
                            tuple(seen[l, chosen[l]][1] for l in layers))
  return Calibration(config.replace(layer_scales={l: grid[i] for l, i in chosen.items()}), coverage,
                     tuple(l for l in layers if hi[l] == n), tuple(passes))


@dataclasses.dataclass(frozen=True)
class TextCalibration:
  """`calibrate_text`'s result: the calibration on a text and, with a held-out text, its check there.

  held_out: None, or (uncalibrated, calibrated) BudgetCoverage on the held-out text: whether the scales
    transfer (the issue's criterion: every layer within 0.02 of the target).
  """

  settings: Settings
  tokens: int
  calibration: Calibration
  held_out_tokens: int = 0
  held_out: Optional[tuple[BudgetCoverage, BudgetCoverage]] = None

  @property
  def target(self) -> float:
    return self.settings.config.coverage

  def layer_scales_flag(self) -> str:
    """The calibrated scales as the command line takes them: 5:5,11:6,17:2."""
    return ",".join(f"{l}:{s:g}" for l, s in self.calibration.config.layer_scales)

  def format(self) -> str:
    lines = [summary(self.calibration)]
    if self.held_out:
      before, after = self.held_out
      lines.append(f"held out ({self.held_out_tokens} tokens): uncalibrated " + _per_layer(before)
                   + "; calibrated " + _per_layer(after)
                   + f"; lowest layer - target {min(after.coverage) - self.target:+.3f}")
    return "\n".join(lines)


def _per_layer(b: BudgetCoverage) -> str:
  return " ".join(f"L{l} {c:.3f}" for l, c in zip(b.layers, b.coverage)) + f" (kept {b.kept_mean:.3f})"


def calibrate_text(model, text: str, settings: Settings, *, held_out: Optional[str] = None,
                   length: Optional[int] = None, scales: Sequence[float] = SCALES,
                   progress: bool = False) -> TextCalibration:
  """Tokenizes `text` (BOS first; its first `length` tokens when given) and calibrates settings.config's
  budget on it (`calibrate_budget`); with `held_out`, measures the uncalibrated and the calibrated budget
  on that text (same length cap) too. Calibrate on text of the length you will trace: the scales depend on
  it (the 270M's fit at 4k / 8k over-shoot at 16k: RESULTS, "Per-layer calibration at 16k")."""
  cfg = settings.config
  if cfg.coverage is None or cfg.select == "ideal":
    raise InputError("calibration fits the estimator's coverage budget: set coverage (and select 'search' "
                     f"or 'table'), got coverage={cfg.coverage}, select={cfg.select!r}", "coverage")
  if settings.dense_layers or settings.prune_local:
    raise InputError("calibration measures the global layers through exact passes: leave dense_layers and "
                     "prune_local unset", "dense_layers", "prune_local")
  if length is not None and length < 2:
    raise InputError(f"length must be >= 2, got {length}", "length")

  def encode(t: str, what: str) -> np.ndarray:
    if not t.strip():
      raise InputError(f"{what} is empty")
    ids = np.asarray(model.encode(t)).reshape(-1)[:length]
    check_length(model, len(ids), what)
    return ids

  ids = encode(text, "the calibration text")
  held = None if held_out is None else encode(held_out, "the held-out text")
  try:
    cal = calibrate_budget(model, ids, cfg, scales=scales, backend=settings.backend, progress=progress)
    checked = None if held is None else (budget_coverage(model, held, cfg, backend=settings.backend),
                                         budget_coverage(model, held, cal.config, backend=settings.backend))
  except ValueError as e:
    if "never prune" in str(e):  # too short for this block size and top_k
      raise InputError(str(e), "top_k", "block_q", "block_k") from None
    raise
  return TextCalibration(settings, len(ids), cal, 0 if held is None else len(held), checked)


def summary(cal: Calibration, target: Optional[float] = None) -> str:
  """A small table: per pass the scales tried and the coverage they gave; the choice per layer."""
  t = cal.config.coverage if target is None else target
  lines = ["pass | per layer: dropped_scale -> true coverage (pruned blocks), kept"]
  for p, (tried, got) in enumerate(cal.passes):
    lines.append(f"{p:>4} | " + "  ".join(f"L{l}: {s:g} -> {got.of(l):.3f}, {got.kept_of(l):.3f}"
                                          for l, s in tried))
  c = cal.coverage
  lines.append(f"chosen (target {t}): " + "  ".join(
      f"L{l}: {s:g} ({c.of(l):.3f}{', not reached' if l in cal.unreached else ''})" for l, s in cal.config.layer_scales)
      + f"; kept {c.kept_mean:.3f}")
  return "\n".join(lines)
