"""Thought anchors: which sentences of a chain of thought receive unusually strong downstream attention.

Pipeline (the definitions of Bogdan et al., "Thought Anchors", on the compact trace instead of T x T):
  text -> sentences (char spans) -> token spans (tokenizer offsets)
  block mass [N, nQ, C] -> sentence x sentence matrix M [N, S, S] (mean attention of a token of sentence i to a
    token of sentence j, token-overlap weighted, assuming uniform attention inside a block pair)
  -> vertical score v[j] = mean over later sentences i >= j + 4 of M[i, j]
  -> receiver heads: top-20 heads by kurtosis of v over sentences (finite only, layer 0 excluded), or
     fixed heads picked once across many traces (receiver_heads_across)
  -> sentence importance = mean of v over the receiver heads
  -> aggregation by category (pluggable labeller) and by relative position.

The array steps are pure jnp functions (jit/vmap-able); text handling is plain Python.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stream_jax import checks
from stream_jax.mask import num_blocks

if TYPE_CHECKING:  # annotations only: the analysis reads traces, it needs no trace code at run time
  from stream_jax.trace import Trace

# ---------------------------------------------------------------------------------------------------------
# Text -> sentences -> token spans
# ---------------------------------------------------------------------------------------------------------

_THINK = re.compile(r"<think>(.*?)(?:</think>|\Z)", re.S)
# A cut after . ? ! followed by whitespace, or at a blank line (whitespace between the two newlines may
# include "\r", so Windows "\r\n\r\n" counts).
_CUT = re.compile(r"(?<=[.?!])\s+|\n[^\S\n]*\n\s*")


def reasoning_region(text: str) -> tuple[int, int]:
  """Char range of the chain of thought: inside <think>...</think> when present, else the whole text."""
  m = _THINK.search(text)
  return (m.start(1), m.end(1)) if m else (0, len(text))


def split_sentences(text: str, *, min_chars: int = 10,
                    region: Optional[tuple[int, int]] = None) -> list[tuple[int, int]]:
  """Char spans [start, end) of the sentences of `text[region]`, stripped of surrounding whitespace.

  Cuts after . ? ! followed by whitespace and at blank lines; a piece shorter than `min_chars` is merged into
  the next one (the last into the previous), so list markers and "Wait." do not become sentences on their own.
  """
  lo, hi = reasoning_region(text) if region is None else region
  pieces, start = [], lo
  for m in _CUT.finditer(text, lo, hi):
    pieces.append((start, m.start()))
    start = m.end()
  pieces.append((start, hi))
  spans = []
  for a, b in pieces:  # strip whitespace
    while a < b and text[a].isspace():
      a += 1
    while b > a and text[b - 1].isspace():
      b -= 1
    if b > a:
      spans.append((a, b))
  merged: list[tuple[int, int]] = []
  pending = None
  for a, b in spans:
    if pending is not None:
      a, pending = pending, None
    if b - a < min_chars:
      pending = a
      continue
    merged.append((a, b))
  if pending is not None:
    if merged:
      merged[-1] = (merged[-1][0], spans[-1][1])
    else:
      merged.append((pending, spans[-1][1]))
  return merged


def token_spans(char_spans: Sequence[tuple[int, int]], offsets) -> np.ndarray:
  """int32[S, 2] token range [start, end) of each sentence, from token char offsets [T, 2].

  A token belongs to the sentence holding its last character (SentencePiece tokens carry their leading
  space, so the first character may fall in the gap before a sentence). Tokens with empty offsets (BOS and
  other special tokens) belong to none. A sentence without tokens gets the empty span (0, 0).
  """
  offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
  last = offsets[:, 1] - 1
  real = offsets[:, 1] > offsets[:, 0]
  out = np.zeros((len(char_spans), 2), np.int32)
  for s, (a, b) in enumerate(char_spans):
    ids = np.nonzero(real & (last >= a) & (last < b))[0]
    if len(ids):
      out[s] = (ids[0], ids[-1] + 1)
  return out


@dataclasses.dataclass(frozen=True)
class Sentences:
  """Sentences of a text: char spans, token spans int32[S, 2] and their strings."""

  text: str
  char_spans: tuple[tuple[int, int], ...]
  tokens: np.ndarray
  texts: tuple[str, ...]

  def __len__(self):
    return len(self.char_spans)


def sentences(text: str, offsets, *, min_chars: int = 10,
              region: Optional[tuple[int, int]] = None) -> Sentences:
  """Splits the chain of thought of `text` and maps it to tokens (offsets [T, 2] of the tokenized text)."""
  spans = split_sentences(text, min_chars=min_chars, region=region)
  toks = token_spans(spans, offsets)
  keep = toks[:, 1] > toks[:, 0]
  spans = [s for s, k in zip(spans, keep) if k]
  return Sentences(text, tuple(spans), toks[keep], tuple(text[a:b] for a, b in spans))


# ---------------------------------------------------------------------------------------------------------
# Block mass -> sentence matrix -> vertical scores
# ---------------------------------------------------------------------------------------------------------

def block_overlap(spans: jax.Array, block: int, length: int, offset: int = 0) -> jax.Array:
  """float32[S, nB]: tokens of span s (absolute [start, end)) inside block b of `length` positions whose
  position 0 is absolute position `offset`."""
  n = num_blocks(length, block)
  lo = offset + jnp.arange(n) * block
  hi = offset + jnp.minimum((jnp.arange(n) + 1) * block, length)
  spans = jnp.asarray(spans)
  a, b = spans[:, :1], spans[:, 1:]
  return jnp.maximum(jnp.minimum(b, hi[None]) - jnp.maximum(a, lo[None]), 0).astype(jnp.float32)


def sentence_matrix(mass: jax.Array, indices: jax.Array, spans: jax.Array, *, block_q: int, block_k: int,
                    q_len: int, k_len: int) -> jax.Array:
  """Mean token-to-token attention between sentences: float32[..., N, S, S] (rows: queries i, cols: keys j).

  mass [..., N, nQ, C] is the attention probability of the kept key block `indices[..., c]` summed over the
  queries of query block j; spread uniformly over that block pair, it gives every (query, key) token pair
  mass / (queries x keys); M[i, j] averages that over the token pairs of sentences i x j (exact when
  sentence boundaries fall on block boundaries). O(S x nQ x C + S^2 x nQ): never T x T.
  """
  spans = jnp.asarray(spans, jnp.int32)
  ov_q = block_overlap(spans, block_q, q_len, k_len - q_len)  # [S, nQ]
  ov_k = block_overlap(spans, block_k, k_len)  # [S, nK]
  n_q_rows = block_sizes(block_q, q_len)  # [nQ]
  n_k_cols = block_sizes(block_k, k_len)  # [nK]
  safe = jnp.maximum(indices, 0)
  per_pair = jnp.where(indices >= 0, mass / n_q_rows[:, None] / n_k_cols[safe], 0.0)  # [..., N, nQ, C]
  key_share = jnp.where(indices >= 0, jnp.take(ov_k, safe, axis=1), 0.0)  # [S, ..., N, nQ, C]
  x = jnp.einsum("...jc,s...jc->...js", per_pair, key_share)  # [..., N, nQ, S]: mass per query row
  m = jnp.einsum("ij,...js->...is", ov_q, x)  # summed over the token pairs
  size = (spans[:, 1] - spans[:, 0]).astype(jnp.float32)
  size = jnp.maximum(size, 1.0)
  return m / size[:, None] / size[None, :]


def block_sizes(block: int, length: int) -> jax.Array:
  """float32[nB] positions in each block (the last may be partial)."""
  n = num_blocks(length, block)
  return (jnp.minimum((jnp.arange(n) + 1) * block, length) - jnp.arange(n) * block).astype(jnp.float32)


def full_indices(shape: tuple[int, ...], num_k_blocks: int) -> jax.Array:
  """int32[*shape, nK]: every key block, for running the pipeline on a dense block-mass matrix."""
  return jnp.broadcast_to(jnp.arange(num_k_blocks, dtype=jnp.int32), tuple(shape) + (num_k_blocks,))


def vertical_scores(matrix: jax.Array, proximity_ignore: int = 4) -> jax.Array:
  """float32[..., S]: v[j] = mean over i >= j + proximity_ignore of matrix[..., i, j]; NaN where no such i.

  The Thought Anchors convention: sentence j itself and its nearest later sentences (i < j + 4) are ignored,
  since every sentence attends to its neighbours.
  """
  s = matrix.shape[-1]
  i = jnp.arange(s)[:, None]
  j = jnp.arange(s)[None, :]
  far = i >= j + proximity_ignore
  total = jnp.where(far, matrix, 0.0).sum(-2)
  n = far.sum(0)
  return jnp.where(n > 0, total / jnp.maximum(n, 1), jnp.nan)


def kurtosis(x: jax.Array, axis: int = -1) -> jax.Array:
  """Fisher kurtosis (normal = 0, biased estimator), NaN entries omitted; NaN if fewer than 2 values or
  zero variance (as scipy.stats.kurtosis(..., nan_policy='omit'))."""
  ok = ~jnp.isnan(x)
  n = ok.sum(axis, keepdims=True)
  mean = jnp.where(ok, x, 0.0).sum(axis, keepdims=True) / jnp.maximum(n, 1)
  d = jnp.where(ok, x - mean, 0.0)
  m2 = (d ** 2).sum(axis, keepdims=True) / jnp.maximum(n, 1)
  m4 = (d ** 4).sum(axis, keepdims=True) / jnp.maximum(n, 1)
  k = m4 / jnp.where(m2 > 0, m2 ** 2, 1.0) - 3.0
  k = jnp.where((n > 1) & (m2 > 0), k, jnp.nan)
  return jnp.squeeze(k, axis)


def receiver_heads(vertical: jax.Array, top: int = 20,
                   exclude_layers: Sequence[int] = (0,)) -> tuple[jax.Array, jax.Array]:
  """Heads whose vertical scores are most concentrated on few sentences.

  Args:
    vertical: float32[L, N, S] vertical scores per layer and head.
  Returns:
    heads int32[min(top, finite), 2] (layer, head) by decreasing kurtosis, and kurtosis float32[L, N]
    (NaN for excluded layers). Only heads with a finite kurtosis are eligible (as the reference's
    `get_top_k_layer_head_kurts`): a head with constant scores or an excluded layer's head is never used
    to pad the selection, so fewer than `top` heads may come back.
  """
  kurt = _masked_kurtosis(kurtosis(vertical), exclude_layers)
  return top_finite_heads(kurt, top), kurt


def _masked_kurtosis(kurt: jax.Array, exclude_layers: Sequence[int]) -> jax.Array:
  excluded = jnp.isin(jnp.arange(kurt.shape[0]), jnp.asarray(list(exclude_layers) or [-1], jnp.int32))
  return jnp.where(excluded[:, None], jnp.nan, kurt)


def top_finite_heads(kurt, top: int = 20) -> jax.Array:
  """int32[min(top, finite), 2] (layer, head) of the largest finite entries of kurt [L, N], decreasing
  (ties: lower flat index first)."""
  kurt = np.asarray(kurt, np.float64)
  flat = kurt.ravel()
  ok = np.nonzero(np.isfinite(flat))[0]
  order = ok[np.argsort(-flat[ok], kind="stable")][:max(0, int(top))]
  return jnp.asarray(np.stack([order // kurt.shape[1], order % kurt.shape[1]], -1).reshape(-1, 2),
                     jnp.int32)


def kurtosis_se(n: int) -> float:
  """Standard error of `kurtosis` (the biased Fisher estimator g2) of n draws from a normal distribution:
  sqrt(24 n (n-2)(n-3) / ((n+1)^2 (n+3)(n+5))) (inf below 4 values). Heavier tails only make it larger, so
  two heads whose kurtosis differs by less than this are not told apart by these sentences: another chain
  of thought of the same size could swap them."""
  n = float(n)
  if n < 4:
    return float("inf")
  return float(np.sqrt(24 * n * (n - 2) * (n - 3) / ((n + 1) ** 2 * (n + 3) * (n + 5))))


@dataclasses.dataclass(frozen=True)
class RankingTies:
  """How much of the kurtosis ranking of heads stands out from sampling noise.

  se: the standard error of one head's kurtosis (`kurtosis_se` of n_scores vertical scores); ranked: heads
  with a finite kurtosis; near_tied: (layer, head) of ranked heads within `se` of a neighbour in the ranking
  (ties and near-ties: their order is not significant); at_cut: heads left out of the selection whose
  kurtosis is within `se` of the last selected head's (the selection's boundary is arbitrary among them).
  """

  se: float
  n_scores: int
  ranked: int
  selected: int
  near_tied: tuple[tuple[int, int], ...]
  at_cut: tuple[tuple[int, int], ...]

  @property
  def significant(self) -> bool:
    """The selection is separated from the rest by more than one standard error."""
    return not self.at_cut

  def format(self) -> str:
    if self.ranked == 0:
      return "no head has a finite kurtosis: no ranking"
    lines = [f"kurtosis ranking: {len(self.near_tied)} of {self.ranked} heads lie within one standard error "
             f"({self.se:.2f}, for {self.n_scores} vertical scores per head) of a neighbour in the ranking; "
             "their order is not significant"]
    if self.at_cut:
      lines.append(f"{len(self.at_cut)} head(s) outside the {self.selected} receiver heads are within one "
                   "standard error of the last one (" + ", ".join(f"L{l}H{h}" for l, h in self.at_cut[:6])
                   + (", ..." if len(self.at_cut) > 6 else "") + "): which heads make the cut is not "
                   "significant")
    return "\n".join(lines)


def ranking_ties(kurt, selected: int, n_scores: int) -> RankingTies:
  """RankingTies of a kurtosis grid [L, N] (NaN = not ranked) whose top `selected` heads were picked."""
  k = np.asarray(kurt, np.float64)
  flat = k.ravel()
  ok = np.nonzero(np.isfinite(flat))[0]
  order = ok[np.argsort(-flat[ok], kind="stable")]
  vals = flat[order]
  se = kurtosis_se(n_scores)
  gaps = np.abs(np.diff(vals))
  close = np.zeros(len(vals), bool)
  close[:-1] |= gaps < se
  close[1:] |= gaps < se
  pair = lambda i: (int(i // k.shape[1]), int(i % k.shape[1]))  # noqa: E731
  selected = min(int(selected), len(vals))
  at_cut = ()
  if 0 < selected < len(vals):
    at_cut = tuple(pair(i) for i, v in zip(order[selected:], vals[selected:]) if vals[selected - 1] - v < se)
  return RankingTies(se, int(n_scores), len(vals), selected, tuple(pair(i) for i in order[close]), at_cut)


def receiver_heads_across(verticals: Sequence[jax.Array], top: int = 20,
                          exclude_layers: Sequence[int] = (0,)) -> tuple[jax.Array, jax.Array]:
  """Receiver heads picked once for many traces, as the reference does: kurtosis per trace, averaged over
  traces (a head NaN in any trace stays NaN), then the top finite heads. Pass the heads to
  `thought_anchors(..., heads=...)` for each trace so every chain is scored by the same heads.

  Args:
    verticals: vertical scores float32[L, N, S_p] per trace (sentence counts may differ).
  Returns:
    heads int32[<= top, 2] and the mean kurtosis float32[L, N].
  """
  if len(verticals) == 0:
    raise ValueError("verticals is empty: give the vertical scores [L, N, S] of at least one trace")
  shapes = {tuple(np.shape(v)[:2]) for v in verticals}
  if len(shapes) != 1 or any(np.ndim(v) != 3 for v in verticals):
    raise ValueError(f"verticals must all be [L, N, S] with the same L, N; got shapes "
                     f"{sorted({tuple(np.shape(v)) for v in verticals})}")
  kurt = jnp.mean(jnp.stack([kurtosis(jnp.asarray(v)) for v in verticals]), 0)
  kurt = _masked_kurtosis(kurt, exclude_layers)
  return top_finite_heads(kurt, top), kurt


def check_heads(heads, n_layers: int, n_heads: int) -> jax.Array:
  """Fixed receiver heads as int32[k, 2] (layer, head), k >= 1, each inside the L x N grid."""
  h = np.asarray(heads)
  if h.ndim == 1 and h.shape[0] == 2:
    h = h[None]
  if h.ndim != 2 or h.shape[1] != 2 or h.shape[0] == 0:
    raise ValueError(f"heads must be a non-empty list of (layer, head) pairs, shape [k, 2]; got shape "
                     f"{h.shape}")
  if not np.issubdtype(h.dtype, np.integer):
    raise ValueError(f"heads must be integer (layer, head) pairs, got dtype {h.dtype}")
  bad = (h[:, 0] < 0) | (h[:, 0] >= n_layers) | (h[:, 1] < 0) | (h[:, 1] >= n_heads)
  if bad.any():
    i = int(np.nonzero(bad)[0][0])
    raise ValueError(f"heads[{i}] = ({h[i, 0]}, {h[i, 1]}) is outside the {n_layers} layers x {n_heads} "
                     "heads of the trace")
  return jnp.asarray(h, jnp.int32)


def sentence_importance(vertical: jax.Array, heads: jax.Array) -> jax.Array:
  """float32[S] mean vertical score over the given (layer, head) pairs int32[k, 2]; all NaN when no head
  is given (no receiver head had a finite kurtosis)."""
  heads = jnp.asarray(heads, jnp.int32).reshape(-1, 2)
  if heads.shape[0] == 0:
    return jnp.full(vertical.shape[-1:], jnp.nan, jnp.float32)
  return vertical[heads[:, 0], heads[:, 1]].mean(0)


# ---------------------------------------------------------------------------------------------------------
# Categories and aggregation
# ---------------------------------------------------------------------------------------------------------

CATEGORIES = ("problem_setup", "plan_generation", "fact_retrieval", "active_computation",
              "uncertainty_management", "result_consolidation", "self_checking", "final_answer_emission")

# The keyword labeller is a heuristic stand-in for the reference's labels (Thought Anchors has an LLM tag
# each sentence with one or more of these categories): regular expressions over the sentence's words, no
# context, English only, and no notion of what a sentence does, only how it is phrased. keyword_label
# checks in this order and keeps the first category with a match (answer and checking phrases are the most
# specific, setup phrases the least); keyword_labels keeps every category with a match (multi-tag).
_KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("final_answer_emission", (r"final answer", r"the answer is", r"\\boxed", r"^answer\s*:",
                               r"answer should be")),
    ("self_checking", (r"\bcheck", r"\bverif", r"double[- ]check", r"make sure", r"\bconfirm",
                       r"let me re-?(?:read|examine|calculate)", r"sanity")),
    ("uncertainty_management", (r"^wait\b", r"\bhmm+\b", r"\bactually\b", r"not sure", r"\bmaybe\b",
                                r"\bmistake", r"\bconfus", r"\balternatively\b", r"\bor perhaps\b",
                                r"^but\b", r"\bi think i\b", r"\bwrong\b")),
    ("fact_retrieval", (r"\brecall", r"\bremember", r"\bknow that\b", r"\bformula\b", r"\bby definition\b",
                        r"\bis defined\b", r"\btheorem\b", r"\bproperty\b", r"\bwell[- ]known\b",
                        r"\bfact\b")),
    ("active_computation", (r"\d\s*[-+*/×÷^=]\s*\d", r"=", r"\bcompute", r"\bcalculat", r"\bmultipl",
                            r"\badd(?:ing)?\b", r"\bsubtract", r"\bdivid", r"\btimes\b", r"\bsquare",
                            r"\bsum of\b", r"\bsimplif", r"\bplug")),
    ("result_consolidation", (r"^so\b", r"\btherefore\b", r"\bthus\b", r"\bhence\b", r"\bin total\b",
                              r"\bthis means\b", r"\bthat gives\b", r"\bwhich gives\b", r"\bin summary\b",
                              r"\bputting (?:it|this) together\b", r"\boverall\b")),
    ("plan_generation", (r"^let'?s\b", r"^let me\b", r"^first\b", r"^next\b", r"^then\b", r"\bapproach\b",
                         r"\bplan\b", r"\bstrategy\b", r"\bi (?:will|should|need to)\b", r"\bwe can\b",
                         r"\bstep\b", r"\bi'll\b")),
    ("problem_setup", (r"\bthe problem\b", r"\bthe question\b", r"\bwe (?:are|were) (?:asked|given)\b",
                       r"\bgiven\b", r"\bwe need to\b", r"\bfind\b", r"\basks?\b")),
)
_COMPILED = tuple((c, tuple(re.compile(p, re.I) for p in ps)) for c, ps in _KEYWORDS)


def keyword_label(sentence: str) -> str:
  """Default labeller: the first category (in a fixed priority order) whose keyword pattern matches;
  "unknown" when none does. A heuristic (see _KEYWORDS): pass your own labels or labeller for real
  studies."""
  labs = keyword_labels(sentence)
  return labs[0] if labs else "unknown"


def keyword_labels(sentence: str) -> tuple[str, ...]:
  """Multi-tag heuristic labeller: every category whose keyword pattern matches, in priority order;
  ("unknown",) when none does. Pass as `labeller=` to count a sentence in all its categories."""
  s = sentence.strip()
  return tuple(cat for cat, pats in _COMPILED if any(p.search(s) for p in pats)) or ("unknown",)


def _tags(label) -> tuple[str, ...]:
  """The categories of one label: a string is one tag, a list/tuple/set several."""
  if isinstance(label, str):
    return (label,)
  if isinstance(label, (list, tuple, set, frozenset)) and all(isinstance(t, str) for t in label):
    return tuple(sorted(label)) if isinstance(label, (set, frozenset)) else tuple(label)
  raise TypeError(f"a label must be a category string or a list/tuple of them, got {label!r}")


def label_sentences(texts: Sequence[str], labeller: Optional[Callable[[str], object]] = None,
                    labels: Optional[Sequence[object]] = None) -> tuple:
  """Category per sentence: the given labels (checked for length), else labeller(sentence) per sentence.

  A label is a category string or, for multi-tag labels, a tuple of them (lists and sets become tuples).
  """
  if labels is not None:
    if isinstance(labels, str) or len(labels) != len(texts):
      n = "a string" if isinstance(labels, str) else f"{len(labels)} labels"
      raise ValueError(f"labels: got {n} for {len(texts)} sentences (one label per sentence)")
    raw = labels
  else:
    fn = keyword_label if labeller is None else labeller
    raw = [fn(t) for t in texts]
  return tuple(l if isinstance(l, str) else _tags(l) for l in raw)


def by_category(scores, labels: Sequence[object]) -> dict[str, tuple[float, int]]:
  """{category: (mean score, number of sentences with a finite score)}, in CATEGORIES order first.

  A multi-tag label (tuple of categories) counts its sentence in each of its categories, as the
  reference's per-tag averages do; the counts then sum to more than the number of sentences.
  """
  scores = np.asarray(scores, np.float64)
  if len(labels) != len(scores):
    raise ValueError(f"labels: got {len(labels)} labels for {len(scores)} scores")
  tags = [_tags(l) for l in labels]
  out = {}
  seen = {t for ts in tags for t in ts}
  order = list(CATEGORIES) + sorted(seen - set(CATEGORIES))
  for cat in order:
    vals = scores[[i for i, ts in enumerate(tags) if cat in ts]]
    vals = vals[np.isfinite(vals)]
    if len(vals):
      out[cat] = (float(vals.mean()), int(len(vals)))
  return out


def by_position(scores, bins: int = 10) -> np.ndarray:
  """float64[bins] mean score by relative position in the chain (sentence s of S falls in bin
  floor(bins * s / S)); NaN for empty bins."""
  scores = np.asarray(scores, np.float64)
  s = len(scores)
  which = (np.arange(s) * bins) // max(s, 1)
  out = np.full(bins, np.nan)
  for b in range(bins):
    vals = scores[(which == b) & np.isfinite(scores)]
    if len(vals):
      out[b] = vals.mean()
  return out


def spearman(a, b) -> float:
  """Spearman rank correlation of two vectors (average ranks for ties; pairs with a NaN dropped)."""
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  ok = np.isfinite(a) & np.isfinite(b)
  a, b = _rank(a[ok]), _rank(b[ok])
  if len(a) < 2 or a.std() == 0 or b.std() == 0:
    return float("nan")
  return float(np.corrcoef(a, b)[0, 1])


def _rank(x: np.ndarray) -> np.ndarray:
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x))
  ranks[order] = np.arange(len(x), dtype=np.float64)
  for v in np.unique(x):  # average ranks of ties
    tie = x == v
    if tie.sum() > 1:
      ranks[tie] = ranks[tie].mean()
  return ranks


# ---------------------------------------------------------------------------------------------------------
# One call
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AnchorReport:
  """Thought-anchor analysis of one chain of thought.

  vertical: float32[L, N, S]; kurtosis: float32[L, N]; heads: int32[k, 2] receiver (layer, head), picked
  here or given; importance: float32[S]; labels: category (or tuple of categories) per sentence; categories: {category: (mean importance, count)};
  positions: mean importance per relative-position bin; ties: how significant the receiver-head ranking
  is (`RankingTies`; None when the heads were given).
  """

  sentences: Sentences
  vertical: jax.Array
  kurtosis: jax.Array
  heads: jax.Array
  importance: jax.Array
  labels: tuple[str, ...]
  categories: Mapping[str, tuple[float, int]]
  positions: np.ndarray
  ties: Optional[RankingTies] = None

  def top(self, n: int = 5) -> list[tuple[int, float, str, str]]:
    """The n most important sentences: (index, score, label, text)."""
    imp = np.nan_to_num(np.asarray(self.importance), nan=-np.inf)
    return [(int(i), float(imp[i]), self.labels[i], self.sentences.texts[i]) for i in np.argsort(-imp)[:n]]

  def sink_sentences(self, block_k: int) -> tuple[int, ...]:
    """Sentences that share a key block with BOS (block 0, the attention sink): their high scores come
    from the sink, where most heads park attention whatever the text, not from their content."""
    tok = np.asarray(self.sentences.tokens).reshape(-1, 2)
    return tuple(int(i) for i in np.nonzero(tok[:, 0] < block_k)[0])


def layer_vertical_scores(mass: jax.Array, indices: jax.Array, spans, *, block_q: int, block_k: int,
                          q_len: int, k_len: int, proximity_ignore: int = 4) -> jax.Array:
  """float32[..., N, S] vertical scores of one layer from its (mass, indices) [..., N, nQ, C]."""
  m = sentence_matrix(mass, indices, spans, block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len)
  return vertical_scores(m, proximity_ignore)


def trace_vertical_scores(trace: Trace, spans, *, proximity_ignore: int = 4) -> jax.Array:
  """float32[L, ..., N, S] vertical scores of every layer of a Trace."""
  out = []
  for l in trace.layers:
    m = l.mask
    out.append(layer_vertical_scores(l.mass, m.indices, spans, block_q=m.block_q, block_k=m.block_k,
                                     q_len=m.q_len, k_len=m.k_len, proximity_ignore=proximity_ignore))
  return jnp.stack(out)


def dense_vertical_scores(block_masses: Sequence[jax.Array], spans, *, block_q: int, block_k: int,
                          q_len: int, k_len: int, proximity_ignore: int = 4) -> jax.Array:
  """float32[L, ..., N, S]: the same pipeline on dense block masses [..., N, nQ, nK] (the validation
  reference at short T)."""
  out = []
  for bm in block_masses:
    idx = full_indices(bm.shape[:-1], bm.shape[-1])
    out.append(layer_vertical_scores(bm, idx, spans, block_q=block_q, block_k=block_k, q_len=q_len,
                                     k_len=k_len, proximity_ignore=proximity_ignore))
  return jnp.stack(out)


def anchors_from_vertical(vertical: jax.Array, sents: Sentences, *, top_heads: int = 20,
                          exclude_layers: Sequence[int] = (0,),
                          labeller: Optional[Callable[[str], object]] = None,
                          labels: Optional[Sequence[object]] = None, bins: int = 10,
                          heads=None) -> AnchorReport:
  """Receiver heads, importance, labels and aggregates from vertical scores [L, N, S].

  heads: fixed receiver heads int[k, 2] (layer, head), e.g. from `receiver_heads_across` over many traces
  (the reference picks them once and applies them to each chain); None picks them from this trace alone.
  """
  ties = None
  if heads is not None:
    heads = check_heads(heads, vertical.shape[0], vertical.shape[1])
    kurt = _masked_kurtosis(kurtosis(vertical), exclude_layers)
  else:
    heads, kurt = receiver_heads(vertical, top_heads, exclude_layers)
    n_scores = int(np.isfinite(np.asarray(vertical)).sum(-1).max()) if vertical.size else 0
    ties = ranking_ties(kurt, int(heads.shape[0]), n_scores)
  imp = sentence_importance(vertical, heads)
  labs = label_sentences(sents.texts, labeller, labels)
  return AnchorReport(sents, vertical, kurt, heads, imp, labs, by_category(imp, labs),
                      by_position(imp, bins), ties)


def thought_anchors(trace: Trace, sents: Sentences, *, batch_index: Optional[int] = None,
                    top_heads: int = 20, exclude_layers: Sequence[int] = (0,), proximity_ignore: int = 4,
                    labeller: Optional[Callable[[str], object]] = None,
                    labels: Optional[Sequence[object]] = None, bins: int = 10, heads=None) -> AnchorReport:
  """Thought-anchor analysis of one traced chain of thought.

  Args:
    trace: the Stream trace of the forward pass over the text (token positions = the tokenizer's).
    sents: `sentences(text, offsets)` of the same text.
    batch_index: which sample when the trace has a batch axis.
    top_heads, exclude_layers: receiver-head selection (top-20 finite kurtosis, layer 0 excluded).
    heads: fixed receiver heads int[k, 2] (layer, head) instead of picking them from this trace, e.g. from
      `receiver_heads_across` over many chains (as the reference does).
    proximity_ignore: vertical scores average rows i >= j + proximity_ignore.
    labeller / labels: category labelling (keyword heuristic by default; `keyword_labels` multi-tags);
      a label is a category or a tuple of categories.
  """
  if len(sents) == 0:
    raise ValueError("sents has no sentences: the text's reasoning region gave no sentence with tokens")
  checks.check_spans("sentence token spans", sents.tokens, trace.layers[0].mask.k_len)
  v = trace_vertical_scores(trace, sents.tokens, proximity_ignore=proximity_ignore)
  if batch_index is not None:
    v = v[:, batch_index]
  if v.ndim != 3:
    raise ValueError(f"vertical scores have shape {v.shape}; pass batch_index for a batched trace")
  return anchors_from_vertical(v, sents, top_heads=top_heads, exclude_layers=exclude_layers,
                               labeller=labeller, labels=labels, bins=bins, heads=heads)
