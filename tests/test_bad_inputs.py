"""Bad input, as a new user would try it: every case gets a clear error naming what is wrong, never a
silent wrong result (issue 10's table). Fast: tiny random models and hand-made arrays only."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stream_jax as sj
from stream_jax import plots
from stream_jax.analysis import anchors, faithfulness, niah, routes
from stream_jax.models import GemmaConfig, forward, generate, init_params
from stream_jax.models.decoder_config import gemma3_layer_kinds
from stream_jax.models.load import LoadedModel, load_model, peek_config
from stream_jax.trace_io import load_trace, save_trace
from stream_jax.trace import LayerTrace, Trace

CFG = GemmaConfig(family="gemma3", vocab_size=97, num_layers=2, embed_dim=32, hidden_dim=64, num_heads=4,
                  num_kv_heads=2, head_dim=16, query_pre_attn_scalar=16.0, sliding_window=16,
                  layer_kinds=gemma3_layer_kinds(2, 2))
PARAMS = init_params(CFG, seed=0)
IDS = np.arange(1, 40, dtype=np.int32)
Q = jax.random.normal(jax.random.PRNGKey(0), (64, 4, 16))
K = jax.random.normal(jax.random.PRNGKey(1), (64, 2, 16))
SCFG = sj.StreamConfig(block_q=16, block_k=16, top_k=1)


def _mask():
  return sj.estimate_mask(Q, K, SCFG)


def _trace():
  m = _mask()
  _, st = sj.sparse_attention(Q, K, K, m)
  return Trace((LayerTrace(m, st.mass, 0, "global", "stream"),))


def _bad_block_id():
  m = _mask()
  idx = m.indices.at[0, -1, 0].set(m.num_k_blocks + 3)
  return sj.sparse_attention(Q, K, K, type(m)(idx, m.counts, 16, 16, 64, 64, m.config))


def _sentences(spans):
  return anchors.Sentences(text="x" * 300, char_spans=tuple(map(tuple, spans)), tokens=np.asarray(spans, np.int32),
                           texts=tuple(f"s{i}" for i in range(len(spans))))


CASES = {
    # name: (callable, exception, message)
    "forward: id >= vocab": (lambda: forward(CFG, PARAMS, np.array([1, 2, 97])), ValueError, "vocabulary"),
    "forward: negative id": (lambda: forward(CFG, PARAMS, np.array([1, -2, 5])), ValueError, "vocabulary"),
    "forward: float ids": (lambda: forward(CFG, PARAMS, np.array([1.0, 2.7])), TypeError, "integer"),
    "forward: params None": (lambda: forward(CFG, None, IDS), TypeError, "parameter tree"),
    "forward: params {}": (lambda: forward(CFG, {}, IDS), ValueError, "embedder"),
    "forward: dense_layers with dense": (lambda: forward(CFG, PARAMS, IDS, dense_layers=(0,)), ValueError,
                                         "no effect with attention='dense'"),
    "generate: float ids": (lambda: generate(CFG, PARAMS, [2.7, 651.9], max_new_tokens=1), TypeError,
                            "integer"),
    "generate: ragged batch": (lambda: generate(CFG, PARAMS, [[1, 2, 3], [1, 2]], max_new_tokens=1),
                               ValueError, "equal lengths"),
    "generate: id >= vocab": (lambda: generate(CFG, PARAMS, [1, 500], max_new_tokens=1), ValueError,
                              "vocabulary"),
    "load_model(None)": (lambda: load_model(None), TypeError, "name_or_path"),
    "StreamConfig(top_k=True)": (lambda: sj.StreamConfig(top_k=True), ValueError, "top_k must be an integer"),
    "StreamConfig(block_q=2**40)": (lambda: sj.StreamConfig(block_q=2 ** 40), ValueError, "block_q must be <="),
    "StreamConfig(top_k=2**21)": (lambda: sj.StreamConfig(top_k=2 ** 21), ValueError, "top_k must be <="),
    "StreamConfig(block_k=64.0)": (lambda: sj.StreamConfig(block_k=64.0), ValueError, "block_k must be an int"),
    "estimate_mask: NaN q": (lambda: sj.estimate_mask(Q * jnp.nan, K, SCFG), ValueError, "non-finite"),
    "estimate_mask: inf k": (lambda: sj.estimate_mask(Q, K.at[3, 0, 0].set(jnp.inf), SCFG), ValueError,
                             "non-finite"),
    "estimate_mask: scale=inf": (lambda: sj.estimate_mask(Q, K, SCFG, scale=float("inf")), ValueError,
                                 "scale must be a positive finite"),
    "estimate_mask: scale=nan": (lambda: sj.estimate_mask(Q, K, SCFG, scale=float("nan")), ValueError,
                                 "scale"),
    "sparse_attention: block id past the grid": (_bad_block_id, ValueError, "outside"),
    "next_token_kl: shapes differ": (lambda: faithfulness.next_token_kl(jnp.zeros((4, 9)), jnp.zeros((5, 9))),
                                     ValueError, "same shape"),
    "trace_needle_mass: span past T": (lambda: routes.trace_needle_mass(_trace(), np.array([[60, 80]])),
                                       ValueError, "inside the 64 traced tokens"),
    "trace_needle_mass: reversed span": (lambda: routes.trace_needle_mass(_trace(), np.array([[30, 20]])),
                                         ValueError, "non-empty span"),
    "route: span past T": (lambda: routes.route(_trace(), np.array([[70, 75]])), ValueError, "needle_spans"),
    "thought_anchors: spans past T": (
        lambda: anchors.thought_anchors(_trace(), _sentences([[0, 10], [10, 200]])), ValueError,
        "sentence token spans"),
    "describe(None)": (lambda: sj.describe(None), TypeError, "BlockMask"),
    "plot_block_mask(head=99)": (lambda: plots.plot_block_mask(_mask(), head=99), ValueError,
                                 "head must be an integer in"),
    "forward: longer than the context": (lambda: forward(CFG.replace(context_length=32), PARAMS, IDS),
                                         ValueError, r"longer than the model's context: 39 positions.*\[1, 32\]"),
    "generate: prompt + new tokens past the context": (
        lambda: generate(CFG.replace(context_length=42), PARAMS, IDS, max_new_tokens=5), ValueError,
        r"max_new_tokens=5 .* longer than the model's context: 43 positions"),
    "Trace.kept_fraction('bogus')": (lambda: _trace().kept_fraction("bogus"), ValueError,
                                     r"kind must be one of \('global', 'local', None\), got 'bogus'"),
    "Trace.select(mode='sparse')": (lambda: _trace().select(mode="sparse"), ValueError, "mode must be one of"),
    "trace.layers[99]": (lambda: _trace().layers[99], IndexError,
                         r"layer index 99 is out of range: this trace has 1 layers \(valid: 0 to 0"),
    "trace[-2]": (lambda: _trace()[-2], IndexError, "valid: 0 to 0, or -1 to -1"),
    "niah.VARIANTS['bogus']": (lambda: niah.VARIANTS["bogus"], KeyError,
                               r"niah.VARIANTS\['bogus'\]: unknown key; valid keys: 'single_1', .*'multiquery'"),
    "block_coverage(block_q=0)": (lambda: sj.block_coverage(jnp.zeros((2, 8)), jnp.zeros((2, 8)), 0),
                                  ValueError, r"block_q must be an integer .*in \[1, "),
    "encode(None)": (lambda: LoadedModel(CFG, PARAMS, lambda *a, **k: {"input_ids": [1]}, jnp.float32,
                                         "tiny").encode(None), TypeError, "text must be a str .*NoneType"),
    "plot_kurtosis_grid: head out of range": (
        lambda: plots.plot_kurtosis_grid(np.ones((3, 4)), heads=[[1, 7]]), ValueError,
        "receiver head"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_clearly(name):
  fn, exc, match = CASES[name]
  with pytest.raises(exc, match=match):
    fn()


def test_numpy_integers_are_accepted_and_normalised():
  cfg = sj.StreamConfig(block_q=np.int64(16), block_k=np.int32(16), top_k=np.int64(2))
  assert cfg == sj.StreamConfig(block_q=16, block_k=16, top_k=2) and type(cfg.block_q) is int
  assert hash(cfg) == hash(sj.StreamConfig(block_q=16, block_k=16, top_k=2))


def test_nan_logits_never_count_as_agreement():
  d = jax.random.normal(jax.random.PRNGKey(0), (6, 11))
  s = d.at[2].set(jnp.nan)
  rep = faithfulness.faithfulness_report(d, s)
  assert np.isnan(np.asarray(rep.top1)[2]) and np.isnan(np.asarray(rep.top5)[2])
  assert np.isnan(rep.summary()["top1_mean"]) and np.isnan(rep.summary()["kl_mean"])
  np.testing.assert_array_equal(np.asarray(rep.top1)[[0, 1, 3, 4, 5]], 1.0)


def test_checks_skip_traced_values_under_jit():
  """Value checks run on concrete arrays; under jit the same call still compiles (documented)."""
  mask = jax.jit(sj.estimate_mask, static_argnums=2)(Q, K, SCFG)
  out, _ = jax.jit(sj.sparse_attention)(Q, K, K, mask)
  assert np.isfinite(np.asarray(out)).all()
  logits = jax.jit(lambda t: forward(CFG, PARAMS, t))(IDS).logits
  assert logits.shape == (1, len(IDS), 97)  # int[T] is a batch of one


def test_load_trace_checks_layout_and_truncation(tmp_path):
  trace = _trace()
  save_trace(tmp_path / "t", trace)
  meta = json.loads((tmp_path / "t" / "trace.json").read_text())
  meta["layers"][0]["block_q"] = 32
  (tmp_path / "t" / "trace.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="disagree"):
    load_trace(tmp_path / "t")
  (tmp_path / "t" / "trace.json").write_text(json.dumps(meta)[:40])
  with pytest.raises(ValueError, match="unreadable or truncated"):
    load_trace(tmp_path / "t")
  save_trace(tmp_path / "u", trace)
  for f in (tmp_path / "u" / "trace").rglob("*"):
    if f.is_file() and f.stat().st_size > 64:
      f.write_bytes(f.read_bytes()[:20])
  with pytest.raises(ValueError, match="cannot be read"):
    load_trace(tmp_path / "u")


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    ('{"model_type": "gemma3_text", "hidden_size": 640}', "'num_hidden_layers' is missing"),
    ("[1, 2]", "JSON object"),
])
def test_malformed_hf_config_names_the_file(tmp_path, content, match):
  (tmp_path / "config.json").write_text(content)
  with pytest.raises(ValueError, match=match) as e:
    peek_config(str(tmp_path))
  assert "config.json" in str(e.value)


@pytest.mark.parametrize("content,match", [(b"", "empty file"), (b"GGUF\x03\x00\x00\x00\x01", "truncated"),
                                           (b"an essay, not a model", "neither a GGUF")])
def test_empty_truncated_or_foreign_model_files_name_the_file(tmp_path, content, match):
  f = tmp_path / "m.gguf"
  f.write_bytes(content)
  with pytest.raises(ValueError, match=match) as e:
    load_model(str(f))
  assert str(f) in str(e.value)


def test_a_choice_error_still_is_a_key_error_and_a_mapping_lookup():
  assert "multikey_2" in niah.VARIANTS and niah.VARIANTS.get("bogus") is None
  assert dict(niah.VARIANTS)["single_1"] is niah.VARIANTS["single_1"]
  with pytest.raises(KeyError) as e:
    niah.VARIANTS["bogus"]  # pylint: disable=pointless-statement
  assert not str(e.value).startswith('"'), "the message reads as written, not as a quoted key"


def test_trace_layers_stay_a_pytree_tuple():
  trace = _trace()
  doubled = jax.tree_util.tree_map(lambda x: x * 2, trace)
  assert isinstance(doubled.layers, tuple) and len(doubled) == 1
  np.testing.assert_array_equal(doubled[0].mass, trace[0].mass * 2)
  assert jax.tree_util.tree_structure(jax.jit(lambda t: t)(trace)) == jax.tree_util.tree_structure(trace)
  assert trace.layers[-1] is trace.layers[0] and trace.layers[:5] == trace.layers


def _tiny_gguf(path):
  import gguf  # pylint: disable=import-outside-toplevel
  w = gguf.GGUFWriter(str(path), "gemma3")
  w.add_block_count(1)
  w.add_tensor("token_embd.weight", np.zeros((64, 32), np.float32))
  w.add_tensor("output_norm.weight", np.ones(32, np.float32))
  w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


def test_a_truncated_gguf_is_refused_before_the_slow_reader(tmp_path, monkeypatch):
  """A complete header with tensor data cut short (an interrupted download): found from the header alone,
  before gguf.GGUFReader parses the file (15+ s on the embedded model), by load_model and peek_config."""
  import gguf  # pylint: disable=import-outside-toplevel
  path = tmp_path / "m.gguf"
  _tiny_gguf(path)
  data = path.read_bytes()
  from stream_jax.models.gguf_loader import MetadataReader  # pylint: disable=import-outside-toplevel
  MetadataReader(str(path))  # the whole file passes
  path.write_bytes(data[:-100])
  monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: pytest.fail("the slow reader must not run"))
  for fn in (lambda: load_model(str(path), tokenizer=False, progress=False, cache_dir=tmp_path / "cache"), lambda: peek_config(str(path))):
    with pytest.raises(ValueError, match=r"m.gguf is truncated: its tensor data ends at byte \d+ but the file "
                       r"has \d+ bytes \(100 bytes missing"):
      fn()
