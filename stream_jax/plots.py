"""Matplotlib figures of masks, thought-anchor scores, needle routes, coverage and faithfulness.

Each function takes arrays (or an analysis result) and returns a `matplotlib.figure.Figure`; saving is the
caller's choice (`save(fig, "mask.png")`, or `fig.savefig(...)`). Figures are made without pyplot, so no
backend is selected or forced: they save headless, and show in notebooks (`%matplotlib inline`, Colab's
default) when displayed. Block-level pictures only (nQ x nK at most): nothing here draws T x T.

Needs matplotlib: `pip install 'stream-jax[viz]'`.
"""

from __future__ import annotations

import os
import textwrap
from typing import Mapping, Optional, Sequence

import numpy as np

from stream_jax.extras import require

require("matplotlib", "stream_jax.plots")
# pylint: disable=wrong-import-position,wrong-import-order
import matplotlib.colors
import matplotlib.patches
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from stream_jax import checks
from stream_jax.mask import BlockMask

DPI = 110
# Reports show figures at most 1100 px wide (index.html's column): at DPI 110 that is 10 inches. Wider
# figures get scaled down in the page and their legends and tick labels become unreadable.
MAX_WIDTH_IN = 10.0

CATEGORY_COLORS = {
    "problem_setup": "#4c72b0", "plan_generation": "#dd8452", "fact_retrieval": "#55a868",
    "active_computation": "#c44e52", "uncertainty_management": "#8172b3", "result_consolidation": "#937860",
    "self_checking": "#da8bc3", "final_answer_emission": "#8c8c8c", "unknown": "#cccccc",
}


def _title(ax, text: str, width: int = 60) -> None:
  """Titles wrap instead of running off the figure."""
  ax.set_title("\n".join(textwrap.wrap(text, width)) if text else "", fontsize=10)


def _int_ticks(ax, x: bool = True, y: bool = True) -> None:
  """Layers, heads and blocks are integers: no 2.5 or -0.5 ticks."""
  if x:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  if y:
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def save(fig: Figure, path: str | os.PathLike) -> str:
  """Writes `fig` to `path` (PNG, or the format its suffix names), making parent folders; returns the
  path. bbox_inches="tight": titles and outside legends are never cut off."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=DPI, bbox_inches="tight")
  return path


def _figure(nrows: int = 1, ncols: int = 1, **kw):
  """(Figure, axes) without pyplot: no backend, no global figure registry to close."""
  fig = Figure(figsize=kw.pop("figsize", None))
  return fig, fig.subplots(nrows, ncols, **kw)


def _done(fig: Figure) -> Figure:
  fig.tight_layout()
  return fig


def block_matrix(mask: BlockMask, mass=None, head: Optional[int] = None) -> np.ndarray:
  """float[nQ, nK] from a single-sample mask [N, nQ, C]: kept-block mass (or 1 per kept block), for one head
  or averaged over heads. Scatter of the compact indices: nQ x nK, never T x T."""
  idx = np.asarray(mask.indices)
  val = np.ones(idx.shape, np.float64) if mass is None else np.asarray(mass, np.float64)
  if idx.ndim != 3:
    raise ValueError(f"block_matrix needs one sample's mask [N, nQ, C], got indices {idx.shape}")
  if head is not None:
    head = checks.check_index("head", head, idx.shape[0], f" (this mask has {idx.shape[0]} heads)")
    idx, val = idx[head:head + 1], val[head:head + 1]
  out = np.zeros((idx.shape[1], mask.num_k_blocks))
  n, j, c = np.nonzero(idx >= 0)
  np.add.at(out, (j, idx[n, j, c]), val[n, j, c])
  return out / idx.shape[0]


def plot_block_mask(mask: BlockMask, mass=None, head: Optional[int] = None,
                    title: str = "") -> Figure:
  """Heatmap query blocks x key blocks of the kept blocks (coloured by mass when given), one head or the
  mean over heads (then a cell is coloured if any head keeps the block). White cells: not kept."""
  mat = block_matrix(mask, mass, head)
  fig, ax = _figure(figsize=(5.8, 5.2))
  shown = np.where(mat > 0, mat, np.nan)
  finite = shown[np.isfinite(shown)]
  im = ax.imshow(shown, cmap="viridis", interpolation="nearest", aspect="auto",
                 norm=matplotlib.colors.LogNorm() if mass is not None and finite.size and finite.min() > 0
                 else None)
  which = f"head {head}" if head is not None else "mean over heads"
  fig.colorbar(im, ax=ax, label=(f"attention mass per kept block\n(sum over its queries, {which})"
                                 if mass is not None
                                 else f"kept ({'1 = kept' if head is not None else 'share of heads'})"))
  ax.set_xlabel(f"key block ({mask.block_k} tokens each; white = not kept)")
  ax.set_ylabel(f"query block ({mask.block_q} tokens each)")
  _int_ticks(ax)
  _title(ax, title or f"kept key blocks per query block, {which}")
  return _done(fig)


def plot_block_mask_heads(mask: BlockMask, mass=None, title: str = "", max_heads: int = 8) -> Figure:
  """One heatmap per head (the first `max_heads`): the mean over heads hides which head keeps what."""
  n = int(np.asarray(mask.indices).shape[0])
  shown = min(n, max_heads)
  cols = min(shown, 4)
  rows = -(-shown // cols)
  width = min(MAX_WIDTH_IN, 2.3 * cols + 1)
  fig, axes = _figure(rows, cols, figsize=(width, (width - 1) / cols * rows + 1.2), squeeze=False)
  mats = [block_matrix(mask, mass, h) for h in range(shown)]
  vals = np.concatenate([m[m > 0] for m in mats]) if mass is not None else np.ones(1)
  norm = (matplotlib.colors.LogNorm(vals.min(), vals.max()) if mass is not None and vals.size
          and vals.min() > 0 else None)
  im = None
  for h, ax in enumerate(axes.flat):
    if h >= shown:
      ax.axis("off")
      continue
    im = ax.imshow(np.where(mats[h] > 0, mats[h], np.nan), cmap="viridis", interpolation="nearest",
                   aspect="auto", norm=norm)
    ax.set_title(f"head {h}", fontsize=9)
    for axis in (ax.xaxis, ax.yaxis):  # few ticks: 3-digit block ids must not run into each other
      axis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    ax.tick_params(labelsize=7)
    ax.set_xlabel("key block", fontsize=8)
    if h % cols == 0:  # one y label per row: the next panel's label would run into this one's ticks
      ax.set_ylabel("query block", fontsize=8)
  if im is not None:
    fig.colorbar(im, ax=axes.ravel().tolist(), label="attention mass per kept block" if mass is not None
                 else "kept")
  fig.suptitle((title or "kept key blocks per head") + "; white = not kept"
               + (f" (first {shown} of {n} heads)" if shown < n else ""), fontsize=10)
  return fig  # no tight_layout: the shared colour bar spans the axes


def plot_vertical_scores(scores, labels: Sequence[str], title: str = "sentence importance",
                         texts: Optional[Sequence[str]] = None, annotate: int = 3,
                         sink: Sequence[int] = ()) -> Figure:
  """Bar chart of one score per sentence (e.g. AnchorReport.importance), coloured by category; the top
  `annotate` sentences are labelled with their first words. `sink` sentences (sharing the BOS block, see
  AnchorReport.sink_sentences) are hatched and left out of the y range: their score is the attention sink."""
  scores = np.asarray(scores, np.float64)
  if len(labels) != len(scores):
    raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
  sink = [checks.check_index("sink sentence", i, len(scores)) for i in sink]
  fig, ax = _figure(figsize=(min(MAX_WIDTH_IN, max(6, len(scores) * 0.12)), 3.8))
  colors = [CATEGORY_COLORS.get(l, "#333333") for l in labels]
  bars = ax.bar(np.arange(len(scores)), np.nan_to_num(scores), color=colors)
  for i in sink:
    bars[i].set_hatch("///")
    bars[i].set_edgecolor("black")
  rest = np.delete(np.nan_to_num(scores), sink)
  if sink and rest.size and rest.max() > 0:
    ax.set_ylim(0, rest.max() * 1.3)  # the sink would flatten every other bar
  xlabel = "sentence (in order)"
  if sink and rest.size and rest.max() > 0:
    xlabel += ("; hatched = attention sink, y axis cut below it ("
               + ", ".join(f"#{i} {scores[i]:.3g}" for i in sink) + ")")
  if texts is not None:
    for i in np.argsort(-np.nan_to_num(scores, nan=-np.inf))[:annotate]:
      if i not in sink:
        ax.annotate(texts[i][:28], (i, scores[i]), fontsize=7, rotation=20, ha="left", va="bottom")
  shown = [c for c in dict.fromkeys(labels)
           if any(l == c and np.isfinite(v) and v > 0 for l, v in zip(labels, scores))]
  handles = [Patch(color=CATEGORY_COLORS.get(c, "#333333"), label=c.replace("_", " ")) for c in shown]
  if sink:
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="///",
                         label="attention sink (BOS block), not an anchor"))
  if handles:
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.18), ncol=3,
              frameon=False)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("importance (vertical score)")
  _int_ticks(ax, y=False)
  _title(ax, title)
  return _done(fig)


def plot_kurtosis_grid(kurtosis, heads=None, title: str = "kurtosis of vertical scores",
                       label: str = "kurtosis of vertical scores") -> Figure:
  """Layers x heads grid of a value (kurtosis by default; `label` names the colour bar); receiver heads
  (int[k, 2] (layer, head)) are outlined."""
  k = np.asarray(kurtosis, np.float64)
  if k.ndim != 2:
    raise ValueError(f"the grid needs a [layers, heads] array, got shape {k.shape}")
  fig, ax = _figure(figsize=(max(4.5, k.shape[1] * 0.5 + 3), max(3.2, k.shape[0] * 0.3 + 1.2)))
  im = ax.imshow(k, cmap="magma", aspect="auto", interpolation="nearest")
  fig.colorbar(im, ax=ax, label=label)
  if heads is not None:
    hs = np.asarray(heads).reshape(-1, 2)
    for l, h in hs:
      checks.check_index("receiver head layer", l, k.shape[0], f" ({k.shape[0]} layers)")
      checks.check_index("receiver head", h, k.shape[1], f" ({k.shape[1]} heads)")
      ax.add_patch(matplotlib.patches.Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, ec="cyan", lw=1.5))
    if len(hs):
      ax.legend(handles=[Patch(fill=False, edgecolor="cyan", lw=1.5, label="receiver head")], fontsize=7,
                loc="upper left", bbox_to_anchor=(0, -0.12), frameon=False)
  ax.set_xlabel("head")
  ax.set_ylabel("layer")
  _int_ticks(ax)
  _title(ax, title, width=45)
  return _done(fig)


def plot_coverage(trace, start_block: int = 0, title: str = "coverage") -> Figure:
  """Coverage of every traced layer that prunes (rows) and head (columns), mean over query blocks from
  `start_block` (the pruned regime), beside the mean over heads along the sequence: where the kept blocks
  explain little of a head's dense attention, the sparse picture of that head is incomplete."""
  layers = [l for l in trace.layers if l.coverage is not None and l.mode != "window"]
  if not layers:
    raise ValueError("the trace carries no coverage on pruned layers: trace with output='exact' or "
                     "coverage=True")
  cov = [np.asarray(l.coverage, np.float64) for l in layers]
  cov = [c.reshape(-1, c.shape[-2], c.shape[-1]).mean(0) for c in cov]  # [N, nQ], mean over batch
  if not 0 <= start_block < cov[0].shape[-1]:
    raise ValueError(f"start_block must be in [0, {cov[0].shape[-1]}), got {start_block}")
  grid = np.stack([c[:, start_block:].mean(-1) for c in cov])  # [L', N]
  fig, (a0, a1) = _figure(1, 2, figsize=(MAX_WIDTH_IN, max(3.0, len(layers) * 0.45 + 1.6)),
                               gridspec_kw=dict(width_ratios=[1, 1.6]))
  im = a0.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
  fig.colorbar(im, ax=a0, label="share of dense attention in kept blocks")
  a0.set_yticks(range(len(layers)), [str(l.layer) for l in layers])
  a0.set_xlabel("head")
  a0.set_ylabel("layer")
  _int_ticks(a0, y=False)
  _title(a0, f"per head, query blocks {start_block}+", width=35)
  for l, c in zip(layers, cov):
    a1.plot(np.arange(c.shape[-1]), c.mean(0), label=f"layer {l.layer}")
  a1.axvline(start_block, color="grey", ls=":", lw=1, label="pruning starts")
  a1.set_ylim(0, 1.02)
  a1.set_xlabel("query block")
  a1.set_ylabel("coverage (mean over heads)")
  a1.legend(fontsize=7, ncol=2)
  _int_ticks(a1, y=False)
  _title(a1, title, width=50)
  fig.tight_layout()
  return _done(fig)


def plot_calibration(cal, target: float, title: str = "coverage budget calibration") -> Figure:
  """Per pruned layer, the true coverage each tried dropped_scale gave (every exact pass of
  `experiments.calibration.calibrate_budget`) against the target and the target - 0.02 band, the chosen
  scale ringed: where a layer's curve flattens below the target, the cap (top_k) limits it, not the scale."""
  fig, ax = _figure(figsize=(6.4, 3.6))
  layers = cal.coverage.layers
  for i, l in enumerate(layers):
    pts = sorted({(s, got.of(l)) for tried, got in cal.passes for ll, s in tried if ll == l})
    colour = f"C{i % 10}"
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colour, ms=4, label=f"layer {l}")
    chosen = dict(cal.config.layer_scales)[l]
    ax.plot([chosen], [cal.coverage.of(l)], "o", ms=11, mfc="none", mec=colour, mew=1.5)
  ax.axhline(target, color="black", lw=1, ls="--", label=f"target {target:g}")
  ax.axhspan(target - 0.02, target, color="grey", alpha=0.15, lw=0, label="target - 0.02")
  ax.set_xscale("log", base=2)
  tried = sorted({s for t, _ in cal.passes for _, s in t})
  ax.set_xticks(tried, [f"{s:g}" for s in tried])
  ax.minorticks_off()
  ax.set_xlabel("dropped_scale (log)")
  ax.set_ylabel("true coverage (pruned query blocks)")
  ax.legend(fontsize=7)
  _title(ax, title)
  fig.tight_layout()
  return _done(fig)


def plot_route(route, needle_blocks: Optional[Sequence[int]] = None, min_weight: float = 1e-3,
               max_edges: int = 300, title: str = "needle route") -> Figure:
  """Layered diagram: x = block, y = layer (input of layer l at y = l); node size ~ flow; route edges (on a
  path from a needle block) in red, other kept edges in grey; needle blocks marked at the bottom, block 0
  (BOS, the attention sink) marked too. The legend lists only marks that are drawn; the figure is at most
  MAX_WIDTH_IN wide, so it shows unscaled in a report."""
  flow = np.asarray(route.flow)
  n_levels, n_b = flow.shape
  fig, ax = _figure(figsize=(min(MAX_WIDTH_IN, max(6, n_b * 0.12)), max(4, n_levels * 0.3 + 1.5)))
  edges = route.edge_list(min_weight=min_weight, only_route=False)[:max_edges]
  on = {(l, k, q) for l, _, k, q, _ in route.edge_list(min_weight=min_weight, only_route=True)}
  wmax = max([e[-1] for e in edges], default=1.0)
  drawn = {"red": 0, "grey": 0}
  for l, _, k, q, w in sorted(edges, key=lambda e: ((e[0], e[2], e[3]) in on, e[-1])):
    red = (l, k, q) in on
    drawn["red" if red else "grey"] += 1
    ax.plot([k, q], [l, l + 1], color="red" if red else "0.6", alpha=0.25 + 0.75 * w / wmax,
            lw=0.5 + 3 * w / wmax, zorder=2 if red else 1)
  yy, xx = np.nonzero(flow > 0)
  ax.scatter(xx, yy, s=5 + 200 * flow[yy, xx], c="black", zorder=3)
  handles = []
  if drawn["red"]:
    handles.append(Line2D([], [], color="red", lw=2, label="kept edge on a path from a needle block"))
  if drawn["grey"]:
    handles.append(Line2D([], [], color="0.6", lw=2, label="other kept edge (width ~ weight)"))
  if len(xx):
    handles.append(Line2D([], [], color="black", marker="o", ls="", label="share of the answer's "
                          "information (dot size)"))
  if needle_blocks is not None and len(needle_blocks):
    nb = [checks.check_index("needle block", b, n_b, f" ({n_b} blocks)") for b in needle_blocks]
    ax.scatter(nb, [-0.4] * len(nb), marker="^", c="red", s=40, zorder=3)
    handles.append(Line2D([], [], color="red", marker="^", ls="", label="needle block"))
  ax.scatter([0], [-0.4], marker="s", c="tab:blue", s=30, zorder=3)
  handles.append(Line2D([], [], color="tab:blue", marker="s", ls="", label="block 0: BOS, attention sink"))
  ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2,
            frameon=False)
  ax.set_xlim(-1, n_b)
  ax.set_ylim(-1, n_levels)
  ax.set_xlabel("block (position in the prompt)")
  ax.set_ylabel("layer (input of layer l at y = l;\ntop = output)")
  _int_ticks(ax)
  _title(ax, title, width=max(40, int(fig.get_size_inches()[0] * 9)))
  return _done(fig)


def plot_needle_mass(stream, dense=None, title: str = "needle share of the final query block's attention"
                     ) -> Figure:
  """Layers x heads grids of the needle mass (float[L, N]) in the Stream trace and, when given, in the dense
  model's attention beside it, on one colour scale from 0: a blank Stream panel then reads as "pruned
  away" against the dense contrast, not as a colour-bar artefact."""
  grids = [("Stream", np.asarray(stream, np.float64))]
  if dense is not None:
    grids.insert(0, ("dense", np.asarray(dense, np.float64)))
  for name, g in grids:
    if g.ndim != 2:
      raise ValueError(f"{name} needle mass must be [layers, heads], got shape {g.shape}")
  top = max(float(np.nanmax(g)) if np.isfinite(g).any() else 0.0 for _, g in grids)
  n_l, n_h = grids[0][1].shape
  fig, axes = _figure(1, len(grids), figsize=(min(MAX_WIDTH_IN, 1.5 + len(grids) * max(3.0, 0.5 * n_h + 1.5)),
                                              max(3.4, n_l * 0.28 + 1.4)), squeeze=False)
  im = None
  for ax, (name, g) in zip(axes[0], grids):
    im = ax.imshow(g, cmap="magma", vmin=0, vmax=top if top > 0 else 1, aspect="auto",
                   interpolation="nearest")
    peak = np.unravel_index(np.nanargmax(g), g.shape) if np.isfinite(g).any() and np.nanmax(g) > 0 else None
    sub = (f"{name}: max {g[peak]:.3f} (layer {peak[0]}, head {peak[1]})" if peak is not None
           else f"{name}: 0 in every layer and head")
    _title(ax, sub, width=40)
    ax.set_xlabel("head")
    if ax is axes[0][0]:
      ax.set_ylabel("layer")
    _int_ticks(ax)
  fig.colorbar(im, ax=list(axes[0]), label="needle share of the final\nquery block's attention")
  fig.suptitle(title, fontsize=10)
  return fig  # no tight_layout: the shared colour bar spans the axes


def plot_success_failure(success, failure, title: str = "needle mass at the final block",
                         ylabel: str = "needle mass") -> Figure:
  """Per-layer curves (float[L] each; or [L, N] arrays, shown as per-layer means plus a heads heatmap of
  the difference)."""
  s, f = np.asarray(success, np.float64), np.asarray(failure, np.float64)
  two_d = s.ndim == 2
  fig, axes = _figure(1, 2 if two_d else 1, figsize=(MAX_WIDTH_IN if two_d else 6, 3.8))
  ax = axes[0] if two_d else axes
  ls, lf = (s.mean(-1), f.mean(-1)) if two_d else (s, f)
  ax.plot(ls, "o-", color="tab:green", label="success")
  ax.plot(lf, "s-", color="tab:red", label="failure")
  ax.set_xlabel("layer")
  ax.set_ylabel(ylabel)
  _int_ticks(ax, y=False)
  _title(ax, title)
  ax.legend()
  if two_d:
    d = s - f
    lim = np.nanmax(np.abs(d)) if np.isfinite(d).any() else 1.0
    im = axes[1].imshow(d, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=axes[1], label="success - failure")
    axes[1].set_xlabel("head")
    axes[1].set_ylabel("layer")
    _int_ticks(axes[1])
    axes[1].set_title("per head: success - failure", fontsize=10)
  return _done(fig)


def plot_suppression(result, receiver=None, title: str = "attention suppression") -> Figure:
  """A SuppressionMatrix (`experiments.ablation.suppression_matrix`): the sentence x sentence matrix (row
  k: effect on sentence k of suppressing column j, mean log KL; blank above the diagonal) and, with
  `receiver` (float[S] receiver-head importance), a rank scatter of suppression importance against it,
  Spearman in the title."""
  m = np.asarray(result.matrix, np.float64)
  fig, axes = _figure(1, 2 if receiver is not None else 1,
                      figsize=(MAX_WIDTH_IN if receiver is not None else 5.5, 4.4))
  ax = axes[0] if receiver is not None else axes
  im = ax.imshow(np.ma.masked_invalid(m), cmap="magma", aspect="auto", interpolation="nearest")
  fig.colorbar(im, ax=ax, label="mean log(KL)")
  ax.set_xlabel("suppressed sentence j")
  ax.set_ylabel("affected sentence k")
  _int_ticks(ax)
  _title(ax, f"{title}: effect of suppressing j on k (temperature {result.temperature:g})")
  if receiver is not None:
    a, b = np.asarray(result.importance, np.float64), np.asarray(receiver, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    axes[1].scatter(rank(b[ok]), rank(a[ok]), s=14, color="tab:blue")
    axes[1].set_xlabel("rank by receiver-head importance (trace)")
    axes[1].set_ylabel("rank by suppression importance (causal)")
    _int_ticks(axes[1])
    _title(axes[1], f"per sentence: Spearman {result.correlation(receiver):+.2f} over {int(ok.sum())} sentences")
  return _done(fig)


def plot_ablation(counts: Mapping[str, int], title: str = "route ablation") -> Figure:
  """Answer-flip rates of `RouteVerification.counts()`: route, random kept blocks in the same heads and
  (when run) the needle in every head, with n over each bar."""
  arms = [("route heads: needle blocks", counts["route_flips"], counts["with_route"]),
          ("same heads: random kept blocks", counts["random_flips"], counts["random_runs"])]
  if counts.get("everywhere_runs"):
    arms.append(("every head: needle blocks", counts["everywhere_flips"], counts["everywhere_runs"]))
  fig, ax = _figure(figsize=(6.5, 3.6))
  rates = [k / n if n else np.nan for _, k, n in arms]
  bars = ax.bar(range(len(arms)), rates, color=["tab:red", "tab:gray", "tab:purple"][: len(arms)])
  for bar, (_, k, n) in zip(bars, arms):
    ax.annotate(f"{k}/{n}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                va="bottom", fontsize=9)
  ax.set_xticks(range(len(arms)), [a for a, _, _ in arms], fontsize=8)
  ax.set_ylim(0, 1.1)
  ax.set_ylabel("answer flip rate")
  _title(ax, f"{title} ({counts['answered']} of {counts['samples']} samples answered)")
  return _done(fig)


def plot_faithfulness(rows: Sequence[Mapping[str, float]], x: str = "kept_stream",
                      title: str = "faithfulness vs kept fraction") -> Figure:
  """KL (log scale, left) and top-1 agreement (right) against the kept fraction, one point per report
  summary (e.g. per length); points are labelled with their 'length' when present."""
  xs = np.array([r[x] for r in rows])
  fig, ax = _figure(figsize=(6, 4))
  kl = np.maximum(np.array([r["kl_mean"] for r in rows]), 1e-8)
  ax.plot(xs, kl, "o-", color="tab:blue", label="KL mean")
  if "kl_last" in rows[0]:
    ax.plot(xs, np.maximum(np.array([r["kl_last"] for r in rows]), 1e-8), "x--", color="tab:blue",
            label="KL last")
  ax.set_yscale("log")
  ax.set_xlabel(x.replace("_", " "))
  ax.set_ylabel("KL(dense || stream) [nats]", color="tab:blue")
  ax2 = ax.twinx()
  ax2.plot(xs, [r["top1_mean"] for r in rows], "s-", color="tab:orange", label="top-1 agreement")
  ax2.set_ylim(0, 1.05)
  ax2.set_ylabel("top-1 agreement", color="tab:orange")
  for r, xv, kv in zip(rows, xs, kl):
    if "length" in r:
      ax.annotate(str(int(r["length"])), (xv, kv), fontsize=7, xytext=(3, 3), textcoords="offset points")
  h1, l1 = ax.get_legend_handles_labels()
  h2, l2 = ax2.get_legend_handles_labels()
  ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower left")
  ax.set_title(title)
  return _done(fig)
