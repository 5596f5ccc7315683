"""The Mosaic GPU kernels inside a whole traced forward (GPU): a random-weight Gemma 3 config in bfloat16,
Stream trace once with the Triton kernels (backend="triton"), once with the Mosaic GPU ports
(backend="mosaic"), and with the XLA reference (the bf16 noise floor); prints
the largest logit and block-mass differences against the Triton run. (Local layers take their output from
the sparse kernel's exact band even with output="exact", so their bf16 rounding reaches the logits.)

  python3 benchmarks/mgpu_forward_check.py --config gemma3-4b --layers 6 --length 8192
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import stream_jax as sj
from stream_jax.models import forward, get_config, init_params


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="gemma3-4b")
  ap.add_argument("--layers", type=int, default=6)
  ap.add_argument("--length", type=int, default=8192)
  args = ap.parse_args(argv)
  if jax.default_backend() != "gpu":
    raise SystemExit("mgpu_forward_check compares the Mosaic GPU and Triton kernels: it needs a Hopper GPU "
                     f"(the default backend here is {jax.default_backend()!r})")
  base = get_config(args.config)
  config = dataclasses.replace(base, num_layers=args.layers, layer_kinds=base.layer_kinds[:args.layers],
                               vocab_size=4096, name=f"{base.name}-{args.layers}layers")
  params = init_params(config, dtype=jnp.bfloat16, seed=0)
  x = jnp.asarray(np.random.default_rng(0).integers(3, 4096, size=(1, args.length)), jnp.int32)
  runs = {}
  for backend, label in (("triton", "triton"), ("triton", "triton again"), ("mosaic", "mosaic"),
                         ("xla", "xla")):
    for output in ("sparse", "exact"):
      runs[label, output] = forward(config, params, x, attention=sj.StreamConfig(), backend=backend,
                                    output=output, last_only=False)
  for output in ("sparse", "exact"):
    for other in ("triton again", "mosaic", "xla"):
      a, b = runs["triton", output], runs[other, output]
      scale = float(jnp.abs(a.logits.astype(jnp.float32)).max())
      d_logits = float(jnp.abs(a.logits.astype(jnp.float32) - b.logits.astype(jnp.float32)).max()) / scale
      same = [bool(jnp.array_equal(la.mask.indices, lb.mask.indices))
              for la, lb in zip(a.trace.layers, b.trace.layers)]
      # Block mass compared where both runs kept the same blocks (a layer's mask depends on the layers
      # below, whose bf16 outputs differ in the last bits between kernels).
      d_mass = max([float(jnp.abs(la.mass - lb.mass).max())
                    for la, lb, ok in zip(a.trace.layers, b.trace.layers, same) if ok] or [float("nan")])
      print(f"{config.name} T={args.length} output={output}, triton vs {other}: logits max rel diff "
            f"{d_logits:.2e}; layers with identical masks {sum(same)}/{len(same)} (first: {same[0]}), "
            f"block mass max |diff| there {d_mass:.2e}", flush=True)

if __name__ == "__main__":
  main()
