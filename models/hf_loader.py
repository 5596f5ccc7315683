"""Hugging Face checkpoint directories (`config.json` + `*.safetensors`, sharded or not) -> Flax params.

Handles the name prefixes of the text-only (`model.layers...`) and multimodal Gemma 3 checkpoints
(`language_model.model...`, `model.language_model...`; the vision tower is skipped), tied embeddings
(`lm_head.weight` is ignored when the config ties them, read when it does not: Llama, Qwen) and the 64
unused embedding rows of Gemma 3 4B+. Tensors are
read one at a time (safetensors memory-maps the shards), so peak host memory is about one tensor.
"""

from __future__ import annotations

import glob
import json
import os
import struct

from stream_jax.models.decoder_config import GemmaConfig
from stream_jax.models.families import from_hf_config


class SafetensorsError(ValueError):
  """A file is not a readable safetensors file."""


_SKIP = ("vision_tower", "multi_modal_projector", "vision_model", "embed_vision", "audio")


def decoder_name(name: str):
  """Checkpoint name -> decoder name without prefix (`layers.3.mlp.up_proj.weight`), None to skip.

  `lm_head.weight` keeps its name: untied configs (Llama, Qwen) read it, tied ones ignore it."""
  if any(s in name for s in _SKIP):
    return None
  if name.endswith("lm_head.weight"):
    return "lm_head.weight"
  name = name.replace("language_model.", "")
  if name.startswith("model."):
    name = name[len("model."):]
  return name


def check_safetensors(path: str) -> dict:
  """Parse the header; raise on a non-safetensors or truncated file. Returns the header dict."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise SafetensorsError(f"{path} is not a safetensors file ({size} bytes, no header)")
    (n,) = struct.unpack("<Q", raw)
    if n > min(size - 8, 100 << 20):
      raise SafetensorsError(f"{path} is not a safetensors file (header length {n} does not fit a "
                             f"{size}-byte file)")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise SafetensorsError(f"{path} is not a safetensors file (header is not JSON)") from e
  if not isinstance(header, dict):
    raise SafetensorsError(f"{path} is not a safetensors file (header is not a JSON object)")
  end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
  if 8 + n + end > size:
    raise SafetensorsError(f"{path} is truncated: its header describes {8 + n + end} bytes, the file has "
                           f"{size}")
  return header


def read_config(directory: str) -> GemmaConfig:
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json in {directory}")
  try:
    with open(path, encoding="utf-8") as f:
      hf = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e}); is the file complete?") from e
  if not isinstance(hf, dict):
    raise ValueError(f"{path} must hold a JSON object (a Hugging Face model config), got {type(hf).__name__}")
  try:
    return from_hf_config(hf)
  except KeyError as e:
    raise ValueError(f"{path} is incomplete: the key {e.args[0]!r} is missing") from e
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: {e}") from e


def shard_files(directory: str) -> list[str]:
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    files = [os.path.join(directory, x) for x in files]
    missing = [x for x in files if not os.path.exists(x)]
    if missing:
      raise FileNotFoundError(f"shards listed in {index} are missing: {missing}")
    return files
  files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"no *.safetensors files in {directory}")
  return files


def read_hf(directory: str, dtype, progress: bool = True):
  """(GemmaConfig, {"params": ...}) from an HF directory."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  from stream_jax.models.params import params_from_hf  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"Hugging Face checkpoint directory not found: {directory}")
  config = read_config(directory)
  where: dict[str, tuple[str, str]] = {}
  for path in shard_files(directory):
    for key in check_safetensors(path):
      if key == "__metadata__":
        continue
      name = decoder_name(key)
      if name is not None:
        where[name] = (path, key)
  handles = {}

  def get(name):
    path, key = where[name]
    if path not in handles:
      handles[path] = safe_open(path, framework="flax")
    return handles[path].get_tensor(key)

  wrap = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    wrap = lambda it: tqdm(it, desc=f"loading {os.path.basename(os.path.normpath(directory))}",
                           unit="tensor")
  params = params_from_hf(config, get, where.keys(), dtype=dtype, source=directory, progress=wrap)
  return config, params
