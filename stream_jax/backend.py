"""Backend switch of the op entries: the XLA reference (any device) or the Pallas GPU kernel."""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

BACKENDS = ("xla", "pallas", "auto")


def resolve_backend(backend: str, dtype=None) -> str:
  """'auto' -> 'pallas' on a GPU for 16-bit inputs (or no dtype given), else 'xla'; validates the name.

  float32 inputs stay on XLA under 'auto': the kernels' f32 dots run at full precision on CUDA cores, and
  on an H100 (T = 32k, head dim 256) that made the estimate 200-290x and the attention 40x slower than the
  XLA path. backend='pallas' still runs them (the kernels' f32 tests and checks use it).
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "auto":
    if jax.default_backend() != "gpu":
      return "xla"
    return "xla" if dtype is not None and jnp.dtype(dtype).itemsize > 2 else "pallas"
  return backend


def use_kernel(backend: str, unsupported: Callable[[], Optional[str]], dtype=None) -> bool:
  """Whether an op entry runs its Pallas kernel rather than its XLA reference.

  `unsupported()` is the kernel's reason for refusing these inputs (None: it takes them); it is a callable
  so that the reference path never asks. "pallas" refuses what the kernel cannot take (ValueError with
  the reason), "auto" falls back to the reference instead: its promise is a result, not a kernel. `dtype`
  is the inputs' (see `resolve_backend`).
  """
  if resolve_backend(backend, dtype) == "xla":
    return False
  reason = unsupported()
  if reason is None:
    return True
  if backend == "pallas":
    raise ValueError(f"{reason}; use backend='xla' (or 'auto')")
  return False
