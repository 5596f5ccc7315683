"""Thought anchors of a text (a chain of thought): sentence-level receiver scores from the Stream trace."""

from __future__ import annotations

import dataclasses

import numpy as np

from stream_jax.analysis import anchors
from stream_jax.analysis.anchors import AnchorReport, Sentences
from stream_jax.experiments.settings import InputError, Settings, check_length, MIN_SENTENCES, pruning_notes
from stream_jax.trace import Trace


@dataclasses.dataclass(frozen=True)
class AnchorsResult:
  """`anchors_for_text`: the chain's sentences, the Stream trace, the AnchorReport, the sentences that
  share key block 0 with BOS (the attention sink: their score is the sink's) and the kept share."""

  text: str
  ids: np.ndarray
  sentences: Sentences
  trace: Trace
  report: AnchorReport
  sink: tuple[int, ...]
  kept: float
  settings: Settings

  @property
  def notes(self) -> dict[str, str]:
    return pruning_notes(self.kept, len(self.ids), self.settings.config)

  def format(self, show: int = 8) -> str:
    """Receiver heads, the `show` most important sentences and the means by category, as text."""
    rep = self.report
    heads = np.asarray(rep.heads).reshape(-1, 2)
    lines = [f"{len(self.sentences.texts)} sentences, {len(self.ids)} tokens; all {len(heads)} receiver heads "
             "(layer, head), by decreasing kurtosis: " + ", ".join(f"L{l}H{h}" for l, h in heads)]
    if rep.ties is not None:
      lines.append(rep.ties.format())
    sink = "  <- attention sink (BOS block)"
    lines += [f"  #{i:3d} {s:8.4f} {lab:24s} {t[:90]!r}{sink if i in self.sink else ''}"
              for i, s, lab, t in rep.top(show)]
    if self.sink:
      lines.append(f"sentence(s) {', '.join(map(str, self.sink))} share key block 0 with BOS, the attention "
                   "sink where most heads park attention: their score is the sink's, not an anchor's.")
    lines.append("by category (mean importance, count):")
    lines += [f"  {k:24s} {v[0]:8.4f} {v[1]:4d}" for k, v in rep.categories.items()]
    return "\n".join(lines)


def anchors_for_text(model, text: str, settings: Settings = Settings(), *,
                     top_heads: int = 20) -> AnchorsResult:
  """Thought anchors of a chain of thought (text inside <think>...</think> when present) from one Stream
  forward: vertical scores, receiver heads, sentence importance and categories."""
  enc = model.tokenizer(text, return_offsets_mapping=True)
  ids = np.asarray(enc["input_ids"], np.int32)
  check_length(model, len(ids), "the chain of thought")
  sents = anchors.sentences(text, np.asarray(enc["offset_mapping"]))
  if len(sents.texts) < MIN_SENTENCES:
    raise InputError(f"the chain of thought has {len(sents.texts)} sentences; thought anchors need >= "
                     f"{MIN_SENTENCES} (vertical scores skip the 4 nearest later sentences)")
  trace = model.forward(ids, last_only=True, **settings.forward_kw()).row(0).trace
  rep = anchors.thought_anchors(trace, sents, top_heads=top_heads)
  return AnchorsResult(text, ids, sents, trace, rep, rep.sink_sentences(settings.config.block_k),
                       float(trace.kept_fraction()), settings)
