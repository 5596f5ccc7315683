"""RULER-style needle-in-a-haystack tasks, generated without external data, fitted to an exact token length.

Follows RULER's `niah` task (Hsieh et al., 2024; NVIDIA/RULER scripts/data/synthetic/niah.py and its
synthetic.yaml): the needle "One of the special magic {numbers|words|uuids} for {key} is: {value}." hidden
in one of three haystacks, as RULER builds them:
  noise    the five-sentence paragraph repeated; paragraphs and needles joined by "\n" (a needle on its own
           line), needles between whole paragraphs;
  essay    real prose (any user text, or an offline default: the long descriptions of the installed
           packages' METADATA), whitespace-normalised, split into sentences; needles inserted at sentence
           boundaries, everything joined by " ";
  needles  distractor needles with other keys, joined by "\n".
Variants as RULER's table (single / multi-key / multi-value / multi-query), the keys asked drawn at random
among the inserted ones, RULER's singular wording when one value of one key is asked; depth control;
scoring by `string_match_all` on a greedy answer.

Exact length (a stream_jax addition: RULER fits whole units to at most the length): the haystack is whole
units, then the next unit's whole sentences, then, only when still short, that last sentence's first words
(then chars). The cut happens once, at the haystack's end (RULER's essay haystack is cut by words there
too); `exact=False` keeps whole units only and gives a prompt of at most `length` tokens.

Each sample records the prompt, its token ids (length exactly the requested one, BOS included when the
tokenizer adds it), and for every needle its key, value, and char and token spans, so the routes module
can find the needle's key blocks in a trace.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re
import uuid
from typing import Callable, Literal, Optional, Sequence

import numpy as np

from stream_jax import checks

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type} for {key} is: {value}."
# RULER's template for base models, with its answer prefix appended (a completion prompt). Plural as RULER
# writes it; `singular` gives RULER's wording for one query with one value.
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
Haystack = Literal["noise", "essay", "needles"]


def singular(text: str) -> str:
  """RULER's rewording of its template when one value of one key is asked: "Some" -> "A", "are all" ->
  "is", "are" -> "is", "answers" -> "answer" (applied to the template text, before formatting)."""
  for a, b in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
    text = text.replace(a, b)
  return text


@dataclasses.dataclass(frozen=True)
class NiahTask:
  """Which RULER niah variant.

  haystack: "noise" (the noise paragraph repeated), "essay" (real prose) or "needles" (distractor needles
    with other keys).
  value_type / key_type: "numbers" (7 digits), "words" (adjective-noun) or "uuids".
  num_keys: needles' keys inserted (num_queries of them, drawn at random, are asked; the rest distract).
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
    if self.haystack not in ("noise", "essay", "needles"):
      raise ValueError(f"NiahTask.haystack must be 'noise', 'essay' or 'needles', got {self.haystack!r}")
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


  @property
  def is_singular(self) -> bool:
    """RULER writes the singular ("A special magic number is hidden...") when one value is asked."""
    return self.num_queries * self.num_values == 1


# RULER's named variants (synthetic.yaml: niah_single_1 ... niah_multiquery). Keys are words unless noted.
VARIANTS = checks.Choices("niah.VARIANTS", {
    "single_1": NiahTask(haystack="noise"),
    "single_2": NiahTask(haystack="essay"),
    "single_3": NiahTask(haystack="essay", value_type="uuids"),
    "multikey_1": NiahTask(haystack="essay", num_keys=4),
    "multikey_2": NiahTask(haystack="needles"),
    "multikey_3": NiahTask(haystack="needles", key_type="uuids", value_type="uuids"),
    "multivalue": NiahTask(haystack="essay", num_values=4),
    "multiquery": NiahTask(haystack="essay", num_keys=4, num_queries=4),
})


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

  @property
  def value_spans(self) -> np.ndarray:
    """int32[k, 2]: [start, end) token spans of the asked needles' values (what routes and needle mass
    measure)."""
    return np.asarray([n.value_token_span for n in self.queried_needles], np.int32).reshape(-1, 2)

  def needle_blocks(self, block_k: int) -> tuple[int, ...]:
    """Sorted key blocks of `block_k` tokens that hold a token of an asked value."""
    if not isinstance(block_k, (int, np.integer)) or block_k < 1:
      raise ValueError(f"block_k must be a positive integer, got {block_k!r}")
    return tuple(sorted({int(b) for s, e in self.value_spans if e > s
                         for b in range(s // block_k, (e - 1) // block_k + 1)}))


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


# ---------------------------------------------------------------------------------------------------------
# Essay haystack
# ---------------------------------------------------------------------------------------------------------

# A sentence ends at . ! ? (and any closing quotes/brackets) followed by whitespace.
_SENT_END = re.compile(r"[.!?][\"')\]]*(?=\s)")
_PROSE_SKIP = re.compile(r"https?://|www\.|`|\||::|>>>|\$ |permission is hereby granted|warrant|"
                         r"all rights reserved|licensed under", re.I)


def split_prose(text: str) -> list[str]:
  """Sentences of a text after RULER's whitespace normalisation (every run of whitespace -> one space)."""
  text = " ".join(text.split())
  out, start = [], 0
  for m in _SENT_END.finditer(text):
    out.append(text[start:m.end()].strip())
    start = m.end()
  out.append(text[start:].strip())
  return [p for p in out if p]


def _prose_paragraphs(body: str) -> list[str]:
  """Paragraphs of a README that read as prose: mostly letters, ending a sentence, no code, markup,
  links or licence text (Markdown links keep their text)."""
  out = []
  for par in re.split(r"\n[^\S\n]*\n", body.replace("\r\n", "\n")):
    lines = par.strip().split("\n")
    if any(l.startswith(("    ", "\t", "#", "=", "[", "!", "<", "..", ":", ">", "|", "```")) for l in lines):
      continue
    text = " ".join(" ".join(lines).split())
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text).replace("*", "")
    letters = sum(c.isalpha() or c == " " for c in text)
    if len(text) >= 80 and letters >= 0.85 * len(text) and text[-1] in ".!?" and not _PROSE_SKIP.search(text):
      out.append(text)
  return out


@functools.lru_cache(maxsize=1)
def default_essay(root: Optional[str] = None) -> str:
  """The offline default essay haystack: prose paragraphs of the long descriptions in the installed
  packages' *.dist-info/METADATA (READMEs nobody on this project wrote), in distribution-name order.
  Depends only on the installed package versions; about 90k chars (~20k tokens) in this project's venv,
  repeated for longer prompts (RULER's Paul Graham essays are ~0.5M chars, not redistributable here)."""
  import email.parser  # pylint: disable=import-outside-toplevel
  import glob  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import sysconfig  # pylint: disable=import-outside-toplevel
  root = root or sysconfig.get_paths()["purelib"]
  docs = []
  for path in glob.glob(os.path.join(root, "*.dist-info", "METADATA")):
    with open(path, encoding="utf-8", errors="replace") as f:
      msg = email.parser.Parser().parse(f)
    name = (msg.get("Name") or "").lower().replace("-", "_")
    if name.startswith(("stream_jax", "gemma3_270m")):  # this project's own text
      continue
    body = msg.get_payload() if not msg.is_multipart() else ""
    body = body if isinstance(body, str) and body.strip() else (msg.get("Description") or "")
    docs.append((name, _prose_paragraphs(body)))
  text = "\n\n".join(p for _, ps in sorted(docs) for p in ps)
  if len(text) < 2000:
    raise RuntimeError(f"the installed packages under {root} hold too little README prose for the default "
                       "essay haystack; pass haystack_text or haystack_file")
  return text


def read_haystack_file(path) -> str:
  """A user haystack file's text: UTF-8, not empty, not binary (errors name `haystack_file`)."""
  import os  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise FileNotFoundError(f"haystack_file {str(path)!r} does not exist or is not a file")
  with open(path, "rb") as f:
    raw = f.read()
  if b"\x00" in raw:
    raise ValueError(f"haystack_file {str(path)!r} is binary (it has NUL bytes); give a UTF-8 text file")
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise ValueError(f"haystack_file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from e
  if not text.strip():
    raise ValueError(f"haystack_file {str(path)!r} is empty (no text to build the haystack from)")
  return text


# ---------------------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Plan:
  """What stays fixed while the haystack length is searched."""

  needles: tuple[tuple[str, str, bool], ...]  # (key, value, queried) in insertion order
  depths: tuple[float, ...]
  units: tuple[str, ...]  # haystack units (paragraphs / sentences / needles), long enough for any target
  sep: str  # what joins units and needles: "\n" (noise, needles) or " " (essay), as RULER
  keys: tuple[str, ...]  # asked, in the question's order
  type_name: str  # plural value type, for the needles
  template: str  # template + answer prefix, singular where RULER writes it
  type_word: str  # the value type as the template says it ("number" or "numbers")


def _render(plan: _Plan, n_units: int, partial: str):
  """Prompt text and the char spans of the needles for n whole units + a partial last unit."""
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
  head, tail = plan.template.split("{context}")
  head = head.format(type=plan.type_word, query=query)
  tail = tail.format(type=plan.type_word, query=query)
  text, spans = head, {}
  for j, (piece, i) in enumerate(pieces):
    if j:
      text += plan.sep
    if i is not None:
      spans[i] = (len(text), len(text) + len(piece))
    text += piece
  return text + tail, spans, tail


def _partials(unit: str):
  """Ever longer prefixes of a unit, one word more each: (prefix, True where it ends a sentence)."""
  done = ""
  for sent in split_prose(unit):
    for m in re.finditer(r"\S+", sent):
      yield (done + " " if done else "") + sent[:m.end()], m.end() == len(sent)
    done = (done + " " if done else "") + sent


def _fit(plan: _Plan, tokenizer, length: int, add_special_tokens: bool, exact: bool):
  """Largest haystack whose prompt has exactly `length` tokens (at most, when not exact)."""
  count = lambda n, p="": len(encode(tokenizer, _render(plan, n, p)[0], add_special_tokens)[0])
  if count(0) > length:
    raise ValueError(f"length {length} is shorter than the prompt without haystack ({count(0)} tokens)")
  lo, hi = 0, len(plan.units)
  if count(hi) <= length:
    raise ValueError(f"internal: a haystack of {hi} units is too short for {length} tokens")
  while hi - lo > 1:  # count(lo) <= length < count(hi)
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if count(mid) <= length else (lo, mid)
  if count(lo) == length or not exact:
    return lo, ""
  # The last unit's prefix: the next unit's, else (when no prefix of it hits the length, e.g. one char
  # adds two tokens) a later unit's.
  for nxt in plan.units[lo:lo + 16]:
    best, hits = "", []
    for prefix, whole in _partials(nxt):
      n = count(lo, prefix)
      if n > length:
        break
      best = prefix
      if n == length:
        hits.append((whole, len(prefix), prefix))
    if hits:  # whole sentences when they fit exactly, else the longest word cut
      return lo, max(hits)[2]
    for c in range(len(best) + 1, len(nxt) + 1):  # then chars (a word adding several tokens)
      p = nxt[:c].rstrip()
      n = count(lo, p)
      if n == length and p:
        return lo, p
      if n > length:
        break
  raise ValueError(f"could not fit the prompt to exactly {length} tokens (a char step adds two tokens); "
                   "try length +- 1")


def _haystack_units(task: NiahTask, length: int, rng: random.Random, keys, values, type_name,
                    haystack_text: Optional[str]) -> tuple[tuple[str, ...], str]:
  """More haystack units than `length` tokens can hold (a token has at most ~16 chars of prose), and the
  separator."""
  if task.haystack == "noise":
    return (NOISE,) * (length // 5 + 2), "\n"
  if task.haystack == "needles":
    d_keys = _draw_distinct(task.key_type, length // 8 + 2, rng, avoid=keys)
    d_vals = _draw_distinct(task.value_type, len(d_keys), rng, avoid=values)
    return tuple(NEEDLE.format(type=type_name, key=k, value=v) for k, v in zip(d_keys, d_vals)), "\n"
  sents = split_prose(default_essay() if haystack_text is None else haystack_text)
  if not sents:
    raise ValueError("haystack_text has no text to build the essay haystack from")
  units, chars = [], 0
  while chars <= 16 * length + 200:  # the text repeats when it is shorter than the prompt
    for u in sents:
      units.append(u)
      chars += len(u) + 1
      if chars > 16 * length + 200:
        break
  return tuple(units), " "


def generate_sample(tokenizer, length: int, task: NiahTask = NiahTask(), *, seed: int = 0,
                    add_special_tokens: bool = True, haystack_text: Optional[str] = None,
                    haystack_file=None, exact: bool = True) -> NiahSample:
  """One RULER niah prompt of exactly `length` tokens (as `tokenizer` encodes it, BOS included if it adds one).

  Args:
    tokenizer: transformers fast tokenizer, tokenizers.Tokenizer, or a LoadedModel.
    length: target token count of the whole prompt (template + haystack + question + answer prefix).
    task: the variant (NiahTask or VARIANTS[name]).
    seed: drives keys, values, which keys are asked, distractors and random depths.
    haystack_text / haystack_file: the essay haystack's prose (essay tasks only; default: `default_essay()`,
      offline). A text shorter than the prompt repeats.
    exact: fit to exactly `length` tokens (the haystack's last sentence may be cut by words); False: whole
      units only, as RULER, and a prompt of at most `length` tokens (`sample.length` says how many).
  """
  if haystack_text is not None and haystack_file is not None:
    raise ValueError("pass haystack_text or haystack_file, not both")
  if haystack_file is not None:
    haystack_text = read_haystack_file(haystack_file)
  if haystack_text is not None:
    if task.haystack != "essay":
      which = "haystack_file" if haystack_file is not None else "haystack_text"
      raise ValueError(f"{which} is for essay-haystack tasks (single_2, single_3, multikey_1, multivalue, "
                       f"multiquery or NiahTask(haystack='essay')); this task's haystack is {task.haystack!r}")
    if not isinstance(haystack_text, str) or not haystack_text.strip():
      raise ValueError("haystack_text is empty (no text to build the haystack from)")
  rng = random.Random(seed)
  n_needles = task.num_keys * task.num_values
  keys = _draw_distinct(task.key_type, task.num_keys, rng)
  values = _draw_distinct(task.value_type, n_needles, rng)
  asked = rng.sample(range(task.num_keys), task.num_queries)  # which keys are asked: random, as RULER
  needles = [(keys[i // task.num_values], values[i], i // task.num_values in asked) for i in range(n_needles)]
  depths = task.depths if task.depths is not None else tuple(rng.uniform(0, 100) for _ in range(n_needles))
  type_name = task.value_type
  template = task.template + task.answer_prefix
  type_word = type_name
  if task.is_singular:
    template, type_word = singular(template), type_name[:-1]
  units, sep = _haystack_units(task, length, rng, keys, values, type_name, haystack_text)
  plan = _Plan(tuple(needles), tuple(depths), units, sep, tuple(keys[i] for i in asked), type_name,
               template, type_word)
  n_units, partial = _fit(plan, tokenizer, length, add_special_tokens, exact)
  prompt, spans, tail = _render(plan, n_units, partial)
  ids, offsets = encode(tokenizer, prompt, add_special_tokens)
  out = []
  for i, (key, value, queried) in enumerate(needles):
    a, b = spans[i]
    text = prompt[a:b]
    va = a + text.rindex(value)
    vspan = (va, va + len(value))
    out.append(Needle(key, value, text, (a, b), char_to_token_span(offsets, (a, b)), vspan,
                      char_to_token_span(offsets, vspan), queried))
  answers = tuple(values[k * task.num_values + v] for k in asked for v in range(task.num_values))
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
