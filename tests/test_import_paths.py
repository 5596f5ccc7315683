"""No module of the repository's import paths shadows an installed package, or one a dependency probes for.

The test suite puts `tests/` (pytest's rootdir insertion) and `benchmarks/` (tests/test_benchmarks.py, and
the benchmark scripts themselves) on `sys.path`, and `python -m pytest` adds the repository root. A helper
there named like a real package (once: `benchmarks/kernels.py`, which transformers 5.25's hub-kernels
integration imported as the `kernels` package) breaks every later import of that package on the worker.
"""

import importlib.metadata
import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The folders whose modules become top-level names, and which top-level names they contribute.
IMPORT_PATHS = ("tests", "benchmarks", ".")


def _top_level_names() -> dict[str, str]:
  names = {}
  for folder in IMPORT_PATHS:
    base = ROOT / folder
    for p in base.iterdir():
      if p.name.startswith((".", "_")):
        continue
      if p.suffix == ".py":
        names[p.stem] = str(p.relative_to(ROOT))
      elif p.is_dir() and folder == "." and (p / "__init__.py").exists():
        names[p.name] = str(p.relative_to(ROOT))
  # stream_jax is the project's own distribution; models/ installs as stream_jax.models
  names.pop("stream_jax", None)
  return names


def _probed_names() -> set[str]:
  """Optional packages transformers checks for (`_is_package_available("kernels")` and the like): a module
  of ours under such a name is taken for the package."""
  spec = importlib.util.find_spec("transformers")
  if spec is None or not spec.origin:
    return set()
  source = pathlib.Path(spec.origin).parent / "utils" / "import_utils.py"
  if not source.exists():
    return set()
  found = re.findall(r'is_package_available\(\s*"([A-Za-z0-9_.]+)"', source.read_text())
  return {name.split(".")[0] for name in found}


def test_the_scan_sees_the_helpers():
  names = _top_level_names()
  # the scan must see what it guards, else the collision test passes vacuously
  assert {"scaling", "faithfulness", "reference", "tiny_models", "models"} <= set(names)


def test_no_repository_module_shadows_an_installed_distribution():
  installed = importlib.metadata.packages_distributions()
  clashes = {n: (where, installed[n]) for n, where in _top_level_names().items() if n in installed}
  assert not clashes, f"repository modules named like installed packages: {clashes}"


def test_no_repository_module_shadows_a_package_transformers_probes_for():
  pytest.importorskip("transformers")
  probed = _probed_names()
  assert "torch" in probed  # the scan read transformers' list
  clashes = {n: where for n, where in _top_level_names().items() if n in probed}
  assert not clashes, f"repository modules named like packages transformers probes for: {clashes}"
