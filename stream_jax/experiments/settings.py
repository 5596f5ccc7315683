"""What every experiment shares: its settings (`Settings`), the input checks that raise `InputError`
(naming Python parameters, which a front end may word as its own options), the pruning notice, progress
bars and the unembedding passed to jit as an argument."""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

from stream_jax.config import StreamConfig
from stream_jax.trace import Trace


NIAH_MIN_TOKENS = 128
# At or above this kept share of causal token pairs, Stream prunes (almost) nothing.
NO_PRUNING = 0.99
# Thought anchors' vertical scores skip the 4 nearest later sentences: fewer than 6 leave nothing to score.
MIN_SENTENCES = 6


class InputError(ValueError):
  """A problem with the user's input (too long, too short, empty), not a bug. `params`: the Python
  parameters the message names, so a front end (the CLI) can name its own options for them instead."""

  def __init__(self, message: str, *params: str):
    super().__init__(message)
    self.params = params


@dataclasses.dataclass(frozen=True)
class Settings:
  """How the Stream side of an experiment runs: the mask config and the per-layer choices of `forward`."""

  config: StreamConfig = StreamConfig()
  dense_layers: tuple[int, ...] = ()
  prune_local: bool = False
  backend: str = "auto"

  def __post_init__(self):
    object.__setattr__(self, "dense_layers", tuple(int(i) for i in self.dense_layers))

  def forward_kw(self) -> dict:
    """The keyword arguments of `forward` / `generate` for the Stream run."""
    return dict(attention=self.config, dense_layers=self.dense_layers, prune_local=self.prune_local,
                backend=self.backend)

  def describe(self) -> str:
    """One line for reports."""
    c = self.config
    s = (f"block_q={c.block_q}, block_k={c.block_k}, top_k={c.top_k}, sink_blocks={c.sink_blocks}, "
         f"window_blocks={c.window_blocks}, representative={c.representative}")
    if c.select != "search":
      s += f", select={c.select}" + (f" (every {c.query_stride} queries)" if c.select == "table" else "")
    if c.search_share != 1:
      s += f", search_share={c.search_share}"
    if c.coverage is not None:
      s += f", coverage={c.coverage:g}" + (f" ({c.score} scores)" if c.select == "search" else "")
      if c.dropped_scale != 1.0:
        s += f", dropped_scale={c.dropped_scale:g}"
      if c.layer_scales:
        s += ", layer_scales " + ",".join(f"{l}:{x:g}" for l, x in c.layer_scales)
    if self.dense_layers:
      s += f", dense layers {','.join(map(str, self.dense_layers))}"
    return s + (", local layers pruned" if self.prune_local else ", local layers exact")

  def to_dict(self) -> dict:
    return dict(dataclasses.asdict(self.config), dense_layers=list(self.dense_layers),
                prune_local=self.prune_local, backend=self.backend)


# ------------------------------------------------------------------------------------------------ helpers


def context_length(config) -> int:
  """Trained context (`GemmaConfig.max_length`, which `forward` enforces)."""
  return config.max_length


def check_length(model, n_tokens: int, what: str, param: Optional[str] = None) -> None:
  """InputError unless 2 <= n_tokens <= the context of `model` (a loaded model or its config); `what`
  names the input, `param` the parameter it came from (when `what` names one)."""
  limit = context_length(getattr(model, "config", model))
  params = (param,) if param else ()
  if n_tokens > limit:
    raise InputError(f"{what} has {n_tokens} tokens, longer than the model's context of {limit}", *params)
  if n_tokens < 2:
    raise InputError(f"{what} has {n_tokens} token(s); need at least 2", *params)


def pruning_notice(kept: float, tokens: int, cfg: StreamConfig) -> Optional[str]:
  """A sentence when Stream keeps (nearly) every token pair at these settings, with what to change."""
  if not kept >= NO_PRUNING:
    return None
  n_k = -(-tokens // cfg.block_k)
  top_k = max(1, n_k // 4 - cfg.sink_blocks - cfg.window_blocks)
  return (f"Stream keeps {kept:.1%} of the token pairs: pruning does (almost) nothing at these settings. "
          f"{tokens} tokens make {n_k} key blocks of {cfg.block_k}, and every query block keeps up to "
          f"{cfg.capacity} (sink {cfg.sink_blocks} + top-k {cfg.top_k} + window {cfg.window_blocks}). "
          f"For this length try top_k {top_k}, or smaller blocks (block_q/block_k "
          f"{max(8, cfg.block_k // 4)}), or a longer input.")


def check_settings(config, settings: Settings, lengths: Sequence[int] = (), what: str = "the prompt") -> None:
  """InputError (naming the parameter) unless the settings and prompt lengths fit the model's config."""
  n, cfg, limit = config.num_layers, settings.config, context_length(config)
  bad = [i for i in settings.dense_layers if not 0 <= i < n]
  if bad:
    raise InputError(f"dense_layers {','.join(map(str, bad))}: layer ids must be in [0, {n - 1}] "
                     f"({config.name} has {n} layers)", "dense_layers")
  pruned = config.pruned_layers(settings.prune_local)
  unused = [i for i, _ in cfg.layer_scales if i not in pruned]
  if unused:
    raise InputError(f"layer_scales names layer(s) {','.join(map(str, unused))}, which are not pruned "
                     f"({config.name} prunes {','.join(map(str, pruned)) or 'no layer'}"
                     f"{'' if settings.prune_local else '; local layers need prune_local'})", "layer_scales", "prune_local")
  for length in lengths:
    if length > limit:
      raise InputError(f"{what} of {length} tokens is longer than the model's context of {limit}")
  if cfg.top_k * cfg.block_k > limit:
    raise InputError(f"top_k {cfg.top_k} x block_k {cfg.block_k} = {cfg.top_k * cfg.block_k} keys per "
                     f"query block is more than the model's context of {limit} tokens", "top_k", "block_k")


def pruning_notes(kept: float, tokens: int, cfg: StreamConfig) -> dict[str, str]:
  notice = pruning_notice(kept, tokens, cfg)
  return {"pruning does nothing": notice} if notice else {}


def first_global(trace: Trace) -> int:
  """Index of the first global layer (0 when there is none): the default layer of mask figures."""
  glob = [i for i, l in enumerate(trace.layers) if l.kind == "global"]
  return glob[0] if glob else 0


def progress_bar(total: int, desc: str, unit: str, enabled: bool):
  """A tqdm bar, or a stand-in that does nothing (progress=False, or tqdm not installed)."""
  if enabled:
    try:
      from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
      return tqdm(total=total, desc=desc, unit=unit)
    except ImportError:
      pass

  class _Quiet:
    def update(self, n=1):
      pass

    def close(self):
      pass

  return _Quiet()


def logits_fn(model):
  """The model's unembedding as a Partial carrying the parameters, so jit takes them as an argument
  instead of folding 0.7 GB of constants (see faithfulness.output_metrics_from_hidden)."""
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree_util.Partial(functools.partial(_unembed, model.config), model.params)


def _unembed(config, params, h):
  from stream_jax.models import logits_from_hidden  # pylint: disable=import-outside-toplevel
  return logits_from_hidden(config, params, h)
