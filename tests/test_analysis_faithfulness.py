"""Faithfulness metrics on hand-made inputs with known answers, and against brute-force references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stream_jax import (StreamConfig, dense_block_mass, estimate_mask, sparse_attention, to_block_dense,
                        to_dense)
from stream_jax.mask import BlockMask, window_mask
from stream_jax.trace import LayerTrace, Trace, TracedRun
from stream_jax.analysis import faithfulness as F


def test_kl_matches_numpy_and_is_zero_on_equal_logits():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(3, 7, 11)), rng.normal(size=(3, 7, 11))
  p = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
  q = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
  want = (p * (np.log(p) - np.log(q))).sum(-1)
  np.testing.assert_allclose(F.next_token_kl(jnp.asarray(a), jnp.asarray(b)), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(F.next_token_kl(jnp.asarray(a), jnp.asarray(a + 3.0)), 0.0, atol=1e-6)


def test_top1_and_top5_on_known_rankings():
  dense = jnp.asarray([[9., 8., 7., 6., 5., 4., 3.], [0., 1., 2., 3., 4., 5., 6.]])
  # row 0: same argmax, top-5 shares {0, 1, 2} of {0..4} -> 3/5; row 1: argmax 6 vs 0, top-5 {2..6} vs {0..4}
  stream = jnp.asarray([[9., 8., 7., 0., 0., 5.5, 5.4], [6., 5., 4., 3., 2., 1., 0.]])
  np.testing.assert_array_equal(F.top1_agreement(dense, stream), [True, False])
  np.testing.assert_allclose(F.topk_overlap(dense, stream, 5), [3 / 5, 3 / 5])


def test_residual_error_is_relative_frobenius():
  d = [jnp.ones((2, 4, 3)), 10 * jnp.ones((2, 4, 3))]
  s = [jnp.ones((2, 4, 3)) * 1.5, 10 * jnp.ones((2, 4, 3))]
  np.testing.assert_allclose(F.residual_error(d, s), [0.5, 0.0], atol=1e-6)
  with pytest.raises(ValueError, match="layers"):
    F.residual_error(d, s[:1])


def _mask(rows, n_k, block=4, config=None):
  """BlockMask [1, nQ, C] from python lists of kept ids per query block."""
  cap = max(len(r) for r in rows)
  idx = np.full((1, len(rows), cap), -1, np.int32)
  for j, r in enumerate(rows):
    idx[0, j, :len(r)] = sorted(r)
  cnt = (idx >= 0).sum(-1).astype(np.int32)
  t = len(rows) * block
  return BlockMask(jnp.asarray(idx), jnp.asarray(cnt), block, block, t, n_k * block, config)


def test_oracle_recall_counts_shared_blocks():
  oracle = _mask([[0], [0, 1], [0, 2], [1, 3]], 4)
  mask = _mask([[0], [1], [0, 1], [0, 3]], 4)
  # oracle holds 7 blocks; mask keeps 0 | 1 | 0 | 3 of them -> 4 / 7
  np.testing.assert_allclose(F.oracle_recall(mask, oracle, searched_only=False), [4 / 7])


def test_oracle_recall_ignores_rule_kept_blocks():
  cfg = StreamConfig(block_q=4, block_k=4, top_k=1, sink_blocks=1, window_blocks=1)
  # query block 3 (diag 3): sink 0, window 3, searched one of {1, 2}
  oracle = _mask([[0], [0, 1], [0, 1, 2], [0, 2, 3]], 4, config=cfg)
  mask = _mask([[0], [0, 1], [0, 1, 2], [0, 1, 3]], 4, config=cfg)
  # searched slots of the oracle: block 1 (row 2: searched range {1}, dense) and 2 (row 3) -> 1 of 2 found
  np.testing.assert_allclose(F.oracle_recall(mask, oracle), [1 / 2])


def test_dense_mass_share_full_mask_is_one_and_partial_matches_numpy():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(64, 2, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(64, 1, 8)), jnp.float32)
  dbm = dense_block_mass(q, k, block_q=8, block_k=8)
  full = window_mask(2, 64, 64, block_q=8, block_k=8)
  np.testing.assert_allclose(F.dense_mass_share(full, dbm), [1.0, 1.0], rtol=1e-5)
  cfg = StreamConfig(block_q=8, block_k=8, top_k=2, sink_blocks=1, window_blocks=1)
  mask = estimate_mask(q, k, cfg)
  kept = np.asarray(to_block_dense(mask))
  want = (np.asarray(dbm) * kept).sum((-2, -1)) / np.asarray(dbm).sum((-2, -1))
  np.testing.assert_allclose(F.dense_mass_share(mask, dbm), want, rtol=1e-5)
  assert (want < 1).all()


def _trace(masks, windows=None, modes=None):
  layers = []
  for i, m in enumerate(masks):
    w = None if windows is None else windows[i]
    layers.append(LayerTrace(m, jnp.zeros(m.indices.shape, jnp.float32), i, "global" if w is None else "local",
                             "stream" if modes is None else modes[i], w))
  return Trace(tuple(layers))


def test_kept_fractions_against_token_level_count():
  cfg = StreamConfig(block_q=8, block_k=8, top_k=1, sink_blocks=1, window_blocks=1)
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.normal(size=(80, 2, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(80, 2, 8)), jnp.float32)
  m0 = estimate_mask(q, k, cfg)
  m1 = window_mask(2, 80, 80, block_q=8, block_k=8, window=16)
  tr = _trace([m0, m1], windows=[None, 16], modes=["stream", "window"])
  kf = F.kept_fractions(tr)
  dense0 = np.asarray(to_dense(m0)).sum((-2, -1))
  causal = 80 * 81 / 2
  np.testing.assert_allclose(kf.per_head[0], dense0 / causal, rtol=1e-6)
  np.testing.assert_allclose(kf.per_head[1], 1.0, rtol=1e-6)  # the window band is exact under its rule
  kept1 = np.asarray(to_dense(m1, window=16)).sum((-2, -1))
  np.testing.assert_allclose(kf.overall, (dense0.sum() + kept1.sum()) / (4 * causal), rtol=1e-6)
  np.testing.assert_allclose(kf.stream, kf.per_layer[0], rtol=1e-6)


def test_report_end_to_end_on_attention_layers():
  """Two 'layers' of plain attention, stream vs dense: report fields are consistent and print."""
  rng = np.random.default_rng(3)
  cfg = StreamConfig(block_q=8, block_k=8, top_k=2)
  t, layers, masks, oracles, dbms = 96, [], [], [], []
  d_out, s_out = [], []
  for i in range(2):
    q = jnp.asarray(rng.normal(size=(t, 2, 8)) * 2, jnp.float32)
    k = jnp.asarray(rng.normal(size=(t, 1, 8)) * 2, jnp.float32)
    v = jnp.asarray(rng.normal(size=(t, 1, 8)), jnp.float32)
    m = estimate_mask(q, k, cfg)
    out, st = sparse_attention(q, k, v, m)
    full = window_mask(2, t, t, block_q=8, block_k=8)
    dout, _ = sparse_attention(q, k, v, full)
    layers.append(LayerTrace(m, st.mass, i, "global", "stream"))
    oracles.append(estimate_mask(q, k, cfg.replace(representative="oracle")))
    dbms.append(dense_block_mass(q, k, block_q=8, block_k=8))
    d_out.append(dout)
    s_out.append(out)
  tr = Trace(tuple(layers))
  w = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
  d_logits = d_out[-1].reshape(t, 16) @ w
  s_logits = s_out[-1].reshape(t, 16) @ w
  rep = F.faithfulness_report(d_logits, s_logits, trace=tr, dense_hidden=d_out, stream_hidden=s_out,
                              oracle_masks=oracles, dense_block_masses=dbms)
  assert rep.kl.shape == (t,) and rep.kl_last.shape == ()
  assert float(rep.kl.min()) >= -1e-6
  # early query blocks are dense: exact agreement there
  np.testing.assert_allclose(rep.kl[:8 * 4], 0.0, atol=1e-5)
  assert 0 < float(rep.kept_overall) < 1
  assert ((rep.oracle_recall > 0.3) & (rep.oracle_recall <= 1.0)).all()
  assert ((rep.dense_mass_share > 0.5) & (rep.dense_mass_share <= 1.0 + 1e-6)).all()
  text = F.format_report(rep)
  assert "oracle_rec" in text and "kl_last" in text
  leaves = jax.tree_util.tree_leaves(rep)
  assert all(isinstance(x, jax.Array) for x in leaves)


def test_run_faithfulness_with_a_forward_callable():
  rng = np.random.default_rng(4)
  t = 64
  q = jnp.asarray(rng.normal(size=(t, 2, 8)) * 2, jnp.float32)
  k = jnp.asarray(rng.normal(size=(t, 2, 8)) * 2, jnp.float32)
  v = jnp.asarray(rng.normal(size=(t, 2, 8)), jnp.float32)

  def forward(tokens, attention):
    if attention == "dense":
      m = window_mask(2, t, t, block_q=8, block_k=8)
    else:
      m = estimate_mask(q, k, attention)
    out, st = sparse_attention(q, k, v, m)
    return TracedRun(logits=out.reshape(t, 16), trace=Trace((LayerTrace(m, st.mass, 0, "global", "stream"),)),
                     hidden=out[None])

  cfg = StreamConfig(block_q=8, block_k=8, top_k=1)
  rep = F.run_faithfulness(forward, jnp.zeros((t,), jnp.int32), cfg, oracle=True)
  assert rep.oracle_recall.shape == (1,)
  assert rep.residual_error.shape == (1,) and float(rep.residual_error[0]) > 0


def test_chunked_output_metrics_from_hidden_equal_full_logits():
  rng = np.random.default_rng(5)
  w = jnp.asarray(rng.normal(size=(6, 40)), jnp.float32)
  hd = [jnp.asarray(rng.normal(size=(1, 23, 6)), jnp.float32) for _ in range(2)]
  hs = [h + 0.1 * jnp.asarray(rng.normal(size=h.shape), jnp.float32) for h in hd]
  full = F.faithfulness_report(hd[-1] @ w, hs[-1] @ w, dense_hidden=hd, stream_hidden=hs)
  chunked = F.faithfulness_report_from_hidden(hd, hs, lambda h: h @ w, chunk=5)
  for name in ("kl", "top1", "top5", "residual_error"):
    np.testing.assert_allclose(getattr(chunked, name), getattr(full, name), rtol=1e-5, atol=1e-7)
  assert chunked.kl.shape == (1, 23)


def test_chunked_metrics_compile_once_take_params_as_an_argument_and_report_progress():
  """The tail chunk is padded to the chunk shape (one trace, not two), a Partial carrying the parameters
  works (its parameters are an argument of the compiled function; a closure folds them in as constants:
  0.7 GB for Gemma's embedding), and on_chunk counts every position once."""
  rng = np.random.default_rng(6)
  w = jnp.asarray(rng.normal(size=(6, 40)), jnp.float32)
  hd = jnp.asarray(rng.normal(size=(23, 6)), jnp.float32)
  hs = hd + 0.1
  traces, done = [], []

  def unembed(params, h):
    traces.append(h.shape)
    return h @ params

  fn = jax.tree_util.Partial(unembed, w)
  got = F.output_metrics_from_hidden(hd, hs, fn, chunk=5, on_chunk=done.append)
  want = F.output_metrics(hd @ w, hs @ w)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert len(traces) == 2 and set(traces) == {(5, 6)}  # dense and stream logits, one compiled shape
  assert done == [5, 5, 5, 5, 3]
