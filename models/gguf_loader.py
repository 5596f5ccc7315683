"""GGUF (llama.cpp) checkpoints -> GemmaConfig + Flax params (Gemma 2/3, Llama, Qwen2, Qwen3).

What llama.cpp's converter changes and this loader undoes, or fills in:
- Gemma: every `*norm.weight` is stored as 1 + w (llama.cpp folds Gemma's `(1 + w)` into the weight):
  subtract 1 in f32 (Llama/Qwen norms are stored as they are);
- Llama: the rows of attn_q / attn_k are permuted per head (llama.cpp's llama RoPE rotates interleaved
  pairs, HF's split halves): un-permuted here as transformers' GGUF loader does; Llama-3 RoPE scaling is
  stored as the `rope_freqs` tensor (the per-frequency divisors), not in metadata: its parameters are
  recovered and checked against it; Qwen2/Qwen3 use NEOX RoPE and are stored unpermuted;
- `ffn_norm` is Gemma's pre_feedforward_layernorm but Llama/Qwen's post_attention_layernorm (HF names);
  `output.weight`, when present, is the untied lm_head;
- GGUF lists dims in reverse (ggml `ne` order); the dequantized numpy arrays already come out in HF
  layout ([out, in]), so names are mapped and shapes checked against the config;
- the file has no local RoPE base (10k), no layer pattern (Gemma 3: global iff (i + 1) % 6 == 0, Gemma 2:
  alternating from local) and no attention scale (query_pre_attn_scalar: head_dim, except the 27B models
  where it is D / N, as llama.cpp hard-codes): these come from the matching preset or those rules.
Quantized tensors (Q4_K, Q5_0, Q6_K, Q8_0, ...) are dequantized with `gguf.quants` to f32, then cast.
"""

from __future__ import annotations

import os
import re
import struct
from typing import Optional

import numpy as np

from stream_jax.models.decoder_config import GemmaConfig, gemma2_layer_kinds, gemma3_layer_kinds, match_preset

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHS = ("gemma3", "gemma2", "llama", "qwen2", "qwen3")
REASONING_ARCHS = ("llama", "qwen2", "qwen3")
# Llama-3.1 RoPE scaling (low_freq_factor, high_freq_factor, original context): llama.cpp's converter stores
# only the resulting divisors (rope_freqs); these are the values every Llama 3.x / R1-Distill-Llama uses.
LLAMA3_DEFAULTS = (1.0, 4.0, 8192)

_LAYER = {
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
           "output.weight": "lm_head.weight"}


class GGUFError(ValueError):
  """The file is not a usable GGUF checkpoint of a supported model."""


def gguf_to_hf_name(gguf_name: str, arch: str = "gemma3") -> Optional[str]:
  """GGUF tensor name -> HF name (no prefix); None for tensors the decoder does not use."""
  if gguf_name in _GLOBAL:
    return _GLOBAL[gguf_name]
  m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
  if m and m.group(2) in _LAYER:
    hf = _LAYER[m.group(2)]
    if m.group(2) == "ffn_norm" and arch in REASONING_ARCHS:
      hf = "post_attention_layernorm"  # Llama/Qwen's name of the norm before the MLP
    return f"layers.{m.group(1)}.{hf}.{m.group(3)}"
  return None


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
  """Undo llama.cpp's per-head row permutation of Llama's attn_q / attn_k ([heads * H, ...] rows: HF's
  split-half order <- llama.cpp's interleaved-pair order)."""
  half = w.shape[0] // heads // 2
  return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_file(path: str) -> None:
  """Missing file / wrong magic: fail before the (slow) reader parses anything."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  if os.path.isdir(path):
    raise GGUFError(f"{path} is a directory, not a GGUF file")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != GGUF_MAGIC:
    raise GGUFError(f"{path} is not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")


def open_reader(path: str):
  """gguf.GGUFReader with file checks; a truncated file is reported as such."""
  import gguf  # pylint: disable=import-outside-toplevel
  check_file(path)
  size = os.path.getsize(path)
  try:
    reader = gguf.GGUFReader(path, "r")
  except Exception as e:  # the reader raises struct/numpy errors on cut files
    raise GGUFError(f"{path} could not be parsed as GGUF ({size} bytes; truncated or corrupt): "
                    f"{type(e).__name__}: {e}") from e
  end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
  if end > size:
    raise GGUFError(f"{path} is truncated: tensor data ends at byte {end} but the file has {size} bytes")
  return reader


class _Field:
  def __init__(self, value):
    self.value = value

  def contents(self):
    return self.value


class _Tensor:
  def __init__(self, name, shape):
    self.name, self.shape = name, shape


class MetadataReader:
  """The GGUF header only (metadata and tensor names/shapes), parsed without reading tensor data or the
  tokenizer's string arrays: a fraction of a second where gguf.GGUFReader takes 15+ s on the 270M file.
  Same `fields[key].contents()` / `tensors[i].name, .shape` interface as far as `config_from_reader` needs.
  `keep` names array fields to read in full (string arrays as lists, numeric ones as numpy arrays): the
  tokenizer's vocabulary, for building it without transformers' torch-based GGUF reader.
  """

  _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
              12: "<d"}

  _NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
            11: "<i8", 12: "<f8"}

  def __init__(self, path: str, keep: tuple[str, ...] = ()):
    check_file(path)
    self._keep, self._key = frozenset(keep), None
    with open(path, "rb") as f:
      self._buf = f.read(64 << 20)  # metadata of real files is a few MiB (the tokenizer's vocabulary)
    self._pos = 4
    self.fields, self.tensors = {}, []
    try:
      version, n_tensors, n_kv = self._read("<I"), self._read("<Q"), self._read("<Q")
      if version not in (2, 3):
        raise GGUFError(f"{path}: unsupported GGUF version {version}")
      for _ in range(n_kv):
        key = self._key = self._string()
        self.fields[key] = _Field(self._value(self._read("<I")))
      layout = []
      for _ in range(n_tensors):
        name = self._string()
        dims = [self._read("<Q") for _ in range(self._read("<I"))]
        layout.append((name, dims, self._read("<I"), self._read("<Q")))  # type, offset in the data section
        self.tensors.append(_Tensor(name, dims))
    except (struct.error, UnicodeDecodeError, IndexError) as e:
      raise GGUFError(f"{path} could not be parsed as GGUF ({os.path.getsize(path)} bytes; truncated or "
                      f"corrupt): the header ends early ({type(e).__name__})") from None
    self._check_data_size(path, layout)

  def _check_data_size(self, path: str, layout) -> None:
    """A file cut short (an interrupted download or copy) has a complete header but not all tensor data:
    refuse it now, not after gguf.GGUFReader has parsed the file (15+ s)."""
    import gguf  # pylint: disable=import-outside-toplevel
    align = self.fields.get("general.alignment")
    align = int(align.value) if align is not None and align.value else gguf.GGUF_DEFAULT_ALIGNMENT
    start = -(-self._pos // align) * align
    end = start
    for name, dims, qtype, offset in layout:
      try:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
      except (ValueError, KeyError):
        raise GGUFError(f"{path}: tensor {name!r} has unknown GGML type {qtype} (corrupt file, or a type this "
                        "gguf package does not know)") from None
      end = max(end, start + offset + int(np.prod(dims, dtype=np.int64)) // block * size)
    have = os.path.getsize(path)
    if end > have:
      raise GGUFError(f"{path} is truncated: its tensor data ends at byte {end} but the file has {have} bytes "
                      f"({end - have:,} bytes missing: an interrupted download or copy?)")

  def _read(self, fmt):
    (v,) = struct.unpack_from(fmt, self._buf, self._pos)
    self._pos += struct.calcsize(fmt)
    return v

  def _string(self):
    n = self._read("<Q")
    if self._pos + n > len(self._buf):
      raise IndexError("string past the end")
    s = self._buf[self._pos:self._pos + n].decode("utf-8")
    self._pos += n
    return s

  def _value(self, vtype):
    if vtype == 8:
      return self._string()
    if vtype == 9:
      etype, n = self._read("<I"), self._read("<Q")
      if self._key in self._keep:
        return self._array(etype, n)
      if etype == 8:  # string arrays (the vocabulary): skipped, not needed for the config
        for _ in range(n):
          self._pos += 8 + struct.unpack_from("<Q", self._buf, self._pos)[0]
        if self._pos > len(self._buf):
          raise IndexError("array past the end")
        return None
      if etype in self._SCALARS:
        size = struct.calcsize(self._SCALARS[etype])
        if n > (1 << 16):  # big numeric arrays (token scores, types): skipped
          self._pos += size * n
          return None
      return [self._value(etype) for _ in range(n)]
    if vtype not in self._SCALARS:
      raise GGUFError(f"unknown GGUF value type {vtype}")
    return self._read(self._SCALARS[vtype])

  def _array(self, etype, n):
    if etype == 8:
      return [self._string() for _ in range(n)]
    if etype not in self._NUMPY:
      return [self._value(etype) for _ in range(n)]
    dtype = np.dtype(self._NUMPY[etype])
    if self._pos + dtype.itemsize * n > len(self._buf):
      raise IndexError("array past the end")
    out = np.frombuffer(self._buf, dtype, n, self._pos).copy()
    self._pos += dtype.itemsize * n
    return out


def _field(reader, key, default=None):
  f = reader.fields.get(key)
  if f is None:
    return default
  v = f.contents()
  return v


def _shape_fields(get) -> tuple[int, int, int, int, int]:
  """(layers, D, N, K, H) from the architecture's metadata (K may be stored per layer: the first)."""
  layers = int(get("block_count"))
  d = int(get("embedding_length"))
  n = int(get("attention.head_count"))
  kv = get("attention.head_count_kv", n)
  kv = int(kv[0] if isinstance(kv, list) else kv)
  return layers, d, n, kv, int(get("attention.key_length", d // n))


def _embedding_tensor(reader, path: str):
  emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  if emb is None:
    raise GGUFError(f"{path}: tensor token_embd.weight is missing")
  return emb


def config_from_reader(reader, path: str = "") -> GemmaConfig:
  """Architecture from GGUF metadata; what the file lacks from the matching preset / llama.cpp rules."""
  arch = _field(reader, "general.architecture")
  if arch not in SUPPORTED_ARCHS:
    raise GGUFError(f"unsupported architecture {arch!r} in {path or 'GGUF file'} "
                    f"(supported: {', '.join(SUPPORTED_ARCHS)})")

  def get(key, default=None, required=True):
    v = _field(reader, f"{arch}.{key}", default)
    if v is None and required and default is None:
      raise GGUFError(f"{path}: metadata key {arch}.{key} is missing")
    return v

  if arch in REASONING_ARCHS:
    return _reasoning_config(reader, arch, get, path)
  layers, d, n, kv, h = _shape_fields(get)
  emb = _embedding_tensor(reader, path)
  vocab = int(emb.shape[-1])  # ggml order: [D, V]
  preset = match_preset(arch, layers, d)
  if preset is not None:
    qscale = preset.query_pre_attn_scalar
  else:  # llama.cpp: 27B models scale by D / N, the others by head_dim
    qscale = d // n if ((arch == "gemma3" and layers == 62) or (arch == "gemma2" and layers == 46)) else h
  eos = _field(reader, "tokenizer.ggml.eos_token_id", 1)
  common = dict(vocab_size=vocab, num_layers=layers, embed_dim=d, hidden_dim=int(get("feed_forward_length")),
                num_heads=n, num_kv_heads=kv, head_dim=h, query_pre_attn_scalar=float(qscale),
                rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
                bos_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 2)), eos_id=int(eos),
                pad_id=int(_field(reader, "tokenizer.ggml.padding_token_id", 0)),
                name=str(_field(reader, "general.name", preset.name if preset else arch)))
  if arch == "gemma3":
    scale_type = get("rope.scaling.type", None, required=False)
    factor = get("rope.scaling.factor", None, required=False)
    if factor is None:
      factor = preset.rope_global_scale if preset is not None else 1.0
    elif scale_type not in (None, "linear", "none"):
      raise GGUFError(f"{path}: unsupported RoPE scaling type {scale_type!r}")
    window = get("attention.sliding_window", None, required=False)
    if window is None:
      window = preset.sliding_window if preset is not None else 1024
    # Newer converters may write the pattern (an int period, or one bool per layer: True = sliding)
    # and the local RoPE base; older files (like the embedded one) have neither.
    pattern = get("attention.sliding_window_pattern", None, required=False)
    if isinstance(pattern, list):
      if len(pattern) != layers:
        raise GGUFError(f"{path}: sliding_window_pattern lists {len(pattern)} layers, expected {layers}")
      kinds = tuple("local" if p else "global" for p in pattern)
    else:
      kinds = gemma3_layer_kinds(layers, int(pattern) if pattern else 6)
    local_base = float(get("rope.freq_base_swa", 10_000.0))
    return GemmaConfig(family="gemma3", layer_kinds=kinds, sliding_window=int(window),
                       rope_local_base=local_base, rope_global_base=float(get("rope.freq_base", 1e6)),
                       rope_global_scale=float(factor), use_qk_norm=True, **common)
  return GemmaConfig(family="gemma2", layer_kinds=gemma2_layer_kinds(layers),
                     sliding_window=int(get("attention.sliding_window", 4096)),
                     rope_local_base=float(get("rope.freq_base", 1e4)),
                     rope_global_base=float(get("rope.freq_base", 1e4)),
                     attn_softcap=float(get("attn_logit_softcapping", 50.0)),
                     final_softcap=float(get("final_logit_softcapping", 30.0)), use_qk_norm=False, **common)


def _reasoning_config(reader, arch: str, get, path: str) -> GemmaConfig:
  """Llama / Qwen2 / Qwen3 config from GGUF metadata (every layer global, SwiGLU, plain RMSNorm)."""
  from stream_jax.models.decoder_config import reasoning_config  # pylint: disable=import-outside-toplevel
  names = {t.name: t for t in reader.tensors}
  emb = _embedding_tensor(reader, path)
  layers, d, n, kv, h = _shape_fields(get)
  scale_type = get("rope.scaling.type", None, required=False)
  factor = float(get("rope.scaling.factor", 1.0))
  if scale_type not in (None, "none", "linear"):
    raise GGUFError(f"{path}: {arch} metadata {arch}.rope.scaling.type = {scale_type!r} is not supported "
                    "(none, linear, or Llama-3 scaling through the rope_freqs tensor)")
  llama3 = None
  if "rope_freqs.weight" in names:
    if arch != "llama":
      raise GGUFError(f"{path}: {arch} file has a rope_freqs tensor (per-frequency RoPE scaling), which the "
                      f"{arch} port does not implement")
    original = int(get("rope.scaling.original_context_length", LLAMA3_DEFAULTS[2]))
    llama3 = (factor if scale_type is None and factor > 1 else 8.0, LLAMA3_DEFAULTS[0], LLAMA3_DEFAULTS[1],
              original)  # factor checked against the tensor in read_gguf
    factor = 1.0
  ctx = int(get("context_length", 131_072 if arch != "qwen3" else 40_960))
  eos = int(_field(reader, "tokenizer.ggml.eos_token_id", 0))
  bos = _field(reader, "tokenizer.ggml.bos_token_id", eos)
  cfg = reasoning_config(arch, str(_field(reader, "general.name", arch)), layers=layers, d=d,
                   f=int(get("feed_forward_length")), n=n, k=kv, h=h, vocab=int(emb.shape[-1]),
                   theta=float(get("rope.freq_base", 10_000.0)),
                   eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)), ctx=ctx,
                   tie="output.weight" not in names, bos=int(bos), eos=eos, rope_llama3=llama3)
  pad = _field(reader, "tokenizer.ggml.padding_token_id", None)
  return cfg.replace(rope_global_scale=factor, pad_id=int(pad) if pad is not None else eos)


def _check_rope_freqs(config: GemmaConfig, freqs: np.ndarray, path: str) -> GemmaConfig:
  """The Llama-3 scaling whose divisors are the file's rope_freqs (factor = their maximum)."""
  from stream_jax.models.layers import llama3_factors, rope_inv_freq  # pylint: disable=import-outside-toplevel
  freqs = np.asarray(freqs, np.float32).reshape(-1)
  llama3 = (float(freqs.max()),) + config.rope_llama3[1:]
  inv = rope_inv_freq(config.head_dim, config.rope_global_base)
  want = llama3_factors(inv, *llama3)
  if want.shape != freqs.shape or not np.allclose(want, freqs, rtol=1e-4):
    raise GGUFError(f"{path}: llama tensor rope_freqs does not match Llama-3 RoPE scaling with factor "
                    f"{llama3[0]}, low/high_freq_factor {llama3[1]}/{llama3[2]} and original context "
                    f"{llama3[3]}; other rope_freqs are not supported")
  return config.replace(rope_llama3=llama3)


def dequantize(tensor, path: str = "") -> np.ndarray:
  """float32 array in HF layout of one GGUF tensor (any type gguf.quants knows)."""
  import gguf  # pylint: disable=import-outside-toplevel
  qtype = tensor.tensor_type
  try:
    x = gguf.quants.dequantize(np.asarray(tensor.data), qtype)
  except NotImplementedError as e:
    raise GGUFError(f"{path}: tensor {tensor.name!r} has type {qtype.name}, which gguf.quants cannot "
                    f"dequantize") from e
  x = np.asarray(x, dtype=np.float32)
  want = tuple(int(s) for s in reversed(tensor.shape.tolist()))
  if x.size == int(np.prod(want)) and x.shape != want:
    x = x.reshape(want)
  return x


def read_gguf(path: str, dtype, progress: bool = True):
  """(GemmaConfig, {"params": ...}) from a GGUF file, dequantizing tensor by tensor."""
  from stream_jax.models.params import params_from_hf  # pylint: disable=import-outside-toplevel
  reader = open_reader(path)
  config = config_from_reader(reader, path)
  arch = config.family
  by_hf = {}
  for t in reader.tensors:
    name = gguf_to_hf_name(t.name, arch)
    if name is not None:
      by_hf[name] = t
    if t.name == "rope_freqs.weight" and config.rope_llama3 is not None:
      config = _check_rope_freqs(config, dequantize(t, path), path)

  def get(name):
    t = by_hf[name]
    x = dequantize(t, path)
    if config.is_gemma and name.endswith("norm.weight"):
      x = x - np.float32(1.0)  # llama.cpp stores 1 + w
    if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
      x = unpermute_rows(x, config.num_heads)
    elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
      x = unpermute_rows(x, config.num_kv_heads)
    return x

  wrap = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    wrap = lambda it: tqdm(it, desc=f"dequantizing {os.path.basename(path)}", unit="tensor")
  params = params_from_hf(config, get, by_hf.keys(), dtype=dtype, source=path, progress=wrap)
  return config, params
