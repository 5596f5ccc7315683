"""Plots: every function returns a matplotlib Figure (no backend forced) that saves as a non-empty PNG."""

import os
import subprocess
import sys

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


def _figures():
  m = window_mask(2, 64, 64, block_q=8, block_k=8)
  mass = np.random.default_rng(0).random(m.indices.shape) * (np.asarray(m.indices) >= 0)
  labels = ["problem_setup", "active_computation", "self_checking", "unknown"] * 3
  lt = LayerTrace(m, jnp.asarray(mass, jnp.float32), 0, "global", "stream")
  r = R.route(Trace((lt, lt)), np.array([[10, 12]]), threshold=1e-4)
  rows = [dict(length=1024, kept_stream=0.6, kl_mean=1e-3, kl_last=2e-3, top1_mean=0.98),
          dict(length=4096, kept_stream=0.2, kl_mean=1e-2, kl_last=5e-3, top1_mean=0.93)]
  cov = LayerTrace(m, jnp.asarray(mass, jnp.float32), 1, "global", "exact",
                   coverage=jnp.full(m.counts.shape, 0.9, jnp.float32))
  return {
      "mask": plots.plot_block_mask(m, mass=mass), "mask0": plots.plot_block_mask(m, head=0),
      "heads": plots.plot_block_mask_heads(m, mass=mass),
      "v": plots.plot_vertical_scores(np.linspace(0, 1, 12), labels, texts=[f"s{i}" for i in range(12)]),
      "k": plots.plot_kurtosis_grid(np.random.default_rng(1).random((6, 4)),
                                    heads=np.array([[1, 2], [3, 0]])),
      "route": plots.plot_route(r, needle_blocks=[1]),
      "sf": plots.plot_success_failure(np.random.default_rng(2).random((3, 4)),
                                       np.random.default_rng(3).random((3, 4))),
      "sf1": plots.plot_success_failure([0.5, 0.6], [0.1, 0.0]),
      "f": plots.plot_faithfulness(rows),
      "coverage": plots.plot_coverage(Trace((lt, cov)), start_block=2),
  }


def test_plots_return_figures_that_save_as_pngs(tmp_path):
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  for name, fig in _figures().items():
    assert isinstance(fig, Figure), name
    path = plots.save(fig, tmp_path / "sub" / f"{name}.png")
    assert path == str(tmp_path / "sub" / f"{name}.png")
    assert (tmp_path / "sub" / f"{name}.png").stat().st_size > 1000 and _png(path)


def test_importing_plots_selects_no_backend():
  """No backend is forced and pyplot is never imported: figures save headless and show in notebooks."""
  code = ("import matplotlib, sys; from stream_jax import plots; "
          "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'; "
          "assert matplotlib.rcParams._get_backend_or_none() is None, matplotlib.get_backend()")
  env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr


def test_block_matrix_rejects_batched_masks():
  m = window_mask(2, 16, 16, block_q=4, block_k=4)
  batched = type(m)(m.indices[None], m.counts[None], 4, 4, 16, 16)
  with pytest.raises(ValueError, match="one sample"):
    plots.block_matrix(batched)
