"""The `stream-jax` command: demo, trace, niah, anchors.

Every subcommand loads a model (the embedded Gemma 3 270M by default, offline), runs it with Stream
attention, and writes a report folder (report.json, the trace restorable with `stream_jax.report.load_trace`,
PNG figures, index.html) atomically. Everything checkable is checked before the model loads (output folder,
model file, layer ids, lengths against the model's context, option ranges); bad options and inputs exit
with status 2 and a one-line message that names them (`--debug` shows the traceback).

`--out` never deletes anything stream_jax did not write: it must be a new or empty folder, or, with
`--force`, a previous stream_jax report (recognised by its marker file) that holds nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
from typing import Optional, Sequence

import numpy as np

EXIT_USAGE = 2
# Shortest needle prompt: the template, the needle and the question take about 90 tokens.
NIAH_MIN_TOKENS = 128
# At or above this kept share of causal token pairs, Stream prunes (almost) nothing.
NO_PRUNING = 0.99


class CliError(Exception):
  """A problem with the user's input: printed without a traceback, exit status 2."""


# ------------------------------------------------------------------------------------------------- options


def _positive_int(name):
  def parse(text):
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
    if value < 1:
      raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
    return value
  return parse


def _int_list(name):
  def parse(text):
    try:
      return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
      raise argparse.ArgumentTypeError(f"{name} must be comma-separated integers, got {text!r}") from None
  return parse


def _add_model_args(p):
  p.add_argument("--model", default="gemma3-270m",
                 help="'gemma3-270m' (the embedded default, offline), a .gguf file, or a Hugging Face "
                      "checkpoint directory (config.json + *.safetensors)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="parameter/activation dtype (float16 is not supported: Gemma 3 overflows it)")


def _add_stream_args(p):
  from stream_jax.config import StreamConfig  # pylint: disable=import-outside-toplevel
  d = StreamConfig()
  g = p.add_argument_group("Stream attention")
  g.add_argument("--block-q", type=int, default=d.block_q, help="queries per block (power of two)")
  g.add_argument("--block-k", type=int, default=d.block_k, help="keys per block (power of two)")
  g.add_argument("--top-k", type=int, default=d.top_k, help="key blocks kept by the search per query block")
  g.add_argument("--sink-blocks", type=int, default=d.sink_blocks, help="leading key blocks always kept")
  g.add_argument("--window-blocks", type=int, default=d.window_blocks,
                 help="key blocks ending at the diagonal always kept (>= 1)")
  g.add_argument("--init-branches", type=int, default=None, help="first-level nodes (>= top-k)")
  g.add_argument("--representative", choices=("center", "first", "oracle"), default=d.representative,
                 help="block that scores a search node (oracle: exact top-k, O(T^2), for checks)")
  g.add_argument("--query-stride", type=int, default=d.query_stride,
                 help="score with every n-th query of a block (power of two)")
  g.add_argument("--coverage", type=float, default=d.coverage,
                 help="adaptive budget: keep the fewest blocks (at most --top-k) whose estimated share of "
                      "each query block's attention reaches this target in (0, 1] (e.g. 0.95 with --top-k "
                      "128: StreamConfig.faithful()); default: a fixed --top-k")
  g.add_argument("--score", choices=("max", "mass"), default=None,
                 help="block score: max logit (the paper's; default without --coverage) or estimated "
                      "attention mass (default with --coverage)")
  g.add_argument("--dense-layers", type=_int_list("--dense-layers"), default=(),
                 help="comma-separated layer ids that run dense attention (their trace is still kept)")
  g.add_argument("--prune-local", action="store_true",
                 help="also prune sliding-window layers (default: they run exact, as a block band)")
  g.add_argument("--backend", choices=("xla", "pallas", "auto"), default="auto",
                 help="auto = Pallas kernels on a GPU, XLA elsewhere")


def stream_config(args):
  from stream_jax.config import StreamConfig  # pylint: disable=import-outside-toplevel
  try:
    return StreamConfig(block_q=args.block_q, block_k=args.block_k, top_k=args.top_k,
                        sink_blocks=args.sink_blocks, window_blocks=args.window_blocks,
                        init_branches=args.init_branches, representative=args.representative,
                        query_stride=args.query_stride, coverage=args.coverage, score=args.score)
  except ValueError as e:  # name the command-line option, not the dataclass field
    msg = str(e).replace("StreamConfig.", "--").replace("_", "-")
    raise CliError(msg) from None


def _add_out(p, default):
  p.add_argument("--out", default=default,
                 help=f"report folder (default {default}): a new or empty folder; it is written atomically "
                      "(nothing appears until the report is complete). An existing folder is never deleted "
                      "unless it is a previous stream_jax report and --force is given")
  p.add_argument("--force", action="store_true",
                 help="replace a previous stream_jax report at --out (never a file or a folder stream_jax "
                      "did not write, nor a report you added files to)")
  p.add_argument("--debug", action="store_true", help="show the full traceback of an error")


# ------------------------------------------------------------------------------------------------ helpers


def preflight(args, cfg, *, lengths: Sequence[int] = (), what: str = "the prompt"):
  """Checks everything knowable before the model loads; returns the model's GemmaConfig (read from the
  file's header or config.json, without its weights)."""
  from stream_jax.models.load import EMBEDDED, peek_config  # pylint: disable=import-outside-toplevel
  from stream_jax.report import check_out_dir  # pylint: disable=import-outside-toplevel
  check_out_dir(args.out, force=args.force)
  if args.model.lower() not in EMBEDDED and not pathlib.Path(args.model).exists():
    raise CliError(f"--model: {args.model!r} is neither a known name ('gemma3-270m') nor an existing "
                   "file or directory")
  try:
    config = peek_config(args.model)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CliError(f"--model: {e}") from None
  n = config.num_layers
  bad = [i for i in args.dense_layers if not 0 <= i < n]
  if bad:
    raise CliError(f"--dense-layers {','.join(map(str, bad))}: layer ids must be in [0, {n - 1}] "
                   f"({config.name} has {n} layers)")
  plot_layer = getattr(args, "plot_layer", None)
  if plot_layer is not None and not 0 <= plot_layer < n:
    raise CliError(f"--plot-layer must be in [0, {n - 1}] ({config.name} has {n} layers), got {plot_layer}")
  limit = context_length(config)
  for length in lengths:
    if length > limit:
      raise CliError(f"{what} of {length} tokens is longer than the model's context of {limit}")
  if cfg.top_k * cfg.block_k > limit:
    raise CliError(f"--top-k {cfg.top_k} x --block-k {cfg.block_k} = {cfg.top_k * cfg.block_k} keys per "
                   f"query block is more than the model's context of {limit} tokens")
  return config


def read_text_file(option: str, name: str) -> str:
  """A UTF-8 text file's contents; missing, binary and empty files are refused."""
  path = pathlib.Path(name)
  if not path.is_file():
    raise CliError(f"{option}: {name!r} does not exist or is not a file")
  raw = path.read_bytes()
  if b"\0" in raw[:65536]:
    raise CliError(f"{option}: {name!r} is a binary file, not text")
  text = raw.decode("utf-8", errors="replace")
  if text.count("\ufffd") > max(8, len(text) // 100):
    raise CliError(f"{option}: {name!r} is not UTF-8 text ({text.count(chr(0xfffd))} undecodable bytes)")
  if not text.strip():
    raise CliError(f"{option}: {name!r} is empty")
  return text


def pruning_notice(kept: float, tokens: int, cfg) -> Optional[str]:
  """A sentence when Stream keeps (nearly) every token pair at these settings, with what to change."""
  if not kept >= NO_PRUNING:
    return None
  n_k = -(-tokens // cfg.block_k)
  top_k = max(1, n_k // 4 - cfg.sink_blocks - cfg.window_blocks)
  return (f"Stream keeps {kept:.1%} of the token pairs: pruning does (almost) nothing at these settings. "
          f"{tokens} tokens make {n_k} key blocks of {cfg.block_k}, and every query block keeps up to "
          f"{cfg.capacity} (sink {cfg.sink_blocks} + top-k {cfg.top_k} + window {cfg.window_blocks}). "
          f"For this length try --top-k {top_k}, or smaller blocks (--block-q/--block-k "
          f"{max(8, cfg.block_k // 4)}), or a longer input.")


def load(args):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from stream_jax.models import load_model  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  model = load_model(args.model, dtype=jnp.dtype(args.dtype))
  print(f"loaded {model.source} ({model.config.name}, {model.config.num_layers} layers, {args.dtype}) "
        f"in {time.perf_counter() - t0:.1f} s", flush=True)
  return model


def context_length(config) -> int:
  """Trained context: the config's own (Llama / Qwen max_position_embeddings); Gemma 2 8k; Gemma 3 128k
  where global RoPE is scaled (4B+), else 32k (270M, 1B)."""
  if getattr(config, "context_length", None):
    return config.context_length
  if config.family == "gemma2":
    return 8_192
  return 131_072 if config.rope_global_scale > 1 else 32_768


def check_length(model, n_tokens: int, what: str):
  limit = context_length(model.config)
  if n_tokens > limit:
    raise CliError(f"{what} has {n_tokens} tokens, longer than the model's context of {limit}")
  if n_tokens < 2:
    raise CliError(f"{what} has {n_tokens} token(s); need at least 2")


def _settings(cfg, args) -> str:
  s = (f"block_q={cfg.block_q}, block_k={cfg.block_k}, top_k={cfg.top_k}, sink_blocks={cfg.sink_blocks}, "
       f"window_blocks={cfg.window_blocks}, representative={cfg.representative}")
  if args.dense_layers:
    s += f", dense layers {','.join(map(str, args.dense_layers))}"
  return s + (", local layers pruned" if args.prune_local else ", local layers exact")


def _excerpt(text: str, n: int = 300) -> str:
  text = " ".join(text.split())
  return text if len(text) <= 2 * n else f"{text[:n]} [...] {text[-n:]}"


def logits_fn(model):
  from stream_jax.models import logits_from_hidden  # pylint: disable=import-outside-toplevel
  return lambda h: logits_from_hidden(model, model.params, h)


def run_pair(model, ids, cfg, args, *, oracle: bool = False):
  """Dense and Stream forwards on the same tokens -> (trace, FaithfulnessReport, timings)."""
  from stream_jax.analysis import faithfulness  # pylint: disable=import-outside-toplevel
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  common = dict(return_hidden=True, last_only=True, backend=args.backend)
  timings = {}
  bar = tqdm(total=3 if oracle else 2, desc="forward passes", unit="pass")
  t0 = time.perf_counter()
  _, _, d_hidden = model.forward(ids, attention="dense", **common)
  d_hidden.block_until_ready()
  timings["dense_forward_s"] = time.perf_counter() - t0
  bar.update()
  t0 = time.perf_counter()
  output = getattr(args, "output", "sparse")
  _, trace, s_hidden = model.forward(ids, attention=cfg, dense_layers=args.dense_layers,
                                     prune_local=args.prune_local, output=output, coverage=True, **common)
  s_hidden.block_until_ready()
  timings["stream_forward_s"] = time.perf_counter() - t0
  bar.update()
  oracle_masks = None
  if oracle:
    _, o_trace, _ = model.forward(ids, attention=cfg.replace(representative="oracle"),
                                  dense_layers=args.dense_layers, prune_local=args.prune_local, **common)
    oracle_masks = faithfulness.oracle_masks(trace, o_trace)
    bar.update()
  bar.close()
  report = faithfulness.faithfulness_report_from_hidden(
      list(d_hidden[1:]), list(s_hidden[1:]), logits_fn(model), trace=trace, oracle_masks=oracle_masks,
      pruned_from=faithfulness.pruned_start(len(ids), cfg))
  return trace, report, timings


def _stream_dict(cfg, args):
  return dict(dataclasses.asdict(cfg), dense_layers=list(args.dense_layers), prune_local=args.prune_local,
              backend=args.backend)


def _first_global(trace):
  glob = [i for i, l in enumerate(trace.layers) if l.kind == "global"]
  return glob[0] if glob else 0


# -------------------------------------------------------------------------------------------- subcommands


COVERAGE_CAPTION = ("Coverage: the share of each head's dense attention that its kept blocks hold (1 = the "
                    "sparse picture misses nothing), per pruned layer and head over the pruned query blocks "
                    "(left), and along the sequence (right).")


def _coverage_figure(trace, report, cfg) -> dict:
  """{"coverage": plot} when the trace carries coverage on a pruned layer, else {}."""
  from stream_jax import plots  # pylint: disable=import-outside-toplevel
  if not any(l.coverage is not None and l.mode != "window" for l in trace.layers):
    return {}
  n_q = trace.layers[0].mask.num_q_blocks
  start = min((report.pruned_from or 0) // cfg.block_q, n_q - 1)
  return {"coverage": lambda p: plots.plot_coverage(trace, p, start_block=start,
                                                    title="coverage of the kept blocks")}


def cmd_trace(args):
  from stream_jax import plots  # pylint: disable=import-outside-toplevel
  from stream_jax.analysis import faithfulness  # pylint: disable=import-outside-toplevel
  from stream_jax.report import write_report  # pylint: disable=import-outside-toplevel
  cfg = stream_config(args)
  if args.file is not None:
    text = read_text_file("--file", args.file)
  else:
    text = args.text
  if not text.strip():
    raise CliError("the input text is empty")
  preflight(args, cfg)  # the input's length is checked once it is tokenized, before any forward pass
  model = load(args)
  ids = model.encode(text)
  check_length(model, len(ids), "the input")
  trace, report, timings = run_pair(model, ids, cfg, args, oracle=args.oracle)
  layer = args.plot_layer if args.plot_layer is not None else _first_global(trace)
  lt = trace.layers[layer]
  table = faithfulness.format_report(report, f"dense vs Stream, {len(ids)} tokens")
  print(table)
  notice = pruning_notice(report.summary().get("kept_stream", 0.0), len(ids), cfg)
  if notice:
    print(f"note: {notice}")
  summary = dict(model=model.config.name, tokens=len(ids), **report.summary(), **timings)
  out = write_report(
      args.out, title="stream-jax trace", summary=summary, trace=trace, sections={"faithfulness": table},
      force=args.force, notes={"pruning does nothing": notice} if notice else None,
      intro={"text (excerpt)": _excerpt(text), "Stream settings": _settings(cfg, args)},
      captions={f"mask_layer{layer}": f"Layer {layer} ({lt.kind}, {lt.mode}): which key blocks (columns) "
                "each query block (rows) kept, coloured by the attention mass they received, mean over "
                "heads; white = not kept by any head.",
                "coverage": COVERAGE_CAPTION},
      report=dict(command="trace", model=model.source, tokens=len(ids), stream=_stream_dict(cfg, args),
                  output=args.output, faithfulness=report, timings=timings, notice=notice),
      figures={f"mask_layer{layer}": lambda p: plots.plot_block_mask(
          lt.mask, p, mass=lt.mass, title=f"layer {layer} ({lt.kind}, {lt.mode}): kept blocks, mass "
          "(mean over heads)"), **_coverage_figure(trace, report, cfg)})
  print(f"report: {out}")
  return 0


def cmd_demo(args):
  """Needle in a haystack at ~10k tokens: trace, faithfulness over the pruned regime and coverage, answer
  with Stream prefill, route."""
  import jax  # pylint: disable=import-outside-toplevel
  from stream_jax import plots  # pylint: disable=import-outside-toplevel
  from stream_jax.analysis import faithfulness, niah, routes  # pylint: disable=import-outside-toplevel
  from stream_jax.report import write_report  # pylint: disable=import-outside-toplevel
  started = time.perf_counter()
  cfg = stream_config(args)
  if args.length < NIAH_MIN_TOKENS:
    raise CliError(f"--length must be >= {NIAH_MIN_TOKENS} (the needle, the question and the template take "
                   f"about 90 tokens), got {args.length}")
  preflight(args, cfg, lengths=(args.length,), what="--length")
  model = load(args)
  sample = niah.generate_sample(model.tokenizer, args.length, niah.VARIANTS["single_1"], seed=args.seed)
  print(f"needle prompt: {sample.length} tokens; asks for {sample.keys[0]!r} (answer {sample.answers[0]})",
        flush=True)
  trace, report, timings = run_pair(model, sample.ids, cfg, args)
  notice = pruning_notice(report.summary().get("kept_stream", 0.0), sample.length, cfg)
  answers = {}
  for name, attention in (("dense", "dense"), ("stream", cfg)):
    t0 = time.perf_counter()
    gen = model.generate(sample.ids, max_new_tokens=args.max_new_tokens, attention=attention,
                         dense_layers=args.dense_layers if name == "stream" else (),
                         prune_local=args.prune_local, backend=args.backend)
    timings[f"{name}_generate_s"] = time.perf_counter() - t0
    answers[name] = gen.text if isinstance(gen.text, str) else gen.text[0]
  answer = answers["stream"]
  score = niah.match_all(answer, sample.answers)
  dense_score = niah.match_all(answers["dense"], sample.answers)
  spans = np.asarray([n.value_token_span for n in sample.queried_needles])
  needle_mass = np.asarray(routes.trace_needle_mass(trace, spans))  # [L, N]
  rt = routes.route(trace, spans)
  needle_blocks = sorted({int(b) for s, e in spans for b in range(s // cfg.block_k, (e - 1) // cfg.block_k + 1)})
  table = faithfulness.format_report(report, f"dense vs Stream, {sample.length} tokens")
  print(table)
  for name, text, sc in (("dense", answers["dense"], dense_score), ("Stream", answer, score)):
    print(f"{name:>6s} answer: {text.strip()!r} -> {'found' if sc == 1 else 'missed'} {sample.answers[0]}")
  sink_note = None
  if 0 in needle_blocks:
    sink_note = ("the needle shares key block 0 with BOS, the attention sink where most heads park "
                 "attention: its needle mass and route are inflated by the sink; try another --seed or "
                 "smaller --block-k")
    print(f"note: {sink_note}")
  per_layer = needle_mass.mean(-1)
  print("needle mass at the final query block, per layer (mean over heads): "
        + " ".join(f"{x:.3f}" for x in per_layer))
  if notice:
    print(f"note: {notice}")
  timings["total_s"] = time.perf_counter() - started
  layer = _first_global(trace)
  lt = trace.layers[layer]
  summary = dict(model=model.config.name, tokens=sample.length, expected=sample.answers[0],
                 stream_answer=answer.strip(), stream_retrieved=bool(score == 1),
                 dense_answer=answers["dense"].strip(), dense_retrieved=bool(dense_score == 1),
                 same_answer=answers["dense"].strip() == answer.strip(), **report.summary(),
                 needle_flow_at_input=float(rt.needle_flow[0]), total_seconds=timings["total_s"])
  needle_at = int(spans[0][0])
  intro = {
      "prompt (excerpt)": _excerpt(model.decode(sample.ids)),
      "needle position": f"tokens {int(spans[0][0])}-{int(spans[0][1]) - 1} of {sample.length} "
                         f"({100 * needle_at / sample.length:.0f}% deep; key block(s) "
                         f"{', '.join(map(str, needle_blocks))})",
      "question": sample.question,
      "expected answer": sample.answers[0],
      "answers": f"dense: {answers['dense'].strip()!r} ({'found' if dense_score == 1 else 'missed'}); "
                 f"Stream: {answer.strip()!r} ({'found' if score == 1 else 'missed'})",
      "Stream settings": _settings(cfg, args),
  }
  out = write_report(
      args.out, title="stream-jax demo: needle in a haystack", summary=summary, trace=trace,
      sections={"faithfulness": table}, force=args.force, intro=intro,
      notes=dict(([("pruning does nothing", notice)] if notice else [])
                 + ([("needle in the sink block", sink_note)] if sink_note else [])),
      captions={
          f"mask_layer{layer}": f"Layer {layer} (global): which key blocks (columns) each query block (rows) "
                                "kept, coloured by the attention mass they received, mean over heads; white "
                                "= not kept by any head. The needle is in key block(s) "
                                f"{', '.join(map(str, needle_blocks))}.",
          f"mask_layer{layer}_heads": f"The same, one panel per head: heads keep different blocks, and "
                                      "the needle's column is bright in some heads only.",
          "needle_mass": "Share of the final query block's attention that lands on the needle's blocks, "
                         "per layer (rows) and head (columns).",
          "route": "Attention rollout from the last query block (top) down the layers along kept blocks: "
                   "red edges lie on a path that starts at a needle block, grey ones are other kept "
                   "edges; dot size is the share of the answer's information at that block and layer.",
          "coverage": COVERAGE_CAPTION,
      },
      report=dict(command="demo", model=model.source, stream=_stream_dict(cfg, args),
                  sample=dict(length=sample.length, keys=sample.keys, answers=sample.answers,
                              needle_token_spans=spans.tolist(), question=sample.question),
                  answers=answers, retrieved=dict(stream=bool(score == 1), dense=bool(dense_score == 1)),
                  notice=notice,
                  faithfulness=report, timings=timings,
                  needle_mass_per_layer_head=needle_mass, needle_flow=np.asarray(rt.needle_flow),
                  route_edges=rt.edge_list(min_weight=1e-3)[:200], jax=jax.__version__,
                  device=jax.devices()[0].device_kind),
      figures={
          f"mask_layer{layer}": lambda p: plots.plot_block_mask(
              lt.mask, p, mass=lt.mass, title=f"layer {layer}: kept blocks, mass (mean over heads)"),
          f"mask_layer{layer}_heads": lambda p: plots.plot_block_mask_heads(
              lt.mask, p, mass=lt.mass, title=f"layer {layer}: kept blocks and their mass, per head"),
          "needle_mass": lambda p: plots.plot_kurtosis_grid(
              needle_mass, p, title="needle mass at the final query block, per layer and head",
              label="needle share of the final block's attention"),
          "route": lambda p: plots.plot_route(
              rt, p, needle_blocks=needle_blocks,
              title="attention route into the last query block (red: kept edges on a path from the needle)"),
          **_coverage_figure(trace, report, cfg),
      })
  print(f"report: {out}  ({timings['total_s']:.0f} s)")
  return 0


def cmd_niah(args):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  from stream_jax import plots  # pylint: disable=import-outside-toplevel
  from stream_jax.analysis import niah, routes  # pylint: disable=import-outside-toplevel
  from stream_jax.report import write_report  # pylint: disable=import-outside-toplevel
  cfg = stream_config(args)
  if args.variant not in niah.VARIANTS:
    raise CliError(f"--variant must be one of {sorted(niah.VARIANTS)}, got {args.variant!r}")
  task = niah.VARIANTS[args.variant]
  haystack = None
  if args.haystack_file:
    if task.haystack != "essay":
      essays = sorted(k for k, v in niah.VARIANTS.items() if v.haystack == "essay")
      raise CliError(f"--haystack-file is for the essay variants ({', '.join(essays)}); {args.variant} uses "
                     f"the {task.haystack} haystack")
    try:
      haystack = niah.read_haystack_file(args.haystack_file)
    except (OSError, ValueError) as e:
      raise CliError(f"--haystack-file: {e}") from None
  if args.depths:
    if any(not 0 <= d <= 100 for d in args.depths):
      raise CliError(f"--depths are percentages in [0, 100], got {list(args.depths)}")
  if not args.lengths:
    raise CliError("--lengths needs at least one prompt length, e.g. --lengths 600,3000")
  short = [n for n in args.lengths if n < NIAH_MIN_TOKENS]
  if short:
    raise CliError(f"--lengths entries must be >= {NIAH_MIN_TOKENS} tokens (the needles, the question and "
                   f"the template take about 90), got {','.join(map(str, short))}")
  preflight(args, cfg, lengths=args.lengths, what="--lengths entry")
  model = load(args)
  for n in args.lengths:
    check_length(model, n, f"--lengths entry {n}")
  rows, masses, flags = [], [], []
  jobs = [(n, d, s) for n in args.lengths for d in (args.depths or (None,)) for s in range(args.samples)]
  for length, depth, seed in tqdm(jobs, desc="niah samples", unit="sample"):
    t = task if depth is None else dataclasses.replace(
        task, depths=(float(depth),) * (task.num_keys * task.num_values))
    sample = niah.generate_sample(model.tokenizer, length, t, seed=args.seed + seed, haystack_text=haystack)
    gen = model.generate(sample.ids, max_new_tokens=args.max_new_tokens, attention=cfg,
                         dense_layers=args.dense_layers, prune_local=args.prune_local, backend=args.backend)
    answer = gen.text if isinstance(gen.text, str) else gen.text[0]
    score = niah.match_all(answer, sample.answers)
    trace = gen.trace  # the Stream prefill's trace: the attention that produced the answer
    spans = np.asarray([nd.value_token_span for nd in sample.queried_needles])
    nm = np.asarray(routes.trace_needle_mass(trace, spans))
    masses.append(nm)
    flags.append(score == 1)
    rows.append(dict(length=length, depth=depth, seed=args.seed + seed, answers=sample.answers,
                     prediction=answer, score=score, kept_fraction=float(trace.kept_fraction()),
                     needle_mass_per_layer=nm.mean(-1)))
  by_len = {}
  for r in rows:
    by_len.setdefault(r["length"], []).append(r["score"])
  lines = ["length  samples  string_match_all (%)"]
  lines += [f"{n:6d}  {len(v):7d}  {100 * np.mean(v):8.1f}" for n, v in sorted(by_len.items())]
  cmp = routes.compare(masses, flags)
  text = "\n".join(lines) + "\n\n" + cmp.format()
  print(text)
  notes = {}
  for n in sorted(by_len):
    kept = min(r["kept_fraction"] for r in rows if r["length"] == n)
    notice = pruning_notice(kept, n, cfg)
    if notice:
      notes[f"{n} tokens: pruning does nothing"] = notice
      print(f"note ({n} tokens): {notice}")
  figures = {}
  if cmp.n_success and cmp.n_failure:
    figures["success_vs_failure"] = lambda p: plots.plot_success_failure(cmp.success, cmp.failure, p)
  out = write_report(
      args.out, title=f"stream-jax niah ({args.variant})", sections={"results": text}, figures=figures,
      force=args.force, notes=notes,
      intro={"task": f"RULER {args.variant}: {args.samples} sample(s) per length"
                     f"{' and depth' if args.depths else ''}; lengths {', '.join(map(str, args.lengths))}",
             "Stream settings": _settings(cfg, args)},
      captions={"success_vs_failure": "Needle share of the final query block's attention per layer, mean "
                "over samples that retrieved the needle (green) and that missed it (red); right: the "
                "difference per head."},
      summary={f"success@{n}": float(100 * np.mean(v)) for n, v in sorted(by_len.items())},
      report=dict(command="niah", model=model.source, variant=args.variant, stream=_stream_dict(cfg, args),
                  samples=rows, comparison=cmp))
  print(f"report: {out}")
  return 0


def cmd_anchors(args):
  from stream_jax import plots  # pylint: disable=import-outside-toplevel
  from stream_jax.analysis import anchors  # pylint: disable=import-outside-toplevel
  from stream_jax.report import write_report  # pylint: disable=import-outside-toplevel
  cfg = stream_config(args)
  text = read_text_file("--file", args.file)
  preflight(args, cfg)
  model = load(args)
  enc = model.tokenizer(text, return_offsets_mapping=True)
  ids = np.asarray(enc["input_ids"], np.int32)
  check_length(model, len(ids), "the chain of thought")
  sents = anchors.sentences(text, np.asarray(enc["offset_mapping"]))
  if len(sents.texts) < 6:
    raise CliError(f"the chain of thought has {len(sents.texts)} sentences; thought anchors need >= 6 "
                   "(vertical scores skip the 4 nearest later sentences)")
  _, trace = model.forward(ids, attention=cfg, dense_layers=args.dense_layers,
                           prune_local=args.prune_local, backend=args.backend, last_only=True)
  rep = anchors.thought_anchors(trace, sents, top_heads=args.top_heads)
  sink = rep.sink_sentences(cfg.block_k)
  kept = float(trace.kept_fraction())
  notice = pruning_notice(kept, len(ids), cfg)
  lines = [f"{len(sents.texts)} sentences, {len(ids)} tokens; receiver heads (layer, head): "
           + ", ".join(f"L{l}H{h}" for l, h in np.asarray(rep.heads)[:10])]
  lines += [f"  #{i:3d} {s:8.4f} {lab:24s} {t[:90]!r}{'  <- attention sink (BOS block)' if i in sink else ''}"
            for i, s, lab, t in rep.top(args.show)]
  if sink:
    lines.append(f"sentence(s) {', '.join(map(str, sink))} share key block 0 with BOS, the attention sink "
                 "where most heads park attention: their score is the sink's, not an anchor's.")
  lines.append("by category (mean importance, count):")
  lines += [f"  {k:24s} {v[0]:8.4f} {v[1]:4d}" for k, v in rep.categories.items()]
  text_out = "\n".join(lines)
  print(text_out)
  if notice:
    print(f"note: {notice}")
  out = write_report(
      args.out, title="stream-jax thought anchors", sections={"anchors": text_out}, trace=trace,
      force=args.force, notes={"pruning does nothing": notice} if notice else None,
      intro={"chain of thought (excerpt)": _excerpt(text), "Stream settings": _settings(cfg, args)},
      captions={"vertical_scores": "Importance of each sentence: how much attention later sentences (4 or "
                "more sentences on) pay to it in the receiver heads, coloured by category; hatched: the "
                "attention sink (the sentence sharing key block 0 with BOS), not an anchor.",
                "receiver_heads": "Kurtosis of each head's vertical scores (layer x head): heads that focus "
                "on few sentences score high; outlined: the receiver heads used for importance."},
      summary=dict(model=model.config.name, tokens=len(ids), sentences=len(sents.texts),
                   kept_fraction=kept),
      report=dict(command="anchors", model=model.source, stream=_stream_dict(cfg, args),
                  sentences=list(sents.texts), labels=list(rep.labels), importance=rep.importance,
                  receiver_heads=rep.heads, kurtosis=rep.kurtosis, categories=dict(rep.categories),
                  positions=rep.positions, sink_sentences=list(sink), notice=notice),
      figures={"vertical_scores": lambda p: plots.plot_vertical_scores(
          rep.importance, rep.labels, p, texts=sents.texts, sink=sink,
          title="sentence importance (receiver heads' vertical scores)"),
               "receiver_heads": lambda p: plots.plot_kurtosis_grid(
                   rep.kurtosis, p, heads=rep.heads, title="receiver heads: kurtosis of vertical scores")})
  print(f"report: {out}")
  return 0


# ------------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="stream-jax",
      description="Sparse tracing of attention with hierarchical block-sparse masks (Stream), in JAX.")
  sub = p.add_subparsers(dest="command", metavar="COMMAND")
  sub.required = True

  d = sub.add_parser("demo", help="needle-in-a-haystack trace of the embedded Gemma 3 270M, with report",
                     description=cmd_demo.__doc__)
  _add_model_args(d)
  _add_stream_args(d)
  d.add_argument("--length", type=_positive_int("--length"), default=10_240,
                 help="prompt tokens (default 10,240: long enough that the default StreamConfig keeps under "
                      "25%% of the global layers' causal pairs, so the numbers measure pruning)")
  d.add_argument("--seed", type=int, default=1, help="needle/key/depth seed (seed 1 is a prompt the 270M "
                 "answers; at ~2k tokens it retrieves about half of them, see README)")
  d.add_argument("--max-new-tokens", type=_positive_int("--max-new-tokens"), default=12)
  _add_out(d, "reports/demo")
  d.set_defaults(func=cmd_demo)

  t = sub.add_parser("trace", help="trace any text with Stream attention and compare with dense")
  src = t.add_mutually_exclusive_group(required=True)
  src.add_argument("--text", help="the text to trace")
  src.add_argument("--file", help="a UTF-8 text file to trace")
  _add_model_args(t)
  _add_stream_args(t)
  t.add_argument("--output", choices=("sparse", "exact"), default="sparse",
                 help="sparse (the paper's): the traced model computes with the kept blocks; exact: it "
                      "computes dense attention (logits equal dense) and the trace observes it (mass = "
                      "dense probability of each kept block, coverage)")
  t.add_argument("--oracle", action="store_true",
                 help="also run the exact top-k (O(T^2) scoring) and report recall per layer")
  t.add_argument("--plot-layer", type=int, default=None, help="layer of the mask figure (default: first "
                 "global layer)")
  _add_out(t, "reports/trace")
  t.set_defaults(func=cmd_trace)

  n = sub.add_parser("niah", help="needle-in-a-haystack sweep: success rates and route comparison")
  _add_model_args(n)
  _add_stream_args(n)
  n.add_argument("--lengths", type=_int_list("--lengths"), default=(600, 3000),
                 help="comma-separated prompt lengths in tokens")
  n.add_argument("--depths", type=_int_list("--depths"), default=(),
                 help="comma-separated needle depths in percent (default: random per sample)")
  n.add_argument("--samples", type=_positive_int("--samples"), default=4, help="samples per length/depth")
  n.add_argument("--variant", default="single_1", help="RULER variant, e.g. single_1, multikey_1, multivalue")
  n.add_argument("--haystack-file", default=None,
                 help="UTF-8 prose for the essay variants' haystack (default: READMEs of installed packages)")
  n.add_argument("--seed", type=int, default=0)
  n.add_argument("--max-new-tokens", type=_positive_int("--max-new-tokens"), default=12)
  _add_out(n, "reports/niah")
  n.set_defaults(func=cmd_niah)

  a = sub.add_parser("anchors", help="thought anchors of a chain-of-thought text file")
  a.add_argument("--file", required=True, help="UTF-8 chain of thought (text inside <think>...</think> "
                 "is used when present)")
  _add_model_args(a)
  _add_stream_args(a)
  a.add_argument("--top-heads", type=_positive_int("--top-heads"), default=20, help="receiver heads")
  a.add_argument("--show", type=_positive_int("--show"), default=8, help="sentences to print")
  _add_out(a, "reports/anchors")
  a.set_defaults(func=cmd_anchors)
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    return args.func(args)
  except KeyboardInterrupt:
    print("interrupted; no report was written", file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except  (one line for the user; --debug for the traceback)
    if getattr(args, "debug", False):
      raise
    msg = " ".join(str(e).split()) or type(e).__name__
    if not isinstance(e, (CliError, ValueError, TypeError, OSError, KeyError)):
      msg = f"{type(e).__name__}: {msg}"
    if len(msg) > 400:
      msg = msg[:400] + " ..."
    print(f"stream-jax {args.command}: error: {msg}", file=sys.stderr)
    if not isinstance(e, CliError):
      print("(run again with --debug for the traceback)", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
  sys.exit(main())
