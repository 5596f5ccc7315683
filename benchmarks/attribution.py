"""Attribution patching over the sparse graph vs real ablations, on the embedded Gemma 3 270M (CPU is fine).

A RULER niah_single_1 prompt of --length tokens; metric: the logit of the answer's first token at the last
position of the Stream (sparse-output) forward. One forward + backward gives d metric / d gate for every kept
edge (stream_jax.attribution: gate 0 = the block dropped for that query block and head, renormalised); the
--top edges by |AtP estimate| are then ablated one at a time for real (a forced mask without the block, the
existing intervention path) and the measured metric changes compared with the estimates (Spearman, Pearson,
sign agreement). --random adds that many random kept edges to the comparison.

    .venv/bin/python benchmarks/attribution.py --length 1024 --top 40 --random 10
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--length", type=int, default=1024)
  ap.add_argument("--top", type=int, default=40)
  ap.add_argument("--random", type=int, default=10)
  ap.add_argument("--block", type=int, default=32)
  ap.add_argument("--top-k", type=int, default=8)
  ap.add_argument("--depth", type=float, default=50.0)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--json", default=None, help="write the per-edge rows here")
  args = ap.parse_args()

  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from stream_jax import StreamConfig  # pylint: disable=import-outside-toplevel
  from stream_jax.analysis.anchors import spearman  # pylint: disable=import-outside-toplevel
  from stream_jax.experiments.edge_ablation import check_edges, needle_prompt  # pylint: disable=C0415
  from stream_jax.models import load_model  # pylint: disable=import-outside-toplevel

  model = load_model("gemma3-270m", jnp.float32, progress=False)
  cfg = StreamConfig(block_q=args.block, block_k=args.block, top_k=args.top_k)
  prompt = needle_prompt(model, args.length, cfg, depth=args.depth, seed=args.seed)
  sample, answer = prompt.sample, prompt.answer
  written = [int(t) for t in prompt.ids[0, sample.length:]]
  print(f"T={prompt.ids.shape[1]} (prompt {sample.length} + {model.decode(written)!r}); needle {sample.answers[0]!r} "
        f"at tokens {sample.value_spans.tolist()} (blocks {list(prompt.needle_blocks)}); answer token {answer} "
        f"{model.decode([answer])!r}", flush=True)
  if not prompt.writes_answer:
    print(f"WARNING: the sparse model does not write the answer here (a failed retrieval): the metric is the "
          f"logit of {model.decode([answer])!r} after {model.decode(written)!r}", flush=True)
  t0 = time.time()
  check = check_edges(model, prompt, cfg, top=args.top, random=args.random, seed=args.seed)
  elapsed = time.time() - t0
  print(f"metric {check.value:.4f}; {check.num_edges} kept edges", flush=True)
  for e in check.rows:
    print(f"  L{e['layer']:2d} h{e['head']} q{e['q_block']:3d} k{e['key_block']:3d}  AtP {e['estimate']:+.4f}  "
          f"ablation {e['measured']:+.4f}{'  (random)' if e['random'] else ''}", flush=True)
  top = [r for r in check.rows if not r["random"]]
  print(f"\ntop {len(top)} edges by |AtP|: Spearman {check.spearman:+.3f}, Pearson {check.pearson:+.3f}, sign "
        f"agreement {check.sign_agreement:.2f}")
  if len(check.rows) > len(top):
    est_a = np.array([r["estimate"] for r in check.rows])
    real_a = np.array([r["measured"] for r in check.rows])
    print(f"with {len(check.rows) - len(top)} random kept edges: Spearman {spearman(est_a, real_a):+.3f}, "
          f"Pearson {float(np.corrcoef(est_a, real_a)[0, 1]):+.3f}")
  print(f"time: attribution and {len(check.rows)} ablations {elapsed:.0f} s")
  needle = [r for r in check.needle_rows(prompt.needle_blocks) if not r["random"]]
  print(f"top edges reading a needle block: {len(needle)}/{len(top)}")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(dict(length=int(prompt.ids.shape[1]), answer=sample.answers[0], spearman=check.spearman,
                     pearson=check.pearson, rows=list(check.rows)), f, indent=1)

if __name__ == "__main__":
  main()
