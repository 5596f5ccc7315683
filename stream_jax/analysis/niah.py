"""RULER-style needle-in-a-haystack tasks, generated without external data, fitted to an exact token length.

Follows RULER's `niah` task (Hsieh et al., 2024): the needle "One of the special magic {numbers|words|uuids}
for {key} is: {value}." hidden in a haystack of repeated noise sentences, or among distractor needles
("needle-in-needles"); variants single / multi-key (distractor keys) / multi-value (several values per
key) / multi-query (several keys asked); depth control; scoring by `string_match_all` on a greedy answer.

Each sample records the prompt, its token ids (length exactly the requested one, BOS included when the
tokenizer adds it), and for every needle its key, value, and char and token spans, so the routes module
can find the needle's key blocks in a trace.
"""

from __future__ import annotations

import dataclasses
import random
import re
import uuid
from typing import Callable, Literal, Optional, Sequence

import numpy as np

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type} for {key} is: {value}."
# RULER's template for base models, with its answer prefix appended (a completion prompt).
TEMPLATE = ("Some special magic {type} are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the {type} afterwards.\n{context}\n"
            "What are all the special magic {type} for {query} mentioned in the provided text?")
ANSWER_PREFIX = " The special magic {type} for {query} mentioned in the provided text are"

# Small embedded word lists (RULER draws adjective-noun keys from `wonderwords`).
ADJECTIVES = (
    "able", "ancient", "bitter", "brave", "bright", "calm", "clever", "curious", "damp", "eager", "fancy",
    "fierce", "gentle", "giant", "glossy", "hollow", "humble", "icy", "jolly", "keen", "lazy", "lively",
    "loud", "lucky", "mellow", "misty", "noble", "odd", "pale", "proud", "quiet", "rapid", "rare", "rough",
    "rusty", "shiny", "silent", "sleepy", "smooth", "solid", "spicy", "steady", "sturdy", "swift", "tame",
    "tidy", "vast", "vivid", "wild", "witty")
NOUNS = (
    "anchor", "apple", "badger", "barrel", "beacon", "bicycle", "blanket", "bridge", "button", "candle",
    "canyon", "castle", "cherry", "cloud", "compass", "cookie", "dragon", "engine", "falcon", "feather",
    "forest", "garden", "guitar", "hammer", "harbor", "island", "jacket", "kettle", "ladder", "lantern",
    "meadow", "mirror", "monkey", "needle", "orchard", "otter", "pencil", "pepper", "pillow", "planet",
    "pocket", "rabbit", "river", "saddle", "shovel", "spider", "teapot", "tunnel", "violin", "window")

ValueType = Literal["numbers", "words", "uuids"]
Haystack = Literal["noise", "needles"]


@dataclasses.dataclass(frozen=True)
class NiahTask:
  """Which RULER niah variant.

  haystack: "noise" (repeated noise sentences) or "needles" (distractor needles with other keys).
  value_type / key_type: "numbers" (7 digits), "words" (adjective-noun) or "uuids".
  num_keys: needles' keys inserted (the first num_queries are asked; the rest are distractors).
  num_values: values per key (multi-value). num_queries: keys asked (multi-query).
  depths: needle depths in percent of the haystack (None: one random depth per needle).
  """

  haystack: Haystack = "noise"
  value_type: ValueType = "numbers"
  key_type: ValueType = "words"
  num_keys: int = 1
  num_values: int = 1
  num_queries: int = 1
  depths: Optional[tuple[float, ...]] = None
  template: str = TEMPLATE
  answer_prefix: str = ANSWER_PREFIX

  def __post_init__(self):
    if self.haystack not in ("noise", "needles"):
      raise ValueError(f"NiahTask.haystack must be 'noise' or 'needles', got {self.haystack!r}")
    for name in ("value_type", "key_type"):
      if getattr(self, name) not in ("numbers", "words", "uuids"):
        raise ValueError(f"NiahTask.{name} must be numbers|words|uuids, got {getattr(self, name)!r}")
    if not (1 <= self.num_queries <= self.num_keys) or self.num_values < 1:
      raise ValueError("NiahTask needs 1 <= num_queries <= num_keys and num_values >= 1, got "
                       f"{self.num_queries}, {self.num_keys}, {self.num_values}")
    if self.depths is not None:
      if len(self.depths) != self.num_keys * self.num_values:
        raise ValueError(f"NiahTask.depths needs one depth per needle ({self.num_keys * self.num_values}), "
                         f"got {len(self.depths)}")
      if any(not 0 <= d <= 100 for d in self.depths):
        raise ValueError(f"NiahTask.depths are percentages in [0, 100], got {self.depths}")


# RULER's named variants (with the noise haystack where RULER uses essays: no external data here).
VARIANTS = {
    "single_1": NiahTask(),
    "single_2": NiahTask(value_type="numbers", key_type="words"),
    "single_3": NiahTask(value_type="uuids"),
    "multikey_1": NiahTask(num_keys=4),
    "multikey_2": NiahTask(haystack="needles"),
    "multikey_3": NiahTask(haystack="needles", key_type="uuids", value_type="uuids"),
    "multivalue": NiahTask(num_values=4),
    "multiquery": NiahTask(num_keys=4, num_queries=4),
}


@dataclasses.dataclass(frozen=True)
class Needle:
  """One inserted needle: spans are [start, end) in prompt chars / token positions."""

  key: str
  value: str
  text: str
  char_span: tuple[int, int]
  token_span: tuple[int, int]
  value_char_span: tuple[int, int]
  value_token_span: tuple[int, int]
  queried: bool


@dataclasses.dataclass(frozen=True)
class NiahSample:
  """A fitted prompt: text, ids int32[T] (T == length), needles, the asked keys and expected answers."""

  prompt: str
  ids: np.ndarray
  offsets: np.ndarray
  length: int
  needles: tuple[Needle, ...]
  keys: tuple[str, ...]
  answers: tuple[str, ...]
  question: str
  task: NiahTask

  @property
  def queried_needles(self) -> tuple[Needle, ...]:
    return tuple(n for n in self.needles if n.queried)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer adapter
# ---------------------------------------------------------------------------------------------------------

def encode(tokenizer, text: str, add_special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32[T], offsets int64[T, 2]) from a transformers fast tokenizer, a `tokenizers.Tokenizer`, or
  an object holding one as `.tokenizer` (e.g. stream_jax.models.LoadedModel)."""
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  if isinstance(tokenizer, Tokenizer):
    enc = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return np.asarray(enc.ids, np.int32), np.asarray(enc.offsets, np.int64).reshape(-1, 2)
  if not callable(tokenizer):
    if getattr(tokenizer, "tokenizer", None) is None:
      raise TypeError(f"not a tokenizer: {type(tokenizer).__name__}")
    return encode(tokenizer.tokenizer, text, add_special_tokens)
  enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
  return (np.asarray(enc["input_ids"], np.int32),
          np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2))


def char_to_token_span(offsets: np.ndarray, span: tuple[int, int]) -> tuple[int, int]:
  """Token range [start, end) of the tokens overlapping chars [a, b) (special tokens never do)."""
  a, b = span
  hit = np.nonzero((offsets[:, 0] < b) & (offsets[:, 1] > a) & (offsets[:, 1] > offsets[:, 0]))[0]
  if not len(hit):
    raise ValueError(f"no token overlaps chars {span}")
  return int(hit[0]), int(hit[-1]) + 1


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------

def _draw(kind: ValueType, rng: random.Random) -> str:
  if kind == "numbers":
    return str(rng.randint(10 ** 6, 10 ** 7 - 1))
  if kind == "words":
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
  return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _draw_distinct(kind: ValueType, n: int, rng: random.Random, avoid=()) -> list[str]:
  out, seen = [], set(avoid)
  while len(out) < n:
    x = _draw(kind, rng)
    if x not in seen:
      seen.add(x)
      out.append(x)
  return out


def _join_query(keys: Sequence[str]) -> str:
  return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What stays fixed while the haystack length is searched."""

  needles: tuple[tuple[str, str, bool], ...]  # (key, value, queried) in insertion order
  depths: tuple[float, ...]
  units: tuple[str, ...]  # haystack sentences, long enough for any target
  keys: tuple[str, ...]
  type_name: str


def _render(plan: _Plan, task: NiahTask, n_units: int, partial: str):
  """Prompt text and the char spans of the needles (and of their values) for n whole units + a partial."""
  units = list(plan.units[:n_units]) + ([partial] if partial else [])
  slots = sorted(((int(round(len(units) * d / 100)), i) for i, d in enumerate(plan.depths)))
  pieces: list[tuple[str, Optional[int]]] = []
  last = 0
  for pos, i in slots:
    pieces += [(u, None) for u in units[last:pos]]
    pieces.append((NEEDLE.format(type=plan.type_name, key=plan.needles[i][0], value=plan.needles[i][1]), i))
    last = pos
  pieces += [(u, None) for u in units[last:]]
  query = _join_query(plan.keys)
  head, tail = task.template.split("{context}")
  head = head.format(type=plan.type_name, query=query)
  tail = tail.format(type=plan.type_name, query=query) + task.answer_prefix.format(type=plan.type_name,
                                                                                   query=query)
  text, spans = head, {}
  for j, (piece, i) in enumerate(pieces):
    if j:
      text += " "
    if i is not None:
      spans[i] = (len(text), len(text) + len(piece))
    text += piece
  return text + tail, spans, tail


def _fit(plan: _Plan, task: NiahTask, tokenizer, length: int, add_special_tokens: bool):
  """Largest haystack (whole units, then chars of the next unit) whose prompt has exactly `length` tokens."""
  count = lambda n, p="": len(encode(tokenizer, _render(plan, task, n, p)[0], add_special_tokens)[0])
  if count(0) > length:
    raise ValueError(f"length {length} is shorter than the prompt without haystack ({count(0)} tokens)")
  lo, hi = 0, len(plan.units)
  if count(hi) <= length:
    raise ValueError(f"internal: a haystack of {hi} units is too short for {length} tokens")
  while hi - lo > 1:  # count(lo) <= length < count(hi)
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if count(mid) <= length else (lo, mid)
  if count(lo) == length:
    return lo, ""
  nxt = plan.units[lo]
  cuts = [m.end() for m in re.finditer(r"\S+", nxt)]  # word ends, then every char
  best = 0
  for c in cuts:
    if count(lo, nxt[:c]) > length:
      break
    best = c
  for c in range(best, len(nxt) + 1):
    n = count(lo, nxt[:c].rstrip())
    if n == length and nxt[:c].rstrip():
      return lo, nxt[:c].rstrip()
    if n > length:
      break
  raise ValueError(f"could not fit the prompt to exactly {length} tokens (a char step adds two tokens); "
                   "try length +- 1")


def generate_sample(tokenizer, length: int, task: NiahTask = NiahTask(), *, seed: int = 0,
                    add_special_tokens: bool = True) -> NiahSample:
  """One RULER niah prompt of exactly `length` tokens (as `tokenizer` encodes it, BOS included if it adds one).

  Args:
    tokenizer: transformers fast tokenizer, tokenizers.Tokenizer, or a LoadedModel.
    length: target token count of the whole prompt (template + haystack + question + answer prefix).
    task: the variant (NiahTask or VARIANTS[name]).
    seed: drives keys, values, distractors and random depths.
  """
  rng = random.Random(seed)
  n_needles = task.num_keys * task.num_values
  keys = _draw_distinct(task.key_type, task.num_keys, rng)
  values = _draw_distinct(task.value_type, n_needles, rng)
  needles = [(keys[i // task.num_values], values[i], i // task.num_values < task.num_queries)
             for i in range(n_needles)]
  depths = task.depths if task.depths is not None else tuple(rng.uniform(0, 100) for _ in range(n_needles))
  type_name = task.value_type
  # Enough haystack units for `length` tokens whatever the tokenizer (>= 1 char per token).
  if task.haystack == "noise":
    sents = re.findall(r"[^.]+\.", NOISE)
    units = tuple(s.strip() for s in sents) * (length // 2 + 2)
  else:
    d_keys = _draw_distinct(task.key_type, length // 8 + 2, rng, avoid=keys)
    d_vals = _draw_distinct(task.value_type, len(d_keys), rng, avoid=values)
    units = tuple(NEEDLE.format(type=type_name, key=k, value=v) for k, v in zip(d_keys, d_vals))
  plan = _Plan(tuple(needles), tuple(depths), units, tuple(keys[:task.num_queries]), type_name)
  n_units, partial = _fit(plan, task, tokenizer, length, add_special_tokens)
  prompt, spans, tail = _render(plan, task, n_units, partial)
  ids, offsets = encode(tokenizer, prompt, add_special_tokens)
  out = []
  for i, (key, value, queried) in enumerate(needles):
    a, b = spans[i]
    text = prompt[a:b]
    va = a + text.rindex(value)
    vspan = (va, va + len(value))
    out.append(Needle(key, value, text, (a, b), char_to_token_span(offsets, (a, b)), vspan,
                      char_to_token_span(offsets, vspan), queried))
  answers = tuple(v for k, v, q in needles if q)
  return NiahSample(prompt, ids, offsets, int(len(ids)), tuple(out), plan.keys, answers,
                    tail.strip(), task)


def generate_samples(tokenizer, length: int, n: int, task: NiahTask = NiahTask(), *, seed: int = 0,
                     **kw) -> list[NiahSample]:
  """n samples with seeds seed, seed + 1, ..."""
  return [generate_sample(tokenizer, length, task, seed=seed + i, **kw) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------

def postprocess(prediction: str) -> str:
  """RULER's prediction clean-up: control characters become newlines, then strip."""
  return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def match_all(prediction: str, refs: Sequence[str]) -> float:
  """Share of the references found in the prediction (case-insensitive substring)."""
  p = postprocess(prediction).lower()
  return sum(r.lower() in p for r in refs) / len(refs)


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """RULER's metric: mean over samples of the share of references found, in percent."""
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
  return 100.0 * sum(match_all(p, r) for p, r in zip(predictions, references)) / max(len(predictions), 1)


@dataclasses.dataclass(frozen=True)
class NiahResult:
  """A scored sample: prediction text, score in [0, 1] (share of answers found), success = all found."""

  sample: NiahSample
  prediction: str
  score: float

  @property
  def success(self) -> bool:
    return self.score == 1.0


def evaluate(samples: Sequence[NiahSample], generate: Callable[[NiahSample], str]) -> list[NiahResult]:
  """Greedy answers from `generate(sample) -> continuation text` (a callable over your model), scored."""
  out = []
  for s in samples:
    pred = generate(s)
    out.append(NiahResult(s, pred, match_all(pred, s.answers)))
  return out
