"""stream_jax.experiments on a tiny random Gemma 3 with a tiny BPE tokenizer (CPU): every pipeline returns
its frozen result, reads the TracedRun / Generation contract, and writes a restorable report."""

import dataclasses
import functools

import numpy as np
import pytest

import stream_jax as sj
from stream_jax import experiments as ex
from stream_jax.analysis import faithfulness, niah
from stream_jax.experiments import reports
from stream_jax.models import LoadedModel, init_params
from stream_jax.trace import Trace
from stream_jax.trace_io import load_trace
from tiny_models import tiny_bpe, tiny_config

COT = ("<think>We need 17 * 23. First, 17 * 20 = 340. Then 17 * 3 = 51. Adding gives 391. Let me "
       "double-check this. 23 * 17 = 23 * 10 + 23 * 7. That is 230 + 161 = 391. That matches the first way. "
       "So the product is 391. I am confident now.</think> The answer is 391.")
SETTINGS = ex.Settings(sj.StreamConfig(block_q=16, block_k=16, top_k=1), backend="xla")


@functools.lru_cache(maxsize=None)
def tiny_model():
  from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
  tok = tiny_bpe([COT], special=("<bos>", "<unk>", "<eos>"))
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>",
                                 eos_token="<eos>")
  config = tiny_config(vocab_size=len(tok.get_vocab()) + 4, window=32)
  return LoadedModel(config, init_params(config, seed=0), fast, np.float32, "tiny")


@functools.lru_cache(maxsize=None)
def _demo():
  return ex.demo(tiny_model(), SETTINGS, length=200, seed=2, max_new_tokens=3)


def _frozen(result):
  field = dataclasses.fields(result)[0].name
  with pytest.raises(dataclasses.FrozenInstanceError):
    setattr(result, field, None)


def test_needle_blocks_and_value_spans_are_derived_once():
  s = niah.generate_sample(tiny_model().tokenizer, 200, seed=3)
  spans = s.value_spans
  assert spans.shape == (1, 2) and spans.dtype == np.int32
  assert spans.tolist() == [list(n.value_token_span) for n in s.queried_needles]
  a, e = spans[0]
  assert s.needle_blocks(16) == tuple(range(a // 16, (e - 1) // 16 + 1))
  with pytest.raises(ValueError, match="block_k"):
    s.needle_blocks(0)


def test_trace_text_calls_the_faithfulness_functions(monkeypatch):
  calls = []
  real = faithfulness.faithfulness_report_from_hidden
  monkeypatch.setattr(faithfulness, "faithfulness_report_from_hidden",
                      lambda *a, **k: calls.append(k) or real(*a, **k))
  res = ex.trace_text(tiny_model(), COT, SETTINGS, oracle=True)
  _frozen(res)
  assert len(calls) == 1
  assert calls[0]["pruned_from"] == faithfulness.pruned_start(len(res.ids), SETTINGS.config)
  assert isinstance(res.trace, Trace) and len(res.trace) == 6
  assert res.trace.layers[0].mask.indices.ndim == 3  # one row: no batch axis
  assert set(res.pair.timings) == {"dense_forward_s", "stream_forward_s", "metrics_s"}
  summary = res.report.summary()
  assert 0 < summary["kept_stream"] <= 1 and "oracle_recall" in summary and summary["kl_mean"] > -1e-5
  with pytest.raises(ex.InputError, match="empty"):
    ex.trace_text(tiny_model(), "   ", SETTINGS)


def test_niah_sweep_batches_and_records_rows():
  res = ex.niah_sweep(tiny_model(), [160], SETTINGS, samples=2, seed=5, batch_size=2, dense=True, route={},
                      max_new_tokens=2)
  _frozen(res)
  assert len(res.rows) == 2 and [r.seed for r in res.rows] == [5, 6]
  for r in res.rows:
    assert r.needle_mass.shape == (6, 4) and r.route is not None and r.dense_prediction is not None
    assert r.needle_blocks == r.sample.needle_blocks(16)
    assert set(r.to_json()) == {"length", "depth", "seed", "answers", "prediction", "score", "kept_fraction",
                                "needle_mass_per_layer"}
  assert list(res.success_rates()) == [160] and "string_match_all" in res.table()
  assert res.comparison.n_success + res.comparison.n_failure == 2
  one = ex.answer_niah(tiny_model(), [res.rows[0].sample], SETTINGS, max_new_tokens=2)
  assert one[0].prediction == res.rows[0].prediction  # a batch row answers as the prompt alone
  with pytest.raises(ex.InputError, match="depths are percentages"):
    ex.niah_sweep(tiny_model(), [160], SETTINGS, depths=(150,))


def test_demo_and_its_report(tmp_path):
  res = _demo()  # ex.demo(tiny_model(), SETTINGS, length=200, seed=2, max_new_tokens=3), run once a process
  _frozen(res)
  assert set(res.answers) == {"dense", "stream"} and set(res.retrieved) == {"dense", "stream"}
  assert res.needle_blocks == res.sample.needle_blocks(16)
  assert res.needle_mass.shape == (6, 4) and res.route.needle_flow.shape == (7,)
  assert "Stream answer:" in res.format()
  out = reports.write_demo(res, tiny_model(), tmp_path / "demo", table="t")
  for name in ("index.html", "route.png", "needle_mass.png", "mask_layer5.png", "report.json"):
    assert (out / name).stat().st_size > 0, name
  assert len(load_trace(out)) == 6
  manifest = json.loads((out / "viewer" / "manifest.json").read_text())
  assert manifest["compare"]["main_label"] == "Stream (sparse)" and len(res.dense_trace) == 6
  with pytest.raises(ex.InputError, match="length must be >= 128"):
    ex.demo(tiny_model(), SETTINGS, length=100)


def test_anchors_for_text():
  res = ex.anchors_for_text(tiny_model(), COT, SETTINGS, top_heads=4)
  _frozen(res)
  assert len(res.sentences.texts) >= 6 and res.report.importance.shape == (len(res.sentences.texts),)
  assert "receiver heads" in res.format(3)
  with pytest.raises(ex.InputError, match="thought anchors need >= 6"):
    ex.anchors_for_text(tiny_model(), "<think>One sentence only here.</think>", SETTINGS)


def test_niah_sweep_verifies_routes_and_reports_flips(tmp_path, monkeypatch):
  """The causal arm end to end (the random tiny model answers nothing, so every prompt counts as answered
  here: the ablations run, and nothing can flip a string match that always holds)."""
  from stream_jax.experiments import reports
  monkeypatch.setattr(niah, "match_all", lambda pred, answers: 1.0)
  res = ex.niah_sweep(tiny_model(), [160], SETTINGS, samples=2, seed=5, max_new_tokens=2, verify_routes=2)
  c = res.ablation.counts()
  assert c["samples"] == c["answered"] == 2 and c["route_flips"] == c["random_flips"] == 0
  assert c["with_route"] >= 1 and c["everywhere_runs"] == c["with_route"]
  assert all(s.route_heads > 0 and s.needle_blocks for s in res.ablation.tested)
  out = reports.write_niah(res, tiny_model(), tmp_path / "niah", text=res.ablation.format())
  assert (out / "route_ablation.png").exists()
  import json
  rep = json.loads((out / "report.json").read_text())
  assert rep["ablation"]["counts"]["answered"] == 2


# --- the demo's cost and what its report says ---------------------------------------------------------------

import json  # noqa: E402  pylint: disable=wrong-import-position
import re  # noqa: E402  pylint: disable=wrong-import-position

from stream_jax.analysis import routes  # noqa: E402  pylint: disable=wrong-import-position


def _key_rows(html):
  """(raw key, shown name, explanation) of the Key numbers table."""
  return re.findall(r'<tr><th title="([^"]*)">([^<]*)</th><td>[^<]*</td><td class=why>([^<]*)</td></tr>', html)


def test_demo_runs_two_prefills_and_reuses_them(monkeypatch):
  """One dense and one Stream prefill, each answering from its own KV cache and keeping its residual
  stream for the metrics: no separate forward passes (the old demo ran four passes over the prompt)."""
  model = tiny_model()
  calls = []
  for name in ("forward", "generate"):
    real = getattr(model, name)
    monkeypatch.setattr(model, name, lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))
  res = ex.demo(model, SETTINGS, length=200, seed=2, max_new_tokens=3)
  assert calls == ["generate", "generate"]
  assert {"dense_prefill_and_answer_s", "stream_prefill_and_answer_s", "metrics_s"} <= set(res.timings)


def test_demo_dense_needle_mass_is_the_dense_attention():
  """The dense contrast equals the needle's share of the final query block's attention in the dense
  model's own probabilities (dense_impl="capture": T x T per head, fine at 200 tokens)."""
  res = _demo()
  probs = tiny_model().forward(res.sample.ids, attention="dense", dense_impl="capture").probs
  t, bq, bk = res.sample.length, SETTINGS.config.block_q, SETTINGS.config.block_k
  rows = slice((-(-t // bq) - 1) * bq, t)
  cols = np.zeros(t, bool)
  for b in res.needle_blocks:
    cols[b * bk:(b + 1) * bk] = True
  want = np.stack([np.asarray(p[0])[:, rows][:, :, cols].sum((-2, -1)) / (rows.stop - rows.start)
                   for p in probs])
  np.testing.assert_allclose(res.dense_needle_mass, want, atol=1e-4)
  assert want.max() > 0


def test_demo_report_explains_itself(tmp_path):
  res = _demo()
  out = reports.write_demo(res, tiny_model(), tmp_path / "demo", table="t")
  html = (out / "index.html").read_text()
  rep = json.loads((out / "report.json").read_text())
  assert "What this run shows" in html and "sparse: the traced model computes" in html
  assert np.asarray(rep["dense_needle_mass_per_layer_head"]).shape == res.needle_mass.shape
  rows = _key_rows(html)
  seven = {"pruned_from", "kl_pruned", "kl_pruned_p99", "top1_pruned", "top5_pruned", "coverage_pruned",
           "coverage_worst_layer"}
  assert seven <= {k for k, _, _ in rows}, "the tiny demo prunes and traces coverage: all seven are shown"
  for key, name, why in rows:  # every key number has a human name and an explanation
    assert "_" not in name and why.strip(), key
  s = res.report.summary()
  assert f"{100 * s['kept_stream']:.0f}%" in html  # the conclusion quotes this run's numbers
  # captions from the data: which heads keep the needle in the last query block, whether red edges exist
  layer = res.trace.layers[ex.first_global(res.trace)]
  last = np.asarray(layer.mask.indices)[:, -1]
  keep = [h for h in range(last.shape[0]) if np.isin(last[h], res.needle_blocks).any()]
  assert (f"head(s) {', '.join(map(str, keep))} of {last.shape[0]} keep it" if keep
          else "no head keeps it in the last query block") in html
  red = res.route.edge_list(min_weight=1e-3, only_route=True)
  assert (f"Red: the {len(red)} kept edge(s)" in html) == bool(red)
  assert ("No kept edge above the threshold lies on a path from a needle block" in html) == (not red)


def test_exact_trace_report_does_not_headline_what_is_true_by_construction(tmp_path):
  res = ex.trace_text(tiny_model(), COT, SETTINGS, output="exact")
  out = reports.write_trace(res, tiny_model(), tmp_path / "trace")
  html = (out / "index.html").read_text()
  keys = {k for k, _, _ in _key_rows(html)}
  assert not keys & {"kl_mean", "kl_last", "top1_mean", "top1_last", "top5_mean", "resid_err_max"}, keys
  assert "kept_stream" in keys and "exact: the traced model computes dense attention" in html
  assert "by construction" in html
  assert json.loads((out / "report.json").read_text())["faithfulness"]["kl"] is not None  # kept in the JSON


def test_niah_report_claims_no_trace_and_compares_within_lengths(tmp_path):
  res = ex.niah_sweep(tiny_model(), [160], SETTINGS, samples=2, seed=5, max_new_tokens=2)
  assert [g.length for g in res.comparison.groups] == [160]
  out = reports.write_niah(res, tiny_model(), tmp_path / "niah", text=res.comparison.format())
  html = (out / "index.html").read_text()
  assert "load_trace" not in html and "holds no trace" in html
  assert "What this run shows" in html and "160 tokens" in html
  routes_json = json.loads((out / "viewer" / "routes.json").read_text())["samples"]  # every row's route
  assert [r["label"] for r in routes_json] == [f"160 tokens, seed {r.seed}" for r in res.rows]
  assert [r["main"] for r in routes_json] == [i == reports.viewer_row(res) for i in range(len(res.rows))]
  if not res.comparison.comparable:
    assert "nothing comparable" in html and "largest gap" not in html


def test_anchors_lists_every_receiver_head_and_the_ranking_ties(tmp_path):
  res = ex.anchors_for_text(tiny_model(), COT, SETTINGS, top_heads=12)
  heads = np.asarray(res.report.heads)
  assert len(heads) == 12
  text = res.format(3)
  assert re.findall(r"L\d+H\d+", text.splitlines()[0]) == [f"L{l}H{h}" for l, h in heads]
  assert "kurtosis ranking" in text
  out = reports.write_anchors(res, tiny_model(), tmp_path / "anchors", text=text)
  html = (out / "index.html").read_text()
  assert "What this run shows" in html and "near_tied_heads" in html
  rep = json.loads((out / "report.json").read_text())
  assert rep["ranking_ties"]["selected"] == 12
