"""Faithfulness of Stream traces on real weights and real prose: dense vs sparse over the pruned regime.

At short T most query blocks keep every visible key block, so the sparse model is exactly dense there and
averages over all positions flatter it. This benchmark measures where pruning happens: from the first query
block whose searchable key blocks (causally visible, strictly between the sink and the window blocks)
outnumber top_k. Per source, T and config it reports, over that regime and at the last position:
KL(dense || stream) mean and p99, top-1 agreement, top-5 overlap; the kept fraction of global layers (whole
sequence and pruned rows) and, where traces carry it, the coverage (share of the dense attention inside the
kept blocks) over global layers.

The regime is common to all configs of a (source, T): the one of `--regime-k` (16, the paper's top_k), so
configs compare on the same positions (a config that keeps everything there is exact: KL 0, kept 1.0).
Each row also gives the config's own regime (`own_start`, `kl_mean_own`, `top1_own`).

Configs (`--configs`, comma list):
  k<N>          StreamConfig(top_k=N) (estimated by the representative's max logit)
  mass<N>       the same with score="mass" (if this StreamConfig has the field)
  oracle<N>     representative="oracle": the exact top-N blocks by max logit, O(T^2) (CPU: T <= 8k)
  adaptive<P>   StreamConfig(coverage=P/100, top_k=--adaptive-max-k); adaptive<P>k<N> sets top_k=N
  exact         forward(..., attention=StreamConfig(), output="exact"): dense logits, Stream mask, coverage
  ideal<P>      StreamConfig.ideal(coverage=P/100, top_k=--adaptive-max-k), output="exact": the ideal kept set
                (blocks by true dense mass; its coverage is exact, so kept is the ideal selector's cost)
  idealsparse<P> the same set with output="sparse": the model attends through the ideal set (the frontier)
  table<P>[q<Q>][s<S>][L<l>x<S>...]  StreamConfig.table(coverage=P/100, top_k=--adaptive-max-k): every causal
                block scored by the true mass every Q-th query (default 4) gives it, the ideal set of that
                sample (dropped_scale / layer_scales S raise the sample's target to 1 - (1 - P/100) / S)
  adaptive<P>[k<N>]s<S>  the adaptive budget with StreamConfig.dropped_scale = S (a calibrated budget, see
                stream_jax.experiments.calibration and benchmarks/ideal_calibration.py)
  adaptive<P>[k<N>][s<S>]L<l>x<S>...  per-layer scales (StreamConfig.layer_scales, what `stream-jax
                calibrate` fits), e.g. adaptive90L5x4L11x12L17x1.5
  adaptive<P>[k<N>]q<Q>...  the estimator scores with every Q-th query (StreamConfig.query_stride = Q: 1/Q of
                its scoring work), e.g. adaptive95q4, adaptive90q4L5x4L11x12
  adaptive<P>[k<N>]g<G>...  one search (and kept set) shared by G neighbouring query blocks: block_q = G x
                --block over --block key blocks, scored by every G-th query (unless q<Q> says otherwise), so
                the search's nodes per query block fall G-fold, e.g. adaptive95g4
  adaptive<P>[k<N>]p<S>...  the search's upper rounds shared by S neighbouring query blocks, each scoring the
                last round with its own queries and keeping its own set (StreamConfig.search_share = S),
                e.g. adaptive95k32p4
  <name>-exact  any config above with output="exact": its trace's coverage is then the *true* coverage of
                the estimator's kept set (the calibration column: asked vs true)

Sources: benchmarks/corpora.py (READMEs of installed distributions, scipy docstrings; torch_docs on request).

  # CPU (tokenizes the corpora with the embedded model's tokenizer)
  python benchmarks/faithfulness.py --lengths 4k --configs k16,k64,oracle16
  # token files for a machine without the corpora's packages or the tokenizer
  python benchmarks/faithfulness.py --dump-tokens benchmarks/tokens
  # GPU, from token files and a GGUF path
  python benchmarks/faithfulness.py --tokens benchmarks/tokens --gguf /path/gemma-3-270m-q4_k_m.gguf \\
      --lengths 4k,8k,16k,32k --plot
  # RESULTS.md table from the jsonl
  python benchmarks/faithfulness.py --markdown
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import re
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import corpora  # noqa: E402  pylint: disable=wrong-import-position
from stream_jax import StreamConfig  # noqa: E402  pylint: disable=wrong-import-position
from stream_jax.analysis import faithfulness as faithfulness_lib  # noqa: E402  pylint: disable=wrong-import-position
from stream_jax.analysis.faithfulness import output_metrics_from_hidden  # noqa: E402  pylint: disable=wrong-import-position
from stream_jax.mask import BlockMask, kept_fraction  # noqa: E402  pylint: disable=wrong-import-position

DEFAULT_CONFIGS = "k8,k16,k32,k64,k128,oracle16,adaptive90,adaptive95,exact"
DEFAULT_OUT = "benchmarks/results/faithfulness.jsonl"
DEFAULT_PLOT = "benchmarks/results/faithfulness.png"
REGIME_K = 16


def parse_lengths(text: str) -> list[int]:
  out = []
  for part in text.split(","):
    part = part.strip().lower()
    if not part:
      continue
    mult = 1024 if part.endswith("k") else 1
    value = int(float(part.rstrip("k")) * mult)
    if value < 2:
      raise argparse.ArgumentTypeError(f"--lengths: every length must be >= 2, got {part!r}")
    out.append(value)
  return out


# ---------------------------------------------------------------------------------------------------------
# Pruned regime
# ---------------------------------------------------------------------------------------------------------

def pruned_start(t: int, *, block_q: int, block_k: int, sink_blocks: int, window_blocks: int,
                 top_k: int) -> int:
  """First position of the first query block with more searchable key blocks than top_k; t if none
  (`stream_jax.analysis.faithfulness.pruned_start` with the fields spelled out)."""
  cfg = StreamConfig(block_q=block_q, block_k=block_k, sink_blocks=sink_blocks,
                     window_blocks=window_blocks, top_k=top_k, coverage=None)
  return faithfulness_lib.pruned_start(t, cfg)


def config_start(t: int, cfg: StreamConfig, top_k: Optional[int] = None) -> int:
  return pruned_start(t, block_q=cfg.block_q, block_k=cfg.block_k, sink_blocks=cfg.sink_blocks,
                      window_blocks=cfg.window_blocks, top_k=cfg.top_k if top_k is None else top_k)


# ---------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  config: StreamConfig
  output: str = "sparse"


_STRIDE = re.compile(r"(?<=\d)q(\d+)")  # q<Q> after a number: StreamConfig.query_stride = Q
_GROUP = re.compile(r"(?<=\d)g(\d+)")  # g<G> after a number: G query blocks share one search
_SHARE = re.compile(r"(?<=\d)p(\d+)")  # p<S> after a number: StreamConfig.search_share = S


def make_variant(name: str, base: StreamConfig, adaptive_max_k: int = 128) -> Variant:
  """The forward call a config name stands for; ValueError if the name is not one."""
  if name.endswith("-exact"):
    inner = make_variant(name[:-len("-exact")], base, adaptive_max_k)
    return Variant(name, inner.config, output="exact")
  m = re.fullmatch(r"(ideal|idealsparse)(\d+)", name)
  if m:
    pct = int(m.group(2))
    if not 0 < pct <= 100:
      raise ValueError(f"--configs: {name!r}: the coverage target must be in (0, 100]")
    cfg = base.replace(top_k=adaptive_max_k, coverage=pct / 100, select="ideal")
    return Variant(name, cfg, output="exact" if m.group(1) == "ideal" else "sparse")
  m = re.fullmatch(r"table(\d+)(?:q(\d+))?(?:s(\d+(?:\.\d+)?))?((?:L\d+x\d+(?:\.\d+)?)*)", name)
  if m:
    pct = int(m.group(1))
    if not 0 < pct <= 100:
      raise ValueError(f"--configs: {name!r}: the coverage target must be in (0, 100]")
    layers = {int(l): float(x) for l, x in re.findall(r"L(\d+)x(\d+(?:\.\d+)?)", m.group(4))}
    return Variant(name, base.replace(top_k=adaptive_max_k, coverage=pct / 100, select="table",
                                      query_stride=int(m.group(2) or 4), dropped_scale=float(m.group(3) or 1),
                                      layer_scales=layers))
  m = re.fullmatch(r"(k|mass|oracle)(\d+)|adaptive(\d+)(?:k(\d+))?(?:s(\d+(?:\.\d+)?))?((?:L\d+x\d+(?:\.\d+)?)*)"
                   r"|exact(\d+)?", _SHARE.sub("", _GROUP.sub("", _STRIDE.sub("", name, count=1), count=1),
                                               count=1))
  stride, group, share = _STRIDE.search(name), _GROUP.search(name), _SHARE.search(name)
  if m is None:
    raise ValueError(f"--configs: unknown config {name!r} (k<N>, mass<N>, oracle<N>, adaptive<P>[k<N>][q<Q>][s<S>][L<l>x<S>...], "
                     "exact, ideal<P>, idealsparse<P>, <name>-exact)")
  if (stride or group or share) and not name.startswith("adaptive"):
    raise ValueError(f"--configs: {name!r}: q<Q> (a query stride), g<G> (a shared search) and p<S> (shared "
                     "upper rounds) are for adaptive<P> budgets")
  if m.group(1):
    kind, k = m.group(1), int(m.group(2))
    if kind == "k":
      return Variant(name, base.replace(top_k=k))
    if kind == "oracle":
      return Variant(name, base.replace(top_k=k, representative="oracle"))
    return Variant(name, base.replace(top_k=k, score="mass"))
  if name.startswith("adaptive"):
    pct = int(m.group(3))
    if not 0 < pct <= 100:
      raise ValueError(f"--configs: {name!r}: the coverage target must be in (0, 100]")
    k = int(m.group(4)) if m.group(4) else adaptive_max_k
    scale = float(m.group(5)) if m.group(5) else 1.0
    layers = {int(l): float(x) for l, x in re.findall(r"L(\d+)x(\d+(?:\.\d+)?)", m.group(6))}
    g = int(group.group(1)) if group else 1
    return Variant(name, base.replace(top_k=k, coverage=pct / 100, dropped_scale=scale, layer_scales=layers,
                                      block_q=base.block_q * g,
                                      query_stride=int(stride.group(1)) if stride else g,
                                      search_share=int(share.group(1)) if share else 1))
  return Variant(name, base.replace(top_k=int(m.group(7))) if m.group(7) else base, output="exact")


# ---------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------

def _regime_mask(mask: BlockMask, start_block: int) -> BlockMask:
  """The mask of the query blocks from start_block on (queries are the last q_len positions)."""
  return BlockMask(mask.indices[..., start_block:, :], mask.counts[..., start_block:], mask.block_q,
                   mask.block_k, mask.q_len - start_block * mask.block_q, mask.k_len, mask.config)


def trace_stats(trace, start: int) -> dict:
  """Kept fractions (whole sequence, pruned rows) and coverage over the global layers of a trace."""
  layers = trace.select(kind="global")
  out = dict(kept=float(trace.kept_fraction()), kept_pruned=None, coverage=None, coverage_pruned=None,
             coverage_min_head=None, coverage_layers=None, coverage_layer_min=None)
  if not layers:
    return out
  block_q = layers[0].mask.block_q
  sb = start // block_q
  if start < layers[0].mask.q_len:
    out["kept_pruned"] = float(np.mean([np.mean(np.asarray(kept_fraction(_regime_mask(l.mask, sb), l.window)))
                                        for l in layers]))
  cov = [getattr(l, "coverage", None) for l in layers]
  if all(c is not None for c in cov):
    cov = np.stack([np.asarray(c, np.float64).reshape(-1, *np.shape(c)[-2:]).mean(0) for c in cov])  # [L, N, nQ]
    out["coverage"] = float(cov.mean())
    if sb < cov.shape[-1]:
      reg = cov[..., sb:]
      out["coverage_pruned"] = float(reg.mean())
      out["coverage_min_head"] = float(reg.mean(-1).min())
      # per global layer, the mean over heads and pruned query blocks (calibration's criterion)
      out["coverage_layers"] = [float(c) for c in reg.mean((-2, -1))]
      out["coverage_layer_min"] = min(out["coverage_layers"])
  return out


def _stats(kl, top1, top5) -> dict:
  if len(kl) == 0:
    return dict(kl_mean=None, kl_p99=None, top1=None, top5=None)
  return dict(kl_mean=float(np.mean(kl)), kl_p99=float(np.percentile(kl, 99)), top1=float(np.mean(top1)),
              top5=float(np.mean(top5)))


def measure(model, params, tokens: np.ndarray, variant: Variant, dense_final, *, regime_k: int,
            backend: str, chunk: int) -> dict:
  """One Stream forward against the dense residual stream of the same tokens: one result row."""
  from stream_jax.models import forward, logits_from_hidden  # pylint: disable=import-outside-toplevel
  t = int(tokens.shape[-1])
  cfg = variant.config
  kw = {}
  if variant.output == "exact":
    kw["output"] = "exact"
  else:
    kw["coverage"] = True
  t0 = time.perf_counter()
  _run = forward(model, params, jnp.asarray(tokens)[None], attention=cfg, return_hidden=True,
                             last_only=True, backend=backend, **kw)
  trace, hidden = _run.trace, _run.hidden
  stream_final = hidden[-1, 0]
  stream_final.block_until_ready()
  seconds = time.perf_counter() - t0
  del hidden
  start = config_start(t, cfg, regime_k)
  own = config_start(t, cfg)
  first = min(start, own, t - 1)
  # params as an argument of the compiled metrics, not 0.7 GB of folded constants
  logits_fn = jax.tree_util.Partial(lambda p, h: logits_from_hidden(model, p, h), params)
  kl, top1, top5 = (np.asarray(x, np.float64) for x in output_metrics_from_hidden(
      dense_final[first:], stream_final[first:], logits_fn, chunk=chunk))
  row = dict(n_pruned=t - start, pruned_start=start, regime_k=regime_k)
  row.update(_stats(kl[start - first:], top1[start - first:], top5[start - first:]))
  row.update(kl_last=float(kl[-1]), top1_last=float(top1[-1]), top5_last=float(top5[-1]))
  own_stats = _stats(kl[own - first:], top1[own - first:], top5[own - first:])
  row.update(own_start=own, kl_mean_own=own_stats["kl_mean"], top1_own=own_stats["top1"])
  row.update(trace_stats(trace, start))
  row["asked_coverage"] = cfg.coverage
  row["seconds"] = seconds
  return row


def dense_final_state(model, params, tokens: np.ndarray, dense_impl: str):
  """float[T, D]: the dense model's last residual state (before the final norm), and the seconds it took."""
  from stream_jax.models import forward  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  hidden = forward(model, params, jnp.asarray(tokens)[None], attention="dense", return_hidden=True,
                         last_only=True, dense_impl=dense_impl).hidden
  final = hidden[-1, 0]
  final.block_until_ready()
  return final, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------
# Tables and plot
# ---------------------------------------------------------------------------------------------------------

def _config_order(name: str):
  m = re.fullmatch(r"([a-z]+?)(\d*)(?:k(\d+))?", name)
  kinds = ["k", "mass", "oracle", "adaptive", "table", "exact", "ideal", "idealsparse"]
  kind = m.group(1) if m else name
  return (kinds.index(kind) if kind in kinds else len(kinds), int(m.group(2) or 0) if m else 0, name)


def _fmt(v, spec):
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "–"
  text = format(v, spec)
  return text[1:] if text.startswith("-") and float(text) == 0 else text  # -0.0000: rounding of ~-1e-9


def markdown_table(rows: list[dict]) -> str:
  """One row per source x T x config (the latest of duplicates), RESULTS.md style."""
  latest = {}
  for r in rows:
    latest[(r["source"], r["T"], r["config"], r.get("dtype"), r.get("model"))] = r
  rows = sorted(latest.values(), key=lambda r: (r["source"], r["T"], _config_order(r["config"]),
                                                r.get("dtype") or ""))
  head = ("| source | T | config | kept (global) | kept (pruned rows) | pruned from | KL mean | KL p99 | "
          "top-1 | top-5 | KL last | top-1 last | asked coverage | coverage (pruned) | worst head | dtype |")
  lines = [head, "|" + "|".join(["---"] * 3 + ["---:"] * 12 + ["---"]) + "|"]
  for r in rows:
    lines.append("| " + " | ".join([
        r["source"], f"{r['T']:,}", r["config"], _fmt(r.get("kept"), ".1%"), _fmt(r.get("kept_pruned"), ".1%"),
        f"{r['pruned_start']:,}" if r["pruned_start"] < r["T"] else "–",
        _fmt(r.get("kl_mean"), ".4f"), _fmt(r.get("kl_p99"), ".3f"), _fmt(r.get("top1"), ".3f"),
        _fmt(r.get("top5"), ".3f"), _fmt(r.get("kl_last"), ".4f"), _fmt(r.get("top1_last"), ".0f"),
        _fmt(r.get("asked_coverage"), ".2f"), _fmt(r.get("coverage_pruned"), ".3f"), _fmt(r.get("coverage_min_head"), ".3f"),
        r.get("dtype", "")]) + " |")
  return "\n".join(lines)


def plot(rows: list[dict], path: str) -> str:
  """KL mean (log) and top-1 vs kept fraction: a line per T for the fixed-k sweep, marked points for the
  other configs; one column per source."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  # One point per (source, T, config): float32 where both dtypes ran (no bf16 noise floor), else the latest.
  latest = {}
  for r in rows:
    key = (r["source"], r["T"], r["config"], r.get("model"))
    if key not in latest or r.get("dtype") == "float32" or latest[key].get("dtype") != "float32":
      latest[key] = r
  rows = [r for r in latest.values() if r.get("kl_mean") is not None and r.get("kept") is not None]
  sources = sorted({r["source"] for r in rows})
  lengths = sorted({r["T"] for r in rows})
  if not sources:
    raise ValueError("nothing to plot: no row has metrics over a pruned regime")
  fig, axes = plt.subplots(2, len(sources), figsize=(5.5 * len(sources), 7.5), squeeze=False)
  colors = plt.get_cmap("viridis")(np.linspace(0, 0.85, max(len(lengths), 1)))
  markers = {"oracle": "s", "adaptive": "^", "mass": "D", "exact": "*", "idealsparse": "P"}
  for c, src in enumerate(sources):
    for t, color in zip(lengths, colors):
      sel = [r for r in rows if r["source"] == src and r["T"] == t]
      fixed = sorted((r for r in sel if re.fullmatch(r"k\d+", r["config"])), key=lambda r: r["kept"])
      for ax, key in ((axes[0, c], "kl_mean"), (axes[1, c], "top1")):
        if fixed:
          ax.plot([r["kept"] for r in fixed], [max(r[key], 1e-6) for r in fixed], "o-", color=color,
                  label=f"T={t:,} fixed k")
          if key == "kl_mean":
            for r in fixed:
              ax.annotate(r["config"], (r["kept"], max(r[key], 1e-6)), fontsize=7, alpha=0.7,
                          xytext=(3, 3), textcoords="offset points")
        for r in sel:
          kind = re.match(r"[a-z]+", r["config"]).group(0)
          if kind in markers:
            ax.plot(r["kept"], max(r[key], 1e-6), markers[kind], color=color, markersize=8,
                    markeredgecolor="k", label=f"T={t:,} {r['config']}")
    axes[0, c].set_yscale("log")
    axes[0, c].set_ylabel("KL(dense || stream), nats, pruned regime")
    axes[1, c].set_ylabel("top-1 agreement, pruned regime")
    axes[0, c].set_title(src)
    for ax in axes[:, c]:
      ax.set_xlabel("kept fraction (global layers)")
      ax.grid(alpha=0.3)
    axes[1, c].legend(fontsize=7, loc="lower right")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def read_rows(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------

def small_model(seed: int = 0):
  """A 6-layer gemma3-270m-shaped f32 model with random weights and a 4k vocabulary (CI smoke runs)."""
  from stream_jax.models import LoadedModel, get_config, init_params  # pylint: disable=import-outside-toplevel
  base = get_config("gemma3-270m")
  cfg = dataclasses.replace(base, num_layers=6, layer_kinds=base.layer_kinds[:6], vocab_size=4096,
                            name="gemma3-270m-6layers-random")
  return LoadedModel(cfg, init_params(cfg, dtype=jnp.float32, seed=seed), None, jnp.float32, cfg.name)


def load_tokens(args, model, sources) -> dict:
  """{source: int32[n]} from --tokens files, or built from the corpora with the model's tokenizer."""
  out = {}
  for s in sources:
    if args.tokens:
      path = os.path.join(args.tokens, f"{s}.npy")
      if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no token file for source {s!r} (make them with --dump-tokens)")
      out[s] = np.load(path).astype(np.int32)
    else:
      if model.tokenizer is None:
        raise ValueError("this model has no tokenizer: pass --tokens DIR (written by --dump-tokens)")
      out[s] = corpora.source_tokens(s, model.encode, args.max_tokens)
  return out


def main(argv=None, model=None) -> list[dict]:
  """Runs the benchmark; returns the rows written. `model` (a LoadedModel) overrides --gguf (tests)."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sources", default=",".join(corpora.DEFAULT_SOURCES),
                 help=f"comma list of {sorted(corpora.SOURCES)}")
  p.add_argument("--lengths", type=parse_lengths, default=None,
                 help="comma list, k suffix allowed (default 4k,8k on CPU, 4k..32k on GPU)")
  p.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma list of config names (see above)")
  p.add_argument("--block", type=int, default=StreamConfig().block_q, help="block_q = block_k")
  p.add_argument("--adaptive-max-k", type=int, default=128, help="top_k (the cap) of adaptive configs")
  p.add_argument("--regime-k", type=int, default=REGIME_K,
                 help="top_k whose pruned regime the main metrics average over (common to all configs)")
  p.add_argument("--oracle-max-len", type=int, default=None,
                 help="skip oracle configs above this T (default 8192 on CPU, no limit elsewhere)")
  p.add_argument("--gguf", default=None, help="GGUF path of the model (default: the embedded Gemma 3 270M)")
  p.add_argument("--small", action="store_true",
                 help="random-weight 6-layer model with a 4k vocabulary (smoke runs; needs --tokens or "
                      "uses random ids)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="default: float32 on CPU, bfloat16 elsewhere")
  p.add_argument("--backend", default="xla", help="Stream backend: xla | pallas | auto")
  p.add_argument("--dense-impl", default="xla",
                 help="dense reference: xla (exact, chunked; the default) | cudnn")
  p.add_argument("--chunk", type=int, default=256, help="positions per logits chunk (262k vocabulary)")
  p.add_argument("--tokens", default=None, help="read <DIR>/<source>.npy token ids instead of tokenizing")
  p.add_argument("--dump-tokens", default=None, metavar="DIR",
                 help="write <DIR>/<source>.npy (int32, BOS first) and exit")
  p.add_argument("--max-tokens", type=int, default=65_536, help="tokens kept per source")
  p.add_argument("--out", default=DEFAULT_OUT, help="JSON lines file the rows are appended to")
  p.add_argument("--plot", nargs="?", const=DEFAULT_PLOT, default=None, metavar="PNG",
                 help=f"write the curves from every row of --out (default path {DEFAULT_PLOT})")
  p.add_argument("--markdown", action="store_true", help="print the table of every row of --out and exit")
  args = p.parse_args(argv)

  if args.markdown:
    rows = read_rows(args.out)
    print(markdown_table(rows))
    if args.plot:
      print(f"plot: {plot(rows, args.plot)}")
    return rows

  sources = [s.strip() for s in args.sources.split(",") if s.strip()]
  bad = [s for s in sources if s not in corpora.SOURCES]
  if bad:
    p.error(f"--sources: unknown {bad}; choose from {sorted(corpora.SOURCES)}")
  cpu = jax.default_backend() == "cpu"
  dtype = jnp.dtype(args.dtype or ("float32" if cpu else "bfloat16"))

  if args.dump_tokens:
    from stream_jax.models import load_model  # pylint: disable=import-outside-toplevel
    m = model or load_model(args.gguf or "gemma3-270m", jnp.float32, progress=False)
    os.makedirs(args.dump_tokens, exist_ok=True)
    for s in sources:
      ids = corpora.source_tokens(s, m.encode, args.max_tokens)
      np.save(os.path.join(args.dump_tokens, f"{s}.npy"), ids)
      print(f"{s}: {len(ids):,} tokens ({corpora.source_versions(s)}) -> {args.dump_tokens}/{s}.npy")
    return []

  lengths = args.lengths or ([4096, 8192] if cpu else [4096, 8192, 16384, 32768])
  oracle_max = args.oracle_max_len if args.oracle_max_len is not None else (8192 if cpu else 1 << 62)
  dense_impl = args.dense_impl
  base = StreamConfig(block_q=args.block, block_k=args.block)
  variants = []
  for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
    try:
      variants.append(make_variant(name, base, args.adaptive_max_k))
    except ValueError as e:
      p.error(str(e))

  if model is None:
    if args.small:
      model = small_model()
    else:
      from stream_jax.models import load_model  # pylint: disable=import-outside-toplevel
      model = load_model(args.gguf or "gemma3-270m", dtype, tokenizer=args.tokens is None)
  elif jnp.dtype(model.dtype) != dtype:
    model = model.astype(dtype)
  dtype = jnp.dtype(model.dtype)
  if args.small and not args.tokens:
    rng = np.random.default_rng(0)
    tokens = {s: np.concatenate([[model.config.bos_id], rng.integers(3, model.config.vocab_size,
                                                                      max(lengths) - 1)]).astype(np.int32)
              for s in sources}
  else:
    tokens = load_tokens(args, model, sources)
  model_name = os.path.basename(model.source) if model.source else model.config.name
  device = jax.devices()[0].device_kind
  print(f"device: {device} ({jax.default_backend()}), model {model_name}, {dtype.name}, block {args.block}, "
        f"lengths {lengths}, configs {[v.name for v in variants]}", flush=True)

  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  jobs = [(s, t) for s in sources for t in lengths]
  bar = tqdm(total=len(jobs) * (len(variants) + 1), desc="faithfulness", file=sys.stderr)
  rows = []
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  date = datetime.datetime.now().isoformat(timespec="seconds")
  for s, t in jobs:
    ids = tokens[s]
    if len(ids) < t:
      print(f"note: {s} has {len(ids):,} tokens < T={t:,}; skipped", flush=True)
      bar.update(len(variants) + 1)
      continue
    ids = ids[:t]
    bar.set_postfix_str(f"{s} T={t} dense")
    dense_final, dense_seconds = dense_final_state(model, model.params, ids, dense_impl)
    bar.update()
    run_rows = []
    for v in variants:
      bar.set_postfix_str(f"{s} T={t} {v.name}")
      if v.config.representative == "oracle" and t > oracle_max:
        print(f"note: skipping {v.name} at T={t:,} (> --oracle-max-len {oracle_max:,}; O(T^2))", flush=True)
        bar.update()
        continue
      row = dict(source=s, T=t, config=v.name, top_k=v.config.top_k, representative=v.config.representative,
                 score=v.config.score, coverage_target=v.config.coverage, select=v.config.select,
                 dropped_scale=v.config.dropped_scale,
                 output=v.output, block=args.block, dtype=dtype.name, model=model_name, device=device,
                 backend=args.backend, dense_impl=dense_impl, dense_seconds=dense_seconds, date=date)
      row.update(measure(model, model.params, ids, v, dense_final, regime_k=args.regime_k,
                         backend=args.backend, chunk=args.chunk))
      run_rows.append(row)
      with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
      bar.update()
    rows += run_rows
    if run_rows:
      tqdm.write(f"\n{s}, T={t:,} (dense forward {dense_seconds:.1f} s)\n{markdown_table(run_rows)}\n",
                 file=sys.stdout)
  bar.close()
  if args.plot:
    print(f"plot: {plot(read_rows(args.out), args.plot)}")
  return rows


if __name__ == "__main__":
  main()
