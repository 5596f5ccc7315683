"""stream_jax.models: Flax Gemma 2 / Gemma 3 / Llama / Qwen2 / Qwen3 decoders (one module, family switches
in the config) with swappable (dense | Stream) attention, offline checkpoint loaders (GGUF, Hugging Face
safetensors, the embedded Gemma 3 270M), tokenizer and greedy generation.

    from stream_jax import StreamConfig
    from stream_jax.models import load_model, forward
    m = load_model("gemma3-270m")
    run = forward(m, m.params, m.encode("..."), attention=StreamConfig())  # TracedRun
    run.logits, run.trace                # float32[1, T, V]; the Trace (per layer: kept blocks, mass)
"""

try:  # the [models] extra: a clear message instead of a bare ModuleNotFoundError deep in an import chain
  import flax  # noqa: F401  pylint: disable=unused-import
except ModuleNotFoundError as _e:
  from stream_jax.extras import missing_extra
  raise missing_extra(_e, "stream_jax.models") from _e

from stream_jax.models.decoder_config import PRESETS, REASONING_PRESETS, GemmaConfig, get_config
from stream_jax.models.families import from_hf_config
from stream_jax.models.transformer import Gemma, check_dtype
from stream_jax.models.params import ShapeMismatchError, MissingTensorError, init_params
from stream_jax.models.forward import forward, logits_from_hidden
from stream_jax.models.generate import Generation, generate
from stream_jax.models.gguf_loader import GGUFError
from stream_jax.models.hf_loader import SafetensorsError
from stream_jax.models.load import LoadedModel, load_gguf, load_hf, load_model

__all__ = [
    "PRESETS", "REASONING_PRESETS", "GemmaConfig", "from_hf_config", "get_config", "Gemma", "check_dtype", "init_params",
    "ShapeMismatchError", "MissingTensorError", "forward", "logits_from_hidden", "Generation", "generate", "GGUFError",
    "SafetensorsError", "LoadedModel", "load_gguf", "load_hf", "load_model",
]
