"""Input validation shared by the public functions: each op entry (estimate_mask, sparse_attention,
dense_attention) validates here once; the XLA references and Pallas kernels below it check nothing.

Shapes are static under `jit`, so every check here runs at trace time and fails with the parameter's name
and the allowed range instead of an XLA shape error.

Why not chex at the entries: `chex.assert_rank` / `assert_equal_shape` raise AssertionError with positional
wording ("input 0 has rank 3 ... expected {4}"), while these name the argument, its layout in the einsum
letters (q [B, T, N, H]) and the rule broken (N a multiple of K, T <= S), and raise ValueError / TypeError,
which is the public contract the tests pin. The shapes are also in the entries' signatures (jaxtyping
annotations, for readers and type checkers).
"""

from __future__ import annotations

import math
import numbers
from typing import Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np


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


def per_head(name: str, x, batch: tuple, n: int, length: int, axis: str, dtype):
  """An optional per-head array [batch..., N, length] (`axis` names the last one: queries, keys) as
  `dtype`; None passes through."""
  if x is None:
    return None
  want = tuple(batch) + (n, length)
  if tuple(getattr(x, "shape", ())) != want:
    raise ValueError(f"{name} must have shape {want} ([batch,] heads, {axis}), got "
                     f"{getattr(x, 'shape', type(x).__name__)}")
  return jnp.asarray(x, dtype)


def check_positive(name: str, value: Optional[float], allow_none: bool = True) -> None:
  if value is None and allow_none:
    return
  if value is None or isinstance(value, bool) or not (value > 0 and math.isfinite(value)):
    raise ValueError(f"{name} must be a positive finite number{' or None' if allow_none else ''}, "
                     f"got {value!r}")


def check_window(window: Optional[int]) -> None:
  if window is not None and (int(window) != window or window < 1):
    raise ValueError(f"window must be None or an integer >= 1 (keys including the query), got {window!r}")


def check_chunk(q_chunk: Optional[int]) -> None:
  if q_chunk is not None and (int(q_chunk) != q_chunk or q_chunk < 1):
    raise ValueError(f"q_chunk must be None or an integer >= 1 (query blocks per step), got {q_chunk!r}")


# Sizes above this are typos (2**40-token blocks) rather than settings: refusing them early beats an XLA
# out-of-memory error minutes later.
MAX_SIZE = 1 << 20


def as_int(name: str, value, *, lo: int = 0, hi: int = MAX_SIZE, what: str = "") -> int:
  """`value` as a plain int if it is an integer (numpy integers too; never a bool or a float) in [lo, hi]."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name} must be an integer{what}, got {value!r} ({type(value).__name__})")
  value = int(value)
  if not lo <= value <= hi:
    raise ValueError(f"{name} must be an integer{what} in [{lo}, {hi}], got {value!r}")
  return value


def is_concrete(x) -> bool:
  """Whether x holds values now (not a jax Tracer under jit/vmap): value checks run only then."""
  return not isinstance(x, jax.core.Tracer)


def check_finite(name: str, x) -> None:
  """Concrete arrays only: NaN/inf inputs give masks and outputs that look normal but mean nothing."""
  if not is_concrete(x):
    return
  with jax.ensure_compile_time_eval():  # a concrete array closed over by a jitted caller: checked now
    bad = int((~jnp.isfinite(x)).sum())
  if bad:
    raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or inf); a mask or output computed from "
                     "them would look normal but mean nothing")


def check_block_ids(indices, num_k_blocks: int) -> None:
  """Concrete masks only: block ids must be -1 (empty slot) or in [0, nK); gathers would clamp others."""
  if not is_concrete(indices):
    return
  idx = np.asarray(indices)
  bad = (idx < -1) | (idx >= num_k_blocks)
  if bad.any():
    raise ValueError(f"mask.indices holds {int(bad.sum())} block id(s) outside [-1, {num_k_blocks - 1}] "
                     f"(e.g. {int(idx[bad].flat[0])}): this grid has {num_k_blocks} key blocks")


def token_ids(tokens, vocab_size: int, name: str = "tokens") -> np.ndarray | jax.Array:
  """Integer token ids in [0, vocab_size); floats and ragged batches are refused, not truncated."""
  if not hasattr(tokens, "dtype"):
    try:
      tokens = np.asarray(tokens)
    except ValueError as e:  # ragged nested lists
      raise ValueError(f"{name}: rows of a batch must have equal lengths ({e})") from None
    if tokens.dtype == object:
      raise ValueError(f"{name}: rows of a batch must have equal lengths and hold integer ids")
    if tokens.size == 0:
      tokens = tokens.astype(np.int32)
  if not jnp.issubdtype(tokens.dtype, jnp.integer) or tokens.dtype == bool:
    raise TypeError(f"{name} must be integer token ids, got dtype {tokens.dtype} (floats are not "
                    "truncated to ids)")
  if is_concrete(tokens) and tokens.size:
    with jax.ensure_compile_time_eval():  # concrete ids closed over by a jitted caller: checked now
      lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
      raise ValueError(f"{name} holds ids outside the vocabulary [0, {vocab_size - 1}] (min {lo}, max {hi})")
  return tokens


def check_spans(name: str, spans, length: int) -> np.ndarray:
  """int[M, 2] token spans [start, end) with 0 <= start < end <= length (concrete values only)."""
  if not is_concrete(spans):
    return spans
  s = np.asarray(spans)
  if s.ndim == 1 and s.shape[0] == 2:
    s = s[None]
  if s.ndim != 2 or s.shape[-1] != 2:
    raise ValueError(f"{name} must be [start, end) pairs of shape [M, 2], got shape {s.shape}")
  bad = (s[:, 0] < 0) | (s[:, 1] <= s[:, 0]) | (s[:, 1] > length)
  if bad.any():
    i = int(np.nonzero(bad)[0][0])
    raise ValueError(f"{name}[{i}] = [{s[i, 0]}, {s[i, 1]}) is not a non-empty span inside the "
                     f"{length} traced tokens (need 0 <= start < end <= {length})")
  return s


def check_index(name: str, value, size: int, what: str = "") -> int:
  """An integer index in [0, size) (numpy integers too)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) < size:
    raise ValueError(f"{name} must be an integer in [0, {size - 1}]{what}, got {value!r}")
  return int(value)


def check_params(params) -> None:
  """A parameter tree, not None or an empty dict (load_model's `model.params`)."""
  if not isinstance(params, Mapping):
    raise TypeError(f"params must be the model's parameter tree (model.params), got {type(params).__name__}")
  tree = params.get("params", params)
  if not isinstance(tree, Mapping) or "embedder" not in tree:
    got = sorted(map(str, tree))[:5] if isinstance(tree, Mapping) else repr(tree)
    raise ValueError("params is not a Gemma parameter tree (no 'embedder' entry): pass model.params, the "
                     f"tree load_model returned; got keys {got}")


def check_dense_layers(attention, dense_layers) -> None:
  """dense_layers only means something with Stream attention: with "dense" every layer is dense already."""
  if isinstance(attention, str) and attention == "dense" and len(tuple(dense_layers or ())):
    raise ValueError(f"dense_layers={tuple(dense_layers)} has no effect with attention='dense' (every layer "
                     "is dense); pass attention=StreamConfig(...) to run the other layers with Stream")


class ChoiceError(KeyError):
  """A KeyError whose message reads as written (KeyError's own str() quotes it like a key)."""

  def __str__(self) -> str:
    return str(self.args[0]) if self.args else ""


class Choices(Mapping):
  """A read-only mapping of named choices (e.g. niah.VARIANTS) whose missing key names the valid ones,
  instead of a bare KeyError('bogus')."""

  def __init__(self, name: str, items: Mapping):
    self._name, self._items = name, dict(items)

  def __getitem__(self, key):
    try:
      return self._items[key]
    except (KeyError, TypeError):
      raise ChoiceError(f"{self._name}[{key!r}]: unknown key; valid keys: {', '.join(map(repr, self._items))}"
                        ) from None

  def __iter__(self) -> Iterator:
    return iter(self._items)

  def __len__(self) -> int:
    return len(self._items)

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self._name!r}, {self._items!r})"
