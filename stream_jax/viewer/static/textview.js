"use strict";
// The text view: the document as units (the analysis' sentences when the export has them, else key blocks),
// shaded by the attention they receive (vertical score) and edged by category. Clicking a unit shows, for
// the current layer and head, where its queries' attention goes (the kept key blocks of its query blocks,
// with mass) and which later units attend to it. Only a window of units is in the DOM: a million-token
// document has ~40k sentences.

(function (SJV) {
  const WINDOW = 160; // units rendered around the focus
  const CATEGORY_COLOURS = {
    problem_setup: "#4e79a7", plan_generation: "#f28e2b", fact_retrieval: "#59a14f", active_computation: "#e15759",
    uncertainty_management: "#b07aa1", result_consolidation: "#76b7b2", self_checking: "#edc948",
    final_answer_emission: "#ff9da7", unknown: "#bab0ac",
  };

  const overlap = (a, b, c, d) => Math.max(0, Math.min(b, d) - Math.max(a, c));

  class TextView {
    constructor(el, details, app) {
      this.el = el;
      this.details = details;
      this.app = app;
      this.data = app.data;
      this.units = null; // [[a, b], ...] token spans
      this.labels = null;
      this.importance = null;
      this.vertical = null; // Float32Array [L, N, S] or null
      this.focus = 0;
      this.selected = -1;
      this.shade = "importance";
    }

    async init() {
      const m = this.data.m;
      if (m.sentences) {
        const s = await this.data.json("sentences.json");
        this.units = s.spans; this.labels = s.labels; this.importance = s.importance;
        this.kind = "sentence";
        if (m.sentences.vertical) this.vertical = new Float32Array(await this.data.bytes("vertical.bin"));
      } else {
        const bk = m.layers[0].block_k, n = Math.ceil(m.tokens / bk);
        this.units = Array.from({ length: n }, (_, i) => [i * bk, Math.min((i + 1) * bk, m.tokens)]);
        this.kind = "block";
      }
      if (m.text_index) { // the search index (small): loaded now so that a search never scans unloaded text
        this.index = this.data.bytes("search.bin").then((buf) => {
          const h = new Int32Array(buf, 0, 4);
          return { chunks: h[0], m: h[1], words: new Uint32Array(buf, 16) };
        }).catch(() => null);
      }
      if (!this.importance && !this.vertical) this.shade = "none";
      else if (!this.importance) this.shade = "head";
      const sel = document.getElementById("shade");
      if (sel) {
        sel.value = this.shade;
        sel.addEventListener("change", () => { this.shade = sel.value; this.render(); });
      }
      await this.render();
    }

    // Index of the first unit ending after token t (units are sorted and disjoint).
    unitAt(t) {
      let lo = 0, hi = this.units.length;
      while (lo < hi) { const mid = (lo + hi) >> 1; if (this.units[mid][1] <= t) lo = mid + 1; else hi = mid; }
      return lo;
    }

    unitsIn(a, b) {
      const out = [];
      for (let u = this.unitAt(a); u < this.units.length && this.units[u][0] < b; u++) out.push(u);
      return out;
    }

    score(u) {
      if (this.shade === "importance" && this.importance) return this.importance[u];
      if (this.shade === "head" && this.vertical) {
        const m = this.data.m, S = this.units.length, N = m.num_heads, li = this.app.layerIndex;
        if (this.app.head >= 0) return this.vertical[(li * N + this.app.head) * S + u];
        let s = 0; for (let h = 0; h < N; h++) s += this.vertical[(li * N + h) * S + u];
        return s / N;
      }
      return null;
    }

    async render() {
      this.app.busy++;
      try {
        const n = this.units.length;
        const u0 = Math.max(0, Math.min(this.focus - WINDOW / 2, n - WINDOW)), u1 = Math.min(n, u0 + WINDOW);
        const scores = [];
        for (let u = u0; u < u1; u++) scores.push(this.score(u));
        const finite = scores.filter((x) => x !== null && Number.isFinite(x));
        const top = finite.length ? Math.max(...finite) : 0;
        const frag = document.createDocumentFragment();
        if (u0 > 0) frag.appendChild(this.more(`\u2191 ${u0} earlier ${this.kind}s`, Math.max(0, u0 - WINDOW / 2)));
        for (let u = u0; u < u1; u++) {
          const [a, b] = this.units[u];
          const span = document.createElement("span");
          span.className = "unit";
          span.dataset.unit = u;
          span.dataset.tokens = `${a}-${b}`;
          span.textContent = await this.data.tokens(a, b);
          const s = scores[u - u0];
          if (s !== null && Number.isFinite(s) && top > 0) {
            span.style.backgroundColor = `rgba(230, 85, 13, ${(0.75 * Math.sqrt(Math.max(0, s) / top)).toFixed(3)})`;
            span.dataset.score = s;
          }
          if (this.labels) {
            span.style.borderBottomColor = CATEGORY_COLOURS[this.labels[u].split("+")[0]] || "#888";
            span.title = `${this.kind} ${u} (tokens ${a}\u2013${b - 1}) \u00b7 ${this.labels[u]}` +
              (s !== null && Number.isFinite(s) ? ` \u00b7 vertical score ${SJV.fmt(s)}` : "");
          } else span.title = `${this.kind} ${u} (tokens ${a}\u2013${b - 1})`;
          span.addEventListener("click", () => this.select(u));
          frag.appendChild(span);
          frag.appendChild(document.createTextNode(this.kind === "block" ? "" : " "));
        }
        if (u1 < n) frag.appendChild(this.more(`\u2193 ${n - u1} later ${this.kind}s`, Math.min(n - 1, u1 + WINDOW / 2)));
        this.el.replaceChildren(frag);
        this.paintSelection();
      } finally { this.app.busy--; }
    }

    more(label, focus) {
      const b = document.createElement("button");
      b.className = "more"; b.textContent = label;
      b.addEventListener("click", () => { this.focus = focus; this.render(); });
      return b;
    }

    // Scrolls the window to unit u (re-rendering when it is outside) and marks it.
    async show(u) {
      const rendered = this.el.querySelector(`[data-unit="${u}"]`);
      if (!rendered) { this.focus = u; await this.render(); }
      const el = this.el.querySelector(`[data-unit="${u}"]`);
      if (el) el.scrollIntoView({ block: "center" });
      return el;
    }

    // Where unit u's attention goes and which later units attend to it, in the current layer and head(s).
    async select(u) {
      this.app.busy++;
      try {
        this.selected = u;
        const t0 = performance.now();
        // first where its attention goes (a few rows), then who attends to it (a scan of the later rows)
        let res = await this.links(u, false);
        if (this.selected !== u) return;
        this.result = res;
        this.app.setSelection(res);
        await this.renderDetails(res);
        this.paintSelection();
        this.targetsMs = performance.now() - t0; // the benchmark reports it
        res = await this.links(u, true);
        if (this.selected !== u) return;
        this.result = res;
        await this.renderDetails(res);
        this.paintSelection();
      } finally { this.app.busy--; }
    }

    async links(u, incoming = true) {
      const L = this.app.layerInfo(), m = this.data.m, R = m.tile_rows;
      const heads = this.app.head < 0 ? [...Array(m.num_heads).keys()] : [this.app.head];
      const [a, b] = this.units[u], off = L.k_len - L.q_len, nq = Math.ceil(L.q_len / L.block_q);
      const qRows = (j) => Math.min((j + 1) * L.block_q, L.q_len) - j * L.block_q;
      const kCols = (c) => Math.min((c + 1) * L.block_k, L.k_len) - c * L.block_k;
      // outgoing: query blocks overlapping the unit, each weighted by the share of its queries inside it
      const j0 = Math.max(0, Math.floor((a - off) / L.block_q)), j1 = Math.min(nq, Math.floor((b - 1 - off) / L.block_q) + 1);
      const out = new Map(), cells = [];
      const rowsOf = await Promise.all(heads.map((h) => Promise.all(
        Array.from({ length: Math.max(0, j1 - j0) }, (_, i) => this.data.row(L, h, j0 + i)))));
      for (let j = j0; j < j1; j++) {
        const w = overlap(a, b, off + j * L.block_q, off + j * L.block_q + qRows(j)) / qRows(j);
        for (const [hi, h] of heads.entries()) {
          const row = rowsOf[hi][j - j0];
          row.cols.forEach((c, i) => {
            out.set(c, (out.get(c) || 0) + (w * row.mass[i]) / heads.length);
            cells.push({ q: j, k: c });
          });
        }
      }
      // incoming: every later query block whose kept blocks include one of the unit's key blocks
      const k0 = Math.floor(a / L.block_k), k1 = Math.floor((b - 1) / L.block_k) + 1;
      const inc = new Map();
      const spread = (j, got) => { // row j gives the unit `got`: shared among the units its queries are in
        const qa = off + j * L.block_q, qb = qa + qRows(j);
        for (const v of this.unitsIn(qa, qb)) {
          if (v <= u) continue;
          const [va, vb] = this.units[v];
          inc.set(v, (inc.get(v) || 0) + (got * overlap(va, vb, qa, qb)) / qRows(j) / heads.length);
        }
      };
      if (incoming && L.incoming) { // the export's key block -> query blocks index: work in proportion to hits
        for (const h of heads) {
          const ts = [];
          for (let t = Math.floor(k0 / R); t * R < k1; t++) ts.push(t);
          const idx = await Promise.all(ts.map((t) => this.data.incoming(L.layer, h, t)));
          const byRow = new Map();
          for (const [i, tile] of idx.entries()) {
            for (let c = Math.max(k0, ts[i] * R); c < Math.min(k1, ts[i] * R + tile.cols); c++) {
              const w = overlap(a, b, c * L.block_k, c * L.block_k + kCols(c)) / kCols(c), cc = c - ts[i] * R;
              for (let e = tile.colptr[cc]; e < tile.colptr[cc + 1]; e++) {
                byRow.set(tile.rows[e], (byRow.get(tile.rows[e]) || 0) + tile.mass[e] * w);
              }
            }
          }
          for (const j of [...byRow.keys()].sort((x, y) => x - y)) if (byRow.get(j) > 0) spread(j, byRow.get(j));
        }
      }
      const jFirst = Math.max(0, Math.floor((k0 * L.block_k - off) / L.block_q));
      for (const h of incoming && !L.incoming ? heads : []) { // older exports: scan the later rows
        const ts = [];
        for (let t = Math.floor(jFirst / R); t * R < nq; t++) ts.push(t);
        const loaded = await Promise.all(ts.map((t) => this.data.tileAsync(L.layer, h, 0, t)));
        for (const [i, tile] of loaded.entries()) {
          const t = ts[i];
          for (let r = 0; r < tile.rows; r++) {
            const j = t * R + r;
            let got = 0;
            for (let e = tile.rowptr[r]; e < tile.rowptr[r + 1]; e++) {
              const c = tile.cols[e];
              if (c >= k0 && c < k1) got += (tile.sum[e] * overlap(a, b, c * L.block_k, c * L.block_k + kCols(c))) / kCols(c);
            }
            if (got > 0) spread(j, got);
          }
        }
      }
      const byMass = (x, y) => y[1] - x[1] || x[0] - y[0];
      return { unit: u, tokens: [a, b], layer: L.layer, heads, q0: j0, q1: j1, cells, incoming,
               targets: [...out.entries()].sort(byMass), sources: [...inc.entries()].sort(byMass) };
    }

    async renderDetails(res) {
      const L = this.app.layerInfo(), fmt = SJV.fmt, esc = SJV.esc;
      const head = this.app.head < 0 ? "mean over heads" : `head ${this.app.head}`;
      let html = `<h3 data-unit="${res.unit}">${this.kind} ${res.unit} (tokens ${res.tokens[0]}\u2013${res.tokens[1] - 1}), ` +
        `layer ${L.layer}, ${head}</h3><h4>attends to: kept key blocks of its ${res.q1 - res.q0} query block(s), ` +
        `mass from its queries</h4><ol id="targets">`;
      // every snippet's text at once: targets lie all over the document, in different text chunks
      const targets = res.targets.slice(0, 400), sources = res.sources.slice(0, 50);
      const kSpan = (c) => [c * L.block_k, Math.min((c + 1) * L.block_k, L.k_len)];
      const [tText, sText] = await Promise.all([
        Promise.all(targets.map(([c]) => this.data.tokens(...kSpan(c)))),
        Promise.all(sources.map(([v]) => this.data.tokens(...this.units[v])))]);
      for (const [i, [c, mass]] of targets.entries()) {
        const [ka, kb] = kSpan(c), text = tText[i].slice(0, 90);
        html += `<li data-block="${c}" data-mass="${mass}">key block ${c} (tokens ${ka}\u2013${kb - 1}): <b>${fmt(mass)}</b> ` +
          `<span class="snip">${esc(text)}</span></li>`;
      }
      html += `</ol><h4>attended to by later ${this.kind}s (mass they give it)</h4>` +
        (res.incoming ? `<ol id="sources">` : `<p class="help">scanning the later query blocks…</p><ol>`);
      for (const [i, [v, mass]] of sources.entries()) {
        html += `<li data-unit="${v}" data-mass="${mass}">${this.kind} ${v}: <b>${fmt(mass)}</b> ` +
          `<span class="snip">${esc(sText[i].slice(0, 90))}</span></li>`;
      }
      if (this.selected !== res.unit) return;
      this.details.innerHTML = html + "</ol>";
      this.details.querySelectorAll("#sources li").forEach((li) => {
        li.addEventListener("click", () => this.show(Number(li.dataset.unit)));
      });
    }

    // Outlines the selected unit, the units inside its target key blocks and the later units attending to it.
    paintSelection() {
      this.el.querySelectorAll(".unit.selected, .unit.target, .unit.source").forEach((e) => {
        e.classList.remove("selected", "target", "source"); e.style.outline = "";
      });
      const res = this.result;
      if (!res || res.unit !== this.selected) return;
      const L = this.app.layerInfo();
      const top = res.targets.length ? res.targets[0][1] : 1;
      for (const [c, mass] of res.targets) {
        for (const v of this.unitsIn(c * L.block_k, Math.min((c + 1) * L.block_k, L.k_len))) {
          const el = this.el.querySelector(`[data-unit="${v}"]`);
          if (el) { el.classList.add("target"); el.style.outline = `2px solid rgba(30,90,200,${(0.25 + 0.75 * mass / top).toFixed(2)})`; }
        }
      }
      for (const [v] of res.sources) {
        const el = this.el.querySelector(`[data-unit="${v}"]`);
        if (el) el.classList.add("source");
      }
      const el = this.el.querySelector(`[data-unit="${res.unit}"]`);
      if (el) el.classList.add("selected");
    }

    // A text chunk lowercased and joined, with each token's start in it (cached: searches reuse it).
    chunkText(c, background = false) {
      this.lowered = this.lowered || new Map();
      if (!this.lowered.has(c)) {
        this.lowered.set(c, this.data.chunk(c, background).then((pieces) => {
          const low = pieces.map((p) => p.toLowerCase()), starts = new Int32Array(low.length);
          let pos = 0;
          low.forEach((p, i) => { starts[i] = pos; pos += p.length; });
          return { text: low.join(""), starts };
        }));
      }
      return this.lowered.get(c);
    }

    // Loads every text chunk in the background, one at a time, so a later search scans memory only.
    async prefetch(lanes = 4) {
      if (!this.data.hasText()) return;
      const chunks = Math.ceil(this.data.m.tokens / this.data.m.text_chunk);
      let next = 0;
      const lane = async () => { while (next < chunks) await this.chunkText(next++, true); };
      const t0 = performance.now();
      await Promise.all(Array.from({ length: lanes }, lane));
      this.prefetchMs = performance.now() - t0; // the benchmark reports it
    }

    // Chunk filter from the search index (text.py): chunk c may hold a match starting in it only when every
    // trigram of the query is in its bit set or the next chunk's. Without an index (or a query under three
    // characters) every chunk may.
    async candidates(lower) {
      const idx = this.index ? await this.index : null;
      if (!idx || lower.length < 3 || lower.length > 2000) return () => true;
      const K = [0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x2C1B3C6D], W = idx.m >>> 5, bits = [];
      for (let i = 0; i + 2 < lower.length; i++) {
        let h = (Math.imul(lower.charCodeAt(i), K[0]) ^ Math.imul(lower.charCodeAt(i + 1), K[1]) ^
                 Math.imul(lower.charCodeAt(i + 2), K[2])) >>> 0;
        h = (h ^ (h >>> 15)) >>> 0;
        h = Math.imul(h, K[3]) >>> 0;
        h = (h ^ (h >>> 13)) >>> 0;
        bits.push(h & (idx.m - 1));
      }
      const has = (c, b) => c < idx.chunks && (idx.words[c * W + (b >>> 5)] >>> (b & 31)) & 1;
      return (c) => bits.every((b) => has(c, b) || has(c + 1, b));
    }

    // Finds `needle` (case-insensitive) at or after token `from`, wrapping around; the token index or -1.
    async search(needle, from) {
      const m = this.data.m;
      if (!needle || !this.data.hasText()) return -1;
      const n = m.text_chunk, chunks = Math.ceil(m.tokens / n), lower = needle.toLowerCase();
      const may = await this.candidates(lower);
      const tokenAt = (starts, i) => { // last token starting at or before char i
        let lo = 0, hi = starts.length - 1;
        while (lo < hi) { const mid = (lo + hi + 1) >> 1; if (starts[mid] <= i) lo = mid; else hi = mid - 1; }
        return lo;
      };
      const first = Math.floor(from / n);
      for (const [c0, c1, min] of [[first, chunks, from], [0, first + 1, 0]]) {
        for (let c = c0; c < c1; c++) {
          if (!may(c)) continue; // no match can start in this chunk: not fetched
          const { text, starts } = await this.chunkText(c);
          for (let i = text.indexOf(lower); i >= 0; i = text.indexOf(lower, i + 1)) {
            const tok = c * n + tokenAt(starts, i);
            if (tok >= min) return tok;
          }
          if (c + 1 < chunks && lower.length > 1) { // a match across the boundary with the next chunk
            const tail = text.slice(-(lower.length - 1)), next = (await this.chunkText(c + 1)).text;
            const k = (tail + next.slice(0, lower.length - 1)).indexOf(lower);
            if (k >= 0 && k < tail.length) {
              const tok = c * n + tokenAt(starts, text.length - tail.length + k);
              if (tok >= min) return tok;
            }
          }
        }
      }
      return -1;
    }
  }

  SJV.TextView = TextView;
})(window.SJV);
