"""Export a trace (+ its token text and sentences) once into a viewer folder the page reads.

    export_viewer("run1/viewer", trace, text=text, offsets=offsets, sentences=sents)

Layout: manifest.json (layers, heads, block sizes, the pyramid, the overview numbers, needle), tiles/
(tiles.py), text/{i}.json (token pieces, `text_chunk` tokens per file), search.bin (text.search_index), sentences.json (token spans,
labels, importance), vertical.bin (float32[L, N, S] vertical scores), and the page (page.py). The page
fetches manifest.json first and then only what is on screen.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import time
from typing import Mapping, Optional, Sequence

import jax
import numpy as np

from stream_jax.trace import Trace
from stream_jax.viewer import page, summary, tiles
from stream_jax.viewer.text import chunks, pieces_from_offsets, pieces_from_tokenizer, search_index

FORMAT = 1
TEXT_CHUNK = 4096  # tokens per text file (~20 KB)


def _json_num(x):
  """NaN/inf -> None (JSON has no NaN); arrays -> nested lists."""
  if x is None:
    return None
  a = np.asarray(x, np.float64)
  return [_json_num(v) for v in a] if a.ndim else (float(a) if math.isfinite(a) else None)


def one_sample(trace: Trace, batch_index: int = 0) -> Trace:
  """The trace without its batch axis (mass [N, nQ, C])."""
  if trace.layers[0].mass.ndim == 3:
    return trace
  return jax.tree_util.tree_map(lambda x: x[batch_index], trace)


def export_viewer(out_dir, trace: Trace, *, pieces: Optional[Sequence[str]] = None, text: Optional[str] = None,
                  offsets=None, tokenizer=None, ids=None, sentences=None, labels: Optional[Sequence] = None,
                  needle_spans=None, title: str = "stream_jax trace", batch_index: int = 0,
                  tile_rows: int = tiles.TILE_ROWS, top: int = tiles.TOP_ROWS,
                  text_chunk: int = TEXT_CHUNK, compare: Optional[Trace] = None, compare_label: str = "dense",
                  label: str = "sparse", routes: Optional[Sequence[Mapping]] = None) -> pathlib.Path:
  """Writes the viewer folder of `trace` into `out_dir` (replaced if it is a previous viewer folder).

  Token text, in order of preference: `pieces` (one string per token), `text` + `offsets` (the tokenizer's
  char offsets), `tokenizer` + `ids`; none: the page shows token positions only.
  sentences: an `anchors.Sentences` (token spans, texts) or int[S, 2] token spans; labels: a category per
  sentence (default: Sentences' keyword labels). needle_spans: int[k, 2] token spans of the needle(s).
  compare: a second trace of the same tokens (e.g. the dense / exact trace next to the sparse one): the
  page shows both block maps side by side (`label`, `compare_label`) with one zoom, pan and hover; its
  layers must have the same heads, block sizes and lengths as `trace`'s layers of the same id.
  routes: route results to show in the routes panel, success and failure side by side (e.g. the samples of
  a needle sweep: `route_samples(sweep)`); each a mapping with trace (one sample's Trace), needle_spans,
  success (bool), label, and optionally prediction, ablation (an `analysis.causal.SampleAblation` or a
  dict with route_flipped, random_flipped, random_runs: the route verified by ablation when route_flipped),
  heads (bool[L, N] the ablated heads; default `causal.route_heads` of the route) and main (True: the
  sample of `trace`, whose edges open in the block map). Default: the route of `trace` to `needle_spans`.
  Returns the folder; manifest["export_seconds"] says how long it took.
  """
  t0 = time.perf_counter()
  trace = one_sample(trace, batch_index)
  out = pathlib.Path(out_dir).absolute()
  if out.exists():
    if not (out / "manifest.json").exists() or not (out / "tiles").is_dir():
      if any(out.iterdir()):
        raise ValueError(f"{out} exists and is not a viewer folder; give a new or empty folder")
    else:
      shutil.rmtree(out)
  out.mkdir(parents=True, exist_ok=True)
  n_heads = int(trace.layers[0].mass.shape[0])
  t_len = trace.layers[0].mask.k_len

  if pieces is None and text is not None and offsets is not None:
    pieces = pieces_from_offsets(text, offsets, special=None)
    if tokenizer is not None and ids is not None:
      vocab = pieces_from_tokenizer(tokenizer, ids)
      pieces = [p if p else v for p, v in zip(pieces, vocab)]
  elif pieces is None and tokenizer is not None and ids is not None:
    pieces = pieces_from_tokenizer(tokenizer, ids)
  if pieces is not None:
    if len(pieces) != t_len:
      raise ValueError(f"{len(pieces)} token strings for a trace of {t_len} tokens")
    (out / "text").mkdir()
    text_chunks = chunks(pieces, text_chunk)
    for i, c in enumerate(text_chunks):
      (out / "text" / f"{i}.json").write_text(json.dumps(c, ensure_ascii=False))
    (out / "search.bin").write_bytes(search_index(text_chunks))

  spans, sent_texts = None, None
  if sentences is not None:
    spans = np.asarray(getattr(sentences, "tokens", sentences), np.int64).reshape(-1, 2)
    sent_texts = getattr(sentences, "texts", None)
    if len(spans) and (spans.min() < 0 or spans.max() > t_len):
      raise ValueError(f"sentence token spans must lie in [0, {t_len}]")
  stats = summary.overview(trace, sentence_spans=spans, needle_spans=needle_spans)
  if spans is not None:
    if labels is None and sent_texts is not None:
      from stream_jax.analysis.anchors import label_sentences  # pylint: disable=import-outside-toplevel
      labels = label_sentences(sent_texts)
    labs = [l if isinstance(l, str) else "+".join(l) for l in (labels or ["unknown"] * len(spans))]
    (out / "sentences.json").write_text(json.dumps(dict(
        spans=spans.tolist(), labels=labs, importance=_json_num(stats["importance"]))))
    if stats["vertical"] is not None:
      (out / "vertical.bin").write_bytes(np.ascontiguousarray(stats["vertical"], np.float32).tobytes())

  route_data = None
  if routes is None and needle_spans is not None and len(needle_spans):
    routes = [dict(trace=trace, needle_spans=needle_spans, label="this trace", main=True)]
  if routes:
    samples = [x for x in (route_sample_json(r, batch_index) for r in routes) if x is not None]
    if samples:
      route_data = dict(samples=samples)
      (out / "routes.json").write_text(json.dumps(route_data))

  layers, nbytes = _write_layers(out, trace, n_heads, tile_rows, top)
  compare_data = None
  if compare is not None:
    compare = _check_compare(trace, one_sample(compare, batch_index))
    c_layers, c_bytes = _write_layers(out / "compare", compare, n_heads, tile_rows, top)
    nbytes += c_bytes
    c_stats = summary.overview(compare)
    compare_data = dict(label=compare_label, main_label=label, layers=c_layers,
                        stats=dict(kept=_json_num(c_stats["kept"]),
                                   coverage=_json_num(c_stats["coverage"])))
  needle = None
  if needle_spans is not None and len(needle_spans):
    ns = np.asarray(needle_spans, np.int64).reshape(-1, 2)
    bk = trace.layers[0].mask.block_k
    needle = dict(spans=ns.tolist(), blocks=sorted({b for s, e in ns for b in range(s // bk, (e - 1) // bk + 1)}))
  manifest = dict(
      format=FORMAT, title=title, tokens=t_len, num_heads=n_heads, tile_rows=tile_rows,
      text_chunk=text_chunk if pieces is not None else None, text_index=pieces is not None, layers=layers,
      stats=dict(kept=_json_num(stats["kept"]), coverage=_json_num(stats["coverage"]),
                 anchor=_json_num(stats["anchor"]), receivers=stats["receivers"],
                 needle=_json_num(stats["needle"])),
      sentences=None if spans is None else dict(count=len(spans), vertical=stats["vertical"] is not None),
      needle=needle, routes=route_data is not None, tile_bytes=nbytes, compare=compare_data)
  manifest["export_seconds"] = round(time.perf_counter() - t0, 3)
  (out / "manifest.json").write_text(json.dumps(manifest))
  page.write_page(out)
  return out


def _write_layers(root: pathlib.Path, trace: Trace, n_heads: int, tile_rows: int, top: int):
  """Writes the tiles of every layer under root/tiles; returns (the manifest's layer entries, bytes)."""
  layers, nbytes = [], 0
  for l in trace.layers:
    m = l.mask
    levels = tiles.pyramid(m.indices, l.mass, m.num_k_blocks, top=top)
    nbytes += tiles.write_layer(root, l.layer, levels, n_heads, tile_rows=tile_rows,
                                coverage=None if l.coverage is None else np.asarray(l.coverage))
    layers.append(dict(layer=l.layer, kind=l.kind, mode=l.mode, window=l.window, block_q=m.block_q,
                       block_k=m.block_k, q_len=m.q_len, k_len=m.k_len, capacity=m.capacity,
                       has_coverage=l.coverage is not None, incoming=True,
                       levels=[dict(z=v.z, rows=v.rows, cols=v.cols, tiles=tiles.num_tiles(v.rows, tile_rows))
                               for v in levels]))
  return layers, nbytes


def _check_compare(trace: Trace, other: Trace) -> Trace:
  """`other` restricted to the layers `trace` has, after checking their cells mean the same blocks."""
  mine = {l.layer: l for l in trace.layers}
  keep = []
  for l in other.layers:
    if l.layer not in mine:
      continue
    a, b = mine[l.layer].mask, l.mask
    if (a.block_q, a.block_k, a.q_len, a.k_len) != (b.block_q, b.block_k, b.q_len, b.k_len) or \
        l.mass.shape[0] != mine[l.layer].mass.shape[0]:
      raise ValueError(f"compare: layer {l.layer} has blocks {b.block_q}x{b.block_k}, lengths {b.q_len}/{b.k_len}, "
                       f"{l.mass.shape[0]} heads; the trace has {a.block_q}x{a.block_k}, {a.q_len}/{a.k_len}, "
                       f"{mine[l.layer].mass.shape[0]} heads: the maps would not line up")
    keep.append(l)
  if not keep:
    raise ValueError("compare: no layer of the compare trace is in the trace")
  return Trace(tuple(keep))


def route_json(trace: Trace, needle_spans, *, max_edges: int = 400, min_flow: float = 1e-3) -> Optional[dict]:
  """The needle's route (`routes.route`: rollout from the last query block down the kept blocks) for the
  routes panel: blocks holding flow per layer input, the heaviest kept edges on a path from the needle, and
  the needle's flow per layer; None when the trace's layout has no route (query and key blocks differ)."""
  from stream_jax.analysis import routes  # pylint: disable=import-outside-toplevel
  try:
    r = routes.route(trace, np.asarray(needle_spans, np.int32).reshape(-1, 2))
  except ValueError:
    return None
  flow = np.asarray(r.flow)
  nodes = [[int(l), int(b), float(flow[l, b])] for l, b in zip(*np.nonzero(flow > min_flow))]
  edges = [[l, n, c, j, w] for l, n, c, j, w in r.edge_list(min_weight=min_flow)[:max_edges]]
  needle = np.asarray(r.carried[0])
  return dict(layers=[l.layer for l in trace.layers], blocks=int(flow.shape[1]),
              needle_blocks=np.nonzero(needle)[0].tolist(), needle_flow=np.asarray(r.needle_flow).tolist(),
              nodes=nodes, edges=edges, min_flow=min_flow)


def route_sample_json(r: Mapping, batch_index: int = 0) -> Optional[dict]:
  """One route result for the panel: route_json plus label, success, prediction, main and the ablation's
  verdict. Edges get a 6th field, 1 when ablation verified them: the ablation flipped the answer and the
  edge is one it cut (a needle key block read by an ablated head)."""
  from stream_jax.analysis import causal, routes  # pylint: disable=import-outside-toplevel
  tr = one_sample(r["trace"], batch_index)
  spans = np.asarray(r["needle_spans"], np.int32).reshape(-1, 2)
  data = route_json(tr, spans)
  if data is None:
    return None
  ab = r.get("ablation")
  if ab is not None and not isinstance(ab, Mapping):
    ab = dict(route_flipped=ab.route_flipped, random_flipped=ab.random_flipped, random_runs=ab.random_runs)
  verified, cut = None, set()
  if ab is not None and ab.get("route_flipped") is not None:
    heads = r.get("heads")
    if heads is None:
      bk = tr.layers[0].mask.block_k
      heads = causal.route_heads(routes.route(tr, spans), routes.span_blocks(spans, bk, tr.layers[0].mask.k_len))
    heads = np.asarray(heads, bool)
    verified = dict(flipped=bool(ab["route_flipped"]), random_flipped=int(ab.get("random_flipped", 0)),
                    random_runs=int(ab.get("random_runs", 0)), heads=np.argwhere(heads).tolist())
    if verified["flipped"]:
      cut = {(int(l), int(h)) for l, h in np.argwhere(heads)}
  needle = set(data["needle_blocks"])
  data["edges"] = [e + [int((e[0], e[1]) in cut and e[2] in needle)] for e in data["edges"]]
  data.update(label=str(r.get("label", "")), success=None if r.get("success") is None else bool(r["success"]),
              prediction=None if r.get("prediction") is None else str(r["prediction"]),
              main=bool(r.get("main", False)), verified=verified)
  return data


def route_samples(sweep, main: Optional[int] = None) -> list[dict]:
  """`routes=` for export_viewer from a needle sweep (`experiments.NiahSweep`): every row's trace,
  needle, success and answer, and the route ablation of the same prompt when the sweep verified routes
  (with the heads it suppressed the needle in, so the edges it cut are the ones marked). main: the row whose
  trace is the exported one."""
  abl = list(sweep.ablation.samples) if getattr(sweep, "ablation", None) is not None else [None] * len(sweep.rows)
  return [dict(trace=row.trace, needle_spans=row.sample.value_spans, success=row.success,
               label=f"{row.length} tokens, seed {row.seed}" + ("" if row.depth is None else f", depth {row.depth:g}%"),
               prediction=row.prediction.strip(), ablation=a, heads=getattr(a, "heads", None), main=i == main)
          for i, (row, a) in enumerate(zip(sweep.rows, abl))]


def is_viewer(path) -> bool:
  p = pathlib.Path(path)
  return (p / "manifest.json").is_file() and (p / "index.html").is_file() and (p / "tiles").is_dir()


def folder_bytes(path) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
