"""Attribution patching over the kept edges checked against real ablations, on a needle prompt.

    from stream_jax.experiments.edge_ablation import needle_prompt, check_edges
    prompt = needle_prompt(model, length=1024, config=cfg)    # ids ending where the answer's digit comes
    check = check_edges(model, prompt, cfg, top=40, random=10)
    check.spearman, check.rows[0]                             # AtP estimate vs measured change, per edge

One forward + backward gives every kept edge's AtP estimate (stream_jax.attribution); the top edges by
|estimate| (and some random ones) are then ablated one at a time for real (a forced mask without the
block) and the measured metric changes compared with the estimates. Used by benchmarks/attribution.py and
colab/edge_attribution.ipynb.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from stream_jax.analysis import niah
from stream_jax.analysis.anchors import spearman
from stream_jax.attribution import drop_edge, edge_attribution, top_edges
from stream_jax.config import StreamConfig
from stream_jax.intervene import Intervention


@dataclasses.dataclass(frozen=True)
class NeedlePrompt:
  """A RULER niah_single_1 prompt extended with the sparse model's own first answer tokens (Gemma writes
  ": " before the digits), so that the metric — the answer's first token's logit at the last position — is
  read where the model writes it. `writes_answer`: the sparse model's top-1 there is that token."""

  ids: np.ndarray  # int32 [1, T]
  sample: niah.NiahSample
  answer: int  # the token id whose logit is the metric
  writes_answer: bool
  needle_blocks: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class EdgeCheck:
  """Rows (dicts: layer, row, head, q_block, slot, key_block, estimate, measured, random) and the agreement
  of estimates with measured ablation effects over the top edges."""

  value: float
  rows: tuple[dict, ...]
  spearman: float
  pearson: float
  sign_agreement: float
  num_edges: int

  def needle_rows(self, needle_blocks) -> tuple[dict, ...]:
    """The checked edges that read a needle block (the route's first hop)."""
    blocks = set(int(b) for b in needle_blocks)
    return tuple(r for r in self.rows if r["key_block"] in blocks)


def needle_prompt(model, length: int, config: StreamConfig, *, depth: float = 50.0, seed: int = 0,
                  max_written: int = 4) -> NeedlePrompt:
  """A needle prompt of about `length` tokens, extended with the sparse model's greedy tokens (at most
  `max_written`) until its next token is the answer's first."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from stream_jax.models import forward  # pylint: disable=import-outside-toplevel
  sample = niah.generate_sample(model.tokenizer, length, niah.NiahTask(depths=(depth,)), seed=seed)
  ids = jnp.asarray(sample.ids, jnp.int32)[None]
  answer = int(model.encode(sample.answers[0], add_bos=False)[0])
  top1 = None
  for _ in range(max_written + 1):
    run = forward(model, model.params, ids, attention=config, last_only=True)
    top1 = int(np.argmax(np.asarray(run.logits[0])))
    if top1 == answer or ids.shape[1] >= sample.length + max_written:
      break
    ids = jnp.concatenate([ids, jnp.asarray([[top1]], jnp.int32)], axis=1)
  return NeedlePrompt(np.asarray(ids), sample, answer, top1 == answer,
                      tuple(int(b) for b in sample.needle_blocks(config.block_k)))


def check_edges(model, prompt: NeedlePrompt, config: StreamConfig, *, top: int = 40, random: int = 0,
                seed: int = 0, progress: Optional[callable] = None) -> EdgeCheck:
  """AtP estimates of every kept edge, then real ablations of the `top` edges by |estimate| and of `random`
  other kept edges; `progress(i, n)` is called after each ablation."""
  from stream_jax.models import forward  # pylint: disable=import-outside-toplevel
  metric = lambda run: run.logits[0, prompt.answer]  # noqa: E731
  attr = edge_attribution(model, model.params, prompt.ids, metric, attention=config, last_only=True)
  num_edges = sum(int((np.asarray(m.indices) >= 0).sum()) for m in attr.masks)
  edges = [dict(e, random=False) for e in top_edges(attr, top)]
  if random:
    rest = top_edges(attr, num_edges)[top:]
    picks = np.random.default_rng(seed).choice(len(rest), size=min(random, len(rest)), replace=False)
    edges += [dict(rest[i], random=True) for i in picks]
  rows = []
  for i, e in enumerate(edges):
    masks = drop_edge(attr.masks, e["layer"], e["row"], e["head"], e["q_block"], e["slot"])
    run = forward(model, model.params, prompt.ids, attention=config, last_only=True,
                  intervention=Intervention(masks=masks))
    rows.append(dict(e, measured=float(metric(run)) - float(attr.value)))
    if progress is not None:
      progress(i + 1, len(edges))
  best = [r for r in rows if not r["random"]]
  est = np.array([r["estimate"] for r in best])
  real = np.array([r["measured"] for r in best])
  return EdgeCheck(float(attr.value), tuple(rows), spearman(est, real), float(np.corrcoef(est, real)[0, 1]),
                   float(np.mean(np.sign(est) == np.sign(real))), num_edges)

