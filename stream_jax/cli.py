"""The `stream-jax` command (demo, trace, niah, anchors, view, clean): parses arguments, checks everything
checkable before the model loads (bad input: exit status 2, one line naming it; `--debug` for the
traceback), runs a `stream_jax.experiments` pipeline, prints it and writes its report folder (`--out`: a new
or empty folder, or with `--force` a previous stream_jax report; nothing stream_jax did not write is ever
deleted or overwritten).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import sys
import time
import warnings
from typing import Optional, Sequence

import stream_jax
from stream_jax import outdir
from stream_jax.analysis import niah
from stream_jax.analysis.faithfulness import format_report
from stream_jax.config import AUTO, StreamConfig
from stream_jax import experiments as ex
from stream_jax.experiments import reports
from stream_jax.experiments.settings import InputError as CliError

EXIT_USAGE = 2
DEFAULTS = {f.name: f.default for f in dataclasses.fields(StreamConfig)}


def _layer_scales_arg(text: str) -> tuple[tuple[int, float], ...]:
  """--layer-scales 5:5,11:6,17:2 -> ((5, 5.0), (11, 6.0), (17, 2.0)) (StreamConfig checks the values)."""
  try:
    pairs = [item.split(":") for item in text.split(",") if item.strip()]
    return tuple((int(l), float(s)) for l, s in pairs)
  except ValueError:
    raise argparse.ArgumentTypeError(f"--layer-scales must be LAYER:SCALE pairs separated by commas (e.g. "
                                     f"5:5,11:6.5), got {text!r}") from None


def _share_arg(text: str):
  """--search-share: 'auto' or an integer (StreamConfig checks the value)."""
  if text.strip().lower() == AUTO:
    return AUTO
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"--search-share must be 'auto' or a power of two, got {text!r}") from None


STREAM_OPTIONS = (  # --flag, type, help; defaults: StreamConfig's
    ("block-q", int, "queries per block (power of two)"), ("block-k", int, "keys per block (power of two)"),
    ("top-k", int, "key blocks kept by the search per query block"), ("sink-blocks", int, "leading key "
     "blocks always kept"), ("window-blocks", int, "key blocks ending at the diagonal always kept (>= 1)"),
    ("init-branches", int, "first-level nodes (>= top-k; default: --top-k)"),
    ("representative", ("center", "first", "oracle"), "block that scores a search node (oracle: exact "
     "top-k, O(T^2), for checks)"),
    ("query-stride", int, "score with every n-th query of a block (power of two)"),
    ("search-share", _share_arg, "neighbouring query blocks that run the search's upper rounds together, "
     "each scoring the last round itself (power of two; fewer scored blocks at long context), or auto: 8 "
     "once the search has 3 rounds (from 64k tokens with --top-k 128 at 64-token blocks), 16 from 7 (1M), "
     "else 1"),
    ("coverage", float, "adaptive budget: keep the fewest blocks (at most --top-k) whose estimated share of "
     "each query block's attention reaches this target in (0, 1] (e.g. 0.95 with --top-k 128 and "
     "--search-share auto: StreamConfig.faithful()); default: a fixed --top-k"),
    ("score", ("max", "mass"), "block score: max logit (the paper's; default without --coverage) or "
     "estimated attention mass (default with --coverage)"),
    ("select", ("search", "ideal", "table"), "how the kept set is chosen: search (the paper's hierarchical "
     "search, estimated scores), ideal (key blocks by their true mass, from a dense pass: exact coverage), "
     "table (every causal block by the true mass every --query-stride-th query gives it, e.g. 4: no search "
     "and no dense pass, below dense cost on a Hopper GPU)"),
    ("dropped-scale", float, "with --coverage: multiplies the search's estimate of the attention it dropped "
     "(> 1 keeps more; the estimate runs low on heavy-tailed attention); `stream-jax calibrate` fits it"),
    ("layer-scales", _layer_scales_arg, "with --coverage: --dropped-scale per layer, LAYER:SCALE,... (e.g. "
     "5:5,11:6,17:2, what `stream-jax calibrate` prints); layers not named use --dropped-scale"))


# The Python parameters that experiments' messages and notes name (InputError.params), and the flags that
# set them: the CLI says "--top-k" where the library says "top_k".
FLAGS = {"top_k": "--top-k", "block_q": "--block-q", "block_k": "--block-k", "dense_layers": "--dense-layers",
         "layer_scales": "--layer-scales", "dropped_scale": "--dropped-scale", "prune_local": "--prune-local",
         "length": "--length", "lengths": "--lengths", "depths": "--depths", "variant": "--variant",
         "seed": "--seed"}
# The parameters the notes (pruning notice, sink note) name; the notes' prose uses no other of these words.
NOTE_PARAMS = ("top_k", "block_q", "block_k", "seed")


def flag_wording(text: str, params) -> str:
  """`text` with each of `params` (Python parameter names) written as its flag, where it stands as a word."""
  names = [p for p in params if p in FLAGS]
  if not names:
    return text
  pattern = r"(?<![\w-])(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + r")(?!\w)"
  return re.sub(pattern, lambda m: FLAGS[m.group(1)], text)


def notes_wording(notes):
  """A result's notes ({title: text}) with the parameters they advise on written as flags."""
  return {k: flag_wording(v, NOTE_PARAMS) for k, v in (notes or {}).items()}


def pruning_notice_in_flags(kept: float, tokens: int, cfg: StreamConfig) -> Optional[str]:
  """`ex.pruning_notice` in the CLI's words (flags)."""
  notice = ex.pruning_notice(kept, tokens, cfg)
  return None if notice is None else flag_wording(notice, NOTE_PARAMS)


def read_text(path, option: str = "--file") -> str:
  """A UTF-8 text file's contents; missing, binary, non-UTF-8 and empty files raise InputError naming
  `option`."""
  name = str(path)
  path = pathlib.Path(path)
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


def peek_model(name_or_path: str):
  """The model's config from its file header or config.json (no weights); InputError naming --model."""
  from stream_jax.extras import models  # pylint: disable=import-outside-toplevel
  load_lib = models().load
  if name_or_path.lower() not in load_lib.EMBEDDED and not pathlib.Path(name_or_path).exists():
    raise CliError(f"--model: {name_or_path!r} is neither a known name ('gemma3-270m') nor an existing "
                     "file or directory")
  try:
    return load_lib.peek_config(name_or_path)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CliError(f"--model: {e}") from None


def niah_haystack(task: niah.NiahTask, variant: str, path: Optional[str]) -> Optional[str]:
  """The essay haystack's prose from a UTF-8 file (None: the default); only for essay variants."""
  if not path:
    return None
  if task.haystack != "essay":
    essays = sorted(k for k, v in niah.VARIANTS.items() if v.haystack == "essay")
    raise CliError(f"--haystack-file is for the essay variants ({', '.join(essays)}); {variant} uses the "
                     f"{task.haystack} haystack")
  try:
    return niah.read_haystack_file(path)
  except (OSError, ValueError) as e:
    raise CliError(f"--haystack-file: {e}") from None


def _int_arg(name, many=False, lo=1):
  def parse(text):
    try:
      values = tuple(int(x) for x in text.split(",") if x.strip()) if many else int(text)
    except ValueError:
      kind = "comma-separated integers" if many else "an integer"
      raise argparse.ArgumentTypeError(f"{name} must be {kind}, got {text!r}") from None
    if not many and values < lo:
      raise argparse.ArgumentTypeError(f"{name} must be >= {lo}, got {values}")
    return values
  return parse


def _float_list(name):
  def parse(text):
    try:
      values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
      raise argparse.ArgumentTypeError(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0:
      raise argparse.ArgumentTypeError(f"{name} must be positive numbers, got {text!r}")
    return values
  return parse


def _common(p, out):
  a = p.add_argument
  a("--model", default="gemma3-270m", help="'gemma3-270m' (the embedded default, offline), a .gguf file, "
    "or a Hugging Face checkpoint directory (config.json + *.safetensors)")
  a("--dtype", choices=("float32", "bfloat16"), default="float32",
    help="parameter/activation dtype (float16 is not supported: Gemma 3 overflows it)")
  g = p.add_argument_group("Stream attention")
  for flag, kind, text in STREAM_OPTIONS:
    choice = isinstance(kind, tuple)
    g.add_argument(f"--{flag}", type=None if choice else kind, choices=kind if choice else None, help=text,
                   default=DEFAULTS[flag.replace("-", "_")])
  g.add_argument("--dense-layers", type=_int_arg("--dense-layers", many=True), default=(),
                 help="comma-separated layer ids that run dense attention (their trace is still kept)")
  g.add_argument("--prune-local", action="store_true",
                 help="also prune sliding-window layers (default: they run exact, as a block band)")
  g.add_argument("--backend", choices=("xla", "pallas", "auto"), default="auto",
                 help="auto = Pallas kernels on a GPU, XLA elsewhere")
  a("--out", default=out, help=f"report folder (default {out}): a new or empty folder, written atomically "
    "(nothing appears until the report is complete). An existing folder is never deleted unless it is a "
    "previous stream_jax report and --force is given")
  a("--force", action="store_true", help="replace a previous stream_jax report at --out (never a file or a "
    "folder stream_jax did not write, nor a report you added files to or edited: its marker holds the "
    "content hash of every file it wrote)")
  a("--debug", action="store_true", help="show the full traceback of an error")


def settings(args) -> ex.Settings:
  try:
    cfg = StreamConfig(**{f: getattr(args, f) for f in (o[0].replace("-", "_") for o in STREAM_OPTIONS)})
  except ValueError as e:  # name the command-line option, not the dataclass field
    raise CliError(str(e).replace("StreamConfig.", "--").replace("_", "-")) from None
  return ex.Settings(cfg, args.dense_layers, args.prune_local, args.backend)


def preflight(args, st, *, lengths: Sequence[int] = (), what: str = "the prompt"):
  """Everything knowable before the model loads: output folder (ownership, writability, space, whether it
  can be renamed), model file (header and size only), options, and a text's token count."""
  _, how = outdir.plan(args.out, force=args.force)
  if how == outdir.IN_PLACE:
    print(f"note: --out {args.out} cannot be renamed (a mount point, or its parent folder is not writable): "
          "the report will be written into it in place when complete", flush=True)
  config = peek_model(args.model)
  n = config.num_layers
  if getattr(args, "plot_layer", None) is not None and not 0 <= args.plot_layer < n:
    raise CliError(f"--plot-layer must be in [0, {n - 1}] ({config.name} has {n} layers), got "
                   f"{args.plot_layer}")
  ex.check_settings(config, st, lengths, what)
  if getattr(args, "text_", None) is not None:
    check_text(args, config)


def check_text(args, config) -> None:
  """A text longer than the model's context is refused before the weights load: the tokenizer alone
  counts its tokens (it loads in a second or two once cached), and is kept for `load`."""
  from stream_jax.extras import models  # pylint: disable=import-outside-toplevel
  tok = models().load.load_tokenizer(args.model, cache_dir=cache_dir())
  if tok is None:
    return
  what = "--text" if getattr(args, "text", None) is not None else f"--file {args.file}"
  ex.check_length(config, len(tok(args.text_)["input_ids"]), what)
  args.tokenizer_ = tok


def cache_dir():
  """Where converted GGUF parameters and tokenizers are cached: $STREAM_JAX_CACHE, else the loaders'
  default (~/.cache/stream_jax). The library takes it as an argument; the command line reads it here."""
  return os.environ.get("STREAM_JAX_CACHE") or None


def load(args):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from stream_jax.extras import models  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  tok = getattr(args, "tokenizer_", None)
  model = models().load_model(args.model, dtype=jnp.dtype(args.dtype), tokenizer=tok is None,
                              cache_dir=cache_dir())
  if tok is not None:
    model.tokenizer = tok
  print(f"loaded {model.source} ({model.config.name}, {model.config.num_layers} layers, {args.dtype}) in "
        f"{time.perf_counter() - t0:.1f} s", flush=True)
  return model


def _print(*texts, notes=None) -> None:
  print(*texts, *[f"note: {v}" for v in (notes or {}).values()], sep="\n")


def cmd_trace(args, st, model):
  res = ex.trace_text(model, args.text_, st, output=args.output, oracle=args.oracle, progress=True)
  notes = notes_wording(res.notes)
  _print(table := format_report(res.report, f"dense vs Stream, {len(res.ids)} tokens"), notes=notes)
  return _writing(lambda: reports.write_trace(res, model, args.out, force=args.force, plot_layer=args.plot_layer,
                                             table=table, notes=notes))


def cmd_demo(args, st, model):
  """Needle in a haystack (4,096 tokens by default): a dense and a Stream prefill, each answering greedily;
  faithfulness over the pruned regime and coverage from the two prefills; the needle's attention in both
  and its route in the Stream trace."""
  res = ex.demo(model, st, length=args.length, seed=args.seed, max_new_tokens=args.max_new_tokens,
                  progress=True, log=lambda line: print(line, flush=True))
  table = format_report(res.report, f"dense vs Stream, {res.sample.length} tokens")
  notes = notes_wording(res.notes)
  _print(table, res.format(), notes=notes)
  timings = dict(res.timings, total_s=time.perf_counter() - args.started)
  out = _writing(lambda: reports.write_demo(res, model, args.out, force=args.force, table=table,
                                            notes=notes, timings=timings))
  return f"{out}  ({time.perf_counter() - args.started:.0f} s)"


def _writing(write):
  """Runs a report writer between status lines (figures and the trace save take seconds)."""
  print("writing the report (figures, trace, index.html) ...", flush=True)
  t0 = time.perf_counter()
  out = write()
  print(f"  written in {time.perf_counter() - t0:.1f} s", flush=True)
  return out


def cmd_niah(args, st, model):
  res = ex.niah_sweep(model, args.lengths, st, variant=args.variant, depths=args.depths, seed=args.seed,
                        samples=args.samples, haystack=args.haystack, max_new_tokens=args.max_new_tokens,
                        verify_routes=args.verify_routes, progress=True)
  abl = "" if res.ablation is None else "\n\n" + res.ablation.format()
  notes = notes_wording(res.notes)
  _print(text := res.table() + "\n\n" + res.comparison.format() + abl, notes=notes)
  task = (f"RULER {args.variant}: {args.samples} sample(s) per length{' and depth' if args.depths else ''}; "
          f"lengths {', '.join(map(str, args.lengths))}")
  return reports.write_niah(res, model, args.out, force=args.force, task=task, text=text, notes=notes)


def cmd_calibrate(args, st, model):
  """Fits the coverage budget (--coverage, an adaptive --top-k cap) to the model: per global layer, the
  smallest --dropped-scale whose true coverage, from exact passes on the text, reaches the target (mean
  over the pruned query blocks). Prints the --layer-scales to trace with; --held-out-file checks that they
  transfer to other text. Calibrate on text of the length you will trace (--length)."""
  from stream_jax.experiments import calibration  # pylint: disable=import-outside-toplevel
  res = calibration.calibrate_text(model, args.calib_text_, st, held_out=args.held_out_text_, length=args.length,
                                   scales=args.scales or calibration.SCALES, progress=True)
  c = st.config
  select = "" if c.select == "search" else f"--select {c.select} --query-stride {c.query_stride} "
  select += f"--search-share {c.search_share} " if c.search_share != 1 else ""
  flags = (f"{select}--coverage {c.coverage:g} --top-k {c.top_k} --block-q {c.block_q} --block-k {c.block_k} "
           f"--layer-scales {res.layer_scales_flag()}")
  _print(text := res.format() + f"\n\ntrace with: {flags}")
  return reports.write_calibration(res, model, args.out, force=args.force, text=text, flags=flags)


def cmd_anchors(args, st, model):
  res = ex.anchors_for_text(model, args.text_, st, top_heads=args.top_heads)
  notes = notes_wording(res.notes)
  _print(text := res.format(args.show), notes=notes)
  return reports.write_anchors(res, model, args.out, force=args.force, text=text, notes=notes)


def cmd_view(args) -> int:
  """`stream-jax view PATH`: the viewer of a report folder, a saved trace or a viewer folder, exported if
  needed (into --out, or a cache folder keyed by the trace's path and time) and served on 127.0.0.1."""
  from stream_jax import viewer  # pylint: disable=import-outside-toplevel
  folder = resolve_viewer(args.path, args.out)
  if args.export_only:
    print(f"viewer folder: {folder}")
    return 0
  server = viewer.serve(folder, port=args.port, background=True)
  print(f"serving {folder}\nopen {server.url}  (Ctrl-C to stop)", flush=True)
  if not args.no_browser:
    import webbrowser  # pylint: disable=import-outside-toplevel
    webbrowser.open(server.url)
  try:
    while True:
      time.sleep(3600)
  except KeyboardInterrupt:
    server.shutdown()
  return 0


def resolve_viewer(path, out=None):
  """The viewer folder of PATH: PATH itself or PATH/viewer when already exported, else an export of the
  trace saved at PATH (a report folder or a `save_trace` folder; without its text: positions only)."""
  import hashlib  # pylint: disable=import-outside-toplevel
  from stream_jax import viewer  # pylint: disable=import-outside-toplevel
  from stream_jax.trace_io import TRACE_META, load_trace  # pylint: disable=import-outside-toplevel
  p = pathlib.Path(path).expanduser().absolute()
  if not p.exists():
    raise CliError(f"{path!r} does not exist")
  for cand in (p, p / "viewer"):
    if viewer.is_viewer(cand) and out is None:
      return cand
  if not (p / TRACE_META).is_file():
    raise CliError(f"{path!r} is neither a viewer folder nor a report / trace folder (no {TRACE_META})")
  if out is None:
    key = hashlib.sha1(f"{p}:{(p / TRACE_META).stat().st_mtime_ns}".encode()).hexdigest()[:16]
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
    out = cache / "stream_jax" / "viewer" / key
    if viewer.is_viewer(out):
      return out
  print(f"exporting the trace at {p} into {out} ...", flush=True)
  title = p.name
  return viewer.export_viewer(out, load_trace(p), title=f"{title} (no token text saved: positions only)")


def run(args) -> int:
  """Checks the inputs (before the model loads), loads the model, runs the command."""
  args.started, st = time.perf_counter(), settings(args)
  lengths, what = (), "the prompt"
  if args.command == "demo":
    ex.check_needle_length(args.length)
    lengths, what = (args.length,), "--length"
  elif args.command == "niah":
    task = ex.niah_task(args.variant, args.lengths, args.depths)
    args.haystack = niah_haystack(task, args.variant, args.haystack_file)
    lengths, what = args.lengths, "--lengths entry"
  elif args.command == "calibrate":
    args.calib_text_ = read_text(args.file, "--file")
    args.held_out_text_ = None if args.held_out_file is None else read_text(args.held_out_file, "--held-out-file")
    if args.coverage is None:
      raise CliError("calibrate fits the adaptive budget: pass --coverage (e.g. --coverage 0.9 --top-k 128)")
    if args.select == "ideal":
      raise CliError("calibrate fits an estimated budget: --select search or table (select 'search' or "
                     "'table'); --select ideal keeps blocks by their true mass and needs no calibration")
  elif args.command in ("trace", "anchors"):
    args.text_ = args.text if getattr(args, "text", None) is not None else read_text(args.file, "--file")
    if not args.text_.strip():
      raise CliError("the input text is empty")
  preflight(args, st, lengths=lengths, what=what)  # a text's length is checked once it is tokenized
  print(f"report: {args.func(args, st, load(args))}")
  return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """--help shows each option's default, unless its help already says it or there is none (a flag, an
  option that is off unless given)."""

  def _get_help_string(self, action):
    text = action.help or ""
    d = action.default
    if ("(default" in text or "default:" in text or d is None or d is False or d == () or d == argparse.SUPPRESS
        or not action.option_strings):
      return text
    shown = ",".join(map(str, d)) if isinstance(d, (tuple, list)) else d
    return f"{text} (default: {str(shown).replace('%', '%%')})"


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="stream-jax", description="Sparse tracing of attention with hierarchical "
                              "block-sparse masks (Stream), in JAX.", formatter_class=HelpFormatter)
  p.add_argument("--version", action="version", version=f"%(prog)s {stream_jax.__version__}")
  sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
  parser = lambda name, **kw: sub.add_parser(name, formatter_class=HelpFormatter, **kw)
  d = parser("demo", help="needle-in-a-haystack trace of the embedded Gemma 3 270M, with report",
             description=cmd_demo.__doc__)
  d.add_argument("--length", type=_int_arg("--length"), default=ex.DEMO_LENGTH, help="prompt tokens "
                 "(default 4,096: the default StreamConfig keeps about half of the global layers' causal "
                 "pairs, so the numbers measure pruning, and the demo takes under 3 minutes on 2 CPU cores)")
  d.add_argument("--seed", type=int, default=1, help="needle/key/depth seed (seed 1 is a prompt the 270M "
                 "answers; at ~2k tokens it retrieves about half of them, see README)")
  t = parser("trace", help="trace any text with Stream attention and compare with dense")
  src = t.add_mutually_exclusive_group(required=True)
  src.add_argument("--text", help="the text to trace")
  src.add_argument("--file", help="a UTF-8 text file to trace")
  t.add_argument("--output", choices=("sparse", "exact"), default="sparse", help="sparse (the paper's): the "
                 "traced model computes with the kept blocks; exact: it computes dense attention (logits "
                 "equal dense) and the trace observes it (mass = dense probability of each kept block, "
                 "coverage)")
  t.add_argument("--oracle", action="store_true", help="also run the exact top-k (O(T^2) scoring) and "
                 "report recall per layer")
  t.add_argument("--plot-layer", type=int, default=None, help="layer of the mask figure (default: first "
                 "global layer)")
  n = parser("niah", help="needle-in-a-haystack sweep: success rates and route comparison")
  n.add_argument("--lengths", type=_int_arg("--lengths", many=True), default=(600, 3000),
                 help="comma-separated prompt lengths in tokens")
  n.add_argument("--depths", type=_int_arg("--depths", many=True), default=(),
                 help="comma-separated needle depths in percent (default: random per sample)")
  n.add_argument("--samples", type=_int_arg("--samples"), default=4, help="samples per length/depth")
  n.add_argument("--variant", default="single_1", help="RULER variant, e.g. single_1, multikey_1, multivalue")
  n.add_argument("--haystack-file", default=None, help="UTF-8 prose for the essay variants' haystack "
                 "(default: READMEs of installed packages)")
  n.add_argument("--seed", type=int, default=0, help="seed of the first sample (then seed + 1, ...)")
  n.add_argument("--verify-routes", type=_int_arg("--verify-routes", lo=0), default=0, metavar="R",
                 help="causal test: suppress each answered prompt's route needle blocks, and R draws of random "
                 "kept blocks in the same heads; report answer flips (0: off)")
  a = parser("anchors", help="thought anchors of a chain-of-thought text file")
  a.add_argument("--file", required=True, help="UTF-8 chain of thought (text inside <think>...</think> is "
                 "used when present)")
  a.add_argument("--top-heads", type=_int_arg("--top-heads"), default=20, help="receiver heads")
  a.add_argument("--show", type=_int_arg("--show"), default=8, help="sentences to print")
  cb = parser("calibrate", help="fit the coverage budget's per-layer scales to the model on a text",
              description=cmd_calibrate.__doc__)
  cb.add_argument("--file", required=True, help="UTF-8 text to calibrate on (prose like the text you will "
                  "trace)")
  cb.add_argument("--held-out-file", default=None, help="UTF-8 text to check the calibration on")
  cb.add_argument("--length", type=_int_arg("--length", lo=2), default=None, help="use the first N tokens of "
                  "each text (default: all; the texts must fit the model's context)")
  cb.add_argument("--scales", type=_float_list("--scales"), default=None, help="dropped_scale grid, "
                  "comma-separated (default: 1 to 32, 16 values; at most 5 exact passes)")
  v = sub.add_parser("view", help="explore a report / saved trace in the browser (a local server)",
                     description=cmd_view.__doc__)
  v.add_argument("path", help="a report folder (stream-jax demo/trace/anchors), a save_trace folder, or a "
                 "viewer folder")
  v.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free one)")
  v.add_argument("--out", default=None, help="export the viewer into this folder (default: the report's "
                 "viewer/ when it has one, else a cache folder)")
  v.add_argument("--no-browser", action="store_true", help="print the address instead of opening a browser")
  v.add_argument("--export-only", action="store_true", help="export and print the folder; do not serve")
  v.add_argument("--debug", action="store_true", help="show the full traceback of an error")
  v.set_defaults(func=None)
  for sp, fn in ((d, cmd_demo), (t, cmd_trace), (n, cmd_niah), (a, cmd_anchors), (cb, cmd_calibrate)):
    if sp in (d, n):
      sp.add_argument("--max-new-tokens", type=_int_arg("--max-new-tokens"), default=12,
                      help="most tokens of each greedy answer (decoding stops earlier at end of turn)")
    _common(sp, f"reports/{sp.prog.split()[-1]}")
    sp.set_defaults(func=fn)
  c = parser("clean", help="remove report folders stream_jax wrote, only if nothing in them was added or "
             "changed", description=outdir.main.__doc__)
  c.add_argument("folders", nargs="+", metavar="FOLDER")
  c.add_argument("--missing-ok", action="store_true", help="a folder that does not exist is not an error")
  return p


def _note(message, category, *args, **kw):  # pylint: disable=unused-argument
  """ReportWarnings (the report went in place) as `note:` lines, like the run's other notes."""
  print(f"note: {message}", file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = build_parser().parse_args(argv)
  if args.command == "clean":
    return outdir.clean(args.folders, missing_ok=args.missing_ok)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("always", outdir.ReportWarning)
      warnings.showwarning = _note
      return cmd_view(args) if args.command == "view" else run(args)
  except KeyboardInterrupt:
    print("interrupted; no report was written", file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except  (one line for the user; --debug for the traceback)
    if getattr(args, "debug", False):
      raise
    msg = " ".join(flag_wording(str(e), getattr(e, "params", ())).split()) or type(e).__name__
    if not isinstance(e, (CliError, ValueError, TypeError, OSError, KeyError)):
      msg = f"{type(e).__name__}: {msg}"
    msg = msg[:400] + " ..." if len(msg) > 400 else msg
    print(f"stream-jax {args.command}: error: {msg}", file=sys.stderr)
    if not isinstance(e, CliError):
      print("(run again with --debug for the traceback)", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
  sys.exit(main())
