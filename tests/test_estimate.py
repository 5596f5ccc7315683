"""Hierarchical top-k estimation against a brute-force oracle, and the mask invariants."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

import stream_jax as sj
from stream_jax.numerics import num_rounds
from reference import mask_lists, oracle_mask, block_max_logits, shared_search_mask


def _qk(seed, t, s, n, kv, h, dtype=jnp.float32):
  kq, kk = jax.random.split(jax.random.PRNGKey(seed))
  return (jax.random.normal(kq, (t, n, h), dtype), jax.random.normal(kk, (s, kv, h), dtype))


def _structured_qk(seed, t, n, kv, h, n_topics=32):
  """Text-like keys: contiguous segments (16-256 tokens) share a topic vector, so neighbouring blocks are
  correlated as in real attention; each query carries its own topic plus noise."""
  rng = np.random.default_rng(seed)
  topics = rng.normal(size=(n_topics, h))
  seg_topic, pos = [], 0
  while pos < t:
    length = int(rng.integers(16, 257))
    seg_topic += [int(rng.integers(0, n_topics))] * length
    pos += length
  k = 2.0 * topics[np.asarray(seg_topic[:t])][:, None, :] + rng.normal(size=(t, kv, h))
  q = 2.0 * topics[rng.integers(0, n_topics, size=t)][:, None, :] + rng.normal(size=(t, n, h))
  return jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)


def _check_invariants(mask, cfg):
  idx = np.asarray(mask.indices)
  cnt = np.asarray(mask.counts)
  t, s, bq, bk = mask.q_len, mask.k_len, mask.block_q, mask.block_k
  n_q = -(-t // bq)
  assert idx.shape[-2:] == (n_q, cfg.capacity)
  for pos in itertools.product(*[range(d) for d in idx.shape[:-2]]):
    for j in range(n_q):
      row, c = idx[pos + (j,)], cnt[pos + (j,)]
      valid = row[:c]
      assert (row[c:] == -1).all(), "padding must be -1 at the end"
      assert (np.diff(valid) > 0).all(), "indices must be sorted and unique"
      diag = (min((j + 1) * bq, t) - 1 + s - t) // bk
      assert valid.max() == diag and valid.min() >= 0, "causal: no block after the diagonal"
      for b in range(max(0, diag - cfg.window_blocks + 1), diag + 1):
        assert b in valid, f"window block {b} missing"
      for b in range(min(cfg.sink_blocks, diag + 1)):
        assert b in valid, f"sink block {b} missing"
      search = max(0, diag - cfg.window_blocks + 1 - cfg.sink_blocks)
      expected = min(cfg.sink_blocks, diag + 1) + min(search, cfg.top_k) + min(cfg.window_blocks, diag + 1)
      overlap = max(0, min(cfg.sink_blocks, diag + 1) - max(0, diag - cfg.window_blocks + 1))
      assert c == expected - overlap


SHAPES = [
    # t, s, n, kv, h, bq, bk, top_k, sink, window, branches, stride
    (256, 256, 2, 1, 16, 16, 16, 3, 1, 1, None, 1),
    (200, 200, 4, 2, 8, 16, 8, 4, 1, 2, None, 1),  # ragged T, GQA, bq != bk
    (100, 333, 2, 2, 16, 8, 16, 2, 2, 1, None, 1),  # S > T, ragged S
    (512, 512, 1, 1, 32, 32, 16, 5, 0, 1, 8, 1),  # no sink, init_branches > top_k
    (300, 300, 3, 1, 16, 16, 32, 3, 1, 3, None, 4),  # query stride, bk > bq, MQA
    (64, 64, 2, 1, 8, 64, 64, 4, 1, 2, None, 1),  # a single block
    (96, 96, 2, 1, 8, 16, 16, 8, 1, 2, None, 1),  # n <= top_k everywhere: dense
]


@pytest.mark.parametrize("shape", SHAPES)
def test_oracle_equals_brute_force(shape):
  t, s, n, kv, h, bq, bk, top_k, sink, window, branches, stride = shape
  q, k = _qk(sum(shape[:5]), t, s, n, kv, h)
  cfg = sj.StreamConfig(block_q=bq, block_k=bk, top_k=top_k, sink_blocks=sink, window_blocks=window,
                        init_branches=branches, representative="oracle", query_stride=stride)
  mask = jax.jit(sj.estimate_mask, static_argnums=2)(q, k, cfg)
  expect = oracle_mask(q, k, block_q=bq, block_k=bk, top_k=top_k, sink_blocks=sink,
                       window_blocks=window, scale=h ** -0.5, query_stride=stride)
  assert mask_lists(mask) == expect
  _check_invariants(mask, cfg)


_SHAPES = dict(t=st.integers(1, 160), extra=st.integers(0, 70), kv=st.sampled_from([1, 2]),
               g=st.sampled_from([1, 2]), bq=st.sampled_from([8, 16, 32]), bk=st.sampled_from([8, 16]),
               top_k=st.integers(1, 6), sink=st.integers(0, 2), window=st.integers(1, 3),
               seed=st.integers(0, 10_000))


# Every example compiles a new shape (~6 s on 2 cores): 6 in the default run, 40 under -m slow.
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**_SHAPES)
def test_oracle_equals_brute_force_random_shapes(t, extra, kv, g, bq, bk, top_k, sink, window, seed):
  _oracle_equals_brute_force(t, extra, kv, g, bq, bk, top_k, sink, window, seed)


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**_SHAPES)
def test_oracle_equals_brute_force_many_random_shapes(t, extra, kv, g, bq, bk, top_k, sink, window, seed):
  _oracle_equals_brute_force(t, extra, kv, g, bq, bk, top_k, sink, window, seed)


def _oracle_equals_brute_force(t, extra, kv, g, bq, bk, top_k, sink, window, seed):
  q, k = _qk(seed, t, t + extra, kv * g, kv, 8)
  cfg = sj.StreamConfig(block_q=bq, block_k=bk, top_k=top_k, sink_blocks=sink, window_blocks=window,
                        representative="oracle")
  mask = sj.estimate_mask(q, k, cfg, q_chunk=None)
  expect = oracle_mask(q, k, block_q=bq, block_k=bk, top_k=top_k, sink_blocks=sink,
                       window_blocks=window, scale=8 ** -0.5)
  assert mask_lists(mask) == expect
  _check_invariants(mask, cfg)


def test_softcap_and_scale_are_the_model_logits():
  """Softcap is monotone so the kept set equals the uncapped one; scores use the given scale."""
  q, k = _qk(3, 256, 256, 2, 1, 16)
  base = dict(block_q=16, block_k=16, top_k=3, representative="oracle")
  cfg = sj.StreamConfig(**base)
  capped = sj.estimate_mask(q, k, cfg, scale=0.3, softcap=2.0)
  plain = sj.estimate_mask(q, k, cfg, scale=0.3)
  assert sj.masks_equal(capped, plain)
  expect = oracle_mask(q, k, block_q=16, block_k=16, top_k=3, sink_blocks=1, window_blocks=2,
                       scale=0.3, softcap=2.0)
  assert mask_lists(capped) == expect


@pytest.mark.parametrize("rep", ["center", "first"])
def test_invariants_hold_for_every_representative(rep):
  q, k = _qk(7, 333, 400, 4, 2, 16)
  cfg = sj.StreamConfig(block_q=16, block_k=16, top_k=4, representative=rep, init_branches=6)
  _check_invariants(sj.estimate_mask(q, k, cfg), cfg)


def test_first_scores_only_node_starts():
  """With 'first', a block that is never a node start in the tree can win only as a size-1 node."""
  q, k = _qk(11, 512, 512, 1, 1, 16)
  cfg = sj.StreamConfig(block_q=16, block_k=16, top_k=4, representative="first")
  mask = sj.estimate_mask(q, k, cfg)
  center = sj.estimate_mask(q, k, cfg.replace(representative="center"))
  assert not sj.masks_equal(mask, center), "first and center should differ on random inputs"
  _check_invariants(mask, cfg)


def searched_recall(mask, oracle, cfg):
  """Share of the oracle's searched blocks (sink and window excluded) that `mask` also keeps, and the
  share a uniformly random choice of top_k blocks would get (the baseline)."""
  idx, o_idx, o_cnt = (np.asarray(x) for x in (mask.indices, oracle.indices, oracle.counts))
  hit = tot = base = 0.0
  for h in range(idx.shape[0]):
    for j in range(idx.shape[1]):
      diag = (min((j + 1) * cfg.block_q, mask.q_len) - 1 + mask.k_len - mask.q_len) // cfg.block_k
      n = diag - cfg.window_blocks + 1 - cfg.sink_blocks
      if n <= cfg.top_k:
        continue  # dense query block: nothing to search
      fixed = set(range(cfg.sink_blocks)) | set(range(diag - cfg.window_blocks + 1, diag + 1))
      want = set(o_idx[h, j, :o_cnt[h, j]].tolist()) - fixed
      hit += len(want & set(idx[h, j].tolist()))
      tot += len(want)
      base += cfg.top_k * cfg.top_k / n
  return hit / tot, base / tot


# Measured (seeds 0-2, T=2048, blocks 32, top_k 8; searched blocks only, random-choice baseline 0.27):
#   text-like keys (_structured_qk): center 0.90-0.92, first 0.88-0.90;
#   i.i.d. random keys (no locality): center 0.68-0.73, first 0.75-0.76.
@pytest.mark.parametrize("structured,rep,floor", [
    (True, "center", 0.87), (True, "first", 0.85), (False, "center", 0.62), (False, "first", 0.68)])
def test_recall_against_oracle(structured, rep, floor):
  recalls = []
  for seed in range(3):
    q, k = _structured_qk(seed, 2048, 2, 1, 32) if structured else _qk(seed, 2048, 2048, 2, 1, 32)
    cfg = sj.StreamConfig(block_q=32, block_k=32, top_k=8, representative=rep)
    oracle = sj.estimate_mask(q, k, cfg.replace(representative="oracle"))
    recall, baseline = searched_recall(sj.estimate_mask(q, k, cfg), oracle, cfg)
    assert recall > 2 * baseline
    recalls.append(recall)
  print(f"searched-block recall {rep} structured={structured}: {np.round(recalls, 3)}")
  assert min(recalls) >= floor


# ------------------------------------------------------------------ upper rounds shared by query blocks

SHARED_SHAPES = [
    # t, s, n, kv, h, bq, bk, top_k, sink, window, branches, stride, share
    (512, 512, 4, 2, 16, 16, 16, 4, 1, 2, None, 1, 4),  # 3 rounds, GQA
    (1000, 1100, 2, 1, 16, 16, 16, 5, 1, 2, 8, 2, 2),  # ragged T, S > T, init_branches > top_k, stride
    (777, 777, 2, 2, 8, 32, 16, 3, 2, 1, None, 1, 8),  # 5 rounds, a ragged last group, bq != bk
]


@pytest.mark.parametrize("shape", SHARED_SHAPES)
def test_shared_search_equals_brute_force(shape):
  """search_share = P against its definition written out in float64 (tests/reference.py): the group's
  rows run all rounds but the last, each member scores the last round's children with its own rows."""
  t, s, n, kv, h, bq, bk, top_k, sink, window, branches, stride, share = shape
  assert num_rounds(-(-s // bk), branches or top_k) >= 3
  q, k = _qk(t + s + share, t, s, n, kv, h)
  cfg = sj.StreamConfig(block_q=bq, block_k=bk, top_k=top_k, sink_blocks=sink, window_blocks=window,
                        init_branches=branches, query_stride=stride, search_share=share)
  mask = sj.estimate_mask(q, k, cfg)
  expect = shared_search_mask(q, k, block_q=bq, block_k=bk, top_k=top_k, sink_blocks=sink,
                              window_blocks=window, scale=h ** -0.5, share=share, branches=branches,
                              query_stride=stride)
  assert mask_lists(mask) == expect
  assert not sj.masks_equal(mask, sj.estimate_mask(q, k, cfg.replace(search_share=1)))
  _check_invariants(mask, cfg)


def test_shared_search_with_one_round_is_the_per_block_search():
  """With one round the shared part keeps the whole first level (branches = top_k), so every member
  scores every block of its range itself: the per-block search's mask (max scores). Without rounds
  (nK <= branches) search_share has nothing to share."""
  q, k = _qk(3, 500, 500, 2, 1, 16)
  for top_k, rounds, share in ((8, 1, 4), (16, 0, 32)):
    cfg = sj.StreamConfig(block_q=32, block_k=32, top_k=top_k)
    assert num_rounds(16, top_k) == rounds
    shared = sj.estimate_mask(q, k, cfg.replace(search_share=share))
    assert sj.masks_equal(shared, sj.estimate_mask(q, k, cfg))


def test_shared_search_chunks():
  q, k = _qk(4, 300, 300, 2, 1, 8)
  cfg = sj.StreamConfig(block_q=16, block_k=16, top_k=3, coverage=0.9, search_share=4)
  one = sj.estimate_mask(q, k, cfg, q_chunk=None)
  assert sj.masks_equal(one, sj.estimate_mask(q, k, cfg, q_chunk=6))  # 19 blocks, 5 groups: 1 a chunk


# Measured (seeds 0-2, T=2048, blocks 32, top_k 8 = 3 rounds, mass scores, fixed k): the kept blocks' true
# mass with 4 query blocks sharing the upper rounds is 0.953-0.977 (center) and 0.957-0.976 (first) of the
# per-block search's.
def test_shared_search_keeps_most_of_the_per_block_searchs_mass():
  from stream_jax.blocksparse import dense_block_mass  # pylint: disable=import-outside-toplevel
  ratios = {"center": [], "first": []}
  for seed in range(2):
    q, k = _structured_qk(seed, 2048, 4, 2, 32)
    bm = np.asarray(dense_block_mass(q, k, block_q=32, block_k=32))[:, 16:]
    for rep, got in ratios.items():
      cfg = sj.StreamConfig(block_q=32, block_k=32, top_k=8, score="mass", representative=rep)
      held = []
      for share in (1, 4):
        idx = np.asarray(sj.estimate_mask(q, k, cfg.replace(search_share=share)).indices)[:, 16:]
        held.append((np.take_along_axis(bm, np.maximum(idx, 0), -1) * (idx >= 0)).sum())
      got.append(held[1] / held[0])
  print(f"shared / per-block kept mass: {ratios}")
  assert min(min(r) for r in ratios.values()) >= 0.93


@pytest.mark.slow  # two exact forwards of the 270M at 4k: ~50 s
def test_shared_budget_on_real_text_is_the_per_block_budget():
  """The real 270M, 4,096 tokens of held-out prose, 16-token blocks, cap 64 (two rounds), asked 0.9:
  sharing the upper rounds between 4 query blocks changes each global layer's true coverage by at most
  0.005 and keeps at most 1% more (measured: 0.859 / 0.871 / 0.876 against 0.858 / 0.870 / 0.876, kept
  25.95% against 26.03%)."""
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  from stream_jax.experiments import calibration  # pylint: disable=import-outside-toplevel
  from stream_jax.models import load_model  # pylint: disable=import-outside-toplevel
  model = load_model("gemma3-270m", dtype=jnp.float32, progress=False)
  keys = sorted(topics.topics)
  held = model.encode("\n\n".join(topics.topics[k] for k in keys[len(keys) // 2:])[:60_000])[:4096]
  cfg = sj.StreamConfig(block_q=16, block_k=16, top_k=64, coverage=0.9)
  per_block = calibration.budget_coverage(model, held, cfg)
  shared = calibration.budget_coverage(model, held, cfg.replace(search_share=4))
  print("per block", np.round(per_block.coverage, 3), per_block.kept_mean, "shared",
        np.round(shared.coverage, 3), shared.kept_mean)
  assert np.all(np.abs(np.subtract(shared.coverage, per_block.coverage)) <= 0.005)
  assert shared.kept_mean <= 1.01 * per_block.kept_mean


@pytest.mark.parametrize("kwargs,match", [
    (dict(search_share=3), "search_share must be 'auto' or a power of two"),
    (dict(search_share=0), "search_share must be 'auto' or a power of two"),
    (dict(search_share=128),
     r"search_share must be 'auto' or a power of two in \[1, block_q / query_stride=64\]"),
    (dict(search_share=32, query_stride=4), r"block_q / query_stride=16"),
    (dict(search_share=2, select="table"), "select='search'"),
    (dict(search_share=2, representative="oracle"), "representative='oracle'"),
])
def test_search_share_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sj.StreamConfig(**kwargs)


def test_shared_search_runs_on_mosaic_or_xla_and_triton_says_why():
  """The Mosaic GPU kernel takes search_share (Hopper; tests/test_mosaic.py), the Triton one refuses it by
  name; off Hopper "auto" runs the XLA path and "pallas" says why it cannot."""
  from stream_jax.kernels import (  # pylint: disable=import-outside-toplevel
      estimate_mosaic, estimate_triton, implementations)
  q, k = _qk(1, 512, 512, 2, 1, 64)
  cfg = sj.StreamConfig(block_q=16, block_k=16, top_k=4, search_share=2)
  call = implementations.Call.estimate(q.astype(jnp.bfloat16), cfg)
  assert estimate_mosaic.unsupported(call) is None
  assert "search_share=2" in estimate_triton.unsupported(call)
  assert sj.masks_equal(sj.estimate_mask(q, k, cfg, backend="auto"), sj.estimate_mask(q, k, cfg))
  with pytest.raises(ValueError, match="search_share=2"):
    sj.estimate_mask(q, k, cfg, backend="pallas")


def _halvings(num_k_blocks: int, branches: int) -> int:
  """The search's rounds, counted: halve the widest first-level node until it is one block."""
  widest, rounds = -(-num_k_blocks // branches), 0
  while widest > 1:
    widest, rounds = -(-widest // 2), rounds + 1
  return rounds


def test_auto_share_steps_with_the_search_rounds():
  """search_share="auto" (faithful()'s): 8 query blocks share the upper rounds once the search has 3 rounds
  (64k tokens at 64-token blocks and cap 128: the H100 measurement makes the estimate 1.43x faster there),
  16 from 7 rounds (1M), else 1; 1 wherever sharing does not apply or the implementation searches per
  block (Triton)."""
  f = sj.StreamConfig.faithful()
  assert f.search_share == "auto"
  for t in (1, 4096, 32768, 32769, 40000, 65536, 131072, 524288, 524289, 1 << 20):
    rounds = _halvings(-(-t // 64), 128)
    assert f.for_length(t).search_share == (16 if rounds >= 7 else 8 if rounds >= 3 else 1), t
  assert [f.for_length(t).search_share for t in (32768, 65536, 524288, 1 << 20)] == [1, 8, 8, 16]
  small = f.replace(block_q=16, block_k=16)  # 3 rounds from 16k tokens; at most block_q / query_stride = 16
  assert [small.for_length(t).search_share for t in (8192, 16384, 1 << 20)] == [1, 8, 16]
  assert f.replace(query_stride=16).for_length(1 << 20).search_share == 4
  for other in (f.replace(select="ideal"), f.replace(select="table", query_stride=4),
                f.replace(representative="oracle")):
    assert other.for_length(1 << 20).search_share == 1
  assert f.for_length(1 << 20, shares=False).search_share == 1
  fixed = sj.StreamConfig.faithful(search_share=4)
  assert fixed.for_length(1024) is fixed and fixed.for_length(1 << 20) is fixed
  assert sj.StreamConfig(search_share="auto") == sj.StreamConfig(search_share="auto")  # hashable, static
  with pytest.raises(ValueError, match="search_share must be an integer or 'auto', got 'Auto'"):
    sj.StreamConfig(search_share="Auto")


def test_auto_share_on_the_op_entry():
  """The op entry resolves "auto" by the call's length: the shared search's float64 definition with P = 8
  at 3 rounds, the per-block search at 2; the mask's config records what ran. The Triton kernel (interpreted
  here) searches per block at every length."""
  cfg = sj.StreamConfig(block_q=16, block_k=16, top_k=4, search_share="auto")
  q, k = _qk(11, 512, 512, 2, 1, 16)  # 32 key blocks, branches 4: 3 rounds
  mask = sj.estimate_mask(q, k, cfg)
  assert mask.config.search_share == 8
  assert mask_lists(mask) == shared_search_mask(q, k, block_q=16, block_k=16, top_k=4, sink_blocks=1,
                                                window_blocks=2, scale=16 ** -0.5, share=8)
  short_q, short_k = q[:256], k[:256]  # 16 key blocks: 2 rounds
  short = sj.estimate_mask(short_q, short_k, cfg)
  assert short.config.search_share == 1
  assert sj.masks_equal(short, sj.estimate_mask(short_q, short_k, cfg.replace(search_share=1)))
  from stream_jax.kernels import estimate_triton, implementations  # pylint: disable=import-outside-toplevel
  assert estimate_triton.unsupported(implementations.Call.estimate(q.astype(jnp.bfloat16), cfg)) is None
  triton = sj.estimate_mask(q, k, cfg, backend="triton")
  assert triton.config.search_share == 1
  assert sj.masks_equal(triton, sj.estimate_mask(q, k, cfg.replace(search_share=1)))


def test_batch_rank4_equals_vmap_and_per_example():
  q, k = _qk(5, 2 * 150, 2 * 150, 2, 1, 8)
  qb, kb = q.reshape(2, 150, 2, 8), k.reshape(2, 150, 1, 8)
  cfg = sj.StreamConfig(block_q=16, block_k=16, top_k=2)
  batched = jax.jit(sj.estimate_mask, static_argnums=2)(qb, kb, cfg)
  vmapped = jax.vmap(lambda a, b: sj.estimate_mask(a, b, cfg))(qb, kb)
  assert batched.indices.shape == (2, 2, 10, cfg.capacity)
  assert sj.masks_equal(batched, vmapped)
  for i in range(2):
    one = sj.estimate_mask(qb[i], kb[i], cfg)
    np.testing.assert_array_equal(batched.indices[i], one.indices)


def test_chunking_does_not_change_the_result():
  q, k = _qk(9, 700, 700, 2, 2, 8)
  cfg = sj.StreamConfig(block_q=16, block_k=16, top_k=3)
  a = sj.estimate_mask(q, k, cfg, q_chunk=None)
  b = sj.estimate_mask(q, k, cfg, q_chunk=5)  # 44 blocks: not a multiple of 5
  assert sj.masks_equal(a, b)


def test_bf16_inputs():
  q, k = _qk(1, 256, 256, 2, 1, 16, jnp.bfloat16)
  cfg = sj.StreamConfig(block_q=16, block_k=16, top_k=3, representative="oracle")
  mask = sj.estimate_mask(q, k, cfg)
  expect = oracle_mask(np.asarray(q, np.float32), np.asarray(k, np.float32), block_q=16, block_k=16,
                       top_k=3, sink_blocks=1, window_blocks=2, scale=0.25)
  # bf16 products are exact in f32 accumulation up to rounding of sums: allow rare near-tie swaps.
  agree = np.mean([a == b for ha, hb in zip(mask_lists(mask), expect) for a, b in zip(ha, hb)])
  assert agree >= 0.95


def test_rounds_are_logarithmic():
  assert num_rounds(1, 16) == 0
  assert num_rounds(16, 16) == 0
  assert num_rounds(17, 16) == 1
  assert num_rounds(2048, 16) == 7
  assert num_rounds(2048 * 1024 // 64, 16) == 11


def test_scores_use_only_visible_pairs():
  """A key that only future queries could see must not make its block win."""
  t, h = 64, 8
  q = jnp.zeros((t, 1, h)).at[:, 0, 0].set(1.0)
  k = jnp.zeros((t, 1, h))
  # Block 2 (keys 16..23) has a huge key at position 20, visible to every query of query block 3.
  # Query block 2 (queries 16..23) is the diagonal there, so check the effect from a later block instead:
  k = k.at[20, 0, 0].set(100.0)
  cfg = sj.StreamConfig(block_q=8, block_k=8, top_k=1, sink_blocks=0, window_blocks=1,
                        representative="oracle")
  mask = sj.estimate_mask(q, k, cfg)
  lists = mask_lists(mask)[0]
  for j in range(3, 8):
    assert 2 in lists[j]
  # block_max_logits agrees that block 2 is invisible to query block 1 (queries 8..15)
  scores = block_max_logits(q, k, block_q=8, block_k=8, scale=1.0)
  assert scores[0, 1, 2] == -np.inf


# ---- the block-score table: short inputs score every causal block once and the search looks them up ----

@pytest.fixture
def set_table_cost(monkeypatch):
  """Sets estimate.TABLE_COST for the next traces: the jitted XLA path reads it when it traces, so its
  compiled programs are dropped on every change and after the test."""
  from stream_jax import estimate  # pylint: disable=import-outside-toplevel

  def set_cost(cost):
    monkeypatch.setattr(estimate, "TABLE_COST", cost)
    estimate._estimate_xla.clear_cache()  # pylint: disable=protected-access

  yield set_cost
  estimate._estimate_xla.clear_cache()  # pylint: disable=protected-access


@pytest.mark.parametrize("cfg,t,s,kv,batch,softcap", [
    (sj.StreamConfig(block_q=16, block_k=16, top_k=4), 300, 300, 2, None, None),
    (sj.StreamConfig(block_q=32, block_k=16, top_k=3, init_branches=7), 250, 330, 1, None, 20.0),  # S > T
    (sj.StreamConfig(block_q=16, block_k=32, top_k=2, representative="first", sink_blocks=0), 400, 400, 4,
     2, None),
    (sj.StreamConfig(block_q=16, block_k=16, top_k=4, representative="oracle", window_blocks=3), 203, 203, 2,
     None, None),
])
def test_block_score_table_gives_the_search_the_same_masks(set_table_cost, cfg, t, s, kv, batch, softcap):
  """Integer inputs (exact logits, many exact ties): the table's scores are the search's, bit for bit, so
  the masks are equal whichever way the scores are made."""
  rng = np.random.default_rng(7)
  lead = () if batch is None else (batch,)
  q = jnp.asarray(rng.integers(-3, 4, lead + (t, 4, 16)), jnp.float32)
  k = jnp.asarray(rng.integers(-3, 4, lead + (s, kv, 16)), jnp.float32)
  masks = {}
  for cost in (0.0, 1e9):  # always the table / never (the oracle representative always uses it)
    set_table_cost(cost)
    masks[cost] = sj.estimate_mask(q, k, cfg, softcap=softcap, q_chunk=3)
  assert sj.masks_equal(masks[0.0], masks[1e9])


def test_block_score_table_only_where_it_costs_fewer_block_products():
  from stream_jax.estimate import _table_is_cheaper
  cfg = sj.StreamConfig()  # top_k 16: 2 x 16 children a round, log2(nK / 16) rounds
  assert _table_is_cheaper(cfg, 64) and _table_is_cheaper(cfg, 128)  # 4k, 8k: 32.5 / 64.5 vs 64 / 96
  assert not _table_is_cheaper(cfg, 256) and not _table_is_cheaper(cfg, 16384)  # 16k: 128.5 vs 128
  assert not _table_is_cheaper(sj.StreamConfig(query_stride=2), 128)  # the search scores fewer rows
  assert not _table_is_cheaper(sj.StreamConfig.faithful(), 128)  # mass scores
  assert _table_is_cheaper(sj.StreamConfig(representative="oracle"), 16384)


def test_block_score_table_memory_is_the_table_not_t_by_s(set_table_cost):
  """At 8k (the table path) the compiled temporaries are the [N, nQ, nK] table and one chunk's logits:
  below a tenth of one T x S float32 buffer, and below the search's own gathered key blocks."""
  from stream_jax import estimate
  t = 8192
  q = jax.ShapeDtypeStruct((t, 4, 64), jnp.float32)
  k = jax.ShapeDtypeStruct((t, 1, 64), jnp.float32)
  temp = {}
  for path, cost in (("table", estimate.TABLE_COST), ("search", 1e9)):
    set_table_cost(cost)
    compiled = jax.jit(lambda q, k: sj.estimate_mask(q, k).indices).lower(q, k).compile()
    temp[path] = compiled.memory_analysis().temp_size_in_bytes
  print(f"temp bytes at T={t}: table {temp['table']:,}, search {temp['search']:,}")
  assert temp["table"] < 0.1 * t * t * 4
  assert temp["table"] < temp["search"]
