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


def spearman(a, b) -> float:
  rank = lambda x: np.argsort(np.argsort(x)).astype(np.float64)  # noqa: E731  (no ties in float effects)
  return float(np.corrcoef(rank(np.asarray(a)), rank(np.asarray(b)))[0, 1])


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
  from stream_jax import StreamConfig, intervene  # pylint: disable=import-outside-toplevel
  from stream_jax.analysis import niah  # pylint: disable=import-outside-toplevel
  from stream_jax.attribution import drop_edge, edge_attribution, top_edges  # pylint: disable=import-outside-toplevel
  from stream_jax.models import forward, load_model  # pylint: disable=import-outside-toplevel

  model = load_model("gemma3-270m", jnp.float32, progress=False)
  sample = niah.generate_sample(model.tokenizer, args.length, niah.NiahTask(depths=(args.depth,)),
                                seed=args.seed)
  ids = jnp.asarray(sample.ids)[None]
  cfg = StreamConfig(block_q=args.block, block_k=args.block, top_k=args.top_k)
  # The metric is the logit of the answer's first digit where the model writes it: the prompt ends at
  # "... is" and the model first writes ":" and " " (Gemma's digits are single tokens), so the sparse
  # model's own greedy tokens are appended (at most 4) until the next one is the first digit.
  answer = int(model.encode(sample.answers[0], add_bos=False)[0])
  written = []
  for _ in range(4):
    run = forward(model, model.params, ids, attention=cfg, last_only=True)
    top1 = int(np.argmax(np.asarray(run.logits[0])))
    if top1 == answer:
      break
    written.append(top1)
    ids = jnp.concatenate([ids, jnp.asarray([[top1]], jnp.int32)], axis=1)
  print(f"T={ids.shape[1]} (prompt {sample.length} + {model.decode(written)!r}); needle {sample.answers[0]!r} at "
        f"tokens {sample.value_spans.tolist()} (blocks {sample.needle_blocks(args.block)}); answer token "
        f"{answer} {model.decode([answer])!r}; sparse top-1 {top1} {model.decode([top1])!r}", flush=True)
  if top1 != answer:
    print(f"WARNING: the sparse model does not write the answer here (a failed retrieval): the metric is the "
          f"logit of {model.decode([answer])!r} after {model.decode(written)!r}", flush=True)
  metric = lambda r: r.logits[0, answer]  # noqa: E731

  t0 = time.time()
  attr = edge_attribution(model, model.params, ids, metric, attention=cfg, last_only=True)
  t_grad = time.time() - t0
  n_edges = sum(int((np.asarray(m.indices) >= 0).sum()) for m in attr.masks)
  print(f"metric {float(attr.value):.4f}; gradients of {n_edges} edges in {t_grad:.0f} s", flush=True)

  edges = top_edges(attr, args.top)
  rng = np.random.default_rng(args.seed)
  if args.random:
    everything = top_edges(attr, n_edges)[args.top:]
    for i in rng.choice(len(everything), size=min(args.random, len(everything)), replace=False):
      edges.append(dict(everything[i], random=True))
  rows = []
  t0 = time.time()
  for e in edges:
    masks = drop_edge(attr.masks, e["layer"], e["row"], e["head"], e["q_block"], e["slot"])
    r = forward(model, model.params, ids, attention=cfg, last_only=True,
                intervention=intervene.Intervention(masks=masks))
    e = dict(e, measured=float(metric(r)) - float(attr.value))
    rows.append(e)
    print(f"  L{e['layer']:2d} h{e['head']} q{e['q_block']:3d} k{e['key_block']:3d}  AtP {e['estimate']:+.4f}  "
          f"ablation {e['measured']:+.4f}{'  (random)' if e.get('random') else ''}", flush=True)
  t_abl = time.time() - t0
  top = [r for r in rows if not r.get("random")]
  est, real = np.array([r["estimate"] for r in top]), np.array([r["measured"] for r in top])
  rho, r_p = spearman(est, real), float(np.corrcoef(est, real)[0, 1])
  sign = float(np.mean(np.sign(est) == np.sign(real)))
  print(f"\ntop {len(top)} edges by |AtP|: Spearman {rho:+.3f}, Pearson {r_p:+.3f}, sign agreement {sign:.2f}")
  if len(rows) > len(top):
    est_a, real_a = np.array([r["estimate"] for r in rows]), np.array([r["measured"] for r in rows])
    print(f"with {len(rows) - len(top)} random kept edges: Spearman {spearman(est_a, real_a):+.3f}, "
          f"Pearson {float(np.corrcoef(est_a, real_a)[0, 1]):+.3f}")
  print(f"time: attribution {t_grad:.0f} s, {len(rows)} ablations {t_abl:.0f} s")
  needle = set(sample.needle_blocks(args.block))
  print(f"top edges reading a needle block: {sum(r['key_block'] in needle for r in top)}/{len(top)}")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(dict(length=int(ids.shape[1]), answer=sample.answers[0], spearman=rho, pearson=r_p, rows=rows), f,
                indent=1)


if __name__ == "__main__":
  main()
