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
from jax import lax

from stream_jax import dense as dense_lib
from stream_jax.attention import sparse_attention
from stream_jax.config import StreamConfig
from stream_jax.estimate import estimate_mask
from stream_jax.mask import BlockMask, window_mask
from stream_jax.trace import LayerTrace

Attention = Union[str, StreamConfig]
NEG_INF = -1e30  # finite: a fully masked (padding) row stays NaN-free
# Queries per step of the dense path (stream_jax.dense tiles).
DENSE_Q_CHUNK = dense_lib.Q_CHUNK


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


# "xla": exact softmax chunked over queries (any device); "cudnn": jax.nn.dot_product_attention (cuDNN
# flash attention on GPU, no probabilities kept: the speed floor of benchmarks); "capture": exact softmax
# that also returns every layer's probabilities [B, N, T, S], what `output_attentions=True` stores.
DENSE_IMPLS = ("xla", "cudnn", "capture")


def check_attention(attention: Attention) -> Optional[StreamConfig]:
  if isinstance(attention, StreamConfig):
    return attention
  if attention == "dense":
    return None
  raise ValueError(f"attention must be 'dense' or a stream_jax.StreamConfig, got {attention!r}")


def softcap(x: jax.Array, cap: Optional[float]) -> jax.Array:
  return x if cap is None else cap * jnp.tanh(x / cap)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_pos: jax.Array, k_pos: jax.Array,
                    scale: float, cap: Optional[float] = None, window: Optional[int] = None,
                    k_valid: Optional[jax.Array] = None,
                    q_chunk: int = DENSE_Q_CHUNK) -> jax.Array:
  """Causal (sliding-window) softmax attention, exact: `stream_jax.dense.dense_attention` (flash style,
  nothing T x S; local layers touch only their window), under the model's argument names.

  Args:
    q: [B, T, N, H]; k, v: [B, S, K, H]; q_pos: int[T], k_pos: int[S] absolute positions.
    scale, cap: logit scale and optional softcap (applied before the mask, as the reference does).
    window: W, a key is visible iff q_pos - k_pos < W (None: global).
    k_valid: optional bool[B, S] (e.g. the filled part of a KV cache).
  Returns:
    [B, T, N, H] in q's dtype (a row that sees no key: 0). Memory: B x N x q_chunk x k_chunk logits.
  """
  return dense_lib.dense_attention(q, k, v, q_pos=q_pos, k_pos=k_pos, scale=scale, softcap=cap,
                                   window=window, k_valid=k_valid, q_chunk=q_chunk)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                    window: Optional[int] = None) -> jax.Array:
  """Causal (sliding-window) attention through `jax.nn.dot_product_attention`: cuDNN on GPU.

  q [B, T, N, H], k, v [B, T, K, H] (GQA handled by the op) -> [B, T, N, H]. No soft-cap support: the
  caller refuses it (Gemma 2) before getting here.
  """
  impl = "cudnn" if jax.default_backend() == "gpu" else None
  local = None if window is None else (window - 1, 0)
  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=local,
                                      implementation=impl)


def captured_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, cap: Optional[float],
                       window: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
  """Exact attention that also returns the probabilities [B, N, T, S] in q's dtype (T x S per head: the
  dense capture that Stream replaces; for measurements)."""
  b, t, n, h = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, n // kv, h)
  logits = softcap(jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale, cap)
  pos = jnp.arange(t)
  visible = pos[None, :] <= pos[:, None]
  if window is not None:
    visible &= pos[:, None] - pos[None, :] < window
  probs = jax.nn.softmax(jnp.where(visible, logits, NEG_INF), axis=-1).astype(q.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(q.dtype), probs.reshape(b, n, t, t)


def _band(plan: LayerPlan, cfg: StreamConfig, b: int, n: int, t: int) -> BlockMask:
  """The exact block band of the layer's window (all causal blocks if global), batched [B, N, nQ, C]."""
  m = window_mask(n, t, t, block_q=cfg.block_q, block_k=cfg.block_k, window=plan.window)
  return dataclasses.replace(m, indices=jnp.broadcast_to(m.indices, (b,) + m.indices.shape),
                             counts=jnp.broadcast_to(m.counts, (b,) + m.counts.shape))


def attend(plan: LayerPlan, q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
           cap: Optional[float]) -> tuple[jax.Array, Optional[LayerTrace]]:
  """One layer's attention over a whole sequence (positions 0..T-1).

  q: [B, T, N, H] (post QK-norm and RoPE), k, v: [B, T, K, H] -> out [B, T, N, H] and, on the Stream
  path, a LayerTrace (mask indices [B, N, nQ, C], mass float32[B, N, nQ, C]).
  """
  b, t, n, _ = q.shape
  pos = jnp.arange(t, dtype=jnp.int32)
  cfg = plan.stream
  if cfg is None:
    if plan.dense_impl == "cudnn":
      return cudnn_attention(q, k, v, scale=scale, window=plan.window), None
    if plan.dense_impl == "capture":
      return captured_attention(q, k, v, scale=scale, cap=cap, window=plan.window)
    return dense_attention(q, k, v, q_pos=pos, k_pos=pos, scale=scale, cap=cap, window=plan.window), None
  if plan.prune:
    mask = estimate_mask(q, k, cfg, scale=scale, softcap=cap, backend=plan.backend)
    mode = "stream"
  else:  # local layer kept exact: its window as a block band
    mask = _band(plan, cfg, b, n, t)
    mode = "window"
  out, stats = sparse_attention(q, k, v, mask, scale=scale, softcap=cap, window=plan.window,
                                backend=plan.backend)
  if plan.dense:
    out = dense_attention(q, k, v, q_pos=pos, k_pos=pos, scale=scale, cap=cap, window=plan.window)
    mode = "dense"
  trace = LayerTrace(mask=mask, mass=stats.mass, layer=plan.layer, kind=plan.kind, mode=mode,
                     window=plan.window)
  return out, trace


def make_plans(config, attention: Attention, dense_layers=(), prune_local: bool = False,
               backend: str = "xla", dense_impl: str = "xla") -> tuple[LayerPlan, ...]:
  """Static per-layer plans of one call (validated: layer ids in range, dense_impl)."""
  stream = check_attention(attention)
  if dense_impl not in DENSE_IMPLS:
    raise ValueError(f"dense_impl must be one of {DENSE_IMPLS}, got {dense_impl!r}")
  if dense_impl != "xla" and stream is not None:
    raise ValueError(f"dense_impl={dense_impl!r} applies to attention='dense' calls only")
  if dense_impl == "cudnn" and config.attn_softcap is not None:
    raise ValueError("dense_impl='cudnn' cannot apply the attention soft-cap of this model (Gemma 2); "
                     "use dense_impl='xla'")
  dense_layers = tuple(sorted({int(i) for i in dense_layers}))
  bad = [i for i in dense_layers if not 0 <= i < config.num_layers]
  if bad:
    raise ValueError(f"dense_layers {bad} out of range for a {config.num_layers}-layer model")
  plans = []
  for i, kind in enumerate(config.layer_kinds):
    window = config.sliding_window if kind == "local" else None
    plans.append(LayerPlan(layer=i, kind=kind, window=window, stream=stream,
                           dense=stream is None or i in dense_layers,
                           prune=stream is not None and (kind == "global" or prune_local),
                           backend=backend, dense_impl=dense_impl))
  return tuple(plans)
