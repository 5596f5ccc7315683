"""Llama / Qwen2 / Qwen3 through the shared decoder: tiny random transformers models saved as HF directories
(and as GGUF files), loaded by our loaders, logits compared with transformers' PyTorch forward in f32; the
Stream path keeping every block equals dense; bad configs name the family and the field."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from stream_jax import StreamConfig
from stream_jax.models import REASONING_PRESETS as PRESETS, forward, from_hf_config, get_config, init_params, load_model

torch = pytest.importorskip("torch", reason="torch (the numerics reference) is not installed")
transformers = pytest.importorskip("transformers")

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=256)
FAMILIES = {
    # Llama with Llama-3 RoPE scaling whose three frequency bands all occur at head_dim 8, untied lm_head.
    "llama": dict(cls="LlamaForCausalLM", cfg="LlamaConfig", tie_word_embeddings=False, rope_theta=10_000.0,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=64)),
    # Qwen2: q/k/v biases, untied.
    "qwen2": dict(cls="Qwen2ForCausalLM", cfg="Qwen2Config", tie_word_embeddings=False, rope_theta=1e6),
    # Qwen3: QK-norm, explicit head_dim != D / N, tied embeddings.
    "qwen3": dict(cls="Qwen3ForCausalLM", cfg="Qwen3Config", tie_word_embeddings=True, head_dim=16,
                  rope_theta=1e6),
}


def tiny_hf_model(family: str, seed: int = 0):
  spec = dict(FAMILIES[family])
  cls, cfg_cls = getattr(transformers, spec.pop("cls")), getattr(transformers, spec.pop("cfg"))
  rope = dict(rope_type="default", rope_theta=spec.pop("rope_theta"))
  rope.update(spec.pop("rope_scaling", {}))
  cfg = cfg_cls(**COMMON, **spec, rope_parameters=rope, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  torch.manual_seed(seed)
  model = cls(cfg).eval().float()
  with torch.no_grad():  # checkpoints are not at init: random norms and biases too
    for name, p in model.named_parameters():
      p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
  return model


def reference_logits(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(ids[None], dtype=torch.long)).logits[0].float().numpy()


def token_ids(t: int = 40, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(3, VOCAB, size=t).astype(np.int32)


def rel_err(got, want) -> float:
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_dir(request, tmp_path_factory):
  family = request.param
  model = tiny_hf_model(family)
  path = tmp_path_factory.mktemp(f"tiny-{family}")
  model.save_pretrained(path)
  return family, str(path), model


def test_hf_directory_matches_transformers(hf_dir):
  family, path, model = hf_dir
  loaded = load_model(path, jnp.float32, progress=False, tokenizer=False)
  c = loaded.config
  assert c.family == family and c.num_layers == 3 and set(c.layer_kinds) == {"global"}
  assert c.attn_scale == pytest.approx(c.head_dim ** -0.5)
  assert c.head_dim == (16 if family == "qwen3" else 8)
  assert c.qkv_bias == (family == "qwen2") and c.use_qk_norm == (family == "qwen3")
  assert c.tie_embeddings == (family == "qwen3")
  assert (c.rope_llama3 is not None) == (family == "llama")
  ids = token_ids()
  want = reference_logits(model, ids)
  got = forward(loaded, loaded.params, ids).logits[0]
  err = rel_err(got, want)
  print(f"{family}: HF safetensors vs transformers, max relative logit error {err:.2e}")
  assert err <= 1e-4
  np.testing.assert_array_equal(np.asarray(got).argmax(-1), want.argmax(-1))


def test_stream_keeping_everything_equals_dense(hf_dir):
  family, path, _ = hf_dir
  loaded = load_model(path, jnp.float32, progress=False, tokenizer=False)
  x = jnp.asarray(np.stack([token_ids(90, 1), token_ids(90, 2)]))
  dense = forward(loaded, loaded.params, x).logits
  keep_all = StreamConfig(block_q=16, block_k=16, top_k=8)  # nK = 6 <= top_k: every block is kept
  _run = forward(loaded, loaded.params, x, attention=keep_all)
  sparse, trace = _run.logits, _run.trace
  np.testing.assert_allclose(np.asarray(sparse), np.asarray(dense), atol=1e-5, rtol=1e-5)
  assert len(trace) == 3 and all(lt.mode == "stream" for lt in trace.layers)
  assert float(trace.kept_fraction(None)) == pytest.approx(1.0)
  _run = forward(loaded, loaded.params, x, attention=StreamConfig(
      block_q=16, block_k=16, top_k=1, window_blocks=1, sink_blocks=0))
  pruned, ptrace = _run.logits, _run.trace
  assert float(ptrace.kept_fraction("global")) < 0.6
  assert np.abs(np.asarray(pruned) - np.asarray(dense)).max() > 1e-4


def test_greedy_generation_matches_transformers(hf_dir):
  """The KV-cache path (biases, QK-norm, Llama-3 RoPE at positions past the prompt) agrees with greedy
  decoding by transformers' forward."""
  from stream_jax.models import generate
  family, path, model = hf_dir
  loaded = load_model(path, jnp.float32, progress=False, tokenizer=False)
  ids = token_ids(30, 4)
  got = generate(loaded, loaded.params, ids, max_new_tokens=8, stop_ids=())
  seq = ids.tolist()
  for _ in range(8):  # greedy by hand: transformers' generate would stop at (or suppress) EOS
    seq.append(int(reference_logits(model, np.asarray(seq))[-1].argmax()))
  want = np.asarray(seq[30:])
  np.testing.assert_array_equal(np.asarray(got.ids).reshape(-1), want)


def test_bfloat16_close_to_float32(hf_dir):
  """bf16 parameters run (norm scales stay f32, Llama/Qwen norms scale in the activation dtype) and stay
  near the f32 logits."""
  family, path, _ = hf_dir
  f32 = load_model(path, jnp.float32, progress=False, tokenizer=False)
  b16 = f32.astype(jnp.bfloat16)
  ids = token_ids(24, 5)
  a = np.asarray(forward(f32, f32.params, ids).logits)
  b = np.asarray(forward(b16, b16.params, ids).logits)
  assert rel_err(b, a) < 0.05, family


@pytest.mark.parametrize("name", [n for n in PRESETS if not n.startswith("gemma")])
def test_presets_init_shapes(name):
  c = PRESETS[name]
  assert not c.norm_offset and not c.post_norms and not c.embed_scale and c.activation == "silu"
  assert set(c.layer_kinds) == {"global"} and c.attn_scale == pytest.approx(c.head_dim ** -0.5)
  assert c.qkv_bias == (c.family == "qwen2") and c.use_qk_norm == (c.family == "qwen3")
  hash(c)


def test_presets_param_counts():
  """The published sizes (billions), from the shapes alone."""
  want = {"r1-distill-qwen-1.5b": 1.78, "r1-distill-qwen-7b": 7.62, "r1-distill-qwen-14b": 14.77,
          "r1-distill-llama-8b": 8.03, "qwen3-0.6b": 0.60, "qwen3-1.7b": 1.72, "qwen3-4b": 4.02,
          "qwen3-8b": 8.19, "qwen3-14b": 14.77}
  for name, b in want.items():
    assert PRESETS[name].num_params() / 1e9 == pytest.approx(b, abs=0.01), name


def test_tiny_random_params_run():
  c = PRESETS["qwen3-0.6b"].replace(vocab_size=VOCAB, num_layers=2, embed_dim=32, hidden_dim=64, num_heads=4,
                                    num_kv_heads=2, head_dim=16, layer_kinds=("global",) * 2)
  logits = forward(c, init_params(c, seed=0), token_ids(20)).logits[0]
  assert logits.shape == (20, VOCAB) and np.isfinite(np.asarray(logits)).all()


# config.json of the published checkpoints (transformers 4.x style: rope_theta / rope_scaling, torch_dtype).
R1_QWEN_1_5B = dict(architectures=["Qwen2ForCausalLM"], attention_dropout=0.0, bos_token_id=151643,
                    eos_token_id=151643, hidden_act="silu", hidden_size=1536, initializer_range=0.02,
                    intermediate_size=8960, max_position_embeddings=131072, max_window_layers=21,
                    model_type="qwen2", num_attention_heads=12, num_hidden_layers=28, num_key_value_heads=2,
                    rms_norm_eps=1e-06, rope_theta=10000, sliding_window=4096, tie_word_embeddings=False,
                    torch_dtype="bfloat16", transformers_version="4.44.0", use_cache=True, use_mrope=False,
                    use_sliding_window=False, vocab_size=151936)
R1_LLAMA_8B = dict(architectures=["LlamaForCausalLM"], attention_bias=False, attention_dropout=0.0,
                   bos_token_id=128000, eos_token_id=128001, hidden_act="silu", hidden_size=4096,
                   initializer_range=0.02, intermediate_size=14336, max_position_embeddings=131072,
                   mlp_bias=False, model_type="llama", num_attention_heads=32, num_hidden_layers=32,
                   num_key_value_heads=8, pretraining_tp=1, rms_norm_eps=1e-05,
                   rope_scaling=dict(factor=8.0, high_freq_factor=4.0, low_freq_factor=1.0,
                                     original_max_position_embeddings=8192, rope_type="llama3"),
                   rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16",
                   transformers_version="4.43.0.dev0", use_cache=True, vocab_size=128256)
QWEN3_0_6B = dict(architectures=["Qwen3ForCausalLM"], attention_bias=False, attention_dropout=0.0,
                  bos_token_id=151643, eos_token_id=151645, head_dim=128, hidden_act="silu", hidden_size=1024,
                  initializer_range=0.02, intermediate_size=3072, max_position_embeddings=40960,
                  max_window_layers=28, model_type="qwen3", num_attention_heads=16, num_hidden_layers=28,
                  num_key_value_heads=8, rms_norm_eps=1e-06, rope_scaling=None, rope_theta=1000000,
                  sliding_window=None, tie_word_embeddings=True, torch_dtype="bfloat16",
                  transformers_version="4.51.0", use_cache=True, use_sliding_window=False, vocab_size=151936)


@pytest.mark.parametrize("hf,preset", [(R1_QWEN_1_5B, "r1-distill-qwen-1.5b"), (R1_LLAMA_8B, "r1-distill-llama-8b"),
                                       (QWEN3_0_6B, "qwen3-0.6b")])
def test_published_configs_give_the_presets(hf, preset):
  got = from_hf_config(hf)
  want = get_config(preset)
  skip = {"name", "bos_id", "pad_id"}  # token ids: the tokenizer's business; name: informative
  diff = {f: (getattr(got, f), getattr(want, f)) for f in want.__dataclass_fields__
          if f not in skip and getattr(got, f) != getattr(want, f)}
  assert not diff, diff


def _hf_dict(family, **changes):
  model = tiny_hf_model(family)
  d = model.config.to_dict()
  d.update(changes)
  return d


@pytest.mark.parametrize("family,field,value", [
    ("qwen2", "use_mystery_feature", True),
    ("llama", "hidden_act", "gelu"),
    ("llama", "attention_bias", True),
    ("qwen3", "rope_parameters", {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}),
])
def test_unsupported_fields_name_family_and_field(family, field, value):
  with pytest.raises(ValueError) as e:
    from_hf_config(_hf_dict(family, **{field: value}))
  assert family in str(e.value) and field in str(e.value)


def test_unsupported_family_is_named(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(dict(model_type="mistral", hidden_size=8)))
  with pytest.raises(ValueError, match="mistral"):
    load_model(str(tmp_path), progress=False, tokenizer=False)
  assert os.path.exists(tmp_path / "config.json")


# ------------------------------------------------------------------------------------------------- GGUF

_GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute): HF split-half rows -> interleaved."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, family: str, path: str) -> str:
  """The tiny model as an f32 GGUF file laid out the way llama.cpp's converter writes it."""
  import gguf
  c = model.config
  h = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
  w = gguf.GGUFWriter(path, family)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_key_length(h)
  w.add_value_length(h)
  w.add_rope_dimension_count(h)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
  tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
  if not c.tie_word_embeddings:
    tensors["output.weight"] = sd["lm_head.weight"]
  if family == "llama":  # Llama-3 scaling: the per-frequency divisors, from transformers' own RoPE
    scaled = model.model.rotary_emb.inv_freq.float().numpy()
    plain = 1.0 / (c.rope_parameters["rope_theta"] ** (np.arange(0, h, 2, dtype=np.float32) / h))
    tensors["rope_freqs.weight"] = (plain / scaled).astype(np.float32)
    w.add_rope_scaling_orig_ctx_len(c.rope_parameters["original_max_position_embeddings"])
  for name, x in sd.items():
    parts = name.split(".")
    if parts[:2] != ["model", "layers"]:
      continue
    i, rest, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
    if family == "llama" and rest == "self_attn.q_proj":
      x = llama_cpp_permute(x, c.num_attention_heads)
    elif family == "llama" and rest == "self_attn.k_proj":
      x = llama_cpp_permute(x, c.num_key_value_heads)
    tensors[f"blk.{i}.{_GGUF_LAYER[rest]}.{kind}"] = x
  for name, x in tensors.items():
    w.add_tensor(name, np.ascontiguousarray(x, dtype=np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
  out = {}
  for family in sorted(FAMILIES):
    model = tiny_hf_model(family)
    out[family] = (write_gguf(model, family, str(tmp_path_factory.mktemp("gguf") / f"tiny-{family}.gguf")),
                   model)
  return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gguf_matches_transformers(family, gguf_files):
  path, model = gguf_files[family]
  loaded = load_model(path, jnp.float32, use_cache=False, progress=False, tokenizer=False)
  c = loaded.config
  assert c.family == family and c.tie_embeddings == (family == "qwen3")
  assert c.head_dim == (16 if family == "qwen3" else 8) and c.qkv_bias == (family == "qwen2")
  if family == "llama":
    assert c.rope_llama3 == (8.0, 1.0, 4.0, 64)
  ids = token_ids()
  want = reference_logits(model, ids)
  got = forward(loaded, loaded.params, ids).logits[0]
  err = rel_err(got, want)
  print(f"{family}: GGUF vs transformers (PyTorch model), max relative logit error {err:.2e}")
  assert err <= 1e-4
  np.testing.assert_array_equal(np.asarray(got).argmax(-1), want.argmax(-1))


def test_gguf_permutation_agrees_with_transformers_gguf_loader(gguf_files):
  """transformers' GGUF tensor processor for llama (which un-permutes Q/K rows) reads our llama file's q/k
  back to the HF weights: the file follows llama.cpp's layout, so the round trip cannot hide a permute bug
  shared by our writer and loader."""
  import gguf
  from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
  path, model = gguf_files["llama"]
  proc = LlamaTensorProcessor(config=dict(num_attention_heads=4, num_key_value_heads=2))
  sd = model.state_dict()
  tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
  for gname, hname in (("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
                       ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight")):
    raw = np.asarray(tensors[gname].data, np.float32).reshape(sd[hname].shape)
    assert not np.array_equal(raw, sd[hname].numpy())  # stored permuted
    np.testing.assert_array_equal(proc.process(raw, gname).weights, sd[hname].numpy())


def test_gguf_bad_rope_freqs_is_named(tmp_path):
  import gguf
  model = tiny_hf_model("llama")
  path = write_gguf(model, "llama", str(tmp_path / "a.gguf"))
  reader = gguf.GGUFReader(path, "r+")
  t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
  t.data[:] = np.linspace(1, 3, t.data.size)  # not a Llama-3 schedule
  del reader
  with pytest.raises(ValueError, match="llama.*rope_freqs"):
    load_model(path, jnp.float32, use_cache=False, progress=False, tokenizer=False)


# ------------------------------------------------------------------- tokenizer, <think> span, anchors CLI

COT = ("<|im_start|>user\nWhat is 17 times 24?<|im_end|>\n<|im_start|>assistant\n<think>\n"
       "The problem asks for the product of 17 and 24. I will split 24 into 20 and 4. "
       "First, 17 times 20 is 340. Next, 17 times 4 is 68. Adding them gives 340 plus 68, which is 408. "
       "Wait, let me double check that with another split. 24 times 17 is 24 times 10 plus 24 times 7. "
       "That is 240 plus 168, which is 408 again. Both ways agree, so the product is 408. "
       "I am confident in this result now.\n</think>\nThe answer is 408.<|im_end|>")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


def tiny_tokenizer(text: str, vocab: int):
  """A byte-level BPE tokenizer (Qwen's kind) trained on `text`, with Qwen-style special tokens and a chat
  template (offline: no checkpoint's tokenizer is downloaded)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator([text] * 4, trainer)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                              pad_token="<|endoftext|>", additional_special_tokens=SPECIALS[1:])
  fast.chat_template = TEMPLATE
  return fast


@pytest.fixture(scope="module")
def qwen2_with_tokenizer(tmp_path_factory):
  tok = tiny_tokenizer(COT, 320)
  cfg = transformers.Qwen2Config(**dict(COMMON, vocab_size=320, max_position_embeddings=4096),
                                 tie_word_embeddings=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  torch.manual_seed(3)
  model = transformers.Qwen2ForCausalLM(cfg).eval()
  path = tmp_path_factory.mktemp("tiny-qwen2-tok")
  model.save_pretrained(path)
  tok.save_pretrained(path)
  return str(path)


def test_think_span_and_chat_template(qwen2_with_tokenizer):
  from stream_jax.models.tokenizer import chat_prompt, think_span
  m = load_model(qwen2_with_tokenizer, jnp.float32, progress=False)
  ids = m.encode(COT)
  a, b = think_span(m.tokenizer, ids)
  inner = m.decode(ids[a:b])
  assert inner.strip().startswith("The problem asks") and inner.strip().endswith("result now.")
  assert think_span(m.tokenizer, ids[:b - 5]) == (a, b - 5)  # cut-off chain: up to the end
  assert think_span(m.tokenizer, m.encode("no tags here")) == (0, len(m.encode("no tags here")))
  prompt = chat_prompt(m.tokenizer, [{"role": "user", "content": "What is 17 times 24?"}])
  assert COT.startswith(prompt)
  p_ids = m.encode(prompt)  # the template opens the chain: the span starts right after its <think>
  start, end = think_span(m.tokenizer, p_ids)
  assert p_ids[start - 1] == m.tokenizer.convert_tokens_to_ids("<think>") and end == len(p_ids)


def test_cli_anchors_on_tiny_qwen2(qwen2_with_tokenizer, tmp_path, capsys):
  from stream_jax.cli import main
  cot = tmp_path / "cot.txt"
  cot.write_text(COT)
  rc = main(["anchors", "--model", qwen2_with_tokenizer, "--file", str(cot), "--block-q", "16",
             "--block-k", "16", "--top-k", "2", "--out", str(tmp_path / "anchors")])
  cap = capsys.readouterr()
  out = cap.out
  assert rc == 0, out + cap.err
  assert "receiver heads" in out and (tmp_path / "anchors" / "vertical_scores.png").exists()
  report = json.loads(next((tmp_path / "anchors").glob("*.json")).read_text())
  sents = report.get("report", report).get("sentences") or report["sentences"]
  assert sents[0].startswith("The problem asks") and not any("answer is 408" in s for s in sents)


def test_gguf_cache_and_header_peek(gguf_files, tmp_path, monkeypatch):
  """The converted-parameter cache restores the family switches (tuples included); the header-only reader
  gives the same config as the full reader (Llama-3 factor aside: it is read from the rope_freqs data)."""
  from stream_jax.models.load import peek_config
  for family in sorted(FAMILIES):
    path, _ = gguf_files[family]
    first = load_model(path, jnp.float32, progress=False, tokenizer=False, cache_dir=tmp_path / "cache")
    again = load_model(path, jnp.float32, progress=False, tokenizer=False, cache_dir=tmp_path / "cache")
    assert again.config == first.config and hash(again.config) == hash(first.config)
    ids = token_ids(12)
    np.testing.assert_array_equal(np.asarray(forward(again, again.params, ids).logits),
                                  np.asarray(forward(first, first.params, ids).logits))
    assert peek_config(path) == first.config
