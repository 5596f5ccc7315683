"""Which implementations each operation has, what each takes, and the one place a choice among them is made.

Every op entry (`estimate_mask`, `sparse_attention`, `ideal_mask`) runs exactly one implementation, named
by a static string:
  "xla"     the reference: any device, the CPU path and the oracle of the kernels;
  "triton"  a Pallas Triton kernel (interpreted off the GPU);
  "mosaic"  a Pallas Mosaic GPU port (Hopper only: wgmma + TMA, no interpret mode).
`choose` turns a backend (one of those names, or the policy "auto" / "pallas") and the call's static facts
(`Call`) into that name. A model chooses once, when it makes its per-layer plans, and passes the names down
(`Implementations`), so the choice is visible in the plan and part of the jit cache key; nothing is read
from the environment. Like `jax.experimental.pallas.ops.gpu.attention.mha` beside `mha_reference`.

Retiring an implementation is one edit: drop its row from `TABLES`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from stream_jax.config import StreamConfig
from stream_jax.kernels import (blocksparse_mosaic, blocksparse_triton, estimate_mosaic, estimate_triton,
                                ideal_mosaic, ideal_triton, mosaic_common, table_mosaic)

IMPLEMENTATIONS = ("xla", "triton", "mosaic")
POLICIES = ("auto", "pallas")
BACKENDS = IMPLEMENTATIONS + POLICIES


@dataclasses.dataclass(frozen=True)
class Call:
  """The static facts of one op call that decide which implementations can run it (shapes, not values)."""

  dtype: jnp.dtype
  head_dim: int
  head_dim_v: int
  block_q: int
  block_k: int
  slots: int = 0  # kept blocks per query block (a mask's capacity C)
  config: Optional[StreamConfig] = None
  key_mask: bool = False  # an intervention hides keys inside kept blocks
  gate: bool = False  # an intervention weights kept blocks

  @classmethod
  def estimate(cls, q, config: StreamConfig) -> "Call":
    return cls(jnp.dtype(q.dtype), q.shape[-1], q.shape[-1], config.block_q, config.block_k,
               config.capacity, config)

  @classmethod
  def attention(cls, q, v, mask, *, key_mask: bool = False, gate: bool = False) -> "Call":
    return cls(jnp.dtype(q.dtype), q.shape[-1], v.shape[-1], mask.block_q, mask.block_k,
               mask.indices.shape[-1], mask.config, key_mask, gate)

  @classmethod
  def ideal(cls, q, config: StreamConfig, *, key_mask: bool = False) -> "Call":
    return cls(jnp.dtype(q.dtype), q.shape[-1], q.shape[-1], config.block_q, config.block_k,
               config.capacity, config, key_mask)


def _xla(call: Call) -> Optional[str]:
  del call
  return None


def _estimate_mosaic(call: Call) -> Optional[str]:
  """The search's Mosaic port, or the table's (select="table")."""
  if call.config.select == "table":
    return table_mosaic.unsupported(call)
  return estimate_mosaic.unsupported(call)


def _estimate_triton(call: Call) -> Optional[str]:
  if call.config.select == "table":
    return "the Triton estimate kernel runs the search; select='table' runs on Mosaic GPU (Hopper) or XLA"
  return estimate_triton.unsupported(call)


# Per op, its implementations in the order "pallas" / "auto" prefer them; each row's function says why it
# cannot take a call (None: it can).
TABLES: dict[str, tuple[tuple[str, Callable[[Call], Optional[str]]], ...]] = {
    "estimate_mask": (("mosaic", _estimate_mosaic), ("triton", _estimate_triton), ("xla", _xla)),
    "sparse_attention": (("mosaic", blocksparse_mosaic.unsupported), ("triton", blocksparse_triton.unsupported),
                         ("xla", _xla)),
    "ideal_mask": (("mosaic", ideal_mosaic.unsupported), ("triton", ideal_triton.unsupported), ("xla", _xla)),
}
OPS = tuple(TABLES)


@dataclasses.dataclass(frozen=True)
class Implementations:
  """The implementation each op of one layer runs: what a model's plan carries (static, hashable)."""

  estimate_mask: str = "xla"
  sparse_attention: str = "xla"
  ideal_mask: str = "xla"


def check_backend(backend: str) -> str:
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  return backend


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def may_use_kernels(backend: str) -> bool:
  """Whether `backend` can run any Pallas kernel on this device (the kernels are opaque to the SPMD
  partitioner: tensor parallelism needs "xla")."""
  check_backend(backend)
  return backend != "xla" and (backend != "auto" or on_gpu())


def why_not(op: str, name: str, call: Call) -> Optional[str]:
  """Why implementation `name` of `op` cannot run `call` on this device, or None."""
  table = dict(TABLES[op])
  if name not in table:
    return f"{op} has no {name!r} implementation (it has {', '.join(table)})"
  if name == "mosaic":
    reason = mosaic_common.no_hopper()
    if reason:
      return reason
  return table[name](call)


def choose(op: str, backend: str, call: Call) -> str:
  """The implementation of `op` that `backend` runs for `call`.

  "xla" / "triton" / "mosaic" name one implementation: it runs, or a ValueError says why it cannot.
  "pallas" runs the first kernel of the op's table that takes the call (the Mosaic port on Hopper, else
  Triton), and refuses what no kernel takes. "auto" does the same on a GPU for 16-bit inputs and falls back
  to "xla" instead of refusing (its promise is a result, not a kernel), and on Hopper it never runs a
  Triton kernel (Pallas deprecates that backend from jax 0.11): what no Mosaic port takes there (the
  oracle representative, unequal or other block sizes, head dims not a multiple of 64) runs on "xla";
  "pallas" or "triton" still run it on Triton. float32 stays on XLA, where on an H100 the kernels'
  full-precision f32 dots were 40-290x slower.
  """
  if op not in TABLES:
    raise ValueError(f"op must be one of {OPS}, got {op!r}")
  check_backend(backend)
  if backend == "xla":
    return "xla"
  if backend in IMPLEMENTATIONS:
    reason = why_not(op, backend, call)
    if reason:
      raise ValueError(f"backend={backend!r}: {reason}; use backend='xla' (or 'auto')")
    return backend
  if backend == "auto" and (not on_gpu() or call.dtype.itemsize > 2):
    return "xla"
  reason = None
  hopper = backend == "auto" and mosaic_common.no_hopper() is None
  for name, _ in TABLES[op][:-1]:  # the kernels (the last row is the reference)
    if hopper and name == "triton":
      continue
    reason = why_not(op, name, call)
    if reason is None:
      return name
  if backend == "pallas":
    raise ValueError(f"{reason}; use backend='xla' (or 'auto')")
  return "xla"


def for_layer(backend: str, *, estimate: Optional[Call], attention: Call, ideal: Optional[Call]) -> Implementations:
  """Every op's implementation for one layer of a model (None: the layer never runs that op)."""
  pick = lambda op, call: "xla" if call is None else choose(op, backend, call)  # noqa: E731
  return Implementations(estimate_mask=pick("estimate_mask", estimate),
                         sparse_attention=pick("sparse_attention", attention),
                         ideal_mask=pick("ideal_mask", ideal))
