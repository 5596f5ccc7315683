"""Report folders: report.json, the trace (orbax), PNG figures and an index.html, written atomically.

A run writes into a hidden temporary folder and moves it into place only when everything is on disk, so a
crashed run never leaves a half-written report that looks complete, and an earlier report is removed only
after its replacement exists. Where the folder cannot be renamed (a mount point) the files are moved in
instead; a finished report is never discarded (see stream_jax/outdir.py).

Nothing a user wrote is ever deleted or overwritten: every report folder holds a marker file (`MARKER`) with
the sha256 of each file stream_jax wrote there. `write_report` writes into a new (or empty) folder; it
replaces an existing folder only with `force=True`, and only if the folder holds nothing but the files the
marker lists, unchanged. Files, foreign folders and reports a user added files to or edited are refused
(`ReportPathError`); `check_out_dir` runs the same checks (and those of space and writability) up front, so
a command can refuse before any compute.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import json
import os
import pathlib
import shutil
import sys
from typing import Any, Mapping, Optional

import jax
import numpy as np

from stream_jax import outdir
from stream_jax.outdir import MARKER, ReportPathError, ReportWarning  # pylint: disable=W0611
from stream_jax.trace import Trace
from stream_jax.trace_io import save_trace

def to_jsonable(x: Any) -> Any:
  """numpy/jax scalars and arrays, dataclasses, tuples -> plain JSON values (NaN -> None)."""
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return {f.name: to_jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
  if isinstance(x, Mapping):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if isinstance(x, (jax.Array, np.ndarray, np.generic)):
    return to_jsonable(np.asarray(x).tolist())
  if isinstance(x, float) and not np.isfinite(x):
    return None
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  return str(x)


# ---------------------------------------------------------------------------------------------- the folder


# Human names and one-line explanations of the numbers reports show (raw keys stay in report.json).
LABELS: dict[str, tuple[str, str]] = {
    "model": ("model", "the traced checkpoint"),
    "tokens": ("prompt length (tokens)", "BOS included"),
    "sentences": ("sentences", "sentences of the chain of thought (cut after . ? ! and at blank lines)"),
    "expected": ("expected answer", "the needle's value"),
    "stream_answer": ("answer with Stream attention", "greedy continuation after the Stream prefill"),
    "stream_retrieved": ("Stream answer contains the needle", "string match of the expected value"),
    "dense_answer": ("answer with dense attention", "the unpruned model's greedy continuation"),
    "dense_retrieved": ("dense answer contains the needle", "string match of the expected value"),
    "same_answer": ("same answer dense and Stream", "the two greedy continuations are identical"),
    "kl_mean": ("next-token KL, mean (nats)", "KL(dense || Stream) of the next-token distribution, "
                "averaged over positions; 0 = identical"),
    "kl_last": ("next-token KL at the last position (nats)", "at the position that predicts the answer's "
                "first token"),
    "top1_mean": ("top-1 agreement, mean", "share of positions where dense and Stream predict the same "
                  "next token"),
    "top1_last": ("top-1 agreement at the last position", "1 = dense and Stream predict the same first "
                  "token of the answer"),
    "top5_mean": ("top-5 overlap, mean", "share of the dense top-5 tokens also in Stream's top-5"),
    "top5_last": ("top-5 overlap at the last position", "share of the dense top-5 also in Stream's top-5 "
                  "there"),
    "resid_err_last_layer": ("residual error, last layer", "|h_stream - h_dense| / |h_dense| of the "
                             "residual stream after the last layer"),
    "resid_err_max": ("residual error, worst layer", "the largest relative error of any layer's residual "
                      "output"),
    "kept_overall": ("kept share of token pairs, all layers", "causal query-key pairs that attention "
                     "could use, relative to full causal attention (window layers count as pruned)"),
    "kept_stream": ("kept share of token pairs, Stream layers", "causal query-key pairs kept in the "
                    "layers whose mask Stream estimated (global layers); 1.0 = nothing pruned"),
    "kept_fraction": ("kept share of token pairs", "1.0 = nothing pruned"),
    "oracle_recall": ("recall of the exact top-k", "share of the exact top-k blocks the search found"),
    "needle_flow_at_input": ("needle share of the route at the input", "share of the final position's "
                             "attention route (rollout over kept blocks) that starts in the needle's "
                             "blocks"),
    "total_seconds": ("run time (s)", "wall time of the whole command, model load included"),
    "dense_forward_s": ("dense forward (s)", "wall time of the dense forward pass, compilation included"),
    "stream_forward_s": ("Stream forward (s)", "wall time of the Stream forward pass (mask search, sparse "
                         "attention, coverage), compilation included"),
    "pruned_from": ("pruning starts at token", "first position whose query block has more candidate key "
                    "blocks than top-k keeps; before it the sparse model equals dense"),
    "kl_pruned": ("next-token KL where pruning acts, mean (nats)", "KL(dense || Stream) averaged over the "
                  "positions from 'pruning starts at token' on"),
    "kl_pruned_p99": ("next-token KL where pruning acts, 99th percentile (nats)", "1% of the pruned "
                      "positions move more than this"),
    "top1_pruned": ("top-1 agreement where pruning acts", "share of the pruned positions where dense and "
                    "Stream predict the same next token"),
    "top5_pruned": ("top-5 overlap where pruning acts", "share of the dense top-5 tokens also in Stream's "
                    "top-5, over the pruned positions"),
    "coverage_pruned": ("coverage of the kept blocks, mean", "share of each head's dense attention that its "
                        "kept blocks hold, over the pruned query blocks of the Stream layers; 1 = the "
                        "sparse picture misses nothing"),
    "coverage_worst_layer": ("coverage of the kept blocks, worst layer", "the lowest per-layer mean "
                             "coverage"),
    "dense_mass_share": ("dense attention mass in the kept blocks", "share of the exact dense block mass "
                         "that the kept blocks hold"),
    "needle_mass_stream": ("needle share of the final block's attention, Stream (max over heads)",
                           "the largest share any head of any layer puts on the needle's blocks from the "
                           "last query block, in the Stream trace"),
    "needle_mass_dense": ("needle share of the final block's attention, dense (max over heads)",
                          "the same in the dense model's attention (every block kept, traced exactly)"),
    "receiver_heads": ("receiver heads", "heads ranked by kurtosis of their vertical scores and used for "
                       "sentence importance"),
    "near_tied_heads": ("heads in near-ties of the kurtosis ranking", "heads whose kurtosis is within one "
                        "standard error of the next-ranked head's: their order is not significant"),
}
# Summary keys of this form are explained by `human` too (a prefix and its explanation).
_PREFIXED = {
    "success@": ("needle retrieved at {} tokens (%)", "share of samples whose answer holds every expected "
                 "value"),
    "ablation_": ("route ablation: {}", "counts of the causal test of the routes (see the figure)"),
}


def human(key: str) -> tuple[str, str]:
  """(human name, short explanation) of a report key; success@N and unknown keys get a readable form."""
  if key in LABELS:
    return LABELS[key]
  for prefix, (name, why) in _PREFIXED.items():
    if key.startswith(prefix):
      return name.format(key[len(prefix):].replace("_", " ")), why
  if key.endswith("_s"):
    return f"{key[:-2].replace('_', ' ')} (s)", "wall time of this phase, compilation included"
  return key.replace("_", " "), ""


def _html(title: str, summary: Mapping[str, Any], figures: list[str], sections: Mapping[str, str], *,
          intro: Mapping[str, Any] = {}, notes: Mapping[str, str] = {},  # pylint: disable=dangerous-default-value
          captions: Mapping[str, str] = {}, conclusion: str = "",  # pylint: disable=dangerous-default-value
          has_trace: bool = True, viewer: bool = False) -> str:
  e = html.escape
  shows = "".join(f"<p>{e(p)}</p>" for p in conclusion.split("\n\n") if p.strip())
  shows = f"<h2>What this run shows</h2>\n{shows}" if shows else ""
  restore = ("the trace restores with\n<code>stream_jax.trace_io.load_trace(&lt;this folder&gt;)</code>."
             if has_trace else "this report holds no trace (the numbers above are all it keeps).")
  head = "\n".join(f"<tr><th>{e(str(k))}</th><td><pre class=v>{e(_fmt(v))}</pre></td></tr>"
                   for k, v in intro.items())
  note = "\n".join(f'<p class=note><b>{e(k)}:</b> {e(v)}</p>' for k, v in notes.items())
  rows = []
  for k, v in summary.items():
    name, why = human(str(k))
    rows.append(f"<tr><th title=\"{e(str(k))}\">{e(name)}</th><td>{e(_fmt(v))}</td>"
                f"<td class=why>{e(why)}</td></tr>")
  figs = []
  for f in figures:
    stem = f[:-4] if f.endswith(".png") else f
    cap = captions.get(stem, stem.replace("_", " "))
    figs.append(f'<figure><img src="{e(f)}" alt="{e(cap)}"><figcaption>{e(cap)} '
                f'(<a href="{e(f)}">{e(f)}</a>)</figcaption></figure>')
  extra = "\n".join(f"<h2>{e(k)}</h2><pre>{e(v)}</pre>" for k, v in sections.items())
  return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{e(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:4px 10px;text-align:left;vertical-align:top}}img{{max-width:100%}}
td.why{{color:#555;font-size:90%}}pre.v{{margin:0;white-space:pre-wrap;background:none;padding:0}}
p.note{{background:#fff4d6;border-left:4px solid #e0a800;padding:.6em 1em}}
figure{{margin:1.5em 0}}pre{{background:#f6f6f6;padding:1em;overflow-x:auto}}</style></head>
<body><h1>{e(title)}</h1>
<p>Written {datetime.datetime.now().isoformat(timespec="seconds")} by stream_jax.
Full numbers: <a href="report.json">report.json</a>; {restore}</p>
{'<p><b>Explore the trace</b> (block maps with token text, sentences, search): <code>stream-jax view '
 '&lt;this folder&gt;</code> serves <a href="viewer/index.html">viewer/</a> on a local server (browsers do '
 'not let a page opened from a file fetch its tiles).</p>' if viewer else ''}
<table>{head}</table>
{note}
{shows}
<h2>Key numbers</h2>
<table>{"".join(rows)}</table>
{extra}
{"<h2>Figures</h2>" if figs else ""}
{"".join(figs)}
</body></html>
"""


def _close(fig) -> None:
  """Closes a figure pyplot made (it keeps them open until closed); others need nothing. pyplot is not
  imported here: figures from stream_jax.plots never touch it, so no backend is selected."""
  plt = sys.modules.get("matplotlib.pyplot")
  if plt is not None:
    plt.close(fig)


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def check_out_dir(out_dir: str | os.PathLike, *, force: bool = False) -> pathlib.Path:
  """The absolute report folder, after checking (before any work) that writing it deletes nothing stream_jax
  did not write, that it can be written and that the disk has room (`outdir.plan`)."""
  return outdir.plan(out_dir, force=force)[0]


def write_report(out_dir: str | os.PathLike, *, report: Mapping[str, Any], summary: Mapping[str, Any],
                 figures: Optional[Mapping[str, Any]] = None, trace: Optional[Trace] = None,
                 sections: Optional[Mapping[str, str]] = None, title: str = "stream_jax report",
                 force: bool = False, intro: Optional[Mapping[str, Any]] = None,
                 notes: Optional[Mapping[str, str]] = None, captions: Optional[Mapping[str, str]] = None,
                 viewer: Optional[Mapping[str, Any]] = None, conclusion: str = "",
                 keep_trace: bool = True) -> pathlib.Path:
  """Writes report.json, trace/, <name>.png figures and index.html into `out_dir`, atomically.

  Args:
    report: everything worth keeping (JSON-able after `to_jsonable`).
    summary: the key numbers shown at the top of index.html.
    figures: name -> a matplotlib Figure (the stream_jax.plots functions return them; saved as name.png,
      and closed if pyplot made it) or a callable that writes the PNG to the path it is given.
    trace: saved with orbax (restore with `stream_jax.trace_io.load_trace(out_dir)`).
    sections: title -> preformatted text (tables) shown in index.html.
    force: replace a previous stream_jax report at `out_dir` (never a file, a folder stream_jax did not
      write, or a report a user added files to or edited: see `check_out_dir`).
    intro: label -> value shown first in index.html (the prompt, the question, the settings).
    notes: notices shown above the numbers (e.g. "pruning does nothing at these settings").
    captions: figure name -> what the figure shows and how to read it.
    viewer: with a trace, also write the interactive viewer into viewer/ (`stream-jax view <folder>`):
      keyword arguments of `stream_jax.viewer.export_viewer` (the token text, sentences, needle spans, a
      `compare=` trace of the same tokens, `routes=`).
    conclusion: "What this run shows": paragraphs (blank-line separated) derived from this run's numbers.
    keep_trace: save `trace` into the folder; False: it only feeds the viewer (a sweep's report shows one
      sample's trace but keeps none, so "the trace" of the folder would mean nothing).
  """
  out, how = outdir.plan(out_dir, force=force)
  label, existed = f"--out {os.fspath(out_dir)}", out.exists()
  tmp = outdir.new_tmp(out, how, label)
  try:
    names = []
    for name, fig in (figures or {}).items():
      png = tmp / f"{name}.png"
      if hasattr(fig, "savefig"):
        fig.savefig(png, dpi=110, bbox_inches="tight")
        _close(fig)
      else:
        fig(str(png))
      names.append(png.name)
    if trace is not None and keep_trace:
      save_trace(tmp, trace)
    if trace is not None and viewer is not None:
      from stream_jax.viewer import export_viewer  # pylint: disable=import-outside-toplevel
      export_viewer(tmp / "viewer", trace, title=title, **viewer)
    (tmp / "report.json").write_text(json.dumps(to_jsonable(report), indent=1))
    (tmp / "index.html").write_text(_html(title, summary, names, sections or {}, intro=intro or {},
                                          notes=notes or {}, captions=captions or {},
                                          conclusion=conclusion, has_trace=trace is not None and keep_trace,
                                          viewer=trace is not None and viewer is not None))
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if not existed and how == outdir.IN_PLACE:
      try:
        out.rmdir()  # new_tmp made it
      except OSError:
        pass
    raise
  outdir.install(tmp, out, how, label)  # from here on the report is complete: never discarded
  return out
