"""Backend switch of the op entries: the XLA reference (any device) or the Pallas GPU kernel."""

from __future__ import annotations

from typing import Callable, Optional

import jax

BACKENDS = ("xla", "pallas", "auto")


def resolve_backend(backend: str) -> str:
  """'auto' -> 'pallas' on a GPU, 'xla' elsewhere; validates the name."""
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  return backend


def use_kernel(backend: str, unsupported: Callable[[], Optional[str]]) -> bool:
  """Whether an op entry runs its Pallas kernel rather than its XLA reference.

  `unsupported()` is the kernel's reason for refusing these inputs (None: it takes them); it is a callable
  so that the reference path never asks. "pallas" refuses what the kernel cannot take (ValueError with
  the reason), "auto" falls back to the reference instead: its promise is a result, not a kernel.
  """
  if resolve_backend(backend) == "xla":
    return False
  reason = unsupported()
  if reason is None:
    return True
  if backend == "pallas":
    raise ValueError(f"{reason}; use backend='xla' (or 'auto')")
  return False
