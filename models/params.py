"""Checkpoint tensors (Hugging Face names and layouts) -> the Flax parameter tree, with shape checks.

Both loaders (safetensors and GGUF) first name their tensors the Hugging Face way, in HF layout
(`q_proj.weight` is [N * H, D], ...); this module is the one place that knows the Flax layout, so a shape
mismatch is reported once, with the tensor's name and both shapes.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from stream_jax.models.decoder_config import GemmaConfig

NORMS = {
    "input_layernorm": "pre_attention_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "pre_ffw_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
# Llama / Qwen: pre-norms only, and HF calls the norm before the MLP `post_attention_layernorm`.
PRE_NORMS = {
    "input_layernorm": "pre_attention_norm",
    "post_attention_layernorm": "pre_ffw_norm",
}


def norm_names(config: GemmaConfig) -> dict[str, str]:
  """HF layer-norm name -> Flax norm module name, for the config's family."""
  return NORMS if config.post_norms else PRE_NORMS


class ShapeMismatchError(ValueError):
  """A checkpoint tensor does not have the shape the config implies."""


class MissingTensorError(KeyError):
  """A tensor the config needs is not in the checkpoint."""

  def __str__(self):
    return str(self.args[0])


def hf_shapes(config: GemmaConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor the config needs, by HF name (without prefix), with its HF shape."""
  c = config
  d, f, n, k, h = c.embed_dim, c.hidden_dim, c.num_heads, c.num_kv_heads, c.head_dim
  out = {"embed_tokens.weight": (c.vocab_size, d), "norm.weight": (d,)}
  if not c.tie_embeddings:
    out["lm_head.weight"] = (c.vocab_size, d)
  for i in range(c.num_layers):
    p = f"layers.{i}."
    for name in norm_names(c):
      out[p + name + ".weight"] = (d,)
    out[p + "self_attn.q_proj.weight"] = (n * h, d)
    out[p + "self_attn.k_proj.weight"] = (k * h, d)
    out[p + "self_attn.v_proj.weight"] = (k * h, d)
    if c.qkv_bias:
      out[p + "self_attn.q_proj.bias"] = (n * h,)
      out[p + "self_attn.k_proj.bias"] = (k * h,)
      out[p + "self_attn.v_proj.bias"] = (k * h,)
    out[p + "self_attn.o_proj.weight"] = (d, n * h)
    if c.use_qk_norm:
      out[p + "self_attn.q_norm.weight"] = (h,)
      out[p + "self_attn.k_norm.weight"] = (h,)
    out[p + "mlp.gate_proj.weight"] = (f, d)
    out[p + "mlp.up_proj.weight"] = (f, d)
    out[p + "mlp.down_proj.weight"] = (d, f)
  return out


def check_shape(name: str, got: tuple[int, ...], want: tuple[int, ...], source: str = ""):
  if tuple(got) != tuple(want):
    where = f" in {source}" if source else ""
    raise ShapeMismatchError(f"tensor {name!r}{where} has shape {tuple(got)} but the config expects "
                             f"{tuple(want)}")


def params_from_hf(config: GemmaConfig, get: Callable[[str], np.ndarray], names: Iterable[str],
                   dtype=jnp.float32, source: str = "", progress: Optional[Callable] = None) -> dict:
  """Build the Flax params tree.

  Args:
    config: the architecture.
    get: name -> array (HF name without prefix, HF layout); called once per needed tensor, so a lazy
      reader keeps peak host memory at one tensor.
    names: the tensor names available (checked for missing tensors before anything is read).
    dtype: parameter dtype (norm scales stay f32).
    source: file name for error messages.
    progress: optional wrapper of the tensor-name iterable (e.g. tqdm).
  Returns:
    {"params": {...}} ready for `Gemma(config, dtype).apply`.
  """
  c = config
  want = hf_shapes(c)
  have = set(names)
  missing = [k for k in want if k not in have]
  if missing:
    more = " ..." if len(missing) > 5 else ""
    raise MissingTensorError(f"{len(missing)} tensor(s) needed by the config are missing from "
                             f"{source or 'the checkpoint'}: {missing[:5]}{more}")
  loaded: dict[str, np.ndarray] = {}
  order = list(want)
  for name in (progress(order) if progress else order):
    x = get(name)
    shape = tuple(x.shape)
    if (c.is_gemma and name == "embed_tokens.weight"
        and shape == (want[name][0] + 64,) + want[name][1:]):
      x = x[: want[name][0]]  # Gemma 3 4B+: 64 unused extra rows
      shape = tuple(x.shape)
    check_shape(name, shape, want[name], source)
    norm = name.endswith("norm.weight")
    loaded[name] = jnp.asarray(x, dtype=jnp.float32 if norm else dtype)
  return {"params": assemble(c, loaded)}


def assemble(c: GemmaConfig, t: dict) -> dict:
  """HF-layout arrays (by HF name) -> Flax tree."""
  n, k, h, d = c.num_heads, c.num_kv_heads, c.head_dim, c.embed_dim
  params = {"embedder": {"input_embedding": t["embed_tokens.weight"]},
            "final_norm": {"scale": t["norm.weight"]}}
  if not c.tie_embeddings:
    params["embedder"]["output_embedding"] = t["lm_head.weight"]
  for i in range(c.num_layers):
    p = f"layers.{i}."
    layer = {flax: {"scale": t[p + hf + ".weight"]} for hf, flax in norm_names(c).items()}
    q = t[p + "self_attn.q_proj.weight"].reshape(n, h, d).transpose(0, 2, 1)  # [N, D, H]
    kk = t[p + "self_attn.k_proj.weight"].reshape(k, h, d).transpose(0, 2, 1)
    vv = t[p + "self_attn.v_proj.weight"].reshape(k, h, d).transpose(0, 2, 1)
    o = t[p + "self_attn.o_proj.weight"].reshape(d, n, h).transpose(1, 2, 0)  # [N, H, D]
    attn = {"q_einsum": {"w": q}, "kv_einsum": {"w": jnp.stack([kk, vv])},
            "attn_vec_einsum": {"w": o}}
    if c.qkv_bias:
      attn["q_einsum"]["b"] = t[p + "self_attn.q_proj.bias"].reshape(n, h)
      attn["kv_einsum"]["b"] = jnp.stack([t[p + "self_attn.k_proj.bias"].reshape(k, h),
                                          t[p + "self_attn.v_proj.bias"].reshape(k, h)])
    if c.use_qk_norm:
      attn["query_norm"] = {"scale": t[p + "self_attn.q_norm.weight"]}
      attn["key_norm"] = {"scale": t[p + "self_attn.k_norm.weight"]}
    layer["attn"] = attn
    layer["mlp"] = {"gating_einsum": jnp.stack([t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"]]),
                    "linear": t[p + "mlp.down_proj.weight"].T}
    params[f"layer_{i}"] = layer
  return params


def init_params(config: GemmaConfig, dtype=jnp.float32, seed: int = 0, scale: float = 0.02) -> dict:
  """Random parameters of the right shapes (for speed/memory benchmarks and tests), without tracing
  the model: normal(0, scale) weights and biases, normal(0, 0.1) norm scales (around 1 where the norm has
  no +1 offset)."""
  rng = np.random.default_rng(seed)
  t = {}
  for name, shape in hf_shapes(config).items():
    if name.endswith("norm.weight"):
      t[name] = jnp.asarray(rng.normal(0, 0.1, shape) + (0.0 if config.norm_offset else 1.0), jnp.float32)
    else:
      t[name] = jnp.asarray(rng.normal(0, scale, shape), dtype)
  return {"params": assemble(config, t)}


def cast_params(params: dict, dtype) -> dict:
  """Cast weights to dtype, keeping norm scales in f32."""
  def cast(path, x):
    is_norm = any(getattr(p, "key", None) == "scale" for p in path)
    return x if is_norm else x.astype(dtype)
  return jax.tree_util.tree_map_with_path(cast, params)
