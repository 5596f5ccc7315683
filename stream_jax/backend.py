"""Backend switch: the XLA reference (any device) or the Pallas GPU kernels."""

from __future__ import annotations

import jax

BACKENDS = ("xla", "pallas", "auto")


def resolve_backend(backend: str) -> str:
  """'auto' -> 'pallas' on a GPU, 'xla' elsewhere; validates the name."""
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  return backend
