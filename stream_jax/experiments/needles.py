"""Needle-in-a-haystack sweeps (RULER niah tasks): prompts answered greedily after a Stream prefill, the
needle's mass and route per prompt, success vs failure compared within each length and depth."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from stream_jax.analysis import niah, routes
from stream_jax.analysis.causal import RouteVerification
from stream_jax.analysis.niah import NiahSample, NiahTask
from stream_jax.analysis.routes import GroupedComparison, Route
from stream_jax.experiments import ablation
from stream_jax.experiments.settings import (
    InputError, Settings, check_length, NIAH_MIN_TOKENS, progress_bar, pruning_notes)
from stream_jax.trace import Trace


@dataclasses.dataclass(frozen=True)
class NiahRow:
  """One needle prompt answered greedily after a Stream prefill.

  depth: the requested needle depth in percent (None: the task's own, random per seed); trace: the
  prefill's Trace (one row), the attention that produced the answer; needle_mass: float32[L, N] share of
  the final query block's attention on the needle's blocks; route: `routes.route` of the trace when asked.
  dense_*: the same prompt answered with dense attention (when asked).
  """

  sample: NiahSample
  depth: Optional[float]
  seed: int
  prediction: str
  score: float
  needle_mass: np.ndarray
  kept_fraction: float
  trace: Trace
  route: Optional[Route] = None
  dense_prediction: Optional[str] = None
  dense_score: Optional[float] = None

  @property
  def length(self) -> int:
    return self.sample.length

  @property
  def success(self) -> bool:
    return self.score == 1

  @property
  def needle_blocks(self) -> tuple[int, ...]:
    return self.sample.needle_blocks(self.trace.layers[0].mask.block_k)

  @property
  def needle_depth(self) -> float:
    """Where the (first asked) needle value starts, in percent of the prompt."""
    return float(100 * int(self.sample.value_spans[0, 0]) / self.length)

  @property
  def visible(self) -> np.ndarray:
    """bool[L]: layers whose final query block can reach the needle (`routes.needle_visible`)."""
    return routes.needle_visible(self.trace, self.sample.value_spans)

  def to_json(self) -> dict:
    """The row of report.json's "samples"."""
    return dict(length=self.length, depth=self.depth, seed=self.seed, answers=self.sample.answers,
                prediction=self.prediction, score=self.score, kept_fraction=self.kept_fraction,
                needle_mass_per_layer=self.needle_mass.mean(-1))


@dataclasses.dataclass(frozen=True)
class NiahSweep:
  """`niah_sweep`: rows in job order (length, then depth, then sample), and the success-vs-failure
  comparison of needle mass within each length and depth, over the layers that can see the needle."""

  variant: str
  rows: tuple[NiahRow, ...]
  comparison: GroupedComparison
  settings: Settings
  ablation: Optional[RouteVerification] = None  # when the sweep verified routes

  def by_length(self) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for r in self.rows:
      out.setdefault(r.length, []).append(r.score)
    return dict(sorted(out.items()))

  def success_rates(self) -> dict[int, float]:
    """Percent of rows per length whose answer holds every expected value (string_match_all)."""
    return {n: float(100 * np.mean(v)) for n, v in self.by_length().items()}

  @property
  def notes(self) -> dict[str, str]:
    """Per length where Stream kept (nearly) everything: {"<n> tokens: pruning does nothing": ...}."""
    out = {}
    for n in self.by_length():
      kept = min(r.kept_fraction for r in self.rows if r.length == n)
      out.update({f"{n} tokens: {k}": v for k, v in pruning_notes(kept, n, self.settings.config).items()})
    return out

  def table(self) -> str:
    lines = ["length  samples  string_match_all (%)"]
    lines += [f"{n:6d}  {len(v):7d}  {100 * np.mean(v):8.1f}" for n, v in self.by_length().items()]
    return "\n".join(lines)


def compare_niah_rows(rows: Sequence[NiahRow]) -> GroupedComparison:
  """routes.compare_groups of the rows' needle mass, successes vs failures within each (length, depth),
  over the layers that can see the needle in every prompt of the group."""
  return routes.compare_groups([r.needle_mass for r in rows], [r.success for r in rows],
                               [r.length for r in rows], [r.depth for r in rows],
                               [r.needle_depth for r in rows], visible=[r.visible for r in rows])


def check_needle_length(length: int) -> None:
  if length < NIAH_MIN_TOKENS:
    raise InputError(f"length must be >= {NIAH_MIN_TOKENS} (the needle, the question and the template "
                     f"take about 90 tokens), got {length}", "length")


def niah_task(variant: Union[str, NiahTask], lengths: Sequence[int], depths: Sequence[float] = ()
              ) -> NiahTask:
  """The task of a sweep after checking its arguments (InputError naming the parameter); runs before any
  model loads."""
  if isinstance(variant, NiahTask):
    task = variant
  elif variant not in niah.VARIANTS:
    raise InputError(f"variant must be one of {sorted(niah.VARIANTS)}, got {variant!r}", "variant")
  else:
    task = niah.VARIANTS[variant]
  if any(not 0 <= d <= 100 for d in depths):
    raise InputError(f"depths are percentages in [0, 100], got {list(depths)}", "depths")
  if not lengths:
    raise InputError("lengths needs at least one prompt length (e.g. 600 and 3000 tokens)", "lengths")
  short = [n for n in lengths if n < NIAH_MIN_TOKENS]
  if short:
    raise InputError(f"lengths entries must be >= {NIAH_MIN_TOKENS} tokens (the needles, the question "
                     f"and the template take about 90), got {','.join(map(str, short))}", "lengths")
  return task


def answer_niah(model, samples: Sequence[NiahSample], settings: Settings = Settings(), *,
                max_new_tokens: int = 12, batch_size: int = 1, dense: bool = False,
                route: Optional[Mapping[str, Any]] = None, depths: Optional[Sequence] = None,
                seeds: Optional[Sequence[int]] = None, progress: bool = False) -> tuple[NiahRow, ...]:
  """Answers needle prompts greedily after a Stream prefill and reads each prefill's trace.

  batch_size: consecutive prompts of the same length share one `generate` call (up to this many rows).
  dense: also answer every prompt with dense attention. route: kwargs of `routes.route` (e.g. {} for its
  defaults) to also follow each needle's route; None skips it. depths / seeds: recorded in the rows.
  """
  samples = list(samples)
  depths = [None] * len(samples) if depths is None else list(depths)
  seeds = [0] * len(samples) if seeds is None else list(seeds)
  batches, i = [], 0
  while i < len(samples):
    j = i + 1
    while j < len(samples) and j - i < max(1, batch_size) and samples[j].length == samples[i].length:
      j += 1
    batches.append((i, j))
    i = j
  bar = progress_bar(len(samples), "niah samples", "sample", progress)
  rows = []
  for i, j in batches:
    ids = np.stack([s.ids for s in samples[i:j]])
    gen = model.generate(ids, max_new_tokens=max_new_tokens, **settings.forward_kw())
    dense_text = None
    if dense:
      dense_text = model.generate(ids, max_new_tokens=max_new_tokens, prune_local=settings.prune_local,
                                  backend=settings.backend).text
    for b, s in enumerate(samples[i:j]):
      trace = gen.prefill.row(b).trace  # the Stream prefill's trace: the attention that produced the answer
      spans = s.value_spans
      nm = np.asarray(routes.trace_needle_mass(trace, spans))
      rows.append(NiahRow(
          sample=s, depth=depths[i + b], seed=seeds[i + b], prediction=gen.text[b],
          score=niah.match_all(gen.text[b], s.answers), needle_mass=nm,
          kept_fraction=float(trace.kept_fraction()), trace=trace,
          route=None if route is None else routes.route(trace, spans, **route),
          dense_prediction=None if dense_text is None else dense_text[b],
          dense_score=None if dense_text is None else niah.match_all(dense_text[b], s.answers)))
      bar.update()
  bar.close()
  return tuple(rows)


def niah_sweep(model, lengths: Sequence[int], settings: Settings = Settings(), *,
               variant: Union[str, NiahTask] = "single_1", depths: Sequence[float] = (), samples: int = 4,
               seed: int = 0, haystack: Optional[str] = None, max_new_tokens: int = 12,
               batch_size: int = 1, dense: bool = False, route: Optional[Mapping[str, Any]] = None,
               verify_routes: int = 0, progress: bool = False) -> NiahSweep:
  """RULER needle prompts fitted to each length (per length, per depth if given, `samples` seeds
  seed, seed + 1, ...), answered after a Stream prefill (`answer_niah`), scored by string match, with the
  needle mass of each prefill's trace and its comparison between successes and failures.

  verify_routes=R > 0 also runs the causal test on the same prompts (`ablation.verify_routes`, the dense
  model traced exactly): for each answered prompt, the needle blocks suppressed in the route's heads vs R
  draws of as many random kept blocks in the same heads vs the needle in every head; answer flips counted."""
  task = niah_task(variant, lengths, depths)
  for n in lengths:
    check_length(model, n, f"lengths entry {n}", "lengths")
  jobs = [(n, d, s) for n in lengths for d in (depths or (None,)) for s in range(samples)]
  prompts = []
  for length, depth, s in jobs:
    t = task if depth is None else dataclasses.replace(
        task, depths=(float(depth),) * (task.num_keys * task.num_values))
    prompts.append(niah.generate_sample(model.tokenizer, length, t, seed=seed + s, haystack_text=haystack))
  rows = answer_niah(model, prompts, settings, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     dense=dense, route=route, depths=[d for _, d, _ in jobs],
                     seeds=[seed + s for _, _, s in jobs], progress=progress)
  name = variant if isinstance(variant, str) else "custom"
  verified = None
  if verify_routes:
    kw = dict(route or {})
    verified = ablation.verify_routes(model, model.params, prompts, settings.config, n_random=int(verify_routes),
                                      seed=seed, max_new_tokens=max_new_tokens, tokenizer=model.tokenizer,
                                      everywhere=True, progress=progress, backend=settings.backend,
                                      residual=kw.get("residual", 0.5), threshold=kw.get("threshold", 1e-3))
  return NiahSweep(name, rows, compare_niah_rows(rows), settings, verified)
