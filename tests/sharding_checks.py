"""Sharded forward == one-device forward, on 4 fake CPU devices; run by test_sharding.py in a subprocess
(XLA_FLAGS must be set before jax initialises, so these cannot run inside the pytest process).

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/sharding_checks.py
"""

import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from stream_jax import StreamConfig, sharding
from stream_jax.models import GemmaConfig, forward, init_params

# 2 layers (a local and a global one), 4 query heads over 2 KV heads: model=4 splits N but not K.
CONFIG = GemmaConfig(family="gemma3", vocab_size=97, num_layers=2, embed_dim=32, hidden_dim=64, num_heads=4,
                     num_kv_heads=2, head_dim=24, query_pre_attn_scalar=20.0, sliding_window=16,
                     layer_kinds=("local", "global"), rope_global_scale=8.0, name="tiny")
STREAM = StreamConfig(block_q=8, block_k=8, top_k=2, sink_blocks=1, window_blocks=1)
# (data, model) meshes per output kind: every mesh on the Stream path, and each mesh at least twice.
MESHES = {"dense": ((2, 2), (4, 1)), "sparse": ((2, 2), (4, 1), (1, 4)), "exact": ((4, 1), (1, 4))}


def leaves(tree):
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def check_equal(ref, out, what: str):
  """Logits allclose (1e-5 relative to their scale), masks equal, mass / coverage equal up to f32
  rounding (the all-reduces of model > 1 sum in another order, and XLA:CPU's dots round differently for
  another batch size)."""
  scale = float(np.abs(np.asarray(ref.logits)).max())
  np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), rtol=0, atol=1e-5 * max(scale, 1.0),
                             err_msg=what)
  if ref.trace is None:
    assert out.trace is None, what
    return
  assert jax.tree_util.tree_structure(ref.trace) == jax.tree_util.tree_structure(out.trace), what
  a, b = leaves(ref.trace), leaves(out.trace)
  for k in a:
    if "indices" in k or "counts" in k:
      np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]), err_msg=f"{what} {k}")
    else:
      np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a[k]), rtol=0, atol=1e-5, err_msg=f"{what} {k}")


def check_sharded(out, mesh, what: str):
  data, model = sharding.axis_sizes(mesh)
  assert out.logits.sharding.is_equivalent_to(sharding.batch_sharding(mesh), out.logits.ndim), what
  if out.trace is None:
    return
  for k, x in leaves(out.trace).items():
    assert x.sharding.is_equivalent_to(sharding.trace_sharding(mesh), x.ndim), f"{what} {k}: {x.sharding}"
    shard = x.addressable_shards[0].data.shape
    assert shard[:2] == (x.shape[0] // data, x.shape[1] // model), f"{what} {k}: shard {shard} of {x.shape}"


def forwards(params, tokens):
  for name, kw in (("dense", {}), ("sparse", dict(attention=STREAM)),
                   ("exact", dict(attention=STREAM, output="exact"))):
    ref = forward(CONFIG, params, tokens, **kw)
    for data, model in MESHES[name]:
      mesh = sharding.make_mesh(data=data, model=model)
      out = sharding.sharded_forward(CONFIG, params, tokens, mesh, **kw)
      what = f"{name} data={data} model={model}"
      check_equal(ref, out, what)
      check_sharded(out, mesh, what)
      print("ok", what, flush=True)
  return out, mesh


def pallas(params, tokens):
  """backend='pallas' runs under shard_map over 'data' (interpret mode on CPU); model > 1 is refused."""
  cfg = StreamConfig(block_q=16, block_k=16, top_k=2, sink_blocks=1, window_blocks=1)
  ref = forward(CONFIG, params, tokens, attention=cfg, backend="pallas")
  mesh = sharding.make_mesh(data=4)
  out = sharding.sharded_forward(CONFIG, params, tokens, mesh, attention=cfg, backend="pallas")
  check_equal(ref, out, "pallas data=4")
  check_sharded(out, mesh, "pallas data=4")
  expect_error(lambda: sharding.sharded_forward(CONFIG, params, tokens, sharding.make_mesh(data=2, model=2),
                                                attention=cfg, backend="pallas"), "backend='pallas'", "model=2")
  print("ok pallas data=4 (shard_map)", flush=True)


def orbax_roundtrip(trace, mesh):
  """A sharded exact trace (with coverage) is written shard by shard and restored into the same shards."""
  from stream_jax.report import load_trace as load_one_host
  with tempfile.TemporaryDirectory() as tmp:
    sharding.save_trace(tmp, trace)
    back = sharding.load_trace(tmp, mesh)
    a, b = leaves(trace), leaves(back)
    assert a.keys() == b.keys() and any("coverage" in k for k in a), sorted(b)
    for k in a:
      np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]), err_msg=k)
      assert b[k].sharding.is_equivalent_to(a[k].sharding, a[k].ndim), (k, b[k].sharding, a[k].sharding)
    assert [(l.layer, l.kind, l.mode, l.window, l.mask.q_len, l.mask.config) for l in back.layers] == \
        [(l.layer, l.kind, l.mode, l.window, l.mask.q_len, l.mask.config) for l in trace.layers]
    square = sharding.make_mesh(data=2, model=2)
    other = sharding.load_trace(tmp, square)  # restored straight into another mesh's shards
    assert other.layers[1].mass.sharding.is_equivalent_to(sharding.trace_sharding(square), 4)
    np.testing.assert_array_equal(np.asarray(other.layers[1].mass), np.asarray(trace.layers[1].mass))
    one = load_one_host(tmp)  # the same folder format as trace_io.save_trace
    np.testing.assert_array_equal(np.asarray(one.layers[1].mass), np.asarray(trace.layers[1].mass))
  print("ok orbax round-trip", flush=True)


def expect_error(fn, *words, kind=ValueError):
  try:
    fn()
  except kind as e:
    for w in words:
      assert w in str(e), f"{w!r} not in: {e}"
    return
  raise AssertionError(f"no {kind.__name__} mentioning {words}")


def bad_meshes(params, tokens):
  expect_error(lambda: sharding.make_mesh(data=4, model=2), "data=4 x model=2", "8 devices", "only 4",
               "data * model <= 4")
  expect_error(lambda: sharding.make_mesh(data=2, devices=jax.devices()[:1]), "one cpu device",
               "nothing to shard", sharding.FORCE_DEVICES_FLAG)
  expect_error(lambda: sharding.make_mesh(model=3), "model=3", "allowed model values: [1, 2, 4]")
  expect_error(lambda: sharding.make_mesh(data=0), "data must be a positive integer")
  expect_error(lambda: sharding.make_mesh(model=1.5), "model must be a positive integer")
  expect_error(lambda: sharding.sharded_forward(CONFIG, params, tokens[:3], sharding.make_mesh(data=2, model=1)),
               "data=2", "batch B=3", "[1, 3]")
  wide = GemmaConfig(**{**CONFIG.__dict__, "num_heads": 6, "num_kv_heads": 3, "name": "six-heads"})
  expect_error(lambda: sharding.check_mesh(wide, sharding.make_mesh(data=1, model=4)), "model=4",
               "num_heads=6", "allowed model values: [1, 2]")
  narrow = GemmaConfig(**{**CONFIG.__dict__, "hidden_dim": 66, "name": "f66"})
  expect_error(lambda: sharding.check_mesh(narrow, sharding.make_mesh(data=1, model=4)), "hidden_dim=66",
               "allowed model values: [1, 2]")
  expect_error(lambda: sharding.sharded_forward(CONFIG, params, tokens[0], sharding.make_mesh(data=1)),
               "[B, T]", "tokens[None]")
  expect_error(lambda: sharding.axis_sizes(jax.sharding.Mesh(np.asarray(jax.devices()), ("x",))), "axes")
  print("ok bad meshes", flush=True)


def main():
  assert len(jax.devices()) == 4, f"needs 4 devices (XLA_FLAGS={sharding.FORCE_DEVICES_FLAG}=4), got {jax.devices()}"
  params = init_params(CONFIG, seed=3, scale=0.3)
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 97, size=(4, 64)), jnp.int32)
  bad_meshes(params, tokens)
  out, mesh = forwards(params, tokens)  # the last one: exact, model=4
  orbax_roundtrip(out.trace, mesh)
  pallas(params, tokens)
  print("ALL OK")


if __name__ == "__main__":
  sys.exit(main())
