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
      "needle": plots.plot_needle_mass(np.zeros((3, 4)), np.random.default_rng(4).random((3, 4))),
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


# --- legibility at the size a report shows figures (index.html: a 1100 px column) -----------------------


def _png_width(path) -> int:
  with open(path, "rb") as f:
    head = f.read(24)
  return int.from_bytes(head[16:20], "big")


def _long_trace(n_blocks=160, block=8, window=None):
  t = n_blocks * block
  m = window_mask(4, t, t, block_q=block, block_k=block, window=window)
  mass = np.where(np.asarray(m.indices) >= 0, 1.0 / np.maximum(np.asarray(m.counts)[..., None], 1), 0) * block
  return Trace((LayerTrace(m, jnp.asarray(mass, jnp.float32), 0, "global", "stream"),))


def test_route_and_head_figures_show_unscaled_in_a_report(tmp_path):
  """At 10k tokens (160 blocks) the route figure was 2113 px wide and the per-head masks 1518 px: scaled
  into the report's 1100 px their legend and tick labels were unreadable."""
  tr = _long_trace()
  figs = {"route": plots.plot_route(R.route(tr, np.array([[100, 104]])), needle_blocks=[12]),
          "heads": plots.plot_block_mask_heads(tr.layers[0].mask, mass=tr.layers[0].mass)}
  for name, fig in figs.items():
    path = plots.save(fig, tmp_path / f"{name}.png")
    assert _png_width(path) <= 1100, (name, _png_width(path))


def test_per_head_mask_tick_labels_do_not_overlap():
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  tr = _long_trace(n_blocks=160, block=64)
  fig = plots.plot_block_mask_heads(tr.layers[0].mask, mass=tr.layers[0].mass)
  FigureCanvasAgg(fig).draw()
  renderer = fig.canvas.get_renderer()
  checked = 0
  for ax in fig.axes[:4]:
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
      boxes = [t.get_window_extent(renderer) for t in labels if t.get_visible() and t.get_text()]
      boxes = [b for b in boxes if ax.bbox.x0 - 50 <= b.x0 <= ax.bbox.x1 + 50]
      for a, b in zip(boxes, boxes[1:]):
        assert not a.overlaps(b), (ax.get_title(), a, b)
      checked += len(boxes)
  assert checked > 8


def _legend(fig):
  return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def test_route_legend_lists_only_what_is_drawn():
  """A band mask cannot carry a needle 150 blocks back to the last block: no red edge, no red legend
  entry. With every block kept the needle reaches it, and the entry is there."""
  needle = np.array([[20, 22]])
  band = _long_trace(window=16)
  r = R.route(band, needle)
  assert not r.edge_list(min_weight=1e-3, only_route=True)
  assert not any("path from a needle" in t for t in _legend(plots.plot_route(r, needle_blocks=[2])))
  full = R.route(_long_trace(n_blocks=20), needle, threshold=1e-4)
  assert full.edge_list(min_weight=1e-3, only_route=True)
  assert any("path from a needle" in t for t in _legend(plots.plot_route(full, needle_blocks=[2])))


def test_needle_mass_shows_the_dense_contrast_on_one_scale():
  """An all-zero Stream grid beside the dense one: both panels share a colour scale from 0 to the dense
  maximum (the old single grid of zeros had a -0.1..0.1 colour bar and nothing to compare with)."""
  dense = np.random.default_rng(5).random((6, 4)) * 0.3
  fig = plots.plot_needle_mass(np.zeros((6, 4)), dense)
  images = [im for ax in fig.axes for im in ax.get_images()]
  assert len(images) == 2
  np.testing.assert_array_equal(images[0].get_array(), dense)
  assert not np.asarray(images[1].get_array()).any()
  for im in images:
    assert im.get_clim() == (0, dense.max())
  titles = " ".join(ax.get_title() for ax in fig.axes)
  assert "Stream: 0 in every layer and head" in titles and f"max {dense.max():.3f}" in titles
