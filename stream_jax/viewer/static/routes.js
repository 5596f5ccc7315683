"use strict";
// The routes panel (needle tasks): the layered graph of `routes.route` — from the needle's key blocks (green)
// up through the layers to the last query block, along kept blocks. x = block position, y = layer input
// (layer 0 at the bottom, the output on top); dots: the share of the answer's information at a block, lines:
// kept edges on a path from the needle, width by weight. A click on an edge opens its layer and head in the
// block map, centred on the edge's cell.

(function (SJV) {
  const NS = "http://www.w3.org/2000/svg";

  function el(name, attrs, parent) {
    const e = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (parent) parent.appendChild(e);
    return e;
  }

  class Routes {
    constructor(box, app) { this.box = box; this.app = app; }

    async init() {
      const r = (this.r = await this.app.data.json("routes.json"));
      const W = 640, H = 40 + 28 * r.layers.length, pad = 24;
      const X = (b) => pad + ((b + 0.5) / r.blocks) * (W - 2 * pad);
      const Y = (l) => H - pad - (l / r.layers.length) * (H - 2 * pad);
      const svg = el("svg", { width: W, height: H, id: "route-svg" }, null);
      for (let l = 0; l <= r.layers.length; l++) {
        el("line", { x1: pad, x2: W - pad, y1: Y(l), y2: Y(l), stroke: "#eee" }, svg);
        const t = el("text", { x: 2, y: Y(l) + 4, "font-size": 9, fill: "#888" }, svg);
        t.textContent = l === r.layers.length ? "out" : `L${r.layers[l]}`;
      }
      for (const b of r.needle_blocks) el("rect", { x: X(b) - 3, y: Y(0) + 3, width: 6, height: 6, fill: "#1a9641" }, svg);
      const wmax = Math.max(...r.edges.map((e) => e[4]), 1e-9);
      r.edges.forEach(([l, n, c, j, w], i) => {
        const line = el("line", { x1: X(c), y1: Y(l), x2: X(j), y2: Y(l + 1), stroke: "rgba(200,30,30,0.7)",
          "stroke-width": (0.5 + 3.5 * w / wmax).toFixed(2), class: "edge", "data-i": i }, svg);
        el("title", {}, line).textContent =
          `layer ${r.layers[l]}, head ${n}: key block ${c} \u2192 query block ${j}, weight ${SJV.fmt(w)}`;
        line.addEventListener("click", () => this.open(i));
      });
      const fmax = Math.max(...r.nodes.map((x) => x[2]), 1e-9);
      for (const [l, b, f] of r.nodes) {
        const dot = el("circle", { cx: X(b), cy: Y(l), r: (1 + 5 * Math.sqrt(f / fmax)).toFixed(2), fill: "rgba(40,40,40,0.55)" }, svg);
        el("title", {}, dot).textContent = `block ${b} at ${l === r.layers.length ? "the output" : "layer " + r.layers[l] + "'s input"}: ${SJV.fmt(f)} of the flow`;
      }
      const p = document.createElement("p");
      p.className = "help";
      p.textContent = `Needle share of the flow at each layer's input: ${r.needle_flow.map((x) => x.toFixed(3)).join(" ")}. ` +
        `${r.edges.length} heaviest kept edges on a path from the needle (weight > ${r.min_flow}); click one to open it.`;
      this.box.replaceChildren(svg, p);
    }

    // Opens edge i's layer and head in the block map, centred on (query block, key block).
    open(i) {
      const [l, n, c, j] = this.r.edges[i];
      const li = this.app.data.m.layers.findIndex((x) => x.layer === this.r.layers[l]);
      this.app.select(li, n);
      this.app.mark = { q: j, k: c };
      this.app.map.centre(j, c, 32);
    }
  }

  SJV.Routes = Routes;
})(window.SJV);
