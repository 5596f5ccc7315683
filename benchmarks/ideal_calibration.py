"""Ideal kept sets and the calibrated coverage budget on real weights and real prose (issue 26, items 1-2).

Per key-block size (block_q = block_k), one process, one model:
  1. calibration: `stream_jax.experiments.calibration.calibrate_budget` on a calibration text (the Python
     docs' topics, `pydoc_data`, which the faithfulness sources leave out on purpose) for each target:
     per global layer, the smallest dropped_scale of a grid whose true coverage (exact pass) reaches the
     target, mean over the pruned query blocks (StreamConfig.layer_scales; rows of kind
     "calibration_layers"; the rows of kind "calibration" are the earlier one-scale-for-all fits);
  2. held out, exact passes on the faithfulness sources (readmes, scipy_docs): the ideal kept set (the
     ideal selector's cost), the estimator's kept set uncalibrated and calibrated: their *true* coverage
     (asked vs true) and kept fraction;
  3. `benchmarks/faithfulness.py` on the same sources with idealsparse<P> (the ideal set, sparse output:
     the model attends through it: KL, top-1), and with --sparse-calibrated the estimator's budget
     uncalibrated and calibrated (adaptive<P>, adaptive<P>L<l>x<S>...).
The cap (top_k) is --cap-tokens / block for every config, and every metric is over the same positions:
from the first query block with more searchable key blocks than the cap (faithfulness.py's --regime-k = the
cap, which is also calibrate_budget's "pruned query blocks").

  # CPU: the calibration text's tokens (faithfulness.py --dump-tokens writes the others)
  python benchmarks/ideal_calibration.py --dump-tokens benchmarks/tokens
  # GPU (bf16), from token files and the GGUF
  python benchmarks/ideal_calibration.py --tokens benchmarks/tokens --gguf /path/gemma-3-270m-q4_k_m.gguf \\
      --length 32k --blocks 64,32,16 --out-dir benchmarks/results
  # tables from the JSON lines
  python benchmarks/ideal_calibration.py --summary --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import faithfulness  # noqa: E402  pylint: disable=wrong-import-position

CALIB_SOURCE = "pydoc_topics"
HELD_OUT = ("readmes", "scipy_docs")


def pydoc_text() -> str:
  """The Python docs' topics (the standard library's pydoc_data), in sorted key order."""
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def _scale_key(row: dict):
  """An exact row's budget: its per-layer table (a tuple) or its one dropped_scale."""
  return tuple(tuple(x) for x in row["layer_scales"]) if row.get("layer_scales") else row["dropped_scale"]


def _scale_label(row_or_key) -> str:
  key = _scale_key(row_or_key) if isinstance(row_or_key, dict) else row_or_key
  if isinstance(key, tuple):
    return "per layer " + " ".join(f"{l}:{s:g}" for l, s in key)
  return f"scale {key:g}"


def exact_stats(model, ids: np.ndarray, config, backend: str) -> dict:
  """`calibration.budget_coverage`'s measurement (the same exact forward, so the same compiled executable
  as the calibration's), plus the kept fraction over the pruned rows: per global layer the mean true
  coverage over the pruned query blocks, the kept fraction of the global layers (whole sequence and pruned
  rows)."""
  from stream_jax.analysis.faithfulness import pruned_start  # pylint: disable=import-outside-toplevel
  from stream_jax.models import forward  # pylint: disable=import-outside-toplevel
  start = pruned_start(len(ids), config)
  t0 = time.perf_counter()
  trace = forward(model, model.params, ids, attention=config, output="exact", last_only=True,
                  backend=backend).trace
  layers = trace.select(kind="global")
  cov = [float(np.asarray(l.coverage, np.float64)[..., start // config.block_q:].mean()) for l in layers]
  st = faithfulness.trace_stats(trace, start)
  return dict(coverage_layers=cov, coverage_layer_min=min(cov), coverage_mean=float(np.mean(cov)),
              coverage_min_head=st["coverage_min_head"], kept=float(trace.kept_fraction("global")),
              kept_pruned=st["kept_pruned"], pruned_start=start, seconds=time.perf_counter() - t0)


def run_block(model, args, block: int, calib_ids: np.ndarray, held: dict, out_cal: str, out_faith: str) -> None:
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from stream_jax import StreamConfig  # pylint: disable=import-outside-toplevel
  from stream_jax.experiments import calibration  # pylint: disable=import-outside-toplevel
  cap = args.cap_tokens // block
  t = args.length
  dtype = jnp.dtype(model.dtype).name
  date = datetime.datetime.now().isoformat(timespec="seconds")
  common = dict(T=t, block=block, cap=cap, dtype=dtype, backend=args.backend, date=date,
                query_stride=args.query_stride)

  def write(path, row):
    with open(path, "a") as f:
      f.write(json.dumps(row) + "\n")

  # 1. calibration on the calibration text: one dropped_scale per global layer (StreamConfig.layer_scales)
  chosen = {}
  for p in args.targets:
    cfg = StreamConfig(block_q=block, block_k=block, top_k=cap, coverage=p / 100, query_stride=args.query_stride)
    t0 = time.perf_counter()
    cal = calibration.calibrate_budget(model, calib_ids[:t], cfg, scales=args.scales, backend=args.backend,
                                       progress=False)
    row = dict(kind="calibration_layers", source=CALIB_SOURCE, target=p / 100, reached=cal.reached,
               layer_scales=[list(x) for x in cal.config.layer_scales], unreached=list(cal.unreached),
               coverage_layers=list(cal.coverage.coverage), kept_layers=list(cal.coverage.kept),
               passes=[dict(scales=[list(x) for x in tried], coverage_layers=list(got.coverage),
                            kept_layers=list(got.kept)) for tried, got in cal.passes],
               seconds=time.perf_counter() - t0, **common)
    write(out_cal, row)
    print(f"block {block} cap {cap} target {p}:\n{calibration.summary(cal)} ({row['seconds']:.0f} s)", flush=True)
    chosen[p] = cal.config
  # 2. held out, exact passes: the ideal kept set, the estimator's uncalibrated and calibrated kept sets,
  #    their true coverage
  for s, ids in held.items():
    for p in args.targets + args.ideal_extra:
      variants = [("ideal", StreamConfig.ideal(block_q=block, block_k=block, top_k=cap, coverage=p / 100))]
      if p in args.targets:
        variants += [("search", StreamConfig(block_q=block, block_k=block, top_k=cap, coverage=p / 100,
                                             query_stride=args.query_stride)),
                     ("search", chosen[p])]
      for select, cfg in variants:
        row = dict(kind="exact", source=s, select=select, target=p / 100, dropped_scale=cfg.dropped_scale,
                   layer_scales=[list(x) for x in cfg.layer_scales], calibrated=bool(cfg.layer_scales),
                   **common)
        row.update(exact_stats(model, ids[:t], cfg, args.backend))
        write(out_cal, row)
        print(f"{s} block {block} {select} target {p} {_scale_label(row)}: true coverage per layer "
              f"{_layers(row['coverage_layers'])}, kept {row['kept']:.3f} (pruned rows {row['kept_pruned']:.3f}) "
              f"[{row['seconds']:.1f} s]", flush=True)
  # 3. sparse outputs through faithfulness.py (KL, top-1 against dense over the same pruned positions)
  if args.skip_sparse:
    return
  configs = [f"idealsparse{p}" for p in args.targets]
  if args.sparse_calibrated:  # the estimator's budget, uncalibrated and calibrated, with sparse output
    q = f"q{args.query_stride}" if args.query_stride > 1 else ""
    configs += [f"adaptive{p}{q}" for p in args.targets]
    configs += [f"adaptive{p}{q}" + "".join(f"L{l}x{x:g}" for l, x in chosen[p].layer_scales) for p in args.targets]
  argv = ["--sources", ",".join(held), "--tokens", args.tokens, "--lengths", str(t),
          "--block", str(block), "--adaptive-max-k", str(cap), "--regime-k", str(cap),
          "--configs", ",".join(configs), "--out", out_faith, "--backend", args.backend,
          "--dtype", dtype, "--chunk", str(args.chunk)]
  print("faithfulness.py " + " ".join(argv), flush=True)
  faithfulness.main(argv, model=model)


# ---------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------

def _interp_ideal(ideal_rows: list[dict], cov: float):
  """The ideal selector's kept fraction (global layers) at mean true coverage `cov`: linear through its
  measured (coverage, kept) points, extrapolated from the nearest two outside their range (marked)."""
  pts = sorted((r["coverage_mean"], r["kept"]) for r in ideal_rows)
  if len(pts) < 2:
    return None, False
  i = next((i for i in range(len(pts) - 1) if cov <= pts[i + 1][0]), len(pts) - 2)
  (c0, k0), (c1, k1) = pts[i], pts[i + 1]
  inside = pts[0][0] <= cov <= pts[-1][0]
  return (k0 + (k1 - k0) * (cov - c0) / (c1 - c0) if c1 > c0 else k0), inside


def _f(key, spec):
  return lambda r: format(r[key], spec)


def _layers(v):
  return " ".join(f"{x:.3f}" for x in v)


def summary(out_dir: str) -> str:
  """Markdown tables from --out-dir's ideal_calibration_fit.jsonl (calibration and exact rows) and
  ideal_calibration.jsonl (faithfulness.py rows: sparse outputs)."""
  fit = faithfulness.read_rows(os.path.join(out_dir, "ideal_calibration_fit.jsonl"))
  faith = faithfulness.read_rows(os.path.join(out_dir, "ideal_calibration.jsonl"))
  # per (block, target): the budgets calibrated, each (its key in `ex`, label, fit-text coverage per layer)
  cal = {}
  for r in fit:
    if r["kind"] == "calibration":  # one scale for every layer (the rows of 2026-12-03)
      fits = {x["scale"]: x["coverage_layers"] for x in r["rows"]}
      cal.setdefault((r["block"], r["target"]), {}).update(
          {sc: (f"{sc:g}" + ("" if sc == 1.0 else " (calibrated)" if r["reached"] else " (not reached)"),
                fits.get(sc)) for sc in (1.0, r["chosen_scale"])})
    elif r["kind"] == "calibration_layers":
      key = tuple(tuple(x) for x in r["layer_scales"])
      label = "per layer " + " ".join(f"{l}:{sc:g}" for l, sc in key) + (" (not reached)" if r["unreached"] else "")
      cal.setdefault((r["block"], r["target"]), {}).setdefault(1.0, ("1", None))
      cal[(r["block"], r["target"])][key] = (label, r["coverage_layers"])
  ex = {}
  for r in fit:
    if r["kind"] == "exact":
      ex[(r["block"], r["source"], r["select"], r["target"], _scale_key(r))] = r
  sp = {(r["block"], r["source"], r["config"]): r for r in faith}
  sources = [s for s in HELD_OUT if any(k[1] == s for k in ex)]
  blocks = sorted({k[0] for k in ex})

  def both(rows, fn):
    return " / ".join("–" if r is None else fn(r) for r in rows)

  lines = ["Ideal kept sets (held-out sources: " + " / ".join(sources) + "; coverage = true coverage, mean "
           "over heads and pruned query blocks; per layer min = the lowest global layer's):", "",
           "| block (cap) | target | kept, exact | kept, pruned rows | true coverage | per layer min | "
           "sparse output: KL mean | top-1 change | coverage |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for b in blocks:
    targets = sorted({k[3] for k in ex if k[0] == b and k[2] == "ideal"})
    for p in targets:
      rows = [ex.get((b, s, "ideal", p, 1.0)) for s in sources]
      sps = [sp.get((b, s, f"idealsparse{round(p * 100)}")) for s in sources]
      cap = next(r["cap"] for r in rows if r)
      lines.append(f"| {b} ({cap}) | {p:.2f} | {both(rows, _f('kept', '.3f'))} | "
                   f"{both(rows, _f('kept_pruned', '.3f'))} | {both(rows, _f('coverage_mean', '.3f'))} | "
                   f"{both(rows, _f('coverage_layer_min', '.3f'))} | {both(sps, _f('kl_mean', '.4f'))} | "
                   f"{both(sps, lambda r: format(1 - r['top1'], '.3f'))} | {both(sps, _f('coverage_pruned', '.3f'))} |")
  lines += ["", "Calibration (dropped_scale fit on " + CALIB_SOURCE + "; held out: " + " / ".join(sources) + "):",
            "", "| block | asked | dropped_scale | fit text: true coverage per layer | held out: true coverage per "
            "layer | min − asked | kept | × ideal at same true coverage | × ideal at same target | "
            "sparse output: KL mean | top-1 change |",
            "|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|"]
  for (b, p), budgets in sorted(cal.items()):
    for scale, (label, fit_cov) in sorted(budgets.items(), key=lambda kv: (isinstance(kv[0], tuple), str(kv[0]))):
      rows = [ex.get((b, s, "search", p, scale)) for s in sources]
      got = [r for r in rows if r]
      gap = min(r["coverage_layer_min"] for r in got) - p if got else None
      ratios, same = [], []
      for s, r in zip(sources, rows):
        ideals = [v for k, v in ex.items() if k[0] == b and k[1] == s and k[2] == "ideal"]
        if r is None:
          continue
        k_ideal, inside = _interp_ideal(ideals, r["coverage_mean"])
        ratios.append("–" if k_ideal is None else f"{r['kept'] / k_ideal:.2f}" + ("" if inside else "*"))
        at = ex.get((b, s, "ideal", p, 1.0))
        same.append("–" if at is None else f"{r['kept'] / at['kept']:.2f}")
      pct = round(p * 100)
      stride = max((r.get("query_stride", 1) for r in got), default=1)
      base = f"adaptive{pct}" + (f"q{stride}" if stride > 1 else "")
      name = (base + "".join(f"L{l}x{x:g}" for l, x in scale) if isinstance(scale, tuple)
              else base + ("" if scale == 1.0 else f"s{scale:g}"))
      sps = [sp.get((b, s, name)) for s in sources]
      lines.append(f"| {b} | {p:.2f} | {label} | {_layers(fit_cov) if fit_cov else '–'} | "
                   f"{both(rows, lambda r: _layers(r['coverage_layers']))} | "
                   f"{'–' if gap is None else f'{gap:+.3f}'} | {both(rows, _f('kept', '.3f'))} | "
                   f"{' / '.join(ratios)} | {' / '.join(same)} | {both(sps, _f('kl_mean', '.4f'))} | "
                   f"{both(sps, lambda r: format(1 - r['top1'], '.3f'))} |")
  lines += ["", "(* extrapolated beyond the ideal points measured)"]
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tokens", default="benchmarks/tokens", help="token files (<source>.npy)")
  p.add_argument("--dump-tokens", default=None, metavar="DIR", help=f"write DIR/{CALIB_SOURCE}.npy and exit")
  p.add_argument("--gguf", default=None, help="GGUF path (default: the embedded Gemma 3 270M)")
  p.add_argument("--length", type=lambda s: faithfulness.parse_lengths(s)[0], default=32768)
  p.add_argument("--blocks", default="64,32,16")
  p.add_argument("--targets", default="90,95", help="coverage targets, percent")
  p.add_argument("--ideal-extra", default="", help="more ideal<P> targets (exact), for the interpolation")
  p.add_argument("--cap-tokens", type=int, default=8192, help="top_k (the cap) = this / block")
  p.add_argument("--scales", default=None, help="dropped_scale grid, comma-separated (default: calibration.SCALES)")
  p.add_argument("--query-stride", type=int, default=1, help="the estimator's StreamConfig.query_stride (its "
                 "budgets score with every Q-th query; keep one --out-dir per stride: the tables key rows by "
                 "block and budget)")
  p.add_argument("--sources", default=",".join(HELD_OUT))
  p.add_argument("--sparse-calibrated", action="store_true", help="step 3 also runs the estimator's budget, "
                 "uncalibrated and calibrated (faithfulness.py's adaptive<P> and adaptive<P>L<l>x<S>...)")
  p.add_argument("--skip-sparse", action="store_true", help="skip step 3 (sparse outputs through faithfulness.py)")
  p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 elsewhere")
  p.add_argument("--backend", default="xla")
  p.add_argument("--chunk", type=int, default=256)
  p.add_argument("--out-dir", default="benchmarks/results")
  p.add_argument("--summary", action="store_true", help="print the tables of --out-dir's rows and exit")
  args = p.parse_args(argv)
  if args.summary:
    print(summary(args.out_dir))
    return
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from stream_jax.models import load_model  # pylint: disable=import-outside-toplevel
  if args.dump_tokens:
    m = load_model(args.gguf or "gemma3-270m", jnp.float32, progress=False)
    ids = np.asarray(m.encode(pydoc_text()), np.int32)
    os.makedirs(args.dump_tokens, exist_ok=True)
    np.save(os.path.join(args.dump_tokens, f"{CALIB_SOURCE}.npy"), ids)
    print(f"{CALIB_SOURCE}: {len(ids):,} tokens -> {args.dump_tokens}/{CALIB_SOURCE}.npy")
    return
  args.targets = [int(x) for x in args.targets.split(",") if x]
  args.ideal_extra = [int(x) for x in args.ideal_extra.split(",") if x]
  from stream_jax.experiments.calibration import SCALES  # pylint: disable=import-outside-toplevel
  args.scales = [float(x) for x in args.scales.split(",") if x] if args.scales else list(SCALES)
  args.sources = [s for s in args.sources.split(",") if s]
  dtype = jnp.dtype(args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16"))
  t0 = time.perf_counter()
  model = load_model(args.gguf or "gemma3-270m", dtype, tokenizer=False, progress=False)
  print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, {dtype.name}, model loaded in "
        f"{time.perf_counter() - t0:.0f} s", flush=True)
  calib_ids = np.load(os.path.join(args.tokens, f"{CALIB_SOURCE}.npy")).astype(np.int32)
  if len(calib_ids) < args.length:
    raise ValueError(f"{CALIB_SOURCE} has {len(calib_ids):,} tokens < --length {args.length:,}")
  os.makedirs(args.out_dir, exist_ok=True)
  out_cal = os.path.join(args.out_dir, "ideal_calibration_fit.jsonl")
  out_faith = os.path.join(args.out_dir, "ideal_calibration.jsonl")
  held = {s: np.load(os.path.join(args.tokens, f"{s}.npy")).astype(np.int32) for s in args.sources}
  for b in [int(x) for x in args.blocks.split(",") if x]:
    t1 = time.perf_counter()
    run_block(model, args, b, calib_ids, held, out_cal, out_faith)
    print(f"block {b} done in {time.perf_counter() - t1:.0f} s (total {time.perf_counter() - t0:.0f} s)",
          flush=True)
  print(summary(args.out_dir))


if __name__ == "__main__":
  main()
