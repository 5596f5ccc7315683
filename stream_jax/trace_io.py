"""Saving and restoring a Trace: arrays with orbax, the static layout (layers, block sizes, lengths) as JSON.

    save_trace("run1", trace)            # run1/trace/ (orbax) + run1/trace.json
    trace = load_trace("run1")           # the same pytree, bit-identical arrays
    trace = load_trace("run1", mesh)     # each device reads only its shards ([B, N, ...] over data x model)

A sharded trace (stream_jax.sharding) is saved without gathering it: every process writes the shards its
devices hold (on a pod every process calls `save_trace`, with a path all hosts can write).

A report folder written by `stream_jax.report.write_report` holds a trace in this layout. Needs
orbax-checkpoint: `pip install 'stream-jax[io]'` (included in [models]).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

from typing import TYPE_CHECKING, Optional

import jax

from stream_jax.config import StreamConfig
from stream_jax.extras import require
from stream_jax.mask import BlockMask
from stream_jax.trace import LayerTrace, Trace

if TYPE_CHECKING:
  from jax.sharding import Mesh

TRACE_DIR = "trace"
TRACE_META = "trace.json"

__all__ = ["TRACE_DIR", "TRACE_META", "load_trace", "save_trace"]


def _orbax(what: str):
  return require("orbax.checkpoint", what)  # a slow import: only when a trace is saved or loaded



def _layer_meta(layer: LayerTrace) -> dict:
  m = layer.mask
  return dict(layer=layer.layer, kind=layer.kind, mode=layer.mode, window=layer.window,
              block_q=m.block_q, block_k=m.block_k, q_len=m.q_len, k_len=m.k_len,
              config=None if m.config is None else dataclasses.asdict(m.config))


def save_trace(path: str | os.PathLike, trace: Trace) -> None:
  """Saves a Trace: arrays with orbax under `path/trace` (sharded arrays as their shards), the static
  structure in `path/trace.json` (written by process 0)."""
  ocp = _orbax("save_trace")
  if not isinstance(trace, Trace):
    raise TypeError(f"trace must be a stream_jax.trace.Trace, got {type(trace).__name__}")
  path = pathlib.Path(path).absolute()
  path.mkdir(parents=True, exist_ok=True)
  arrays = {"layers": [dict(indices=l.mask.indices, counts=l.mask.counts, mass=l.mass,
                            **({} if l.coverage is None else {"coverage": l.coverage}))
                       for l in trace.layers]}
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(path / TRACE_DIR, arrays, force=True)
  ckpt.wait_until_finished()
  if jax.process_index() == 0:
    (path / TRACE_META).write_text(json.dumps({"layers": [_layer_meta(l) for l in trace.layers]}, indent=1))


def load_trace(path: str | os.PathLike, mesh: Optional[Mesh] = None) -> Trace:
  """Restores what `save_trace` wrote into the same Trace pytree (bit-identical arrays).

  With a `mesh` (stream_jax.sharding.make_mesh) the arrays are restored straight into shards: [B, N, ...]
  over ("data", "model"), an axis the mesh does not divide replicated; each device reads only its part.
  The layout in trace.json (block sizes, lengths) is checked against the saved arrays, and unreadable or
  truncated files raise a ValueError naming the folder.
  """
  ocp = _orbax("load_trace")
  if mesh is not None:
    from stream_jax.sharding import axis_sizes  # pylint: disable=import-outside-toplevel
    axis_sizes(mesh)  # a mesh of make_mesh's axes, or a ValueError saying so
  path = pathlib.Path(path).absolute()
  meta_file = path / TRACE_META
  if not meta_file.exists():
    raise FileNotFoundError(f"no saved trace at {path} (missing {TRACE_META})")
  try:
    meta = json.loads(meta_file.read_text())["layers"]
    if not isinstance(meta, list):
      raise TypeError("'layers' is not a list")
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"trace at {path}: {TRACE_META} is unreadable or truncated ({type(e).__name__}: {e})"
                     ) from None
  if not (path / TRACE_DIR).is_dir():
    raise ValueError(f"trace at {path}: the arrays folder {TRACE_DIR}/ is missing")
  try:
    ckpt = ocp.StandardCheckpointer()
    target = None if mesh is None else _shard_targets(ckpt.metadata(path / TRACE_DIR).item_metadata.tree, mesh)
    arrays = ckpt.restore(path / TRACE_DIR, target)["layers"]
  except Exception as e:  # orbax/TensorStore raise many kinds on cut or edited files
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    raise ValueError(f"trace at {path}: the saved arrays in {TRACE_DIR}/ cannot be read (truncated or "
                     f"corrupt?): {type(e).__name__}: {first}") from None
  if len(arrays) != len(meta):
    raise ValueError(f"trace at {path} is inconsistent: {len(meta)} layers described, {len(arrays)} saved")
  layers = []
  for i, (m, a) in enumerate(zip(meta, arrays)):
    try:
      cfg = None if m["config"] is None else StreamConfig(**m["config"])
      bq, bk, q_len, k_len = (int(m[k]) for k in ("block_q", "block_k", "q_len", "k_len"))
      layer, kind, mode, window = m["layer"], m["kind"], m["mode"], m["window"]
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"trace at {path}: layer {i} of {TRACE_META} is malformed ({type(e).__name__}: {e})"
                       ) from None
    idx, counts, mass = (a[k] for k in ("indices", "counts", "mass"))
    n_q, n_k = -(-q_len // max(bq, 1)), -(-k_len // max(bk, 1))
    problems = []
    if bq < 1 or bk < 1 or (cfg is not None and (cfg.block_q, cfg.block_k) != (bq, bk)):
      problems.append(f"block sizes {bq}x{bk} disagree with the config")
    if idx.ndim < 3 or idx.shape[-2] != n_q:
      problems.append(f"indices {idx.shape} do not have nQ={n_q} query blocks (q_len={q_len}, block_q={bq})")
    if mass.shape != idx.shape or counts.shape != idx.shape[:-1]:
      problems.append(f"mass {mass.shape} / counts {counts.shape} do not match indices {idx.shape}")
    if idx.size and (int(idx.min()) < -1 or int(idx.max()) >= n_k):  # reduced where the shards are
      problems.append(f"block ids outside [-1, {n_k - 1}] (k_len={k_len}, block_k={bk})")
    coverage = a.get("coverage") if isinstance(a, dict) else None
    if coverage is not None and coverage.shape != idx.shape[:-1]:
      problems.append(f"coverage {coverage.shape} does not match counts {idx.shape[:-1]}")
    if problems:
      raise ValueError(f"trace at {path}: layer {i}: saved layout and arrays disagree: {'; '.join(problems)}")
    as_jax = lambda x: x if isinstance(x, jax.Array) else jax.numpy.asarray(x)  # noqa: E731  (keeps shards)
    mask = BlockMask(as_jax(idx), as_jax(counts), bq, bk, q_len, k_len, cfg)
    layers.append(LayerTrace(mask, as_jax(mass), layer, kind, mode, window,
                             None if coverage is None else as_jax(coverage)))
  return Trace(tuple(layers))


def _shard_targets(shapes, mesh: Mesh):
  """Restore targets that place every saved array [B, N, ...] over the mesh's ("data", "model") axes."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  sizes = mesh.shape  # axis name -> size

  def target(m):
    shape = tuple(m.shape)
    spec = P(*[axis if len(shape) > i and shape[i] % sizes.get(axis, 1) == 0 else None
               for i, axis in enumerate(("data", "model"))])
    return jax.ShapeDtypeStruct(shape, m.dtype, sharding=NamedSharding(mesh, spec))
  return jax.tree_util.tree_map(target, shapes)
