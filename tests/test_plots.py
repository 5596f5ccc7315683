"""Plots: every figure is written as a non-empty PNG from small hand-made inputs."""

import jax.numpy as jnp
import numpy as np
import pytest

from stream_jax import plots
from stream_jax.mask import window_mask
from stream_jax.trace import LayerTrace, Trace
from stream_jax.analysis import routes as R


def _png(path):
  with open(path, "rb") as f:
    head = f.read(8)
  assert head == b"\x89PNG\r\n\x1a\n"
  return True


def test_block_matrix_scatters_indices():
  m = window_mask(2, 16, 16, block_q=4, block_k=4, window=5)
  mat = plots.block_matrix(m)
  want = np.zeros((4, 4))
  for j in range(4):
    want[j, max(0, (4 * j - 4) // 4):j + 1] = 1
  np.testing.assert_array_equal(mat, want)
  mass = np.where(np.asarray(m.indices) >= 0, 2.0, 0.0)
  np.testing.assert_array_equal(plots.block_matrix(m, mass, head=1), 2 * want)


def test_all_plots_write_pngs(tmp_path):
  m = window_mask(2, 64, 64, block_q=8, block_k=8)
  mass = np.random.default_rng(0).random(m.indices.shape) * (np.asarray(m.indices) >= 0)
  out = [plots.plot_block_mask(m, str(tmp_path / "mask.png"), mass=mass),
         plots.plot_block_mask(m, str(tmp_path / "mask0.png"), head=0),
         plots.plot_block_mask_heads(m, str(tmp_path / "heads.png"), mass=mass)]
  labels = ["problem_setup", "active_computation", "self_checking", "unknown"] * 3
  out.append(plots.plot_vertical_scores(np.linspace(0, 1, 12), labels, str(tmp_path / "v.png"),
                                        texts=[f"s{i}" for i in range(12)]))
  out.append(plots.plot_kurtosis_grid(np.random.default_rng(1).random((6, 4)), str(tmp_path / "k.png"),
                                      heads=np.array([[1, 2], [3, 0]])))
  lt = LayerTrace(m, jnp.asarray(mass, jnp.float32), 0, "global", "stream")
  r = R.route(Trace((lt, lt)), np.array([[10, 12]]), threshold=1e-4)
  out.append(plots.plot_route(r, str(tmp_path / "route.png"), needle_blocks=[1]))
  out.append(plots.plot_success_failure(np.random.default_rng(2).random((3, 4)),
                                        np.random.default_rng(3).random((3, 4)), str(tmp_path / "sf.png")))
  out.append(plots.plot_success_failure([0.5, 0.6], [0.1, 0.0], str(tmp_path / "sf1.png")))
  rows = [dict(length=1024, kept_stream=0.6, kl_mean=1e-3, kl_last=2e-3, top1_mean=0.98),
          dict(length=4096, kept_stream=0.2, kl_mean=1e-2, kl_last=5e-3, top1_mean=0.93)]
  out.append(plots.plot_faithfulness(rows, str(tmp_path / "f.png")))
  for p in out:
    assert (tmp_path / p.split("/")[-1]).stat().st_size > 1000 and _png(p)


def test_block_matrix_rejects_batched_masks():
  m = window_mask(2, 16, 16, block_q=4, block_k=4)
  batched = type(m)(m.indices[None], m.counts[None], 4, 4, 16, 16)
  with pytest.raises(ValueError, match="one sample"):
    plots.block_matrix(batched)
