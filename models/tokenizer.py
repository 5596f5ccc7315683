"""Tokenizers via `transformers.AutoTokenizer`, offline; chat templates and the `<think>` span of reasoning
models in token space.

For a GGUF file the tokenizer is built from the file's vocabulary (Gemma's SentencePiece-BPE by
`gguf_tokenizer.py` with `tokenizers` alone, about 10 s; other kinds by transformers' converter, which needs
PyTorch), then saved as `tokenizer.json` in the cache next to the converted parameters; later loads read that.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Optional

from stream_jax.models.cache import cache_root, file_key

# The cached tokenizer.json's own format version: it did not change when the parameters' cache moved to
# format 2, so tokenizers converted before stay valid.
TOKENIZER_CACHE_VERSION = 1


def _auto():
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  return AutoTokenizer


def load_gguf_tokenizer(path: str, use_cache: bool = True, cache_dir: Optional[str] = None):
  """The tokenizer stored in a GGUF file (cached as tokenizer.json under `cache_dir`, see models/cache.py)."""
  key = file_key(path, "tokenizer", version=TOKENIZER_CACHE_VERSION)
  target = os.path.join(cache_root(cache_dir), key + "-tokenizer")
  if use_cache and os.path.exists(os.path.join(target, "tokenizer.json")):
    return _auto().from_pretrained(target, local_files_only=True)
  tok = _convert_gguf(path)
  check_not_char_level(tok, path)
  if use_cache:
    tmp = tempfile.mkdtemp(dir=cache_root(cache_dir), suffix=".tmp")
    try:
      tok.save_pretrained(tmp)
      if os.path.exists(target):
        shutil.rmtree(target)
      os.replace(tmp, target)
    finally:
      if os.path.exists(tmp):
        shutil.rmtree(tmp)
  return tok


def _convert_gguf(path: str):
  from stream_jax.models import gguf_tokenizer  # pylint: disable=import-outside-toplevel
  if gguf_tokenizer.can_build(path):
    return gguf_tokenizer.gguf_sentencepiece_tokenizer(path)
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise ImportError(f"the tokenizer of {path} is converted by transformers, whose GGUF reader needs PyTorch, "
                      "which is not installed: pip install torch (the CPU build is enough), or put the "
                      "model's tokenizer.json beside it and load the directory") from None
  directory, name = os.path.split(os.path.realpath(path))
  return _auto().from_pretrained(directory, gguf_file=name, local_files_only=True)


PROBE = "The special magic number for the long-context question is hidden in the text below."


def check_not_char_level(tok, source: str) -> None:
  """A conversion that silently fell back to one token per character (seen with some transformers builds
  converting a GGUF vocabulary) would shift every span and length: refuse it by name."""
  n = len(tok(PROBE, add_special_tokens=False)["input_ids"])
  if n >= 0.8 * len(PROBE):
    raise ValueError(f"the tokenizer converted from {source} encodes {len(PROBE)} characters of English into {n} "
                     "tokens (a character-level fallback): this transformers build cannot convert the GGUF "
                     "vocabulary; load the tokenizer from a tokenizer.json (e.g. a cached conversion) instead")


def hf_tokenizer(directory: str):
  """The tokenizer of an HF directory, or None when the directory has no tokenizer files."""
  names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
  if not any(os.path.exists(os.path.join(directory, n)) for n in names):
    return None
  return _auto().from_pretrained(directory, local_files_only=True)


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _tag_ids(tokenizer, tag: str) -> list[int]:
  """The token ids of a tag: one id when the vocabulary has it (Qwen3, R1-Distill), else its encoding."""
  tid = tokenizer.convert_tokens_to_ids(tag)
  if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
    return [tid]
  return list(tokenizer.encode(tag, add_special_tokens=False))


def _find(ids: list[int], pattern: list[int], start: int = 0) -> int:
  n = len(pattern)
  for i in range(start, len(ids) - n + 1):
    if ids[i:i + n] == pattern:
      return i
  return -1


def think_span(tokenizer, ids) -> tuple[int, int]:
  """Token range [start, end) of the chain of thought in `ids`: the tokens strictly between `<think>` and
  `</think>`, so thought anchors analyse the reasoning and neither the prompt nor the final answer.

  The opening tag may sit in the prompt (R1-Distill and Qwen3 chat templates end the generation prompt with
  `<think>\\n`); a missing closing tag (a chain cut off by max_new_tokens) ends the span at len(ids); with
  neither tag the whole sequence is the chain (as `stream_jax.analysis.anchors.reasoning_region` does
  in character space).
  """
  ids = [int(i) for i in ids]
  opening, closing = _tag_ids(tokenizer, THINK_OPEN), _tag_ids(tokenizer, THINK_CLOSE)
  i = _find(ids, opening) if opening else -1
  start = 0 if i < 0 else i + len(opening)
  j = _find(ids, closing, start) if closing else -1
  end = len(ids) if j < 0 else j
  return start, end


def chat_prompt(tokenizer, messages, *, add_generation_prompt: bool = True, **kw) -> str:
  """The model's own chat template applied to messages ([{"role": "user", "content": ...}, ...]) as text
  (e.g. Qwen3's `enable_thinking=True` goes through **kw); a tokenizer without a template is an error."""
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("this tokenizer has no chat template; pass the prompt text as it is")
  return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       **kw)
