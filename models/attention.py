"""How one layer attends: dense, Stream (estimated block mask) or exact sliding window as a block band.

The choice is per call (`attention="dense"` or a StreamConfig) and per layer (dense_layers, prune_local),
so the same parameters run both ways and a faithfulness study compares them on the same tokens. On the
Stream path nothing T x T is allocated: global layers attend through `estimate_mask` + `sparse_attention`,
local layers through the exact block band of their window (`window_mask`), which is O(T x W).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import jax
import jax.numpy as jnp

from stream_jax import dense as dense_lib
from stream_jax.attention import block_coverage, sparse_attention
from stream_jax.backend import resolve_backend
from stream_jax.band import window_attention
from stream_jax.config import StreamConfig
from stream_jax.estimate import estimate_mask
from stream_jax.ideal import ideal_mask
from stream_jax.mask import BlockMask, window_mask
from stream_jax.trace import LayerTrace

Attention = Union[str, StreamConfig]


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """Static description of how layer `layer` attends in this call."""

  layer: int
  kind: str  # "global" | "local"
  window: Optional[int]  # W for local layers
  stream: Optional[StreamConfig]  # None: the whole call is dense
  dense: bool  # this layer's output comes from dense attention
  prune: bool  # Stream-estimated mask (global layers, or local with prune_local)
  backend: str = "xla"
  dense_impl: str = "xla"  # how dense attention runs: see DENSE_IMPLS
  output: str = "sparse"  # "sparse": pruned layers compute with the kept blocks; "exact": with dense
  coverage: bool = False  # record coverage (exact outputs always do)


# "xla": exact softmax chunked over queries (any device); "cudnn": jax.nn.dot_product_attention (cuDNN
# flash attention on GPU, no probabilities kept: the speed floor of benchmarks); "capture": exact softmax
# that also returns every layer's probabilities [B, N, T, S], what `output_attentions=True` stores.
DENSE_IMPLS = ("xla", "cudnn", "capture")
# How a Stream call's layers compute their output: "sparse" (the paper's: attention over the kept blocks,
# so the traced model is a pruned model) or "exact" (dense attention; the trace observes it: the estimated
# mask with the dense probability of each kept block, and coverage).
OUTPUTS = ("sparse", "exact")


def check_attention(attention: Attention) -> Optional[StreamConfig]:
  if isinstance(attention, StreamConfig):
    return attention
  if attention == "dense":
    return None
  raise ValueError(f"attention must be 'dense' or a stream_jax.StreamConfig, got {attention!r}")


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                    window: Optional[int] = None, return_lse: bool = False):
  """Causal (sliding-window) attention through `jax.nn.dot_product_attention`: cuDNN on GPU.

  q [B, T, N, H], k, v [B, T, K, H] (GQA handled by the op) -> [B, T, N, H] (and, with return_lse, the
  per-query log-sum-exp float32[B, N, T], cuDNN's softmax residual). No soft-cap support: the caller
  refuses it (Gemma 2) before getting here.
  """
  impl = "cudnn" if jax.default_backend() == "gpu" else None
  local = None if window is None else (window - 1, 0)
  out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=local,
                                     implementation=impl, return_residual=return_lse)
  if not return_lse:
    return out
  out, lse = out
  b, t, n, _ = q.shape
  return out, jnp.swapaxes(lse.astype(jnp.float32).reshape(b, t, n), 1, 2)


def _band(plan: LayerPlan, cfg: StreamConfig, b: int, n: int, t: int) -> BlockMask:
  """The exact block band of the layer's window (all causal blocks if global), batched [B, N, nQ, C]."""
  m = window_mask(n, t, t, block_q=cfg.block_q, block_k=cfg.block_k, window=plan.window)
  return dataclasses.replace(m, indices=jnp.broadcast_to(m.indices, (b,) + m.indices.shape),
                             counts=jnp.broadcast_to(m.counts, (b,) + m.counts.shape))


def dense_with_lse(plan: LayerPlan, q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                   cap: Optional[float], visible: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """Dense attention of the layer and its per-query log-sum-exp [B, N, T], in one flash-style pass
  (cuDNN's on a GPU with dense_impl="cudnn" and 16-bit inputs, the chunked XLA pass otherwise: float32
  models and suppressed keys take the XLA pass). Nothing T x T."""
  if plan.dense_impl == "cudnn" and q.dtype != jnp.float32 and visible is None:  # cuDNN: 16-bit only
    return cudnn_attention(q, k, v, scale=scale, window=plan.window, return_lse=True)
  pos = jnp.arange(q.shape[1], dtype=jnp.int32)
  return dense_lib.dense_attention(q, k, v, q_pos=pos, k_pos=pos, scale=scale, softcap=cap,
                                   window=plan.window, k_valid=visible, return_lse=True)


def attend(plan: LayerPlan, q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
           cap: Optional[float], suppress: Optional[jax.Array] = None,
           forced: Optional[BlockMask] = None, gate: Optional[jax.Array] = None
           ) -> tuple[jax.Array, Optional[LayerTrace]]:
  """One layer's attention over a whole sequence (positions 0..T-1).

  q: [B, T, N, H] (post QK-norm and RoPE), k, v: [B, T, K, H] -> out [B, T, N, H] and, on the Stream
  path, a LayerTrace (mask indices [B, N, nQ, C], mass float32[B, N, nQ, C], coverage [B, N, nQ] when
  the output is exact or coverage was asked for).
  suppress: bool[B|1, N, T] keys given zero probability per head (an Intervention's; see
    stream_jax.intervene); the mask is still estimated from the unsuppressed logits, so the trace shows
    where the layer would look and how much mass the suppression leaves there.
  forced: a BlockMask [B, N, nQ, C] to attend through instead of the estimated / band mask.
  gate: float[B|1, N, nQ, C] weights of the forced mask's blocks (see `sparse_attention`); sparse-output
    Stream layers with a forced mask only (checked by `check_intervention`).
  """
  b, t, n, _ = q.shape
  pos = jnp.arange(t, dtype=jnp.int32)
  cfg = plan.stream
  visible = None if suppress is None else jnp.broadcast_to(~suppress, (b, n, t))
  dense = lambda **kw: dense_lib.dense_attention(q, k, v, q_pos=pos, k_pos=pos, scale=scale,  # noqa: E731
                                                 softcap=cap, window=plan.window, k_valid=visible, **kw)
  if cfg is None:
    if plan.dense_impl == "cudnn" and visible is None:
      return cudnn_attention(q, k, v, scale=scale, window=plan.window), None
    if plan.dense_impl == "capture":
      return dense(return_probs=True)  # (out, probs)
    return dense(), None
  exact = plan.output == "exact"
  if plan.prune and forced is None and cfg.select == "ideal":
    return _attend_ideal(plan, q, k, v, scale=scale, cap=cap, visible=visible)
  if forced is not None:
    mask = forced
    mode = "exact" if exact else "stream"
  elif plan.prune:
    mask = estimate_mask(q, k, cfg, scale=scale, softcap=cap, backend=plan.backend)
    mode = "exact" if exact else "stream"
  else:  # local layer kept exact: its window as a block band
    mask = _band(plan, cfg, b, n, t)
    mode = "window"
  estimated = forced is not None or plan.prune
  dense_out = lse_dense = None
  if estimated and (exact or plan.coverage):
    dense_out, lse_dense = dense_with_lse(plan, q, k, v, scale=scale, cap=cap, visible=visible)
  if gate is not None:
    gate = jnp.broadcast_to(gate, mask.indices.shape)
  if mode == "window" and (visible is not None or resolve_backend(plan.backend, q.dtype) == "xla"):
    # The band's contiguous XLA path: the same numbers as the gathered one at ~half its time.
    out, stats = window_attention(q, k, v, window=plan.window, block_q=cfg.block_q, block_k=cfg.block_k,
                                  scale=scale, softcap=cap, key_mask=visible)
  else:
    out, stats = sparse_attention(q, k, v, mask, scale=scale, softcap=cap, window=plan.window,
                                  backend=plan.backend, lse_ref=lse_dense if exact else None,
                                  key_mask=visible, gate=gate)
  coverage = None
  if lse_dense is not None:
    coverage = block_coverage(stats.lse, lse_dense, cfg.block_q)
  elif exact or plan.coverage:  # the band holds every key of the window: nothing is pruned
    coverage = block_coverage(stats.lse, stats.lse, cfg.block_q)
  if exact and dense_out is not None:
    out = dense_out.astype(q.dtype)
  elif plan.dense and not exact:
    out = dense()
    mode = "dense"
  trace = LayerTrace(mask=mask, mass=stats.mass, layer=plan.layer, kind=plan.kind, mode=mode,
                     window=plan.window, coverage=coverage)
  return out, trace


def _attend_ideal(plan: LayerPlan, q, k, v, *, scale, cap, visible):
  """A pruned layer whose kept set is the ideal one (StreamConfig.select="ideal"): the dense pass gives the
  lse, the lse gives every block's true mass, the mass gives the kept set, its mass and exact coverage.
  Exact output: the dense pass's (no sparse attention runs). Sparse output: attention over the ideal set,
  whose trace mass is normalised over the kept blocks like any sparse layer's; coverage stays the true one."""
  cfg = plan.stream
  dense_out, lse = dense_with_lse(plan, q, k, v, scale=scale, cap=cap, visible=visible)
  ideal = ideal_mask(q, k, lse, cfg, scale=scale, softcap=cap, window=plan.window, key_mask=visible,
                     backend=plan.backend if visible is None else "xla")
  if plan.output == "exact":
    trace = LayerTrace(mask=ideal.mask, mass=ideal.mass, layer=plan.layer, kind=plan.kind, mode="exact",
                       window=plan.window, coverage=ideal.coverage)
    return dense_out.astype(q.dtype), trace
  out, stats = sparse_attention(q, k, v, ideal.mask, scale=scale, softcap=cap, window=plan.window,
                                backend=plan.backend, key_mask=visible)
  if plan.dense:
    out = dense_out.astype(q.dtype)
  trace = LayerTrace(mask=ideal.mask, mass=stats.mass, layer=plan.layer, kind=plan.kind,
                     mode="dense" if plan.dense else "stream", window=plan.window, coverage=ideal.coverage)
  return out, trace


def make_plans(config, attention: Attention, dense_layers=(), prune_local: bool = False,
               backend: str = "xla", dense_impl: Optional[str] = None, output: str = "sparse",
               coverage: bool = False) -> tuple[LayerPlan, ...]:
  """Static per-layer plans of one call (validated: layer ids in range, dense_impl, output).

  dense_impl None means "xla" for dense calls and, for the dense pass of exact / coverage Stream calls,
  cuDNN on a GPU when the model has no attention soft-cap (XLA otherwise).
  """
  stream = check_attention(attention)
  if output not in OUTPUTS:
    raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
  if dense_impl is not None and dense_impl not in DENSE_IMPLS:
    raise ValueError(f"dense_impl must be one of {DENSE_IMPLS}, got {dense_impl!r}")
  if dense_impl == "cudnn" and config.attn_softcap is not None:
    raise ValueError("dense_impl='cudnn' cannot apply the attention soft-cap of this model (Gemma 2); "
                     "use dense_impl='xla'")
  if stream is None:
    if output != "sparse" or coverage:
      raise ValueError("output='exact' and coverage=True need a Stream call (attention=StreamConfig(...)); "
                       "attention='dense' records no trace")
    dense_impl = dense_impl or "xla"
  else:
    if dense_impl == "capture":
      raise ValueError("dense_impl='capture' applies to attention='dense' calls only")
    if dense_impl is None:
      gpu = jax.default_backend() == "gpu"
      dense_impl = "cudnn" if gpu and config.attn_softcap is None else "xla"
  dense_layers = tuple(sorted({int(i) for i in dense_layers}))
  bad = [i for i in dense_layers if not 0 <= i < config.num_layers]
  if bad:
    raise ValueError(f"dense_layers {bad} out of range for a {config.num_layers}-layer model")
  if dense_layers and output == "exact":
    raise ValueError("dense_layers applies to output='sparse' only: with output='exact' every layer's "
                     "output is already dense")
  plans = []
  for i, kind in enumerate(config.layer_kinds):
    window = config.sliding_window if kind == "local" else None
    plans.append(LayerPlan(layer=i, kind=kind, window=window, stream=stream,
                           dense=stream is None or i in dense_layers,
                           prune=stream is not None and (kind == "global" or prune_local),
                           backend=backend, dense_impl=dense_impl, output=output,
                           coverage=bool(coverage) or output == "exact"))
  return tuple(plans)
