"use strict";
// The page: loads manifest.json, builds the overview (layer x head numbers), the block map and the text view,
// and wires the controls. `window.SJV.app` is the handle tests and notebooks use (select, idle, map, text).

(function (SJV) {
  SJV.fmt = (x) => {
    if (x === null || x === undefined || Number.isNaN(x)) return "\u2013";
    if (x === 0) return "0";
    const a = Math.abs(x);
    return a >= 1e4 || a < 1e-3 ? x.toExponential(4) : x.toPrecision(6).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
  };
  SJV.esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));

  const METRICS = {
    kept: ["kept share", "kept (query, key) token pairs over those the layer allows (1 = dense)"],
    coverage: ["coverage", "share of the dense attention the kept blocks hold, mean over query blocks"],
    anchor: ["anchor score", "kurtosis of the head's vertical scores (receiver heads: outlined)"],
    needle: ["needle mass", "share of the last query block's attention on the needle's key blocks"],
  };

  class App {
    constructor(base) {
      this.data = new SJV.Data(base);
      this.layerIndex = 0;
      this.head = 0;
      this.busy = 0;
      this.selection = null;
      this.mark = null;
      this.searchFrom = 0;
    }

    layerInfo() { return this.data.m.layers[this.layerIndex]; }

    // The compare trace's entry for the current layer (null without one or when it lacks the layer).
    compareLayer() {
      const c = this.data.m.compare, L = this.layerInfo();
      return c ? c.layers.find((x) => x.layer === L.layer) || null : null;
    }

    // True when nothing is loading or drawing (the text view's first paint included): tests wait for it.
    idle() {
      return this.ready && this.textShown && this.busy === 0 && this.data.inflight === 0 &&
        this.maps.every((mp) => !mp.drawPending && !!mp.lastDraw && mp.lastDraw.missing === 0);
    }

    async start() {
      const m = await this.data.manifest();
      document.title = `${m.title} \u2014 stream_jax viewer`;
      document.getElementById("title").textContent = m.title;
      document.getElementById("info").textContent =
        `${m.tokens.toLocaleString()} tokens \u00b7 ${m.layers.length} layers \u00b7 ${m.num_heads} heads` +
        (m.needle ? ` \u00b7 needle in key block(s) ${m.needle.blocks.join(", ")}` : "");
      this.maps = [this.map = new SJV.BlockMap(document.getElementById("map"), this)];
      if (m.compare) this.compareMaps(m.compare);
      this.data.onload = () => this.map.request();
      this.text = new SJV.TextView(document.getElementById("text"), document.getElementById("details"), this);
      this.controls();
      const firstGlobal = m.layers.findIndex((l) => l.kind === "global");
      this.overview();
      this.select(Math.max(0, firstGlobal), 0);
      this.ready = true;
      if (m.routes) {
        document.getElementById("routes-panel").hidden = false;
        this.routes = new SJV.Routes(document.getElementById("routes"), this);
        this.busy++;
        this.routes.init().finally(() => { this.busy--; });
      }
      this.textReady = this.text.init(); // a search waits for it (units, search index)
      await this.textReady;
      this.textShown = true;
      this.prefetched = this.text.prefetch(); // the rest of the text, in the background: searches scan memory
    }

    // Two traces: the maps side by side (smaller), one view, one hover.
    compareMaps(cmp) {
      document.body.classList.add("compare");
      document.getElementById("map2-box").hidden = false;
      document.getElementById("map-label").textContent = cmp.main_label;
      document.getElementById("map2-label").textContent = cmp.label;
      for (const id of ["map", "map2"]) {
        const c = document.getElementById(id);
        c.width = c.height = 480;
      }
      this.map2 = new SJV.BlockMap(document.getElementById("map2"), this, "compare/", this.map.shared);
      this.maps.push(this.map2);
      this.map.peers = this.map2.peers = this.maps;
    }

    controls() {
      const m = this.data.m;
      const layer = document.getElementById("layer"), head = document.getElementById("head");
      m.layers.forEach((l, i) => layer.add(new Option(`${l.layer} (${l.kind}, ${l.mode})`, i)));
      head.add(new Option("mean", -1));
      for (let h = 0; h < m.num_heads; h++) head.add(new Option(String(h), h));
      layer.addEventListener("change", () => this.select(Number(layer.value), this.head));
      head.addEventListener("change", () => this.select(this.layerIndex, Number(head.value)));
      document.getElementById("zoom-in").addEventListener("click", () => this.map.zoom(0.5));
      document.getElementById("zoom-out").addEventListener("click", () => this.map.zoom(2));
      document.getElementById("zoom-all").addEventListener("click", () => this.map.fitAll());
      const agg = document.getElementById("agg");
      agg.addEventListener("change", () => { this.map.agg = agg.value; this.map.request(); });
      const metric = document.getElementById("metric");
      for (const [k, [name]] of Object.entries(METRICS)) if (m.stats[k]) metric.add(new Option(name, k));
      metric.addEventListener("change", () => this.overview());
      const go = () => this.search(document.getElementById("search").value);
      document.getElementById("search-go").addEventListener("click", go);
      document.getElementById("search").addEventListener("keydown", (e) => { if (e.key === "Enter") go(); });
    }

    // The layer x head grid of the chosen metric; a click opens that layer and head.
    overview() {
      const m = this.data.m, key = document.getElementById("metric").value || "kept";
      const vals = m.stats[key], receivers = new Set((m.stats.receivers || []).map(([l, h]) => `${l},${h}`));
      const finite = vals.flat().filter((x) => x !== null);
      const lo = Math.min(...finite), hi = Math.max(...finite);
      const table = document.createElement("table");
      table.className = "grid";
      table.title = METRICS[key][1];
      let tr = table.insertRow();
      tr.insertCell().textContent = "layer \\ head";
      for (let h = 0; h < m.num_heads; h++) tr.insertCell().textContent = h;
      tr.insertCell().textContent = "mean";
      m.layers.forEach((l, i) => {
        tr = table.insertRow();
        const th = tr.insertCell();
        th.textContent = `${l.layer}${l.kind === "global" ? " G" : ""}`;
        th.title = `${l.kind}, ${l.mode}`;
        const row = vals[i];
        const cells = [...row.map((v, h) => [v, h]), [avg(row), -1]];
        for (const [v, h] of cells) {
          const td = tr.insertCell();
          td.className = "cell";
          td.dataset.layer = i; td.dataset.head = h;
          td.textContent = v === null ? "\u2013" : v.toFixed(3);
          const t = v === null || hi === lo ? 0 : (v - lo) / (hi - lo);
          td.style.background = `rgba(189, 0, 38, ${(0.08 + 0.6 * t).toFixed(3)})`;
          if (receivers.has(`${i},${h}`) && key === "anchor") td.classList.add("receiver");
          td.addEventListener("click", () => this.select(i, h));
        }
      });
      const box = document.getElementById("overview");
      box.replaceChildren(table);
      this.markOverview();
    }

    markOverview() {
      document.querySelectorAll("#overview td.current").forEach((td) => td.classList.remove("current"));
      const td = document.querySelector(`#overview td[data-layer="${this.layerIndex}"][data-head="${this.head}"]`);
      if (td) td.classList.add("current");
    }

    // Opens layer index li (position in the trace) and head h (-1: mean over heads).
    select(li, h) {
      const changedLayer = li !== this.layerIndex || !this.map.lastDraw;
      this.layerIndex = li; this.head = h;
      document.getElementById("layer").value = String(li);
      document.getElementById("head").value = String(h);
      this.markOverview();
      if (changedLayer) this.map.fitAll(); else this.map.request();
      if (this.text.units) {
        if (this.text.shade === "head") this.text.render();
        if (this.text.selected >= 0) this.text.select(this.text.selected);
      }
    }

    setSelection(res) {
      this.selection = res;
      this.map.request();
    }

    // Finds the text (after the last hit), marks it on the map and scrolls the text view to it.
    async search(needle) {
      this.busy++;
      try {
        const out = document.getElementById("search-result");
        if (this.textReady) await this.textReady;
        const tok = await this.text.search(needle, this.searchFrom);
        if (tok < 0) { out.textContent = "not found"; out.dataset.token = ""; return; }
        this.searchFrom = tok + 1;
        const L = this.layerInfo(), off = L.k_len - L.q_len;
        const q = Math.max(0, Math.floor((tok - off) / L.block_q)), k = Math.floor(tok / L.block_k);
        this.mark = { q, k };
        this.map.centre(q, k, 48);
        out.textContent = `token ${tok}: query block ${q}, key block ${k}`;
        out.dataset.token = tok; out.dataset.q = q; out.dataset.k = k;
        const el = await this.text.show(this.text.unitAt(tok));
        if (el) { el.classList.add("found"); setTimeout(() => el.classList.remove("found"), 4000); }
      } finally { this.busy--; }
    }
  }

  function avg(row) {
    const f = row.filter((x) => x !== null);
    return f.length ? f.reduce((a, b) => a + b, 0) / f.length : null;
  }

  SJV.App = App;
  window.addEventListener("DOMContentLoaded", () => {
    const app = new App(window.SJV_BASE || "");
    SJV.app = app;
    app.start().catch((e) => {
      document.body.dataset.error = String(e);
      document.getElementById("info").textContent = `error: ${e}`;
      console.error(e);
    });
  });
})(window.SJV);
