"use strict";
// Data access for the viewer: the files of a viewer folder, fetched on demand from the local server (or read
// from window.SJV_EMBED when a notebook inlines a small trace), the binary tile reader (format: see
// stream_jax/viewer/tiles.py) and the token text. Everything is cached; tiles in a bounded LRU.

window.SJV = window.SJV || {};

(function (SJV) {
  const MAX_TILES = 600; // ~70 MB of level-0 tiles at C = 19: the page never holds a whole 1M-token trace

  function base64ToBuffer(b64) {
    const bin = atob(b64);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out.buffer;
  }

  // One tile: CSR rows of a pyramid level (rowptr, cols, sum, max) and, at level 0, each row's coverage.
  function parseTile(buf) {
    const head = new Int32Array(buf, 0, 4);
    const rows = head[0], nnz = head[1], colBytes = head[2], flags = head[3];
    let off = 16;
    const rowptr = new Uint32Array(buf, off, rows + 1);
    off += 4 * (rows + 1);
    const cols = colBytes === 2 ? new Uint16Array(buf, off, nnz) : new Uint32Array(buf, off, nnz);
    off += colBytes * nnz;
    off += (4 - (off % 4)) % 4;
    const sum = new Float32Array(buf, off, nnz);
    off += 4 * nnz;
    let max = sum;
    if (flags & 1) { max = new Float32Array(buf, off, nnz); off += 4 * nnz; }
    let rowcov = null;
    if (flags & 2) { rowcov = new Float32Array(buf, off, rows); off += 4 * rows; }
    if (off !== buf.byteLength) throw new Error(`tile: ${buf.byteLength} bytes, header says ${off}`);
    return { rows, nnz, rowptr, cols, sum, max, rowcov };
  }

  // The incoming index of a key-block range (tiles.py): per key block the query blocks keeping it and the mass.
  function parseIncoming(buf) {
    const head = new Int32Array(buf, 0, 4), cols = head[0], nnz = head[1];
    const colptr = new Uint32Array(buf, 16, cols + 1), off = 16 + 4 * (cols + 1);
    return { cols, nnz, colptr, rows: new Uint32Array(buf, off, nnz), mass: new Float32Array(buf, off + 4 * nnz, nnz) };
  }

  // Index of col in the sorted cols[lo, hi), or -1.
  function findCol(cols, lo, hi, col) {
    const end = hi;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (cols[mid] < col) lo = mid + 1; else hi = mid;
    }
    return lo < end && cols[lo] === col ? lo : -1;
  }

  class Data {
    constructor(base) {
      this.base = base || "";
      this.embed = window.SJV_EMBED || null;
      this.tiles = new Map(); // path -> {tile} or {promise}
      this.text = new Map(); // chunk index -> Promise<string[]>
      this.inflight = 0;
      this.onload = null; // called after each tile arrives
    }

    async bytes(path) {
      if (this.embed && path in this.embed) return base64ToBuffer(this.embed[path]);
      const r = await fetch(this.base + path);
      if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
      return r.arrayBuffer();
    }

    async json(path) {
      if (this.embed && path in this.embed) return JSON.parse(new TextDecoder().decode(base64ToBuffer(this.embed[path])));
      const r = await fetch(this.base + path);
      if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
      return r.json();
    }

    async manifest() {
      this.m = await this.json("manifest.json");
      return this.m;
    }

    // src: "" for the trace, "compare/" for the export's second trace.
    tilePath(layer, head, z, t, src = "") { return `${src}tiles/l${layer}/h${head}/z${z}_${t}.bin`; }

    // The tile if cached; otherwise starts loading it (unless `load` is false) and returns null.
    tile(layer, head, z, t, load = true, src = "") {
      const path = this.tilePath(layer, head, z, t, src);
      const hit = this.tiles.get(path);
      if (hit) {
        this.tiles.delete(path); this.tiles.set(path, hit); // LRU order
        return hit.tile || null;
      }
      if (!load) return null;
      const entry = {};
      this.inflight++;
      entry.promise = this.bytes(path).then((buf) => {
        entry.tile = parseTile(buf);
        return entry.tile;
      }).finally(() => {
        this.inflight--;
        if (this.onload) this.onload();
      });
      this.tiles.set(path, entry);
      while (this.tiles.size > MAX_TILES) this.tiles.delete(this.tiles.keys().next().value);
      return null;
    }

    // Incoming index tile t (key blocks [t * tile_rows, ...)) of a layer and head: a Promise, cached.
    incoming(layer, head, t) {
      const path = `tiles/l${layer}/h${head}/in_${t}.bin`;
      let hit = this.tiles.get(path);
      if (!hit) {
        hit = {};
        this.inflight++;
        hit.promise = this.bytes(path).then((buf) => (hit.tile = parseIncoming(buf))).finally(() => { this.inflight--; });
        this.tiles.set(path, hit);
        while (this.tiles.size > MAX_TILES) this.tiles.delete(this.tiles.keys().next().value);
      }
      return hit.promise;
    }

    async tileAsync(layer, head, z, t) {
      const got = this.tile(layer, head, z, t);
      if (got) return got;
      return this.tiles.get(this.tilePath(layer, head, z, t)).promise;
    }

    // Level-0 row j of a head: {cols, mass, coverage} (arrays copied out of the tile).
    async row(layerInfo, head, j) {
      const R = this.m.tile_rows;
      const tile = await this.tileAsync(layerInfo.layer, head, 0, Math.floor(j / R));
      const r = j % R;
      const a = tile.rowptr[r], b = tile.rowptr[r + 1];
      return { cols: Array.from(tile.cols.subarray(a, b)), mass: Array.from(tile.sum.subarray(a, b)),
               coverage: tile.rowcov ? tile.rowcov[r] : NaN };
    }

    hasText() { return !!this.m.text_chunk; }

    // Token pieces of text chunk i; `background` loads (prefetch) do not count as pending work.
    chunk(i, background = false) {
      if (!this.text.has(i)) {
        if (background) this.text.set(i, this.json(`text/${i}.json`));
        else {
          this.inflight++;
          this.text.set(i, this.json(`text/${i}.json`).finally(() => { this.inflight--; }));
        }
      }
      return this.text.get(i);
    }

    // The text of tokens [a, b): the concatenation of their pieces (positions only when there is no text).
    async tokens(a, b) {
      if (!this.hasText()) return `[tokens ${a}\u2013${b - 1}]`;
      const n = this.m.text_chunk, parts = [];
      for (let c = Math.floor(a / n); c * n < b; c++) {
        const pieces = await this.chunk(c);
        parts.push(pieces.slice(Math.max(a - c * n, 0), Math.min(b - c * n, pieces.length)).join(""));
      }
      return parts.join("");
    }
  }

  SJV.Data = Data;
  SJV.parseTile = parseTile;
  SJV.findCol = findCol;
  SJV.parseIncoming = parseIncoming;
})(window.SJV);
