"""Causal tests (experiments.ablation runs them, analysis.causal computes from arrays): the suppression
matrix against the reference's definition computed independently, and route ablation on the trained
associative-recall fixture (its route is known)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stream_jax import StreamConfig, intervene as I
from stream_jax.analysis import causal as C, routes as R
from stream_jax.dense import dense_attention
from stream_jax.experiments import ablation as A
from stream_jax.models import forward, init_params
from test_analysis_routes import BLOCK, T, _batch, _dense_logits, _qkv, _stream_trace, trained_recall_model
from tiny_models import tiny_config, tokens


def _np_kl(p_logits, q_logits, temp):
  """The reference's KL(P || Q) at temperature `temp`, in float64 NumPy."""
  lp = p_logits / temp - np.log(np.exp(p_logits / temp - (p_logits / temp).max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - (p_logits / temp).max(-1, keepdims=True)
  lq = q_logits / temp - np.log(np.exp(q_logits / temp - (q_logits / temp).max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - (q_logits / temp).max(-1, keepdims=True)
  return np.maximum((np.exp(lp) * (lp - lq)).sum(-1), 0.0)


def test_suppression_matrix_equals_one_suppression_at_a_time():
  """Each column equals its own unbatched suppressed forward (full logits, NumPy KL at T = 0.6, the
  reference's mean of log(KL + 1e-9) over the target sentence's tokens); batching and chunking change
  nothing; rows above the diagonal are NaN; importance is the mean over later sentences."""
  cfg = tiny_config()
  p = init_params(cfg, seed=7, scale=0.3)
  x = np.asarray(tokens(1, 40, seed=3))[0]
  spans = np.array([[1, 8], [8, 15], [15, 22], [22, 31], [31, 40]])
  sm = A.suppression_matrix(cfg, p, x, spans, batch=3, chunk=16, progress=False)
  base = np.asarray(forward(cfg, p, x).logits[0], np.float64)
  for j, (s, e) in enumerate(spans):
    iv = I.suppress_spans([(s, e)], length=40, num_layers=cfg.num_layers, num_heads=cfg.num_heads)
    sup = np.asarray(forward(cfg, p, x, intervention=iv).logits[0], np.float64)
    kl = _np_kl(base, sup, 0.6)
    for k, (sk, ek) in enumerate(spans):
      if k < j:
        assert np.isnan(sm.matrix[k, j])
      else:
        want = np.mean(np.log(kl[sk:ek] + 1e-9))
        np.testing.assert_allclose(sm.matrix[k, j], want, rtol=1e-3, atol=1e-3)
  one = A.suppression_matrix(cfg, p, x, spans, batch=1, chunk=40, progress=False)
  np.testing.assert_allclose(one.matrix, sm.matrix, rtol=1e-4, atol=1e-4)
  want_imp = [np.nanmean(sm.matrix[j + 1:, j]) for j in range(4)] + [np.nan]
  np.testing.assert_allclose(sm.importance, want_imp)
  assert sm.matrix[1, 0] > np.log(1e-9) + 5  # suppressing a sentence really moves the next one


def test_suppression_matrix_bad_input():
  cfg = tiny_config()
  p = init_params(cfg, seed=7)
  x = np.asarray(tokens(1, 20))[0]
  with pytest.raises(ValueError, match="at least 2 sentences"):
    A.suppression_matrix(cfg, p, x, [[1, 5]], progress=False)
  with pytest.raises(ValueError, match=r"spans\[1\]"):
    A.suppression_matrix(cfg, p, x, [[1, 5], [5, 30]], progress=False)
  with pytest.raises(ValueError, match="one sequence"):
    A.suppression_matrix(cfg, p, x[None], [[1, 5], [5, 9]], progress=False)


def test_route_ablation_flips_the_recalled_value_random_ablation_does_not():
  """The trained recall model: suppressing the needle block in the head the traced route reads it with
  flips the recalled value; suppressing as many random kept blocks of that head does not."""
  p = trained_recall_model()
  k_ids, v_ids, tgt, which = _batch(np.random.default_rng(2), 48)
  cfg = StreamConfig(block_q=BLOCK, block_k=BLOCK, top_k=2, sink_blocks=1, window_blocks=1)
  trace, _ = _stream_trace(p, k_ids, v_ids, cfg)
  q, k, v = _qkv(p, k_ids, v_ids)
  pos = jnp.arange(T)

  @jax.jit
  def recalled(qb, kb, vb, sup):  # one example's answer with keys `sup` [1, N, S] hidden (compiled once)
    out = dense_attention(qb[:, :, None], kb[:, :, None], vb[:, :, None], q_pos=pos, k_pos=pos,
                          scale=q.shape[-1] ** -0.5, k_valid=~sup)
    return (out[0, -1, 0] @ p["wu"]).argmax()

  def answer(b, iv):
    return int(recalled(q[b:b + 1], k[b:b + 1], v[b:b + 1], iv.layer(0)[0]))

  dense_ok = np.asarray(_dense_logits(p, k_ids, v_ids)[:, -1].argmax(-1) == tgt)
  rng = np.random.default_rng(0)
  route_flips = random_flips = tested = random_runs = 0
  n_b = T // BLOCK
  for b in np.nonzero(dense_ok)[0]:
    tr = R.select_batch(trace, int(b))
    spans = np.array([[which[b], which[b] + 1]])
    needle = np.asarray(R.span_blocks(spans, BLOCK, T))
    where = C.route_heads(R.route(tr, spans, threshold=1e-3), needle)
    if not where.any():
      continue  # the trace missed the needle block: no route to ablate
    tested += 1
    iv = I.drop_blocks(np.nonzero(needle)[0], block_k=BLOCK, length=T, num_layers=1, num_heads=1,
                       heads=where)
    route_flips += answer(b, iv) != int(tgt[b])
    exclude = needle.copy()
    exclude[0] = True
    exclude[n_b - 2:] = True  # the question's window
    blocks = C.random_kept_blocks(tr, where, int(needle.sum()), rng, exclude)
    if blocks:
      riv = I.drop_blocks(blocks, block_k=BLOCK, length=T, num_layers=1, num_heads=1, heads=where)
      random_flips += answer(b, riv) != int(tgt[b])
      random_runs += 1
  print(f"recall fixture: route ablation flipped {route_flips}/{tested}, random {random_flips}/{random_runs}")
  assert tested >= 30 and random_runs >= 20, (tested, random_runs)
  assert route_flips / tested >= 0.9, (route_flips, tested)
  assert random_flips / random_runs <= 0.15, (random_flips, random_runs)


def test_route_heads_reads_only_needle_edges():
  tr = Trace_with_two_heads()
  r = R.route(tr, np.array([[9, 11]]), threshold=0.0)
  where = C.route_heads(r, np.asarray(R.span_blocks(np.array([[9, 11]]), 4, 32)))
  np.testing.assert_array_equal(where, [[True, False]])  # head 1 never reads block 2


def Trace_with_two_heads():  # noqa: N802  (a fixture builder)
  from stream_jax.mask import BlockMask
  from stream_jax.trace import LayerTrace, Trace
  idx = np.full((2, 8, 2), -1, np.int32)
  mass = np.zeros((2, 8, 2), np.float32)
  for j in range(8):
    idx[:, j, 0], mass[:, j, 0] = j, 4.0
  idx[0, 7] = [2, 7]
  mass[0, 7] = [3.0, 1.0]  # head 0: the final block reads block 2 (the needle)
  idx[1, 7] = [5, 7]
  mass[1, 7] = [3.0, 1.0]  # head 1: block 5
  m = BlockMask(jnp.asarray(idx), jnp.asarray((idx >= 0).sum(-1).astype(np.int32)), 4, 4, 32, 32)
  return Trace((LayerTrace(m, jnp.asarray(mass), 0, "global", "stream"),))


def test_causal_figures():
  from stream_jax import plots
  from matplotlib.figure import Figure
  m = np.array([[0.5, np.nan, np.nan], [-3.0, 0.2, np.nan], [-5.0, -2.0, 0.1]])
  res = C.SuppressionMatrix(matrix=m, importance=C.importance_from_matrix(m), kl=np.zeros((3, 5)),
                            spans=np.array([[0, 1], [1, 3], [3, 5]]), temperature=0.6)
  assert isinstance(plots.plot_suppression(res, np.array([0.3, 0.1, np.nan])), Figure)
  fig = plots.plot_ablation(dict(samples=4, answered=3, with_route=3, route_flips=2, random_flips=1,
                                 random_runs=9, everywhere_flips=3, everywhere_runs=3))
  assert [t.get_text() for t in fig.axes[0].texts] == ["2/3", "1/9", "3/3"]
