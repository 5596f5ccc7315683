"""Scale of the trace viewer: a synthetic trace of the Gemma 3 4B config's shape at 1,048,576 tokens.

34 layers (every 6th global: top_k 16 + 1 sink + 2 window blocks = capacity 19, exact coverage; the others
sliding-window 1024 as a block band), 8 query heads, blocks of 64: 16,384 query blocks. Measures, on the CPU
with headless Chromium (the Debian packages chromium + chromium-driver, Selenium):

  export       tile pyramid + text + manifest written once (goal <= 60 s)
  first paint  navigation -> overview and the first block map drawn with all its tiles (goal <= 3 s)
  interactions hover a block, zoom, pan, switch head / layer, head mean, click a unit, search (goal
               <= 200 ms each): from the input to the page showing the result, measured in the page
  memory       the browser's processes (proportional set size, summed) at the end (goal <= 1 GB)

    python benchmarks/viewer.py                    # the 1M-token run
    python benchmarks/viewer.py --tokens 65536     # quicker
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from stream_jax.mask import BlockMask  # noqa: E402
from stream_jax.trace import LayerTrace, Trace  # noqa: E402
from stream_jax.viewer import export_viewer, serve  # noqa: E402


def synthetic_trace(tokens: int, layers: int = 34, heads: int = 8, block: int = 64, top_k: int = 16,
                    window: int = 1024, seed: int = 0) -> Trace:
  """Random kept sets of the Stream layout (sink, top_k searched, 2 window blocks; early rows dense) and
  random mass that sums to each block's queries; window layers keep the exact band."""
  rng = np.random.default_rng(seed)
  n = tokens // block
  cap = 1 + top_k + 2
  j = np.arange(n)
  out = []
  for layer in range(layers):
    if (layer + 1) % 6 == 0:  # global
      pick = rng.integers(1, np.maximum(j - 1, 2)[:, None], (heads, n, top_k))
      cand = np.concatenate([np.zeros((heads, n, 1), np.int64), pick, np.broadcast_to(j[:, None] - 1, (heads, n, 1)),
                             np.broadcast_to(j[:, None], (heads, n, 1))], -1)
      cand = np.where((cand >= 0) & (cand <= j[:, None]), cand, n)
      cand = np.sort(cand, -1)
      cand = np.where(np.diff(cand, axis=-1, prepend=-1) > 0, cand, n)
      idx = np.sort(cand, -1)
      idx = np.where(idx < n, idx, -1).astype(np.int32)
      cov = rng.uniform(0.6, 1.0, (heads, n)).astype(np.float32)
      kind, mode, win = "global", "exact", None
    else:
      lo = np.maximum(j * block - window + 1, 0) // block
      c = (block + window - 2) // block + 2
      ids = lo[:, None] + np.arange(c)
      idx = np.broadcast_to(np.where(ids <= j[:, None], ids, -1), (heads, n, c)).astype(np.int32)
      cov, kind, mode, win = None, "local", "window", window
    w = rng.exponential(1.0, idx.shape).astype(np.float32) * (idx >= 0)
    mass = (w / w.sum(-1, keepdims=True) * block * (1.0 if cov is None else cov[..., None])).astype(np.float32)
    mask = BlockMask(idx, (idx >= 0).sum(-1).astype(np.int32), block, block, tokens, tokens)
    out.append(LayerTrace(mask, mass, layer, kind, mode, win, cov))
  return Trace(tuple(out))


WAIT_JS = """
const [action, done] = [arguments[0], arguments[arguments.length - 1]];
const t0 = performance.now();
Promise.resolve(eval(action)).then(() => {
  const poll = () => SJV.app.idle() ? done(performance.now() - t0) : requestAnimationFrame(poll);
  requestAnimationFrame(poll);
});
"""


def timed(d, action: str) -> float:
  """ms from running `action` in the page until it is idle again (tiles loaded, map drawn)."""
  return float(d.execute_async_script(WAIT_JS, action))


def browser_memory(profile: str) -> tuple[float, float]:
  """(PSS, RSS) in MB summed over the Chromium processes of this profile."""
  pss = rss = 0
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      cmd = open(f"/proc/{pid}/cmdline", "rb").read()
      if b"chrom" not in cmd:
        continue
      if profile.encode() not in cmd and not _child_of_profile(pid, profile):
        continue
      for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith("Pss:"):
          pss += int(line.split()[1])
        elif line.startswith("Rss:"):
          rss += int(line.split()[1])
    except OSError:
      continue
  return pss / 1024, rss / 1024


def _child_of_profile(pid: str, profile: str) -> bool:
  """Renderer processes do not carry --user-data-dir; walk up to the browser process."""
  for _ in range(4):
    try:
      ppid = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]
      if profile.encode() in open(f"/proc/{ppid}/cmdline", "rb").read():
        return True
      pid = ppid
    except OSError:
      return False
  return False


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tokens", type=int, default=1 << 20)
  p.add_argument("--layers", type=int, default=34)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--out", default=None, help="viewer folder (default: a temporary one, removed)")
  args = p.parse_args(argv)

  t0 = time.perf_counter()
  trace = synthetic_trace(args.tokens, args.layers, args.heads)
  print(f"synthetic trace: {args.tokens:,} tokens, {args.layers} layers x {args.heads} heads, "
        f"{trace.nbytes() / 2**20:.0f} MiB, made in {time.perf_counter() - t0:.1f} s", flush=True)
  pieces = [f"w{i} " for i in range(args.tokens)]
  pieces[args.tokens * 3 // 4] = "NEEDLE "
  cuts = np.cumsum(np.random.default_rng(1).integers(10, 40, args.tokens // 10))
  cuts = np.concatenate([[0], cuts[cuts < args.tokens], [args.tokens]])
  sentences = np.stack([cuts[:-1], cuts[1:]], -1)  # ~25-token sentences (too many for vertical scores)
  n_s = len(sentences)
  tmp = None
  out = args.out or (tmp := tempfile.mkdtemp(prefix="sjv-bench-"))
  t0 = time.perf_counter()
  folder = export_viewer(pathlib.Path(out) / "viewer", trace, pieces=pieces, sentences=sentences, title=f"synthetic 4B-shaped trace, "
                         f"{args.tokens:,} tokens")
  export_s = time.perf_counter() - t0
  size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
  print(f"export: {export_s:.1f} s, {size / 2**20:.0f} MiB on disk, {n_s:,} sentences", flush=True)
  del trace

  from test_viewer_browser import make_driver, wait_idle  # pylint: disable=import-outside-toplevel
  import pytest  # noqa: F401  (make_driver skips through pytest when Chromium is missing)
  server = serve(folder)
  d = make_driver()
  rows = []
  try:
    d.get(server.url)
    wait_idle(d, timeout=120)
    first = d.execute_script("return SJV.app.firstPaint")
    rows.append(("first paint (overview + block map)", first, 3000))
    # search at once, while the background text load is still running: the search index picks the chunks
    loading = d.execute_script("return SJV.app.text.prefetchMs === undefined")
    t = timed(d, "SJV.app.search('NEEDLE')")
    assert d.execute_script("return +document.getElementById('search-result').dataset.token") == args.tokens * 3 // 4
    rows.append((f"search 'NEEDLE' right after first paint ({'text still loading' if loading else 'text loaded'})",
                 t, 200))
    d.execute_script("SJV.app.searchFrom = 0")
    n_q = args.tokens // 64
    g = 5  # first global layer
    inter = [
        ("zoom in x2 (wheel-equivalent)", "SJV.app.map.zoom(0.5)"),
        ("zoom to 48 blocks around the middle", f"SJV.app.map.centre({n_q // 2}, {n_q // 3}, 48)"),
        ("pan by half a screen", "SJV.app.map.view.x0 += 24; SJV.app.map.request()"),
        ("hover a block (text, mass, rank)", None),
        ("switch head", f"SJV.app.select({g}, 3)"),
        ("head mean (8 heads)", f"SJV.app.select({g}, -1)"),
        ("switch layer (overview click)", f"document.querySelector('#overview td[data-layer=\"{g + 6}\"][data-head=\"1\"]').click()"),
        ("whole document", "SJV.app.map.fitAll()"),
        ("text view: jump to a sentence far away", f"SJV.app.text.show({n_s // 2})"),
        ("click a sentence (targets + who attends to it)", f"SJV.app.text.select({n_s // 2})"),
        ("search 'NEEDLE' (3/4 into the text; text loaded)", "SJV.app.prefetched.then(() => null)"),
    ]
    for name, action in inter:
      if action is None:
        xy = d.execute_script(f"return SJV.app.map.cellCentre({n_q // 2}, {n_q // 3})")
        d.execute_cdp_cmd("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": xy["x"], "y": xy["y"]})
        wait_idle(d)
        t = d.execute_script("return SJV.app.map.lastHoverMs")
      elif action.startswith("SJV.app.prefetched"):  # wait for the background text load, then search
        d.execute_async_script("SJV.app.prefetched.then(arguments[0])")
        rows.append(("  (background text load after first paint)", d.execute_script("return SJV.app.text.prefetchMs"), 0))
        t = timed(d, "SJV.app.search('NEEDLE')")
        assert d.execute_script("return +document.getElementById('search-result').dataset.token") == args.tokens * 3 // 4
      else:
        t = timed(d, action)
      if name.startswith("click a sentence"):
        rows.append(("click a sentence: its targets shown", d.execute_script("return SJV.app.text.targetsMs"), 200))
        name = "click a sentence: + who attends to it (index)"
      rows.append((name, t, 200))
    pss, rss = browser_memory(d.profile_dir)
  finally:
    d.quit()
    server.shutdown()
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
  print(f"\n{'measure':46s} {'value':>10s} {'goal':>8s}")
  print(f"{'tile export (s)':46s} {export_s:10.1f} {60:8d}  {'ok' if export_s <= 60 else 'MISSED'}")
  for name, ms, goal in rows:
    verdict = "" if not goal else "ok" if ms <= goal else "MISSED"
    print(f"{name + ' (ms)':46s} {ms:10.0f} {goal or '':>8}  {verdict}")
  print(f"{'browser memory, PSS summed (MB)':46s} {pss:10.0f} {1024:8d}  {'ok' if pss <= 1024 else 'MISSED'}")
  print(f"{'browser memory, RSS summed (MB, overcounts)':46s} {rss:10.0f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
