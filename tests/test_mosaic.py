"""The Mosaic GPU ports of the two kernels (kernels/attention_mgpu.py, kernels/estimate_mgpu.py): no
interpret mode, so the CPU tests lower them for CUDA, in both lowering semantics, and check what they refuse
and when they run. Their numbers are checked on the GPU (benchmarks/gpu_checks.py: check_mgpu_attention
against the XLA reference, check_mgpu_estimate against the Triton kernel and the XLA reference)."""

import jax.numpy as jnp
import pytest

import stream_jax as sj
from stream_jax import StreamConfig as C
from stream_jax.kernels import attention_mgpu, estimate_mgpu
from stream_jax.mask import BlockMask

from cuda_lowering import lower_for_cuda, mosaic_semantics, sds as _sds

SEMANTICS = ("Lane", "Warpgroup")


@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize("dtype,h,softcap,window,stages,with_ref", [
    (jnp.bfloat16, 256, 50.0, 1024, 2, True),  # GQA, ragged T, S > T, soft-cap, window, reference lse
    (jnp.float16, 128, None, None, (3, 2), False),  # deeper key ring than value ring
])
def test_mgpu_attention_lowers_for_cuda(semantics, dtype, h, softcap, window, stages, with_ref):
  def fn(q, k, v, idx, cnt, ref):
    mask = BlockMask(idx, cnt, 64, 64, 1000, 1100)
    out, stats = attention_mgpu.sparse_attention(q, k, v, mask, softcap=softcap, window=window,
                                                 lse_ref=ref if with_ref else None, stages=stages)
    return out, stats.mass, stats.lse
  with mosaic_semantics(semantics, attention_mgpu._attention):
    text = lower_for_cuda(fn, _sds((1000, 8, h), dtype), _sds((1100, 4, h), dtype),
                          _sds((1100, 4, h), dtype), _sds((8, 16, 19), jnp.int32), _sds((8, 16), jnp.int32),
                          _sds((8, 1000), jnp.float32))
  assert "mosaic_gpu" in text


@pytest.mark.parametrize("semantics", SEMANTICS)
@pytest.mark.parametrize("lead,t,s,h,dtype,cfg,softcap", [
    ((), 1000, 1000, 128, jnp.bfloat16, C(), None),  # no search round: 16 key blocks, top_k 16
    ((), 4096, 4096, 256, jnp.bfloat16, C(), 30.0),  # soft-cap, rounds of 2 x top_k children
    ((), 3000, 3100, 64, jnp.float16, C(top_k=8, init_branches=24), None),  # wide first level, S > T
    ((2,), 2048, 2048, 128, jnp.bfloat16, C(top_k=32, sink_blocks=2, window_blocks=3), None),  # batch
    ((), 1000, 1100, 128, jnp.bfloat16, C(window_blocks=1), None),  # the per-child causal mask
])
def test_mgpu_estimate_lowers_for_cuda(semantics, lead, t, s, h, dtype, cfg, softcap):
  def fn(q, k):
    mask = estimate_mgpu.estimate_mask(q, k, cfg, softcap=softcap)
    return mask.indices, mask.counts
  with mosaic_semantics(semantics, estimate_mgpu._estimate):
    text = lower_for_cuda(fn, _sds(lead + (t, 8, h), dtype), _sds(lead + (s, 4, h), dtype))
  assert "mosaic_gpu" in text


def test_mgpu_attention_says_what_it_cannot_take_and_never_runs_off_hopper(monkeypatch):
  q, v = _sds((256, 4, 128)), _sds((256, 2, 128))
  mask = sj.window_mask(4, 256, 256, block_q=64, block_k=64)
  assert attention_mgpu.unsupported(q, v, mask) is None
  assert "float16 / bfloat16" in attention_mgpu.unsupported(_sds((256, 4, 128), jnp.float32), v, mask)
  small = sj.window_mask(4, 256, 256, block_q=32, block_k=32)
  assert "64 x 64 blocks" in attention_mgpu.unsupported(q, v, small)
  assert "head dims" in attention_mgpu.unsupported(_sds((256, 4, 96)), _sds((256, 2, 96)), mask)
  wide = sj.window_mask(4, 8192, 8192, block_q=64, block_k=64)  # every causal block: C = 128
  assert "at most 64" in attention_mgpu.unsupported(_sds((8192, 4, 128)), _sds((8192, 2, 128)), wide)
  assert not attention_mgpu.runs(q, v, mask)  # a CPU: the Triton kernel (interpreted) runs
  monkeypatch.setenv("STREAM_JAX_PALLAS_ATTENTION", "triton")
  assert not attention_mgpu.runs(q, v, mask)
  monkeypatch.setenv("STREAM_JAX_PALLAS_ATTENTION", "mosaic")
  with pytest.raises(ValueError, match="STREAM_JAX_PALLAS_ATTENTION=mosaic: .*GPU only"):
    attention_mgpu.runs(q, v, mask)
  with pytest.raises(ValueError, match="STREAM_JAX_PALLAS_ATTENTION=mosaic: .*float16 / bfloat16"):
    attention_mgpu.runs(_sds((256, 4, 128), jnp.float32), v, mask)
  monkeypatch.setenv("STREAM_JAX_PALLAS_ATTENTION", "cuda")
  with pytest.raises(ValueError, match="STREAM_JAX_PALLAS_ATTENTION must be auto .*, triton or mosaic"):
    attention_mgpu.runs(q, v, mask)


def test_mgpu_estimate_says_what_it_cannot_take_and_never_runs_off_hopper(monkeypatch):
  q = _sds((4096, 8, 128))
  assert estimate_mgpu.unsupported(q, C()) is None
  assert estimate_mgpu.unsupported(q, C(top_k=32, init_branches=64)) is None
  for bad, why in [(_sds((4096, 8, 128), jnp.float32), "float16 / bfloat16"), (_sds((4096, 8, 96)), "head dim")]:
    assert why in estimate_mgpu.unsupported(bad, C())
  for cfg, why in [(C(block_q=32, block_k=32), "64 x 64 blocks"), (C(query_stride=2), "query_stride 1"),
                   (C(representative="first"), "center representatives"),
                   (C(coverage=0.9, top_k=32), "max logit"), (C(top_k=33), "top_k <= 32"),
                   (C(top_k=16, init_branches=80), "branches <= 64")]:
    assert why in estimate_mgpu.unsupported(q, cfg), cfg
  k = jnp.zeros((4096, 4, 128), jnp.bfloat16)
  qa = jnp.zeros((4096, 8, 128), jnp.bfloat16)
  assert not estimate_mgpu.runs(q, C())  # a CPU: the Triton kernel (interpreted) runs
  monkeypatch.setenv("STREAM_JAX_PALLAS_ESTIMATE", "triton")
  assert not estimate_mgpu.runs(q, C())
  monkeypatch.setenv("STREAM_JAX_PALLAS_ESTIMATE", "mosaic")
  with pytest.raises(ValueError, match="STREAM_JAX_PALLAS_ESTIMATE=mosaic: .*GPU only"):
    estimate_mgpu.runs(q, C())
  with pytest.raises(ValueError, match="STREAM_JAX_PALLAS_ESTIMATE=mosaic: .*top_k <= 32"):
    sj.estimate_mask(qa, k, C(top_k=40), backend="pallas")  # the public entry asks the same switch
  monkeypatch.setenv("STREAM_JAX_PALLAS_ESTIMATE", "on")
  with pytest.raises(ValueError, match="STREAM_JAX_PALLAS_ESTIMATE must be auto .*, triton or mosaic"):
    estimate_mgpu.runs(q, C())


def test_auto_runs_each_port_on_hopper_for_what_it_takes(monkeypatch):
  """On a (simulated) Hopper GPU both ports run for every input they take (each was faster than its Triton
  peer on every shape measured); what they cannot take stays on Triton, and =triton keeps Triton."""
  from stream_jax.kernels import mosaic
  monkeypatch.setattr(mosaic, "no_hopper", lambda: None)
  mask = sj.window_mask(4, 256, 256, block_q=64, block_k=64)
  for h in (128, 256):
    assert attention_mgpu.runs(_sds((256, 4, h)), _sds((256, 2, h)), mask)
    assert estimate_mgpu.runs(_sds((4096, 8, h)), C())
  assert not estimate_mgpu.runs(_sds((4096, 8, 256), jnp.float32), C())
  assert not estimate_mgpu.runs(_sds((4096, 8, 128)), C(block_q=32, block_k=32))
  monkeypatch.setenv("STREAM_JAX_PALLAS_ESTIMATE", "triton")
  assert not estimate_mgpu.runs(_sds((4096, 8, 256)), C())
