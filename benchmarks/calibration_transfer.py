"""Does a per-layer budget calibration transfer across lengths? (issue 26, item 2; CPU is fine)

Fits `calibrate_budget` (StreamConfig.layer_scales) on the first N tokens of the calibration text (the
Python docs' topics) for each N of --fit-lengths, with the cap (top_k) a fixed share of N, then applies the
scales at --length on a held-out source and reports its true coverage per global layer and kept fraction
(compare with the scales fit at --length itself: benchmarks/ideal_calibration.py).

  python benchmarks/ideal_calibration.py --dump-tokens benchmarks/tokens   # and faithfulness.py --dump-tokens
  python benchmarks/calibration_transfer.py --fit-lengths 4096,8192 --length 16384 --block 32
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tokens", default="benchmarks/tokens")
  p.add_argument("--fit-lengths", default="4096,8192")
  p.add_argument("--length", type=int, default=16384)
  p.add_argument("--block", type=int, default=32)
  p.add_argument("--cap-share", type=float, default=0.25, help="top_k = cap-share x length / block")
  p.add_argument("--target", type=float, default=0.9)
  p.add_argument("--source", default="readmes")
  p.add_argument("--out", default=None, help="append the rows (JSON lines) here")
  args = p.parse_args(argv)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import stream_jax as sj  # pylint: disable=import-outside-toplevel
  from stream_jax.experiments import calibration  # pylint: disable=import-outside-toplevel
  from stream_jax.models import load_model  # pylint: disable=import-outside-toplevel
  model = load_model("gemma3-270m", dtype=jnp.float32, tokenizer=False, progress=False)
  calib = np.load(os.path.join(args.tokens, "pydoc_topics.npy")).astype(np.int32)
  held = np.load(os.path.join(args.tokens, f"{args.source}.npy")).astype(np.int32)[:args.length]
  cfg = lambda t, **kw: sj.StreamConfig(block_q=args.block, block_k=args.block, coverage=args.target,
                                        top_k=int(args.cap_share * t) // args.block, **kw)
  rows = []
  for t in [int(x) for x in args.fit_lengths.split(",") if x]:
    t0 = time.perf_counter()
    cal = calibration.calibrate_budget(model, calib[:t], cfg(t), progress=False)
    print(f"fit at {t}:\n{calibration.summary(cal)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    got = calibration.budget_coverage(model, held, cfg(args.length, layer_scales=cal.config.layer_scales))
    print(f"scales fit at {t} applied at {args.length} on {args.source}: true coverage "
          f"{' '.join(f'{c:.3f}' for c in got.coverage)}, kept {got.kept_mean:.3f}", flush=True)
    rows.append(dict(fit_length=t, length=args.length, block=args.block, target=args.target, source=args.source,
                     layer_scales=cal.config.layer_scales, fit_coverage=cal.coverage.coverage,
                     coverage_layers=got.coverage, kept=got.kept_mean))
  if args.out:
    with open(args.out, "a") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")
  return rows


if __name__ == "__main__":
  main()
