"""Tokenizers via `transformers.AutoTokenizer`, offline.

For a GGUF file the tokenizer is converted from the file's vocabulary by transformers (about 30 s), then
saved as `tokenizer.json` in the cache next to the converted parameters; later loads read that.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from stream_jax.models.cache import cache_root, file_key


def _auto():
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  return AutoTokenizer


def gguf_tokenizer(path: str, use_cache: bool = True):
  """The tokenizer stored in a GGUF file (cached as tokenizer.json)."""
  target = os.path.join(cache_root(), file_key(path, "tokenizer") + "-tokenizer")
  if use_cache and os.path.exists(os.path.join(target, "tokenizer.json")):
    return _auto().from_pretrained(target, local_files_only=True)
  directory, name = os.path.split(os.path.realpath(path))
  tok = _auto().from_pretrained(directory, gguf_file=name, local_files_only=True)
  if use_cache:
    tmp = tempfile.mkdtemp(dir=cache_root(), suffix=".tmp")
    try:
      tok.save_pretrained(tmp)
      if os.path.exists(target):
        shutil.rmtree(target)
      os.replace(tmp, target)
    finally:
      if os.path.exists(tmp):
        shutil.rmtree(tmp)
  return tok


def hf_tokenizer(directory: str):
  """The tokenizer of an HF directory, or None when the directory has no tokenizer files."""
  names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
  if not any(os.path.exists(os.path.join(directory, n)) for n in names):
    return None
  return _auto().from_pretrained(directory, local_files_only=True)
