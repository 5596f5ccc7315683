"""The experiment pipelines: a loaded model + a text or a task -> a frozen result.

Each function runs the model (through `LoadedModel.forward` / `generate`, whose TracedRun / Generation it
reads) and the analysis functions, and returns a frozen dataclass; nothing here prints, plots or writes
files (`stream_jax.experiments.reports` turns results into report folders, the CLI prints them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from stream_jax.analysis import anchors, faithfulness, niah, routes
from stream_jax.analysis.anchors import AnchorReport, Sentences
from stream_jax.analysis.causal import RouteVerification
from stream_jax.analysis.faithfulness import FaithfulnessReport
from stream_jax.analysis.niah import NiahSample, NiahTask
from stream_jax.analysis.routes import GroupedComparison, Route
from stream_jax.config import StreamConfig
from stream_jax.experiments import ablation
from stream_jax.trace import Trace

# Shortest needle prompt: the template, the needle and the question take about 90 tokens.
NIAH_MIN_TOKENS = 128
# At or above this kept share of causal token pairs, Stream prunes (almost) nothing.
NO_PRUNING = 0.99
# Thought anchors' vertical scores skip the 4 nearest later sentences: fewer than 6 leave nothing to score.
MIN_SENTENCES = 6


class InputError(ValueError):
  """A problem with the user's input (too long, too short, empty), not a bug. `params`: the Python
  parameters the message names, so a front end (the CLI) can name its own options for them instead."""

  def __init__(self, message: str, *params: str):
    super().__init__(message)
    self.params = params


@dataclasses.dataclass(frozen=True)
class Settings:
  """How the Stream side of an experiment runs: the mask config and the per-layer choices of `forward`."""

  config: StreamConfig = StreamConfig()
  dense_layers: tuple[int, ...] = ()
  prune_local: bool = False
  backend: str = "auto"

  def __post_init__(self):
    object.__setattr__(self, "dense_layers", tuple(int(i) for i in self.dense_layers))

  def forward_kw(self) -> dict:
    """The keyword arguments of `forward` / `generate` for the Stream run."""
    return dict(attention=self.config, dense_layers=self.dense_layers, prune_local=self.prune_local,
                backend=self.backend)

  def describe(self) -> str:
    """One line for reports."""
    c = self.config
    s = (f"block_q={c.block_q}, block_k={c.block_k}, top_k={c.top_k}, sink_blocks={c.sink_blocks}, "
         f"window_blocks={c.window_blocks}, representative={c.representative}")
    if self.dense_layers:
      s += f", dense layers {','.join(map(str, self.dense_layers))}"
    return s + (", local layers pruned" if self.prune_local else ", local layers exact")

  def to_dict(self) -> dict:
    return dict(dataclasses.asdict(self.config), dense_layers=list(self.dense_layers),
                prune_local=self.prune_local, backend=self.backend)


# ------------------------------------------------------------------------------------------------ helpers


def context_length(config) -> int:
  """Trained context (`GemmaConfig.max_length`, which `forward` enforces)."""
  return config.max_length


def check_length(model, n_tokens: int, what: str, param: Optional[str] = None) -> None:
  """InputError unless 2 <= n_tokens <= the context of `model` (a loaded model or its config); `what`
  names the input, `param` the parameter it came from (when `what` names one)."""
  limit = context_length(getattr(model, "config", model))
  params = (param,) if param else ()
  if n_tokens > limit:
    raise InputError(f"{what} has {n_tokens} tokens, longer than the model's context of {limit}", *params)
  if n_tokens < 2:
    raise InputError(f"{what} has {n_tokens} token(s); need at least 2", *params)


def pruning_notice(kept: float, tokens: int, cfg: StreamConfig) -> Optional[str]:
  """A sentence when Stream keeps (nearly) every token pair at these settings, with what to change."""
  if not kept >= NO_PRUNING:
    return None
  n_k = -(-tokens // cfg.block_k)
  top_k = max(1, n_k // 4 - cfg.sink_blocks - cfg.window_blocks)
  return (f"Stream keeps {kept:.1%} of the token pairs: pruning does (almost) nothing at these settings. "
          f"{tokens} tokens make {n_k} key blocks of {cfg.block_k}, and every query block keeps up to "
          f"{cfg.capacity} (sink {cfg.sink_blocks} + top-k {cfg.top_k} + window {cfg.window_blocks}). "
          f"For this length try top_k {top_k}, or smaller blocks (block_q/block_k "
          f"{max(8, cfg.block_k // 4)}), or a longer input.")


def check_settings(config, settings: Settings, lengths: Sequence[int] = (), what: str = "the prompt") -> None:
  """InputError (naming the parameter) unless the settings and prompt lengths fit the model's config."""
  n, cfg, limit = config.num_layers, settings.config, context_length(config)
  bad = [i for i in settings.dense_layers if not 0 <= i < n]
  if bad:
    raise InputError(f"dense_layers {','.join(map(str, bad))}: layer ids must be in [0, {n - 1}] "
                     f"({config.name} has {n} layers)", "dense_layers")
  for length in lengths:
    if length > limit:
      raise InputError(f"{what} of {length} tokens is longer than the model's context of {limit}")
  if cfg.top_k * cfg.block_k > limit:
    raise InputError(f"top_k {cfg.top_k} x block_k {cfg.block_k} = {cfg.top_k * cfg.block_k} keys per "
                     f"query block is more than the model's context of {limit} tokens", "top_k", "block_k")


def _pruning_notes(kept: float, tokens: int, cfg: StreamConfig) -> dict[str, str]:
  notice = pruning_notice(kept, tokens, cfg)
  return {"pruning does nothing": notice} if notice else {}


def first_global(trace: Trace) -> int:
  """Index of the first global layer (0 when there is none): the default layer of mask figures."""
  glob = [i for i, l in enumerate(trace.layers) if l.kind == "global"]
  return glob[0] if glob else 0


def _bar(total: int, desc: str, unit: str, enabled: bool):
  """A tqdm bar, or a stand-in that does nothing (progress=False, or tqdm not installed)."""
  if enabled:
    try:
      from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
      return tqdm(total=total, desc=desc, unit=unit)
    except ImportError:
      pass

  class _Quiet:
    def update(self, n=1):
      pass

    def close(self):
      pass

  return _Quiet()


def _logits_fn(model):
  """The model's unembedding as a Partial carrying the parameters, so jit takes them as an argument
  instead of folding 0.7 GB of constants (see faithfulness.output_metrics_from_hidden)."""
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree_util.Partial(functools.partial(_unembed, model.config), model.params)


def _unembed(config, params, h):
  from stream_jax.models import logits_from_hidden  # pylint: disable=import-outside-toplevel
  return logits_from_hidden(config, params, h)


# ------------------------------------------------------------------------------------------- faithfulness


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
  bar = _bar(3 if oracle else 2, "forward passes", "pass", progress)
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
  bar = _bar(len(ids), "faithfulness metrics", "tok", progress)
  report = faithfulness.faithfulness_report_from_hidden(
      list(d_hidden), list(run.hidden), _logits_fn(model), trace=run.trace, oracle_masks=masks,
      pruned_from=faithfulness.pruned_start(len(ids), settings.config), on_chunk=bar.update)
  bar.close()
  timings["metrics_s"] = time.perf_counter() - t0
  return FaithfulnessPair(run.trace, report, timings, len(ids))


class _FromPair:
  """Results holding a FaithfulnessPair (`pair`): its trace and report read through."""

  @property
  def trace(self) -> Trace:
    return self.pair.trace  # pylint: disable=no-member

  @property
  def report(self) -> FaithfulnessReport:
    return self.pair.report  # pylint: disable=no-member


@dataclasses.dataclass(frozen=True)
class TextTrace(_FromPair):
  """`trace_text`: a text traced with Stream and compared with dense."""

  text: str
  ids: np.ndarray
  pair: FaithfulnessPair
  settings: Settings
  output: str

  @property
  def notes(self) -> dict[str, str]:
    """Notices for the reader: {"pruning does nothing": ...} when Stream kept (nearly) everything."""
    return _pruning_notes(self.pair.kept, len(self.ids), self.settings.config)


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


# ----------------------------------------------------------------------------------------------- needles


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
      out.update({f"{n} tokens: {k}": v for k, v in _pruning_notes(kept, n, self.settings.config).items()})
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
  bar = _bar(len(samples), "niah samples", "sample", progress)
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


# ------------------------------------------------------------------------------------------------- anchors


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
    return _pruning_notes(self.kept, len(self.ids), self.settings.config)

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


# ---------------------------------------------------------------------------------------------------- demo


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
class DemoResult(_FromPair):
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
    out = _pruning_notes(self.pair.kept, self.sample.length, self.settings.config)
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
    bar = _bar(len(sample.ids), "positions", "tok", progress)
    report = faithfulness.faithfulness_report_from_hidden(
        list(dense_run.hidden), list(stream_run.hidden), _logits_fn(model), trace=stream_run.trace,
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
