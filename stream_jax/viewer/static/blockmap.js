"use strict";
// The block map of one layer and head (or the mean over heads): query blocks down, key blocks across,
// colour = attention share. The view is (x0, y0, bpp): the key / query block at the canvas' top-left corner
// and blocks per canvas pixel. It draws from the pyramid level whose cells are about one pixel, and fetches
// only the tiles (row ranges) of that level that are on screen. With a second trace (the export's `compare`,
// e.g. the dense trace next to the sparse one) two BlockMaps share one view (zoom, pan) and one hover: the
// second reads its tiles under compare/ (`src`).

(function (SJV) {
  // White -> yellow -> red -> purple: share of attention on a log scale from 1e-4 to 1.
  const STOPS = [[255, 247, 188], [254, 196, 79], [236, 112, 20], [189, 0, 38], [84, 0, 110]];

  function colour(v) {
    let t = (Math.log10(Math.max(v, 1e-12)) + 4) / 4;
    t = Math.min(1, Math.max(0, t)) * (STOPS.length - 1);
    const i = Math.min(STOPS.length - 2, Math.floor(t)), f = t - i;
    const a = STOPS[i], b = STOPS[i + 1];
    return [a[0] + f * (b[0] - a[0]), a[1] + f * (b[1] - a[1]), a[2] + f * (b[2] - a[2])];
  }

  // Queries in pooled row r of a level with factor f (the last block may be partial).
  function rowQueries(L, f, r) {
    return Math.min((r + 1) * f * L.block_q, L.q_len) - r * f * L.block_q;
  }

  class BlockMap {
    constructor(canvas, app, src = "", shared = null) {
      this.canvas = canvas;
      this.ctx = canvas.getContext("2d");
      this.app = app;
      this.data = app.data;
      this.src = src; // "": the trace's tiles; "compare/": the second trace's
      this.shared = shared || { view: { x0: 0, y0: 0, bpp: 1 }, agg: "sum" }; // one view for synced maps
      this.peers = [this]; // the maps sharing the view (this one included)
      this.box = canvas.parentElement ? canvas.parentElement.querySelector(".hoverbox") : null;
      this.drawPending = false;
      this.lastDraw = null; // {z, missing}
      this.hoverSeq = 0;
      this.bind();
    }

    get view() { return this.shared.view; }
    set view(v) { this.shared.view = v; }
    get agg() { return this.shared.agg; }
    set agg(a) { this.shared.agg = a; }
    get L() { return this.app.layerInfo(); } // geometry (blocks, levels): the same for both traces
    // This map's layer entry: the trace's, or the compare trace's layer of the same id (null: it has none).
    source() { return this.src ? this.app.compareLayer() : this.L; }
    heads() { return this.app.head < 0 ? [...Array(this.data.m.num_heads).keys()] : [this.app.head]; }

    fitAll() {
      const L = this.L;
      const n = Math.max(Math.ceil(L.q_len / L.block_q), Math.ceil(L.k_len / L.block_k));
      this.view = { x0: 0, y0: 0, bpp: n / Math.min(this.canvas.width, this.canvas.height) };
      this.request();
    }

    // Shows query blocks [q0, q0 + span) and key blocks [k0, k0 + span).
    showBlocks(q0, k0, span) {
      this.view = { x0: k0, y0: q0, bpp: span / Math.min(this.canvas.width, this.canvas.height) };
      this.request();
    }

    // Centres the view on block (q, k), `span` blocks across.
    centre(q, k, span) {
      const w = this.canvas.width, h = this.canvas.height, bpp = span / Math.min(w, h);
      this.view = { x0: k + 0.5 - (w * bpp) / 2, y0: q + 0.5 - (h * bpp) / 2, bpp };
      this.request();
    }

    level() {
      const levels = this.L.levels;
      const z = Math.max(0, Math.floor(Math.log2(this.view.bpp) + 1e-9));
      return Math.min(z, levels.length - 1);
    }

    // Client (page) coordinates of the centre of level-0 cell (q, k): for tests and tools.
    cellCentre(q, k) {
      const c = this.canvas, rect = c.getBoundingClientRect();
      const sx = c.clientWidth / c.width, sy = c.clientHeight / c.height;
      return { x: rect.left + c.clientLeft + ((k + 0.5 - this.view.x0) / this.view.bpp) * sx,
               y: rect.top + c.clientTop + ((q + 0.5 - this.view.y0) / this.view.bpp) * sy };
    }

    request() { for (const m of this.peers) m.requestOne(); }

    requestOne() {
      if (this.drawPending) return;
      this.drawPending = true;
      requestAnimationFrame(() => { this.drawPending = false; this.draw(); });
    }

    // Tiles of level z covering the visible rows, per head; null entries are still loading.
    visibleTiles(z) {
      const L = this.L, lev = L.levels[z], f = 2 ** z, R = this.data.m.tile_rows;
      const h = this.canvas.height * this.view.bpp;
      const r0 = Math.max(0, Math.floor(this.view.y0 / f)), r1 = Math.min(lev.rows, Math.ceil((this.view.y0 + h) / f));
      const out = [];
      for (let t = Math.floor(r0 / R); r1 > r0 && t <= Math.floor((r1 - 1) / R); t++) {
        for (const head of this.heads()) out.push({ t, head, tile: this.data.tile(L.layer, head, z, t, true, this.src) });
      }
      return { out, r0, r1 };
    }

    draw() {
      const t0 = performance.now();
      const W = this.canvas.width, H = this.canvas.height, v = this.view, L = this.L;
      const z = this.level(), f = 2 ** z, R = this.data.m.tile_rows, heads = this.heads().length;
      const { out, r0, r1 } = this.source() ? this.visibleTiles(z) : { out: [], r0: 0, r1: 0 };
      const val = new Float32Array(W * H);
      let missing = 0;
      for (const { t, tile } of out) {
        if (!tile) { missing++; continue; }
        const lo = Math.max(r0, t * R), hi = Math.min(r1, t * R + tile.rows);
        for (let r = lo; r < hi; r++) {
          const rr = r - t * R, q = rowQueries(L, f, r);
          const py0 = Math.max(0, Math.floor((r * f - v.y0) / v.bpp));
          const py1 = Math.min(H, Math.max(py0 + 1, Math.floor(((r + 1) * f - v.y0) / v.bpp)));
          if (py0 >= H || py1 <= 0) continue;
          for (let e = tile.rowptr[rr]; e < tile.rowptr[rr + 1]; e++) {
            const c = tile.cols[e];
            const px0 = Math.max(0, Math.floor((c * f - v.x0) / v.bpp));
            if (px0 >= W) break;
            const px1 = Math.min(W, Math.max(px0 + 1, Math.floor(((c + 1) * f - v.x0) / v.bpp)));
            if (px1 <= 0) continue;
            const x = this.agg === "max" ? tile.max[e] / Math.min(q, L.block_q) : tile.sum[e] / q;
            const s = x / heads;
            for (let py = py0; py < py1; py++) {
              const base = py * W;
              for (let px = px0; px < px1; px++) {
                // the mean over heads sums; a pixel holding several cells keeps the largest
                if (heads > 1) val[base + px] += s; else if (s > val[base + px]) val[base + px] = s;
              }
            }
          }
        }
      }
      const img = this.ctx.createImageData(W, H);
      const px = img.data;
      for (let i = 0; i < W * H; i++) {
        const o = 4 * i;
        if (val[i] > 0) {
          const c = colour(val[i]);
          px[o] = c[0]; px[o + 1] = c[1]; px[o + 2] = c[2];
        } else { px[o] = 255; px[o + 1] = 255; px[o + 2] = 255; }
        px[o + 3] = 255;
      }
      this.ctx.putImageData(img, 0, 0);
      if (!this.source()) {
        this.ctx.fillStyle = "#888"; this.ctx.font = "14px sans-serif";
        this.ctx.fillText(`layer ${L.layer} is not in this trace`, 16, 24);
      }
      this.overlay();
      this.placeBox();
      this.lastDraw = { z, missing, ms: performance.now() - t0 };
      if (!missing && this.app.firstPaint === undefined) this.app.firstPaint = performance.now(); // since navigation
      const info = document.getElementById("level");
      if (info && !this.src) {
        info.textContent = `level ${z} (${f}\u00d7${f} blocks per cell)` + (missing ? `, loading ${missing} tile(s)` : "");
        info.dataset.level = z;
      }
    }

    // The diagonal, the needle's key blocks, the selected sentence's rows and targets, the search mark.
    overlay() {
      const ctx = this.ctx, v = this.view, L = this.L, W = this.canvas.width, H = this.canvas.height;
      const X = (k) => (k - v.x0) / v.bpp, Y = (q) => (q - v.y0) / v.bpp;
      const off = (L.k_len - L.q_len) / L.block_k, ratio = L.block_q / L.block_k;
      ctx.strokeStyle = "rgba(0,0,0,0.15)"; ctx.lineWidth = 1;
      ctx.beginPath(); ctx.moveTo(X(off), Y(0)); ctx.lineTo(X(off + ratio * 1e7), Y(1e7)); ctx.stroke();
      const needle = this.data.m.needle;
      if (needle) {
        ctx.fillStyle = "rgba(0,160,60,0.85)";
        for (const b of needle.blocks) ctx.fillRect(X(b), 0, Math.max(2, 1 / v.bpp), 6);
      }
      const sel = this.app.selection;
      if (sel && sel.layer === L.layer) {
        ctx.fillStyle = "rgba(30,90,200,0.12)";
        ctx.fillRect(0, Y(sel.q0), W, Math.max(1, Y(sel.q1) - Y(sel.q0)));
        ctx.strokeStyle = "rgba(30,90,200,0.9)"; ctx.lineWidth = 2;
        for (const t of sel.cells) {
          ctx.strokeRect(X(t.k), Y(t.q), Math.max(2, 1 / v.bpp), Math.max(2, 1 / v.bpp));
        }
      }
      const mark = this.app.mark;
      if (mark) {
        ctx.strokeStyle = "rgba(0,140,0,0.9)"; ctx.lineWidth = 1;
        ctx.beginPath(); ctx.moveTo(0, Y(mark.q + 0.5)); ctx.lineTo(W, Y(mark.q + 0.5));
        ctx.moveTo(X(mark.k + 0.5), 0); ctx.lineTo(X(mark.k + 0.5), H); ctx.stroke();
      }
    }

    zoom(factor, cx, cy) {
      const v = this.view, L = this.L;
      const n = Math.max(Math.ceil(L.q_len / L.block_q), Math.ceil(L.k_len / L.block_k));
      const maxBpp = (1.2 * n) / Math.min(this.canvas.width, this.canvas.height);
      const bpp = Math.min(maxBpp, Math.max(1 / 96, v.bpp * factor));
      if (cx === undefined) { cx = this.canvas.width / 2; cy = this.canvas.height / 2; }
      this.view = { x0: v.x0 + cx * (v.bpp - bpp), y0: v.y0 + cy * (v.bpp - bpp), bpp };
      this.request();
    }

    canvasXY(ev) {
      // inside the border: the canvas' pixels start at clientLeft / clientTop
      const c = this.canvas, rect = c.getBoundingClientRect();
      return [(ev.clientX - rect.left - c.clientLeft) * (c.width / c.clientWidth),
              (ev.clientY - rect.top - c.clientTop) * (c.height / c.clientHeight)];
    }

    bind() {
      const c = this.canvas;
      c.addEventListener("wheel", (ev) => {
        ev.preventDefault();
        const [x, y] = this.canvasXY(ev);
        this.zoom(ev.deltaY > 0 ? 1.25 : 0.8, x, y);
      }, { passive: false });
      let drag = null;
      c.addEventListener("mousedown", (ev) => { drag = { xy: this.canvasXY(ev), v: { ...this.view }, moved: false }; });
      window.addEventListener("mouseup", () => { drag = null; });
      c.addEventListener("mousemove", (ev) => {
        const [x, y] = this.canvasXY(ev);
        if (drag) {
          const dx = x - drag.xy[0], dy = y - drag.xy[1];
          if (Math.abs(dx) + Math.abs(dy) > 2) drag.moved = true;
          if (drag.moved) {
            this.view = { ...drag.v, x0: drag.v.x0 - dx * drag.v.bpp, y0: drag.v.y0 - dy * drag.v.bpp };
            this.request();
            return;
          }
        }
        this.hover(x, y, ev.timeStamp);
      });
      c.addEventListener("dblclick", (ev) => { const [x, y] = this.canvasXY(ev); this.zoom(0.25, x, y); });
      c.addEventListener("mouseleave", () => { /* keep the last hover shown: it can be read and copied */ });
    }

    // The hovered cell's outline on this map (a positioned box: no redraw of the canvas).
    placeBox() {
      const cell = this.shared.hover, box = this.box;
      if (!box) return;
      if (!cell) { box.hidden = true; return; }
      const v = this.view, c = this.canvas, s = c.clientWidth / c.width, f = 2 ** cell.z;
      box.hidden = false;
      box.style.left = `${c.offsetLeft + c.clientLeft + ((cell.c * f - v.x0) / v.bpp) * s}px`;
      box.style.top = `${c.offsetTop + c.clientTop + ((cell.r * f - v.y0) / v.bpp) * s}px`;
      box.style.width = box.style.height = `${Math.max(3, (f / v.bpp) * s)}px`;
    }

    // Per head of this map's trace: cell (r, c) of level z in the cached tiles (rank in its row, row size).
    hitsAt(r, c, z) {
      const L = this.source(), R = this.data.m.tile_rows, hits = [];
      if (!L) return hits;
      for (const head of this.heads()) {
        const tile = this.data.tile(L.layer, head, z, Math.floor(r / R), false, this.src);
        if (!tile) continue;
        const rr = r % R, a = tile.rowptr[rr], b = tile.rowptr[rr + 1];
        const e = SJV.findCol(tile.cols, a, b, c);
        const rank = e < 0 ? 0 : 1 + this.rankOf(tile, a, b, e);
        hits.push({ head, e, tile, a, b, rr, rank, count: b - a });
      }
      return hits;
    }

    // Fills the hover panel for the cell under canvas pixel (x, y): every synced map's numbers.
    async hover(x, y, t0 = performance.now()) {
      const seq = ++this.hoverSeq, v = this.view, L = this.L, z = this.level(), f = 2 ** z;
      const qb = v.y0 + y * v.bpp, kb = v.x0 + x * v.bpp;
      const r = Math.floor(qb / f), c = Math.floor(kb / f), lev = L.levels[z];
      const panel = document.getElementById("hover");
      if (r < 0 || c < 0 || r >= lev.rows || c >= lev.cols) { panel.innerHTML = ""; return; }
      this.shared.hover = { r, c, z };
      for (const m of this.peers) m.placeBox();
      const groups = this.peers.map((m) => ({ map: m, hits: m.hitsAt(r, c, z) }));
      this.app.busy++;
      try {
        const html = z === 0 ? await this.hoverBlock(r, c, groups) : this.hoverPooled(r, c, f, groups);
        if (seq === this.hoverSeq) {
          panel.innerHTML = html;
          this.lastHoverMs = performance.now() - t0; // input event -> panel filled (the benchmark reads it)
        }
      } finally { this.app.busy--; }
    }

    // Rank of entry e among the row's entries: by descending mass, ties to the lower block id.
    rankOf(tile, a, b, e) {
      let n = 0;
      const m = tile.sum[e], col = tile.cols[e];
      for (let i = a; i < b; i++) {
        if (tile.sum[i] > m || (tile.sum[i] === m && tile.cols[i] < col)) n++;
      }
      return n;
    }

    // Label of a map's lines in the hover panel (only when two traces are shown).
    sourceLabel(m) {
      const cmp = this.data.m.compare;
      if (!cmp || this.peers.length < 2) return "";
      return `<div class="hv-src" data-side="${m.src ? "compare" : "main"}">${SJV.esc(m.src ? cmp.label : cmp.main_label)}</div>`;
    }

    async hoverBlock(j, c, groups) {
      const L = this.L, off = L.k_len - L.q_len, esc = SJV.esc;
      const qa = off + j * L.block_q, qb = off + Math.min((j + 1) * L.block_q, L.q_len);
      const ka = c * L.block_k, kb = Math.min((c + 1) * L.block_k, L.k_len);
      const [qt, kt] = await Promise.all([this.data.tokens(qa, qb), this.data.tokens(ka, kb)]);
      const rows = qb - qa, fmt = SJV.fmt;
      let all = "";
      for (const { map, hits } of groups) {
      let lines = "";
      let mean = 0;
      const cls = map.src ? "hv-cmp" : "hv-head";
      if (!map.source()) lines = `<div class="${cls}-none">layer ${L.layer} is not in this trace</div>`;
      for (const h of hits) {
        const kept = h.e >= 0, mass = kept ? h.tile.sum[h.e] : 0;
        const cov = h.tile.rowcov ? h.tile.rowcov[h.rr] : NaN;
        let rowsum = 0;
        for (let i = h.a; i < h.b; i++) rowsum += h.tile.sum[i];
        mean += mass / hits.length;
        const covText = Number.isNaN(cov)
          ? `row holds ${fmt(rowsum / rows)} of the block's attention (sparse trace: no dense coverage)`
          : `row coverage ${fmt(cov)}`;
        lines += `<div class="${cls}" data-head="${h.head}" data-kept="${kept}" data-mass="${kept ? mass : ""}"` +
          ` data-rank="${h.rank}" data-count="${h.count}" data-rowcov="${Number.isNaN(cov) ? "" : cov}">` +
          `head ${h.head}: ` + (kept
            ? `mass <b class="mass">${fmt(mass)}</b> (share ${fmt(mass / rows)}), rank <b class="rank">${h.rank}</b> of ${h.count} kept in the row; ${covText}`
            : `not kept (${h.count} blocks kept in the row; ${covText})`) + `</div>`;
      }
      if (hits.length > 1) lines = `<div>mean over heads: mass ${fmt(mean)}</div>` + lines;
      all += this.sourceLabel(map) + lines;
      }
      return `<div class="hv" data-level="0" data-q="${j}" data-k="${c}">` +
        `<div><b>query block ${j}</b> (tokens ${qa}\u2013${qb - 1}) <span class="qtext">${esc(qt)}</span></div>` +
        `<div><b>key block ${c}</b> (tokens ${ka}\u2013${kb - 1}) <span class="ktext">${esc(kt)}</span></div>` +
        `<div class="hv-layer">layer ${L.layer} (${L.kind}, ${L.mode})</div>${all}</div>`;
    }

    hoverPooled(r, c, f, groups) {
      const L = this.L, fmt = SJV.fmt;
      const nq = Math.ceil(L.q_len / L.block_q), nk = Math.ceil(L.k_len / L.block_k);
      const q1 = Math.min((r + 1) * f, nq) - 1, k1 = Math.min((c + 1) * f, nk) - 1;
      let lines = "";
      for (const { map, hits } of groups) {
      lines += this.sourceLabel(map);
      for (const h of hits) {
        lines += h.e < 0 ? `<div>head ${h.head}: nothing kept here</div>`
          : `<div class="${map.src ? "hv-cmp" : "hv-head"}" data-head="${h.head}" data-sum="${h.tile.sum[h.e]}" data-max="${h.tile.max[h.e]}">head ${h.head}: ` +
            `mass summed over the cell <b>${fmt(h.tile.sum[h.e])}</b>, largest block ${fmt(h.tile.max[h.e])}</div>`;
      }
      }
      return `<div class="hv" data-level="${Math.log2(f)}" data-r="${r}" data-c="${c}"><div><b>query blocks ${r * f}\u2013${q1}</b> \u00d7 ` +
        `<b>key blocks ${c * f}\u2013${k1}</b> (${f}\u00d7${f} blocks per cell: zoom in for tokens)</div>${lines}</div>`;
    }
  }

  SJV.BlockMap = BlockMap;
  SJV.colour = colour;
  SJV.rowQueries = rowQueries;
})(window.SJV);
