"""Multi-GPU scaling of Stream traces through jax.sharding: data-parallel sweeps and tensor-parallel traces.

Two measurements, each against one device of the same machine (random weights, bf16):
  sweep   data parallelism: P prompts of T tokens traced (Stream, sparse output) in batches of
          --batch prompts per device; one device runs P / batch calls, a data=n mesh P / (n * batch).
          Throughput in prompts/s; goal >= 1.85x one GPU on 2 GPUs.
  tp      tensor parallelism: one long prompt (default the Gemma 3 27B config at 128k) traced with the
          heads and the MLP split over model=n; goal >= 1.7x one GPU on 2 GPUs.
Each row: compile time, median wall time (device-synchronised), the compiled executable's per-device
memory (`memory_analysis()`), the devices' peak memory (`memory_stats()`, GPU only) and the speed-up.
A phase that fails (out of memory, ...) is a row with its error; the others still run.

  python benchmarks/sharding.py                      # every GPU of this host; results in benchmarks/results
  python benchmarks/sharding.py --only tp --tp-length 64k
  python benchmarks/sharding.py --small              # CPU smoke run on 4 fake devices (sets XLA_FLAGS)
"""

from __future__ import annotations

import os
import sys

if "--small" in sys.argv and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  # fake CPU devices must be asked for before jax initialises
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from stream_jax import StreamConfig, sharding  # noqa: E402
from stream_jax.models import Gemma, get_config, init_params  # noqa: E402

GOALS = {"sweep": 1.85, "tp": 1.7}  # speed-up goals on 2 GPUs (issue 14)


def parse_length(text: str) -> int:
  text = text.strip().lower()
  mult = {"k": 1024, "m": 1 << 20}.get(text[-1:], 1)
  value = int(float(text[:-1] if mult > 1 else text) * mult)
  if value < 1:
    raise argparse.ArgumentTypeError(f"a length must be >= 1, got {text!r}")
  return value


def random_params(config, mesh, dtype, seed: int = 0):
  """Random weights created on the devices, already sharded (a 27B model is never on the host):
  normal(0, 0.02) weights, normal(0, 0.1) f32 norm scales."""
  shapes = jax.eval_shape(lambda: Gemma(config, dtype).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  if sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes)) < 50_000_000:  # small: no extra compile
    return sharding.shard_params(config, init_params(config, dtype, seed), mesh)
  shardings = sharding.param_shardings(config, shapes, mesh)
  leaves, treedef = jax.tree_util.tree_flatten(shapes)

  def make(key):
    out = []
    for i, s in enumerate(leaves):
      std = 0.1 if s.dtype == jnp.float32 and len(s.shape) == 1 else 0.02
      out.append((std * jax.random.normal(jax.random.fold_in(key, i), s.shape, jnp.float32)).astype(s.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)
  return jax.jit(make, out_shardings=shardings)(jax.random.key(seed))


def peak_bytes(mesh) -> int:
  """Largest `peak_bytes_in_use` over the mesh's devices (-1 where the backend keeps no statistics)."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", -1) for d in mesh.devices.flat]
  return int(max(peaks))


def measure(config, mesh, tokens_batches, kwargs, repeats, seed=0):
  """Times tracing every batch of `tokens_batches` (one call each) on `mesh`; returns a row."""
  params = random_params(config, mesh, jnp.bfloat16, seed)
  fn = sharding.jitted_forward(config, mesh, **kwargs)
  placed = [jax.device_put(jnp.asarray(t), sharding.batch_sharding(mesh)) for t in tokens_batches]
  t0 = time.perf_counter()
  compiled = fn.lower(params, placed[0]).compile()
  compile_s = time.perf_counter() - t0
  m = compiled.memory_analysis()
  memory = -1 if m is None else int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                                    - m.alias_size_in_bytes)
  jax.block_until_ready(compiled(params, placed[0]))  # warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    outs = [compiled(params, x) for x in placed]  # dispatched back to back, synchronised once
    jax.block_until_ready(outs)
    times.append(time.perf_counter() - t0)
  trace = outs[-1].trace
  spec = str(jax.tree_util.tree_leaves(trace)[0].sharding.spec) if trace is not None else "-"
  row = dict(compile_s=compile_s, time_s=statistics.median(times), memory_bytes=memory,
             peak_bytes=peak_bytes(mesh), trace_spec=spec)
  del outs, trace, params, placed, compiled
  return row


def run_phase(name, config, batches_for, n, kwargs, repeats, label):
  """One device, then the n-device mesh of the phase; rows with the speed-up of the second."""
  rows = []
  for devices in (1, n):
    mesh = sharding.make_mesh(data=devices, model=1) if name == "sweep" else sharding.make_mesh(data=1,
                                                                                                 model=devices)
    row = dict(phase=name, config=config.name, devices=devices, mesh=dict(mesh.shape), label=label)
    try:
      batches = batches_for(devices)
      row.update(measure(config, mesh, batches, kwargs, repeats))
      prompts = sum(b.shape[0] for b in batches)
      row.update(prompts=prompts, T=int(batches[0].shape[1]),
                 prompts_per_s=prompts / row["time_s"], tokens_per_s=prompts * batches[0].shape[1] / row["time_s"])
    except Exception as e:  # out of memory on one device is a result, not a crash
      row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    rows.append(row)
    print(json.dumps(row), flush=True)
  base, top = rows
  if "error" not in base and "error" not in top:
    top["speedup"] = base["time_s"] / top["time_s"]
  return rows


def fmt_bytes(b):
  if b is None or b < 0:
    return "-"
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(b) < 1024:
      return f"{b:.1f} {unit}"
    b /= 1024
  return f"{b:.1f} PiB"


def table(rows, device_kind) -> str:
  lines = [f"devices: {device_kind}", "",
           "| phase | config | mesh | prompts x T | compile (s) | time (s) | prompts/s | tokens/s | "
           "memory / device (compiled) | peak / device | speed-up vs 1 device | goal (2 GPUs) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    mesh = f"data={r['mesh']['data']} x model={r['mesh']['model']}"
    if "error" in r:
      lines.append(f"| {r['phase']} | {r['config']} | {mesh} | - | - | {r['error']} | | | | | | |")
      continue
    speed = f"{r['speedup']:.2f}x" if "speedup" in r else ("1.00x" if r["devices"] == 1 else "-")
    goal = f">= {GOALS[r['phase']]}x" if r["devices"] > 1 else ""
    lines.append(f"| {r['phase']} | {r['config']} | {mesh} | {r['prompts']} x {r['T']} | {r['compile_s']:.1f} | "
                 f"{r['time_s']:.3f} | {r['prompts_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
                 f"{fmt_bytes(r['memory_bytes'])} | {fmt_bytes(r['peak_bytes'])} | {speed} | {goal} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--devices", type=int, default=None, help="devices of the sharded runs (default: all)")
  p.add_argument("--only", choices=("sweep", "tp"), default=None, help="run one phase only")
  p.add_argument("--sweep-config", default="gemma3-1b", help="preset of the data-parallel sweep")
  p.add_argument("--prompts", type=int, default=64, help="prompts in the sweep")
  p.add_argument("--sweep-length", type=parse_length, default=parse_length("8k"), help="tokens per prompt")
  p.add_argument("--batch", type=int, default=4, help="prompts per device per call in the sweep")
  p.add_argument("--sweep-backend", default="xla", choices=("xla", "pallas", "auto"),
                 help="Stream backend of the sweep (pallas runs under shard_map over 'data')")
  p.add_argument("--tp-config", default="gemma3-27b", help="preset of the tensor-parallel trace")
  p.add_argument("--tp-length", type=parse_length, default=parse_length("128k"), help="tokens of the trace")
  p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
  p.add_argument("--out", default="benchmarks/results", help="folder for sharding_<device>.json")
  p.add_argument("--small", action="store_true",
                 help="CPU smoke mode (CI): 4 fake CPU devices, a tiny 2-layer model, 8 prompts of 128 tokens, "
                      "a 256-token tensor-parallel trace; the ratios mean nothing on 2 shared cores")
  args = p.parse_args(argv)
  n = args.devices or len(jax.devices())
  if n < 2:
    p.error(f"--devices: sharding needs at least 2 devices, {len(jax.devices())} visible ({jax.devices()}); "
            f"on CPU use --small (4 fake devices)")
  if n > len(jax.devices()):
    p.error(f"--devices={n}: only {len(jax.devices())} devices visible")
  for name in ("prompts", "batch", "repeats"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1")

  sweep_cfg, tp_cfg = get_config(args.sweep_config), get_config(args.tp_config)
  stream = StreamConfig()
  if args.small:
    sweep_cfg = dataclasses.replace(get_config("gemma3-270m"), num_layers=2, layer_kinds=("local", "global"),
                                    vocab_size=512, embed_dim=128, hidden_dim=256, head_dim=32,
                                    sliding_window=64, name="tiny-2layers")
    tp_cfg = dataclasses.replace(sweep_cfg, num_kv_heads=4, name="tiny-2layers-4kv")
    args.prompts, args.sweep_length, args.batch, args.tp_length, args.repeats = 8, 128, 1, 256, 1
    stream = StreamConfig(block_q=16, block_k=16, top_k=2)
  if args.prompts % (n * args.batch):
    p.error(f"--prompts={args.prompts} must be a multiple of devices x --batch = {n * args.batch}")
  rng = np.random.default_rng(0)
  rows = []
  if args.only in (None, "sweep"):
    prompts = rng.integers(3, sweep_cfg.vocab_size, size=(args.prompts, args.sweep_length), dtype=np.int32)

    def sweep_batches(devices):
      step = devices * args.batch
      return [prompts[i:i + step] for i in range(0, args.prompts, step)]
    rows += run_phase("sweep", sweep_cfg, sweep_batches, n,
                      dict(attention=stream, backend=args.sweep_backend, last_only=True), args.repeats,
                      f"{args.prompts} prompts, {args.batch} per device per call")
  if args.only in (None, "tp"):
    tokens = rng.integers(3, tp_cfg.vocab_size, size=(1, args.tp_length), dtype=np.int32)
    rows += run_phase("tp", tp_cfg, lambda devices: [tokens], n,
                      dict(attention=stream, backend="xla", last_only=True), args.repeats, "one prompt")
  kind = f"{n} x {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
  text = table(rows, kind)
  print(text)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  name = "sharding_small" if args.small else f"sharding_{jax.default_backend()}{n}"
  (out / f"{name}.json").write_text(json.dumps(dict(
      date=datetime.datetime.now().isoformat(timespec="seconds"), devices=kind, stream=dataclasses.asdict(stream),
      rows=rows, table=text), indent=1))
  return rows


if __name__ == "__main__":
  main()
