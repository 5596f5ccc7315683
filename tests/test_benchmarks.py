"""The benchmark scripts' CPU modes run, so they cannot rot."""

import json
import sys
import pathlib

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import scaling  # noqa: E402


@pytest.mark.slow  # 45 s of compiles on 2 cores; `make bench-small` runs the same mode
def test_scaling_small_mode(tmp_path, capsys):
  rows = scaling.main(["--small", "--repeats", "1", "--out", str(tmp_path)])
  out = capsys.readouterr().out
  assert "| variant | time slope" in out and "dense capture (bf16)" in out
  ok = [r for r in rows if "error" not in r]
  assert {r["variant"] for r in ok} == {"plain", "capture", "stream_xla", "exact_xla"}
  stream = {r["T"]: r for r in ok if r["variant"] == "stream_xla"}
  exact = {r["T"]: r for r in ok if r["variant"] == "exact_xla"}
  assert all(0 < exact[t]["coverage"] <= 1.0 for t in exact)
  assert exact[1024]["kept_fraction"] == stream[1024]["kept_fraction"]
  capture = {r["T"]: r for r in ok if r["variant"] == "capture"}
  assert stream[1024]["kept_fraction"] < stream[256]["kept_fraction"] <= 1.0
  # the trace grows linearly, the captured probabilities quadratically
  assert stream[1024]["trace_bytes"] < 4.5 * stream[256]["trace_bytes"] * 2
  assert capture[1024]["trace_bytes"] == 16 * capture[256]["trace_bytes"]
  assert (tmp_path / "scaling_gemma3-270m-6layers.png").stat().st_size > 0
  saved = json.loads((tmp_path / "scaling_gemma3-270m-6layers.json").read_text())
  assert len(saved["rows"]) == len(rows)


def test_dense_capture_memory_model():
  from stream_jax.models import get_config
  cfg = get_config("gemma3-4b")
  t = 131_072
  assert scaling.dense_capture_bytes(cfg, t) == cfg.num_layers * cfg.num_heads * t * t * 2


# ---------------------------------------------------------------------------------------------------------
# faithfulness.py and its corpora
# ---------------------------------------------------------------------------------------------------------

import numpy as np  # noqa: E402

import corpora  # noqa: E402
import faithfulness  # noqa: E402


def test_pruned_start_matches_the_definition():
  from stream_jax.mask import diagonal_blocks
  # 270M defaults: query block j is pruned once diag - 2 + 1 - 1 > 16, i.e. its last position >= 18 * 64
  assert faithfulness.pruned_start(4096, block_q=64, block_k=64, sink_blocks=1, window_blocks=2,
                                   top_k=16) == 1216
  assert faithfulness.pruned_start(4096, block_q=64, block_k=64, sink_blocks=1, window_blocks=2,
                                   top_k=64) == 4096  # nothing pruned at 4k
  for t, bq, bk, sink, win, k in [(1000, 16, 32, 1, 2, 3), (333, 32, 16, 0, 1, 5), (100, 64, 64, 1, 2, 1)]:
    diag = np.asarray(diagonal_blocks(t, t, bq, bk))
    pruned = np.nonzero(diag - win + 1 - sink > k)[0]
    want = int(pruned[0]) * bq if len(pruned) else t
    assert faithfulness.pruned_start(t, block_q=bq, block_k=bk, sink_blocks=sink, window_blocks=win,
                                     top_k=k) == want


def test_clean_markup_keeps_prose_only():
  doc = "\n".join([
      "# Fancy Lib", "", "![badge](https://img.shields.io/x.svg) [![ci](https://ci/x)](https://ci)", "",
      "Fancy Lib turns [slow loops](https://example.org/loops) into fast ones, and it does so without",
      "asking you to rewrite anything.", "", "```python", "import fancy", "fancy.go(x=1)", "```", "",
      "| col | col |", "|-----|-----|", "| a | b |", "", "Usage::", "", "    fancy.run(3)", "    x = 4", "",
      ">>> fancy.add(1, 2)", "3", "", "<p align=\"center\">Centred words that are long enough to be kept.</p>",
      "", "Permission is hereby granted, free of charge, to any person obtaining a copy of this software.",
      "", "Install it with a package manager of your choice, then read the tutorial carefully.",
  ])
  text = corpora.clean_markup(doc)
  assert "Fancy Lib turns slow loops into fast ones, and it does so without asking you" in text
  assert "Centred words that are long enough to be kept." in text
  assert "Install it with a package manager" in text
  for gone in ("import fancy", "fancy.go", "fancy.run", "fancy.add", "http", "|", "badge", "Permission",
               "```", "<p"):
    assert gone not in text, gone
  assert all(p.strip() == p and "\n" not in p for p in text.split("\n\n"))  # one line per paragraph


def test_readme_corpus_is_offline_prose_not_ours():
  docs = corpora.readme_documents()
  names = [n.lower() for n, _ in docs]
  assert len(docs) >= 20 and names == sorted(names)
  assert not any(n.startswith(("stream", "gemma3")) for n in names)
  assert all(300 <= len(t) <= corpora.README_CAP for _, t in docs)
  assert sum(len(t) for _, t in docs) > 4 * 33_000  # >= 33k tokens at ~4 characters a token
  assert "\n\n".join(t for _, t in docs) == corpora.source_text("readmes")


def _tiny_model():
  import jax.numpy as jnp
  from stream_jax.models import GemmaConfig, LoadedModel, init_params
  cfg = GemmaConfig(family="gemma3", vocab_size=512, num_layers=2, embed_dim=64, hidden_dim=128, num_heads=2,
                    num_kv_heads=1, head_dim=32, query_pre_attn_scalar=32.0, layer_kinds=("local", "global"),
                    sliding_window=64, name="tiny")
  return LoadedModel(cfg, init_params(cfg, jnp.float32, seed=1), None, jnp.float32, "tiny")


def test_faithfulness_main_tiny_model(tmp_path, capsys):
  model = _tiny_model()
  tok_dir = tmp_path / "tokens"
  tok_dir.mkdir()
  ids = np.concatenate([[2], np.random.default_rng(0).integers(3, 512, 299)]).astype(np.int32)
  np.save(tok_dir / "readmes.npy", ids)
  # one sparse config and one that must equal dense (each config is a compile of its own: ~5 s of CPU)
  configs = ["k2", "exact2"]
  out = tmp_path / "faith.jsonl"
  argv = ["--sources", "readmes", "--tokens", str(tok_dir), "--lengths", "256", "--block", "16",
          "--regime-k", "2", "--configs", ",".join(configs + ["oracle2"]), "--oracle-max-len", "128",
          "--out", str(out), "--chunk", "256"]
  rows = faithfulness.main(argv, model=model)
  printed = capsys.readouterr().out
  assert "| source | T | config |" in printed and "skipping oracle2 at T=256" in printed
  assert [r["config"] for r in rows] == configs and len(out.read_text().splitlines()) == len(rows)
  by = {r["config"]: r for r in rows}
  k2 = by["k2"]
  # 16-token blocks, sink 1, window 2: pruned from the block whose last position is >= 5 * 16
  assert k2["pruned_start"] == 80 and k2["n_pruned"] == 176 and k2["own_start"] == 80
  assert k2["kept"] < 1.0 and k2["kept_pruned"] < k2["kept"]
  assert k2["kl_mean"] > 1e-6 and 0.0 <= k2["top1"] <= 1.0 and k2["kl_p99"] >= k2["kl_mean"]
  ex = by["exact2"]  # dense logits, the k2 mask
  assert abs(ex["kl_mean"]) < 1e-5 and ex["top1"] == 1.0 and ex["kept"] < 1.0
  assert 0 < ex["coverage_pruned"] <= 1.0 and ex["coverage_min_head"] <= ex["coverage_pruned"]
  layers = ex["coverage_layers"]  # one global layer: its mean is the whole mean
  assert len(layers) == 1 and abs(layers[0] - ex["coverage_pruned"]) < 1e-6
  assert ex["coverage_layer_min"] == min(layers)
  rows_md = faithfulness.main(["--markdown", "--out", str(out), "--plot", str(tmp_path / "f.png")])
  printed = capsys.readouterr().out
  assert len(rows_md) == len(rows) and printed.count("| readmes | 256 |") == len(configs)
  assert (tmp_path / "f.png").stat().st_size > 0


def test_faithfulness_config_names():
  from stream_jax import StreamConfig
  base = StreamConfig()
  assert faithfulness.make_variant("k32", base).config.top_k == 32
  assert faithfulness.make_variant("oracle16", base).config.representative == "oracle"
  with pytest.raises(ValueError, match="unknown config"):
    faithfulness.make_variant("k", base)
  v = faithfulness.make_variant("adaptive95k64", base)
  assert (v.config.coverage, v.config.top_k, v.config.dropped_scale) == (0.95, 64, 1.0)
  v = faithfulness.make_variant("adaptive90L5x4L11x12.5-exact", base, 256)
  assert (v.config.layer_scales, v.config.dropped_scale, v.output) == (((5, 4.0), (11, 12.5)), 1.0, "exact")
  v = faithfulness.make_variant("adaptive90s2.5-exact", base, 256)
  assert (v.config.coverage, v.config.top_k, v.config.dropped_scale, v.output) == (0.9, 256, 2.5, "exact")
  v = faithfulness.make_variant("idealsparse95", base, 64)
  assert (v.config.select, v.config.coverage, v.config.top_k, v.output) == ("ideal", 0.95, 64, "sparse")
  v = faithfulness.make_variant("adaptive90q4L5x4-exact", base, 256)
  assert (v.config.query_stride, v.config.layer_scales, v.output) == (4, ((5, 4.0),), "exact")
  assert faithfulness.make_variant("adaptive95", base).config.query_stride == 1
  with pytest.raises(ValueError, match="query stride"):
    faithfulness.make_variant("k16q4", base)
  with pytest.raises(ValueError, match="query_stride must be a power of two"):
    faithfulness.make_variant("adaptive95q3", base)
  v = faithfulness.make_variant("adaptive95g4-exact", base, 128)  # 4 query blocks share one search
  assert (v.config.block_q, v.config.block_k, v.config.query_stride, v.output) == (4 * base.block_q,
                                                                                  base.block_k, 4, "exact")
  assert faithfulness.make_variant("adaptive95g2q4", base).config.query_stride == 4
  with pytest.raises(ValueError, match="shared search"):
    faithfulness.make_variant("k16g4", base)
  v = faithfulness.make_variant("adaptive95k32p4-exact", base)  # upper rounds shared by 4 query blocks
  assert (v.config.search_share, v.config.top_k, v.config.block_q, v.config.query_stride) == (4, 32, 64, 1)
  with pytest.raises(ValueError, match="shared upper rounds"):
    faithfulness.make_variant("k16p4", base)


# ---------------------------------------------------------------------------------------------------------
# mosaic.py (Pallas backends table; the GPU rows run on the lent GPU only)
# ---------------------------------------------------------------------------------------------------------

import pytest  # noqa: E402

import mosaic  # noqa: E402


def test_mosaic_arguments_and_dry_run(tmp_path, capsys):
  args = mosaic.parse_args(["--seq", "8192,32768", "--head-dims", "128", "--kv-heads", "8,1"])
  assert mosaic.shapes(args) == [(1, 8, 8, 128, 8192), (1, 8, 8, 128, 32768), (1, 8, 1, 128, 8192),
                                 (1, 8, 1, 128, 32768)]
  assert args.kernels == list(mosaic.KERNELS)
  for bad in (["--kv-heads", "3"], ["--seq", "1000"], ["--kernels", "flash3"]):
    with pytest.raises(SystemExit):
      mosaic.parse_args(bad)
  res = mosaic.main(["--dry-run", "--dry-skip-kernel", "--out", str(tmp_path)])
  out = capsys.readouterr().out
  assert "attention_mgpu" in out and "| H | K | T | dtype | kernel | ms | TFLOP/s |" in out
  assert "n/a: dry run (no GPU)" in out
  assert json.loads((tmp_path / "mosaic.json").read_text())["rows"] == json.loads(json.dumps(res["rows"]))
  rows = [dict(kernel=k, B=1, N=8, K=8, H=128, T=8192, ms=ms, config="", diff=None, na=None, tflops=1.0)
          for k, ms in (("sparse_full", 2.2), ("mosaic_flash", 2.0), ("cudnn", 1.0))]
  assert "sparse_full/mosaic 1.10x" in mosaic.headline(rows)
  assert "| 1.10 | 2.20 |" in mosaic.markdown(rows)
  assert mosaic.parse_args(["--dtype", "float16"]).dtype == "float16"


def test_mgpu_forward_check_says_it_needs_a_gpu():
  import mgpu_forward_check  # noqa: PLC0415
  with pytest.raises(SystemExit, match="needs a Hopper GPU"):
    mgpu_forward_check.main(["--layers", "2", "--length", "256"])


def test_trace_modes_name_their_configs():
  """Every mode of benchmarks/trace_modes.py makes its forward arguments; the q / p suffixes set
  query_stride / search_share on faithful()."""
  import trace_modes  # noqa: PLC0415  pylint: disable=import-outside-toplevel
  for mode in trace_modes.MODES:
    assert "last_only" in trace_modes.mode_kwargs(mode), mode
  assert trace_modes.mode_kwargs("faithful_p4")["attention"].search_share == 4
  assert trace_modes.mode_kwargs("faithful_p1")["attention"].search_share == 1
  assert trace_modes.mode_kwargs("faithful")["attention"].search_share == "auto"
  assert trace_modes.mode_kwargs("faithful_q2")["attention"].query_stride == 2
  assert trace_modes.mode_kwargs("table_q8_exact")["output"] == "exact"
