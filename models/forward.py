"""The one forward entry point: token ids -> logits (+ Stream trace, + residual stream).

jit-compiled with the architecture and the attention plan as static arguments, so a dense call and a
Stream call of the same model are two cached executables over the same parameters.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from stream_jax import checks
from stream_jax.models.attention import Attention, make_plans
from stream_jax.models.config import GemmaConfig
from stream_jax.models.transformer import Gemma, check_dtype
from stream_jax.trace import Trace


def model_config(model) -> GemmaConfig:
  """A GemmaConfig from a GemmaConfig, a LoadedModel or a Gemma module."""
  cfg = getattr(model, "config", model)
  if not isinstance(cfg, GemmaConfig):
    raise TypeError("model must be a GemmaConfig, a LoadedModel or a Gemma module, got "
                    f"{type(model).__name__}")
  return cfg


def wrap_params(params) -> dict:
  """Accept both {"params": tree} and the bare tree (None, {} and foreign trees are refused)."""
  checks.check_params(params)
  return params if "params" in params else {"params": params}


def params_dtype(params) -> jnp.dtype:
  return check_dtype(wrap_params(params)["params"]["embedder"]["input_embedding"].dtype)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "plans", "last_only", "return_hidden"))
def _forward(params, tokens, *, config, dtype, plans, last_only, return_hidden):
  return Gemma(config, dtype).apply(params, tokens, plans, last_only=last_only, return_hidden=return_hidden,
                                    method=Gemma.run)


def forward(model, params, tokens: jax.Array, *, attention: Attention = "dense",
            dense_layers: Sequence[int] = (), prune_local: bool = False, backend: str = "xla",
            return_hidden: bool = False, last_only: bool = False, dense_impl: Optional[str] = None,
            output: str = "sparse", coverage: bool = False):
  """Run the decoder on token ids.

  Args:
    model: GemmaConfig or LoadedModel (from `load_model`).
    params: the parameter tree ({"params": ...} or bare).
    tokens: int[B, T] (or int[T]: outputs then lose their batch axis). Position 0 should be BOS.
    attention: "dense" (exact causal / sliding-window softmax) or a StreamConfig: global layers attend
      through a mask estimated by hierarchical top-k search; local layers stay exact (their window as a
      block band) unless prune_local=True.
    dense_layers: Stream mode only: layer ids whose output comes from dense attention (their trace still
      holds the estimated mask and the mass attention through it would give, mode "dense").
    prune_local: Stream mode only: estimate masks on local layers too (inside their window).
    backend: "xla" | "pallas" | "auto" for mask estimation and sparse attention.
    return_hidden: also return the residual stream float[L + 1, B, T, D]: the scaled embeddings, then the
      output of every layer (before the final norm) — for per-layer dense vs Stream error.
    last_only: logits at the last position only ([B, V]), saving the [B, T, V] buffer.
    dense_impl: how dense attention runs: "xla" (exact, flash-style chunks; the default of dense calls),
      "cudnn" (jax.nn.dot_product_attention, the fast path on GPU; no soft-cap) or "capture" (dense calls
      only: also returns every layer's probabilities, T x T per head: what output_attentions=True
      stores; for measurements). None: "xla", or for the dense pass of an exact / coverage Stream call
      cuDNN on a GPU when the model has no soft-cap.
    output: Stream calls only. "sparse" (default, the paper's mode): pruned layers compute with the kept
      blocks, so the traced model is a pruned model and its logits differ from dense. "exact": every
      layer computes dense attention (logits equal attention="dense"), and the trace observes it: the
      estimated mask, each kept block's dense attention probability as mass, and coverage.
    coverage: Stream calls: also record each layer's coverage (share of the dense attention inside the
      kept blocks) in a sparse trace; costs one dense log-sum-exp pass per pruned layer. Always on with
      output="exact".

  Returns:
    (logits, trace) or (logits, trace, hidden). logits: float32[B, T, V] ([B, V] if last_only).
    trace: None for dense attention; else a stream_jax.trace.Trace with one LayerTrace per layer, in
    layer order: mask (BlockMask, indices int32[B, N, nQ, C]) and mass float32[B, N, nQ, C], static
    layer/kind ("global"|"local")/mode ("stream"|"window"|"dense")/window. With dense_impl="capture"
    the second output is instead the tuple of per-layer probabilities [B, N, T, T].
  """
  config = model_config(model)
  params = wrap_params(params)
  dtype = params_dtype(params)
  tokens = jnp.asarray(checks.token_ids(tokens, config.vocab_size))  # ids checked when concrete
  checks.check_dense_layers(attention, dense_layers)
  squeeze = tokens.ndim == 1
  if squeeze:
    tokens = tokens[None]
  if tokens.ndim != 2 or tokens.shape[1] < 1:
    raise ValueError(f"tokens must have shape [B, T] or [T] with T >= 1, got {tokens.shape}")
  plans = make_plans(config, attention, dense_layers, prune_local, backend, dense_impl, output, coverage)
  out = _forward(params, tokens.astype(jnp.int32), config=config, dtype=dtype, plans=plans,
                 last_only=bool(last_only), return_hidden=bool(return_hidden))
  logits = out["logits"]
  trace: Optional[Trace] = None
  if plans[0].stream is not None:
    trace = Trace(layers=tuple(out["traces"]))
  elif dense_impl == "capture":
    trace = tuple(out["traces"])
  hidden = out.get("hidden")
  if squeeze:
    logits = logits[0]
    trace = None if trace is None else jax.tree_util.tree_map(lambda x: x[0], trace)
    hidden = None if hidden is None else hidden[:, 0]
  return (logits, trace, hidden) if return_hidden else (logits, trace)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _logits_from_hidden(params, hidden, *, config, dtype):
  return Gemma(config, dtype).apply(params, hidden, method=Gemma.logits)


def logits_from_hidden(model, params, hidden: jax.Array) -> jax.Array:
  """float32[..., V]: the model's final norm + (soft-capped) unembedding of residual states [..., D].

  With `forward(..., return_hidden=True, last_only=True)` this gives logits for any positions without the
  [T, V] buffer (262k vocabulary: 1 MiB per position in f32), e.g. in chunks for faithfulness metrics.
  """
  params = wrap_params(params)
  return _logits_from_hidden(params, jnp.asarray(hidden), config=model_config(model),
                             dtype=params_dtype(params))
