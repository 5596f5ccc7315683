"""Input validation shared by the public functions.

Shapes are static under `jit`, so every check here runs at trace time and fails with the parameter's name
and the allowed range instead of an XLA shape error.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp


def check_float(name: str, x) -> None:
  dtype = getattr(x, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating-point array (bf16, f16 or f32), got dtype {dtype}")


def check_qkv(q, k, v=None) -> tuple[int, int, int, int, int]:
  """Validates q [..., T, N, H], k [..., S, K, H] (and v [..., S, K, Hv]); returns (T, S, N, K, H)."""
  check_float("q", q)
  check_float("k", k)
  if q.ndim not in (3, 4):
    raise ValueError(f"q must have shape [T, N, H] or [B, T, N, H], got rank {q.ndim} shape {q.shape}")
  if k.ndim != q.ndim:
    raise ValueError(f"k must have the same rank as q ({q.ndim}: [..., S, K, H]), got shape {k.shape}")
  if q.ndim == 4 and q.shape[0] != k.shape[0]:
    raise ValueError(f"q and k batch sizes differ: {q.shape[0]} vs {k.shape[0]}")
  t, n, h = q.shape[-3:]
  s, kv, hk = k.shape[-3:]
  if h != hk:
    raise ValueError(f"q and k head dims differ: q has H={h}, k has H={hk}")
  if kv < 1 or n % kv:
    raise ValueError(f"query heads N={n} must be a multiple of kv heads K={kv} (grouped-query attention)")
  if t < 1 or s < 1:
    raise ValueError(f"q and k need at least one position, got T={t}, S={s}")
  if t > s:
    raise ValueError(f"T={t} > S={s}: queries are the last T of the S key positions, so T must be <= S")
  if v is not None:
    check_float("v", v)
    if v.ndim != k.ndim or v.shape[:-1] != k.shape[:-1]:
      raise ValueError(f"v must have shape [..., S, K, Hv] matching k {k.shape[:-1]}, got {v.shape}")
  return t, s, n, kv, h


def check_positive(name: str, value: Optional[float], allow_none: bool = True) -> None:
  if value is None and allow_none:
    return
  if value is None or not value > 0:
    raise ValueError(f"{name} must be a positive number{' or None' if allow_none else ''}, got {value!r}")


def check_window(window: Optional[int]) -> None:
  if window is not None and (int(window) != window or window < 1):
    raise ValueError(f"window must be None or an integer >= 1 (keys including the query), got {window!r}")


def check_chunk(q_chunk: Optional[int]) -> None:
  if q_chunk is not None and (int(q_chunk) != q_chunk or q_chunk < 1):
    raise ValueError(f"q_chunk must be None or an integer >= 1 (query blocks per step), got {q_chunk!r}")
