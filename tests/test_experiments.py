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
  assert set(res.pair.timings) == {"dense_forward_s", "stream_forward_s"}
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
  with pytest.raises(ex.InputError, match="--depths are percentages"):
    ex.niah_sweep(tiny_model(), [160], SETTINGS, depths=(150,))


def test_demo_and_its_report(tmp_path):
  res = ex.demo(tiny_model(), SETTINGS, length=200, seed=2, max_new_tokens=3)
  _frozen(res)
  assert set(res.answers) == {"dense", "stream"} and set(res.retrieved) == {"dense", "stream"}
  assert res.needle_blocks == res.sample.needle_blocks(16)
  assert res.needle_mass.shape == (6, 4) and res.route.needle_flow.shape == (7,)
  assert "Stream answer:" in res.format()
  out = reports.write_demo(res, tiny_model(), tmp_path / "demo", table="t")
  for name in ("index.html", "route.png", "needle_mass.png", "mask_layer5.png", "report.json"):
    assert (out / name).stat().st_size > 0, name
  assert len(load_trace(out)) == 6
  with pytest.raises(ex.InputError, match="--length must be >= 128"):
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
