"""Pallas kernels vs the XLA reference vs cuDNN dense attention, on one GPU.

    PYTHONPATH=. python benchmarks/kernel_timings.py [--seq 8192,32768,131072] [--tune] [--out DIR]

1. Correctness on the GPU: the estimate kernel against the XLA reference (integer-valued inputs, whose
   logits are exact in any summation order: the masks must be identical; then real-valued inputs,
   where last-bit differences of the dots may swap near-tied blocks: the share of identical rows is
   reported), and the attention kernel against the reference on the same mask (max errors).
2. Optionally (--tune) a small sweep of Triton num_warps / num_stages at one length.
3. A table per T with Gemma-3-4B-like heads (8 query heads, 4 kv heads, head dim 256, bf16, scale
   1/16, default StreamConfig): estimate (xla, pallas), sparse attention + mass (xla, pallas),
   cuDNN dense causal attention (jax.nn.dot_product_attention, implementation="cudnn"), with achieved
   TFLOP/s (useful FLOPs: the dots the algorithm needs) against the measured bf16 matmul ceiling.
"pallas" is what `backend="pallas"` runs: on Hopper the Mosaic GPU ports where they take the call
(`backend="triton"` runs the Triton kernels; benchmarks/mosaic.py compares both).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import stream_jax as sj
from stream_jax.numerics import num_rounds
from stream_jax.kernels import blocksparse_triton as kattention
from stream_jax.kernels import estimate_triton as kestimate

N_HEADS, KV_HEADS, HEAD_DIM = 8, 4, 256
SCALE = 256 ** -0.5  # Gemma 3: query_pre_attn_scalar 256
INTERPRET = False  # --interpret: smoke-test the script on a CPU


def log(*args):
  print(*args, flush=True)


def timeit(fn, *args, reps=5, warmup=1):
  """Median wall time in ms of fn(*args) (jit-compiled before timing)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def make_qkv(t, seed=0, dtype=jnp.bfloat16, integer=False):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  shapes = [(t, N_HEADS, HEAD_DIM), (t, KV_HEADS, HEAD_DIM), (t, KV_HEADS, HEAD_DIM)]
  if integer:
    return tuple(jax.random.randint(key, s, -3, 4).astype(dtype) for key, s in zip((kq, kk, kv), shapes))
  return tuple(jax.random.normal(key, s, dtype) for key, s in zip((kq, kk, kv), shapes))


def ceilings():
  """Measured bf16 matmul TFLOP/s and device-to-device copy GB/s (read + write)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (8192, 8192), jnp.bfloat16)
  mm = jax.jit(lambda x: x @ x)
  ms = timeit(mm, a, reps=10)
  tflops = 2 * 8192 ** 3 / ms / 1e9
  x = jnp.ones((1 << 28,), jnp.float32)  # 1 GiB
  cp = jax.jit(lambda y: y * 1.0001)
  ms = timeit(cp, x, reps=10)
  gbs = 2 * x.nbytes / ms / 1e6
  return tflops, gbs


# ---- useful work (FLOPs) of each algorithm ----

def estimate_flops(t, cfg):
  """Dots the hierarchical search needs: per query block, 2 top_k children per round."""
  n_q, n_k = -(-t // cfg.block_q), -(-t // cfg.block_k)
  r = cfg.block_q // cfg.query_stride
  total = 0
  for j in range(n_q):
    diag = (min((j + 1) * cfg.block_q, t) - 1) // cfg.block_k
    n = max(diag - cfg.window_blocks + 1 - cfg.sink_blocks, 0)
    if n <= cfg.top_k:
      continue
    rounds = min(num_rounds(n_k, cfg.branches), math.ceil(math.log2(-(-n // cfg.branches))))
    total += 2 * cfg.top_k * rounds
  return total * 2 * r * cfg.block_k * HEAD_DIM * N_HEADS


def attention_flops(mask):
  return float(np.asarray(mask.counts, np.float64).sum()) * 4 * mask.block_q * mask.block_k * HEAD_DIM


def dense_flops(t):
  return 4 * N_HEADS * HEAD_DIM * t * (t + 1) / 2


# ---- the functions timed ----

def est_fn(backend, cfg, **kw):
  if backend == "pallas":
    f = lambda q, k: kestimate.estimate_mask(q, k, cfg, scale=SCALE, interpret=INTERPRET, **kw)
  else:
    f = lambda q, k: sj.estimate_mask(q, k, cfg, scale=SCALE, backend="xla")
  return jax.jit(lambda q, k: (lambda m: (m.indices, m.counts))(f(q, k)))


def attn_fn(backend, cfg, t, **kw):
  def f(q, k, v, idx, cnt):
    mask = sj.BlockMask(idx, cnt, cfg.block_q, cfg.block_k, t, t, cfg)
    if backend == "pallas":
      out, st = kattention.sparse_attention(q, k, v, mask, scale=SCALE, interpret=INTERPRET, **kw)
    else:
      out, st = sj.sparse_attention(q, k, v, mask, scale=SCALE, backend="xla")
    return out, st.mass, st.lse
  return jax.jit(f)


def cudnn_fn():
  return jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      q[None], k[None], v[None], scale=SCALE, is_causal=True, implementation="cudnn")[0])


def check(cfg, t, results):
  """Kernel == reference on the GPU."""
  log(f"\n## correctness at T={t}")
  xla_est, pal_est = est_fn("xla", cfg), est_fn("pallas", cfg)
  for integer in (True, False):
    q, k, v = make_qkv(t, seed=1, integer=integer)
    ri, rc = xla_est(q, k)
    gi, gc = pal_est(q, k)
    ri, gi = np.asarray(ri), np.asarray(gi)
    same_rows = float((ri == gi).all(-1).mean())
    overlap = np.mean([len(set(a[a >= 0]) & set(b[b >= 0])) / max(1, len(set(a[a >= 0])))
                       for a, b in zip(ri.reshape(-1, ri.shape[-1]), gi.reshape(-1, gi.shape[-1]))])
    counts_equal = bool(np.array_equal(np.asarray(rc), np.asarray(gc)))
    name = "integer" if integer else "normal"
    log(f"estimate ({name} inputs): identical rows {same_rows:.5f}, block overlap {overlap:.5f}, "
        f"counts equal {counts_equal}")
    results[f"check_estimate_{name}"] = dict(identical_rows=same_rows, overlap=float(overlap),
                                             counts_equal=counts_equal)
  q, k, v = make_qkv(t, seed=2)
  idx, cnt = xla_est(q, k)
  ro, rm, rl = attn_fn("xla", cfg, t)(q, k, v, idx, cnt)
  go, gm, gl = attn_fn("pallas", cfg, t)(q, k, v, idx, cnt)
  err_out = float(jnp.max(jnp.abs(ro.astype(jnp.float32) - go.astype(jnp.float32))))
  err_mass = float(jnp.max(jnp.abs(rm - gm)))
  err_lse = float(jnp.max(jnp.abs(rl - gl)))
  log(f"attention: max |out diff| {err_out:.3g} (bf16 out), max |mass diff| {err_mass:.3g} "
      f"(row sums {cfg.block_q}), max |lse diff| {err_lse:.3g}")
  results["check_attention"] = dict(out=err_out, mass=err_mass, lse=err_lse)


def tune(cfg, t, results):
  log(f"\n## tuning at T={t} (ms)")
  q, k, v = make_qkv(t)
  best = {}
  for kind in ("estimate", "attention"):
    rows = []
    for warps in (4, 8):
      for stages in ((2,) if kind == "estimate" else (2, 3)):
        try:
          if kind == "estimate":
            ms = timeit(est_fn("pallas", cfg, num_warps=warps, num_stages=stages), q, k, reps=3)
          else:
            idx, cnt = est_fn("pallas", cfg)(q, k)
            ms = timeit(attn_fn("pallas", cfg, t, num_warps=warps, num_stages=stages), q, k, v, idx,
                        cnt, reps=5)
        except Exception as e:  # pylint: disable=broad-except
          log(f"{kind} warps={warps} stages={stages}: FAILED {type(e).__name__}: {str(e)[:200]}")
          continue
        rows.append((ms, warps, stages))
        log(f"{kind} warps={warps} stages={stages}: {ms:.3f}")
    if rows:
      ms, warps, stages = min(rows)
      best[kind] = dict(num_warps=warps, num_stages=stages)
  results["tuned"] = best
  return best


def bench(cfg, seqs, best, reps, results, tflops_peak, gbs_peak):
  table = []
  for t in seqs:
    log(f"\n## T={t}")
    q, k, v = make_qkv(t)
    row = dict(T=t)
    timers = [
        ("est_xla", lambda: timeit(est_fn("xla", cfg), q, k, reps=reps)),
        ("est_pallas", lambda: timeit(est_fn("pallas", cfg, **best.get("estimate", {})), q, k,
                                      reps=reps)),
    ]
    for name, run in timers:
      try:
        row[name] = run()
        log(f"{name}: {row[name]:.3f} ms")
      except Exception as e:  # pylint: disable=broad-except
        log(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}")
    idx, cnt = est_fn("pallas", cfg, **best.get("estimate", {}))(q, k)
    mask = sj.BlockMask(idx, cnt, cfg.block_q, cfg.block_k, t, t, cfg)
    try:  # agreement with the reference on these (real-valued) inputs
      ref_idx = np.asarray(est_fn("xla", cfg)(q, k)[0])
      row["same_rows"] = float((ref_idx == np.asarray(idx)).all(-1).mean())
      log(f"pallas mask rows identical to xla: {row['same_rows']:.5f}")
      del ref_idx
    except Exception as e:  # pylint: disable=broad-except
      log(f"mask comparison FAILED {type(e).__name__}: {str(e)[:300]}")
    row["density"] = float(np.asarray(sj.block_density(mask)).mean())
    for name, run in [
        ("attn_xla", lambda: timeit(attn_fn("xla", cfg, t), q, k, v, idx, cnt, reps=reps)),
        ("attn_pallas", lambda: timeit(attn_fn("pallas", cfg, t, **best.get("attention", {})), q, k,
                                       v, idx, cnt, reps=reps)),
        ("cudnn", lambda: timeit(cudnn_fn(), q, k, v, reps=reps)),
    ]:
      try:
        row[name] = run()
        log(f"{name}: {row[name]:.3f} ms")
      except Exception as e:  # pylint: disable=broad-except
        log(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}")
    row["est_tflops"] = estimate_flops(t, cfg) / row["est_pallas"] / 1e9 if "est_pallas" in row else None
    row["attn_tflops"] = attention_flops(mask) / row["attn_pallas"] / 1e9 if "attn_pallas" in row else None
    row["cudnn_tflops"] = dense_flops(t) / row["cudnn"] / 1e9 if "cudnn" in row else None
    # Key-block bytes the estimator requests (each scored child reads one bk x H bf16 block).
    est_bytes = estimate_flops(t, cfg) / (2 * (cfg.block_q // cfg.query_stride)) * 2
    row["est_gbs"] = est_bytes / row["est_pallas"] / 1e6 if "est_pallas" in row else None
    table.append(row)
    del q, k, v, idx, cnt, mask
  results["table"] = table
  results["ceilings"] = dict(bf16_matmul_tflops=tflops_peak, copy_gbs=gbs_peak)
  return table


def fmt(x, spec=".2f"):
  return "—" if x is None else format(x, spec)


def markdown(table, tflops_peak, gbs_peak):
  lines = [
      "| T | density | estimate xla (ms) | estimate pallas (ms) | xla/pallas | attn+mass xla (ms) | "
      "attn+mass pallas (ms) | xla/pallas | cuDNN dense causal (ms) | (est+attn pallas)/cuDNN | "
      "est TFLOP/s | est GB/s req. | attn TFLOP/s | cuDNN TFLOP/s | mask rows = xla |",
      "|" + "---|" * 15,
  ]
  for r in table:
    ratio = lambda a, b: (r[a] / r[b]) if a in r and b in r else None
    both = (r["est_pallas"] + r["attn_pallas"]) / r["cudnn"] if all(
        x in r for x in ("est_pallas", "attn_pallas", "cudnn")) else None
    lines.append(
        f"| {r['T']} | {r['density']:.4f} | {fmt(r.get('est_xla'))} | {fmt(r.get('est_pallas'))} | "
        f"{fmt(ratio('est_xla', 'est_pallas'))}x | {fmt(r.get('attn_xla'))} | "
        f"{fmt(r.get('attn_pallas'))} | {fmt(ratio('attn_xla', 'attn_pallas'))}x | "
        f"{fmt(r.get('cudnn'))} | {fmt(both, '.3f')} | {fmt(r.get('est_tflops'), '.1f')} | "
        f"{fmt(r.get('est_gbs'), '.0f')} | {fmt(r.get('attn_tflops'), '.1f')} | "
        f"{fmt(r.get('cudnn_tflops'), '.1f')} | {fmt(r.get('same_rows'), '.4f')} |")
  lines.append(f"\nCeilings measured in the same run: bf16 matmul {tflops_peak:.0f} TFLOP/s "
               f"(8192^3), device copy {gbs_peak:.0f} GB/s (read + write).")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seq", default="8192,32768,131072")
  p.add_argument("--check-seq", type=int, default=4096)
  p.add_argument("--tune", action="store_true")
  p.add_argument("--tune-seq", type=int, default=32768)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--out", default=None)
  p.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU smoke test)")
  args = p.parse_args(argv)
  global INTERPRET  # pylint: disable=global-statement
  INTERPRET = args.interpret
  cfg = sj.StreamConfig()
  results = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                 date=datetime.date.today().isoformat(), command=" ".join(sys.argv), config=str(cfg))
  log(json.dumps({k: results[k] for k in ("device", "jax", "date", "config")}))
  tflops_peak, gbs_peak = ceilings()
  log(f"ceilings: bf16 matmul {tflops_peak:.0f} TFLOP/s, copy {gbs_peak:.0f} GB/s")
  try:
    check(cfg, args.check_seq, results)
  except Exception:  # pylint: disable=broad-except
    log("CHECK FAILED\n" + traceback.format_exc())
  best = {}
  if args.tune:
    try:
      best = tune(cfg, args.tune_seq, results)
    except Exception:  # pylint: disable=broad-except
      log("TUNE FAILED\n" + traceback.format_exc())
  log(f"launch params: {best or 'defaults'}")
  seqs = [int(x) for x in args.seq.split(",")]
  table = bench(cfg, seqs, best, args.reps, results, tflops_peak, gbs_peak)
  md = markdown(table, tflops_peak, gbs_peak)
  log("\n" + md)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
      json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "kernels.md"), "w") as f:
      f.write(md + "\n")


if __name__ == "__main__":
  main()
