"""`models/` installs as `stream_jax.models`, never as a bare top-level `models` package."""

import importlib
import pathlib
import subprocess
import sys
import zipfile

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
