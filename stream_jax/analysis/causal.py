"""Causal tests through the trace: attention suppression and route ablation.

Mass in a trace is correlational: a block with high attention is only *assumed* to matter. These tests
intervene (stream_jax.intervene) and measure:

  suppression_matrix  Thought Anchors' attention suppression (Bogdan et al. 2025, third method): for each
                      sentence j, attention to its tokens is suppressed in every layer and head; the effect
                      on sentence k is the mean over k's tokens of log(KL(P || Q) + 1e-9), P / Q the
                      baseline / suppressed next-token distributions at temperature 0.6 (the reference's
                      `get_suppression_KL_matrix`). One batched forward per `batch` sentences.
  verify_routes       for NIAH samples the model answers: suppress the needle blocks in the heads where the
                      traced route reads them, and (control) as many random kept blocks in the same heads;
                      an answer flip is a failed string match after the intervention.

Both run the model (stream_jax.models, imported when called); everything else is pure NumPy / JAX.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stream_jax import checks, intervene
from stream_jax.analysis import anchors, niah, routes
from stream_jax.trace import Trace

# The reference's constants: logits at temperature 0.6, log(KL + 1e-9).
TEMPERATURE = 0.6
LOG_EPS = 1e-9


# ---------------------------------------------------------------------------------------------------------
# Attention suppression (Thought Anchors)
# ---------------------------------------------------------------------------------------------------------

def token_kl(base_logits: jax.Array, logits: jax.Array, temperature: float = TEMPERATURE) -> jax.Array:
  """float32[...]: KL(P || Q) of the next-token distributions softmax(x / temperature), P from base_logits
  [..., V], Q from logits [..., V] (clipped at 0, as the reference does)."""
  lp = jax.nn.log_softmax(base_logits.astype(jnp.float32) / temperature, axis=-1)
  lq = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.maximum(jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1), 0.0)


def sentence_effects(kl: np.ndarray, spans: np.ndarray, source: int) -> np.ndarray:
  """float64[S]: the effect of suppressing sentence `source` on each sentence k, the mean of
  log(KL + 1e-9) over k's tokens (kl: per-token KL float[T] of that suppression). NaN for k < source:
  no causal path runs backwards (the reference's value there is log(1e-9) up to rounding)."""
  logkl = np.log(np.asarray(kl, np.float64) + LOG_EPS)
  out = np.full(len(spans), np.nan)
  for k, (s, e) in enumerate(np.asarray(spans)):
    if k >= source and e > s:
      out[k] = np.nanmean(logkl[s:e])
  return out


@dataclasses.dataclass(frozen=True)
class SuppressionMatrix:
  """matrix: float64[S, S], [k, j] the effect on sentence k of suppressing sentence j (mean log KL over
  k's tokens; NaN above the diagonal, k < j). importance: float64[S], sentence j's mean effect on the
  later sentences k > j (NaN for the last). kl: float32[S, T] per-token KL of each suppression."""

  matrix: np.ndarray
  importance: np.ndarray
  kl: np.ndarray
  spans: np.ndarray
  temperature: float

  def correlation(self, scores) -> float:
    """Spearman rank correlation of `importance` with other per-sentence scores (e.g. receiver-head
    importance from `thought_anchors`); NaN pairs dropped."""
    return anchors.spearman(self.importance, scores)


def importance_from_matrix(matrix: np.ndarray) -> np.ndarray:
  """float64[S]: per column j, the mean of the matrix over later rows k > j (NaN where there are none)."""
  m = np.asarray(matrix, np.float64)
  s = m.shape[0]
  out = np.full(s, np.nan)
  for j in range(s - 1):
    col = m[j + 1:, j]
    if np.isfinite(col).any():
      out[j] = np.nanmean(col)
  return out


def suppression_matrix(model, params, tokens, spans, *, attention="dense", batch: int = 4,
                       temperature: float = TEMPERATURE, layers=None, heads=None, chunk: int = 256,
                       progress: bool = True, **forward_kwargs) -> SuppressionMatrix:
  """Suppress attention to each sentence in turn and measure every later sentence's change.

  Args:
    model, params: a stream_jax.models model (GemmaConfig or LoadedModel) and its parameters.
    tokens: int[T] one sequence (BOS first).
    spans: int[S, 2] sentence token spans (e.g. `anchors.sentences(...).spans`).
    attention: "dense" (the reference's setting) or a StreamConfig (the suppression then acts on the
      sparse model; with output="exact" in forward_kwargs on the dense model while the trace observes).
    batch: sentences per forward (one compiled executable for all batches: the last is padded).
    temperature: of the next-token distributions (the reference: 0.6).
    layers, heads: where attention is suppressed (None: everywhere, as the reference does).
    chunk: positions per logits / KL step (the [chunk, V] logits are the largest temporaries).
  """
  from stream_jax.models import forward, logits_from_hidden  # pylint: disable=import-outside-toplevel
  from stream_jax.models.forward import model_config  # pylint: disable=import-outside-toplevel
  cfg = model_config(model)
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f"tokens must be one sequence int[T], got shape {tokens.shape}")
  t = len(tokens)
  spans = checks.check_spans("spans", spans, t)
  if len(spans) < 2:
    raise ValueError(f"spans must hold at least 2 sentences, got {len(spans)}")
  checks.as_int("batch", batch, lo=1)
  checks.as_int("chunk", chunk, lo=1)
  checks.check_positive("temperature", temperature, allow_none=False)
  kw = dict(attention=attention, return_hidden=True, last_only=True, **forward_kwargs)
  base = forward(model, params, tokens[None], **kw).hidden[-1, 0]  # [T, D]
  kl_fn = _kl_chunks(lambda h: logits_from_hidden(model, params, h), temperature, chunk)
  s = len(spans)
  kl = np.zeros((s, t), np.float32)
  bar = _progress(progress, s)
  for lo in range(0, s, batch):
    ids = list(range(lo, min(lo + batch, s)))
    rows = ids + [ids[-1]] * (batch - len(ids))  # same shapes for every batch: one executable
    iv = intervene.suppress_spans([[spans[j]] for j in rows], length=t, num_layers=cfg.num_layers,
                                  num_heads=cfg.num_heads, layers=layers, heads=heads)
    hid = forward(model, params, np.broadcast_to(tokens, (batch, t)), intervention=iv, **kw).hidden[-1]
    start = int(spans[ids[0], 0])  # earlier positions cannot change
    kl[ids, start:] = np.asarray(kl_fn(base[start:], hid[:, start:]))[: len(ids)]
    bar.update(len(ids))
  bar.close()
  matrix = np.stack([sentence_effects(kl[j], spans, j) for j in range(s)], axis=1)  # [k, j]
  return SuppressionMatrix(matrix=matrix, importance=importance_from_matrix(matrix), kl=kl, spans=spans,
                           temperature=float(temperature))


def _kl_chunks(logits_fn: Callable, temperature: float, chunk: int):
  """(base [T', D], hidden [B, T', D]) -> KL float32[B, T'] over position chunks of fixed size (padded):
  never more than [B, chunk, V] logits at once."""

  @jax.jit
  def step(b, h):
    return token_kl(logits_fn(b)[None], logits_fn(h), temperature)

  def run(base, hidden):
    n = base.shape[0]
    out = []
    for i in range(0, n, chunk):
      b, h = base[i:i + chunk], hidden[:, i:i + chunk]
      pad = chunk - b.shape[0]
      if pad:
        b = jnp.pad(b, ((0, pad), (0, 0)))
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
      out.append(np.asarray(step(b, h))[:, : chunk - pad])
    return np.concatenate(out, axis=1)

  return run


def _progress(enabled: bool, total: int):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, desc="suppressions", unit="sentence", disable=not enabled)


# ---------------------------------------------------------------------------------------------------------
# Route ablation (NIAH)
# ---------------------------------------------------------------------------------------------------------

def route_heads(route: routes.Route, needle: jax.Array) -> np.ndarray:
  """bool[L, N]: the heads whose kept route edges read a needle block directly (needle: bool[nB])."""
  needle = np.asarray(needle)
  out = []
  for on, idx in zip(route.on_route, route.indices):
    on, idx = np.asarray(on), np.asarray(idx)  # [N, nQ, C]
    reads = on & (idx >= 0) & needle[np.maximum(idx, 0)]
    out.append(reads.any(axis=(1, 2)))
  return np.stack(out)


def random_kept_blocks(trace: Trace, where: np.ndarray, count: int, rng: np.random.Generator,
                       exclude: np.ndarray, query_block: int = -1) -> dict[int, np.ndarray]:
  """Per layer with a route head: `count` random key blocks among those the layer's route heads keep for
  the query block (default the last), none of them in `exclude` (bool[nB]: the needle, the sink and the
  query's local window). Fewer when fewer are kept."""
  out = {}
  exclude = np.asarray(exclude)
  for l, layer in enumerate(trace.layers):
    heads = np.nonzero(where[l])[0]
    if not heads.size:
      continue
    idx = np.asarray(layer.mask.indices)[heads, query_block].ravel()
    cand = np.unique(idx[idx >= 0])
    cand = cand[~exclude[cand]]
    if cand.size:
      out[l] = rng.choice(cand, size=min(count, cand.size), replace=False)
  return out


@dataclasses.dataclass(frozen=True)
class SampleAblation:
  """One NIAH sample: answered before any intervention; the route's heads and needle blocks; whether
  ablating the route flipped the answer, and how many of the random controls did."""

  length: int
  depth: float  # token position of the (first) asked needle, % of the prompt
  answered: bool
  prediction: str
  route_heads: int = 0
  needle_blocks: tuple[int, ...] = ()
  route_flipped: Optional[bool] = None
  route_prediction: str = ""
  random_flipped: int = 0
  random_runs: int = 0
  everywhere_flipped: Optional[bool] = None  # the needle blocks suppressed in every layer and head
  needle_mass: Optional[np.ndarray] = None  # float32[L, N] at the final query block


@dataclasses.dataclass(frozen=True)
class RouteVerification:
  """All samples; counts over the answered samples that have a route."""

  samples: tuple[SampleAblation, ...]

  @property
  def tested(self) -> list[SampleAblation]:
    return [s for s in self.samples if s.route_flipped is not None]

  def counts(self) -> dict:
    t = self.tested
    every = [s for s in t if s.everywhere_flipped is not None]
    return dict(samples=len(self.samples), answered=sum(s.answered for s in self.samples),
                with_route=len(t), route_flips=sum(bool(s.route_flipped) for s in t),
                random_flips=sum(s.random_flipped for s in t), random_runs=sum(s.random_runs for s in t),
                everywhere_flips=sum(bool(s.everywhere_flipped) for s in every), everywhere_runs=len(every))

  def format(self) -> str:
    c = self.counts()
    rr = c["route_flips"] / c["with_route"] if c["with_route"] else float("nan")
    rn = c["random_flips"] / c["random_runs"] if c["random_runs"] else float("nan")
    return (f"route ablation flipped {c['route_flips']}/{c['with_route']} answers ({100 * rr:.0f}%); random "
            f"kept blocks in the same heads flipped {c['random_flips']}/{c['random_runs']} ({100 * rn:.0f}%) "
            f"[{c['answered']} of {c['samples']} samples answered]"
            + (f"; the needle blocks suppressed in every head flipped {c['everywhere_flips']}/"
               f"{c['everywhere_runs']}" if c["everywhere_runs"] else ""))


def verify_routes(model, params, samples: Sequence[niah.NiahSample], config, *, n_random: int = 3,
                  seed: int = 0, max_new_tokens: int = 16, output: str = "exact", tokenizer=None,
                  residual: float = 0.5, threshold: float = 1e-3, everywhere: bool = False,
                  progress: bool = True, **generate_kwargs) -> RouteVerification:
  """Route ablation vs random ablation on NIAH samples.

  Per sample: greedy answer with attention=config (output="exact": the dense model, traced); if it
  matches, the route from the final block to the needle (routes.route) names the heads that read needle
  blocks; the answer is regenerated with those blocks suppressed in those heads (in the prefill and every
  decoding step), then `n_random` times with as many random kept blocks of the same heads suppressed
  instead (the sink, the needle and the last query's local window excluded: suppressing the sink or the
  question itself is a different experiment). everywhere=True adds a third arm: the needle blocks
  suppressed in every layer and head (does the answer need the needle's keys at all?).
  """
  from stream_jax.models import generate  # pylint: disable=import-outside-toplevel
  from stream_jax.models.forward import model_config  # pylint: disable=import-outside-toplevel
  cfg = model_config(model)
  checks.as_int("n_random", n_random, lo=0)
  rng = np.random.default_rng(seed)
  kw = dict(attention=config, output=output, max_new_tokens=max_new_tokens, tokenizer=tokenizer,
            **generate_kwargs)
  out = []
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  for sample in tqdm(samples, desc="route ablation", unit="sample", disable=not progress):
    ids = np.asarray(sample.ids)
    t = len(ids)
    gen = generate(model, params, ids, **kw)
    pred = gen.text[0]
    answered = niah.match_all(pred, sample.answers) == 1
    trace = gen.prefill.row(0).trace
    spans = sample.value_spans
    nm = np.asarray(routes.trace_needle_mass(trace, spans))
    depth = 100.0 * sample.queried_needles[0].token_span[0] / t  # where the needle sits, % of the prompt
    base = dict(length=t, depth=depth, answered=answered, prediction=pred, needle_mass=nm)
    if not answered:
      out.append(SampleAblation(**base))
      continue
    rt = routes.route(trace, spans, residual=residual, threshold=threshold)
    bk = trace.layers[0].mask.block_k
    needle = np.asarray(routes.span_blocks(spans, bk, t))
    where = route_heads(rt, needle)
    if not where.any():
      out.append(SampleAblation(**base))
      continue
    ids_needle = np.nonzero(needle)[0]
    iv = intervene.drop_blocks(ids_needle, block_k=bk, length=t, num_layers=cfg.num_layers,
                               num_heads=cfg.num_heads, heads=where)
    r_pred = generate(model, params, ids, intervention=iv, **kw).text[0]
    flipped = niah.match_all(r_pred, sample.answers) < 1
    exclude = needle.copy()
    exclude[: config.sink_blocks] = True
    exclude[max(0, len(needle) - config.window_blocks - 1):] = True
    rand = 0
    runs = 0
    for _ in range(n_random):
      blocks = random_kept_blocks(trace, where, len(ids_needle), rng, exclude)
      if not blocks:
        break
      riv = intervene.drop_blocks(blocks, block_k=bk, length=t, num_layers=cfg.num_layers,
                                  num_heads=cfg.num_heads, heads=where)
      rand += niah.match_all(generate(model, params, ids, intervention=riv, **kw).text[0], sample.answers) < 1
      runs += 1
    every = None
    if everywhere:
      eiv = intervene.drop_blocks(ids_needle, block_k=bk, length=t, num_layers=cfg.num_layers,
                                  num_heads=cfg.num_heads)
      every = niah.match_all(generate(model, params, ids, intervention=eiv, **kw).text[0], sample.answers) < 1
    out.append(SampleAblation(**base, route_heads=int(where.sum()), needle_blocks=tuple(map(int, ids_needle)),
                              route_flipped=bool(flipped), route_prediction=r_pred, random_flipped=int(rand),
                              random_runs=runs, everywhere_flipped=every))
  return RouteVerification(tuple(out))
