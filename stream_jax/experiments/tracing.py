"""A text traced with Stream and compared with dense on the same tokens: `faithfulness_pair`, `trace_text`."""

from __future__ import annotations

import dataclasses
import time
from typing import Mapping

import numpy as np

from stream_jax.analysis import faithfulness
from stream_jax.analysis.faithfulness import FaithfulnessReport
from stream_jax.experiments.settings import (
    InputError, Settings, check_length, logits_fn, progress_bar, pruning_notes)
from stream_jax.trace import Trace


@dataclasses.dataclass(frozen=True)
class FaithfulnessPair:
  """Dense and Stream forwards on the same tokens: the Stream run's trace (one row, no batch axis), the
  FaithfulnessReport (over every position; `pruned_from` marks the pruned regime) and wall times (s)."""

  trace: Trace
  report: FaithfulnessReport
  timings: Mapping[str, float]
  tokens: int

  @property
  def kept(self) -> float:
    """Kept share of causal token pairs in the Stream-estimated layers (0.0 when none ran)."""
    return self.report.summary().get("kept_stream", 0.0)


def faithfulness_pair(model, ids, settings: Settings = Settings(), *, output: str = "sparse",
                      oracle: bool = False, progress: bool = False) -> FaithfulnessPair:
  """Runs `model` dense and with Stream on ids int[T] and measures faithfulness.

  Output metrics come from the last residual states through the model's unembedding in chunks
  (`faithfulness.faithfulness_report_from_hidden`: no T x V logits), so long inputs fit. output="exact":
  the Stream run computes dense attention and its trace observes it (mass, coverage). oracle=True adds a
  third forward with representative="oracle" (exact top-k, O(T^2) scoring) for recall per layer.
  """
  ids = np.asarray(ids)
  if ids.ndim != 1:
    raise ValueError(f"faithfulness_pair takes one sequence int[T], got shape {ids.shape}")
  common = dict(return_hidden=True, last_only=True, backend=settings.backend)
  stream_kw = dict(settings.forward_kw(), return_hidden=True, last_only=True)
  timings = {}
  bar = progress_bar(3 if oracle else 2, "forward passes", "pass", progress)
  t0 = time.perf_counter()
  d_hidden = model.forward(ids, attention="dense", **common).row(0).hidden
  d_hidden.block_until_ready()
  timings["dense_forward_s"] = time.perf_counter() - t0
  bar.update()
  t0 = time.perf_counter()
  run = model.forward(ids, output=output, coverage=True, **stream_kw).row(0)
  run.hidden.block_until_ready()
  timings["stream_forward_s"] = time.perf_counter() - t0
  bar.update()
  masks = None
  if oracle:
    o_kw = dict(stream_kw, attention=settings.config.replace(representative="oracle"), return_hidden=False)
    masks = faithfulness.oracle_masks(run.trace, model.forward(ids, **o_kw).row(0).trace)
    bar.update()
  bar.close()
  t0 = time.perf_counter()
  bar = progress_bar(len(ids), "faithfulness metrics", "tok", progress)
  report = faithfulness.faithfulness_report_from_hidden(
      list(d_hidden), list(run.hidden), logits_fn(model), trace=run.trace, oracle_masks=masks,
      pruned_from=faithfulness.pruned_start(len(ids), settings.config), on_chunk=bar.update)
  bar.close()
  timings["metrics_s"] = time.perf_counter() - t0
  return FaithfulnessPair(run.trace, report, timings, len(ids))


class FromPair:
  """Results holding a FaithfulnessPair (`pair`): its trace and report read through."""

  @property
  def trace(self) -> Trace:
    return self.pair.trace  # pylint: disable=no-member

  @property
  def report(self) -> FaithfulnessReport:
    return self.pair.report  # pylint: disable=no-member


@dataclasses.dataclass(frozen=True)
class TextTrace(FromPair):
  """`trace_text`: a text traced with Stream and compared with dense."""

  text: str
  ids: np.ndarray
  pair: FaithfulnessPair
  settings: Settings
  output: str

  @property
  def notes(self) -> dict[str, str]:
    """Notices for the reader: {"pruning does nothing": ...} when Stream kept (nearly) everything."""
    return pruning_notes(self.pair.kept, len(self.ids), self.settings.config)


def trace_text(model, text: str, settings: Settings = Settings(), *, output: str = "sparse",
               oracle: bool = False, progress: bool = False) -> TextTrace:
  """Tokenizes `text` (BOS first), checks its length against the model's context, and runs
  `faithfulness_pair` on it."""
  if not text.strip():
    raise InputError("the input text is empty")
  ids = model.encode(text)
  check_length(model, len(ids), "the input")
  pair = faithfulness_pair(model, ids, settings, output=output, oracle=oracle, progress=progress)
  return TextTrace(text, ids, pair, settings, output)
