"""Brute-force numpy oracles for the Stream core: independent of the jnp implementation on purpose."""

from __future__ import annotations

import numpy as np


def block_max_logits(q, k, *, block_q, block_k, scale, softcap=None, query_stride=1):
  """float64[N, nQ, nK]: max scaled logit over causally visible (scoring query, key) pairs; -inf if none.

  Scoring queries of a block are every query_stride-th row counted back from its last valid row.
  """
  q = np.asarray(q, np.float64)
  k = np.asarray(k, np.float64)
  t, n, _ = q.shape
  s, kv, _ = k.shape
  g = n // kv
  n_q, n_k = -(-t // block_q), -(-s // block_k)
  out = np.full((n, n_q, n_k), -np.inf)
  for h in range(n):
    logits = q[:, h] @ k[:, h // g].T * scale  # [T, S]
    if softcap is not None:
      logits = softcap * np.tanh(logits / softcap)
    for j in range(n_q):
      last = min((j + 1) * block_q, t) - 1
      rows = np.arange(last, j * block_q - 1, -query_stride)
      for b in range(n_k):
        keys = np.arange(b * block_k, min((b + 1) * block_k, s))
        sub = logits[np.ix_(rows, keys)]
        pos = rows + (s - t)
        vis = keys[None, :] <= pos[:, None]
        if vis.any():
          out[h, j, b] = sub[vis].max()
  return out


def oracle_mask(q, k, *, block_q, block_k, top_k, sink_blocks, window_blocks, scale, softcap=None,
                query_stride=1):
  """list[N][nQ] of sorted kept key-block ids: sink + exact top-k of the search range + window."""
  scores = block_max_logits(q, k, block_q=block_q, block_k=block_k, scale=scale, softcap=softcap,
                            query_stride=query_stride)
  t, s = q.shape[0], k.shape[0]
  n, n_q, _ = scores.shape
  result = []
  for h in range(n):
    rows = []
    for j in range(n_q):
      last_pos = min((j + 1) * block_q, t) - 1 + (s - t)
      diag = last_pos // block_k
      keep = set(range(min(sink_blocks, diag + 1)))
      keep |= set(range(max(0, diag - window_blocks + 1), diag + 1))
      search = np.arange(sink_blocks, diag - window_blocks + 1)
      if len(search) <= top_k:
        keep |= set(search.tolist())
      else:
        order = np.argsort(-scores[h, j, search], kind="stable")  # ties -> earlier block
        keep |= set(search[order[:top_k]].tolist())
      rows.append(sorted(keep))
    result.append(rows)
  return result


def mask_lists(mask):
  """BlockMask (no batch axis) -> list[N][nQ] of kept block ids."""
  idx = np.asarray(mask.indices)
  cnt = np.asarray(mask.counts)
  return [[idx[h, j, :cnt[h, j]].tolist() for j in range(idx.shape[1])] for h in range(idx.shape[0])]


def numpy_attention(q, k, v, allowed, scale, softcap=None):
  """float64 attention: softmax over `allowed` [N, T, S] keys of q [T, N, H], k/v [S, K, *] (GQA).

  Returns out [T, N, Hv] and probs [N, T, S]; a row with no allowed key comes out NaN."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  g = q.shape[1] // k.shape[1]
  out = np.zeros(q.shape[:2] + v.shape[-1:])
  probs = np.zeros((q.shape[1], q.shape[0], k.shape[0]))
  for h in range(q.shape[1]):
    logits = q[:, h] @ k[:, h // g].T * scale
    if softcap is not None:
      logits = softcap * np.tanh(logits / softcap)
    logits = np.where(allowed[h], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    probs[h] = p
    out[:, h] = p @ v[:, h // g]
  return out, probs
