"""Exact-output traces, coverage, mass scoring and adaptive budgets, against dense references.

Oracles: the dense forward's logits (exact mode must equal them), a brute-force dense block-mass matrix
(the kept blocks' dense probability and coverage), and a brute-force "ideal selector" (blocks ranked by
their true dense mass, the fewest reaching the coverage target) for the oracle representative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stream_jax as sj
from stream_jax.blocksparse import dense_block_mass
from stream_jax.models import forward
from stream_jax.models.params import init_params
from tiny_models import tiny_config, tokens

C = sj.StreamConfig


def _tokens(b, t, seed=0):
  return tokens(b, t, seed=seed)


def _qk(t=512, n=4, kv=2, h=32, seed=0, spread=1.5):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(t, n, h)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(t, kv, h)) * spread, jnp.float32)
  v = jnp.asarray(rng.normal(size=(t, kv, h)), jnp.float32)
  return q, k, v


# ------------------------------------------------------------------------------------- exact forward

@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_exact_output_equals_dense_and_mass_is_dense_probability(family):
  cfg = tiny_config(family, window=24)
  params = init_params(cfg, seed=3, scale=0.3)
  x = _tokens(2, 150)
  _run = forward(cfg, params, x, return_hidden=True)
  dense, hidden = _run.logits, _run.hidden
  sc = C(block_q=8, block_k=8, top_k=2, sink_blocks=1, window_blocks=1)
  _run = forward(cfg, params, x, attention=sc, output="exact")
  exact, trace = _run.logits, _run.trace
  rel = np.abs(np.asarray(exact) - np.asarray(dense)).max() / np.abs(np.asarray(dense)).max()
  assert rel <= 1e-5
  _run = forward(cfg, params, x, attention=sc)
  sparse, strace = _run.logits, _run.trace
  assert np.abs(np.asarray(sparse) - np.asarray(dense)).max() > 1e-3  # the sparse model really differs
  assert all(l.coverage is None for l in strace.layers)

  # Recompute each global layer's q, k from the dense residual stream and compare with brute force.
  from stream_jax.models.transformer import Gemma
  model = Gemma(cfg, jnp.float32)
  for lt in trace.layers:
    assert lt.coverage is not None and lt.coverage.shape == lt.mask.counts.shape
    if lt.kind == "local":
      assert lt.mode == "window"
      np.testing.assert_allclose(np.asarray(lt.coverage)[..., :-1], 1.0, rtol=1e-5)
      continue
    assert lt.mode == "exact"

    def qk(mdl, h, i=lt.layer):
      block = mdl.blocks[i]
      return block.attn.qkv(block.pre_attention_norm(h), jnp.arange(h.shape[1]))

    assert lt.layer > 0  # its input is the previous layer's output (hidden holds each layer's output)
    q, k, _ = model.apply(params, hidden[lt.layer - 1], method=qk)
    bm = np.asarray(dense_block_mass(q, k, block_q=8, block_k=8, scale=cfg.attn_scale,
                                     softcap=cfg.attn_softcap))  # [B, N, nQ, nK]
    idx = np.asarray(lt.mask.indices)
    want = np.take_along_axis(bm, np.maximum(idx, 0), -1) * (idx >= 0)
    np.testing.assert_allclose(np.asarray(lt.mass), want, atol=2e-5)
    rows = np.minimum(8, 150 - 8 * np.arange(idx.shape[2]))
    np.testing.assert_allclose(np.asarray(lt.coverage), want.sum(-1) / rows, atol=2e-5)
    assert float(np.asarray(lt.coverage)[..., -1].min()) < 0.999  # pruning happens at the end


def test_sparse_trace_with_coverage_keeps_its_logits():
  cfg = tiny_config()
  params = init_params(cfg, seed=4, scale=0.3)
  x = _tokens(1, 120)
  sc = C(block_q=8, block_k=8, top_k=2, window_blocks=1)
  _run = forward(cfg, params, x, attention=sc)
  a, ta = _run.logits, _run.trace
  _run = forward(cfg, params, x, attention=sc, coverage=True)
  b, tb = _run.logits, _run.trace
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for la, lb in zip(ta.layers, tb.layers):
    np.testing.assert_array_equal(np.asarray(la.mass), np.asarray(lb.mass))  # still the kept softmax's
    cov = np.asarray(lb.coverage)
    assert ((cov > 0) & (cov <= 1 + 1e-6)).all()
  assert 0 < float(tb.coverage()) < 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(output="full"), "output"),
    (dict(attention="dense", output="exact"), "Stream call"),
    (dict(attention="dense", coverage=True), "Stream call"),
    (dict(output="exact", dense_layers=(1,)), "dense_layers"),
    (dict(output="exact", dense_impl="capture"), "capture"),
])
def test_output_mode_bad_input(kwargs, match):
  cfg = tiny_config()
  params = init_params(cfg)
  kwargs = {"attention": C(block_q=8, block_k=8), **kwargs}
  with pytest.raises(ValueError, match=match):
    forward(cfg, params, _tokens(1, 16), **kwargs)


def test_cudnn_exact_with_softcap_is_refused():
  cfg = tiny_config("gemma2")
  with pytest.raises(ValueError, match="dense_impl='cudnn'.*soft-cap"):
    forward(cfg, init_params(cfg), _tokens(1, 16), attention=C(block_q=8, block_k=8), output="exact",
            dense_impl="cudnn")


# ------------------------------------------------------------------------------ sparse attention API

def test_lse_ref_mass_and_coverage_match_dense():
  q, k, v = _qk(t=300)
  mask = sj.estimate_mask(q, k, C(block_q=32, block_k=32, top_k=2, window_blocks=1))
  _, dense_lse = _dense_lse(q, k)
  out_a, a = sj.sparse_attention(q, k, v, mask)
  out_b, b = sj.sparse_attention(q, k, v, mask, lse_ref=dense_lse)
  np.testing.assert_array_equal(np.asarray(out_a), np.asarray(out_b))  # output unchanged
  bm = np.asarray(dense_block_mass(q, k, block_q=32, block_k=32))
  idx = np.asarray(mask.indices)
  want = np.take_along_axis(bm, np.maximum(idx, 0), -1) * (idx >= 0)
  np.testing.assert_allclose(np.asarray(b.mass), want, atol=1e-5)
  cov = np.asarray(sj.block_coverage(a.lse, dense_lse, 32))
  rows = np.minimum(32, 300 - 32 * np.arange(idx.shape[1]))
  np.testing.assert_allclose(cov, want.sum(-1) / rows, atol=1e-5)
  with pytest.raises(ValueError, match="lse_ref must have shape"):
    sj.sparse_attention(q, k, v, mask, lse_ref=dense_lse[:, :10])


def _dense_lse(q, k):
  """Brute-force per-query log-sum-exp [N, T] of causal scaled logits (GQA)."""
  t, n, h = q.shape
  kk = jnp.repeat(k, n // k.shape[1], axis=1)
  logits = jnp.einsum("tnh,snh->nts", q, kk) * h ** -0.5
  causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
  return None, jax.nn.logsumexp(jnp.where(causal, logits, -jnp.inf), axis=-1)


# ------------------------------------------------------------------------- mass scoring and budgets

def _ideal(bm_row, rule, searchable, target):
  """The fewest searchable blocks, by true mass, whose mass with the rule blocks reaches the target."""
  total = bm_row.sum()
  acc = bm_row[rule].sum()
  count = 0
  for b in searchable[np.argsort(-bm_row[searchable], kind="stable")]:
    if acc >= target * total:
      break
    acc += bm_row[b]
    count += 1
  return count


@pytest.mark.parametrize("seed", [0, 1])
def test_oracle_mass_scoring_is_exact_top_k_by_dense_mass(seed):
  q, k, _ = _qk(t=640, seed=seed)
  cfg = C(block_q=32, block_k=32, top_k=4, representative="oracle", score="mass")
  idx = np.asarray(sj.estimate_mask(q, k, cfg).indices)
  bm = np.asarray(dense_block_mass(q, k, block_q=32, block_k=32))
  for n in range(q.shape[1]):
    for j in range(bm.shape[1]):
      searchable = np.arange(1, j - 1)  # sink 0, window j-1..j
      if len(searchable) <= 4:
        continue
      want = set(searchable[np.argsort(-bm[n, j, searchable], kind="stable")[:4]])
      got = set(idx[n, j][idx[n, j] >= 0]) - {0, j, j - 1}
      assert got == want, (n, j)


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95])
def test_oracle_adaptive_budget_equals_the_ideal_selector(target):
  q, k, _ = _qk(t=640, seed=2)
  cfg = C(block_q=32, block_k=32, top_k=24, representative="oracle", coverage=target)
  assert cfg.score == "mass" and cfg.adaptive
  idx = np.asarray(sj.estimate_mask(q, k, cfg).indices)
  bm = np.asarray(dense_block_mass(q, k, block_q=32, block_k=32))
  for n in range(q.shape[1]):
    for j in range(bm.shape[1]):
      rule = sorted({0, j, max(j - 1, 0)})
      searchable = np.setdiff1d(np.arange(j + 1), rule)
      kept = idx[n, j][idx[n, j] >= 0]
      assert set(rule) <= set(kept)
      assert len(set(kept) - set(rule)) == _ideal(bm[n, j], rule, searchable, target), (n, j)
      assert bm[n, j, kept].sum() >= target * bm[n, j].sum() - 1e-5


def test_adaptive_center_spends_budget_where_attention_spreads():
  """Head 0 attends sharply (one planted key block), head 1 diffusely: the adaptive budget keeps few
  blocks for the first and many for the second, and coverage rises with the target."""
  t, h = 1024, 32
  rng = np.random.default_rng(0)
  k = rng.normal(size=(t, 2, h)).astype(np.float32) * 0.1
  q = rng.normal(size=(t, 2, h)).astype(np.float32) * 0.1
  k[300:332, 0] += 3.0 * np.ones(h, np.float32)  # a block every query of head 0 points to
  q[:, 0] += 3.0 * np.ones(h, np.float32)
  q, k = jnp.asarray(q), jnp.asarray(k)
  v = jnp.asarray(rng.normal(size=(t, 2, h)), jnp.float32)
  _, lse = _dense_lse(q, k)
  covs = []
  for target in (0.6, 0.9):
    cfg = C(block_q=32, block_k=32, top_k=16, coverage=target)
    mask = sj.estimate_mask(q, k, cfg)
    counts = np.asarray(mask.counts)[:, -8:]
    assert counts[0].mean() < counts[1].mean() / 2
    _, st = sj.sparse_attention(q, k, v, mask)
    covs.append(float(np.asarray(sj.block_coverage(st.lse, lse, 32))[:, 16:].mean()))
  assert covs[0] < covs[1]


def test_mass_oracle_falls_back_to_xla_on_auto_and_pallas_refuses():
  """The kernel takes mass scores and coverage budgets (equal to the reference: tests/test_kernels.py), but
  not the "oracle" representative with mass scores: "pallas" says so, "auto" runs the reference."""
  q, k, _ = _qk(t=256)
  cfg = C(block_q=32, block_k=32, top_k=2, coverage=0.9, representative="oracle")
  a = sj.estimate_mask(q, k, cfg, backend="auto")
  b = sj.estimate_mask(q, k, cfg, backend="xla")
  assert sj.masks_equal(a, b)
  with pytest.raises(ValueError, match="representative='oracle'"):
    sj.estimate_mask(q, k, cfg, backend="pallas")


@pytest.mark.parametrize("kwargs,match", [
    (dict(coverage=0.0), "coverage"), (dict(coverage=1.5), "coverage"), (dict(coverage=-0.1), "coverage"),
    (dict(coverage=True), "coverage"), (dict(coverage="0.9"), "coverage"), (dict(score="lse"), "score"),
])
def test_adaptive_config_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    C(**kwargs)


def test_adaptive_config_accepts_numpy_and_one():
  assert C(coverage=np.float32(0.5)).coverage == 0.5
  assert C(coverage=1).coverage == 1.0 and C(coverage=1).score == "mass"


def test_score_and_coverage_must_agree_and_faithful_preset():
  with pytest.raises(ValueError, match="needs score='mass'"):
    C(coverage=0.9, score="max")
  assert C().score == "max" and C().coverage is None and C().top_k == 16  # the paper's setting
  f = C.faithful()
  assert (f.top_k, f.coverage, f.score) == (128, 0.95, "mass") and f.adaptive
  assert C.faithful(top_k=64).top_k == 64


def test_faithful_shares_the_search_where_the_model_runs_three_rounds():
  """Through the model: faithful()'s search_share="auto" runs search_share=8 on a call of 256 tokens at
  8-token blocks and cap 4 (32 key blocks: 3 rounds); each pruned layer's mask records the number that ran
  and equals the explicit setting's (below 3 rounds: test_exact_trace_round_trips_and_plots_coverage)."""
  cfg = tiny_config()
  params = init_params(cfg, seed=2, scale=0.3)
  auto = C.faithful(block_q=8, block_k=8, top_k=4)
  ids = _tokens(1, 256, seed=3)
  got = forward(cfg, params, ids, attention=auto).trace
  want = forward(cfg, params, ids, attention=auto.replace(search_share=8)).trace
  pruned = [i for i, l in enumerate(got.layers) if l.mask is not None and l.mask.config is not None]  # global
  assert pruned and all(got.layers[i].mask.config.search_share == 8 for i in pruned)
  assert all(sj.masks_equal(got.layers[i].mask, want.layers[i].mask) for i in pruned)


def test_pruned_start_against_a_brute_force_count():
  from stream_jax.analysis.faithfulness import pruned_start
  for cfg in (C(), C(block_q=32, block_k=64, top_k=4, window_blocks=1, sink_blocks=0)):
    for t in (100, 1215, 1216, 1300, 5000):
      want = t
      for i in range(t):  # the first query whose block has more searchable blocks than top_k
        j = i // cfg.block_q
        last = min((j + 1) * cfg.block_q, t) - 1
        if last // cfg.block_k - cfg.window_blocks + 1 - cfg.sink_blocks > cfg.top_k:
          want = j * cfg.block_q
          break
      assert pruned_start(t, cfg) == want
  assert pruned_start(4096, C()) == 1216  # 64-token blocks, top_k 16: query block 19 is the first pruned


def test_report_summarises_the_pruned_regime_and_coverage():
  from stream_jax.analysis import faithfulness
  cfg = tiny_config()
  params = init_params(cfg, seed=5, scale=0.3)
  x = _tokens(1, 160)
  sc = C(block_q=8, block_k=8, top_k=2, window_blocks=1)
  _run = forward(cfg, params, x, return_hidden=True)
  d, dh = _run.logits, _run.hidden
  _run = forward(cfg, params, x, attention=sc, coverage=True, return_hidden=True)
  s, tr, sh = _run.logits, _run.trace, _run.hidden
  start = faithfulness.pruned_start(160, sc)
  rep = faithfulness.faithfulness_report(d, s, trace=tr, pruned_from=start)
  summ = rep.summary()
  kl = np.asarray(faithfulness.next_token_kl(d, s))[0]
  assert summ["kl_pruned"] == pytest.approx(float(kl[start:].mean()), rel=1e-5)
  assert np.abs(kl[:start]).max() < 1e-6  # before the regime the sparse model is dense
  assert 0 < summ["coverage_pruned"] < 1
  assert "coverage" in faithfulness.format_report(rep)


def test_exact_trace_round_trips_and_plots_coverage(tmp_path):
  from stream_jax import plots
  from stream_jax.analysis.faithfulness import kept_fractions
  from stream_jax.trace_io import load_trace, save_trace
  cfg = tiny_config()
  params = init_params(cfg, seed=1, scale=0.3)
  sc = C.faithful(block_q=8, block_k=8, top_k=4)
  tr = forward(cfg, params, _tokens(1, 120), attention=sc, output="exact").trace
  save_trace(tmp_path / "t", tr)
  back = load_trace(tmp_path / "t")
  assert [l.mode for l in back.layers] == [l.mode for l in tr.layers]
  assert back.layers[5].mask.config == sc.for_length(120)  # search_share "auto" resolved: what ran
  for a, b in zip(jax.tree_util.tree_leaves(tr), jax.tree_util.tree_leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert back.layers[5].coverage is not None
  # exact layers count as estimated masks in the kept fractions
  assert float(kept_fractions(tr).stream) == pytest.approx(float(np.mean(tr.layers[5].kept_fraction())))
  assert float(kept_fractions(tr).stream) < 1.0
  assert (tmp_path / "c.png").exists() is False
  plots.save(plots.plot_coverage(tr, start_block=2), tmp_path / "c.png")
  assert (tmp_path / "c.png").stat().st_size > 0
  with pytest.raises(ValueError, match="start_block"):
    plots.plot_coverage(tr, start_block=99)
  sparse = forward(cfg, params, _tokens(1, 120), attention=sc).trace
  with pytest.raises(ValueError, match="no coverage"):
    plots.plot_coverage(sparse)


def test_replace_rederives_the_score_when_coverage_changes():
  a = C().replace(coverage=0.9)
  assert a.score == "mass" and a.coverage == 0.9
  b = a.replace(coverage=None)
  assert b.score == "max" and not b.adaptive
  assert a.replace(coverage=None, score="mass").score == "mass"
