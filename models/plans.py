"""How each layer of one call attends, decided once before the model runs: the per-layer `LayerPlan`.

A plan is static (frozen, hashable: part of the jit cache key). It says whether the layer is dense or
Stream, pruned or kept exact as its window's block band, which output the layer emits, and which
implementation every op runs (`kernels.implementations.Implementations`, chosen here from `backend=`, the
device, the model's dtype and head dims, and the StreamConfig). `models/attend.py` only follows it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import jax
import jax.numpy as jnp

from stream_jax.config import StreamConfig
from stream_jax.kernels import implementations
from stream_jax.kernels.implementations import Call, Implementations
from stream_jax.mask import band_capacity

Attention = Union[str, StreamConfig]

# "xla": exact softmax chunked over queries (any device); "cudnn": jax.nn.dot_product_attention (cuDNN
# flash attention on GPU, no probabilities kept: the speed floor of benchmarks); "capture": exact softmax
# that also returns every layer's probabilities [B, N, T, S], what `output_attentions=True` stores.
DENSE_IMPLS = ("xla", "cudnn", "capture")
# How a Stream call's layers compute their output: "sparse" (the paper's: attention over the kept blocks,
# so the traced model is a pruned model) or "exact" (dense attention; the trace observes it: the estimated
# mask with the dense probability of each kept block, and coverage).
OUTPUTS = ("sparse", "exact")


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """Static description of how layer `layer` attends in this call."""

  layer: int
  kind: str  # "global" | "local"
  window: Optional[int]  # W for local layers
  stream: Optional[StreamConfig]  # None: the whole call is dense
  dense: bool  # this layer's output comes from dense attention
  prune: bool  # Stream-estimated mask (global layers, or local with prune_local)
  backend: str = "xla"  # the policy asked for; forced masks (interventions) are chosen for with it
  impl: Implementations = Implementations()  # what each op of this layer runs
  dense_impl: str = "xla"  # how dense attention runs: see DENSE_IMPLS
  output: str = "sparse"  # "sparse": pruned layers compute with the kept blocks; "exact": with dense
  coverage: bool = False  # record coverage (exact outputs always do)


def check_attention(attention: Attention) -> Optional[StreamConfig]:
  if isinstance(attention, StreamConfig):
    return attention
  if attention == "dense":
    return None
  raise ValueError(f"attention must be 'dense' or a stream_jax.StreamConfig, got {attention!r}")


def make_plans(config, attention: Attention, dense_layers=(), prune_local: bool = False,
               backend: str = "xla", dense_impl: Optional[str] = None, output: str = "sparse",
               coverage: bool = False, dtype=jnp.float32) -> tuple[LayerPlan, ...]:
  """Static per-layer plans of one call (validated: layer ids in range, backend, dense_impl, output).

  dense_impl None means "xla" for dense calls and, for the dense pass of exact / coverage Stream calls,
  cuDNN on a GPU when the model has no attention soft-cap (XLA otherwise). `dtype` is the model's (its
  queries'): with `backend`, the device and the config it decides each op's implementation.
  """
  stream = check_attention(attention)
  implementations.check_backend(backend)
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
  pruned = () if stream is None else config.pruned_layers(prune_local)
  if stream is not None and stream.layer_scales:
    unused = [i for i, _ in stream.layer_scales if i not in pruned]
    if unused:
      raise ValueError(f"StreamConfig.layer_scales names layer(s) {unused}, which this call does not prune "
                       f"(pruned: {list(pruned)}{'' if prune_local else '; local layers need prune_local=True'})")
  plans = []
  for i, kind in enumerate(config.layer_kinds):
    window = config.sliding_window if kind == "local" else None
    prune = i in pruned
    layer_stream = None if stream is None else stream.for_layer(i)
    plans.append(LayerPlan(layer=i, kind=kind, window=window, stream=layer_stream,
                           dense=stream is None or i in dense_layers, prune=prune, backend=backend,
                           impl=_implementations(backend, layer_stream, prune, window, config.head_dim, dtype,
                                                 output),
                           dense_impl=dense_impl, output=output,
                           coverage=bool(coverage) or output == "exact"))
  return tuple(plans)


def _implementations(backend: str, stream: Optional[StreamConfig], prune: bool, window: Optional[int],
                     head_dim: int, dtype, output: str = "sparse") -> Implementations:
  """What each op of one layer runs. A pruned layer estimates (the search or the table) or ranks
  (select="ideal") its kept set and attends over `capacity` blocks (an ideal layer with exact output only
  ranks: its output is the dense pass's); a layer kept exact attends over its window's block band."""
  if stream is None:
    return Implementations()
  dtype = jnp.dtype(dtype)
  bq, bk = stream.block_q, stream.block_k
  if prune:
    kept = Call(dtype, head_dim, head_dim, bq, bk, stream.capacity, stream)
    estimates = stream.select != "ideal"  # the search or the table (select="table") picks the kept set
    attends = estimates or output == "sparse"
    return implementations.for_layer(backend, estimate=kept if estimates else None,
                                     attention=kept if attends else None, ideal=None if estimates else kept)
  band = Call(dtype, head_dim, head_dim, bq, bk, band_capacity(bq, bk, window) if window else 0)
  return implementations.for_layer(backend, estimate=None, attention=band, ideal=None)
