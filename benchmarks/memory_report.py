"""What holds the device memory at a trace mode's peak: compile (no run) a `trace_modes.py` mode at one length
with XLA's buffer assignment dumped, and print the compiled memory and the buffers live at the peak, largest
first (each with the HLO instruction that defines it), so a peak above plain's can be read, not guessed.

  python benchmarks/memory_report.py --mode ideal_exact --length 1m --top 25
  python benchmarks/memory_report.py --mode plain --length 1m
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="gemma3-4b")
  p.add_argument("--mode", default="ideal_exact")
  p.add_argument("--length", default="1m")
  p.add_argument("--top", type=int, default=25, help="peak buffers to print")
  p.add_argument("--dump", default=None, help="folder for XLA's dump (default: a temporary one)")
  args = p.parse_args(argv)
  dump = pathlib.Path(args.dump or tempfile.mkdtemp(prefix="xla_dump_"))
  # Only the forward's module, after optimisation, with its buffer assignment (set before jax starts).
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} --xla_dump_hlo_as_text"
                             " --xla_dump_hlo_module_re=.*forward.*").strip()

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  import scaling  # pylint: disable=import-outside-toplevel
  import trace_modes  # pylint: disable=import-outside-toplevel
  from stream_jax.models import forward, get_config  # pylint: disable=import-outside-toplevel

  t = scaling.parse_lengths(args.length)[0]
  config = get_config(args.config)
  if t > config.max_length:
    config = config.replace(context_length=t)
  params = jax.eval_shape(lambda: scaling.device_random_params(config, jnp.bfloat16))
  tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)
  kw = trace_modes.mode_kwargs(args.mode)

  def forward_fn(p, x):
    return forward(config, p, x, **kw)

  compiled = jax.jit(forward_fn).lower(params, tokens).compile()
  m = compiled.memory_analysis()
  gib = 2 ** 30
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; {args.config}, mode {args.mode}, T={t:,}")
  print(f"compiled: arguments {m.argument_size_in_bytes / gib:.2f} GiB, outputs {m.output_size_in_bytes / gib:.2f}, "
        f"temporaries {m.temp_size_in_bytes / gib:.2f}, total {scaling._memory(compiled) / gib:.2f} GiB")  # pylint: disable=protected-access
  ranges = sorted(dump.glob("*after_optimizations-live-range.txt"), key=lambda f: f.stat().st_size)
  if not ranges:
    print(f"no live-range report in {dump}: {sorted(f.name for f in dump.iterdir())[:10]}")
    return 1
  text = ranges[-1].read_text()
  # XLA's heap at its peak: "Live ranges at <step> (peak):", then "<instruction>{<index>}: <n> bytes (...)".
  start = text.find("(peak):")
  if start < 0:
    print("no peak section in " + ranges[-1].name)
    return 1
  live = re.findall(r"^\s+(\S+?)\{[^}]*\}: (\d+) bytes", text[start:text.find("Stack trace", start)], re.M)
  hlo = ranges[-1].with_name(ranges[-1].name.replace("-live-range.txt", ".txt")).read_text()
  step = re.search(r"Live ranges at (\d+) \(peak\)", text).group(1)
  at = re.search(rf"^\s+{step}:(\S+)", text, re.M)
  print(f"the peak is at step {step}, instruction {at.group(1) if at else '?'} ({_op_name(hlo, at.group(1)) if at else ''})")
  params = sum(int(b) for name, b in live if re.search(rf"^\s*%?{re.escape(name)} = \S+ parameter\(", hlo, re.M))
  total = sum(int(b) for _, b in live)
  print(f"{len(live)} buffers live at the peak, {total / gib:.2f} GiB ({(total - params) / gib:.2f} GiB besides the "
        f"parameters: what the {m.temp_size_in_bytes / gib:.2f} GiB of temporaries would be without "
        f"fragmentation); the largest:")
  for name, size in live[:args.top]:
    line = re.search(rf"^\s*(?:ROOT )?%?{re.escape(name)} = (\S+) ", hlo, re.M)
    shape, op = (line.group(1) if line else "?"), _op_name(hlo, name)
    print(f"  {int(size) / gib:7.3f} GiB  {name:<40} {shape:<36} {op[-110:]}")
  return 0


def _op_name(hlo: str, name: str) -> str:
  """The JAX source op an optimised HLO instruction came from (its metadata), or ""."""
  line = re.search(rf"^\s*(?:ROOT )?%?{re.escape(name)} = .*$", hlo, re.M)
  op = re.search(r'op_name="([^"]*)"', line.group(0)) if line else None
  return op.group(1) if op else ""


if __name__ == "__main__":
  sys.exit(main())
