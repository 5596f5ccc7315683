"""Report folders of the experiments: each result -> report.json, the trace, figures, index.html.

`write_*(result, model, out, force=...)` composes the figures (stream_jax.plots), captions, key numbers and
the JSON record of one result and hands them to `stream_jax.report.write_report` (atomic, never deletes
what stream_jax did not write). Figures need matplotlib (`pip install 'stream-jax[viz]'`).
"""

from __future__ import annotations

import dataclasses

import pathlib
from typing import Mapping, Optional

import numpy as np

from stream_jax.experiments.anchoring import AnchorsResult
from stream_jax.experiments.calibration import TextCalibration
from stream_jax.experiments.needle_demo import DemoResult
from stream_jax.experiments.needles import NiahSweep
from stream_jax.experiments.settings import Settings, first_global
from stream_jax.experiments.tracing import TextTrace
from stream_jax.extras import require
from stream_jax.report import write_report
from stream_jax.viewer.export import route_samples

MODES = {
    "sparse": "sparse: the traced model computes attention with the kept blocks only, so it is a pruned "
              "model, measured here against the dense one",
    "exact": "exact: the traced model computes dense attention (its outputs equal dense by construction); "
             "the trace observes it: the kept blocks and the dense attention share they hold (coverage)",
}
# Summary keys that exact mode makes true by construction (dense logits): never headline numbers there.
BY_CONSTRUCTION = ("kl_", "top1_", "top5_", "resid_err_")


def _plots():
  return require("stream_jax.plots", "report figures")


def excerpt(text: str, n: int = 300) -> str:
  text = " ".join(text.split())
  return text if len(text) <= 2 * n else f"{text[:n]} [...] {text[-n:]}"


def _pct(x: float) -> str:
  return f"{100 * x:.0f}%" if x >= 0.01 or x == 0 else f"{100 * x:.2g}%"


def _layers_of(trace, mode_pred) -> list:
  return [l for l in trace.layers if mode_pred(l.mode)]


def coverage_caption(trace, report) -> str:
  """What the coverage figure shows, with this run's per-layer means and its weakest head."""
  cov = np.asarray(report.coverage_per_layer) if report.coverage_per_layer is not None else None
  text = ("Coverage: the share of each head's dense attention that its kept blocks hold (1 = the sparse "
          "picture misses nothing), per pruned layer and head over the pruned query blocks (left), and "
          "along the sequence (right).")
  if cov is None or not np.isfinite(cov).any():
    return text
  per = ", ".join(f"layer {i} {_pct(v)}" for i, v in enumerate(cov) if np.isfinite(v))
  return f"{text} This run, mean per layer: {per}."


def pruning_sentence(report, tokens: int, block_q: int) -> str:
  """One paragraph of a faithfulness summary's numbers (sparse mode)."""
  s = report.summary()
  parts = [f"At {tokens:,} tokens Stream kept {_pct(s['kept_stream'])} of the causal token pairs of the "
           f"layers whose mask it estimated ({_pct(s['kept_overall'])} over all layers, local windows "
           "included)."]
  if "kl_pruned" in s:
    parts.append(f"Pruning starts at token {int(s['pruned_from']):,} (query blocks of {block_q}); over the "
                 f"positions from there on the next-token distribution moved by a mean KL of "
                 f"{s['kl_pruned']:.3f} nats (99th percentile {s['kl_pruned_p99']:.2f}) and the top-1 token "
                 f"agreed with dense at {_pct(s['top1_pruned'])} of them.")
  else:
    parts.append("No query block has more candidate blocks than top-k keeps at this length: nothing is "
                 "pruned, so the sparse model equals dense here and the numbers below say nothing about "
                 "pruning.")
  if "coverage_pruned" in s:
    parts.append(f"The kept blocks held {_pct(s['coverage_pruned'])} of the dense attention on average "
                 f"({_pct(s['coverage_worst_layer'])} in the worst layer).")
  return " ".join(parts)


def exact_sentence(report, tokens: int) -> str:
  s = report.summary()
  parts = [f"Exact mode: the traced model computes dense attention, so its next-token distribution equals "
           f"dense by construction (KL 0, top-1 agreement 1 are not results and are not shown above). At "
           f"{tokens:,} tokens the estimated masks keep {_pct(s['kept_stream'])} of the causal token pairs "
           "of the estimated layers;"]
  if "coverage_pruned" in s:
    parts.append(f"those kept blocks hold {_pct(s['coverage_pruned'])} of the dense attention on average over "
                 f"the pruned query blocks ({_pct(s['coverage_worst_layer'])} in the worst layer): that is how "
                 "much of the model's attention the sparse picture explains.")
  else:
    parts.append("no query block is pruned at this length, so the picture is complete.")
  return " ".join(parts)


def headline(summary: dict, output: str) -> dict:
  """Exact mode drops the numbers that are true by construction from the headline (report.json keeps
  them)."""
  if output != "exact":
    return summary
  return {k: v for k, v in summary.items() if not k.startswith(BY_CONSTRUCTION)}


def _coverage_figure(trace, report, settings: Settings) -> dict:
  """{"coverage": Figure} when the trace carries coverage on a pruned layer, else {}."""
  if not any(l.coverage is not None and l.mode != "window" for l in trace.layers):
    return {}
  n_q = trace.layers[0].mask.num_q_blocks
  start = min((report.pruned_from or 0) // settings.config.block_q, n_q - 1)
  return {"coverage": _plots().plot_coverage(trace, start_block=start, title="coverage of the kept blocks")}


def _viewer(model, text: str, ids, offsets=None, **extra) -> dict:
  """The viewer's inputs for a traced text: token text from the tokenizer's offsets, the sentences."""
  from stream_jax.analysis import anchors  # pylint: disable=import-outside-toplevel
  if offsets is None:
    offsets = model.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
  offsets = np.asarray(offsets)
  if len(offsets) != len(ids):  # not the tokenization that was traced: vocabulary strings only
    return dict(tokenizer=model.tokenizer, ids=ids, **extra)
  extra.setdefault("sentences", anchors.sentences(text, offsets))
  return dict(text=text, offsets=offsets, tokenizer=model.tokenizer, ids=ids, **extra)


def _dense_beside(dense_trace) -> dict:
  """The viewer's `compare=` arguments: the dense prefill's trace (same tokens, every block kept, exact
  mass) drawn beside the Stream trace's map; none without it."""
  if dense_trace is None:
    return {}
  return dict(compare=dense_trace, compare_label="dense (every block, exact mass)", label="Stream (sparse)")


def heads_keeping(layer, blocks, query_block: int = -1) -> list[int]:
  """Heads of a (one-sample) layer trace whose query block `query_block` keeps any of `blocks`."""
  idx = np.asarray(layer.mask.indices)[:, query_block, :]  # [N, C]
  return [int(h) for h in range(idx.shape[0]) if np.isin(idx[h], list(blocks)).any()]


def mask_caption(layer, blocks, heads: bool = False) -> str:
  """Caption of a mask figure, saying which heads keep the needle's blocks in the last query block."""
  n = int(np.asarray(layer.mask.indices).shape[0])
  keep = heads_keeping(layer, blocks)
  where = ", ".join(map(str, blocks))
  if heads:
    first = "The same, one panel per head."
  else:
    first = (f"Layer {layer.layer} ({layer.kind}, {layer.mode}): which key blocks (columns) each query block "
             "(rows) kept, coloured by the attention mass they received, mean over heads; white = not kept "
             "by any head.")
  if not blocks:
    return first
  if keep:
    last = (f" The needle is in key block(s) {where}; in the last query block (bottom row) head(s) "
            f"{', '.join(map(str, keep))} of {n} keep it.")
  else:
    last = (f" The needle is in key block(s) {where}; no head keeps it in the last query block (bottom row): "
            "the needle's column is pruned there.")
  return first + last


def route_caption(route) -> str:
  """Caption of the route figure from the route itself (what is drawn, and what is not)."""
  on = len(route.edge_list(min_weight=1e-3, only_route=True))
  base = ("Attention rollout from the last query block (top) down the layers along kept blocks; dot size is "
          "the share of the answer's information at that block and layer; grey: kept edges.")
  flow = float(np.asarray(route.needle_flow)[0])
  if on:
    return (f"{base} Red: the {on} kept edge(s) on a path that starts at a needle block; "
            f"{_pct(flow)} of the final position's rollout starts in the needle's blocks.")
  return (f"{base} No kept edge above the threshold lies on a path from a needle block (no red edges): "
          f"along kept blocks the needle does not reach the last query block ({_pct(flow)} of the rollout "
          "starts in its blocks).")


def write_trace(res: TextTrace, model, out, *, force: bool = False, plot_layer: Optional[int] = None,
                table: str = "", notes: Optional[Mapping[str, str]] = None) -> pathlib.Path:
  plots = _plots()
  notes = res.notes if notes is None else notes
  trace, report = res.trace, res.report
  layer = plot_layer if plot_layer is not None else first_global(trace)
  lt = trace.layers[layer]
  notice = (notes or {}).get("pruning does nothing")
  tokens = len(res.ids)
  conclusion = (exact_sentence(report, tokens) if res.output == "exact"
                else pruning_sentence(report, tokens, res.settings.config.block_q))
  summary = dict(model=model.config.name, tokens=tokens, **headline(report.summary(), res.output),
                 **res.pair.timings)
  return write_report(
      out, title="stream-jax trace", trace=trace, viewer=_viewer(model, res.text, res.ids),
      sections={"faithfulness": table}, force=force, notes=notes,
      summary=summary, conclusion=conclusion,
      intro={"mode": MODES[res.output], "text (excerpt)": excerpt(res.text),
             "Stream settings": res.settings.describe()},
      captions={f"mask_layer{layer}": mask_caption(lt, ()), "coverage": coverage_caption(trace, report)},
      report=dict(command="trace", model=model.source, tokens=tokens, stream=res.settings.to_dict(),
                  output=res.output, faithfulness=report, timings=res.pair.timings, notice=notice),
      figures={f"mask_layer{layer}": plots.plot_block_mask(
          lt.mask, mass=lt.mass, title=f"layer {layer} ({lt.kind}, {lt.mode}): kept blocks, mass "
          "(mean over heads)"), **_coverage_figure(trace, report, res.settings)})


def demo_conclusion(res: DemoResult) -> str:
  """"What this run shows", from the demo's numbers: pruning and faithfulness, the two answers, where the
  needle's attention went in the dense model and in the Stream trace."""
  sample, report = res.sample, res.report
  paras = [pruning_sentence(report, sample.length, res.settings.config.block_q)]
  ok, ans = res.retrieved, {k: v.strip() for k, v in res.answers.items()}
  said = (f"Asked for {sample.answers[0]}, the dense model answered {ans['dense']!r} "
          f"({'found' if ok['dense'] else 'missed'}) and the Stream prefill {ans['stream']!r} "
          f"({'found' if ok['stream'] else 'missed'}).")
  if ok["dense"] and not ok["stream"]:
    said += " Pruning lost the answer: the dense model retrieves it, the pruned one does not."
  elif ok["dense"] and ok["stream"]:
    said += " Pruning kept the answer."
  elif not ok["dense"] and ok["stream"]:
    said += " The dense model misses it and the pruned one finds it: luck, not a better model."
  else:
    said += " The dense model misses it too, so the miss is the model's, not the pruning's."
  paras.append(said)
  sm = np.asarray(res.needle_mass, np.float64)
  glob = [l.layer for l in res.trace.layers if l.kind == "global"]
  keep = {l: heads_keeping(res.trace.layers[l], res.needle_blocks) for l in glob}
  n_keep = sum(len(v) for v in keep.values())
  n_all = sum(int(np.asarray(res.trace.layers[l].mask.indices).shape[0]) for l in glob)
  where = (f"The needle is in key block(s) {', '.join(map(str, res.needle_blocks))} "
           f"({100 * int(sample.value_spans[0, 0]) / sample.length:.0f}% deep).")
  if res.dense_needle_mass is not None:
    dm = np.asarray(res.dense_needle_mass, np.float64)
    l, h = np.unravel_index(np.argmax(dm), dm.shape)
    where += (f" In the dense model the final query block puts up to {dm[l, h]:.3f} of a head's attention "
              f"on it (layer {l}, head {h}).")
  if sm.max() > 0:
    l, h = np.unravel_index(np.argmax(sm), sm.shape)
    where += (f" In the Stream trace the most is {sm[l, h]:.3f} (layer {l}, head {h}), and {n_keep} of the "
              f"{n_all} global-layer heads keep a needle block in the final query block.")
  else:
    where += (f" In the Stream trace it is 0 in every layer and head: none of the {n_all} global-layer heads "
              "keeps a needle block in the final query block, so the needle can reach the answer only "
              "through earlier positions.")
  if res.needle_in_sink:
    where += " The needle shares key block 0 with BOS (the attention sink): its mass is inflated by the sink."
  paras.append(where)
  return "\n\n".join(paras)


def needle_mass_caption(res: DemoResult) -> str:
  sm = np.asarray(res.needle_mass, np.float64)
  text = ("Share of the final query block's attention that lands on the needle's blocks, per layer (rows) and "
          "head (columns), on one colour scale from 0")
  if res.dense_needle_mass is not None:
    dm = np.asarray(res.dense_needle_mass, np.float64)
    text += (f": the dense model's attention (left, max {dm.max():.3f}) beside the Stream trace's (right, "
             + (f"max {sm.max():.3f})." if sm.max() > 0 else "0 everywhere: the needle's blocks were pruned "
                "from the final query block in every head)."))
  else:
    text += f" (max {sm.max():.3f})." if sm.max() > 0 else " (0 everywhere: pruned in every head)."
  return text


def write_demo(res: DemoResult, model, out, *, force: bool = False, table: str = "",
               notes: Optional[Mapping[str, str]] = None, timings: Optional[Mapping[str, float]] = None
               ) -> pathlib.Path:
  import jax  # pylint: disable=import-outside-toplevel
  plots = _plots()
  notes = res.notes if notes is None else notes
  trace, report, sample = res.trace, res.report, res.sample
  timings = dict(timings if timings is not None else res.timings)
  layer = first_global(trace)
  lt = trace.layers[layer]
  spans = sample.value_spans
  blocks = ", ".join(map(str, res.needle_blocks))
  answers, ok = res.answers, res.retrieved
  found = lambda k: "found" if ok[k] else "missed"  # pylint: disable=unnecessary-lambda-assignment
  summary = dict(model=model.config.name, tokens=sample.length, expected=sample.answers[0],
                 stream_answer=answers["stream"].strip(), stream_retrieved=ok["stream"],
                 dense_answer=answers["dense"].strip(), dense_retrieved=ok["dense"],
                 same_answer=answers["dense"].strip() == answers["stream"].strip(), **report.summary(),
                 needle_mass_stream=float(np.max(res.needle_mass)))
  if res.dense_needle_mass is not None:
    summary["needle_mass_dense"] = float(np.max(res.dense_needle_mass))
  summary["needle_flow_at_input"] = float(res.route.needle_flow[0])
  if "total_s" in timings:
    summary["total_seconds"] = timings["total_s"]
  intro = {
      "mode": MODES["sparse"],
      "prompt (excerpt)": excerpt(model.decode(sample.ids)),
      "needle position": f"tokens {int(spans[0][0])}-{int(spans[0][1]) - 1} of {sample.length} "
                         f"({100 * int(spans[0][0]) / sample.length:.0f}% deep; key block(s) {blocks})",
      "question": sample.question,
      "expected answer": sample.answers[0],
      "answers": f"dense: {answers['dense'].strip()!r} ({found('dense')}); "
                 f"Stream: {answers['stream'].strip()!r} ({found('stream')})",
      "Stream settings": res.settings.describe(),
  }
  return write_report(
      out, title="stream-jax demo: needle in a haystack", summary=summary, trace=trace,
      viewer=_viewer(model, sample.prompt, sample.ids, sample.offsets, needle_spans=spans,
                     **_dense_beside(res.dense_trace)),
      sections={"faithfulness": table}, force=force, intro=intro, notes=notes,
      conclusion=demo_conclusion(res),
      captions={
          f"mask_layer{layer}": mask_caption(lt, res.needle_blocks),
          f"mask_layer{layer}_heads": mask_caption(lt, res.needle_blocks, heads=True),
          "needle_mass": needle_mass_caption(res),
          "route": route_caption(res.route),
          "coverage": coverage_caption(trace, report),
      },
      report=dict(command="demo", model=model.source, stream=res.settings.to_dict(), output="sparse",
                  sample=dict(length=sample.length, keys=sample.keys, answers=sample.answers,
                              needle_token_spans=spans.tolist(), question=sample.question),
                  answers=dict(answers), retrieved=dict(ok),
                  notice=(notes or {}).get("pruning does nothing"), faithfulness=report, timings=timings,
                  needle_mass_per_layer_head=res.needle_mass,
                  dense_needle_mass_per_layer_head=res.dense_needle_mass,
                  needle_flow=np.asarray(res.route.needle_flow),
                  route_edges=res.route.edge_list(min_weight=1e-3)[:200], jax=jax.__version__,
                  device=jax.devices()[0].device_kind),
      figures={
          f"mask_layer{layer}": plots.plot_block_mask(
              lt.mask, mass=lt.mass, title=f"layer {layer}: kept blocks, mass (mean over heads)"),
          f"mask_layer{layer}_heads": plots.plot_block_mask_heads(
              lt.mask, mass=lt.mass, title=f"layer {layer}: kept blocks and their mass, per head"),
          "needle_mass": plots.plot_needle_mass(res.needle_mass, res.dense_needle_mass),
          "route": plots.plot_route(
              res.route, needle_blocks=res.needle_blocks,
              title="attention route into the last query block along kept blocks"),
          **_coverage_figure(trace, report, res.settings),
      })


def niah_conclusion(res: NiahSweep) -> str:
  counts = res.by_length()
  paras = ["Needle retrieved (string match, Stream prefill): " + "; ".join(
      f"{n:,} tokens {int(round(sum(v)))}/{len(v)}" for n, v in counts.items()) + "."]
  cmp = res.comparison
  if cmp.comparable:
    for g in cmp.comparable:
      c = g.comparison
      where = f"{g.length:,} tokens" + ("" if g.depth is None else f", depth {g.depth:g}%")
      top = c.heads[0] if c.heads else None
      text = (f"At {where} ({c.n_success} success(es), {c.n_failure} failure(s)) the per-layer needle mass "
              f"differs most at layer {c.lost_layer}")
      if top is not None:
        text += f"; the head with the largest gap is L{top[0]}H{top[1]} ({top[2]:.3f} vs {top[3]:.3f})"
      if c.excluded_layers:
        text += (f"; layers {', '.join(map(str, c.excluded_layers))} are left out (their window cannot reach "
                 "the needle)")
      paras.append(text + ".")
  paras += cmp.warnings()
  return "\n\n".join(paras)


def viewer_row(res: NiahSweep) -> int:
  """The row whose trace the niah report's viewer maps: the first success (its route reaches the needle),
  else the first row; every row's route is in the routes panel."""
  return next((i for i, r in enumerate(res.rows) if r.success), 0)


def write_niah(res: NiahSweep, model, out, *, force: bool = False, task: str = "", text: str = "",
               notes: Optional[Mapping[str, str]] = None) -> pathlib.Path:
  notes = dict(res.notes if notes is None else notes)
  cmp = res.comparison
  figures, captions = {}, {}
  for g in cmp.comparable:
    c = g.comparison
    name = f"success_vs_failure_{g.length}" + ("" if g.depth is None else f"_depth{g.depth:g}")
    where = f"{g.length} tokens" + ("" if g.depth is None else f", depth {g.depth:g}%")
    figures[name] = _plots().plot_success_failure(c.success, c.failure, title=f"needle mass at the final "
                                                  f"block, {where}")
    captions[name] = (f"{where}: needle share of the final query block's attention per layer, mean over the "
                      f"{c.n_success} sample(s) that retrieved the needle (green) and the {c.n_failure} that "
                      "missed it (red); right: the difference per head."
                      + (f" Layers {', '.join(map(str, c.excluded_layers))} are blank: their window cannot "
                         "reach the needle from the final query block." if c.excluded_layers else ""))
  for i, w in enumerate(cmp.warnings()):
    notes[f"comparison{'' if i == 0 else f' {i + 1}'}"] = w
  summary = {f"success@{n}": v for n, v in res.success_rates().items()}
  extra = {}
  if res.ablation is not None:
    counts = res.ablation.counts()
    figures["route_ablation"] = _plots().plot_ablation(counts)
    summary.update({f"ablation_{k}": v for k, v in counts.items()})
    extra["ablation"] = dict(counts=counts, samples=[dataclasses.asdict(a) for a in res.ablation.samples])
  captions["route_ablation"] = (
      "Causal test of the routes (dense model, traced exactly): share of answered prompts whose answer no "
      "longer matches after suppressing the needle blocks in the heads the route reads them with (red), after "
      "suppressing as many random kept blocks in the same heads (grey; sink, needle and the question's window "
      "excluded), and after suppressing the needle in every head (purple); counts above the bars.")
  main = viewer_row(res)
  row = res.rows[main]
  return write_report(
      out, title=f"stream-jax niah ({res.variant})", sections={"results": text}, figures=figures,
      trace=row.trace, keep_trace=False, viewer=_viewer(
          model, row.sample.prompt, row.sample.ids, row.sample.offsets, needle_spans=row.sample.value_spans,
          routes=route_samples(res, main=main)),
      force=force, notes=notes, conclusion=niah_conclusion(res),
      intro={"mode": MODES["sparse"], "task": task, "Stream settings": res.settings.describe()},
      captions=captions, summary=summary,
      report=dict(command="niah", model=model.source, variant=res.variant, stream=res.settings.to_dict(),
                  output="sparse", samples=[r.to_json() for r in res.rows],
                  comparison=[dict(length=g.length, depth=g.depth, depths=g.depths, comparison=g.comparison)
                              for g in cmp.groups], comparison_warnings=cmp.warnings(), **extra))


def anchors_conclusion(res: AnchorsResult) -> str:
  rep = res.report
  heads = np.asarray(rep.heads).reshape(-1, 2)
  top = [t for t in rep.top(len(res.sentences.texts)) if t[0] not in res.sink][:3]
  paras = [f"{len(res.sentences.texts)} sentences, {len(res.ids):,} tokens; Stream kept {_pct(res.kept)} of "
           f"the global layers' causal token pairs. The {len(heads)} receiver heads (highest kurtosis of "
           "vertical scores) rate sentence(s) " + ", ".join(f"#{i} ({s:.3g}, {lab.replace('_', ' ')})"
                                                           for i, s, lab, _ in top)
           + " as the most attended-to later on."]
  if rep.ties is not None:
    paras.append(rep.ties.format().replace("\n", " "))
  return "\n\n".join(paras)


def write_calibration(res: TextCalibration, model, out, *, force: bool = False, text: str = "",
                      notes: Optional[Mapping[str, str]] = None, flags: str = "") -> pathlib.Path:
  """The calibration's report: the per-layer scales (as `flags`, the command line's way to reuse them), every
  exact pass, the held-out check, and the coverage-vs-scale figure."""
  plots = _plots()
  cal, target = res.calibration, res.target
  summary = dict(model=model.config.name, tokens=res.tokens, target=target,
                 layer_scales=res.layer_scales_flag(), reached="every layer" if cal.reached else
                 f"not in layer(s) {', '.join(map(str, cal.unreached))}", kept_fraction=cal.coverage.kept_mean)
  paras = [f"On this text ({res.tokens} tokens) the budget reaches {target:g} true coverage in "
           + ("every global layer" if cal.reached else "every global layer but " + ", ".join(map(str, cal.unreached))
              + " (the largest scale tried; the cap top_k, or the block size, limits it there)")
           + f" with per-layer scales {res.layer_scales_flag()}; it keeps {cal.coverage.kept_mean:.3f} of the "
           "global layers' causal pairs."]
  if res.held_out:
    before, after = res.held_out
    gap = min(after.coverage) - target
    paras.append(f"On the held-out text the uncalibrated budget's lowest layer holds {min(before.coverage):.3f} "
                 f"and the calibrated one's {min(after.coverage):.3f} ({gap:+.3f} from the target: "
                 + ("within" if gap >= -0.02 else "outside") + " the 0.02 the calibration promises).")
  if flags:
    paras.append(f"Reuse: {flags}")
  report = dict(command="calibrate", model=model.source, tokens=res.tokens, stream=res.settings.to_dict(),
                target=target, layer_scales=cal.config.layer_scales, unreached=cal.unreached,
                coverage=dict(zip(cal.coverage.layers, cal.coverage.coverage)),
                kept=dict(zip(cal.coverage.layers, cal.coverage.kept)),
                passes=[dict(scales=tried, coverage=got.coverage, kept=got.kept) for tried, got in cal.passes])
  if res.held_out:
    report["held_out"] = dict(tokens=res.held_out_tokens, uncalibrated=res.held_out[0].coverage,
                              calibrated=res.held_out[1].coverage,
                              kept=(res.held_out[0].kept_mean, res.held_out[1].kept_mean))
  return write_report(
      out, title="stream-jax coverage calibration", sections={"calibration": text or res.format()},
      force=force, notes=notes, summary=summary, conclusion="\n\n".join(paras),
      intro={"mode": "exact passes (output='exact'): each kept set's true coverage",
             "Stream settings": res.settings.describe()},
      captions={"calibration": "True coverage (mean over heads and the pruned query blocks) of each global "
                "layer at every dropped_scale tried; ringed: the scale chosen (the smallest reaching the target)."},
      figures={"calibration": plots.plot_calibration(cal, target)}, report=report)


def write_anchors(res: AnchorsResult, model, out, *, force: bool = False, text: str = "",
                  notes: Optional[Mapping[str, str]] = None) -> pathlib.Path:
  plots = _plots()
  notes = dict(res.notes if notes is None else notes)
  rep, sents = res.report, res.sentences
  if rep.ties is not None and not rep.ties.significant:
    notes["receiver heads"] = rep.ties.format().replace("\n", " ")
  summary = dict(model=model.config.name, tokens=len(res.ids), sentences=len(sents.texts),
                 kept_fraction=res.kept, receiver_heads=int(np.asarray(rep.heads).reshape(-1, 2).shape[0]))
  if rep.ties is not None:
    summary["near_tied_heads"] = f"{len(rep.ties.near_tied)} of {rep.ties.ranked}"
  return write_report(
      out, title="stream-jax thought anchors", sections={"anchors": text}, trace=res.trace,
      viewer=_viewer(model, res.text, res.ids, sentences=sents, labels=rep.labels),
      force=force, notes=notes, conclusion=anchors_conclusion(res),
      intro={"mode": MODES["sparse"], "chain of thought (excerpt)": excerpt(res.text),
             "Stream settings": res.settings.describe()},
      captions={"vertical_scores": "Importance of each sentence: how much attention later sentences (4 or "
                "more sentences on) pay to it in the receiver heads, coloured by category"
                + ("; hatched: the attention sink (the sentence sharing key block 0 with BOS), not an anchor."
                   if res.sink else "."),
                "receiver_heads": "Kurtosis of each head's vertical scores (layer x head): heads that focus "
                f"on few sentences score high; outlined: the {len(np.asarray(rep.heads).reshape(-1, 2))} "
                "receiver heads used for importance."
                + ("" if rep.ties is None else f" {len(rep.ties.near_tied)} of {rep.ties.ranked} ranked heads "
                   f"are within one standard error ({rep.ties.se:.2f}) of a neighbour in the ranking.")},
      summary=summary,
      report=dict(command="anchors", model=model.source, stream=res.settings.to_dict(), output="sparse",
                  sentences=list(sents.texts), labels=list(rep.labels), importance=rep.importance,
                  receiver_heads=rep.heads, kurtosis=rep.kurtosis, categories=dict(rep.categories),
                  positions=rep.positions, sink_sentences=list(res.sink), ranking_ties=rep.ties,
                  notice=(notes or {}).get("pruning does nothing")),
      figures={"vertical_scores": plots.plot_vertical_scores(
          rep.importance, rep.labels, texts=sents.texts, sink=res.sink,
          title="sentence importance (receiver heads' vertical scores)"),
               "receiver_heads": plots.plot_kurtosis_grid(
                   rep.kurtosis, heads=rep.heads, title="receiver heads: kurtosis of vertical scores")})
