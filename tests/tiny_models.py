"""Tiny random Gemma configs and token batches shared by the model-level tests (seconds on a CPU)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from stream_jax.models import GemmaConfig
from stream_jax.models.decoder_config import gemma3_layer_kinds


def tiny_config(family="gemma3", layers=6, window=16, **kw):
  """A 6-layer Gemma 3 (or alternating Gemma 2, soft-capped) shape: 4 query / 2 kv heads, head dim 24."""
  base = dict(family=family, vocab_size=97, num_layers=layers, embed_dim=32, hidden_dim=64, num_heads=4,
              num_kv_heads=2, head_dim=24, query_pre_attn_scalar=20.0, sliding_window=window,
              layer_kinds=gemma3_layer_kinds(layers), rope_global_scale=8.0)
  if family == "gemma2":
    base.update(layer_kinds=tuple("local" if i % 2 == 0 else "global" for i in range(layers)),
                attn_softcap=5.0, final_softcap=3.0, use_qk_norm=False, rope_global_base=10_000.0)
  base.update(kw)
  return GemmaConfig(**base)


def tokens(b, t, vocab=97, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(3, vocab, size=(b, t)), jnp.int32)


def tiny_bpe(extra_texts=(), special=("<bos>", "<unk>")):
  """A small SentencePiece-like BPE (Metaspace, digits split) trained in-process on the NIAH task's own
  vocabulary plus `extra_texts`: offline, seconds, with offsets like the real fast tokenizers; BOS first."""
  # pylint: disable=import-outside-toplevel
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from stream_jax.analysis import niah
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Metaspace(), pre_tokenizers.Digits(individual_digits=True)])
  tok.decoder = decoders.Metaspace()
  corpus = [niah.NOISE, niah.TEMPLATE, niah.ANSWER_PREFIX, niah.NEEDLE, " ".join(niah.ADJECTIVES),
            " ".join(niah.NOUNS), *extra_texts, "0123456789 abcdef-"] * 5
  tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=list(special),
                                                      show_progress=False))
  tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
  return tok
