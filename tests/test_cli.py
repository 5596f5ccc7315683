"""`stream-jax` end to end (through `python -m stream_jax.cli` or cli.main in-process): every subcommand on small
inputs, and bad inputs with their messages."""

import json
import pathlib
import subprocess
import sys

import pytest

from stream_jax import cli
from stream_jax.report import MARKER
from stream_jax.trace_io import load_trace

CLI = [sys.executable, "-m", "stream_jax.cli"]


def run(*args, cwd=None):
  return subprocess.run(CLI + list(args), capture_output=True, text=True, cwd=cwd, timeout=900)


@pytest.mark.parametrize("args,message", [
    (["demo", "--top-k", "0"], "--top-k must be an integer >= 1"),
    (["demo", "--block-q", "48"], "--block-q must be a positive power of two"),
    (["demo", "--search-share", "3"],
     "--search-share must be 'auto' or a power of two in [1, block-q / query-stride=64]"),
    (["demo", "--search-share", "two"], "--search-share must be 'auto' or a power of two, got 'two'"),
    (["demo", "--length", "-3"], "--length must be >= 1"),
    (["trace", "--file", "/no/such/file.txt"], "does not exist"),
    (["trace", "--text", "hi", "--model", "/no/such/model.gguf"], "neither a known name"),
    (["niah", "--variant", "nope"], "--variant must be one of"),
    (["niah", "--depths", "50,150"], "--depths are percentages"),
    (["anchors", "--file", "/no/such/cot.txt"], "does not exist"),
    (["trace"], "one of the arguments --text --file is required"),
])
def test_bad_inputs_exit_2_with_a_message(args, message, capsys, monkeypatch, tmp_path):
  """In-process (each case a subprocess cost ~2 s of imports); test_bad_input_exits_2_through_the_entry_point
  and test_prompt_longer_than_the_context_is_refused check the real `python -m stream_jax.cli` exit status."""
  monkeypatch.chdir(tmp_path)  # default output folders (reports/...) must not see an earlier run's report
  try:
    rc = cli.main(args)
  except SystemExit as e:  # argparse's own errors
    rc = e.code
  err = capsys.readouterr().err
  assert rc == 2, err
  assert message in err


def test_search_share_auto_reaches_the_config():
  """--search-share auto is StreamConfig.faithful()'s setting: the shared search from 64k tokens."""
  args = cli.build_parser().parse_args(["trace", "--text", "x", "--top-k", "128", "--coverage", "0.95",
                                        "--search-share", "AUTO"])
  cfg = cli.settings(args).config
  assert cfg.search_share == "auto" and cfg.for_length(65536).search_share == 8
  assert "search_share=auto" in cli.settings(args).describe()
  args = cli.build_parser().parse_args(["trace", "--text", "x", "--search-share", "4"])
  assert cli.settings(args).config.search_share == 4


def test_bad_input_exits_2_through_the_entry_point():
  r = run("demo", "--top-k", "0")
  assert r.returncode == 2 and "--top-k must be an integer >= 1" in r.stderr, r.stderr
  r = run("trace")
  assert r.returncode == 2 and "one of the arguments --text --file is required" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def in_process():
  """cli.main in this process, the 270M's weights loaded once for the module's model commands (cli.load
  runs every time; the loader is memoised as in test_readme). As subprocesses the demo, anchors, trace and
  niah runs cost imports and a load each (~10 s a run alone on 2 cores). The entry point itself:
  `python -m stream_jax.cli view` on the anchors report (exit 0) and test_bad_input_exits_2_through_the_entry_point."""
  import stream_jax.models  # pylint: disable=import-outside-toplevel
  real_load = stream_jax.models.load_model
  loaded = {}

  def load_once(name, tokenizer=True, **kwargs):  # loaded with its tokenizer; cli.load sets a peeked one
    key = (name, tuple(sorted(kwargs.items())))
    if key not in loaded:
      loaded[key] = real_load(name, tokenizer=True, **kwargs)
    return loaded[key]
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(stream_jax.models, "load_model", load_once)
    yield loaded


def run_in_process(capsys, *args):
  rc = cli.main(list(args))
  out, err = capsys.readouterr()
  assert rc == 0, err[-3000:]
  return out


def test_demo_writes_a_restorable_report(tmp_path, capsys, in_process):
  out = tmp_path / "demo"
  stdout = run_in_process(capsys, "demo", "--length", "320", "--block-q", "32", "--block-k", "32", "--top-k", "2",
                          "--max-new-tokens", "4", "--out", str(out))
  assert "dense vs Stream, 320 tokens" in stdout and "Stream answer:" in stdout
  report = json.loads((out / "report.json").read_text())
  assert report["sample"]["length"] == 320
  assert 0 < report["faithfulness"]["kept_stream"] < 1
  trace = load_trace(out)
  assert len(trace) == 18 and trace[5].kind == "global"
  for name in ("index.html", "route.png", "needle_mass.png", "mask_layer5.png", "mask_layer5_heads.png"):
    assert (out / name).stat().st_size > 0
  assert not list(tmp_path.glob(".demo.*")), "no temporary folder may be left"
  assert (out / MARKER).exists()
  html = (out / "index.html").read_text()
  for text in ("question", "needle position", "Stream settings", "next-token KL"):
    assert text in html, text
  assert len(in_process) == 1


def test_trace_anchors_and_niah_on_small_inputs(tmp_path, capsys, in_process):
  cot = tmp_path / "cot.txt"
  cot.write_text("<think>We need 17 * 23. First, 17 * 20 = 340. Then 17 * 3 = 51. Adding gives 391. "
                 "Let me double-check: 23 * 17 = 23 * 10 + 23 * 7 = 230 + 161 = 391. That matches. "
                 "So the product is 391. I am confident now.</think> The answer is 391.")
  out = run_in_process(capsys, "anchors", "--file", str(cot), "--block-q", "16", "--block-k", "16", "--top-k", "2",
                       "--out", str(tmp_path / "anchors"))
  assert "receiver heads" in out and (tmp_path / "anchors" / "vertical_scores.png").exists()
  _anchors_report_has_a_viewer_with_text_and_sentences(tmp_path / "anchors")

  out = run_in_process(capsys, "trace", "--file", str(cot), "--block-q", "16", "--block-k", "16", "--top-k", "2",
                       "--out", str(tmp_path / "trace"))
  assert "kl_mean" in out and (tmp_path / "trace" / "trace.json").exists()

  out = run_in_process(capsys, "niah", "--lengths", "200", "--samples", "1", "--block-q", "16", "--block-k", "16",
                       "--top-k", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "niah"))
  assert "string_match_all" in out
  rows = json.loads((tmp_path / "niah" / "report.json").read_text())["samples"]
  assert rows[0]["length"] == 200 and len(rows) == 1
  assert len(in_process) == 1


def _anchors_report_has_a_viewer_with_text_and_sentences(report):
  """`stream-jax view --export-only` on the anchors report: its viewer holds the text and the report's
  sentences with their importance (read from the anchors run above, so the 270M runs anchors once)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  r = run("view", str(report), "--export-only")
  assert r.returncode == 0 and str(report / "viewer") in r.stdout, r.stderr[-3000:]
  v = report / "viewer"
  m = json.loads((v / "manifest.json").read_text())
  sents = json.loads((v / "sentences.json").read_text())
  saved = json.loads((report / "report.json").read_text())
  assert m["sentences"]["count"] == len(saved["sentences"]) == len(sents["labels"])
  text = "".join(json.loads((v / "text" / "0.json").read_text()))
  assert all(s in text for s in saved["sentences"])
  np.testing.assert_allclose([x if x is not None else np.nan for x in sents["importance"]],
                             [x if x is not None else np.nan for x in saved["importance"]], rtol=1e-5)


def test_prompt_longer_than_the_context_is_refused(tmp_path):
  r = run("niah", "--lengths", "40000", "--samples", "1", "--out", str(tmp_path / "n"))
  assert r.returncode == 2 and "longer than the model's context" in r.stderr


# ------------------------------------------------------------------ refused before the model loads (in-process)


@pytest.fixture
def files(tmp_path):
  (tmp_path / "project").mkdir()
  (tmp_path / "project" / "main.py").write_text("print('mine')")
  (tmp_path / "results.csv").write_text("a,b\n")
  (tmp_path / "essay.txt").write_text("An essay, not a model.")
  (tmp_path / "empty.gguf").write_bytes(b"")
  (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x05\x00")
  (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text('{"model_type": "gemma3_text", "hidden_size": 640')
  return tmp_path


BAD = [
    ("demo --length 50", "--length must be >= 128"),
    ("demo --length 40000", "longer than the model's context of 32768"),
    ("niah --lengths 10", "--lengths entries must be >= 128"),
    ("niah --lengths ,", "at least one prompt length"),
    ("trace --text hi --dense-layers 99", "--dense-layers 99: layer ids must be in [0, 17]"),
    ("trace --text hi --plot-layer 99", "--plot-layer must be in [0, 17]"),
    ("trace --text hi --top-k 100000", "more than the model's context"),
    ("trace --text hi --block-q 1099511627776", "--block-q must be <="),
    ("trace --text hi --model {d}/essay.txt", "neither a GGUF file"),
    ("trace --text hi --model {d}/empty.gguf", "empty file"),
    ("trace --text hi --model {d}/cut.gguf", "truncated or corrupt"),
    ("trace --text hi --model {d}/hf", "config.json is not valid JSON"),
    ("trace --file {d}/blob.bin", "binary file"),
    ("trace --text hi --out {d}/results.csv", "existing file"),
    ("trace --text hi --out {d}/results.csv/sub", "is a file"),
    ("trace --text hi --out {d}/project", "did not write"),
    ("trace --text hi --out /proc/stream_jax_x", "cannot create"),
    ("anchors --file {d}/blob.bin", "binary file"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_inputs_are_refused_before_loading(files, capsys, monkeypatch, tmp_path, argv, message):
  import stream_jax.cli  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(tmp_path)  # default output folders (reports/...) must not see an earlier run's report
  monkeypatch.setattr(stream_jax.cli, "load", lambda args: pytest.fail("the model must not load"))
  rc = cli.main(argv.format(d=files).split())
  err = capsys.readouterr().err
  assert rc == 2 and message in err, err
  assert "Traceback" not in err and len(err.strip().splitlines()) <= 2


@pytest.mark.parametrize("command", [
    "demo", "trace --text hello", "niah", "anchors --file {d}/essay.txt"])
@pytest.mark.parametrize("force", [False, True])
def test_an_existing_folder_with_a_file_survives_every_command(files, capsys, command, force):
  argv = command.format(d=files).split() + ["--out", str(files / "project")] + (["--force"] if force else [])
  assert cli.main(argv) == 2
  assert "did not write" in capsys.readouterr().err
  assert (files / "project" / "main.py").read_text() == "print('mine')"
  assert sorted(p.name for p in (files / "project").iterdir()) == ["main.py"]
  assert (files / "results.csv").read_text() == "a,b\n"


def test_debug_shows_the_traceback(files):
  with pytest.raises(ValueError, match="existing file"):
    cli.main(["trace", "--text", "hi", "--out", str(files / "results.csv"), "--debug"])


def test_pruning_notice_says_what_to_change():
  import stream_jax as sj  # pylint: disable=import-outside-toplevel
  cfg = sj.StreamConfig()
  msg = cli.pruning_notice_in_flags(1.0, 600, cfg)
  assert "pruning does (almost) nothing" in msg and "--top-k" in msg and "10 key blocks" in msg
  assert cli.pruning_notice_in_flags(0.5, 4096, cfg) is None


def test_version_and_help_with_defaults(capsys):
  import stream_jax  # pylint: disable=import-outside-toplevel
  with pytest.raises(SystemExit) as e:
    cli.main(["--version"])
  assert e.value.code == 0 and capsys.readouterr().out.strip() == f"stream-jax {stream_jax.__version__}"
  helps = {}
  for command in ("demo", "trace", "niah", "anchors", "clean"):
    with pytest.raises(SystemExit):
      cli.main([command, "--help"])
    helps[command] = " ".join(capsys.readouterr().out.split())
  for command in ("demo", "niah"):
    assert "--max-new-tokens MAX_NEW_TOKENS most tokens of each greedy answer" in helps[command]
    assert "(default: 12)" in helps[command]
  for command in ("demo", "trace", "niah", "anchors"):
    for text in ("queries per block (power of two) (default: 64)", "(default: 16)", "(default: center)",
                 "(default: float32)", "(default: auto)"):
      assert text in helps[command], (command, text)
    assert "(default: None)" not in helps[command] and "(default: False)" not in helps[command]
  assert "(the embedded default, offline), a .gguf file, or a Hugging Face checkpoint directory (config.json + " \
         "*.safetensors) (default: gemma3-270m)" in helps["trace"]
  assert "(default: 600,3000)" in helps["niah"] and "(default: 4)" in helps["niah"]
  assert "(default: 20)" in helps["anchors"] and "FOLDER" in helps["clean"]


@pytest.mark.parametrize("command", ["trace --file {f}", "anchors --file {f}"])
def test_a_text_longer_than_the_context_is_refused_before_loading(tmp_path, capsys, monkeypatch, command):
  """The tokenizer alone counts the tokens (the weights would take ~25 s more to load)."""
  long = tmp_path / "long.txt"
  long.write_text("Then we check it again. " * 7000)  # about 42,000 tokens; the 270M's context is 32,768
  monkeypatch.setattr(cli, "load", lambda args: pytest.fail("the model must not load"))
  rc = cli.main(command.format(f=long).split() + ["--out", str(tmp_path / "r")])
  err = capsys.readouterr().err
  assert rc == 2 and f"--file {long} has" in err and "longer than the model's context of 32768" in err, err
  assert not (tmp_path / "r").exists()


def test_clean_command_removes_only_unchanged_reports(tmp_path, capsys):
  from stream_jax.report import write_report  # pylint: disable=import-outside-toplevel
  out = write_report(tmp_path / "r", report={}, summary={})
  (out / "index.html").write_text("edited")
  assert cli.main(["clean", str(out)]) == 1
  assert "were changed" in capsys.readouterr().err and (out / "index.html").read_text() == "edited"
  out = write_report(tmp_path / "s", report={}, summary={})
  assert cli.main(["clean", str(out)]) == 0 and not out.exists()


def test_a_mount_point_out_is_announced_before_loading(files, capsys, monkeypatch):
  import os  # pylint: disable=import-outside-toplevel
  vol = files / "vol"
  vol.mkdir()
  real = os.path.ismount
  monkeypatch.setattr(os.path, "ismount", lambda p: pathlib.Path(p) == vol or real(p))

  def stop(args):
    raise cli.CliError("stopped before loading")
  monkeypatch.setattr(cli, "load", stop)
  assert cli.main(["trace", "--text", "hello there", "--out", str(vol)]) == 2
  out = capsys.readouterr().out
  assert f"note: --out {vol} cannot be renamed" in out and "in place" in out


def test_experiments_name_parameters_and_the_cli_says_flags():
  from stream_jax import experiments as runs  # pylint: disable=import-outside-toplevel
  with pytest.raises(runs.InputError) as e:
    runs.niah_task("single_1", [10])
  assert str(e.value).startswith("lengths entries must be >= 128") and e.value.params == ("lengths",)
  assert cli.flag_wording(str(e.value), e.value.params).startswith("--lengths entries must be >= 128")
  import stream_jax as sj  # pylint: disable=import-outside-toplevel
  assert "try top_k 1" in runs.pruning_notice(1.0, 600, sj.StreamConfig())
