"""The estimator's coverage budget against true (exact) coverage: StreamConfig.dropped_scale, its per-layer
table (layer_scales) and their calibration (stream_jax.experiments.calibration)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stream_jax as sj
from stream_jax.experiments import calibration
from stream_jax.models import forward, init_params
from tiny_models import tiny_config, tokens

# Global layers 1 and 3 (4 layers keep the compiles short), each made sharper by its own amount so the two
# need different scales (measured: uniform scales 1, 2, 4, 8 hold 0.762 0.782 0.794 0.802 in layer 1 and
# 0.740 0.784 0.819 0.844 in layer 3 at TINY_CFG's budget).
TINY = tiny_config(layers=4, layer_kinds=("local", "global", "local", "global"))


def _sharpen(params, adds):
  """Each named layer's queries scaled up (its query-norm scale + add): sharper attention."""
  params = jax.tree_util.tree_map(lambda x: x, params)
  for layer, add in adds.items():
    norm = params["params"][f"layer_{layer}"]["attn"]["query_norm"]
    norm["scale"] = norm["scale"] + add
  return params


TINY_MODEL = types.SimpleNamespace(config=TINY, params=_sharpen(init_params(TINY, seed=1), {1: 1.0, 3: 3.0}))
TINY_IDS = np.asarray(tokens(1, 512, seed=4))[0]
TINY_CFG = sj.StreamConfig(block_q=16, block_k=16, top_k=12, coverage=0.798)


def _qk(t=2048, n=4, kv=2, h=32, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(t, n, h))
  k = rng.normal(size=(t, kv, h)) * 1.5
  k[rng.choice(t, size=t // 40, replace=False)] *= 3.0  # heavy-tailed: a few keys take much attention
  return jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)


def test_a_larger_dropped_scale_keeps_at_least_as_much():
  q, k = _qk()
  base = sj.StreamConfig(block_q=32, block_k=32, top_k=16, coverage=0.8)
  counts = [np.asarray(sj.estimate_mask(q, k, base.replace(dropped_scale=s)).counts) for s in (1.0, 2.0, 8.0)]
  assert np.all(counts[1] >= counts[0]) and np.all(counts[2] >= counts[1])
  assert counts[2].sum() > counts[0].sum()  # and it does keep more somewhere
  # fixed-k configs have no budget: the scale changes nothing
  fixed = sj.StreamConfig(block_q=32, block_k=32, top_k=4, score="mass")
  a = sj.estimate_mask(q, k, fixed).indices
  b = sj.estimate_mask(q, k, fixed.replace(dropped_scale=8.0)).indices
  assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), True, "2", 1e5])
def test_dropped_scale_validation(value):
  with pytest.raises(ValueError, match="dropped_scale"):
    sj.StreamConfig(coverage=0.9, dropped_scale=value)


def test_layer_scales_validation_and_resolution():
  c = sj.StreamConfig(coverage=0.9, dropped_scale=2.0, layer_scales={11: 8, 5: 3.5})
  assert c.layer_scales == ((5, 3.5), (11, 8.0))
  assert c.for_layer(5) == sj.StreamConfig(coverage=0.9, dropped_scale=3.5)
  assert c.for_layer(4) == sj.StreamConfig(coverage=0.9, dropped_scale=2.0)
  assert sj.StreamConfig(layer_scales=[[5, 3.5], [11, 8]]).layer_scales == c.layer_scales  # JSON round trip
  for bad, word in (({5: 0}, "scales"), ({-1: 2.0}, "layer ids"), ([(5, 2.0), (5, 3.0)], "twice"),
                    (3, "pairs"), ([(1, 2, 3)], "pairs"), ({True: 2.0}, "layer ids")):
    with pytest.raises(ValueError, match="layer_scales"):
      sj.StreamConfig(coverage=0.9, layer_scales=bad)
  q, k = _qk(t=256)
  with pytest.raises(ValueError, match=r"for_layer"):
    sj.estimate_mask(q, k, c)
  with pytest.raises(ValueError, match=r"layer\(s\) \[2\].*pruned: \[1, 3\]"):
    forward(TINY_MODEL, TINY_MODEL.params, TINY_IDS[:64], attention=c.replace(layer_scales={2: 2.0}))


def test_each_layer_runs_its_own_scale():
  """A per-layer table gives each layer exactly the mask a uniform config with its scale gives."""
  run = lambda cfg: forward(TINY_MODEL, TINY_MODEL.params, TINY_IDS, attention=cfg, output="exact",
                            last_only=True).trace
  mixed = run(TINY_CFG.replace(layer_scales={3: 16.0}))
  one, sixteen = run(TINY_CFG), run(TINY_CFG.replace(dropped_scale=16.0))
  for layer, ref in ((1, one), (3, sixteen)):
    np.testing.assert_array_equal(np.asarray(mixed[layer].mask.indices), np.asarray(ref[layer].mask.indices))
  assert not np.array_equal(np.asarray(one[3].mask.counts), np.asarray(sixteen[3].mask.counts))


def test_per_layer_calibration_equals_a_sweep_of_uniform_scales():
  """The bisection's choice per layer is the smallest grid scale whose uniform exact pass reaches the
  target in that layer (brute force: every scale of the grid, all layers at once), with those passes'
  coverage; a grid that stops too early leaves a layer unreached at its largest scale."""
  grid = (1.0, 2.0, 4.0, 8.0)
  # Each uniform scale as a table naming it for both pruned layers: the same plans as a pass that tries it
  # in both (so those passes reuse the sweep's compiled forward: 5 compiles, not 9), and per layer the
  # uniform config's masks (test_each_layer_runs_its_own_scale). Uniform dropped_scale is checked below.
  sweep = {s: calibration.budget_coverage(TINY_MODEL, TINY_IDS, TINY_CFG.replace(layer_scales={1: s, 3: s}))
           for s in grid}
  layers = sweep[1.0].layers
  assert sweep[1.0] == calibration.budget_coverage(TINY_MODEL, TINY_IDS, TINY_CFG)  # no table: dropped_scale 1
  assert layers == (1, 3)
  for scales in (grid, grid[:3]):
    cal = calibration.calibrate_budget(TINY_MODEL, TINY_IDS, TINY_CFG, scales=scales, progress=False)
    print(calibration.summary(cal))
    assert len(cal.passes) <= int(np.ceil(np.log2(len(scales) + 1))) and cal.coverage.layers == layers
    want = {l: next((s for s in scales if sweep[s].of(l) >= TINY_CFG.coverage), None) for l in layers}
    for l in layers:
      assert dict(cal.config.layer_scales)[l] == (want[l] or scales[-1])
      assert cal.coverage.of(l) == pytest.approx(sweep[want[l] or scales[-1]].of(l), abs=1e-6)
    assert cal.unreached == tuple(l for l in layers if want[l] is None)
    if scales == grid:  # here the layers need different scales, both above 1
      assert None not in want.values() and len(set(want.values())) == 2 and min(want.values()) > 1, want
    else:  # and layer 1 needs more than the short grid has
      assert want[1] is None and want[3] is not None and not cal.reached


def test_calibrate_budget_refuses_what_it_cannot_calibrate():
  with pytest.raises(ValueError, match="coverage"):
    calibration.calibrate_budget(None, np.arange(10), sj.StreamConfig())
  with pytest.raises(ValueError, match="select"):
    calibration.calibrate_budget(None, np.arange(10), sj.StreamConfig.ideal())


@pytest.mark.slow
def test_calibrated_budget_reaches_the_target_on_held_out_real_text():
  """The real 270M at 4,096 tokens, 16-token blocks, coverage 0.9 (cap 64): the search is several rounds
  deep, and the uncalibrated budget stops early (0.86-0.88 true coverage, measured). Calibrated per layer
  on one half of the Python docs' topics, the true coverage on the other half reaches the target within
  0.02 in every global layer (the issue's criterion), with a kept fraction within 1.2x the ideal
  selector's at the same mean true coverage."""
  from pydoc_data import topics
  from stream_jax.models import load_model
  model = load_model("gemma3-270m", dtype=jnp.float32, progress=False)
  keys = sorted(topics.topics)
  half = len(keys) // 2
  calib = model.encode("\n\n".join(topics.topics[k] for k in keys[:half])[:60_000])[:4096]
  held = model.encode("\n\n".join(topics.topics[k] for k in keys[half:])[:60_000])[:4096]
  assert len(calib) == len(held) == 4096
  cfg = sj.StreamConfig(block_q=16, block_k=16, top_k=64, coverage=0.9)
  before = calibration.budget_coverage(model, held, cfg)
  cal = calibration.calibrate_budget(model, calib, cfg, progress=False)
  print(calibration.summary(cal))
  assert cal.reached and max(s for _, s in cal.config.layer_scales) > 1.0
  assert min(before.coverage) < 0.9 - 0.02  # uncalibrated, the budget undershoots here
  got = calibration.budget_coverage(model, held, cal.config)
  print("held out: uncalibrated", np.round(before.coverage, 3), "kept", round(before.kept_mean, 3),
        "calibrated", np.round(got.coverage, 3), "kept", round(got.kept_mean, 3))
  assert min(got.coverage) >= 0.9 - 0.02, got
  # the ideal selector at the same mean true coverage: linear between its 0.90 and 0.92 targets (it holds
  # 0.886 / 0.899 there, measured: its cap binds in late query blocks)
  ideal = [calibration.budget_coverage(model, held, sj.StreamConfig.ideal(block_q=16, block_k=16, top_k=64,
                                                                          coverage=c)) for c in (0.9, 0.92)]
  (c0, k0), (c1, k1) = [(float(np.mean(b.coverage)), b.kept_mean) for b in ideal]
  ours = float(np.mean(got.coverage))
  at_same = k0 + (k1 - k0) * (ours - c0) / (c1 - c0)
  print(f"ideal: {c0:.3f} -> {k0:.3f}, {c1:.3f} -> {k1:.3f}; at {ours:.3f}: {at_same:.3f}; "
        f"calibrated / ideal = {got.kept_mean / at_same:.3f}")
  # the goal is 1.15x; measured 1.16x here (16-token blocks at 4k: layer 5 keeps 1.3x): see RESULTS
  assert got.kept_mean <= 1.2 * at_same, (got, at_same)


# ------------------------------------------------------------------ the text pipeline, its report and the CLI


def _cot_model():
  from test_experiments import tiny_model  # pylint: disable=import-outside-toplevel
  return tiny_model()


TEXT = " ".join(f"Step {i}: the value {i * 7 % 13} goes to slot {i % 5}." for i in range(60))
HELD = " ".join(f"Line {i}: slot {i % 5} now holds {i * 3 % 11}." for i in range(60))


def test_calibrate_text_and_its_report(tmp_path):
  from stream_jax.experiments import Settings, reports  # pylint: disable=import-outside-toplevel
  model = _cot_model()
  st = Settings(sj.StreamConfig(block_q=16, block_k=16, top_k=2, coverage=0.8), backend="xla")
  res = calibration.calibrate_text(model, TEXT, st, held_out=HELD, length=300, scales=(1.0, 2.0, 4.0))
  assert res.tokens == 300 and res.held_out_tokens == 300
  ids = np.asarray(model.encode(TEXT))[:300]
  again = calibration.calibrate_budget(model, ids, st.config, scales=(1.0, 2.0, 4.0), progress=False)
  assert again == res.calibration  # the text pipeline is calibrate_budget on the text's first 300 tokens
  held = np.asarray(model.encode(HELD))[:300]
  assert res.held_out == (calibration.budget_coverage(model, held, st.config),
                          calibration.budget_coverage(model, held, res.calibration.config))
  assert res.layer_scales_flag() == ",".join(f"{l}:{s:g}" for l, s in res.calibration.config.layer_scales)
  out = reports.write_calibration(res, model, tmp_path / "cal", text=res.format())
  saved = __import__("json").loads((out / "report.json").read_text())
  assert saved["layer_scales"] == [list(x) for x in res.calibration.config.layer_scales]
  assert saved["held_out"]["calibrated"] == list(res.held_out[1].coverage)
  assert len(saved["passes"]) == len(res.calibration.passes)
  assert (out / "calibration.png").stat().st_size > 0
  page = (out / "index.html").read_text()
  assert res.layer_scales_flag() in page and "held-out text" in page


@pytest.mark.parametrize("config,kw,match", [
    (sj.StreamConfig(), {}, "coverage"),
    (sj.StreamConfig(coverage=0.9), dict(prune_local=True), "prune_local"),
    (sj.StreamConfig(block_q=16, block_k=16, top_k=64, coverage=0.9), {}, "top_k"),  # 300 tokens never prune
])
def test_calibrate_text_refuses_what_it_cannot_calibrate(config, kw, match):
  from stream_jax.experiments import InputError, Settings  # pylint: disable=import-outside-toplevel
  with pytest.raises(InputError) as e:
    calibration.calibrate_text(_cot_model(), TEXT, Settings(config, **kw), length=300)
  assert match in str(e.value) or match in e.value.params
  with pytest.raises(InputError, match="empty"):
    calibration.calibrate_text(_cot_model(), "  ", Settings(sj.StreamConfig(coverage=0.9)))


def test_cli_calibrate_prints_the_flags_to_trace_with(tmp_path, capsys, monkeypatch):
  from stream_jax import cli  # pylint: disable=import-outside-toplevel
  (tmp_path / "t.txt").write_text(TEXT)
  monkeypatch.setattr(cli, "load", lambda args: _cot_model())
  argv = ["calibrate", "--file", str(tmp_path / "t.txt"), "--length", "300", "--coverage", "0.8", "--top-k", "2",
          "--block-q", "16", "--block-k", "16", "--scales", "1,2,4", "--backend", "xla", "--out", str(tmp_path / "r")]
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  line = next(l for l in out.splitlines() if l.startswith("trace with:"))
  scales = line.split("--layer-scales ")[1].strip()
  saved = __import__("json").loads((tmp_path / "r" / "report.json").read_text())
  assert scales == ",".join(f"{l}:{s:g}" for l, s in saved["layer_scales"])
  assert cli.build_parser().parse_args(["trace", "--text", "x", "--layer-scales", scales]).layer_scales == \
      tuple(tuple(x) for x in saved["layer_scales"])
  # the table's budget calibrates the same way, and the flags name it
  argv_table = argv[:-1] + [str(tmp_path / "rt"), "--select", "table", "--query-stride", "4"]
  assert cli.main(argv_table) == 0
  line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("trace with:"))
  assert line.startswith("trace with: --select table --query-stride 4 --coverage 0.8"), line
  parsed = cli.build_parser().parse_args(["trace", "--text", "x"] + line.split("trace with: ")[1].split())
  assert (parsed.select, parsed.query_stride) == ("table", 4)
  # refused before the model loads: no --coverage, a layer the model does not prune, bad pairs
  monkeypatch.setattr(cli, "load", lambda args: pytest.fail("the model must not load"))
  for extra, msg in ((["--coverage", "0.9", "--layer-scales", "3:2"], "--layer-scales names layer(s) 3"),
                     ([], "pass --coverage"),
                     (["--coverage", "0.9", "--layer-scales", "5:-1"], "--layer-scales: scales must be"),
                     (["--coverage", "0.9", "--select", "table", "--query-stride", "128"],
                      "--query-stride must be a power of two in [1, block-q=64]"),
                     (["--coverage", "0.9", "--select", "ideal"], "select 'search' or 'table'")):
    base = ["calibrate", "--file", str(tmp_path / "t.txt"), "--out", str(tmp_path / "r2")]
    assert cli.main(base + extra) == 2
    assert msg in capsys.readouterr().err
