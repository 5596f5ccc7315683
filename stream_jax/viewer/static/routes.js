"use strict";
// The routes panel (needle tasks): the layered graph of `routes.route` — from the needle's key blocks (green)
// up through the layers to the last query block, along kept blocks. x = block position, y = layer input
// (layer 0 at the bottom, the output on top); dots: the share of the answer's information at a block, lines:
// kept edges on a path from the needle, width by weight; purple: edges the route ablation cut and so
// verified (the answer flipped when the needle was suppressed in those heads). With several route results
// (e.g. a needle sweep's samples) a success and a failure are shown side by side, each with a picker. A click
// on an edge of the exported trace's own sample opens its layer and head in the block map, centred on it.

(function (SJV) {
  const NS = "http://www.w3.org/2000/svg";

  function el(name, attrs, parent) {
    const e = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (parent) parent.appendChild(e);
    return e;
  }

  function verdict(s) {
    const v = s.verified;
    if (!v) return { cls: "untested", text: "not verified by ablation" };
    const rnd = `random kept blocks in the same heads flipped ${v.random_flipped}/${v.random_runs}`;
    return v.flipped
      ? { cls: "verified", text: `\u2714 verified by ablation: suppressing the needle in the route's ${v.heads.length} head(s) flipped the answer (${rnd})` }
      : { cls: "refuted", text: `\u2718 ablation did not flip the answer (${rnd})` };
  }

  class Routes {
    constructor(box, app) { this.box = box; this.app = app; }

    async init() {
      const data = await this.app.data.json("routes.json");
      this.samples = data.samples;
      const S = this.samples;
      const ok = S.map((s, i) => [s, i]).filter(([s]) => s.success === true).map(([, i]) => i);
      const bad = S.map((s, i) => [s, i]).filter(([s]) => s.success === false).map(([, i]) => i);
      // the columns: a success and a failure when both exist, else the first two samples (or the one)
      this.cols = ok.length && bad.length ? [ok[0], bad[0]] : S.slice(0, 2).map((_, i) => i);
      this.pools = ok.length && bad.length ? [ok, bad] : this.cols.map(() => S.map((_, i) => i));
      this.render();
    }

    render() {
      const wrap = document.createElement("div");
      wrap.className = "route-cols";
      const W = this.cols.length > 1 ? 316 : 640;
      this.cols.forEach((si, ci) => wrap.appendChild(this.column(si, ci, W)));
      const legend = document.createElement("p");
      legend.className = "help route-legend";
      legend.innerHTML = `<span class="lg lg-edge"></span> kept edge on a path from the needle (width: weight) ` +
        `<span class="lg lg-verified"></span> edge verified by ablation (cut, answer flipped) ` +
        `<span class="lg lg-needle"></span> needle block \u25cf share of the answer's information`;
      this.box.replaceChildren(wrap, legend);
    }

    // One route result: header (label, answer, ablation verdict), picker, graph.
    column(si, ci, W) {
      const s = this.samples[si];
      const col = document.createElement("div");
      col.className = "route-col";
      col.dataset.sample = si;
      col.dataset.success = s.success === null ? "" : String(s.success);
      const head = document.createElement("div");
      const outcome = s.success === null ? "" : s.success ? "answered \u2714" : "missed \u2718";
      const v = verdict(s);
      head.innerHTML = `<b class="route-label">${SJV.esc(s.label)}</b> <span class="outcome ${s.success ? "ok" : "bad"}">${outcome}</span>` +
        (s.prediction !== null ? ` <span class="prediction">${SJV.esc(s.prediction)}</span>` : "") +
        `<div class="verdict ${v.cls}">${SJV.esc(v.text)}</div>`;
      col.appendChild(head);
      if (this.pools[ci].length > 1) {
        const pick = document.createElement("select");
        pick.className = "route-pick";
        for (const i of this.pools[ci]) pick.add(new Option(`${this.samples[i].label}${this.samples[i].success === null ? "" : this.samples[i].success ? " \u2714" : " \u2718"}`, i));
        pick.value = String(si);
        pick.addEventListener("change", () => { this.cols[ci] = Number(pick.value); this.render(); });
        col.appendChild(pick);
      }
      col.appendChild(this.graph(s, si, ci, W));
      const p = document.createElement("p");
      p.className = "help";
      p.textContent = `Needle share of the flow at each layer's input: ${s.needle_flow.map((x) => x.toFixed(3)).join(" ")}. ` +
        `${s.edges.length} heaviest kept edges on a path from the needle (weight > ${s.min_flow})` +
        (s.main ? "; click one to open it." : ".");
      col.appendChild(p);
      return col;
    }

    graph(r, si, ci, W) {
      const H = 40 + 28 * r.layers.length, pad = 24;
      const X = (b) => pad + ((b + 0.5) / r.blocks) * (W - 2 * pad);
      const Y = (l) => H - pad - (l / r.layers.length) * (H - 2 * pad);
      const svg = el("svg", { width: W, height: H, class: "route-svg", id: ci === 0 ? "route-svg" : `route-svg-${ci + 1}` }, null);
      for (let l = 0; l <= r.layers.length; l++) {
        el("line", { x1: pad, x2: W - pad, y1: Y(l), y2: Y(l), stroke: "#eee" }, svg);
        const t = el("text", { x: 2, y: Y(l) + 4, "font-size": 9, fill: "#888" }, svg);
        t.textContent = l === r.layers.length ? "out" : `L${r.layers[l]}`;
      }
      for (const b of r.needle_blocks) el("rect", { x: X(b) - 3, y: Y(0) + 3, width: 6, height: 6, fill: "#1a9641" }, svg);
      const wmax = Math.max(...r.edges.map((e) => e[4]), 1e-9);
      r.edges.forEach(([l, n, c, j, w, ok], i) => {
        const line = el("line", { x1: X(c), y1: Y(l), x2: X(j), y2: Y(l + 1),
          stroke: ok ? "rgba(120,40,200,0.95)" : "rgba(200,30,30,0.7)",
          "stroke-width": ((ok ? 1.5 : 0.5) + 3.5 * w / wmax).toFixed(2), class: ok ? "edge verified" : "edge",
          "data-i": i }, svg);
        el("title", {}, line).textContent =
          `layer ${r.layers[l]}, head ${n}: key block ${c} \u2192 query block ${j}, weight ${SJV.fmt(w)}` +
          (ok ? " \u00b7 verified by ablation" : "");
        if (r.main) line.addEventListener("click", () => this.open(si, i));
      });
      const fmax = Math.max(...r.nodes.map((x) => x[2]), 1e-9);
      for (const [l, b, f] of r.nodes) {
        const dot = el("circle", { cx: X(b), cy: Y(l), r: (1 + 5 * Math.sqrt(f / fmax)).toFixed(2), fill: "rgba(40,40,40,0.55)" }, svg);
        el("title", {}, dot).textContent = `block ${b} at ${l === r.layers.length ? "the output" : "layer " + r.layers[l] + "'s input"}: ${SJV.fmt(f)} of the flow`;
      }
      return svg;
    }

    // Opens edge i of sample si (the exported trace's) in the block map, centred on (query block, key block).
    open(si, i) {
      const r = this.samples[si], [l, n, c, j] = r.edges[i];
      const li = this.app.data.m.layers.findIndex((x) => x.layer === r.layers[l]);
      this.app.select(li, n);
      this.app.mark = { q: j, k: c };
      this.app.map.centre(j, c, 32);
    }
  }

  SJV.Routes = Routes;
})(window.SJV);
