"""RULER-style NIAH generator: exact lengths, needles recoverable from the recorded spans, variants, scoring.

The tokenizer is a small SentencePiece-like BPE (Metaspace, digits split) trained in-process on the task's own
vocabulary: offline, seconds, and it has offsets like the real fast tokenizers.
"""

import functools

import numpy as np
import pytest

from stream_jax.analysis import niah as N


@functools.lru_cache(maxsize=None)
def tiny_tokenizer():
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Metaspace(), pre_tokenizers.Digits(individual_digits=True)])
  tok.decoder = decoders.Metaspace()
  corpus = [N.NOISE, N.TEMPLATE, N.ANSWER_PREFIX, N.NEEDLE, " ".join(N.ADJECTIVES), " ".join(N.NOUNS),
            "0123456789 abcdef-"] * 5
  tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<bos>", "<unk>"],
                                                      show_progress=False))
  tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
  return tok


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
  context = hay.prompt[:hay.prompt.index("\nWhat are all")]
  assert context.count("One of the special magic numbers for") > 5
  assert context.count(hay.keys[0]) == 1
  uu = N.generate_sample(tok, 500, N.VARIANTS["multikey_3"], seed=0)
  assert len(uu.needles[0].key) == 36 and len(uu.answers[0]) == 36
  assert len(N.generate_sample(tok, 500, seed=0).answers[0]) == 7  # 7-digit numbers


def test_depth_control_and_determinism():
  tok = tiny_tokenizer()
  head = N.TEMPLATE.split("{context}")[0].format(type="numbers", query="x")
  first = N.generate_sample(tok, 600, N.NiahTask(depths=(0.0,)), seed=1)
  assert first.needles[0].char_span[0] == len(head)
  last = N.generate_sample(tok, 600, N.NiahTask(depths=(100.0,)), seed=1)
  assert last.prompt[last.needles[0].char_span[1]:].startswith("\nWhat are all")
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
    N.NiahTask(haystack="essay")


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
  from stream_jax.models.tokenizer import gguf_tokenizer
  try:
    return gguf_tokenizer(load.embedded_gguf_path())
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
