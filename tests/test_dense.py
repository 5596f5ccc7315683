"""stream_jax.dense.dense_attention against a brute-force [T, S] softmax, and its memory at long T."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stream_jax.dense import dense_attention


def reference(q, k, v, q_pos, k_pos, scale, softcap=None, window=None, k_valid=None, return_p=False):
  """Brute force in float64: (out [B, T, N, Hv], lse [B, N, T][, p [B, N, T, S]]) with the full logits."""
  q, k, v = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (q, k, v))
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  x = np.einsum("btnh,bsnh->bnts", q, k) * scale
  if softcap is not None:
    x = softcap * np.tanh(x / softcap)
  qp, kp = np.asarray(q_pos)[:, None], np.asarray(k_pos)[None, :]
  vis = kp <= qp
  if window is not None:
    vis &= qp - kp < window
  vis = np.broadcast_to(vis, x.shape)
  if k_valid is not None:
    vis = vis & np.asarray(k_valid)[:, None, None, :]
  x = np.where(vis, x, -np.inf)
  lse = np.asarray(jax.nn.logsumexp(jnp.asarray(x, jnp.float32), axis=-1))
  m = np.where(vis.any(-1), x.max(-1), 0.0)[..., None]
  p = np.exp(x - m)
  denom = p.sum(-1, keepdims=True)
  p = p / np.where(denom > 0, denom, 1.0)
  out = np.einsum("bnts,bsnh->btnh", p, v)
  return (out, lse, p) if return_p else (out, lse)


def inputs(b, t, s, n, kv, h, hv, dtype, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, t, n, h)), dtype)
  k = jnp.asarray(rng.normal(size=(b, s, kv, h)), dtype)
  v = jnp.asarray(rng.normal(size=(b, s, kv, hv)), dtype)
  return q, k, v


CASES = {
    # name: (b, t, s, n, kv, h, hv, window, softcap, q offset, k_valid kind)
    "global": (2, 45, 45, 2, 2, 16, 16, None, None, 0, None),
    "window": (2, 70, 70, 4, 2, 8, 8, 16, None, 0, None),
    "softcap_gqa": (1, 37, 37, 6, 2, 16, 8, None, 2.0, 0, None),
    "window_softcap": (2, 50, 50, 4, 1, 8, 8, 9, 3.0, 0, None),
    "kv_cache": (2, 5, 64, 4, 2, 8, 8, None, None, 30, "filled"),  # positions 30..34 over a 64-slot cache
    "kv_cache_window": (1, 12, 64, 4, 2, 8, 8, 10, None, 40, "filled"),
    "k_valid_random": (2, 40, 40, 4, 2, 8, 8, None, None, 0, "random"),
    "sees_nothing": (2, 30, 30, 2, 1, 8, 8, None, None, 0, "late"),  # early rows see no key
}


BF16_CASES = ("global", "window_softcap", "kv_cache")  # bf16 inputs: f32 logits, bf16 p @ v


@pytest.mark.parametrize("case,dtype", [(c, jnp.float32) for c in CASES] +
                         [(c, jnp.bfloat16) for c in BF16_CASES])
def test_equals_brute_force(case, dtype):
  b, t, s, n, kv, h, hv, window, cap, off, valid = CASES[case]
  q, k, v = inputs(b, t, s, n, kv, h, hv, dtype)
  q_pos = off + jnp.arange(t, dtype=jnp.int32)
  k_pos = jnp.arange(s, dtype=jnp.int32)
  k_valid = None
  if valid == "filled":
    k_valid = jnp.broadcast_to(k_pos < off + t, (b, s))
  elif valid == "random":
    k_valid = jnp.asarray(np.random.default_rng(1).random((b, s)) > 0.3)
  elif valid == "late":
    k_valid = jnp.broadcast_to(k_pos >= 12, (b, s))
  want, want_lse = reference(q, k, v, q_pos, k_pos, 0.3, cap, window, k_valid)
  run = jax.jit(dense_attention, static_argnames=("scale", "softcap", "window", "return_lse", "q_chunk",
                                                  "k_chunk"))
  out, lse = run(q, k, v, q_pos=q_pos, k_pos=k_pos, scale=0.3, softcap=cap, window=window, k_valid=k_valid,
                 return_lse=True, q_chunk=8, k_chunk=16)
  assert out.shape == (b, t, n, hv) and out.dtype == dtype
  assert lse.shape == (b, n, t) and lse.dtype == jnp.float32
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=tol, rtol=tol)
  np.testing.assert_allclose(lse, want_lse, atol=1e-5 if dtype == jnp.float32 else 1e-4, rtol=1e-5)
  if valid == "late":
    assert np.all(np.isneginf(np.asarray(lse)[:, :, :12])) and not np.asarray(out)[:, :12].any()
  if dtype != jnp.float32:
    return
  # One tile (no chunking) gives the same numbers as many tiles.
  one = run(q, k, v, q_pos=q_pos, k_pos=k_pos, scale=0.3, softcap=cap, window=window, k_valid=k_valid,
            q_chunk=t, k_chunk=s)
  np.testing.assert_allclose(np.asarray(one, np.float64), np.asarray(out, np.float64), atol=tol, rtol=tol)


@pytest.mark.parametrize("case", ["softcap_gqa", "kv_cache_window", "sees_nothing"])
def test_probs_path_equals_brute_force(case):
  """return_probs=True (the T x S path): the same out and lse as the flash path, and the probabilities."""
  b, t, s, n, kv, h, hv, window, cap, off, valid = CASES[case]
  q, k, v = inputs(b, t, s, n, kv, h, hv, jnp.float32)
  q_pos = off + jnp.arange(t, dtype=jnp.int32)
  k_pos = jnp.arange(s, dtype=jnp.int32)
  k_valid = jnp.broadcast_to(k_pos < off + t if valid == "filled" else k_pos >= 12, (b, s))
  want, want_lse, want_p = reference(q, k, v, q_pos, k_pos, 0.3, cap, window, k_valid, return_p=True)
  out, lse, p = dense_attention(q, k, v, q_pos=q_pos, k_pos=k_pos, scale=0.3, softcap=cap, window=window,
                                k_valid=k_valid, return_lse=True, return_probs=True)
  assert p.shape == (b, n, t, s) and p.dtype == q.dtype
  np.testing.assert_allclose(out, want, atol=1e-5)
  np.testing.assert_allclose(lse, want_lse, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(p, want_p, atol=1e-6)
  assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(p)).all()  # rows that see nothing


def _captured_attention(q, k, v, *, scale, cap, window=None):
  """models.attention.captured_attention as it was before it called stream_jax.dense: the numerics the
  capture benchmark measured (f32 softmax, probabilities rounded to q's dtype before the PV product)."""
  b, t, n, h = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, n // kv, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  if cap is not None:
    logits = cap * jnp.tanh(logits / cap)
  pos = jnp.arange(t)
  visible = pos[None, :] <= pos[:, None]
  if window is not None:
    visible &= pos[:, None] - pos[None, :] < window
  probs = jax.nn.softmax(jnp.where(visible, logits, -1e30), axis=-1).astype(q.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(q.dtype), probs.reshape(b, n, t, t)


@pytest.mark.parametrize("dtype,cap,window", [(jnp.float32, None, None), (jnp.float32, 2.0, 9),
                                              (jnp.bfloat16, 2.0, None)])
def test_probs_path_is_the_capture(dtype, cap, window):
  q, k, v = inputs(2, 29, 29, 4, 2, 8, 8, dtype, seed=6)
  pos = jnp.arange(29)
  out, p = dense_attention(q, k, v, q_pos=pos, k_pos=pos, scale=0.3, softcap=cap, window=window,
                           return_probs=True)
  want, want_p = _captured_attention(q, k, v, scale=0.3, cap=cap, window=window)
  assert out.dtype == want.dtype and p.dtype == want_p.dtype and p.shape == want_p.shape
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(p, np.float32), np.asarray(want_p, np.float32), atol=tol)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), atol=tol)


def test_bad_shapes_fail_with_names():
  q, k, v = inputs(1, 8, 8, 2, 1, 8, 8, jnp.float32)
  pos = jnp.arange(8)
  with pytest.raises(ValueError, match="B, T, N, H"):
    dense_attention(q[0], k[0], v[0], q_pos=pos, k_pos=pos, scale=0.3)
  with pytest.raises(ValueError, match="q_pos"):
    dense_attention(q, k, v, q_pos=pos[:4], k_pos=pos, scale=0.3)
  with pytest.raises(ValueError, match="token_mask"):
    dense_attention(q, k, v, q_pos=pos, k_pos=pos, scale=0.3, token_mask=jnp.ones((2, 8, 8), bool))
  with pytest.raises(ValueError, match="scale"):
    dense_attention(q, k, v, q_pos=pos, k_pos=pos, scale=None)


def test_arbitrary_positions_visit_every_needed_chunk():
  """Unsorted key positions (the chunk-range rule must still find every visible key)."""
  q, k, v = inputs(1, 24, 40, 4, 2, 8, 8, jnp.float32, seed=3)
  rng = np.random.default_rng(4)
  k_pos = jnp.asarray(rng.permutation(40), jnp.int32)
  q_pos = jnp.asarray(rng.integers(0, 40, 24), jnp.int32)
  for window in (None, 7):
    want, want_lse = reference(q, k, v, q_pos, k_pos, 0.5, window=window)
    out, lse = jax.jit(lambda q, k, v: dense_attention(q, k, v, q_pos=q_pos, k_pos=k_pos, scale=0.5,
                                                       window=window, return_lse=True, q_chunk=8,
                                                       k_chunk=8))(q, k, v)
    np.testing.assert_allclose(out, want, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5)


@pytest.mark.parametrize("window", [None, 512])
def test_memory_is_far_below_t_by_s(window):
  """At T = S = 16k the compiled temporaries stay a few MiB, not the 1 GiB of one [T, S] f32 matrix."""
  t, n, kv, h = 16384, 4, 1, 64
  q = jax.ShapeDtypeStruct((1, t, n, h), jnp.float32)
  k = jax.ShapeDtypeStruct((1, t, kv, h), jnp.float32)

  def f(q, k, v):
    pos = jnp.arange(t, dtype=jnp.int32)
    return dense_attention(q, k, v, q_pos=pos, k_pos=pos, scale=0.125, window=window, return_lse=True)

  mem = jax.jit(f).lower(q, k, k).compile().memory_analysis()
  dense_bytes = t * t * 4
  io_bytes = 3 * t * n * h * 4
  assert mem.temp_size_in_bytes < dense_bytes / 16, mem
  assert mem.temp_size_in_bytes < io_bytes + 64 * 2 ** 20, mem
