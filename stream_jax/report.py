"""Report folders: report.json, the trace (orbax), PNG figures and an index.html, written atomically.

A run writes into a hidden sibling folder and swaps it into place only when everything is on disk, so a
crashed run never leaves a half-written report that looks complete, and an earlier report is removed only
after its replacement exists.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import json
import os
import pathlib
import shutil
from typing import Any, Mapping, Optional

import jax
import numpy as np

from stream_jax.config import StreamConfig
from stream_jax.mask import BlockMask
from stream_jax.trace import LayerTrace, Trace

TRACE_DIR = "trace"
TRACE_META = "trace.json"


def to_jsonable(x: Any) -> Any:
  """numpy/jax scalars and arrays, dataclasses, tuples -> plain JSON values (NaN -> None)."""
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return {f.name: to_jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
  if isinstance(x, Mapping):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if isinstance(x, (jax.Array, np.ndarray, np.generic)):
    return to_jsonable(np.asarray(x).tolist())
  if isinstance(x, float) and not np.isfinite(x):
    return None
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  return str(x)


# ----------------------------------------------------------------------------------------------- trace io


def _layer_meta(layer: LayerTrace) -> dict:
  m = layer.mask
  return dict(layer=layer.layer, kind=layer.kind, mode=layer.mode, window=layer.window,
              block_q=m.block_q, block_k=m.block_k, q_len=m.q_len, k_len=m.k_len,
              config=None if m.config is None else dataclasses.asdict(m.config))


def save_trace(path: str | os.PathLike, trace: Trace) -> None:
  """Saves a Trace: arrays with orbax under `path/trace`, the static structure in `path/trace.json`."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel  (slow import)

  path = pathlib.Path(path).absolute()
  path.mkdir(parents=True, exist_ok=True)
  arrays = {"layers": [dict(indices=l.mask.indices, counts=l.mask.counts, mass=l.mass)
                       for l in trace.layers]}
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(path / TRACE_DIR, arrays, force=True)
  ckpt.wait_until_finished()
  (path / TRACE_META).write_text(json.dumps({"layers": [_layer_meta(l) for l in trace.layers]}, indent=1))


def load_trace(path: str | os.PathLike) -> Trace:
  """Restores what `save_trace` wrote into the same Trace pytree (bit-identical arrays)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  path = pathlib.Path(path).absolute()
  meta_file = path / TRACE_META
  if not meta_file.exists():
    raise FileNotFoundError(f"no saved trace at {path} (missing {TRACE_META})")
  meta = json.loads(meta_file.read_text())["layers"]
  arrays = ocp.StandardCheckpointer().restore(path / TRACE_DIR)["layers"]
  if len(arrays) != len(meta):
    raise ValueError(f"trace at {path} is inconsistent: {len(meta)} layers described, {len(arrays)} saved")
  layers = []
  for m, a in zip(meta, arrays):
    cfg = None if m["config"] is None else StreamConfig(**m["config"])
    mask = BlockMask(jax.numpy.asarray(a["indices"]), jax.numpy.asarray(a["counts"]), m["block_q"],
                     m["block_k"], m["q_len"], m["k_len"], cfg)
    layers.append(LayerTrace(mask, jax.numpy.asarray(a["mass"]), m["layer"], m["kind"], m["mode"],
                             m["window"]))
  return Trace(tuple(layers))


# ---------------------------------------------------------------------------------------------- the folder


def _html(title: str, summary: Mapping[str, Any], figures: list[str], sections: Mapping[str, str]) -> str:
  rows = "\n".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in summary.items())
  figs = "\n".join(f'<figure><img src="{html.escape(f)}" alt="{html.escape(f)}">'
                   f"<figcaption>{html.escape(f)}</figcaption></figure>" for f in figures)
  extra = "\n".join(f"<h2>{html.escape(k)}</h2><pre>{html.escape(v)}</pre>" for k, v in sections.items())
  return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:4px 10px;text-align:left}}img{{max-width:100%}}
figure{{margin:1.5em 0}}pre{{background:#f6f6f6;padding:1em;overflow-x:auto}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>Written {datetime.datetime.now().isoformat(timespec="seconds")} by stream_jax.
Full numbers: <a href="report.json">report.json</a>.</p>
<table>{rows}</table>
{extra}
{figs}
</body></html>
"""


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def write_report(out_dir: str | os.PathLike, *, report: Mapping[str, Any], summary: Mapping[str, Any],
                 figures: Optional[Mapping[str, Any]] = None, trace: Optional[Trace] = None,
                 sections: Optional[Mapping[str, str]] = None, title: str = "stream_jax report"
                 ) -> pathlib.Path:
  """Writes report.json, trace/, <name>.png figures and index.html into `out_dir`, atomically.

  Args:
    report: everything worth keeping (JSON-able after `to_jsonable`).
    summary: the key numbers shown at the top of index.html.
    figures: name -> a matplotlib Figure (saved as name.png and closed) or a callable that writes the PNG
      to the path it is given (the stream_jax.plots functions).
    trace: saved with orbax (restore with `load_trace(out_dir)`).
    sections: title -> preformatted text (tables) shown in index.html.
  """
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  out = pathlib.Path(out_dir).absolute()
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    names = []
    for name, fig in (figures or {}).items():
      png = tmp / f"{name}.png"
      if hasattr(fig, "savefig"):
        fig.savefig(png, dpi=110, bbox_inches="tight")
        plt.close(fig)
      else:
        fig(str(png))
      names.append(png.name)
    if trace is not None:
      save_trace(tmp, trace)
    (tmp / "report.json").write_text(json.dumps(to_jsonable(report), indent=1))
    (tmp / "index.html").write_text(_html(title, summary, names, sections or {}))
    old = None
    if out.exists():
      old = out.parent / f".{out.name}.old-{os.getpid()}"
      out.rename(old)
    tmp.rename(out)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out
