"""The one forward entry point: token ids -> TracedRun (logits, Stream trace, residual stream).

jit-compiled with the architecture and the attention plan as static arguments, so a dense call and a
Stream call of the same model are two cached executables over the same parameters.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from stream_jax import checks
from stream_jax.models.plans import Attention, make_plans
from stream_jax.models.decoder_config import GemmaConfig
from stream_jax.models.transformer import Gemma, check_dtype, traced_run
from stream_jax.hooks import Hook, check_hooks
from stream_jax.intervene import Intervention
from stream_jax.trace import TracedRun


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


def check_context(config: GemmaConfig, positions: int, what: str = "tokens") -> None:
  """Positions past the trained context give logits that look normal but mean nothing (RoPE never saw
  them): refused. `config.replace(context_length=N)` is the explicit way past it."""
  if positions > config.max_length:
    raise ValueError(f"{what} is longer than the model's context: {positions} positions, {config.name} "
                     f"allows at most {config.max_length} (T in [1, {config.max_length}]); to run past the "
                     "trained context anyway, pass a config with a larger context_length "
                     "(model.config.replace(context_length=N))")


def params_dtype(params) -> jnp.dtype:
  return check_dtype(wrap_params(params)["params"]["embedder"]["input_embedding"].dtype)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "plans", "last_only", "return_hidden", "hooks"))
def _forward(params, tokens, intervention, hook_args=None, *, config, dtype, plans, last_only, return_hidden,
             hooks=()):
  return Gemma(config, dtype).apply(params, tokens, plans, last_only=last_only, return_hidden=return_hidden,
                                    intervention=intervention, hooks=hooks, hook_args=hook_args,
                                    method=Gemma.run)


def forward(model, params, tokens: jax.Array, *, attention: Attention = "dense",
            dense_layers: Sequence[int] = (), prune_local: bool = False, backend: str = "xla",
            return_hidden: bool = False, last_only: bool = False, dense_impl: Optional[str] = None,
            output: str = "sparse", coverage: bool = False,
            intervention: Optional[Intervention] = None, hooks: Sequence[Hook] = (),
            hook_args=None) -> TracedRun:
  """Run the decoder on token ids.

  Args:
    model: GemmaConfig or LoadedModel (from `load_model`).
    params: the parameter tree ({"params": ...} or bare).
    tokens: int[B, T] (int[T] is a batch of one: outputs keep B = 1). Position 0 should be BOS.
    attention: "dense" (exact causal / sliding-window softmax) or a StreamConfig: global layers attend
      through a mask estimated by hierarchical top-k search; local layers stay exact (their window as a
      block band) unless prune_local=True.
    dense_layers: Stream mode only: layer ids whose output comes from dense attention (their trace still
      holds the estimated mask and the mass attention through it would give, mode "dense").
    prune_local: Stream mode only: estimate masks on local layers too (inside their window).
    backend: "xla" | "pallas" | "auto" for mask estimation and sparse attention.
    return_hidden: also return the residual stream [L, B, T, D]: the output of every layer (before the
      final norm) — for per-layer dense vs Stream error.
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
    intervention: per-layer overrides (stream_jax.intervene): attention to chosen keys suppressed in
      chosen layers / heads (any mode), forced block masks (Stream calls). A pytree argument of the
      compiled function: new values of the same shapes reuse the executable.
    hooks: named hooks (stream_jax.hooks.Hook): your pure functions at named points of each layer (q, k,
      v, kept set, trace, attention output, residual), which read or replace values and emit extras into
      `TracedRun.hooked`. Static: the same function objects reuse the compiled forward.
    hook_args: a pytree the hooks receive (their third argument): an argument of the compiled function,
      so new values of the same shapes reuse the executable (and jax.vmap over it batches a sweep).

  Returns:
    TracedRun (stream_jax.trace): logits float32[B, T, V] ([B, V] if last_only); trace, a Trace with one
    LayerTrace per layer in layer order (mask indices int32[B, N, nQ, C], mass float32[B, N, nQ, C],
    static layer / kind / mode / window; None for attention="dense"); hidden [L, B, T, D] or None;
    probs, per-layer probabilities [B, N, T, T] with dense_impl="capture", else None.
  """
  config = model_config(model)
  params = wrap_params(params)
  dtype = params_dtype(params)
  tokens = jnp.asarray(checks.token_ids(tokens, config.vocab_size))  # ids checked when concrete
  checks.check_dense_layers(attention, dense_layers)
  if tokens.ndim == 1:
    tokens = tokens[None]
  if tokens.ndim != 2 or tokens.shape[1] < 1:
    raise ValueError(f"tokens must have shape [B, T] or [T] with T >= 1, got {tokens.shape}")
  check_context(config, tokens.shape[1], f"tokens (T={tokens.shape[1]})")
  plans = make_plans(config, attention, dense_layers, prune_local, backend, dense_impl, output, coverage,
                     dtype=dtype)
  check_intervention(intervention, config, plans, tokens.shape)
  hooks = check_hooks(hooks, config.num_layers)
  out = _forward(params, tokens.astype(jnp.int32), intervention, hook_args, config=config, dtype=dtype,
                 plans=plans, last_only=bool(last_only), return_hidden=bool(return_hidden), hooks=hooks)
  return traced_run(out, plans)


def check_intervention(intervention: Optional[Intervention], config: GemmaConfig, plans, shape) -> None:
  """An Intervention (or None) that fits this model, call and token shape [B, T]."""
  if intervention is None:
    return
  if not isinstance(intervention, Intervention):
    raise TypeError("intervention must be a stream_jax.intervene.Intervention (e.g. from suppress_spans), "
                    f"got {type(intervention).__name__}")
  intervention.check(num_layers=config.num_layers, num_heads=config.num_heads, batch=shape[0],
                     length=shape[1])
  if intervention.masks is not None and plans[0].stream is None:
    raise ValueError("intervention.masks (forced block masks) needs a Stream call (attention=StreamConfig())"
                     "; a dense call has no mask to replace")
  if intervention.gates is not None:
    for plan, g in zip(plans, intervention.gates):
      if g is not None and (plan.dense or plan.output != "sparse"):
        raise ValueError(f"intervention.gates[{plan.layer}]: gates weight the kept blocks of a layer whose "
                         "output is sparse attention; this layer's output is dense (attention='dense', "
                         "output='exact' or dense_layers), so a gate there would change nothing")


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
