"""GemmaConfig: the architecture of a Gemma 2 / Gemma 3 / Llama / Qwen2 / Qwen3 text decoder, and presets.

One config class for every family (the family's differences are switches: norm offset, post-norms,
embedding scale, MLP activation, tied embeddings, q/k/v biases, QK-norm, RoPE scaling), so the decoder,
the attention plans and the trace are shared. Frozen and hashable so that it is a static argument of
`jax.jit`. Values of the presets are those of the official Hugging Face configs (google/gemma-3-*,
google/gemma-2-*, deepseek-ai/DeepSeek-R1-Distill-*, Qwen/Qwen3-*); what the checkpoint formats leave out
(GGUF has no local RoPE base, layer pattern or attention scale) is derived here the way llama.cpp and
transformers derive it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

Family = Literal["gemma2", "gemma3", "llama", "qwen2", "qwen3"]
FAMILIES = ("gemma2", "gemma3", "llama", "qwen2", "qwen3")
GEMMA_FAMILIES = ("gemma2", "gemma3")
ACTIVATIONS = ("gelu_tanh", "silu")
LayerKind = Literal["global", "local"]

GEMMA3_VOCAB = 262_144
GEMMA2_VOCAB = 256_000


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """Architecture hyper-parameters (einsum letters: D model, F ffw hidden, N/K query/kv heads, H head).

  Attributes:
    family: "gemma3" (QK-norm, no softcaps, local/global RoPE bases) or "gemma2" (softcaps, no QK-norm).
    vocab_size, num_layers, embed_dim (D), hidden_dim (F), num_heads (N), num_kv_heads (K), head_dim (H):
      head_dim is a config value, never D // N (270M: D=640, N=4, H=256).
    query_pre_attn_scalar: logits are scaled by its inverse square root (HF meaning; 256 -> 1/16).
    layer_kinds: per layer "local" (sliding window) or "global" (full causal attention).
    sliding_window: W keys including the query itself (the Gemma/HF convention: q - k < W).
    rope_local_base / rope_global_base: RoPE base frequency per layer kind.
    rope_global_scale: linear position scaling factor of global layers (8 on Gemma 3 4B/12B/27B).
    attn_softcap / final_softcap: `c * tanh(x / c)` on attention logits / output logits (Gemma 2).
    use_qk_norm: RMSNorm over head_dim of queries and keys (Gemma 3).
    rms_eps: epsilon of every RMSNorm.
    bos_id / eos_id / pad_id: special token ids of the tokenizer.
    name: preset name, informative only.
    norm_offset: RMSNorm scales by (1 + w) (Gemma) or by w (Llama, Qwen).
    post_norms: RMSNorm after attention and after the MLP too (Gemma), not only before.
    embed_scale: embeddings multiplied by sqrt(D) (Gemma).
    activation: gate activation of the gated MLP: "gelu_tanh" (GeGLU, Gemma) or "silu" (SwiGLU).
    tie_embeddings: the output projection is the embedding (else a separate lm_head [V, D]).
    qkv_bias: q/k/v projections have biases (Qwen2).
    rope_llama3: (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings) of
      Llama-3 frequency-dependent RoPE scaling (applies to every layer), or None.
    context_length: trained context (max_position_embeddings), None when the family rule applies.
  """

  family: Family
  vocab_size: int
  num_layers: int
  embed_dim: int
  hidden_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  query_pre_attn_scalar: float
  layer_kinds: tuple[LayerKind, ...]
  sliding_window: int
  rope_local_base: float = 10_000.0
  rope_global_base: float = 1_000_000.0
  rope_global_scale: float = 1.0
  attn_softcap: Optional[float] = None
  final_softcap: Optional[float] = None
  use_qk_norm: bool = True
  rms_eps: float = 1e-6
  bos_id: int = 2
  eos_id: int = 1
  pad_id: int = 0
  name: str = "custom"
  norm_offset: bool = True
  post_norms: bool = True
  embed_scale: bool = True
  activation: str = "gelu_tanh"
  tie_embeddings: bool = True
  qkv_bias: bool = False
  rope_llama3: Optional[tuple[float, float, float, int]] = None
  context_length: Optional[int] = None

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"GemmaConfig.family must be one of {FAMILIES}, got {self.family!r}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"GemmaConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
    if self.rope_llama3 is not None:
      r = tuple(self.rope_llama3)
      if len(r) != 4 or not (r[0] >= 1 and 0 < r[1] < r[2] and int(r[3]) >= 1):
        raise ValueError("GemmaConfig.rope_llama3 must be (factor >= 1, low_freq_factor, high_freq_factor > "
                         f"low_freq_factor > 0, original_max_position_embeddings >= 1), got {self.rope_llama3!r}")
      object.__setattr__(self, "rope_llama3", (float(r[0]), float(r[1]), float(r[2]), int(r[3])))
    if self.context_length is not None and (not isinstance(self.context_length, int) or self.context_length < 1):
      raise ValueError(f"GemmaConfig.context_length must be a positive integer or None, got {self.context_length!r}")
    for f in ("vocab_size", "num_layers", "embed_dim", "hidden_dim", "num_heads", "num_kv_heads",
              "head_dim", "sliding_window"):
      v = getattr(self, f)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"GemmaConfig.{f} must be a positive integer, got {v!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"GemmaConfig.num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"GemmaConfig.head_dim must be even (RoPE rotates halves), got {self.head_dim}")
    if len(self.layer_kinds) != self.num_layers or any(
        k not in ("global", "local") for k in self.layer_kinds):
      raise ValueError(f"GemmaConfig.layer_kinds must list 'global'/'local' for each of the "
                       f"{self.num_layers} layers, got {self.layer_kinds!r}")
    object.__setattr__(self, "layer_kinds", tuple(self.layer_kinds))

  @property
  def num_groups(self) -> int:
    """G = N / K query heads per kv head."""
    return self.num_heads // self.num_kv_heads

  @property
  def attn_scale(self) -> float:
    return float(self.query_pre_attn_scalar) ** -0.5

  def window(self, layer: int) -> Optional[int]:
    """W of a local layer, None for a global one."""
    return self.sliding_window if self.layer_kinds[layer] == "local" else None

  def rope(self, layer: int) -> tuple[float, float]:
    """(base, linear position scale) of a layer (Gemma: local layers have their own base, no scaling;
    the other families use one RoPE on every layer)."""
    if self.layer_kinds[layer] == "local" and self.family in GEMMA_FAMILIES:
      return self.rope_local_base, 1.0
    return self.rope_global_base, self.rope_global_scale

  def rope_inv_freq(self, layer: int):
    """float32[H/2] inverse frequencies of a layer (linear or Llama-3 scaling applied)."""
    from stream_jax.models.layers import rope_inv_freq  # pylint: disable=import-outside-toplevel
    base, scale = self.rope(layer)
    return rope_inv_freq(self.head_dim, base, scale, llama3=self.rope_llama3)

  @property
  def is_gemma(self) -> bool:
    return self.family in GEMMA_FAMILIES

  @property
  def max_length(self) -> int:
    """Trained context in tokens (longest input `forward` accepts): `context_length` when set (Llama / Qwen
    max_position_embeddings); Gemma 2 8k; Gemma 3 128k where global RoPE is scaled (4B+), else 32k (270M,
    1B)."""
    if self.context_length:
      return self.context_length
    if self.family == "gemma2":
      return 8_192
    return 131_072 if self.rope_global_scale > 1 else 32_768

  @property
  def global_layers(self) -> tuple[int, ...]:
    return tuple(i for i, k in enumerate(self.layer_kinds) if k == "global")

  def pruned_layers(self, prune_local: bool = False) -> tuple[int, ...]:
    """The layers a Stream call prunes: the global ones, and with prune_local every layer."""
    return tuple(range(self.num_layers)) if prune_local else self.global_layers

  def replace(self, **changes) -> "GemmaConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    d, f, n, k, h = self.embed_dim, self.hidden_dim, self.num_heads, self.num_kv_heads, self.head_dim
    per_layer = (d * h * (2 * n + 2 * k) + 3 * d * f + (4 if self.post_norms else 2) * d
                 + (2 * h if self.use_qk_norm else 0) + ((n + 2 * k) * h if self.qkv_bias else 0))
    head = 0 if self.tie_embeddings else self.vocab_size * d
    return self.vocab_size * d + head + self.num_layers * per_layer + d


def gemma3_layer_kinds(num_layers: int, pattern: int = 6) -> tuple[LayerKind, ...]:
  """Gemma 3: 5 local layers then 1 global, i.e. layer i is global iff (i + 1) % 6 == 0."""
  return tuple("global" if (i + 1) % pattern == 0 else "local" for i in range(num_layers))


def gemma2_layer_kinds(num_layers: int) -> tuple[LayerKind, ...]:
  """Gemma 2: alternating, starting with a local layer."""
  return tuple("local" if i % 2 == 0 else "global" for i in range(num_layers))


def gemma3(name, *, layers, d, f, n, k, h=256, qscale=256, window=1024, rope_scale=8.0, **kw):
  return GemmaConfig(family="gemma3", vocab_size=GEMMA3_VOCAB, num_layers=layers, embed_dim=d,
                     hidden_dim=f, num_heads=n, num_kv_heads=k, head_dim=h, query_pre_attn_scalar=qscale,
                     layer_kinds=gemma3_layer_kinds(layers), sliding_window=window,
                     rope_global_scale=rope_scale, name=name, **kw)


def gemma2(name, *, layers, d, f, n, k, h=256, qscale=256, **kw):
  return GemmaConfig(family="gemma2", vocab_size=GEMMA2_VOCAB, num_layers=layers, embed_dim=d,
                     hidden_dim=f, num_heads=n, num_kv_heads=k, head_dim=h, query_pre_attn_scalar=qscale,
                     layer_kinds=gemma2_layer_kinds(layers), sliding_window=4096,
                     rope_local_base=10_000.0, rope_global_base=10_000.0, attn_softcap=50.0,
                     final_softcap=30.0, use_qk_norm=False, name=name, **kw)


def all_global(num_layers: int) -> tuple[LayerKind, ...]:
  return ("global",) * num_layers


def reasoning_config(family, name, *, layers, d, f, n, k, h, vocab, theta, eps, ctx, tie, bos, eos, **kw):
  """Llama / Qwen decoders: plain RMSNorm (w, not 1 + w), pre-norms only, no embedding scale, SwiGLU,
  every layer global, attention scale head_dim ** -0.5."""
  return GemmaConfig(family=family, vocab_size=vocab, num_layers=layers, embed_dim=d, hidden_dim=f,
                     num_heads=n, num_kv_heads=k, head_dim=h, query_pre_attn_scalar=float(h),
                     layer_kinds=all_global(layers), sliding_window=ctx, rope_local_base=theta,
                     rope_global_base=theta, use_qk_norm=family == "qwen3", rms_eps=eps, bos_id=bos,
                     eos_id=eos, pad_id=eos, name=name, norm_offset=False, post_norms=False,
                     embed_scale=False, activation="silu", tie_embeddings=tie, qkv_bias=family == "qwen2",
                     context_length=ctx, **kw)


def qwen2(name, *, layers, d, f, n, k, vocab=152_064, theta=10_000.0, eps=1e-6, tie=False, **kw):
  return reasoning_config("qwen2", name, layers=layers, d=d, f=f, n=n, k=k, h=d // n, vocab=vocab, theta=theta,
                    eps=eps, ctx=131_072, tie=tie, bos=151_646, eos=151_643, **kw)


def qwen3(name, *, layers, d, f, n, k, tie=False, **kw):
  return reasoning_config("qwen3", name, layers=layers, d=d, f=f, n=n, k=k, h=128, vocab=151_936, theta=1e6,
                    eps=1e-6, ctx=40_960, tie=tie, bos=151_643, eos=151_645, **kw)


def llama3(name, *, layers, d, f, n, k, **kw):
  return reasoning_config("llama", name, layers=layers, d=d, f=f, n=n, k=k, h=d // n, vocab=128_256,
                    theta=500_000.0, eps=1e-5, ctx=131_072, tie=False, bos=128_000, eos=128_001,
                    rope_llama3=(8.0, 1.0, 4.0, 8192), **kw)


# Official HF configs. Gemma 3 4B+ list vocab_size 262208 (64 unused rows): the port uses 262144.
PRESETS: dict[str, GemmaConfig] = {
    "gemma3-270m": gemma3("gemma3-270m", layers=18, d=640, f=2048, n=4, k=1, window=512, rope_scale=1.0),
    "gemma3-1b": gemma3("gemma3-1b", layers=26, d=1152, f=6912, n=4, k=1, window=512, rope_scale=1.0),
    "gemma3-4b": gemma3("gemma3-4b", layers=34, d=2560, f=10240, n=8, k=4),
    "gemma3-12b": gemma3("gemma3-12b", layers=48, d=3840, f=15360, n=16, k=8),
    "gemma3-27b": gemma3("gemma3-27b", layers=62, d=5376, f=21504, n=32, k=16, h=128, qscale=168),
    "gemma2-2b": gemma2("gemma2-2b", layers=26, d=2304, f=9216, n=8, k=4),
    "gemma2-9b": gemma2("gemma2-9b", layers=42, d=3584, f=14336, n=16, k=8),
    "gemma2-27b": gemma2("gemma2-27b", layers=46, d=4608, f=36864, n=32, k=16, h=128, qscale=144),
}

# Reasoning models (deepseek-ai/DeepSeek-R1-Distill-*, Qwen/Qwen3-*): shapes of their config.json. Kept apart
# from the Gemma PRESETS (which callers iterate as Gemma configs); get_config finds both.
REASONING_PRESETS: dict[str, GemmaConfig] = {
    "r1-distill-qwen-1.5b": qwen2("r1-distill-qwen-1.5b", layers=28, d=1536, f=8960, n=12, k=2,
                                  vocab=151_936),
    "r1-distill-qwen-7b": qwen2("r1-distill-qwen-7b", layers=28, d=3584, f=18944, n=28, k=4),
    "r1-distill-qwen-14b": qwen2("r1-distill-qwen-14b", layers=48, d=5120, f=13824, n=40, k=8, theta=1e6,
                                 eps=1e-5),
    "r1-distill-llama-8b": llama3("r1-distill-llama-8b", layers=32, d=4096, f=14336, n=32, k=8),
    "qwen3-0.6b": qwen3("qwen3-0.6b", layers=28, d=1024, f=3072, n=16, k=8, tie=True),
    "qwen3-1.7b": qwen3("qwen3-1.7b", layers=28, d=2048, f=6144, n=16, k=8, tie=True),
    "qwen3-4b": qwen3("qwen3-4b", layers=36, d=2560, f=9728, n=32, k=8, tie=True),
    "qwen3-8b": qwen3("qwen3-8b", layers=36, d=4096, f=12288, n=32, k=8),
    "qwen3-14b": qwen3("qwen3-14b", layers=40, d=5120, f=17408, n=40, k=8),
}


def get_config(name: str) -> GemmaConfig:
  key = name.lower().replace("_", "-").replace("gemma-", "gemma").replace("deepseek-", "")
  every = {**PRESETS, **REASONING_PRESETS}
  if key not in every:
    raise KeyError(f"unknown preset {name!r}; known: {sorted(every)}")
  return every[key]


def match_preset(family: str, num_layers: int, embed_dim: int) -> Optional[GemmaConfig]:
  """The preset with this family, depth and width (used to fill in what a GGUF file lacks)."""
  for cfg in PRESETS.values():
    if (cfg.family, cfg.num_layers, cfg.embed_dim) == (family, num_layers, embed_dim):
      return cfg
  return None


def from_hf_gemma(hf: dict) -> GemmaConfig:
  """GemmaConfig from a Gemma 2 / Gemma 3 (text or multimodal) Hugging Face `config.json` dict; any family:
  `stream_jax.models.families.from_hf_config`."""
  if "text_config" in hf and hf.get("model_type") in ("gemma3", "gemma3n"):
    if hf.get("model_type") != "gemma3":
      raise ValueError(f"unsupported architecture: model_type {hf.get('model_type')!r}")
    hf = dict(hf["text_config"], _outer=hf)
  mt = hf.get("model_type")
  if mt not in ("gemma3_text", "gemma3", "gemma2"):
    raise ValueError(f"unsupported architecture: model_type {mt!r} (supported: gemma2, gemma3, gemma3_text, "
                     "llama, qwen2, qwen3)")
  family: Family = "gemma2" if mt == "gemma2" else "gemma3"
  layers = int(hf["num_hidden_layers"])
  d = int(hf["hidden_size"])
  n = int(hf["num_attention_heads"])
  h = int(hf.get("head_dim") or d // n)
  act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
  if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
    raise ValueError(f"unsupported hidden_activation {act!r} (Gemma uses gelu_pytorch_tanh)")
  types = hf.get("layer_types")
  if types:
    kinds = tuple("local" if t == "sliding_attention" else "global" for t in types)
  elif family == "gemma3":
    kinds = gemma3_layer_kinds(layers, int(hf.get("sliding_window_pattern", 6)))
  else:
    kinds = gemma2_layer_kinds(layers)
  vocab = int(hf.get("vocab_size", GEMMA3_VOCAB if family == "gemma3" else GEMMA2_VOCAB))
  if family == "gemma3" and vocab == GEMMA3_VOCAB + 64:
    vocab = GEMMA3_VOCAB  # 4B+ checkpoints pad the embedding with 64 unused rows
  # Global / local RoPE: transformers 5 `rope_parameters` per layer type, older `rope_theta`,
  # `rope_local_base_freq` and `rope_scaling`.
  rp = hf.get("rope_parameters") or {}
  glob = dict(rp.get("full_attention") or {})
  loc = dict(rp.get("sliding_attention") or {})
  if rp and "full_attention" not in rp and "rope_theta" in rp:  # one shared dict (gemma2 in v5)
    glob = loc = dict(rp)
  scaling = hf.get("rope_scaling") or {}
  g_base = float(glob.get("rope_theta", hf.get("rope_theta", 1e6 if family == "gemma3" else 1e4)))
  if family == "gemma3":
    l_base = float(loc.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0)))
  else:
    l_base = g_base
  rope_type = glob.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
  factor = float(glob.get("factor", scaling.get("factor", 1.0)))
  if rope_type not in ("default", "linear"):
    raise ValueError(f"unsupported RoPE scaling {rope_type!r} (Gemma uses none or linear)")
  if rope_type == "default":
    factor = 1.0
  if family == "gemma2" and factor != 1.0:
    raise ValueError("Gemma 2 has no RoPE scaling")
  eos = hf.get("eos_token_id", 1)
  if isinstance(eos, (list, tuple)):
    eos = eos[0]
  return GemmaConfig(
      family=family, vocab_size=vocab, num_layers=layers, embed_dim=d,
      hidden_dim=int(hf["intermediate_size"]), num_heads=n,
      num_kv_heads=int(hf.get("num_key_value_heads", n)), head_dim=h,
      query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", h)), layer_kinds=kinds,
      sliding_window=int(hf.get("sliding_window") or 4096), rope_local_base=l_base,
      rope_global_base=g_base, rope_global_scale=factor,
      attn_softcap=hf.get("attn_logit_softcapping"), final_softcap=hf.get("final_logit_softcapping"),
      use_qk_norm=family == "gemma3", rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
      bos_id=int(hf.get("bos_token_id", 2) or 2), eos_id=int(eos if eos is not None else 1),
      pad_id=int(hf.get("pad_token_id", 0) or 0), name=str(hf.get("_name_or_path") or "hf"))
