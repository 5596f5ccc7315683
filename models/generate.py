"""Greedy generation with a KV cache.

Prefill runs the whole prompt once through `Gemma.__call__` (dense or Stream attention, so a needle
retrieval can be scored under the same sparse attention that is traced) and writes its keys/values into a
fixed-size cache; each new token is one jit-compiled `Gemma.extend` step attending densely to the cache.
The cache length is rounded up to a multiple of 128 so that prompts of similar length share executables.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stream_jax import checks
from stream_jax.models.plans import Attention, make_plans
from stream_jax.intervene import Intervention
from stream_jax.models.forward import check_context, check_intervention, model_config, params_dtype, wrap_params
from stream_jax.models.transformer import Gemma, traced_run
from stream_jax.trace import Trace, TracedRun

CACHE_BUCKET = 128


@dataclasses.dataclass
class Generation:
  """Always batched, like TracedRun. text: per row, the decoded new tokens (EOS excluded); ids:
  int32[B, n] new tokens (EOS included if hit, then padded with EOS); prompt_ids: int32[B, T]; prefill:
  the prompt's TracedRun (last-position logits [B, V] and, for a Stream call, its Trace)."""

  text: list[str]
  ids: np.ndarray
  prompt_ids: np.ndarray
  prefill: TracedRun

  @property
  def trace(self) -> Optional[Trace]:
    """The prefill's Trace (None for a dense prefill)."""
    return self.prefill.trace


@functools.partial(jax.jit, static_argnames=("config", "dtype", "plans", "cache_len", "return_hidden"))
def _prefill(params, tokens, intervention, *, config, dtype, plans, cache_len, return_hidden=False):
  out = Gemma(config, dtype).apply(params, tokens, plans, last_only=True, return_kv=True,
                                   return_hidden=return_hidden, intervention=intervention, method=Gemma.run)
  pad = cache_len - tokens.shape[1]
  cache = tuple((jnp.pad(k, [(0, 0), (0, pad), (0, 0), (0, 0)]),
                 jnp.pad(v, [(0, 0), (0, pad), (0, 0), (0, 0)])) for k, v in out["kv"])
  return out, cache


@functools.partial(jax.jit, static_argnames=("config", "dtype"), donate_argnames=("cache",))
def _step(params, token, start, cache, intervention, *, config, dtype):
  logits, cache = Gemma(config, dtype).apply(params, token, start, cache, intervention=intervention,
                                             method=Gemma.extend)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache


def generate(model, params, prompt, *, max_new_tokens: int = 32, attention: Attention = "dense",
             dense_layers: Sequence[int] = (), prune_local: bool = False, backend: str = "xla",
             tokenizer=None, stop_ids: Optional[Sequence[int]] = None, output: str = "sparse",
             coverage: bool = False, intervention: Optional[Intervention] = None,
             return_hidden: bool = False) -> Generation:
  """Greedy continuation of a prompt.

  Args:
    model: GemmaConfig or LoadedModel (then its tokenizer is used by default).
    params: parameters.
    prompt: a string (needs a tokenizer; BOS is added by it; a batch of one), or token ids int[T] (a
      batch of one) / int[B, T] (rows of a batch have the same length; include BOS yourself).
    max_new_tokens: upper bound of generated tokens.
    attention, dense_layers, prune_local, backend, output, coverage: attention of the prefill (see
      `forward`; with output="exact" the prefill is the dense model's and the trace observes it). Decoding
      steps after the prompt are dense.
    intervention: per-layer overrides of the prefill (see `forward`); its key suppression also holds in
      every decoding step (the suppressed prompt keys stay invisible to the generated tokens).
    stop_ids: token ids that end a row (default: the config's EOS and the tokenizer's <end_of_turn>).
    return_hidden: also keep the prefill's residual stream (`prefill.hidden`, [L, B, T, D]), so one prefill
      serves both the answer and per-position metrics (e.g. faithfulness) without a second forward.
  Returns:
    Generation (text list, ids, prompt_ids, prefill TracedRun), always batched.
  """
  config = model_config(model)
  params = wrap_params(params)
  dtype = params_dtype(params)
  tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
  is_text = isinstance(prompt, str)
  if is_text:
    if tokenizer is None:
      raise ValueError("a string prompt needs a tokenizer (pass tokenizer= or token ids)")
    prompt = tokenizer(prompt)["input_ids"]
  ids = np.asarray(checks.token_ids(prompt, config.vocab_size, "prompt"), dtype=np.int32)
  checks.check_dense_layers(attention, dense_layers)
  if ids.ndim == 1:
    ids = ids[None]
  if ids.ndim != 2 or ids.shape[1] < 1:
    raise ValueError(f"prompt ids must have shape [T] or [B, T], got {ids.shape}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  check_context(config, ids.shape[1] + max_new_tokens - 1,
                f"the prompt ({ids.shape[1]} tokens) plus max_new_tokens={max_new_tokens} - 1")
  stops = set(stop_ids) if stop_ids is not None else {config.eos_id}
  if stop_ids is None and tokenizer is not None:
    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(eot, int) and eot != getattr(tokenizer, "unk_token_id", None):
      stops.add(eot)
  b, t = ids.shape
  cache_len = -(-(t + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
  plans = make_plans(config, attention, dense_layers, prune_local, backend, None, output, coverage, dtype=dtype)
  check_intervention(intervention, config, plans, ids.shape)
  step_iv = None if intervention is None or not intervention.suppresses else dataclasses.replace(
      intervention.pad_keys(cache_len), masks=None, gates=None)  # decoding steps: suppression only, over the cache
  res, cache = _prefill(params, jnp.asarray(ids), intervention, config=config, dtype=dtype, plans=plans,
                        cache_len=cache_len, return_hidden=bool(return_hidden))
  prefill = traced_run(res, plans)
  token = jnp.argmax(prefill.logits, axis=-1).astype(jnp.int32)
  out, done = [], np.zeros(b, bool)
  stop_arr = np.asarray(sorted(stops), dtype=np.int32)
  pad = config.eos_id
  for i in range(max_new_tokens):
    tok = np.where(done, pad, np.asarray(token))
    out.append(tok)
    done |= np.isin(tok, stop_arr)
    if done.all() or i == max_new_tokens - 1:
      break
    token, cache = _step(params, jnp.asarray(tok)[:, None], jnp.int32(t + i), cache, step_iv,
                         config=config, dtype=dtype)
  new = np.stack(out, axis=1)
  texts = []
  for row in new:
    hit = np.nonzero(np.isin(row, stop_arr))[0]
    kept = row[: hit[0]] if hit.size else row
    texts.append(tokenizer.decode(kept.tolist()) if tokenizer is not None else "")
  return Generation(text=texts, ids=new, prompt_ids=ids, prefill=prefill)
