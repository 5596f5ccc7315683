"""A GGUF file's SentencePiece-BPE vocabulary (Gemma's) as a fast tokenizer, built with `tokenizers` alone.

transformers converts a GGUF tokenizer through its GGUF reader, which imports PyTorch: a user who installed
only `stream-jax[models]` (what `make demo` installs) would need torch for a tokenizer. The vocabulary is a
few metadata arrays, so it is read here with the project's own header reader and built the way
transformers' Gemma converter builds it; tests/test_gguf_tokenizer.py checks the ids, decoding and special
tokens against transformers' conversion. Other tokenizer kinds (byte-level BPE of Qwen / Llama 3) still go
through transformers, which then needs torch (the error says so).

The Gemma conventions a GGUF does not spell out:
- tokens made only of spaces are stored as real spaces but looked up as "▁" runs;
- the file carries no merges: they are recovered from the vocabulary, ordered by the token's position in
  the file (Gemma's scores do not follow its merge order), longer left pieces first;
- the model is BPE with byte fallback; the normalizer writes spaces as "▁" and the pre-tokenizer splits
  after each space; control tokens (type 3) are special added tokens, user-defined ones (type 4) plain
  added tokens; BOS is prepended when the file says `add_bos_token`.
"""

from __future__ import annotations

from typing import Optional

SPACE = "\u2581"
CONTROL, USER_DEFINED = 3, 4
# tokenizer.ggml.* arrays the build reads in full
VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type")
# (architecture, tokenizer.ggml.model) pairs built here
BUILT_HERE = {("gemma", "llama"), ("gemma2", "llama"), ("gemma3", "llama")}


def can_build(path: str) -> bool:
  """Whether the file's tokenizer is a kind this module builds (else transformers' converter is needed)."""
  fields = _reader(path, keep=()).fields
  arch = _get(fields, "general.architecture")
  return (arch, _get(fields, "tokenizer.ggml.model")) in BUILT_HERE


def gguf_sentencepiece_tokenizer(path: str):
  """The file's tokenizer as a `transformers.PreTrainedTokenizerFast` (no torch)."""
  from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors  # pylint: disable=import-outside-toplevel
  from tokenizers.models import BPE  # pylint: disable=import-outside-toplevel
  from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel

  fields = _reader(path, keep=VOCAB_KEYS).fields
  tokens = _get(fields, "tokenizer.ggml.tokens")
  types = _get(fields, "tokenizer.ggml.token_type")
  if not tokens:
    raise ValueError(f"{path} has no tokenizer vocabulary (tokenizer.ggml.tokens)")
  tokens = [SPACE * len(t) if t and not t.strip(" ") else t for t in tokens]
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ValueError(f"{path}: the tokenizer vocabulary repeats tokens ({len(tokens) - len(vocab)} duplicates)")

  def name(key: str, default: Optional[str]) -> Optional[str]:
    i = _get(fields, f"tokenizer.ggml.{key}")
    return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else default

  unk, bos, eos, pad = (name("unknown_token_id", "<unk>"), name("bos_token_id", "<bos>"),
                        name("eos_token_id", "<eos>"), name("padding_token_id", "<pad>"))
  tk = Tokenizer(BPE(vocab=vocab, merges=merges_from_vocabulary(tokens), unk_token=unk, fuse_unk=True,
                     byte_fallback=True, dropout=None))
  tk.normalizer = normalizers.Replace(" ", SPACE)
  tk.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
  tk.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
  if types is not None:
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True)
                           for t, k in zip(tokens, types) if int(k) == CONTROL])
    tk.add_tokens([AddedToken(t, normalized=False, special=False)
                   for t, k in zip(tokens, types) if int(k) == USER_DEFINED])
  add_bos = bool(_get(fields, "tokenizer.ggml.add_bos_token", True))
  add_eos = bool(_get(fields, "tokenizer.ggml.add_eos_token", False))
  single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
  pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
  special = [(t, vocab[t]) for t in {bos, eos} if (t == bos and add_bos) or (t == eos and add_eos)]
  tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
  kw = dict(tokenizer_object=tk, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad)
  template = _get(fields, "tokenizer.chat_template")
  if template:
    kw["chat_template"] = template
  return PreTrainedTokenizerFast(**kw)


def merges_from_vocabulary(tokens: list[str]) -> list[tuple[str, str]]:
  """BPE merges implied by a vocabulary whose file order is its merge order: each token's splits into two
  tokens of the vocabulary, tokens in file order, longer left pieces first."""
  vocab = set(tokens)
  merges = []
  for token in tokens:
    for cut in range(len(token) - 1, 0, -1):
      left, right = token[:cut], token[cut:]
      if left in vocab and right in vocab:
        merges.append((left, right))
  return merges


def _reader(path: str, keep):
  from stream_jax.models.gguf_loader import MetadataReader  # pylint: disable=import-outside-toplevel
  return MetadataReader(path, keep=keep)


def _get(fields, key, default=None):
  f = fields.get(key)
  return default if f is None else f.contents()
