"""The estimator's coverage budget against true (exact) coverage: StreamConfig.dropped_scale and its
calibration (stream_jax.experiments.calibration)."""

import jax.numpy as jnp
import numpy as np
import pytest

import stream_jax as sj
from stream_jax.experiments import calibration


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


def test_calibrate_budget_refuses_what_it_cannot_calibrate():
  with pytest.raises(ValueError, match="coverage"):
    calibration.calibrate_budget(None, np.arange(10), sj.StreamConfig())
  with pytest.raises(ValueError, match="select"):
    calibration.calibrate_budget(None, np.arange(10), sj.StreamConfig.ideal())


@pytest.mark.slow
def test_calibrated_budget_reaches_the_target_on_held_out_real_text():
  """The real 270M at 4,096 tokens, 16-token blocks, coverage 0.9 (cap 64): the search is several rounds
  deep, and the uncalibrated budget stops early (0.86-0.88 true coverage, measured). Calibrated on one half
  of the Python docs' topics, the true coverage on the other half reaches the target within 0.02 in every
  global layer (the issue's criterion), with a kept fraction within 1.2x the ideal selector's."""
  from pydoc_data import topics
  from stream_jax.models import forward, load_model
  model = load_model("gemma3-270m", dtype=jnp.float32, progress=False)
  keys = sorted(topics.topics)
  half = len(keys) // 2
  calib = model.encode("\n\n".join(topics.topics[k] for k in keys[:half])[:60_000])[:4096]
  held = model.encode("\n\n".join(topics.topics[k] for k in keys[half:])[:60_000])[:4096]
  assert len(calib) == len(held) == 4096
  cfg = sj.StreamConfig(block_q=16, block_k=16, top_k=64, coverage=0.9)
  cal = calibration.calibrate_budget(model, calib, cfg, scales=(1.0, 2.0, 3.0, 4.0), progress=False)
  print(calibration.summary(cal))
  assert cal.reached and cal.config.dropped_scale > 1.0  # uncalibrated, the budget undershoots here
  cov, kept = calibration.budget_coverage(model, held, cal.config)
  print("held out: calibrated", np.round(cov, 3), "kept", round(kept, 3))
  assert min(cov) >= 0.9 - 0.02, cov
  ideal = forward(model, model.params, held, attention=sj.StreamConfig.ideal(block_q=16, block_k=16, top_k=64,
                                                                             coverage=0.9),
                  output="exact", last_only=True).trace
  assert kept <= 1.2 * float(ideal.kept_fraction("global")), (kept, float(ideal.kept_fraction("global")))
