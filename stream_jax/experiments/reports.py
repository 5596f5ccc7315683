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

from stream_jax.experiments.runs import (AnchorsResult, DemoResult, NiahSweep, Settings, TextTrace,
                                         first_global)
from stream_jax.extras import require
from stream_jax.report import write_report

COVERAGE_CAPTION = ("Coverage: the share of each head's dense attention that its kept blocks hold (1 = the "
                    "sparse picture misses nothing), per pruned layer and head over the pruned query blocks "
                    "(left), and along the sequence (right).")


def _plots():
  return require("stream_jax.plots", "report figures")


def excerpt(text: str, n: int = 300) -> str:
  text = " ".join(text.split())
  return text if len(text) <= 2 * n else f"{text[:n]} [...] {text[-n:]}"


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


def write_trace(res: TextTrace, model, out, *, force: bool = False, plot_layer: Optional[int] = None,
                table: str = "", notes: Optional[Mapping[str, str]] = None) -> pathlib.Path:
  plots = _plots()
  notes = res.notes if notes is None else notes
  trace, report = res.trace, res.report
  layer = plot_layer if plot_layer is not None else first_global(trace)
  lt = trace.layers[layer]
  notice = (notes or {}).get("pruning does nothing")
  return write_report(
      out, title="stream-jax trace", trace=trace, viewer=_viewer(model, res.text, res.ids), sections={"faithfulness": table}, force=force, notes=notes,
      summary=dict(model=model.config.name, tokens=len(res.ids), **report.summary(), **res.pair.timings),
      intro={"text (excerpt)": excerpt(res.text), "Stream settings": res.settings.describe()},
      captions={f"mask_layer{layer}": f"Layer {layer} ({lt.kind}, {lt.mode}): which key blocks (columns) "
                "each query block (rows) kept, coloured by the attention mass they received, mean over "
                "heads; white = not kept by any head.",
                "coverage": COVERAGE_CAPTION},
      report=dict(command="trace", model=model.source, tokens=len(res.ids), stream=res.settings.to_dict(),
                  output=res.output, faithfulness=report, timings=res.pair.timings, notice=notice),
      figures={f"mask_layer{layer}": plots.plot_block_mask(
          lt.mask, mass=lt.mass, title=f"layer {layer} ({lt.kind}, {lt.mode}): kept blocks, mass "
          "(mean over heads)"), **_coverage_figure(trace, report, res.settings)})


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
                 needle_flow_at_input=float(res.route.needle_flow[0]))
  if "total_s" in timings:
    summary["total_seconds"] = timings["total_s"]
  intro = {
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
      viewer=_viewer(model, sample.prompt, sample.ids, sample.offsets, needle_spans=spans),
      sections={"faithfulness": table}, force=force, intro=intro, notes=notes,
      captions={
          f"mask_layer{layer}": f"Layer {layer} (global): which key blocks (columns) each query block (rows) "
                                "kept, coloured by the attention mass they received, mean over heads; white "
                                f"= not kept by any head. The needle is in key block(s) {blocks}.",
          f"mask_layer{layer}_heads": "The same, one panel per head: heads keep different blocks, and "
                                      "the needle's column is bright in some heads only.",
          "needle_mass": "Share of the final query block's attention that lands on the needle's blocks, "
                         "per layer (rows) and head (columns).",
          "route": "Attention rollout from the last query block (top) down the layers along kept blocks: "
                   "red edges lie on a path that starts at a needle block, grey ones are other kept "
                   "edges; dot size is the share of the answer's information at that block and layer.",
          "coverage": COVERAGE_CAPTION,
      },
      report=dict(command="demo", model=model.source, stream=res.settings.to_dict(),
                  sample=dict(length=sample.length, keys=sample.keys, answers=sample.answers,
                              needle_token_spans=spans.tolist(), question=sample.question),
                  answers=dict(answers), retrieved=dict(ok),
                  notice=(notes or {}).get("pruning does nothing"), faithfulness=report, timings=timings,
                  needle_mass_per_layer_head=res.needle_mass, needle_flow=np.asarray(res.route.needle_flow),
                  route_edges=res.route.edge_list(min_weight=1e-3)[:200], jax=jax.__version__,
                  device=jax.devices()[0].device_kind),
      figures={
          f"mask_layer{layer}": plots.plot_block_mask(
              lt.mask, mass=lt.mass, title=f"layer {layer}: kept blocks, mass (mean over heads)"),
          f"mask_layer{layer}_heads": plots.plot_block_mask_heads(
              lt.mask, mass=lt.mass, title=f"layer {layer}: kept blocks and their mass, per head"),
          "needle_mass": plots.plot_kurtosis_grid(
              res.needle_mass, title="needle mass at the final query block, per layer and head",
              label="needle share of the final block's attention"),
          "route": plots.plot_route(
              res.route, needle_blocks=res.needle_blocks,
              title="attention route into the last query block (red: kept edges on a path from the needle)"),
          **_coverage_figure(trace, report, res.settings),
      })


def write_niah(res: NiahSweep, model, out, *, force: bool = False, task: str = "", text: str = "",
               notes: Optional[Mapping[str, str]] = None) -> pathlib.Path:
  notes = res.notes if notes is None else notes
  cmp = res.comparison
  figures = {}
  if cmp.n_success and cmp.n_failure:
    figures["success_vs_failure"] = _plots().plot_success_failure(cmp.success, cmp.failure)
  summary = {f"success@{n}": v for n, v in res.success_rates().items()}
  extra = {}
  if res.ablation is not None:
    counts = res.ablation.counts()
    figures["route_ablation"] = _plots().plot_ablation(counts)
    summary.update({f"ablation_{k}": v for k, v in counts.items()})
    extra["ablation"] = dict(counts=counts, samples=[dataclasses.asdict(a) for a in res.ablation.samples])
  return write_report(
      out, title=f"stream-jax niah ({res.variant})", sections={"results": text}, figures=figures,
      force=force, notes=notes, intro={"task": task, "Stream settings": res.settings.describe()},
      captions={"success_vs_failure": "Needle share of the final query block's attention per layer, mean "
                "over samples that retrieved the needle (green) and that missed it (red); right: the "
                "difference per head.",
                "route_ablation": "Causal test of the routes (dense model, traced exactly): share of answered "
                "prompts whose answer no longer matches after suppressing the needle blocks in the heads the "
                "route reads them with (red), after suppressing as many random kept blocks in the same heads "
                "(grey; sink, needle and the question's window excluded), and after suppressing the needle in "
                "every head (purple); counts above the bars."},
      summary=summary,
      report=dict(command="niah", model=model.source, variant=res.variant, stream=res.settings.to_dict(),
                  samples=[r.to_json() for r in res.rows], comparison=cmp, **extra))


def write_anchors(res: AnchorsResult, model, out, *, force: bool = False, text: str = "",
                  notes: Optional[Mapping[str, str]] = None) -> pathlib.Path:
  plots = _plots()
  notes = res.notes if notes is None else notes
  rep, sents = res.report, res.sentences
  return write_report(
      out, title="stream-jax thought anchors", sections={"anchors": text}, trace=res.trace,
      viewer=_viewer(model, res.text, res.ids, sentences=sents, labels=rep.labels),
      force=force, notes=notes,
      intro={"chain of thought (excerpt)": excerpt(res.text), "Stream settings": res.settings.describe()},
      captions={"vertical_scores": "Importance of each sentence: how much attention later sentences (4 or "
                "more sentences on) pay to it in the receiver heads, coloured by category; hatched: the "
                "attention sink (the sentence sharing key block 0 with BOS), not an anchor.",
                "receiver_heads": "Kurtosis of each head's vertical scores (layer x head): heads that focus "
                "on few sentences score high; outlined: the receiver heads used for importance."},
      summary=dict(model=model.config.name, tokens=len(res.ids), sentences=len(sents.texts),
                   kept_fraction=res.kept),
      report=dict(command="anchors", model=model.source, stream=res.settings.to_dict(),
                  sentences=list(sents.texts), labels=list(rep.labels), importance=rep.importance,
                  receiver_heads=rep.heads, kurtosis=rep.kurtosis, categories=dict(rep.categories),
                  positions=rep.positions, sink_sentences=list(res.sink),
                  notice=(notes or {}).get("pruning does nothing")),
      figures={"vertical_scores": plots.plot_vertical_scores(
          rep.importance, rep.labels, texts=sents.texts, sink=res.sink,
          title="sentence importance (receiver heads' vertical scores)"),
               "receiver_heads": plots.plot_kurtosis_grid(
                   rep.kurtosis, heads=rep.heads, title="receiver heads: kurtosis of vertical scores")})
