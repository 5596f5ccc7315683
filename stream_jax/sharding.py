"""Multi-GPU and multi-host: a traced forward placed on a ("data", "model") device mesh.

Several GPUs of one host: build a mesh and call `sharded_forward` instead of `forward`:

    from stream_jax import StreamConfig, sharding
    from stream_jax.models import load_model
    m = load_model("gemma3-270m")
    mesh = sharding.make_mesh(data=2, model=1)           # 2 GPUs, one prompt batch shard each
    run = sharding.sharded_forward(m, m.params, tokens, mesh, attention=StreamConfig())  # a TracedRun
    trace_io.save_trace("out/run", run.trace)            # each device writes its own shards (orbax)

`data` splits the batch B (a sweep of many prompts traced as one batch: NIAH samples, faithfulness
texts); `model` splits the query heads N (q / o projections, K/V heads when `model` divides K, else they
are replicated) and the MLP hidden dim F (tensor parallelism, for models or lengths that do not fit one
card). The traces come back sharded like the heads ([B, N, nQ, C] over data x model) and
`trace_io.save_trace` writes them without gathering them to one host (`trace_io.load_trace(path, mesh)`
restores them into shards). The results equal a single-device `forward`.

On a multi-host pod (several machines, one process per host) call `jax.distributed.initialize()` first
thing in every process (arguments from the cluster's environment: SLURM, Kubernetes / GKE and TPU pods
are detected; else pass coordinator_address, num_processes, process_id), then run the same program in
every process: `make_mesh` spans all hosts' devices (`jax.devices()` is global), every process passes the
same global tokens and parameters (each keeps only its devices' shards), and `trace_io.save_trace` to a path all
hosts can write (a shared file system or a bucket) has each host write its own shards. Keep `model`
within one host (its collectives run every layer, NVLink is much faster than the network) and spread
`data` across hosts.

How it works: `jax.jit` with the parameters and tokens placed by `NamedSharding` and the outputs
constrained to their shardings; XLA's partitioner inserts the collectives (one all-reduce after the
attention output projection and one after the MLP per layer when model > 1; none for data parallelism).
The Pallas kernels (backend "pallas", "triton", "mosaic", or "auto" on a GPU) are opaque to the partitioner, so with them the
forward runs under `shard_map` over "data", each device tracing its batch shard with the single-device
program; model > 1 with Pallas is refused (use backend="xla"). On CPU, Pallas runs in interpret mode,
which lowers to XLA ops, so the tests exercise the same `shard_map` path.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from stream_jax import checks
from stream_jax.kernels.implementations import may_use_kernels
from stream_jax.config import StreamConfig
from stream_jax.trace import TracedRun

AXES = ("data", "model")
FORCE_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def _positive(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer number of devices, got {value!r}")
  return int(value)


def make_mesh(data: Optional[int] = None, model: int = 1, *,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ("data", "model") mesh over the first data x model devices of `jax.devices()` (global on a pod).

  data=None takes every device not used by `model`. A 1 x 1 mesh is allowed (the one-device baseline of
  a comparison); asking for more devices than exist is an error naming the parameter.
  """
  devices = list(jax.devices() if devices is None else devices)
  model = _positive("model", model)
  if data is None:
    if len(devices) % model:
      raise ValueError(f"model={model} does not divide the {len(devices)} devices (so data=None cannot take "
                       f"the rest); allowed model values: {_divisors(len(devices))}, or pass data")
    data = len(devices) // model
  data = _positive("data", data)
  need = data * model
  if need > len(devices):
    hint = ""
    if len(devices) == 1:
      hint = (f"; there is one {devices[0].platform} device, nothing to shard over (on CPU, fake devices come "
              f"from XLA_FLAGS={FORCE_DEVICES_FLAG}=N set before jax is imported)")
    raise ValueError(f"mesh data={data} x model={model} needs {need} devices, only {len(devices)} exist; "
                     f"allowed: data * model <= {len(devices)}{hint}")
  return Mesh(np.asarray(devices[:need], dtype=object).reshape(data, model), AXES)


def axis_sizes(mesh: Mesh) -> tuple[int, int]:
  """(data, model) sizes of a mesh made by `make_mesh` (or any mesh with those axis names)."""
  if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != AXES:
    names = getattr(mesh, "axis_names", None)
    raise ValueError(f"mesh must be a jax.sharding.Mesh with axes {AXES} (see make_mesh), got axes {names}")
  return int(mesh.shape["data"]), int(mesh.shape["model"])


def check_mesh(config, mesh: Mesh, batch: Optional[int] = None) -> None:
  """The mesh splits the model's heads and MLP and the batch evenly (K/V heads are replicated otherwise)."""
  data, model = axis_sizes(mesh)
  n, f = config.num_heads, config.hidden_dim
  if n % model or f % model:
    what = f"num_heads={n}" if n % model else f"hidden_dim={f}"
    raise ValueError(f"mesh axis model={model} does not divide {what} of {config.name}; allowed model "
                     f"values: {_divisors(math.gcd(n, f))}")
  if batch is not None and batch % data:
    raise ValueError(f"mesh axis data={data} does not divide the batch B={batch} of tokens [B, T]; pad the "
                     f"batch to a multiple of {data} or use data in {_divisors(batch)}")


# ------------------------------------------------------------------------------------------- placement


def param_spec(path: tuple[str, ...], shape: tuple[int, ...], model: int) -> P:
  """PartitionSpec of one parameter (path of key names, e.g. ("layer_0", "attn", "q_einsum", "w"))."""
  name = "/".join(path[-2:])
  if name in ("q_einsum/w", "attn_vec_einsum/w"):  # [N, D, H], [N, H, D]
    return P("model")
  if name == "kv_einsum/w":  # [2, K, D, H]: split only when the K/V heads divide (1B: K=1)
    return P(None, "model") if shape[1] % model == 0 else P()
  if path[-1] == "gating_einsum":  # [2, F, D]
    return P(None, "model")
  if path[-1] == "linear":  # [F, D]
    return P("model")
  return P()  # embedder, norms, QK-norms: small or needed whole on every device


def param_shardings(config, params, mesh: Mesh):
  """NamedShardings of a Gemma parameter tree ({"params": ...} or bare), same structure."""
  _, model = axis_sizes(mesh)
  check_mesh(config, mesh)

  def spec(path, x):
    keys = tuple(str(getattr(p, "key", p)) for p in path)
    return NamedSharding(mesh, param_spec(keys, tuple(x.shape), model))
  return jax.tree_util.tree_map_with_path(spec, params)


def shard_params(config, params, mesh: Mesh):
  """Places the parameters on the mesh (a no-op for parameters already placed so). Each device receives
  only its shard; on a pod every process passes the same values."""
  return jax.device_put(params, param_shardings(config, params, mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Activations and tokens: batch B over "data"."""
  return NamedSharding(mesh, P("data"))


def trace_sharding(mesh: Mesh) -> NamedSharding:
  """Trace arrays [B, N, ...] (mask indices, counts, mass, coverage): B over "data", heads over "model"."""
  return NamedSharding(mesh, P("data", "model"))


# ---------------------------------------------------------------------------------------------- forward


def _freeze(kwargs: dict) -> tuple:
  out = []
  for k, v in sorted(kwargs.items()):
    if isinstance(v, (list, np.ndarray)):
      v = tuple(np.asarray(v).tolist())
    out.append((k, v))
  return tuple(out)


@functools.lru_cache(maxsize=64)
def _compiled(config, mesh: Mesh, frozen: tuple, pallas: bool):
  from stream_jax.models.forward import forward  # pylint: disable=import-outside-toplevel  (models import us)

  kwargs = dict(frozen)
  batch, traced = batch_sharding(mesh), trace_sharding(mesh)
  hidden = NamedSharding(mesh, P(None, "data"))

  def body(params, tokens):
    return forward(config, params, tokens, **kwargs)

  if pallas:  # each device runs the one-device program (and its Pallas kernels) on its batch shard
    specs = TracedRun(logits=P("data"), trace=P("data"),
                      hidden=P(None, "data") if kwargs.get("return_hidden") else None)
    body = jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data")), out_specs=specs, check_vma=False)

  def constrained(params, tokens):
    out = body(params, tokens)
    put = lambda s: (lambda x: jax.lax.with_sharding_constraint(x, s))  # noqa: E731
    return TracedRun(logits=put(batch)(out.logits),
                     trace=jax.tree_util.tree_map(put(traced), out.trace),
                     hidden=None if out.hidden is None else put(hidden)(out.hidden))

  return jax.jit(constrained)


def jitted_forward(model, mesh: Mesh, **forward_kwargs):
  """The jitted `(params, tokens) -> forward(model, params, tokens, **forward_kwargs)` on `mesh`, for
  params placed by `shard_params` and tokens int32[B, T] placed by `batch_sharding(mesh)` (what
  `sharded_forward` does); `.lower(params, tokens).compile()` gives its per-device memory analysis."""
  from stream_jax.models.forward import model_config  # pylint: disable=import-outside-toplevel

  config = model_config(model)
  check_mesh(config, mesh)
  _, model_size = axis_sizes(mesh)
  stream = isinstance(forward_kwargs.get("attention"), StreamConfig)
  backend = forward_kwargs.get("backend", "xla")
  pallas = stream and may_use_kernels(backend)
  if pallas and model_size > 1:
    raise ValueError(f"backend={backend!r} cannot run with mesh axis model={model_size}: the Pallas kernels run "
                     "whole heads per device under shard_map, without the partitioner's collectives; use "
                     "backend='xla' for tensor parallelism, or model=1 (data parallel)")
  return _compiled(config, mesh, _freeze(forward_kwargs), pallas)


def sharded_forward(model, params, tokens, mesh: Mesh, **forward_kwargs):
  """`stream_jax.models.forward` on a mesh: same arguments and results, placed and sharded.

  tokens int[B, T] (B divisible by the mesh's data axis); params are placed by `shard_params` (pass them
  placed already to avoid the copy on every call). Returns the TracedRun of `forward`: logits [B, ...]
  over "data", trace arrays [B, N, ...] over ("data", "model"), hidden [L, B, ...] over "data". Compiled
  once per (config, mesh, arguments, shapes).
  """
  from stream_jax.models.forward import model_config, wrap_params  # pylint: disable=import-outside-toplevel

  config = model_config(model)
  params = wrap_params(params)
  if not hasattr(tokens, "dtype"):
    tokens = np.asarray(checks.token_ids(tokens, config.vocab_size))
  elif getattr(tokens, "is_fully_addressable", True):  # value checks need every id on this host
    checks.token_ids(tokens, config.vocab_size)
  if tokens.ndim != 2:
    raise ValueError(f"tokens must have shape [B, T] on a mesh (the batch is what 'data' splits), got "
                     f"{tuple(tokens.shape)}; pass tokens[None] for one prompt")
  check_mesh(config, mesh, tokens.shape[0])
  fn = jitted_forward(config, mesh, **forward_kwargs)
  params = shard_params(config, params, mesh)
  tokens = jax.device_put(jax.numpy.asarray(tokens).astype(jax.numpy.int32), batch_sharding(mesh))
  return fn(params, tokens)


# ------------------------------------------------------------------------------------------- trace io
