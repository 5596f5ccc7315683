"""How one layer attends, following its LayerPlan (models/plans.py): dense, or Stream (a kept set of key
blocks per head and query block, attended over, observed by the trace).

A Stream layer is a composition of named parts, each one function:
  kept set       which key blocks each (head, query block) keeps: forced (an intervention's), estimated by
                 the hierarchical search, ranked by true mass (select="ideal"), or the exact block band of a
                 local layer's window;
  reference      the dense pass's output and per-query log-sum-exp, when the output is exact or coverage
                 is asked for (the denominator of the kept blocks' true mass);
  kept attention softmax attention over the kept blocks: the paper's output and the block mass;
  output         which of those the layer emits (dense_layers and output="exact" emit the dense one).
On the Stream path nothing T x T is allocated: pruned layers are O(T x C x block_k), local layers' bands
O(T x W).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from stream_jax import dense as dense_lib
from stream_jax.band import window_attention
from stream_jax.blocksparse import block_coverage, sparse_attention
from stream_jax.estimate import estimate_mask
from stream_jax.ideal import ideal_mask
from stream_jax.mask import BlockMask, window_mask
from stream_jax.models.plans import LayerPlan
from stream_jax.numerics import AttentionStats
from stream_jax.trace import LayerTrace


def attend(plan: LayerPlan, q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
           cap: Optional[float], suppress: Optional[jax.Array] = None,
           forced: Optional[BlockMask] = None, gate: Optional[jax.Array] = None,
           on_kept: Optional[Callable[[BlockMask], BlockMask]] = None
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
  on_kept: the "kept" hook point (stream_jax.hooks): the forced or estimated kept set goes through it
    before attention, and what it returns is attended through.
  """
  b, t, n, _ = q.shape
  visible = None if suppress is None else jnp.broadcast_to(~suppress, (b, n, t))
  if plan.stream is None:
    return _dense_layer(plan, q, k, v, scale=scale, cap=cap, visible=visible)
  if plan.prune and forced is None and plan.stream.select == "ideal":
    return _ideal_layer(plan, q, k, v, scale=scale, cap=cap, visible=visible)
  return _stream_layer(plan, q, k, v, scale=scale, cap=cap, visible=visible, forced=forced, gate=gate,
                       on_kept=on_kept)


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


def dense_with_lse(plan: LayerPlan, q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                   cap: Optional[float], visible: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """The reference: dense attention of the layer and its per-query log-sum-exp [B, N, T], in one
  flash-style pass (cuDNN's on a GPU with dense_impl="cudnn" and 16-bit inputs, the chunked XLA pass
  otherwise: float32 models and suppressed keys take the XLA pass). Nothing T x T."""
  if plan.dense_impl == "cudnn" and q.dtype != jnp.float32 and visible is None:  # cuDNN: 16-bit only
    return cudnn_attention(q, k, v, scale=scale, window=plan.window, return_lse=True)
  return _dense(plan, q, k, v, scale=scale, cap=cap, visible=visible, return_lse=True)


def _dense(plan: LayerPlan, q, k, v, *, scale, cap, visible, **kw):
  """The chunked XLA dense pass of the layer (causal, its window, the keys an intervention leaves)."""
  pos = jnp.arange(q.shape[1], dtype=jnp.int32)
  return dense_lib.dense_attention(q, k, v, q_pos=pos, k_pos=pos, scale=scale, softcap=cap,
                                   window=plan.window, k_valid=visible, **kw)


def _dense_layer(plan: LayerPlan, q, k, v, *, scale, cap, visible):
  """A dense call: no trace (the probabilities themselves with dense_impl="capture")."""
  if plan.dense_impl == "cudnn" and visible is None:
    return cudnn_attention(q, k, v, scale=scale, window=plan.window), None
  if plan.dense_impl == "capture":
    return _dense(plan, q, k, v, scale=scale, cap=cap, visible=visible, return_probs=True)  # (out, probs)
  return _dense(plan, q, k, v, scale=scale, cap=cap, visible=visible), None


def _stream_layer(plan: LayerPlan, q, k, v, *, scale, cap, visible, forced, gate, on_kept=None):
  """A Stream layer whose kept set is forced, searched, or its window's band: kept set, reference, kept
  attention, output."""
  mask, mode = _kept_set(plan, q, k, scale=scale, cap=cap, forced=forced)
  if on_kept is not None and mode != "window":
    hooked = on_kept(mask)
    if hooked is not mask:  # a replacement is a forced mask: chosen for by its shape, like an intervention's
      mask, forced = hooked, hooked
  exact = plan.output == "exact"
  reference = None
  if mode != "window" and (exact or plan.coverage):
    reference = dense_with_lse(plan, q, k, v, scale=scale, cap=cap, visible=visible)
  if gate is not None:
    gate = jnp.broadcast_to(gate, mask.indices.shape)
  # A forced mask was not planned for: the op chooses for its shape under the plan's policy.
  impl = "xla" if visible is not None or gate is not None else (
      plan.backend if forced is not None else plan.impl.sparse_attention)
  out, stats = _kept_attention(plan, q, k, v, mask, mode, impl, scale=scale, cap=cap, visible=visible,
                               gate=gate, lse_ref=reference[1] if reference is not None and exact else None)
  coverage = None
  if reference is not None:
    coverage = block_coverage(stats.lse, reference[1], mask.block_q)
  elif exact or plan.coverage:  # the band holds every key of the window: nothing is pruned
    coverage = block_coverage(stats.lse, stats.lse, mask.block_q)
  if exact and reference is not None:
    out = reference[0].astype(q.dtype)
  elif plan.dense and not exact:
    out = _dense(plan, q, k, v, scale=scale, cap=cap, visible=visible)
    mode = "dense"
  return out, LayerTrace(mask=mask, mass=stats.mass, layer=plan.layer, kind=plan.kind, mode=mode,
                         window=plan.window, coverage=coverage)


def _kept_set(plan: LayerPlan, q, k, *, scale, cap, forced) -> tuple[BlockMask, str]:
  """The layer's kept blocks and the trace's mode: "exact" / "stream" for a forced or estimated set (by the
  output), "window" for a local layer kept exact."""
  mode = "exact" if plan.output == "exact" else "stream"
  if forced is not None:
    return forced, mode
  if plan.prune:
    return estimate_mask(q, k, plan.stream, scale=scale, softcap=cap, backend=plan.impl.estimate_mask), mode
  return _band(plan, batch=q.shape[0], heads=q.shape[2], length=q.shape[1]), "window"


def _band(plan: LayerPlan, *, batch: int, heads: int, length: int) -> BlockMask:
  """The exact block band of the layer's window (all causal blocks if global), batched [B, N, nQ, C]."""
  cfg, b = plan.stream, batch
  m = window_mask(heads, length, length, block_q=cfg.block_q, block_k=cfg.block_k, window=plan.window)
  return dataclasses.replace(m, indices=jnp.broadcast_to(m.indices, (b,) + m.indices.shape),
                             counts=jnp.broadcast_to(m.counts, (b,) + m.counts.shape))


def _kept_attention(plan: LayerPlan, q, k, v, mask: BlockMask, mode: str, impl: str, *, scale, cap, visible,
                    gate, lse_ref) -> tuple[jax.Array, AttentionStats]:
  """Softmax attention over the kept blocks (exact for a band) by implementation `impl`, with each block's
  mass (under `lse_ref`'s denominator when given: the dense pass's probability). Interventions that hide
  keys or weight blocks run on the reference (the kernels take neither)."""
  if mode == "window" and impl == "xla":  # the band's contiguous path: the gathered one's numbers, ~2x faster
    return window_attention(q, k, v, window=plan.window, block_q=mask.block_q, block_k=mask.block_k,
                            scale=scale, softcap=cap, key_mask=visible)
  return sparse_attention(q, k, v, mask, scale=scale, softcap=cap, window=plan.window, backend=impl,
                          lse_ref=lse_ref, key_mask=visible, gate=gate)


def _ideal_layer(plan: LayerPlan, q, k, v, *, scale, cap, visible):
  """A pruned layer whose kept set is the ideal one (StreamConfig.select="ideal"): the reference gives the
  lse, the lse gives every block's true mass, the mass gives the kept set, its mass and exact coverage.
  Exact output: the reference's (no sparse attention runs). Sparse output: attention over the ideal set,
  whose trace mass is normalised over the kept blocks like any sparse layer's; coverage stays the true one."""
  dense_out, lse = dense_with_lse(plan, q, k, v, scale=scale, cap=cap, visible=visible)
  ideal = ideal_mask(q, k, lse, plan.stream, scale=scale, softcap=cap, window=plan.window, key_mask=visible,
                     backend=plan.impl.ideal_mask if visible is None else "xla")
  if plan.output == "exact":
    trace = LayerTrace(mask=ideal.mask, mass=ideal.mass, layer=plan.layer, kind=plan.kind, mode="exact",
                       window=plan.window, coverage=ideal.coverage)
    return dense_out.astype(q.dtype), trace
  impl = "xla" if visible is not None else plan.impl.sparse_attention
  out, stats = _kept_attention(plan, q, k, v, ideal.mask, "stream", impl, scale=scale, cap=cap,
                               visible=visible, gate=None, lse_ref=None)
  if plan.dense:
    out = dense_out.astype(q.dtype)
  trace = LayerTrace(mask=ideal.mask, mass=stats.mass, layer=plan.layer, kind=plan.kind,
                     mode="dense" if plan.dense else "stream", window=plan.window, coverage=ideal.coverage)
  return out, trace
