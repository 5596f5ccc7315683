"""The block-map pyramid: a layer's kept blocks and their mass as compact binary tiles at several zooms.

A layer/head's block map is sparse: query block j keeps at most C key blocks, so the map has nQ x C entries
whatever the zoom, never nQ x nK. Level z pools 2^z x 2^z block pairs into one cell (sum and max of the mass);
level 0 is the trace itself (exact float32 mass, the row's coverage). Each level is cut along query rows into
tiles of `tile_rows` rows, so the page fetches only the rows on screen at the zoom it shows.

Tile file (little-endian), `tiles/l{layer}/h{head}/z{level}_{tile}.bin`:
  int32[4] header: rows, nnz, col_bytes (2 or 4), flags (1: max[] follows sum[]; 2: rowcov[] follows)
  uint32[rows + 1] rowptr;  uint16 or uint32[nnz] cols (ascending per row; padded to 4 bytes)
  float32[nnz] sum;  float32[nnz] max (flag 1);  float32[rows] row coverage, NaN where unknown (flag 2)
Rows are the level's pooled query rows [tile * tile_rows, ...); cols are pooled key-block ids.

Incoming index (level 0 transposed: who attends to a key block, read in time proportional to the hits),
`tiles/l{layer}/h{head}/in_{tile}.bin` for key blocks [tile * tile_rows, ...):
  int32[4] header: cols, nnz, 0, 0
  uint32[cols + 1] colptr;  uint32[nnz] query block ids (ascending per key block);  float32[nnz] mass
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Optional

import numpy as np

TILE_ROWS = 1024  # query rows per tile: ~100 KB at C = 19
TOP_ROWS = 1024  # the pyramid stops at the first level whose rows and cols both fit in this many
FLAG_MAX, FLAG_ROWCOV = 1, 2


@dataclasses.dataclass(frozen=True)
class Level:
  """One pyramid level of one layer, all heads: entries sorted by (head, row, col)."""

  z: int
  rows: int  # pooled query rows
  cols: int  # pooled key columns
  head: np.ndarray  # int32[nnz]
  row: np.ndarray  # int32[nnz]
  col: np.ndarray  # int32[nnz]
  sum: np.ndarray  # float32[nnz]
  max: np.ndarray  # float32[nnz]


def level0(indices, mass) -> Level:
  """The block level of one layer from indices / mass [N, nQ, C] (no batch axis)."""
  idx = np.asarray(indices)
  m = np.asarray(mass, np.float32)
  if idx.ndim != 3 or m.shape != idx.shape:
    raise ValueError(f"indices and mass must both be [N, nQ, C] (one sample), got {idx.shape} and {m.shape}")
  n, nq, _ = idx.shape
  valid = idx >= 0
  head, row, _ = np.nonzero(valid)  # row-major: sorted by (head, row, slot), slots ascending in block id
  col = idx[valid].astype(np.int32)
  s = m[valid]
  order = None
  # BlockMask rows are ascending; a constructed mask may not be: sort only then.
  key = (head.astype(np.int64) * nq + row) * (int(idx.max(initial=0)) + 1) + col
  if key.size and np.any(np.diff(key) <= 0):
    order = np.argsort(key, kind="stable")
    head, row, col, s = head[order], row[order], col[order], s[order]
  return Level(0, nq, 0, head.astype(np.int32), row.astype(np.int32), col, s, s)


def pool(prev: Level, n_cols0: int) -> Level:
  """The next level: 2 x 2 cells of `prev` into one (sum of sums, max of maxes)."""
  z = prev.z + 1
  rows, cols = -(-prev.rows // 2), -(-n_cols0 // (1 << z))
  r, c = prev.row // 2, prev.col // 2
  key = (prev.head.astype(np.int64) * rows + r) * cols + c
  order = np.argsort(key, kind="stable")  # rows 2r and 2r + 1 are two sorted runs: timsort merges them
  key = key[order]
  start = np.concatenate([[0], np.flatnonzero(np.diff(key)) + 1]) if key.size else np.zeros(0, np.int64)
  s = np.add.reduceat(prev.sum[order], start) if key.size else prev.sum[:0]
  mx = np.maximum.reduceat(prev.max[order], start) if key.size else prev.max[:0]
  k = key[start]
  return Level(z, rows, cols, (k // (rows * cols)).astype(np.int32), ((k // cols) % rows).astype(np.int32),
               (k % cols).astype(np.int32), s.astype(np.float32), mx.astype(np.float32))


def pyramid(indices, mass, n_k: int, *, top: int = TOP_ROWS) -> list[Level]:
  """Levels 0..Z of one layer: Z is the first level whose pooled rows and cols both fit in `top`."""
  lev = level0(indices, mass)
  lev = dataclasses.replace(lev, cols=n_k)
  out = [lev]
  while max(out[-1].rows, out[-1].cols) > top:
    out.append(pool(out[-1], n_k))
  return out


def row_bounds(lev: Level, n_heads: int) -> np.ndarray:
  """int64[N * rows + 1]: where each (head, row) starts in the level's entries (a CSR row pointer)."""
  gkey = lev.head.astype(np.int64) * lev.rows + lev.row
  return np.searchsorted(gkey, np.arange(n_heads * lev.rows + 1))


def tile_bytes(lev: Level, bounds: np.ndarray, head: int, tile: int, tile_rows: int,
               rowcov: Optional[np.ndarray] = None) -> bytes:
  """The bytes of one tile (see the module docstring); bounds = row_bounds(lev, N)."""
  r0, r1 = tile * tile_rows, min((tile + 1) * tile_rows, lev.rows)
  rb = bounds[head * lev.rows + r0: head * lev.rows + r1 + 1]
  a, b = int(rb[0]), int(rb[-1])
  rowptr = (rb - a).astype(np.uint32)
  col_bytes = 2 if lev.cols <= 0xFFFF else 4
  cols = lev.col[a:b].astype(np.uint16 if col_bytes == 2 else np.uint32).tobytes()
  cols += b"\0" * (-len(cols) % 4)
  flags = (FLAG_MAX if lev.z > 0 else 0) | (FLAG_ROWCOV if rowcov is not None else 0)
  parts = [np.asarray([r1 - r0, b - a, col_bytes, flags], np.int32).tobytes(), rowptr.tobytes(), cols,
           lev.sum[a:b].tobytes()]
  if flags & FLAG_MAX:
    parts.append(lev.max[a:b].tobytes())
  if rowcov is not None:
    parts.append(np.asarray(rowcov[r0:r1], np.float32).tobytes())
  return b"".join(parts)


def incoming_bytes(lev: Level, n_heads: int, n_cols: int, tile_rows: int):
  """Yields (head, tile, bytes) of the incoming index of level 0 (see the module docstring)."""
  gkey = lev.head.astype(np.int64) * n_cols + lev.col
  order = np.argsort(gkey, kind="stable")  # rows stay ascending within a key block
  gkey, rows, mass = gkey[order], lev.row[order].astype(np.uint32), lev.sum[order]
  bounds = np.searchsorted(gkey, np.arange(n_heads * n_cols + 1))
  for h in range(n_heads):
    for t in range(num_tiles(n_cols, tile_rows)):
      c0, c1 = t * tile_rows, min((t + 1) * tile_rows, n_cols)
      cb = bounds[h * n_cols + c0: h * n_cols + c1 + 1]
      a, b = int(cb[0]), int(cb[-1])
      yield h, t, b"".join([np.asarray([c1 - c0, b - a, 0, 0], np.int32).tobytes(), (cb - a).astype(np.uint32).tobytes(),
                            rows[a:b].tobytes(), mass[a:b].astype(np.float32).tobytes()])


def read_incoming(data: bytes) -> dict:
  cols, nnz = np.frombuffer(data, np.int32, 2)
  colptr = np.frombuffer(data, np.uint32, cols + 1, 16)
  off = 16 + 4 * (cols + 1)
  return dict(colptr=colptr, rows=np.frombuffer(data, np.uint32, nnz, off),
              mass=np.frombuffer(data, np.float32, nnz, off + 4 * nnz))


def num_tiles(rows: int, tile_rows: int) -> int:
  return -(-rows // tile_rows)


def tile_path(layer: int, head: int, z: int, tile: int) -> str:
  return f"tiles/l{layer}/h{head}/z{z}_{tile}.bin"


def write_layer(root: pathlib.Path, layer: int, levels: list[Level], n_heads: int, *, tile_rows: int,
                coverage: Optional[np.ndarray] = None) -> int:
  """Writes every tile of one layer; coverage float32[N, nQ] (or None) goes into level 0. Returns bytes."""
  total = 0
  bounds = [row_bounds(lev, n_heads) for lev in levels]
  for h in range(n_heads):
    d = root / f"tiles/l{layer}/h{h}"
    d.mkdir(parents=True, exist_ok=True)
    for lev, bnd in zip(levels, bounds):
      cov = None
      if lev.z == 0:
        cov = np.full(lev.rows, np.nan, np.float32) if coverage is None else np.asarray(coverage[h], np.float32)
      for t in range(num_tiles(lev.rows, tile_rows)):
        data = tile_bytes(lev, bnd, h, t, tile_rows, cov)
        (d / f"z{lev.z}_{t}.bin").write_bytes(data)
        total += len(data)
  for h, t, data in incoming_bytes(levels[0], n_heads, levels[0].cols, tile_rows):
    (root / f"tiles/l{layer}/h{h}/in_{t}.bin").write_bytes(data)
    total += len(data)
  return total


def read_tile(data: bytes) -> dict:
  """Parses a tile (the page's reader, in Python: for tests and tools)."""
  rows, nnz, col_bytes, flags = np.frombuffer(data, np.int32, 4)
  off = 16
  rowptr = np.frombuffer(data, np.uint32, rows + 1, off)
  off += 4 * (rows + 1)
  cols = np.frombuffer(data, np.uint16 if col_bytes == 2 else np.uint32, nnz, off).astype(np.int64)
  off += col_bytes * nnz + (-(col_bytes * nnz) % 4)
  s = np.frombuffer(data, np.float32, nnz, off)
  off += 4 * nnz
  out = dict(rowptr=rowptr, cols=cols, sum=s, max=s, rowcov=None)
  if flags & FLAG_MAX:
    out["max"] = np.frombuffer(data, np.float32, nnz, off)
    off += 4 * nnz
  if flags & FLAG_ROWCOV:
    out["rowcov"] = np.frombuffer(data, np.float32, rows, off)
    off += 4 * rows
  if off != len(data):
    raise ValueError(f"tile has {len(data)} bytes, its header describes {off}")
  return out
