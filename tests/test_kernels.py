"""Pallas kernels against the XLA reference (interpret mode on CPU), and their GPU lowering.

Estimation is compared bit for bit. The inputs are small integers, so every logit is exact in f32 whatever
the dot's accumulation order and both implementations see identical scores, including many exact ties:
that also checks the tie rule (equal scores -> earlier position). Attention is compared within fp32
tolerance. The lowering check runs the real Triton lowering for CUDA on the CPU, which catches
primitives Triton cannot lower (top_k, sort, value slicing) without a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stream_jax as sj
from stream_jax.kernels import blocksparse_triton as kattention
from stream_jax.kernels import estimate_triton as kestimate
from stream_jax.mask import BlockMask

from cuda_lowering import lower_for_cuda, sds as _sds


def _int_qkv(seed, t, s, n, kv, h, hv=None, batch=None, dtype=jnp.float32, lim=3):
  rng = np.random.default_rng(seed)
  pre = (batch,) if batch else ()
  q = jnp.asarray(rng.integers(-lim, lim + 1, pre + (t, n, h)), dtype)
  k = jnp.asarray(rng.integers(-lim, lim + 1, pre + (s, kv, h)), dtype)
  v = jnp.asarray(rng.standard_normal(pre + (s, kv, hv or h)), dtype)
  return q, k, v


def _normal_qkv(seed, t, s, n, kv, h, hv=None, batch=None, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  pre = (batch,) if batch else ()
  return tuple(jnp.asarray(rng.standard_normal(pre + shape), dtype)
               for shape in ((t, n, h), (s, kv, h), (s, kv, hv or h)))


def _assert_same_mask(ref, got):
  assert got.indices.shape == ref.indices.shape and got.indices.dtype == jnp.int32
  assert got.counts.shape == ref.counts.shape and got.counts.dtype == jnp.int32
  ri, gi = np.asarray(ref.indices), np.asarray(got.indices)
  bad = np.argwhere((ri != gi).any(-1))
  assert bad.size == 0, (f"{len(bad)} rows differ, first at {tuple(bad[0])}: "
                         f"ref {ri[tuple(bad[0])]} got {gi[tuple(bad[0])]}")
  np.testing.assert_array_equal(np.asarray(ref.counts), np.asarray(got.counts))
  assert (got.block_q, got.block_k, got.q_len, got.k_len) == (ref.block_q, ref.block_k, ref.q_len,
                                                              ref.k_len)


C = sj.StreamConfig
# (T, S, N, K, H, batch, config, softcap, scale): ragged T and S, GQA, several block sizes and knobs.
ESTIMATE_CASES = [
    (1000, 1100, 4, 2, 32, None, C(block_q=32, block_k=16, top_k=4), None, None),
    (777, 777, 2, 1, 16, None, C(block_q=16, block_k=32, top_k=3, sink_blocks=0, window_blocks=1),
     None, None),
    (640, 900, 4, 4, 24, 2, C(block_q=64, block_k=16, top_k=5, init_branches=7, window_blocks=3),
     30.0, 0.25),
    (1200, 1200, 4, 1, 32, None, C(block_q=32, block_k=32, top_k=2, representative="first"), None,
     None),
    (900, 1000, 2, 2, 32, None, C(block_q=32, block_k=16, top_k=4, representative="first",
                                  init_branches=6, sink_blocks=2), 5.0, None),
    (700, 700, 2, 1, 32, None, C(block_q=32, block_k=16, top_k=4, representative="oracle"), None,
     None),
    (1000, 1000, 4, 2, 32, None, C(block_q=64, block_k=16, top_k=4, query_stride=2), None, None),
    (800, 850, 2, 1, 32, None, C(block_q=32, block_k=16, top_k=3, query_stride=8), 2.0, None),
]


@pytest.mark.parametrize("t,s,n,kv,h,batch,cfg,softcap,scale", ESTIMATE_CASES)
def test_estimate_matches_reference(t, s, n, kv, h, batch, cfg, softcap, scale):
  q, k, _ = _int_qkv(hash((t, s, n)) % 1000, t, s, n, kv, h, batch=batch)
  ref = sj.estimate_mask(q, k, cfg, scale=scale, softcap=softcap)
  got = kestimate.estimate_mask(q, k, cfg, scale=scale, softcap=softcap, interpret=True)
  _assert_same_mask(ref, got)
  assert got.config == cfg


# Mass scores and coverage budgets (the kernel shares kernels/shares.py with the reference). Sharp logits
# (scale 0.5-1 on integer inputs) so the budget keeps fewer blocks than it may in most rows.
MASS_CASES = [
    (520, 560, 2, 1, 32, None, C(block_q=32, block_k=16, top_k=6, coverage=0.6), None, 0.5),
    (520, 560, 2, 1, 32, None, C(block_q=32, block_k=16, top_k=6, coverage=0.6, dropped_scale=2.5), None, 0.5),
    (500, 540, 2, 2, 16, 2, C(block_q=32, block_k=16, top_k=4, representative="first", init_branches=6,
                              coverage=0.15), 5.0, 1.0),
    (400, 400, 2, 1, 16, None, C(block_q=16, block_k=32, top_k=3, sink_blocks=0, window_blocks=1,
                                 score="mass"), 30.0, None),
    pytest.param(640, 640, 2, 1, 24, None, C(block_q=64, block_k=16, top_k=5, query_stride=4, init_branches=7,
                                             window_blocks=3, coverage=0.9), None, 0.4, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("t,s,n,kv,h,batch,cfg,softcap,scale", MASS_CASES)
def test_estimate_mass_scores_and_coverage_match_reference(t, s, n, kv, h, batch, cfg, softcap, scale):
  q, k, _ = _int_qkv(t + s + n, t, s, n, kv, h, batch=batch)
  ref = sj.estimate_mask(q, k, cfg, scale=scale, softcap=softcap)
  got = kestimate.estimate_mask(q, k, cfg, scale=scale, softcap=softcap, interpret=True)
  _assert_same_mask(ref, got)
  if cfg.adaptive:  # the budget is exercised: it keeps fewer than the capacity in many rows
    assert (np.asarray(ref.counts) < cfg.capacity).mean() > 0.3


def test_estimate_matches_reference_bf16_and_normal_inputs():
  cfg = C(block_q=32, block_k=16, top_k=4)
  q, k, _ = _int_qkv(5, 600, 640, 2, 1, 64, dtype=jnp.bfloat16, lim=8)
  _assert_same_mask(sj.estimate_mask(q, k, cfg), kestimate.estimate_mask(q, k, cfg, interpret=True))
  # Real-valued f32: on the CPU both sides compute the same dots, so the masks agree too.
  q, k, _ = _normal_qkv(6, 600, 640, 2, 1, 64)
  _assert_same_mask(sj.estimate_mask(q, k, cfg), kestimate.estimate_mask(q, k, cfg, interpret=True))


def test_estimate_backend_switch_uses_kernel():
  cfg = C(block_q=32, block_k=16, top_k=4)
  q, k, _ = _int_qkv(7, 300, 300, 2, 1, 16)
  got = sj.estimate_mask(q, k, cfg, backend="pallas")  # interpret mode off the GPU
  _assert_same_mask(sj.estimate_mask(q, k, cfg, backend="xla"), got)


def _close(a, b, tol):
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol)


# (T, S, N, K, H, Hv, batch, block_q, block_k, top_k, softcap, window)
ATTENTION_CASES = [
    (1000, 1100, 4, 2, 32, 48, None, 32, 16, 4, None, None),
    (777, 900, 2, 1, 16, 16, 2, 16, 32, 3, 20.0, None),
    (640, 640, 4, 4, 32, 32, None, 64, 16, 5, None, 100),
    (500, 700, 2, 1, 24, 40, None, 32, 32, 2, 10.0, 33),
]


@pytest.mark.parametrize("t,s,n,kv,h,hv,batch,bq,bk,top_k,softcap,window", ATTENTION_CASES)
def test_attention_matches_reference(t, s, n, kv, h, hv, batch, bq, bk, top_k, softcap, window):
  q, k, v = _normal_qkv(t + s, t, s, n, kv, h, hv, batch)
  mask = sj.estimate_mask(q, k, C(block_q=bq, block_k=bk, top_k=top_k))
  ro, rs = sj.sparse_attention(q, k, v, mask, softcap=softcap, window=window)
  go, gs = kattention.sparse_attention(q, k, v, mask, softcap=softcap, window=window, interpret=True)
  assert go.shape == ro.shape and go.dtype == ro.dtype
  assert gs.mass.shape == rs.mass.shape and gs.lse.shape == rs.lse.shape
  _close(go, ro, 1e-5)
  _close(gs.mass, rs.mass, 1e-5)
  np.testing.assert_array_equal(np.isneginf(np.asarray(gs.lse)), np.isneginf(np.asarray(rs.lse)))
  finite = np.isfinite(np.asarray(rs.lse))
  _close(np.asarray(gs.lse)[finite], np.asarray(rs.lse)[finite], 1e-5)
  # Without a window every query sees the sink block, so a mass row sums to the block's valid queries
  # (with a window, queries whose window misses every kept block see nothing and add 0).
  n_valid = np.broadcast_to(np.minimum(bq, t - bq * np.arange(mask.num_q_blocks)), gs.mass.shape[:-1])
  row_sums = np.asarray(gs.mass).sum(-1)
  if window is None:
    np.testing.assert_allclose(row_sums, n_valid, rtol=1e-5)
  else:
    assert (row_sums <= n_valid + 1e-3).all()


@pytest.mark.parametrize("case", [0, 1, 3])
def test_attention_second_pass_mass_matches_reference(case):
  """Block mass from the second pass (taken when `fuses_mass` says no) equals the reference, with
  and without a reference normaliser; the output and lse come from the same flash loop."""
  t, s, n, kv, h, hv, batch, bq, bk, top_k, softcap, window = ATTENTION_CASES[case]
  q, k, v = _normal_qkv(t + s + 7, t, s, n, kv, h, hv, batch)
  mask = sj.estimate_mask(q, k, C(block_q=bq, block_k=bk, top_k=top_k))
  ro, rs = sj.sparse_attention(q, k, v, mask, softcap=softcap, window=window)
  go, gs = kattention.sparse_attention(q, k, v, mask, softcap=softcap, window=window, interpret=True,
                                       fused_mass=False)
  _close(go, ro, 1e-5)
  _close(gs.mass, rs.mass, 1e-5)
  np.testing.assert_array_equal(np.asarray(gs.lse), np.asarray(
      kattention.sparse_attention(q, k, v, mask, softcap=softcap, window=window, interpret=True)[1].lse))
  # under a reference normaliser (above the kept one; -inf rows get no mass; NaN rows use the kept one)
  ref = np.asarray(rs.lse) + np.random.default_rng(case).uniform(0, 1, rs.lse.shape)
  ref[..., 0, :5] = -np.inf
  ref[..., -1, -5:] = np.nan
  _, a = sj.sparse_attention(q, k, v, mask, softcap=softcap, window=window, lse_ref=ref)
  _, b = kattention.sparse_attention(q, k, v, mask, softcap=softcap, window=window, interpret=True,
                                     lse_ref=ref, fused_mass=False)
  np.testing.assert_allclose(np.asarray(b.mass), np.asarray(a.mass), rtol=1e-5, atol=1e-6)


def test_attention_full_mask_equals_dense_and_bf16():
  q, k, v = _normal_qkv(3, 300, 300, 2, 1, 32)
  mask = sj.window_mask(2, 300, 300, block_q=32, block_k=16)  # every causal block
  out, _ = kattention.sparse_attention(q, k, v, mask, interpret=True)
  _close(out, sj.reference_attention(q, k, v), 1e-5)
  # Local layer: exact sliding window through the window's block cover.
  local = sj.window_mask(2, 300, 300, block_q=32, block_k=16, window=40)
  out, _ = kattention.sparse_attention(q, k, v, local, window=40, interpret=True)
  _close(out, sj.reference_attention(q, k, v, window=40), 1e-5)
  # bf16 inputs: p is rounded to bf16 before the PV product (flash-style), the reference keeps f32.
  qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
  mask = sj.estimate_mask(qb, kb, C(block_q=32, block_k=16, top_k=4))
  ro, rs = sj.sparse_attention(qb, kb, vb, mask)
  go, gs = kattention.sparse_attention(qb, kb, vb, mask, interpret=True)
  _close(go, ro, 2e-2)
  _close(gs.mass, rs.mass, 1e-3)


def test_attention_backend_switch_uses_kernel():
  q, k, v = _normal_qkv(4, 200, 260, 2, 1, 16)
  mask = sj.estimate_mask(q, k, C(block_q=16, block_k=16, top_k=2))
  ro, rs = sj.sparse_attention(q, k, v, mask, backend="xla")
  go, gs = sj.sparse_attention(q, k, v, mask, backend="pallas")
  _close(go, ro, 1e-5)
  _close(gs.mass, rs.mass, 1e-5)


def test_unsupported_block_sizes_are_refused_by_pallas_and_fall_back_with_auto():
  """The op entry asks the kernel (`unsupported`): backend="pallas" refuses, "auto" runs the reference."""
  q, k, v = _normal_qkv(0, 64, 64, 1, 1, 16)
  cfg = C(block_q=16, block_k=8, top_k=2)
  with pytest.raises(ValueError, match="block_k >= 16"):
    sj.estimate_mask(q, k, cfg, backend="pallas")
  _assert_same_mask(sj.estimate_mask(q, k, cfg, backend="auto"), sj.estimate_mask(q, k, cfg))
  mask = sj.window_mask(1, 64, 64, block_q=8, block_k=16)
  with pytest.raises(ValueError, match="block_q, block_k >= 16"):
    sj.sparse_attention(q, k, v, mask, backend="pallas")
  _close(sj.sparse_attention(q, k, v, mask, backend="auto")[0], sj.sparse_attention(q, k, v, mask)[0], 0)


# ---- the real GPU (Triton) lowering, on the CPU ----

@pytest.mark.parametrize("cfg,softcap", [
    (C(), None),  # Gemma-like defaults: 64 x 64 blocks, top_k 16
    (C(block_q=128, block_k=32, top_k=12, init_branches=24, representative="first"), 50.0),
    (C(block_q=64, block_k=64, top_k=8, representative="oracle", query_stride=8), None),
    (C(block_q=64, block_k=64, top_k=16, query_stride=4), None),
    (C.faithful(), None),  # mass scores, coverage budget, 128 slots
    (C(top_k=8, init_branches=16, representative="first", coverage=0.9, query_stride=2), 30.0),
])
def test_estimate_lowers_for_cuda(cfg, softcap):
  def fn(q, k):
    m = kestimate.estimate_mask(q, k, cfg, softcap=softcap, interpret=False)
    return m.indices, m.counts
  text = lower_for_cuda(fn, _sds((2, 1000, 8, 256)), _sds((2, 1100, 4, 256)))
  assert "triton" in text


@pytest.mark.parametrize("dtype,softcap,window", [(jnp.bfloat16, None, None),
                                                  (jnp.bfloat16, 50.0, 1024),
                                                  (jnp.float32, None, None)])
def test_attention_lowers_for_cuda(dtype, softcap, window):
  def fn(q, k, v, idx, cnt):
    mask = BlockMask(idx, cnt, 64, 64, 1000, 1100)
    out, stats = kattention.sparse_attention(q, k, v, mask, softcap=softcap, window=window,
                                             interpret=False)
    return out, stats.mass, stats.lse
  text = lower_for_cuda(fn, _sds((1000, 8, 256), dtype), _sds((1100, 4, 256), dtype),
                        _sds((1100, 4, 256), dtype), _sds((8, 16, 19), jnp.int32),
                        _sds((8, 16), jnp.int32))
  assert "triton" in text


@pytest.mark.parametrize("slots,hv,second_pass", [(19, 256, False), (128, 256, False), (129, 256, True),
                                                  (256, 128, False), (257, 128, True), (512, 64, True)])
def test_attention_lowering_takes_the_second_mass_pass_above_the_register_budget(slots, hv, second_pass):
  """Dense-density masks (many kept slots) lower to flash attention plus a mass kernel, Stream masks to one
  fused kernel: the fused accumulator is block_q x C registers next to the block_q x Hv output, updated
  every step (it spilled at C = 512: 12-14x slower on an H100)."""
  def fn(q, k, v, idx, cnt):
    mask = BlockMask(idx, cnt, 64, 64, 1000, 1100)
    out, stats = kattention.sparse_attention(q, k, v, mask, interpret=False)
    return out, stats.mass
  text = lower_for_cuda(fn, _sds((1000, 8, 256)), _sds((1100, 4, 256)), _sds((1100, 4, hv)),
                        _sds((8, 16, slots), jnp.int32), _sds((8, 16), jnp.int32))
  assert ("stream_sparse_attention_mass" in text) == second_pass
  assert kattention.fuses_mass(64, slots, hv) != second_pass


@pytest.mark.parametrize("dtype,stages", [(jnp.float32, 1), (jnp.bfloat16, 3)])
def test_attention_lowering_picks_stages_by_dtype(dtype, stages):
  """float32 tiles are twice as large: three pipeline stages of f32 64 x 256 key and value tiles exceed the
  H100's shared memory (the GPU failed with "Shared memory size limit exceeded"), so f32 lowers with one."""
  def fn(q, k, v, idx, cnt, ref):
    mask = BlockMask(idx, cnt, 64, 64, 1000, 1100)
    out, stats = kattention.sparse_attention(q, k, v, mask, interpret=False, lse_ref=ref)
    return out, stats.mass
  text = lower_for_cuda(fn, _sds((1000, 8, 256), dtype), _sds((1100, 4, 256), dtype),
                        _sds((1100, 4, 256), dtype), _sds((8, 16, 19), jnp.int32), _sds((8, 16), jnp.int32),
                        _sds((8, 1000), jnp.float32))
  assert f"num_stages = {stages} " in text


def test_estimate_lowers_for_cuda_in_float32():
  def fn(q, k):
    m = kestimate.estimate_mask(q, k, C(), interpret=False)
    return m.indices, m.counts
  text = lower_for_cuda(fn, _sds((1000, 8, 256), jnp.float32), _sds((1100, 4, 256), jnp.float32))
  assert "num_stages = 1 " in text


def test_attention_kernel_lse_ref_matches_reference():
  """Mass under a reference normaliser (an exact trace's dense log-sum-exp) from the kernel in interpret
  mode equals the XLA reference's."""
  rng = np.random.default_rng(3)
  t, n, kv, h = 200, 4, 2, 32
  q, k, v = (jnp.asarray(rng.normal(size=(t, x, h)), jnp.float32) for x in (n, kv, kv))
  mask = sj.estimate_mask(q, k, C(block_q=32, block_k=32, top_k=2, window_blocks=1))
  # a normaliser at least the full softmax's (as a dense log-sum-exp is): the dense one plus noise >= 0
  kk = jnp.repeat(k, n // kv, axis=1)
  logits = jnp.einsum("tnh,snh->nts", q, kk) * h ** -0.5
  causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
  ref = jax.nn.logsumexp(jnp.where(causal, logits, -jnp.inf), -1) + jnp.asarray(rng.uniform(0, 1, (n, t)),
                                                                                 jnp.float32)
  _, a = sj.sparse_attention(q, k, v, mask, lse_ref=ref)
  _, b = kattention.sparse_attention(q, k, v, mask, interpret=True, lse_ref=ref)
  np.testing.assert_allclose(np.asarray(b.mass), np.asarray(a.mass), rtol=1e-5, atol=1e-6)


def test_auto_keeps_float32_on_xla_on_a_gpu(monkeypatch):
  """On a GPU "auto" runs the kernels for 16-bit inputs only: their float32 dots run at full precision on
  CUDA cores, 200-290x (estimate) and 40x (attention) slower than the XLA path at T = 32k on an H100."""
  from stream_jax.kernels import implementations as impls  # pylint: disable=import-outside-toplevel
  from stream_jax.kernels.implementations import Call  # pylint: disable=import-outside-toplevel
  call = lambda dtype, cfg=C(block_q=32, block_k=32): Call.estimate(  # noqa: E731
      jax.ShapeDtypeStruct((512, 4, 64), dtype), cfg)
  monkeypatch.setattr(impls, "on_gpu", lambda: True)  # (not Hopper: no_hopper still says CPU)
  assert impls.choose("estimate_mask", "auto", call(jnp.bfloat16)) == "triton"
  assert impls.choose("estimate_mask", "auto", call(jnp.float16)) == "triton"
  assert impls.choose("estimate_mask", "auto", call(jnp.float32)) == "xla"
  assert impls.choose("estimate_mask", "pallas", call(jnp.float32)) == "triton"  # asked for explicitly: it runs
  oracle = C(block_q=32, block_k=32, score="mass", representative="oracle", top_k=4)
  assert impls.choose("estimate_mask", "auto", call(jnp.bfloat16, oracle)) == "xla"  # no kernel takes it
  with pytest.raises(ValueError, match="oracle.*use backend='xla'"):
    impls.choose("estimate_mask", "pallas", call(jnp.float32, oracle))
  monkeypatch.setattr(impls, "on_gpu", lambda: False)
  assert impls.choose("estimate_mask", "auto", call(jnp.bfloat16)) == "xla"
  with pytest.raises(ValueError, match="backend must be one of"):
    impls.choose("estimate_mask", "cuda", call(jnp.bfloat16))

