"""Causal evidence on the embedded Gemma 3 270M (CPU is fine): are the trace's anchors and routes causal?

1. Thought anchors: a real text (default: the first scipy docstrings, about --tokens tokens) split into
   sentences; receiver-head importance from an exact Stream trace (dense model, the trace observes it);
   attention-suppression importance (Thought Anchors' third method: suppress each sentence in every layer
   and head, mean log KL over later sentences, temperature 0.6). Prints the Spearman rank correlation and
   saves the matrix figure.
2. Route ablation: RULER niah_single_1 samples at one length (--length) over depths, answered greedily by
   the dense model (traced exactly); for answered samples, suppress the needle blocks in the heads where the
   traced route reads them, then as many random kept blocks of the same heads (3 draws), then the needle in
   every head. Prints flip counts and the success-vs-failure needle mass at that same length.

    .venv/bin/python benchmarks/causal.py --out reports/causal              # both parts
    .venv/bin/python benchmarks/causal.py --part routes --lengths 1501,2001 --n 24
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from stream_jax import StreamConfig  # noqa: E402  pylint: disable=wrong-import-position
from stream_jax.analysis import anchors, niah, routes  # noqa: E402  pylint: disable=wrong-import-position
from stream_jax.experiments import ablation  # noqa: E402  pylint: disable=wrong-import-position


def anchors_part(model, args, cfg, out):
  import corpora  # pylint: disable=import-outside-toplevel
  text = args.text and open(args.text, encoding="utf-8").read()
  if not text:
    docs = corpora.docstring_documents("scipy")
    text = "\n\n".join(d for _, d in docs)
  enc = model.tokenizer(text, return_offsets_mapping=True)
  offsets = np.asarray(enc["offset_mapping"])
  if len(offsets) > args.tokens:
    text = text[: int(offsets[args.tokens - 1, 1])]
    enc = model.tokenizer(text, return_offsets_mapping=True)
    offsets = np.asarray(enc["offset_mapping"])
  ids = np.asarray(enc["input_ids"], np.int32)
  sents = anchors.sentences(text, offsets)
  if args.max_sentences and len(sents) > args.max_sentences:
    raise SystemExit(f"{len(sents)} sentences > --max-sentences {args.max_sentences}")
  t0 = time.time()
  run = model.forward(ids, attention=cfg, output="exact", last_only=True).row(0)
  rep = anchors.thought_anchors(run.trace, sents)
  t_trace = time.time() - t0
  t0 = time.time()
  sm = ablation.suppression_matrix(model, model.params, ids, sents.tokens, batch=args.batch)
  t_sup = time.time() - t0
  rho = sm.correlation(rep.importance)
  print(f"\n== attention suppression vs receiver heads: {len(ids)} tokens, {len(sents)} sentences ==")
  print(f"Spearman rank correlation (suppression importance vs receiver-head importance): {rho:+.3f}")
  print(f"trace {t_trace:.0f} s, {len(sents)} suppressions {t_sup:.0f} s")
  top_s = np.argsort(-np.nan_to_num(sm.importance, nan=-np.inf))[:5]
  top_r = np.argsort(-np.nan_to_num(np.asarray(rep.importance), nan=-np.inf))[:5]
  print("top-5 by suppression:", top_s.tolist(), " top-5 by receiver heads:", top_r.tolist(),
        " overlap:", len(set(top_s) & set(top_r)))
  np.savez(os.path.join(out, "suppression.npz"), matrix=sm.matrix, importance=sm.importance,
           receiver=np.asarray(rep.importance), spans=sm.spans)
  from stream_jax import plots  # pylint: disable=import-outside-toplevel
  plots.save(plots.plot_suppression(sm, np.asarray(rep.importance)), os.path.join(out, "suppression.png"))
  return dict(tokens=int(len(ids)), sentences=len(sents), spearman=rho, trace_s=t_trace, suppression_s=t_sup,
              top5_suppression=top_s.tolist(), top5_receiver=top_r.tolist())


def routes_part(model, args, cfg, out, length):
  depths = [10 + 80 * (i + 0.5) / args.n for i in range(args.n)]
  samples = [niah.generate_sample(model.tokenizer, length, niah.NiahTask(depths=(d,)), seed=args.seed + i)
             for i, d in enumerate(depths)]
  t0 = time.time()
  ver = ablation.verify_routes(model, model.params, samples, cfg, n_random=args.random, seed=args.seed,
                               tokenizer=model.tokenizer, everywhere=True, max_new_tokens=12)
  secs = time.time() - t0
  print(f"\n== route ablation: {args.n} samples of {length} tokens ==")
  print(ver.format())
  ok = [s.answered for s in ver.samples]
  comp = routes.compare([s.needle_mass for s in ver.samples], ok)
  print(comp.format())
  print(f"answered {sum(ok)}/{len(ok)} at {length} tokens")
  for s in ver.samples:
    print(f"  depth {s.depth:5.1f}% answered={s.answered} route_heads={s.route_heads} "
          f"needle_blocks={list(s.needle_blocks)} route_flip={s.route_flipped} "
          f"random_flips={s.random_flipped}/{s.random_runs} everywhere_flip={s.everywhere_flipped} "
          f"pred={s.prediction.strip()[:20]!r} after_route={s.route_prediction.strip()[:20]!r}")
  print(f"{secs:.0f} s")
  from stream_jax import plots  # pylint: disable=import-outside-toplevel
  plots.save(plots.plot_ablation(ver.counts(), title=f"route ablation at {length} tokens"),
             os.path.join(out, f"route_ablation_{length}.png"))
  return dict(length=length, counts=ver.counts(), seconds=secs,
              samples=[dict(depth=s.depth, answered=s.answered, route_heads=s.route_heads,
                            needle_blocks=list(s.needle_blocks), route_flipped=s.route_flipped,
                            random_flipped=s.random_flipped, random_runs=s.random_runs,
                            everywhere_flipped=s.everywhere_flipped) for s in ver.samples])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--part", choices=("anchors", "routes", "all"), default="all")
  ap.add_argument("--out", default="reports/causal")
  ap.add_argument("--text", default=None, help="text file for part 1 (default: scipy docstrings)")
  ap.add_argument("--tokens", type=int, default=2048)
  ap.add_argument("--max-sentences", type=int, default=0)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--lengths", default="1500", help="comma-separated prompt lengths (route ablation per length)")
  ap.add_argument("--n", type=int, default=16)
  ap.add_argument("--random", type=int, default=3)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--block", type=int, default=16)
  ap.add_argument("--gguf", default=None, help="GGUF file (default: the embedded Gemma 3 270M)")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--tokenizer", default=None, help="a tokenizer directory (tokenizer.json ...) to use instead "
                  "of the model's (e.g. the cached conversion of the GGUF's, carried to another machine)")
  args = ap.parse_args(argv)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from stream_jax.models import load_model  # pylint: disable=import-outside-toplevel
  os.makedirs(args.out, exist_ok=True)
  model = load_model(args.gguf or "gemma3-270m", getattr(jnp, args.dtype), progress=False,
                     tokenizer=args.tokenizer is None)
  if args.tokenizer:
    import dataclasses  # pylint: disable=import-outside-toplevel
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
    model = dataclasses.replace(model, tokenizer=AutoTokenizer.from_pretrained(args.tokenizer,
                                                                             local_files_only=True))
  probe = "The special magic number is 1234567."
  print(f"tokenizer: {len(model.encode(probe))} tokens for {len(probe)} characters", flush=True)
  cfg = StreamConfig(block_q=args.block, block_k=args.block)
  result = dict(config=dict(block=args.block, top_k=cfg.top_k))
  if args.part in ("anchors", "all"):
    result["anchors"] = anchors_part(model, args, cfg, args.out)
  if args.part in ("routes", "all"):
    result["routes"] = [routes_part(model, args, cfg, args.out, int(n)) for n in args.lengths.split(",")]
  with open(os.path.join(args.out, f"causal_{args.part}.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1, default=float)


if __name__ == "__main__":
  main()
