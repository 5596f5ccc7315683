"""The block-score table (StreamConfig.select="table"): every causal key block scored once, by the true
attention mass a sample of each query block's queries gives it; the kept set is the ideal one of that
sample.

The hierarchical search scores representative blocks, 2 x top_k a round; at the budgets that hold 90-95% of
a real model's attention (top_k 128, ~30% of blocks) that is about as many block products as the causal row
holds, and its mass estimates still undershoot (DESIGN §11: an estimate of an estimate). Scoring each causal
block once costs the same products and needs no estimate: for the sampled queries i of query block j (every
query_stride-th, counted back from the block's last valid query, as `query_stride` means for the search)
one pass over their visible keys gives each one's log-sum-exp lse[i] and a second the masses

    M[j, c] = sum_{i sampled in j} sum_{s in c, s visible to i} exp(logit[i, s] - lse[i]),

and the selection is `ideal.py`'s on M: the rule blocks plus the fewest heaviest searchable blocks whose
mass reaches `coverage` x the row's total (at most top_k), or the top_k heaviest. For the sampled queries
the set is ideal and its coverage is what was asked; for the others it holds what the sample predicts. The
cost is two Q Kᵀ passes over the causal blocks for T / query_stride queries (no V, no dense pass): at
query_stride 8, a quarter of one dense pass's products.

Memory: query blocks are processed in chunks whose rows of M ([N, chunk, nK] floats) are reduced to the
kept (ids, mass) at once: O(T) per chunk, nothing T x S. `estimate_mask` is the entry (select="table"); the
XLA implementation is here, the Mosaic GPU kernel in kernels/table_mosaic.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from stream_jax import ideal, numerics
from stream_jax.config import StreamConfig
from stream_jax.kernels import common, table_mosaic
from stream_jax.mask import BlockMask, num_blocks

QUERY_ROWS = 512  # sampled queries per chunk of the XLA path (query blocks x the sample per block)
KEY_BLOCKS = 8  # key blocks per product of the XLA path
KERNEL_TILES = 64  # tiles of 64 sampled queries per kernel launch (x heads: CTAs that fill a GPU)


def sampled_rows(t: int, block_q: int, stride: int) -> jax.Array:
  """int32 [nQ, block_q / stride]: the query rows that score each query block, ascending, -1 where a
  ragged last block has fewer: its last valid query and every stride-th one before it."""
  r = block_q // stride
  j = jnp.arange(num_blocks(t, block_q), dtype=jnp.int32)[:, None]
  last = jnp.minimum((j + 1) * block_q, t) - 1
  rows = last - (r - 1 - jnp.arange(r, dtype=jnp.int32)[None, :]) * stride
  return jnp.where(rows >= j * block_q, rows, -1)


def table_mask(q: jax.Array, k: jax.Array, config: StreamConfig, *, scale: float, softcap, impl: str = "xla"
               ) -> tuple[BlockMask, jax.Array]:
  """The kept set of select="table" on validated inputs (q [*B, T, N, H], k [*B, S, K, H]) by `impl`
  ("xla" or "mosaic"), and the sample's coverage float32 [*B, N, nQ] (its kept mass over its queries)."""
  batch = q.ndim == 4
  qq, kk = (q, k) if batch else (q[None], k[None])
  if impl == "mosaic":
    idx, mass, cov = _table_kernel(qq, kk, config=config, scale=scale, softcap=softcap,
                                   rows_fn=table_mosaic.mass_rows)
  else:
    fn = functools.partial(_table_xla, config=config, scale=scale, softcap=softcap)
    idx, mass, cov = jax.vmap(fn)(qq, kk)
  del mass
  if not batch:
    idx, cov = idx[0], cov[0]
  counts = (idx >= 0).sum(-1).astype(jnp.int32)
  t, s = q.shape[-3], k.shape[-3]
  return BlockMask(idx, counts, config.block_q, config.block_k, t, s, config), cov


def sample_target(config: StreamConfig) -> StreamConfig:
  """The config the sample's selection runs: with a coverage budget and dropped_scale d, the sample keeps
  blocks until its dropped share, times d, is within 1 - coverage (coverage 1 - (1 - coverage) / d): the
  queries outside the sample lose more than the sample does (its set is chosen for it), by a factor that
  `experiments.calibration.calibrate_budget` fits per layer from one exact pass, as for the search."""
  if not config.adaptive or config.dropped_scale == 1.0:
    return config
  return config.replace(coverage=1.0 - (1.0 - config.coverage) / config.dropped_scale, score="mass")


@functools.partial(jax.jit, static_argnames=("config", "scale", "softcap"))
def _table_xla(q, k, *, config: StreamConfig, scale, softcap):
  """q [T, N, H], k [S, K, H] -> ids int32 [N, nQ, C], mass, coverage (of the sample)."""
  t, n, h = q.shape
  s, kv, _ = k.shape
  g = n // kv
  bq, bk, stride = config.block_q, config.block_k, config.query_stride
  r = bq // stride
  n_q, n_k = num_blocks(t, bq), num_blocks(s, bk)
  qc = max(1, QUERY_ROWS // r)  # query blocks per chunk
  kc = KEY_BLOCKS
  n_qc, n_kc = -(-n_q // qc), -(-n_k // kc)
  offset = s - t
  rows = jnp.pad(sampled_rows(t, bq, stride), ((0, n_qc * qc - n_q), (0, 0)), constant_values=-1)
  rows = rows.reshape(n_qc, qc * r)
  q_rows = q[jnp.maximum(rows, 0)].reshape(n_qc, qc * r, kv, g, h)
  pos = jnp.where(rows >= 0, rows + offset, -1)  # -1 (none) sees nothing
  k_pad = common.pad_axis(k, 0, n_kc * kc * bk)
  diag, _ = ideal._chunk_rows(t, s, bq, bk, qc, n_qc)
  valid = (rows >= 0).reshape(n_qc, qc, r).sum(-1).astype(jnp.float32)  # sampled queries per block

  def chunk_fn(args):
    q_c, pos_c, diag_c, valid_c = args  # [qc r, K, G, H], [qc r], [qc], [qc]

    def logits(c):  # [K, G, qc r, kc bk], invisible -inf
      keys = lax.dynamic_slice_in_dim(k_pad, c * kc * bk, kc * bk, 0)
      x = jnp.einsum("rkgh,skh->kgrs", q_c, keys, preferred_element_type=jnp.float32)
      x = numerics.softcap(x * scale, softcap)
      k_pos = c * kc * bk + jnp.arange(kc * bk, dtype=jnp.int32)
      return jnp.where(k_pos[None, :] <= pos_c[:, None], x, -jnp.inf)

    def lse_fn(c, carry):
      m, l = carry
      x = logits(c)
      m_new = jnp.maximum(m, x.max(-1))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      l = l * jnp.exp(m - m_safe) + jnp.exp(x - m_safe[..., None]).sum(-1)
      return m_new, l

    n_c = pos_c.max() // (kc * bk) + 1
    init = (jnp.full((kv, g, qc * r), -jnp.inf), jnp.zeros((kv, g, qc * r)))
    m, l = lax.fori_loop(0, n_c, lse_fn, init)
    lse = jnp.where(l > 0, jnp.log(jnp.where(l > 0, l, 1.0)) + m, jnp.inf)  # none visible: adds nothing

    def mass_fn(c, table):
      p = jnp.exp(jnp.minimum(logits(c) - lse[..., None], 0.0))
      mass = p.reshape(kv, g, qc, r, kc, bk).sum((3, 5))  # [K, G, qc, kc]
      return lax.dynamic_update_slice_in_dim(table, mass, c * kc, axis=3)

    table = lax.fori_loop(0, n_c, mass_fn, jnp.zeros((kv, g, qc, n_kc * kc), jnp.float32))[..., :n_k]
    return ideal._select_chunk(table, diag_c, valid_c, config=sample_target(config))

  out = lax.map(chunk_fn, (q_rows, pos, diag, valid))
  return tuple(ideal._from_chunks(x, (n,), n_q) for x in out)  # [nQc, K, G, qc, ...] -> [N, nQ, ...]


def _table_kernel(q, k, *, config: StreamConfig, scale, softcap, rows_fn, tiles: int = KERNEL_TILES):
  """Batched q [B, T, N, H], k [B, S, K, H] through a table kernel (`rows_fn`, the contract of
  `table_mosaic.mass_rows`), `tiles` tiles of 64 sampled queries (64 / (block_q / query_stride) query blocks
  each) at a time
  -> ids [B, N, nQ, C], mass, coverage."""
  t, s = q.shape[1], k.shape[1]
  bq, bk, stride = config.block_q, config.block_k, config.query_stride
  r = bq // stride
  per_tile = table_mosaic.BLOCK // r  # query blocks per tile of 64 sampled queries
  n_q = num_blocks(t, bq)
  qc = min(tiles, -(-n_q // per_tile)) * per_tile  # whole tiles per chunk
  n_qc = -(-n_q // qc)
  rows = jnp.pad(sampled_rows(t, bq, stride), ((0, n_qc * qc - n_q), (0, 0)), constant_values=-1)
  rows = rows.reshape(n_qc, qc * r)
  pos = jnp.where(rows >= 0, rows + (s - t), -1)
  diag, _ = ideal._chunk_rows(t, s, bq, bk, qc, n_qc)
  valid = (rows >= 0).reshape(n_qc, qc, r).sum(-1).astype(jnp.float32)

  def chunk_fn(args):
    i, rows_c, pos_c, diag_c, valid_c = args
    q_rows = jnp.take(q, jnp.maximum(rows_c, 0), axis=1)  # [B, qc r, N, H]: the chunk's sample only
    table = rows_fn(q_rows, k, pos_c, i * qc, stride=stride, q_len=t, scale=scale, softcap=softcap, block=bq)
    return jax.vmap(functools.partial(ideal._select_chunk, config=sample_target(config)), in_axes=(0, None, None))(
        table, diag_c, valid_c)

  out = lax.map(chunk_fn, (jnp.arange(n_qc, dtype=jnp.int32), rows, pos, diag, valid))
  return tuple(ideal._from_chunks(x, (q.shape[0], q.shape[2]), n_q) for x in out)  # [nQc, B, N, qc, ...]
