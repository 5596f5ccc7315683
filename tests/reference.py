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


def shared_search_mask(q, k, *, block_q, block_k, top_k, sink_blocks, window_blocks, scale, share,
                       branches=None, query_stride=1):
  """list[N][nQ] of sorted kept key-block ids of the search shared by `share` query blocks (max scores,
  center representatives), written out in float64 from its definition (StreamConfig.search_share):

  a group's rows (every share-th of each member's scoring rows) score the first level and all rounds but
  the last over the first member's search range; each member scores the kept nodes' children (single
  blocks) and the blocks between that range and its own window with its own rows, and keeps the top_k
  (ties: the earlier candidate, children before the blocks after the range)."""
  q = np.asarray(q, np.float64)
  k = np.asarray(k, np.float64)
  t, n, _ = q.shape
  s, kv, _ = k.shape
  g = n // kv
  n_q, n_k = -(-t // block_q), -(-s // block_k)
  branches = top_k if branches is None else branches
  widest = -(-n_k // branches)
  rounds = int(np.ceil(np.log2(widest))) if widest > 1 else 0

  def member_rows(j, stride):
    last = min((j + 1) * block_q, t) - 1
    rows = last - np.arange(block_q // stride) * stride
    return rows[rows >= j * block_q], last + (s - t)

  def block_max(logits, rows, b):
    if b < 0 or b >= n_k:
      return -np.inf
    keys = np.arange(b * block_k, min((b + 1) * block_k, s))
    vis = keys[None, :] <= (rows + (s - t))[:, None]
    return logits[np.ix_(rows, keys)][vis].max() if vis.any() else -np.inf

  def top(scores, count):  # indices of the `count` largest, ties to the lower index, in index order
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:count])

  result = []
  for h in range(n):
    logits = q[:, h] @ k[:, h // g].T * scale
    out = []
    for p in range(-(-n_q // share)):
      members = [j for j in range(p * share, (p + 1) * share)]
      g_rows = np.concatenate([member_rows(j, query_stride * share)[0] for j in members if j < n_q]
                              + [np.zeros(0, int)]).astype(int)
      first_pos = member_rows(members[0], 1)[1]
      lo, hi = sink_blocks, first_pos // block_k - window_blocks + 1
      width = max(hi - lo, 0)
      edges = [lo + (b * width) // branches for b in range(branches + 1)]
      nodes = [(edges[b], edges[b + 1] - edges[b]) for b in range(branches)]

      def score(node):
        start, size = node
        return block_max(logits, g_rows, start + (size - 1) // 2) if size > 0 else -np.inf

      if branches > top_k:
        nodes = [nodes[i] for i in top([score(x) for x in nodes], top_k)]
      for _ in range(rounds - 1):
        children = [c for start, size in nodes
                    for c in ((start, (size + 1) // 2), (start + (size + 1) // 2, size // 2))]
        nodes = [children[i] for i in top([score(c) for c in children], top_k)]
      children = [c for start, size in nodes
                  for c in ((start, (size + 1) // 2), (start + (size + 1) // 2, size // 2))]
      for j in members:
        if j >= n_q:
          continue
        rows, pos = member_rows(j, query_stride)
        diag = pos // block_k
        own_hi = diag - window_blocks + 1
        keep = set(range(min(sink_blocks, diag + 1))) | set(range(max(0, diag - window_blocks + 1), diag + 1))
        if own_hi - sink_blocks <= top_k:
          keep |= set(range(sink_blocks, own_hi))
        else:
          cands = [start for start, _ in children] + list(range(max(hi, lo), own_hi))
          ok = [size > 0 for _, size in children] + [True] * (len(cands) - len(children))
          scores = [block_max(logits, rows, b) if o else -np.inf for b, o in zip(cands, ok)]
          keep |= {cands[i] for i in top(scores, top_k) if ok[i]}
        out.append(sorted(keep))
    result.append(out)
  return result
