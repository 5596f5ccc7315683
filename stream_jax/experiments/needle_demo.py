"""The demo: one needle prompt answered after a dense and after a Stream prefill, with faithfulness,
coverage, the needle's mass and route, and the dense contrast."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, Mapping, Optional

import numpy as np

from stream_jax.analysis import faithfulness, niah, routes
from stream_jax.analysis.niah import NiahSample
from stream_jax.analysis.routes import Route
from stream_jax.config import StreamConfig
from stream_jax.experiments.needles import check_needle_length
from stream_jax.experiments.settings import Settings, check_length, logits_fn, progress_bar, pruning_notes
from stream_jax.experiments.tracing import FaithfulnessPair, FromPair
from stream_jax.trace import Trace


# Default demo length: long enough that the default StreamConfig prunes (about half of the global layers'
# causal pairs kept at 4,096 tokens: pruning starts at 1,216), short enough that the demo runs in under
# 3 minutes on 2 CPU cores.
DEMO_LENGTH = 4_096


class _Clock:
  """Status lines around the phases of a pipeline ("<phase> ..." then "<phase>: 12.3 s"), and their
  timings: a long phase never runs silent."""

  def __init__(self, log: Optional[Callable[[str], None]]):
    self.log, self.timings = log, {}

  @contextlib.contextmanager
  def __call__(self, key: str, text: str):
    if self.log is not None:
      self.log(f"{text} ...")
    t0 = time.perf_counter()
    yield
    self.timings[key] = time.perf_counter() - t0
    if self.log is not None:
      self.log(f"  {text}: {self.timings[key]:.1f} s")


def all_blocks(config: StreamConfig, length: int) -> StreamConfig:
  """A config whose search keeps every causal key block at this length: with output="exact" its trace is
  the dense model's attention at block resolution (the dense contrast of a sparse trace)."""
  n_k = -(-length // config.block_k)
  return config.replace(top_k=max(n_k, 1), init_branches=None, coverage=None)


@dataclasses.dataclass(frozen=True)
class DemoResult(FromPair):
  """`demo`: one needle prompt answered after a dense and after a Stream prefill; the two prefills give
  faithfulness (dense vs Stream over every position) and coverage; the needle's mass and route in the
  Stream trace, and its mass in the dense model's attention (dense_needle_mass) as the contrast.
  dense_trace: the dense prefill's trace (every block kept, exact mass) of the same tokens, the viewer's
  map beside the Stream one."""

  sample: NiahSample
  pair: FaithfulnessPair
  answers: Mapping[str, str]
  retrieved: Mapping[str, bool]
  timings: Mapping[str, float]
  needle_mass: np.ndarray
  route: Route
  needle_blocks: tuple[int, ...]
  settings: Settings
  dense_needle_mass: Optional[np.ndarray] = None
  dense_trace: Optional[Trace] = None

  @property
  def needle_in_sink(self) -> bool:
    """The needle shares key block 0 with BOS (the attention sink): its mass and route are inflated."""
    return 0 in self.needle_blocks

  @property
  def sink_note(self) -> Optional[str]:
    if not self.needle_in_sink:
      return None
    return ("the needle shares key block 0 with BOS, the attention sink where most heads park attention: its "
            "needle mass and route are inflated by the sink; try another seed or smaller block_k")

  @property
  def notes(self) -> dict[str, str]:
    """The pruning notice and the sink note, where they apply."""
    out = pruning_notes(self.pair.kept, self.sample.length, self.settings.config)
    return dict(out, **{"needle in the sink block": self.sink_note} if self.sink_note else {})

  def format(self) -> str:
    """The answers (found / missed) and the needle mass per layer, as text."""
    lines = [f"{name:>6s} answer: {self.answers[key].strip()!r} -> "
             f"{'found' if self.retrieved[key] else 'missed'} {self.sample.answers[0]}"
             for name, key in (("dense", "dense"), ("Stream", "stream"))]
    rows = [("Stream", self.needle_mass)]
    if self.dense_needle_mass is not None:
      rows.insert(0, ("dense", self.dense_needle_mass))
    lines += [f"needle mass at the final query block, per layer (mean over heads), {name}: "
              + " ".join(f"{x:.3f}" for x in np.asarray(m).mean(-1)) for name, m in rows]
    return "\n".join(lines)


def demo(model, settings: Settings = Settings(), *, length: int = DEMO_LENGTH, seed: int = 1,
         max_new_tokens: int = 12, progress: bool = False,
         log: Optional[Callable[[str], None]] = None) -> DemoResult:
  """Needle in a haystack at `length` tokens, in two prefills: a dense one (the dense model traced
  exactly with every block kept: dense logits, and the dense attention on the needle) and a Stream one
  (sparse, with coverage). Each prefill answers greedily from its own KV cache and keeps its residual
  stream, so faithfulness over every position needs no further forward. `log` gets a status line before and
  after each phase (with its time)."""
  check_needle_length(length)
  check_length(model, length, "length", "length")
  clock = _Clock(log)
  with clock("prompt_s", f"fitting a {length:,}-token needle prompt"):
    sample = niah.generate_sample(model.tokenizer, length, niah.VARIANTS["single_1"], seed=seed)
  if log is not None:
    log(f"needle prompt: {sample.length} tokens; asks for {sample.keys[0]!r} (answer {sample.answers[0]})")
  cfg = settings.config
  gens = {}
  with clock("dense_prefill_and_answer_s", "dense prefill (traced exactly, every block kept) + greedy answer"):
    gens["dense"] = model.generate(sample.ids, max_new_tokens=max_new_tokens, attention=all_blocks(cfg, length),
                                   output="exact", prune_local=settings.prune_local, backend=settings.backend,
                                   return_hidden=True)
  with clock("stream_prefill_and_answer_s", "Stream prefill (sparse, with coverage) + greedy answer"):
    gens["stream"] = model.generate(sample.ids, max_new_tokens=max_new_tokens, coverage=True,
                                    return_hidden=True, **settings.forward_kw())
  dense_run, stream_run = gens["dense"].prefill.row(0), gens["stream"].prefill.row(0)
  answers = {k: g.text[0] for k, g in gens.items()}
  with clock("metrics_s", "faithfulness metrics over every position (chunked logits)"):
    bar = progress_bar(len(sample.ids), "positions", "tok", progress)
    report = faithfulness.faithfulness_report_from_hidden(
        list(dense_run.hidden), list(stream_run.hidden), logits_fn(model), trace=stream_run.trace,
        pruned_from=faithfulness.pruned_start(len(sample.ids), cfg), on_chunk=bar.update)
    bar.close()
  spans = sample.value_spans
  with clock("route_s", "needle mass and route"):
    needle_mass = np.asarray(routes.trace_needle_mass(stream_run.trace, spans))
    dense_mass = np.asarray(routes.trace_needle_mass(dense_run.trace, spans))
    route = routes.route(stream_run.trace, spans)
  timings = dict(clock.timings)
  pair = FaithfulnessPair(stream_run.trace, report, timings, len(sample.ids))
  return DemoResult(
      sample=sample, pair=pair, answers=answers,
      retrieved={k: niah.match_all(v, sample.answers) == 1 for k, v in answers.items()}, timings=timings,
      needle_mass=needle_mass, route=route, needle_blocks=sample.needle_blocks(cfg.block_k),
      settings=settings, dense_needle_mass=dense_mass, dense_trace=dense_run.trace)
