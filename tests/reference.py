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


def ideal_kept_sets(q, k, cfg, *, scale, softcap=None, window=None, key_mask=None, tol=1e-6,
                    sampled=False):
  """The ideal kept sets, float64: dense probabilities -> block masses m [N, nQ, nK] -> per (head, query
  block) the rule blocks (sink, window) plus the searchable blocks by descending mass (ties by block id):
  top_k of them, or the fewest whose mass with the rule blocks' reaches coverage x the row total.

  Returns (m, kept {(n, j): set of block ids}, ambiguous {(n, j)}: rows whose decision sits within `tol`
  of the threshold, where float32 may decide either way). q [T, N, H], k [S, K, H]; queries are the last
  T of S positions. sampled: only the queries cfg.query_stride apart counted back from each block's last
  valid one give mass (select="table"'s sample; each still under its own softmax over all its keys)."""
  q = np.asarray(q, np.float64)
  k = np.asarray(k, np.float64)
  t, n, h = q.shape
  s, kv, _ = k.shape
  kk = np.repeat(k, n // kv, axis=1)
  x = np.einsum("tnh,snh->nts", q, kk) * scale
  if softcap:
    x = softcap * np.tanh(x / softcap)
  pos = np.arange(t) + (s - t)
  vis = np.arange(s)[None, :] <= pos[:, None]
  if window is not None:
    vis = vis & (pos[:, None] - np.arange(s)[None, :] < window)
  vis = vis[None] & (np.ones((n, s), bool) if key_mask is None else np.asarray(key_mask))[:, None, :]
  x = np.where(vis, x, -np.inf)
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  bq, bk = cfg.block_q, cfg.block_k
  n_q, n_k = -(-t // bq), -(-s // bk)
  pp = np.zeros((n, n_q * bq, n_k * bk))
  pp[:, :t, :s] = p
  if sampled:
    counted = np.zeros(n_q * bq, bool)
    for j in range(n_q):
      counted[np.arange(min((j + 1) * bq, t) - 1, j * bq - 1, -cfg.query_stride)] = True
    pp[:, ~counted] = 0.0
  m = pp.reshape(n, n_q, bq, n_k, bk).sum((2, 4))
  kept, ambiguous = {}, set()
  for hd in range(n):
    for j in range(n_q):
      diag = (min((j + 1) * bq, t) - 1 + s - t) // bk
      lo, hi = cfg.sink_blocks, diag - cfg.window_blocks + 1
      causal = np.arange(n_k) <= diag
      rule = [c for c in range(n_k) if causal[c] and (c < lo or c >= hi)]
      search = np.array([c for c in range(n_k) if causal[c] and lo <= c < hi], int)
      order = search[np.lexsort((search, -m[hd, j, search]))] if len(search) else search
      if cfg.coverage is None:
        chosen = list(order[:cfg.top_k])
      else:
        total, acc, chosen = m[hd, j, causal].sum(), m[hd, j, rule].sum(), []
        for c in order[:cfg.top_k]:
          gap = acc - cfg.coverage * total
          if abs(gap) < tol:
            ambiguous.add((hd, j))
          if gap >= 0:
            break
          acc += m[hd, j, c]
          chosen.append(int(c))
      kept[hd, j] = set(rule) | set(int(c) for c in chosen)
  return m, kept, ambiguous
