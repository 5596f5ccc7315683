"""The shape of the code that issue 27 asked for, held by tests: one name per thing, and one explicit
implementation per op chosen once where plans are made (the choice is in the plan, so in the jit cache key).
"""

import ast
import collections
import pathlib

import jax.numpy as jnp
import pytest

import stream_jax
from stream_jax import StreamConfig
from stream_jax.kernels import implementations as impls
from stream_jax.kernels import mosaic_common
from stream_jax.kernels.implementations import Implementations
from stream_jax.models import get_config
from stream_jax.models.plans import make_plans

ROOT = pathlib.Path(stream_jax.__file__).parent
PACKAGES = [ROOT, ROOT.parent / "models"]
# Names several modules define on purpose: the implementations of an op share its entry's name and contract
# (the table in kernels/implementations.py lists them), each kernel says what it cannot take with
# `unsupported`, and a script module's entry point is `main`.
SHARED_BY_DESIGN = set(impls.OPS) | {"unsupported", "main", "mass_rows"}  # mass_rows: the block-mass kernels' contract


def _modules():
  return [p for root in PACKAGES if root.is_dir() for p in sorted(root.rglob("*.py"))]


def test_no_two_modules_share_a_name():
  seen = collections.defaultdict(list)
  for path in _modules():
    if path.name != "__init__.py":
      seen[path.name].append(str(path.relative_to(ROOT.parent)))
  assert not {k: v for k, v in seen.items() if len(v) > 1}


def test_no_public_name_is_defined_twice():
  seen = collections.defaultdict(list)
  for path in _modules():
    for node in ast.parse(path.read_text()).body:
      if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
        seen[node.name].append(str(path.relative_to(ROOT.parent)))
  twice = {k: v for k, v in seen.items() if len(v) > 1 and k not in SHARED_BY_DESIGN}
  assert not twice, f"public names defined in several modules: {twice}"


def test_op_implementations_live_in_the_kernel_folder():
  """The peers that share an op's name are its kernels, below the op entry (not a second public op)."""
  for op in impls.OPS:
    homes = [p for p in _modules() if any(isinstance(n, ast.FunctionDef) and n.name == op
                                           for n in ast.parse(p.read_text()).body)]
    outside = [str(p) for p in homes if p.parent.name != "kernels"]
    assert len(outside) <= 1, (op, outside)


def test_one_public_dense_attention_and_one_trace_save():
  from stream_jax import dense, sharding, trace_io  # pylint: disable=import-outside-toplevel
  assert stream_jax.dense_attention is dense.dense_attention
  assert not hasattr(sharding, "save_trace") and not hasattr(sharding, "load_trace")
  assert callable(trace_io.save_trace) and callable(trace_io.load_trace)


def _by_kind(plans):
  return {p.kind: p.impl for p in plans}


def test_plans_carry_the_implementation_of_every_op():
  """On this CPU: "auto" / "xla" plan the reference everywhere; "pallas" / "triton" plan the Triton kernels
  (interpreted) for pruned layers' estimate and attention and for local layers' band; an ideal config plans
  the block-mass kernel instead of the estimate."""
  config = get_config("gemma3-270m")
  xla = Implementations()
  for backend in ("xla", "auto"):
    assert set(_by_kind(make_plans(config, StreamConfig(), backend=backend)).values()) == {xla}
  for backend in ("pallas", "triton"):
    plans = _by_kind(make_plans(config, StreamConfig(), backend=backend))
    assert plans["global"] == Implementations("triton", "triton", "xla")
    assert plans["local"] == Implementations("xla", "triton", "xla")
  ideal = _by_kind(make_plans(config, StreamConfig.ideal(), backend="pallas", output="exact"))
  assert ideal["global"] == Implementations("xla", "xla", "triton")  # exact output: no sparse attention runs
  ideal_sparse = _by_kind(make_plans(config, StreamConfig.ideal(), backend="pallas"))
  assert ideal_sparse["global"] == Implementations("xla", "triton", "triton")
  assert set(_by_kind(make_plans(config, "dense", backend="pallas")).values()) == {xla}


def test_plans_differ_by_implementation_so_jit_compiles_each():
  config = get_config("gemma3-270m")
  a = make_plans(config, StreamConfig(), backend="xla")
  b = make_plans(config, StreamConfig(), backend="triton")
  assert a != b and hash(a) != hash(b)
  assert [_fields_but_impl(p) for p in a] == [_fields_but_impl(p) for p in b]


def _fields_but_impl(plan):
  return (plan.layer, plan.kind, plan.window, plan.stream, plan.dense, plan.prune, plan.dense_impl,
          plan.output, plan.coverage)


def test_plans_on_a_hopper_pick_the_mosaic_ports_for_16_bit(monkeypatch):
  monkeypatch.setattr(mosaic_common, "no_hopper", lambda: None)
  monkeypatch.setattr(impls, "on_gpu", lambda: True)
  config = get_config("gemma3-270m")
  bf16 = _by_kind(make_plans(config, StreamConfig(), backend="auto", dtype=jnp.bfloat16))
  assert bf16["global"] == Implementations("mosaic", "mosaic", "xla")
  assert bf16["local"].sparse_attention == "mosaic"
  f32 = _by_kind(make_plans(config, StreamConfig(), backend="auto", dtype=jnp.float32))
  assert f32["global"] == Implementations()  # float32 stays on XLA under "auto"
  faithful = _by_kind(make_plans(config, StreamConfig.faithful(), backend="auto", dtype=jnp.bfloat16))
  assert faithful["global"] == Implementations("mosaic", "mosaic", "xla")  # mass scores: the wide kernel
  ideal = _by_kind(make_plans(config, StreamConfig.ideal(), backend="auto", dtype=jnp.bfloat16, output="exact"))
  assert ideal["global"] == Implementations("xla", "xla", "mosaic")  # the block-mass pass: the Hopper port
  ideal32 = _by_kind(make_plans(config, StreamConfig.ideal(block_q=32, block_k=32), backend="auto",
                                dtype=jnp.bfloat16, output="exact"))
  assert ideal32["global"].ideal_mask == "mosaic"  # 32-token blocks: the same kernel, two blocks per tile
  table = _by_kind(make_plans(config, StreamConfig.table(), backend="auto", dtype=jnp.bfloat16))
  assert table["global"] == Implementations("mosaic", "mosaic", "xla")  # the table's kernel, then attention
  every = _by_kind(make_plans(config, StreamConfig.table(query_stride=1), backend="auto", dtype=jnp.bfloat16))
  assert every["global"].estimate_mask == "xla"  # no kernel tables every query (StreamConfig.ideal() does)


def test_a_backend_that_cannot_run_an_op_is_refused_when_plans_are_made():
  config = get_config("gemma3-270m")
  with pytest.raises(ValueError, match="backend='mosaic': .*GPU only"):
    make_plans(config, StreamConfig(), backend="mosaic")
  with pytest.raises(ValueError, match="backend='mosaic': .*GPU only"):
    impls.choose("ideal_mask", "mosaic", impls.Call(jnp.dtype(jnp.bfloat16), 256, 256, 64, 64))
  assert impls.why_not("ideal_mask", "cuda", impls.Call(jnp.dtype(jnp.bfloat16), 256, 256, 64, 64)) == \
      "ideal_mask has no 'cuda' implementation (it has mosaic, triton, xla)"
  with pytest.raises(ValueError, match="backend must be one of"):
    make_plans(config, StreamConfig(), backend="cuda")
