"""Evidence for the analysis modules on the embedded Gemma 3 270M (CPU).

1. RULER niah_single_1 (noise haystack, 7-digit value) at ~600 and ~3,000 tokens: greedy answers of the
   Stream-traced model (default StreamConfig prefill), scored by string_match_all; the same prompts answered
   with dense attention for comparison.
2. Routes: per layer and head, the needle mass at the final query block; the pruned rollout from the final
   block down to the needle; successes vs failures (where failures lose the needle).
   Thought anchors end to end on a short hand-written chain of thought (pipeline demo).
3. Faithfulness of the default StreamConfig across 1k-4k tokens: next-token KL, top-1/top-5 agreement at
   every position and at the last, per-layer residual error, kept fractions (optionally oracle recall).
4. PNGs under --out.

    .venv/bin/python benchmarks/analysis_evidence.py --out reports/analysis

Runtime on 2 shared CPU cores with the defaults: printed at the end (see README; use --n 4 and
--faith-lengths 2048,4096 for a quicker look, --dense-check to also answer every prompt densely).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from stream_jax import StreamConfig, plots
from stream_jax import experiments as ex
from stream_jax.analysis import faithfulness, niah


def run_niah(model, length, n, seed, cfg, dense_check):
  """Samples of one length, answered in one batch with Stream (and dense), traced, scored, routed."""
  # Depths on a grid over 15-95%: a needle in the first block would share it with the attention sink (BOS),
  # whose mass would then count as needle mass at block resolution.
  depths = [15 + 80 * (i + 0.5) / n for i in range(n)]
  samples = [niah.generate_sample(model.tokenizer, length, niah.NiahTask(depths=(d,)), seed=seed + i)
             for i, d in enumerate(depths)]
  t = time.time()
  rows = ex.answer_niah(model, samples, ex.Settings(cfg, backend="xla"), max_new_tokens=10, batch_size=n,
                        dense=dense_check, route=dict(residual=0.5, threshold=1e-4), depths=depths,
                        seeds=[seed + i for i in range(n)])
  return rows, time.time() - t


def in_sink(row, cfg):
  return min(row.needle_blocks) < cfg.sink_blocks


def token_depth(row):
  return row.sample.queried_needles[0].token_span[0] / row.length


# The question comes first, as in a real prompt: the first key block (BOS, the attention sink) then holds no
# sentence of the chain, whose share of the sink's mass would otherwise inflate the first sentence's score.
COT = """Question: Sara has 48 apples. She gives a quarter of them to Tom, then 5 apples to each of her 3
friends. How many apples does Sara have left?
<think>The problem asks how many apples Sara has left after giving some away. We are given that Sara starts
with 48 apples. She gives a quarter of them to Tom. Then she gives 5 apples to each of her 3 friends.

Let me first find a quarter of 48. I know that a quarter means dividing by 4. So 48 / 4 = 12. Sara gives 12
apples to Tom. That leaves 48 - 12 = 36 apples.

Next, I need the apples for the friends. Each friend gets 5 apples and there are 3 friends. So 5 * 3 = 15
apples. Subtracting, 36 - 15 = 21 apples remain.

Wait, let me check the question again. Does she give 5 apples in total or 5 to each friend? It says 5 apples
to each of her 3 friends, so 15 in total is right. Let me verify the first step too. 12 * 4 = 48, correct.

Hmm, maybe the quarter should be taken after the friends? No, the order in the problem is Tom first. So the
computation order is fine. Therefore Sara has 21 apples left. Let me double-check the arithmetic once more.
48 - 12 is 36, and 36 - 15 is 21. The final answer is 21.</think> Sara has 21 apples left."""


def run_anchors(model, cfg, out):
  """The thought-anchor pipeline end to end on the real model (a short chain: Stream keeps every block
  below ~1k tokens, so this shows the pipeline, not pruning)."""
  res = ex.anchors_for_text(model, COT, ex.Settings(cfg.replace(block_q=16, block_k=16), backend="xla"))
  rep = res.report
  print(f"\n== thought anchors: {len(res.sentences)} sentences, {len(res.ids)} tokens, blocks of 16; "
        "receiver heads " + " ".join(f"L{l}H{h}" for l, h in np.asarray(rep.heads)[:8]) + " ... ==")
  for i, score, label, text in rep.top(5):
    print(f"  #{i:2d} {score:.4f} {label:24s} {text[:60]!r}")
  print("  by category: " + ", ".join(f"{k} {v[0]:.4f} (n={v[1]})" for k, v in rep.categories.items()))
  return [plots.save(plots.plot_vertical_scores(rep.importance, rep.labels, texts=res.sentences.texts),
                     os.path.join(out, "anchors_importance.png")),
          plots.save(plots.plot_kurtosis_grid(rep.kurtosis, heads=rep.heads),
                     os.path.join(out, "anchors_kurtosis.png"))]


def faithfulness_rows(model, lengths, cfg, oracle, seed):
  out, reports = [], []
  for length in lengths:
    s = niah.generate_sample(model.tokenizer, length, seed=seed + length)
    t = time.time()
    pair = ex.faithfulness_pair(model, s.ids, ex.Settings(cfg, backend="xla"), oracle=oracle)
    row = dict(length=float(length), **pair.report.summary(), seconds=time.time() - t)
    out.append(row)
    reports.append(pair.report)
    print(f"  faithfulness at {length} tokens: {row['seconds']:.0f} s", flush=True)
  return out, reports


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="reports/analysis")
  ap.add_argument("--n", type=int, default=6, help="NIAH samples per length")
  ap.add_argument("--lengths", default="600,3000", help="NIAH prompt lengths (tokens)")
  ap.add_argument("--faith-lengths", default="1024,2048,3072,4096", help="'' to skip")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--oracle", action="store_true", help="also measure recall of the oracle top-k (slower)")
  ap.add_argument("--dense-check", action="store_true", help="also answer every prompt with dense attention")
  args = ap.parse_args(argv)
  t0 = time.time()
  os.makedirs(args.out, exist_ok=True)
  from stream_jax.models import load_model  # pylint: disable=import-outside-toplevel
  model = load_model("gemma3-270m")
  cfg = StreamConfig()
  print(f"model loaded in {time.time() - t0:.0f} s; StreamConfig: {cfg}", flush=True)
  kinds = model.config.layer_kinds

  # ---- 1-2. NIAH + routes -------------------------------------------------------------------------------
  all_rows = []
  for length in [int(x) for x in args.lengths.split(",")]:
    rows, secs = run_niah(model, length, args.n, args.seed, cfg, args.dense_check)
    all_rows += rows
    ok = [r.success for r in rows]
    dense = [r.dense_score for r in rows if r.dense_score is not None]
    kept = rows[0].kept_fraction
    print(f"\n== NIAH single_1 at {length} tokens: Stream {sum(ok)}/{len(ok)} "
          f"(string_match_all {100 * np.mean([r.score for r in rows]):.0f})"
          + (f", dense {int(sum(dense))}/{len(dense)}" if dense else "")
          + f"; kept fraction (global layers) {kept:.3f}; Stream generate {secs:.0f} s")
    print("  depth  success  needle-mass@final(max head, global layers)  needle-flow@L0  prediction")
    glob = [i for i, k in enumerate(kinds) if k == "global"]
    for r in rows:
      nm_g = r.needle_mass[glob].max(-1)
      print(f"  {token_depth(r):5.2f}  {str(r.success):7s}  "
            + " ".join(f"L{i}:{v:.3f}" for i, v in zip(glob, nm_g))
            + f"   {float(r.route.needle_flow[0]):.4f}   {r.prediction[:40]!r}"
            + ("" if r.dense_prediction is None else f"  dense: {r.dense_prediction[:24]!r}"))

  sink = [r for r in all_rows if in_sink(r, cfg)]
  if sink:
    print(f"\n{len(sink)} sample(s) with the needle in the sink block are left out of the comparison")
  all_rows = [r for r in all_rows if not in_sink(r, cfg)]
  success = [r.success for r in all_rows]
  comp = ex.compare_niah_rows(all_rows)
  print("\n== needle mass at the final query block, successes vs failures (all lengths) ==")
  print(comp.format())
  for length in sorted({r.length for r in all_rows}):
    rows = [r for r in all_rows if r.length == length]
    ok = [r.success for r in rows]
    if any(ok) and not all(ok):  # within one length: no confound with the haystack size
      print(f"\n== the same at {length} tokens only ==")
      print(ex.compare_niah_rows(rows).format())
  long_rows = [r for r in all_rows if r.length == max(x.length for x in all_rows)]
  glob = [i for i, k in enumerate(kinds) if k == "global"]
  for length in sorted({r.length for r in all_rows}):
    for want in (True, False):
      nm = [r.needle_mass[glob] for r in all_rows if r.length == length and r.success == want]
      if nm:
        print(f"global layers {glob}, {length} tokens, {'successes' if want else 'failures'} ({len(nm)}): "
              "needle mass mean over heads " + " ".join(f"{v:.3f}" for v in np.mean(nm, 0).mean(-1))
              + ", max head " + " ".join(f"{v:.3f}" for v in np.mean(nm, 0).max(-1)))
  flow_s = [float(r.route.needle_flow[0]) for r, o in zip(all_rows, success) if o]
  flow_f = [float(r.route.needle_flow[0]) for r, o in zip(all_rows, success) if not o]
  print(f"\nrollout needle flow at layer 0 (share of the final block's information on needle blocks): "
        f"successes {np.mean(flow_s) if flow_s else float('nan'):.4f}, "
        f"failures {np.mean(flow_f) if flow_f else float('nan'):.4f}")

  # plots of routes
  out = lambda name: os.path.join(args.out, name)  # pylint: disable=unnecessary-lambda-assignment
  files = [plots.save(plots.plot_success_failure(comp.success, comp.failure), out("needle_mass.png"))]
  for tag, want in (("success", True), ("failure", False)):
    pick = [r for r in long_rows if r.success == want] or [r for r in all_rows if r.success == want]
    if pick:
      r = pick[0]
      title = f"route ({tag}, {r.length} tokens, needle depth {token_depth(r):.2f})"
      files.append(plots.save(plots.plot_route(r.route, needle_blocks=r.needle_blocks, title=title),
                              out(f"route_{tag}.png")))
      g = [l for l in r.trace.layers if l.kind == "global"][-1]
      title = f"layer {g.layer} (global), mean over heads, {tag}"
      files.append(plots.save(plots.plot_block_mask(g.mask, mass=g.mass, title=title), out(f"mask_{tag}.png")))

  with open(out("niah.json"), "w") as f:
    json.dump([dict(length=r.length, depth=token_depth(r), success=r.success, pred=r.prediction,
                    dense_pred=r.dense_prediction, needle_mass=np.asarray(r.needle_mass).tolist())
               for r in all_rows], f, indent=1)

  # ---- 2b. thought anchors on a short hand-written chain of thought --------------------------------------
  files += run_anchors(model, cfg, args.out)

  # ---- 3. faithfulness ----------------------------------------------------------------------------------
  if not args.faith_lengths:
    print("\nwrote " + ", ".join(files))
    print(f"total runtime {time.time() - t0:.0f} s")
    return
  print("\n== faithfulness of the default StreamConfig ==", flush=True)
  frows, reports = faithfulness_rows(model, [int(x) for x in args.faith_lengths.split(",")], cfg,
                                     args.oracle, args.seed)
  keys = ["length", "kept_stream", "kept_overall", "kl_mean", "kl_last", "top1_mean", "top1_last",
          "top5_mean", "resid_err_last_layer"] + (["oracle_recall"] if args.oracle else [])
  print(faithfulness.format_rows(frows, keys))
  print(faithfulness.format_report(reports[-1], f"per layer at {int(frows[-1]['length'])} tokens"))
  files.append(plots.save(plots.plot_faithfulness(frows), os.path.join(args.out, "faithfulness.png")))
  with open(os.path.join(args.out, "faithfulness.json"), "w") as f:
    json.dump(frows, f, indent=1)
  print("\nwrote " + ", ".join(files))
  print(f"total runtime {time.time() - t0:.0f} s")


if __name__ == "__main__":
  main()
