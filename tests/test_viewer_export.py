"""The viewer's export: tiles hold exactly the trace, the pyramid pools it exactly, the overview numbers equal
the library's, the token text concatenates to the document. No browser needed (tests/test_viewer_browser.py
drives the page)."""

import json

import jax
import numpy as np
import pytest

import stream_jax as sj
from stream_jax.analysis import anchors, routes
from stream_jax.mask import BlockMask
from stream_jax.trace import LayerTrace, Trace
from stream_jax.viewer import export_viewer, inline_html, tiles
from stream_jax.viewer.summary import kept_share
from stream_jax.viewer.text import pieces_from_offsets


def synthetic_trace(t=300, heads=4, block=8, top_k=3, seed=0):
  """A window layer, a Stream layer with coverage, and a layer whose queries are the last t // 3 positions."""
  q = jax.random.normal(jax.random.PRNGKey(seed), (t, heads, 8))
  k = jax.random.normal(jax.random.PRNGKey(seed + 1), (t, 2, 8))
  cfg = sj.StreamConfig(block_q=block, block_k=block, top_k=top_k)
  mask = sj.estimate_mask(q, k, cfg)
  _, stats = sj.sparse_attention(q, k, k, mask)
  local = sj.window_mask(heads, t, t, block_q=block, block_k=block, window=4 * block)
  _, lstats = sj.sparse_attention(q, k, k, local, window=4 * block)
  cov = jax.random.uniform(jax.random.PRNGKey(seed + 2), mask.counts.shape)
  tail = t // 3
  part = sj.estimate_mask(q[-tail:], k, cfg)
  _, pstats = sj.sparse_attention(q[-tail:], k, k, part)
  return Trace((LayerTrace(local, lstats.mass, 0, "local", "window", 4 * block),
                LayerTrace(mask, stats.mass, 1, "global", "stream", coverage=cov),
                LayerTrace(part, pstats.mass, 2, "global", "stream")))


def read_level(folder, layer, head, z, rows, tile_rows):
  """Concatenated CSR of one level of one head, from its tiles."""
  cols, sums, maxs, ptr, cov = [], [], [], [0], []
  for t in range(tiles.num_tiles(rows, tile_rows)):
    tile = tiles.read_tile((folder / tiles.tile_path(layer, head, z, t)).read_bytes())
    ptr += list(ptr[-1] + tile["rowptr"][1:].astype(np.int64))
    cols.append(tile["cols"]); sums.append(tile["sum"]); maxs.append(tile["max"])
    if tile["rowcov"] is not None:
      cov.append(tile["rowcov"])
  return (np.asarray(ptr), np.concatenate(cols), np.concatenate(sums), np.concatenate(maxs),
          np.concatenate(cov) if cov else None)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  trace = synthetic_trace()
  pieces = [f"w{i} " for i in range(300)]
  spans = np.array([[i, min(i + 7, 300)] for i in range(0, 300, 7)])
  out = export_viewer(tmp_path_factory.mktemp("v") / "viewer", trace, pieces=pieces, sentences=spans,
                      needle_spans=np.array([[100, 104]]), tile_rows=8, top=8)
  return trace, out, spans


def test_level0_tiles_hold_the_trace_exactly(exported):
  trace, out, _ = exported
  for l in trace.layers:
    idx, mass = np.asarray(l.mask.indices), np.asarray(l.mass)
    for h in range(idx.shape[0]):
      ptr, cols, s, _, cov = read_level(out, l.layer, h, 0, idx.shape[1], 8)
      for j in range(idx.shape[1]):
        keep = idx[h, j] >= 0
        np.testing.assert_array_equal(cols[ptr[j]:ptr[j + 1]], idx[h, j][keep])
        assert s[ptr[j]:ptr[j + 1]].tobytes() == mass[h, j][keep].astype(np.float32).tobytes()
      if l.coverage is None:
        assert np.isnan(cov).all()
      else:
        np.testing.assert_array_equal(cov, np.asarray(l.coverage[h]))


def test_pyramid_levels_are_sum_and_max_pooling_of_the_block_map(exported):
  trace, out, _ = exported
  manifest = json.loads((out / "manifest.json").read_text())
  for l, info in zip(trace.layers, manifest["layers"]):
    dense = np.asarray(jax.numpy.where(sj.to_block_dense(l.mask), 0.0, np.nan))  # NaN = not kept
    n_q, n_k = dense.shape[-2:]
    full = np.full(dense.shape, np.nan)
    idx, mass = np.asarray(l.mask.indices), np.asarray(l.mass)
    for h, j, c in zip(*np.nonzero(idx >= 0)):
      full[h, j, idx[h, j, c]] = mass[h, j, c]
    assert len(info["levels"]) > 2 and max(info["levels"][-1]["rows"], info["levels"][-1]["cols"]) <= 8
    for lev in info["levels"][1:]:
      f = 2 ** lev["z"]
      pad = np.full((full.shape[0], lev["rows"] * f, lev["cols"] * f), np.nan)
      pad[:, :n_q, :n_k] = full
      blocks = pad.reshape(full.shape[0], lev["rows"], f, lev["cols"], f)
      want_sum = np.nansum(blocks, (2, 4))
      kept = ~np.isnan(blocks).all((2, 4))
      for h in range(full.shape[0]):
        ptr, cols, s, mx, _ = read_level(out, l.layer, h, lev["z"], lev["rows"], 8)
        got = np.zeros((lev["rows"], lev["cols"]), bool)
        for r in range(lev["rows"]):
          c = cols[ptr[r]:ptr[r + 1]]
          assert np.all(np.diff(c) > 0), "cols ascending within a row"
          got[r, c] = True
          np.testing.assert_allclose(s[ptr[r]:ptr[r + 1]], want_sum[h, r, c], rtol=1e-6)
          np.testing.assert_array_equal(mx[ptr[r]:ptr[r + 1]],
                                        np.nanmax(blocks[h, r][:, c], axis=(0, 2)).astype(np.float32))
        np.testing.assert_array_equal(got, kept[h])


def test_overview_numbers_equal_the_library(exported):
  trace, out, spans = exported
  m = json.loads((out / "manifest.json").read_text())
  for l, row in zip(trace.layers, m["stats"]["kept"]):
    np.testing.assert_allclose(row, np.asarray(l.kept_fraction()), rtol=2e-6)
  v = anchors.trace_vertical_scores(trace, spans)
  _, kurt = anchors.receiver_heads(v)
  np.testing.assert_allclose(np.asarray(m["stats"]["anchor"], float), np.asarray(kurt), rtol=1e-6)
  np.testing.assert_allclose(m["stats"]["needle"], routes.trace_needle_mass(trace, np.array([[100, 104]])),
                             rtol=1e-6)
  assert m["stats"]["coverage"][0] == [None] * 4
  np.testing.assert_allclose(m["stats"]["coverage"][1], np.asarray(trace[1].coverage).mean(-1), rtol=1e-6)
  assert m["needle"]["blocks"] == [12]
  assert m["layers"][2]["q_len"] == 100 and m["layers"][2]["k_len"] == 300


def test_kept_share_closed_form_with_windows_and_offsets():
  rng = np.random.default_rng(0)
  for q_len, k_len, bq, bk, window in ((100, 300, 16, 8, None), (100, 300, 8, 16, 40), (77, 77, 4, 8, 9)):
    n_q, n_k = -(-q_len // bq), -(-k_len // bk)
    idx = np.sort(rng.integers(0, n_k, (3, n_q, 5)), -1)
    idx = np.where(np.diff(idx, axis=-1, prepend=-1) > 0, idx, n_k)  # drop repeats
    idx = np.sort(idx, -1)
    idx = np.where(idx < n_k, idx, -1).astype(np.int32)
    mask = BlockMask(jax.numpy.asarray(idx), jax.numpy.asarray((idx >= 0).sum(-1)), bq, bk, q_len, k_len)
    layer = LayerTrace(mask, jax.numpy.ones(idx.shape), 0, "global", "stream", window)
    np.testing.assert_allclose(kept_share(layer), np.asarray(layer.kept_fraction()), rtol=2e-6)


def test_token_pieces_concatenate_to_the_text():
  text = "Hello world.  Second line\nthird."
  offsets = [(0, 0), (0, 5), (5, 11), (11, 12), (14, 20), (20, 25), (26, 31), (31, 32)]
  p = pieces_from_offsets(text, offsets)
  assert "".join(p) == text
  assert p[0] == "" and p[3] == ".  " and p[6] == "third"


def test_inline_page_is_self_contained(exported):
  _, out, _ = exported
  doc = inline_html(out)
  assert "src=" not in doc and "href=" not in doc, "nothing may be fetched from outside the document"
  assert "tiles/l1/h3/z0_0.bin" in doc and "manifest.json" in doc and "BlockMap" in doc


def test_export_refuses_a_foreign_folder(tmp_path):
  (tmp_path / "mine.txt").write_text("keep me")
  with pytest.raises(ValueError, match="not a viewer folder"):
    export_viewer(tmp_path, synthetic_trace(t=64))
  assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_notebook_display_inlines_small_traces_and_summarises_large_ones():
  from stream_jax.trace import TracedRun  # pylint: disable=import-outside-toplevel
  from stream_jax.viewer.notebook import trace_html  # pylint: disable=import-outside-toplevel
  trace = synthetic_trace(t=96)
  inline = trace._repr_html_()
  assert inline.startswith("<iframe srcdoc=") and "SJV_EMBED" in inline
  summary = trace_html(trace, limit=0)
  assert "too large to show inline" in summary and "stream-jax view" in summary
  assert f"{np.mean(np.asarray(trace[1].kept_fraction())):.4f}" in summary
  batched = jax.tree_util.tree_map(lambda x: np.stack([x, x]), trace)
  assert TracedRun(logits=np.zeros((2, 3)), trace=batched)._repr_html_().startswith("<iframe")
  assert TracedRun(logits=np.zeros((1, 3)))._repr_html_() is None


def test_compare_trace_tiles_and_checks(tmp_path):
  trace, dense = synthetic_trace(t=96), synthetic_trace(t=96, top_k=8)
  out = export_viewer(tmp_path / "v", trace, compare=dense, compare_label="dense", tile_rows=4, top=4)
  m = json.loads((out / "manifest.json").read_text())
  assert m["compare"]["label"] == "dense" and m["compare"]["main_label"] == "sparse"
  assert [l["layer"] for l in m["compare"]["layers"]] == [0, 1, 2]
  l = dense[1]
  rows = l.mask.num_q_blocks
  ptr, cols, sums, _, _ = read_level(out / "compare", 1, 2, 0, rows, 4)
  idx, mass = np.asarray(l.mask.indices)[2], np.asarray(l.mass)[2]
  for j in range(rows):
    keep = idx[j] >= 0
    np.testing.assert_array_equal(cols[ptr[j]:ptr[j + 1]], np.sort(idx[j][keep]))
    np.testing.assert_array_equal(sums[ptr[j]:ptr[j + 1]], mass[j][keep][np.argsort(idx[j][keep])])
  with pytest.raises(ValueError, match="would not line up"):
    export_viewer(tmp_path / "w", trace, compare=synthetic_trace(t=96, block=16))


def test_incoming_index_is_the_transpose(exported):
  trace, out, _ = exported
  l = trace[1]
  idx, mass = np.asarray(l.mask.indices)[2], np.asarray(l.mass)[2]
  n_k = l.mask.num_k_blocks
  for c in range(n_k):
    t, cc = divmod(c, 8)
    got = tiles.read_incoming((out / f"tiles/l1/h2/in_{t}.bin").read_bytes())
    a, b = got["colptr"][cc], got["colptr"][cc + 1]
    rows, slots = np.nonzero(idx == c)
    np.testing.assert_array_equal(got["rows"][a:b], rows)
    np.testing.assert_array_equal(got["mass"][a:b], mass[rows, slots])
