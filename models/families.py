"""Llama / Qwen2 / Qwen3 `config.json` -> GemmaConfig (the shared decoder config with the family switches).

These reasoning-model families (DeepSeek-R1-Distill-Qwen/Llama, Qwen3) are Gemma-style decoders with plain
RMSNorm, pre-norms only, SwiGLU, no embedding scale, global attention and head_dim ** -0.5 scaling; what
differs between them is read from the config: q/k/v biases (Qwen2), QK-norm (Qwen3), Llama-3 RoPE scaling,
tied embeddings. A field this port does not know, or a known field with a value that changes the
architecture in a way the port does not implement, is an error naming the family and the field: a silent
mismatch would give a model that loads and runs but is not the checkpoint.
"""

from __future__ import annotations

from typing import Any

from stream_jax.models.decoder_config import GemmaConfig, from_hf_gemma

# Keys of a config.json that do not change the decoder's forward pass (generic PretrainedConfig keys,
# generation defaults, bookkeeping). Anything outside this set and the family's own keys is refused.
GENERIC_KEYS = frozenset("""
_name_or_path architectures model_type transformers_version torch_dtype dtype use_cache initializer_range
output_attentions output_hidden_states return_dict chunk_size_feed_forward is_encoder_decoder is_decoder
add_cross_attention cross_attention_hidden_size tie_encoder_decoder id2label label2id problem_type
finetuning_task tokenizer_class prefix task_specific_params bos_token_id eos_token_id pad_token_id
sep_token_id decoder_start_token_id pruned_heads torchscript attention_dropout max_length min_length
do_sample early_stopping num_beams num_beam_groups diversity_penalty temperature top_k top_p typical_p
repetition_penalty length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids
num_return_sequences output_scores return_dict_in_generate forced_bos_token_id forced_eos_token_id
remove_invalid_values exponential_decay_length_penalty suppress_tokens begin_suppress_tokens
tf_legacy_loss use_bfloat16 pretraining_tp max_position_embeddings auto_map
""".split())

FAMILY_KEYS = {
    "llama": frozenset("""vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads
        num_key_value_heads head_dim hidden_act rms_norm_eps tie_word_embeddings rope_theta rope_scaling
        rope_parameters attention_bias mlp_bias""".split()),
    "qwen2": frozenset("""vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads
        num_key_value_heads hidden_act rms_norm_eps tie_word_embeddings rope_theta rope_scaling
        rope_parameters use_sliding_window sliding_window max_window_layers layer_types use_mrope""".split()),
    "qwen3": frozenset("""vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads
        num_key_value_heads head_dim hidden_act rms_norm_eps tie_word_embeddings rope_theta rope_scaling
        rope_parameters attention_bias use_sliding_window sliding_window max_window_layers
        layer_types""".split()),
}

DEFAULT_THETA = {"llama": 10_000.0, "qwen2": 10_000.0, "qwen3": 10_000.0}


class UnsupportedFieldError(ValueError):
  """A config field (or its value) that the port does not implement; names the family and the field."""

  def __init__(self, family: str, field: str, value: Any, why: str):
    super().__init__(f"{family} config field {field!r} = {value!r}: {why}")
    self.family, self.field = family, field


def _first(x):
  return x[0] if isinstance(x, (list, tuple)) and x else x


def _rope(family: str, hf: dict) -> tuple[float, float, Any]:
  """(theta, linear scale, llama3 tuple | None) from transformers 5 `rope_parameters` or older
  `rope_theta` + `rope_scaling`."""
  rp = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  field = "rope_parameters" if rp else "rope_scaling"
  params = rp or scaling
  theta = float(rp.get("rope_theta", hf.get("rope_theta", DEFAULT_THETA[family])))
  rtype = params.get("rope_type", params.get("type", "default"))
  if rtype == "default":
    return theta, 1.0, None
  if rtype == "linear":
    return theta, float(params["factor"]), None
  if rtype == "llama3":
    try:
      llama3 = (float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"]),
                int(params["original_max_position_embeddings"]))
    except KeyError as e:
      raise UnsupportedFieldError(family, f"{field}.{e.args[0]}", None, "llama3 RoPE scaling needs factor, "
                                  "low_freq_factor, high_freq_factor and original_max_position_embeddings")
    return theta, 1.0, llama3
  raise UnsupportedFieldError(family, f"{field}.rope_type", rtype,
                              "supported RoPE types are default, linear and llama3")


def from_hf_reasoning(hf: dict) -> GemmaConfig:
  """GemmaConfig of a Llama / Qwen2 / Qwen3 `config.json` dict (errors name the family and the field)."""
  family = hf["model_type"]
  known = GENERIC_KEYS | FAMILY_KEYS[family]
  for key in hf:
    if key not in known:
      raise UnsupportedFieldError(family, key, hf[key], "unknown to stream_jax's port of this family (it may "
                                  "change the architecture); remove it if it does not")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise UnsupportedFieldError(family, "hidden_act", act, f"{family} uses silu (SwiGLU)")
  for key in ("mlp_bias", "attention_bias", "use_mrope"):
    if hf.get(key):
      raise UnsupportedFieldError(family, key, hf[key], "biases of this kind are not implemented (Qwen2's "
                                  "q/k/v biases are implied by the family)")
  layers = int(hf["num_hidden_layers"])
  d = int(hf["hidden_size"])
  n = int(hf["num_attention_heads"])
  h = int(hf.get("head_dim") or d // n)
  theta, scale, llama3 = _rope(family, hf)
  ctx = int(hf.get("max_position_embeddings") or 32_768)
  # Sliding window: transformers' `layer_types` when present; else Qwen's rule (layers >= max_window_layers
  # slide when use_sliding_window). Llama has none.
  types = hf.get("layer_types")
  if types:
    if len(types) != layers or any(t not in ("full_attention", "sliding_attention") for t in types):
      raise UnsupportedFieldError(family, "layer_types", types, f"expected {layers} entries of "
                                  "'full_attention' / 'sliding_attention'")
    kinds = tuple("local" if t == "sliding_attention" else "global" for t in types)
  elif hf.get("use_sliding_window"):
    first = int(hf.get("max_window_layers", layers))
    kinds = tuple("local" if i >= first else "global" for i in range(layers))
  else:
    kinds = ("global",) * layers
  if not hf.get("use_sliding_window", False) and family != "llama":
    kinds = ("global",) * layers  # transformers ignores sliding_window unless use_sliding_window
  window = hf.get("sliding_window") if "local" in kinds else None
  if "local" in kinds and not window:
    raise UnsupportedFieldError(family, "sliding_window", window, "sliding layers need a window size")
  eos = _first(hf.get("eos_token_id"))
  bos = _first(hf.get("bos_token_id"))
  pad = _first(hf.get("pad_token_id"))
  eos = int(eos) if eos is not None else 0
  return GemmaConfig(
      family=family, vocab_size=int(hf["vocab_size"]), num_layers=layers, embed_dim=d,
      hidden_dim=int(hf["intermediate_size"]), num_heads=n,
      num_kv_heads=int(hf.get("num_key_value_heads") or n), head_dim=h, query_pre_attn_scalar=float(h),
      layer_kinds=kinds, sliding_window=int(window or ctx), rope_local_base=theta, rope_global_base=theta,
      rope_global_scale=scale, rope_llama3=llama3, use_qk_norm=family == "qwen3",
      rms_eps=float(hf.get("rms_norm_eps", 1e-6)), bos_id=int(bos) if bos is not None else eos, eos_id=eos,
      pad_id=int(pad) if pad is not None else eos, name=str(hf.get("_name_or_path") or family),
      norm_offset=False, post_norms=False, embed_scale=False, activation="silu",
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),  # transformers' default for all three
      qkv_bias=family == "qwen2", context_length=ctx)


def from_hf_config(hf: dict) -> GemmaConfig:
  """GemmaConfig from a Hugging Face `config.json` dict (Gemma 2, Gemma 3 text or multimodal, Llama, Qwen2,
  Qwen3)."""
  if isinstance(hf, dict) and hf.get("model_type") in ("llama", "qwen2", "qwen3"):
    return from_hf_reasoning(hf)
  return from_hf_gemma(hf)
