"""Causal tests through the trace, the pure half: what attention suppression and route ablation measure.

Mass in a trace is correlational: a block with high attention is only *assumed* to matter. The experiments
that intervene on the model (`stream_jax.experiments.ablation`: `suppression_matrix`, `verify_routes`) run
the forwards; this module holds what they compute from arrays and traces, so it is testable without a model:

  token_kl, sentence_effects, importance_from_matrix, SuppressionMatrix
                      Thought Anchors' attention suppression (Bogdan et al. 2025, third method): the effect
                      of suppressing sentence j on sentence k is the mean over k's tokens of
                      log(KL(P || Q) + 1e-9), P / Q the baseline / suppressed next-token distributions at
                      temperature 0.6 (the reference's `get_suppression_KL_matrix`).
  route_heads, random_kept_blocks, SampleAblation, RouteVerification
                      route ablation on NIAH samples: the heads whose route reads the needle, the random
                      controls, and the counts of answer flips.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from stream_jax.analysis import anchors, routes
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
  heads: Optional[np.ndarray] = None  # bool[L, N] the route's heads, where the needle was suppressed


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
