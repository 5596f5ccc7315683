"""Lowering kernels for CUDA on a machine without a GPU: catches what a GPU backend cannot lower (Triton:
top_k, sort, value slicing; Mosaic GPU: layouts, shared-memory transfers) in the CPU test run."""

import contextlib
import functools

import jax
import jax.numpy as jnp


def _abstract_gpu(axis_type):
  """jax >= 0.11 reads the target GPU from an abstract mesh when no GPU is present."""
  sharding = jax.sharding
  device = sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None,
                                   platform="cuda")
  types = None if axis_type is None else (getattr(sharding.AxisType, axis_type),)
  mesh = sharding.AbstractMesh((1,), ("x",), types, abstract_device=device)
  return sharding.use_abstract_mesh(mesh)


def lower_for_cuda(fn, *args):
  """StableHLO text of `fn` lowered for CUDA (raises if a kernel cannot lower).

  Tries a plain lowering (jax 0.10), then under an abstract H100 mesh (jax >= 0.11), Auto axes first.
  """
  contexts = [contextlib.nullcontext]
  if hasattr(jax.sharding, "use_abstract_mesh") and hasattr(jax.sharding, "AbstractDevice"):
    contexts += [functools.partial(_abstract_gpu, "Auto"), functools.partial(_abstract_gpu, None)]
  errors = []
  for context in contexts:
    try:
      with context():
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except Exception as e:  # pylint: disable=broad-except
      if "Unimplemented primitive" in str(e) or isinstance(e, NotImplementedError):
        raise  # a kernel Triton cannot lower: no other context helps
      errors.append(e)
  raise errors[-1]


@contextlib.contextmanager
def mosaic_semantics(name: str, *jitted):
  """Lower Mosaic GPU kernels with the named lowering semantics: "Lane" (jax 0.10's default) or
  "Warpgroup" (0.11's, which runs Mosaic GPU layout inference: where a kernel's vector layouts or
  shared-memory transfers cannot be satisfied). A kernel that asks for its semantics itself (the wide
  estimate kernel, the 16 / 32-token block-mass and table kernels: Lane) keeps them under either setting.
  `jitted`: the kernels' jitted inner functions, whose traces (which hold the compiler parameters) are
  dropped before and after."""
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=import-outside-toplevel
  original = plgpu.CompilerParams
  semantics = getattr(plgpu.LoweringSemantics, name)
  plgpu.CompilerParams = functools.partial(original, lowering_semantics=semantics)
  for f in jitted:
    f.clear_cache()
  try:
    yield
  finally:
    plgpu.CompilerParams = original
    for f in jitted:
      f.clear_cache()


def sds(shape, dtype=jnp.bfloat16):
  return jax.ShapeDtypeStruct(shape, dtype)
