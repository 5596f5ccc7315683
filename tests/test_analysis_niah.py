"""RULER-style NIAH generator: exact lengths, needles recoverable from the recorded spans, variants, scoring.

The tokenizer is a small SentencePiece-like BPE (Metaspace, digits split) trained in-process on the task's own
vocabulary: offline, seconds, and it has offsets like the real fast tokenizers.
"""

import functools

import numpy as np
import pytest

from stream_jax.analysis import niah as N
from tiny_models import tiny_bpe


@functools.lru_cache(maxsize=None)
def tiny_tokenizer():
  return tiny_bpe()


@pytest.mark.parametrize("name", sorted(N.VARIANTS))
@pytest.mark.parametrize("length", [400, 1001])
def test_exact_length_and_needles_recoverable(name, length):
  tok = tiny_tokenizer()
  task = N.VARIANTS[name]
  s = N.generate_sample(tok, length, task, seed=3)
  assert s.length == length == len(s.ids)
  ids, _ = N.encode(tok, s.prompt)
  np.testing.assert_array_equal(ids, s.ids)  # the recorded ids are the prompt's
  assert ids[0] == 0  # BOS counted
  assert len(s.needles) == task.num_keys * task.num_values
  for nd in s.needles:
    a, b = nd.char_span
    assert s.prompt[a:b] == nd.text == N.NEEDLE.format(type=task.value_type, key=nd.key, value=nd.value)
    va, vb = nd.value_char_span
    assert s.prompt[va:vb] == nd.value
    t0, t1 = nd.token_span
    assert s.offsets[t0][0] <= a < s.offsets[t0][1] and s.offsets[t1 - 1][0] < b <= s.offsets[t1 - 1][1]
    assert tok.decode(s.ids[t0:t1].tolist()).strip() == nd.text
    v0, v1 = nd.value_token_span
    assert tok.decode(s.ids[v0:v1].tolist()).strip() == nd.value
    assert t0 <= v0 < v1 <= t1
  assert len(s.answers) == task.num_queries * task.num_values
  assert all(k in s.question for k in s.keys) and len(s.keys) == task.num_queries


def test_variant_structure():
  tok = tiny_tokenizer()
  mk = N.generate_sample(tok, 500, N.VARIANTS["multikey_1"], seed=0)
  assert sum(n.queried for n in mk.needles) == 1 and len({n.key for n in mk.needles}) == 4
  mv = N.generate_sample(tok, 500, N.VARIANTS["multivalue"], seed=0)
  assert len({n.key for n in mv.needles}) == 1 and len(set(mv.answers)) == 4
  mq = N.generate_sample(tok, 500, N.VARIANTS["multiquery"], seed=0)
  assert len(mq.keys) == 4 and ", and " in mq.question
  hay = N.generate_sample(tok, 500, N.VARIANTS["multikey_2"], seed=0)
  # needle-in-needles: the haystack is made of needles with other keys; the asked key occurs once in it
  context = hay.prompt[:hay.prompt.index("\nWhat is the")]
  assert context.count("One of the special magic numbers for") > 5
  assert context.count(hay.keys[0]) == 1
  uu = N.generate_sample(tok, 500, N.VARIANTS["multikey_3"], seed=0)
  assert len(uu.needles[0].key) == 36 and len(uu.answers[0]) == 36
  assert len(N.generate_sample(tok, 500, seed=0).answers[0]) == 7  # 7-digit numbers


def test_depth_control_and_determinism():
  tok = tiny_tokenizer()
  head = N.singular(N.TEMPLATE).split("{context}")[0].format(type="number", query="x")
  first = N.generate_sample(tok, 600, N.NiahTask(depths=(0.0,)), seed=1)
  assert first.needles[0].char_span[0] == len(head)
  last = N.generate_sample(tok, 600, N.NiahTask(depths=(100.0,)), seed=1)
  assert last.prompt[last.needles[0].char_span[1]:].startswith("\nWhat is the")
  mid = N.generate_sample(tok, 600, N.NiahTask(depths=(50.0,)), seed=1)
  frac = mid.needles[0].token_span[0] / mid.length
  assert 0.35 < frac < 0.65
  again = N.generate_sample(tok, 600, N.NiahTask(depths=(50.0,)), seed=1)
  assert again.prompt == mid.prompt
  assert N.generate_sample(tok, 600, seed=2).prompt != N.generate_sample(tok, 600, seed=3).prompt


def test_bad_inputs():
  tok = tiny_tokenizer()
  with pytest.raises(ValueError, match="shorter"):
    N.generate_sample(tok, 20)
  with pytest.raises(ValueError, match="num_queries"):
    N.NiahTask(num_keys=1, num_queries=2)
  with pytest.raises(ValueError, match="depths"):
    N.NiahTask(depths=(10.0, 20.0))
  with pytest.raises(ValueError, match="haystack"):
    N.NiahTask(haystack="essays")


def test_string_match_all_and_evaluate():
  assert N.string_match_all([" 1234567.", "no", "A and b"], [["1234567"], ["x"], ["a", "B", "c"]]) == \
      pytest.approx(100 * (1 + 0 + 2 / 3) / 3)
  assert N.postprocess("  12\x0034 ") == "12\n34"
  tok = tiny_tokenizer()
  samples = N.generate_samples(tok, 300, 4)
  res = N.evaluate(samples, lambda s: f" {s.answers[0]}." if s is samples[0] else " 0")
  assert [r.success for r in res] == [True, False, False, False]
  assert res[0].score == 1.0 and res[1].score == 0.0


@functools.lru_cache(maxsize=None)
def gemma_tokenizer():
  """The embedded Gemma 3 270M's tokenizer (offline; converted from the GGUF once, then cached)."""
  load = pytest.importorskip("stream_jax.models.load")
  from stream_jax.models.tokenizer import load_gguf_tokenizer
  try:
    return load_gguf_tokenizer(load.embedded_gguf_path())
  except ImportError as e:  # the embedded model package is missing
    pytest.skip(str(e))


@pytest.mark.parametrize("name,length", [("single_1", 600), ("multikey_2", 1500), ("multikey_3", 2999),
                                         ("multivalue", 3000)])
def test_round_trip_with_the_gemma_tokenizer(name, length):
  tok = gemma_tokenizer()
  s = N.generate_sample(tok, length, N.VARIANTS[name], seed=7)
  assert s.length == length and int(s.ids[0]) == tok.bos_token_id
  ids, _ = N.encode(tok, s.prompt)
  np.testing.assert_array_equal(ids, s.ids)
  for nd in s.needles:
    assert tok.decode(s.ids[slice(*nd.token_span)].tolist()).strip() == nd.text
    assert tok.decode(s.ids[slice(*nd.value_token_span)].tolist()).strip() == nd.value


# --- reference-exact definitions (RULER's niah.py, constants.py and synthetic.yaml; issue 13) ------------

# RULER's niah template + answer prefix, as published (plural), and its singular rewording for one value.
RULER_PLURAL = ("Some special magic {t} are hidden within the following text. Make sure to memorize it. "
                "I will quiz you about the {t} afterwards.\n{c}\nWhat are all the special magic {t} for {q} "
                "mentioned in the provided text? The special magic {t} for {q} mentioned in the provided "
                "text are")
RULER_SINGULAR = ("A special magic {t} is hidden within the following text. Make sure to memorize it. "
                  "I will quiz you about the {t} afterwards.\n{c}\nWhat is the special magic {t} for {q} "
                  "mentioned in the provided text? The special magic {t} for {q} mentioned in the provided "
                  "text is")
# synthetic.yaml: (type_haystack, type_needle_k, type_needle_v, num_needle_k, num_needle_v, num_needle_q),
# with num_needle_k = max(k, q) as niah.py sets it; RULER's repeat/essay/needle = our noise/essay/needles.
RULER_TABLE = {
    "single_1": ("noise", "words", "numbers", 1, 1, 1),
    "single_2": ("essay", "words", "numbers", 1, 1, 1),
    "single_3": ("essay", "words", "uuids", 1, 1, 1),
    "multikey_1": ("essay", "words", "numbers", 4, 1, 1),
    "multikey_2": ("needles", "words", "numbers", 1, 1, 1),
    "multikey_3": ("needles", "uuids", "uuids", 1, 1, 1),
    "multivalue": ("essay", "words", "numbers", 1, 4, 1),
    "multiquery": ("essay", "words", "numbers", 4, 1, 4),
}


def _context(s):
  """The haystack + needles part of a prompt (between the template's two newlines)."""
  return s.prompt[s.prompt.index("\n") + 1:s.prompt.rindex("\nWhat ")]


def test_variants_match_rulers_table():
  assert sorted(N.VARIANTS) == sorted(RULER_TABLE)
  for name, (hay, kt, vt, k, v, q) in RULER_TABLE.items():
    t = N.VARIANTS[name]
    assert (t.haystack, t.key_type, t.value_type, t.num_keys, t.num_values, t.num_queries) == \
        (hay, kt, vt, k, v, q), name


@pytest.mark.parametrize("name", sorted(RULER_TABLE))
def test_templates_are_rulers_singular_or_plural(name):
  tok = tiny_tokenizer()
  task = N.VARIANTS[name]
  s = N.generate_sample(tok, 500, task, seed=5)
  one = task.num_queries * task.num_values == 1  # RULER's condition for the singular
  ref = RULER_SINGULAR if one else RULER_PLURAL
  t = task.value_type[:-1] if one else task.value_type
  q = s.keys[0] if len(s.keys) == 1 else ", ".join(s.keys[:-1]) + ", and " + s.keys[-1]
  assert s.prompt == ref.format(t=t, q=q, c=_context(s))
  # the needle keeps the plural ("One of the special magic numbers for ...")
  assert all(nd.text.startswith(f"One of the special magic {task.value_type} for ") for nd in s.needles)
  as_ours = lambda r: r.replace("{t}", "{type}").replace("{q}", "{query}").replace("{c}", "{context}")
  assert N.TEMPLATE + N.ANSWER_PREFIX == as_ours(RULER_PLURAL)
  assert N.singular(N.TEMPLATE + N.ANSWER_PREFIX) == as_ours(RULER_SINGULAR)


@pytest.mark.parametrize("exact", [True, False])
def test_noise_haystack_is_whole_paragraphs_one_per_line(exact):
  tok = tiny_tokenizer()
  s = N.generate_sample(tok, 700, N.NiahTask(num_keys=2, depths=(30.0, 60.0)), seed=1, exact=exact)
  lines = _context(s).split("\n")
  needles = [nd.text for nd in s.needles]
  assert [l for l in lines if l.startswith("One of")] == needles  # each needle is a whole line
  hay = [l for l in lines if not l.startswith("One of")]
  assert hay[:-1] == [N.NOISE] * (len(hay) - 1)
  if exact:
    assert s.length == 700 and N.NOISE.startswith(hay[-1])  # only the last paragraph may be a prefix
  else:
    assert hay[-1] == N.NOISE and s.length <= 700 and s.length > 700 - 40


def test_essay_haystack_sentences_and_needles_at_boundaries():
  tok = tiny_tokenizer()
  text = " ".join(f"Sentence {w} is here and it ends." for w in ("one", "two", "three", "four")) * 40
  s = N.generate_sample(tok, 800, N.VARIANTS["multikey_1"], seed=2, haystack_text=text)
  assert s.length == 800
  ctx = _context(s)
  for nd in s.needles:  # each needle sits between two sentences, joined by single spaces
    a, b = nd.char_span
    before, after = s.prompt[:a], s.prompt[b:]
    assert before.endswith("\n") or before.endswith(". ")
    assert after.startswith("\nWhat") or after.startswith(" Sentence ")
  rest = ctx
  for nd in s.needles:
    rest = rest.replace(" " + nd.text, "").replace(nd.text + " ", "").replace(nd.text, "")
  sents = N.split_prose(text)
  got = N.split_prose(rest)
  # whole sentences in order; the last is a prefix of the next one (or of a later one when no prefix of
  # the next hits the length exactly)
  assert got[:-1] == sents[:len(got) - 1]
  assert any(x.startswith(got[-1]) for x in sents[len(got) - 1:len(got) + 15])
  # the default essay haystack: real prose, so single_2 is not single_1
  s2 = N.generate_sample(tok, 600, N.VARIANTS["single_2"], seed=0)
  s1 = N.generate_sample(tok, 600, N.VARIANTS["single_1"], seed=0)
  assert N.NOISE not in s2.prompt and N.NOISE in s1.prompt
  assert _context(s2).split(" ")[0] in N.default_essay()


def test_asked_key_is_random_among_inserted():
  tok = tiny_tokenizer()
  asked = set()
  for seed in range(12):
    s = N.generate_sample(tok, 400, N.NiahTask(num_keys=4, depths=(10.0, 30.0, 50.0, 70.0)), seed=seed)
    idx = [i for i, nd in enumerate(s.needles) if nd.queried]
    assert len(idx) == 1 and s.needles[idx[0]].key == s.keys[0] and s.answers == (s.needles[idx[0]].value,)
    asked.add(idx[0])
  assert len(asked) >= 3  # not always the first needle


def test_haystack_file_bad_inputs(tmp_path):
  tok = tiny_tokenizer()
  essay = N.VARIANTS["single_2"]
  empty = tmp_path / "empty.txt"
  empty.write_text("  \n\n")
  with pytest.raises(ValueError, match="haystack_file.*empty"):
    N.generate_sample(tok, 400, essay, haystack_file=empty)
  binary = tmp_path / "blob.bin"
  binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
  with pytest.raises(ValueError, match="haystack_file.*binary"):
    N.generate_sample(tok, 400, essay, haystack_file=binary)
  latin = tmp_path / "latin1.txt"
  latin.write_bytes("caf\xe9 au lait. " .encode("latin-1") * 50)
  with pytest.raises(ValueError, match="haystack_file.*UTF-8"):
    N.generate_sample(tok, 400, essay, haystack_file=latin)
  with pytest.raises(FileNotFoundError, match="haystack_file"):
    N.generate_sample(tok, 400, essay, haystack_file=tmp_path / "missing.txt")
  good = tmp_path / "good.txt"
  good.write_text("The river bends at the old mill. Herons wait in the shallows.\r\n" * 30)
  with pytest.raises(ValueError, match="haystack_file.*essay"):
    N.generate_sample(tok, 400, N.VARIANTS["single_1"], haystack_file=good)
  with pytest.raises(ValueError, match="haystack_text.*empty"):
    N.generate_sample(tok, 400, essay, haystack_text=" \n")
  s = N.generate_sample(tok, 400, essay, haystack_file=good)
  assert s.length == 400 and "Herons wait in the shallows." in s.prompt
