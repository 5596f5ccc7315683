"""Causal tests that run the model: attention suppression and route ablation.

  suppression_matrix  Thought Anchors' attention suppression: for each sentence j, attention to its tokens is
                      suppressed in every layer and head and every later sentence's change is measured
                      (`analysis.causal.sentence_effects`). One batched forward per `batch` sentences.
  verify_routes       for NIAH samples the model answers: suppress the needle blocks in the heads where the
                      traced route reads them, and (control) as many random kept blocks in the same heads;
                      an answer flip is a failed string match after the intervention.

What they compute from the forwards' outputs (KL, sentence effects, route heads, the result types) is pure and
lives in `stream_jax.analysis.causal`; this module only drives the model (stream_jax.models) and the
interventions (stream_jax.intervene).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stream_jax import checks, intervene
from stream_jax.analysis import niah, routes
from stream_jax.analysis.causal import (TEMPERATURE, RouteVerification, SampleAblation, SuppressionMatrix,
                                        importance_from_matrix, random_kept_blocks, route_heads,
                                        sentence_effects, token_kl)


def suppression_matrix(model, params, tokens, spans, *, attention="dense", batch: int = 4,
                       temperature: float = TEMPERATURE, layers=None, heads=None, chunk: int = 256,
                       progress: bool = True, **forward_kwargs) -> SuppressionMatrix:
  """Suppress attention to each sentence in turn and measure every later sentence's change.

  Args:
    model, params: a stream_jax.models model (GemmaConfig or LoadedModel) and its parameters.
    tokens: int[T] one sequence (BOS first).
    spans: int[S, 2] sentence token spans (e.g. `anchors.sentences(...).spans`).
    attention: "dense" (the reference's setting) or a StreamConfig (the suppression then acts on the
      sparse model; with output="exact" in forward_kwargs on the dense model while the trace observes).
    batch: sentences per forward (one compiled executable for all batches: the last is padded).
    temperature: of the next-token distributions (the reference: 0.6).
    layers, heads: where attention is suppressed (None: everywhere, as the reference does).
    chunk: positions per logits / KL step (the [chunk, V] logits are the largest temporaries).
  """
  from stream_jax.models import forward, logits_from_hidden  # pylint: disable=import-outside-toplevel
  from stream_jax.models.forward import model_config  # pylint: disable=import-outside-toplevel
  cfg = model_config(model)
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f"tokens must be one sequence int[T], got shape {tokens.shape}")
  t = len(tokens)
  spans = checks.check_spans("spans", spans, t)
  if len(spans) < 2:
    raise ValueError(f"spans must hold at least 2 sentences, got {len(spans)}")
  checks.as_int("batch", batch, lo=1)
  checks.as_int("chunk", chunk, lo=1)
  checks.check_positive("temperature", temperature, allow_none=False)
  kw = dict(attention=attention, return_hidden=True, last_only=True, **forward_kwargs)
  base = forward(model, params, tokens[None], **kw).hidden[-1, 0]  # [T, D]
  kl_fn = _kl_chunks(lambda h: logits_from_hidden(model, params, h), temperature, chunk)
  s = len(spans)
  kl = np.zeros((s, t), np.float32)
  bar = _progress(progress, s)
  for lo in range(0, s, batch):
    ids = list(range(lo, min(lo + batch, s)))
    rows = ids + [ids[-1]] * (batch - len(ids))  # same shapes for every batch: one executable
    iv = intervene.suppress_spans([[spans[j]] for j in rows], length=t, num_layers=cfg.num_layers,
                                  num_heads=cfg.num_heads, layers=layers, heads=heads)
    hid = forward(model, params, np.broadcast_to(tokens, (batch, t)), intervention=iv, **kw).hidden[-1]
    start = int(spans[ids[0], 0])  # earlier positions cannot change
    kl[ids, start:] = np.asarray(kl_fn(base[start:], hid[:, start:]))[: len(ids)]
    bar.update(len(ids))
  bar.close()
  matrix = np.stack([sentence_effects(kl[j], spans, j) for j in range(s)], axis=1)  # [k, j]
  return SuppressionMatrix(matrix=matrix, importance=importance_from_matrix(matrix), kl=kl, spans=spans,
                           temperature=float(temperature))


def _kl_chunks(logits_fn: Callable, temperature: float, chunk: int):
  """(base [T', D], hidden [B, T', D]) -> KL float32[B, T'] over position chunks of fixed size (padded):
  never more than [B, chunk, V] logits at once."""

  @jax.jit
  def step(b, h):
    return token_kl(logits_fn(b)[None], logits_fn(h), temperature)

  def run(base, hidden):
    n = base.shape[0]
    out = []
    for i in range(0, n, chunk):
      b, h = base[i:i + chunk], hidden[:, i:i + chunk]
      pad = chunk - b.shape[0]
      if pad:
        b = jnp.pad(b, ((0, pad), (0, 0)))
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
      out.append(np.asarray(step(b, h))[:, : chunk - pad])
    return np.concatenate(out, axis=1)

  return run


def _progress(enabled: bool, total: int):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, desc="suppressions", unit="sentence", disable=not enabled)


def verify_routes(model, params, samples: Sequence[niah.NiahSample], config, *, n_random: int = 3,
                  seed: int = 0, max_new_tokens: int = 16, output: str = "exact", tokenizer=None,
                  residual: float = 0.5, threshold: float = 1e-3, everywhere: bool = False,
                  progress: bool = True, **generate_kwargs) -> RouteVerification:
  """Route ablation vs random ablation on NIAH samples.

  Per sample: greedy answer with attention=config (output="exact": the dense model, traced); if it
  matches, the route from the final block to the needle (routes.route) names the heads that read needle
  blocks; the answer is regenerated with those blocks suppressed in those heads (in the prefill and every
  decoding step), then `n_random` times with as many random kept blocks of the same heads suppressed
  instead (the sink, the needle and the last query's local window excluded: suppressing the sink or the
  question itself is a different experiment). everywhere=True adds a third arm: the needle blocks
  suppressed in every layer and head (does the answer need the needle's keys at all?).
  """
  from stream_jax.models import generate  # pylint: disable=import-outside-toplevel
  from stream_jax.models.forward import model_config  # pylint: disable=import-outside-toplevel
  cfg = model_config(model)
  checks.as_int("n_random", n_random, lo=0)
  rng = np.random.default_rng(seed)
  kw = dict(attention=config, output=output, max_new_tokens=max_new_tokens, tokenizer=tokenizer,
            **generate_kwargs)
  out = []
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  for sample in tqdm(samples, desc="route ablation", unit="sample", disable=not progress):
    ids = np.asarray(sample.ids)
    t = len(ids)
    gen = generate(model, params, ids, **kw)
    pred = gen.text[0]
    answered = niah.match_all(pred, sample.answers) == 1
    trace = gen.prefill.row(0).trace
    spans = sample.value_spans
    nm = np.asarray(routes.trace_needle_mass(trace, spans))
    depth = 100.0 * sample.queried_needles[0].token_span[0] / t  # where the needle sits, % of the prompt
    base = dict(length=t, depth=depth, answered=answered, prediction=pred, needle_mass=nm)
    if not answered:
      out.append(SampleAblation(**base))
      continue
    rt = routes.route(trace, spans, residual=residual, threshold=threshold)
    bk = trace.layers[0].mask.block_k
    needle = np.asarray(routes.span_blocks(spans, bk, t))
    where = route_heads(rt, needle)
    if not where.any():
      out.append(SampleAblation(**base))
      continue
    ids_needle = np.nonzero(needle)[0]
    iv = intervene.drop_blocks(ids_needle, block_k=bk, length=t, num_layers=cfg.num_layers,
                               num_heads=cfg.num_heads, heads=where)
    r_pred = generate(model, params, ids, intervention=iv, **kw).text[0]
    flipped = niah.match_all(r_pred, sample.answers) < 1
    exclude = needle.copy()
    exclude[: config.sink_blocks] = True
    exclude[max(0, len(needle) - config.window_blocks - 1):] = True
    rand = 0
    runs = 0
    for _ in range(n_random):
      blocks = random_kept_blocks(trace, where, len(ids_needle), rng, exclude)
      if not blocks:
        break
      riv = intervene.drop_blocks(blocks, block_k=bk, length=t, num_layers=cfg.num_layers,
                                  num_heads=cfg.num_heads, heads=where)
      rand += niah.match_all(generate(model, params, ids, intervention=riv, **kw).text[0], sample.answers) < 1
      runs += 1
    every = None
    if everywhere:
      eiv = intervene.drop_blocks(ids_needle, block_k=bk, length=t, num_layers=cfg.num_layers,
                                  num_heads=cfg.num_heads)
      every = niah.match_all(generate(model, params, ids, intervention=eiv, **kw).text[0], sample.answers) < 1
    out.append(SampleAblation(**base, route_heads=int(where.sum()), needle_blocks=tuple(map(int, ids_needle)),
                              route_flipped=bool(flipped), route_prediction=r_pred, random_flipped=int(rand),
                              random_runs=runs, everywhere_flipped=every, heads=where))
  return RouteVerification(tuple(out))
