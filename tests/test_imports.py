"""The import graph of stream_jax: no cycles, and the Pallas kernels sit below the op entries.

Read from the source (ast, function-level imports included), so a lazy import cannot hide a cycle.
"""

import ast
import importlib
import pathlib

import pytest

import stream_jax

ROOT = pathlib.Path(stream_jax.__file__).parent
MODELS = ROOT.parent / "models"  # installs as stream_jax.models
# What a kernel may build on: the bottom module and the plain data types (op entries import the kernels).
KERNEL_DEPS = {"stream_jax.numerics", "stream_jax.mask", "stream_jax.config", "stream_jax.backend"}


def _sources() -> dict[str, pathlib.Path]:
  roots = [(ROOT, "stream_jax")] + ([(MODELS, "stream_jax.models")] if MODELS.is_dir() else [])
  out = {}
  for root, prefix in roots:
    for path in sorted(root.rglob("*.py")):
      parts = path.relative_to(root).with_suffix("").parts
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join((prefix,) + parts)] = path
  return out


SOURCES = _sources()


def _imports(name: str, path: pathlib.Path) -> set[str]:
  """stream_jax modules that `name` imports anywhere in its source (an imported name that is a submodule
  counts as that submodule)."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in SOURCES else base for a in node.names]
    else:
      continue
    for target in targets:
      while target and target not in SOURCES:  # `import stream_jax.mask.x` -> the module it names
        target = target.rpartition(".")[0]
      if target and target != name:
        found.add(target)
  return found


GRAPH = {name: _imports(name, path) for name, path in SOURCES.items()}


def test_graph_sees_the_core_modules():
  for name in ("stream_jax.numerics", "stream_jax.estimate", "stream_jax.attention", "stream_jax.dense",
               "stream_jax.kernels.estimate", "stream_jax.kernels.attention"):
    assert name in GRAPH
  assert "stream_jax.kernels.estimate" in GRAPH["stream_jax.estimate"]


def _cycle(names) -> list[str]:
  """One import cycle among `names` (depth-first search), or []."""
  state = {}  # name -> "open" | "done"

  def visit(name, path):
    state[name] = "open"
    for dep in sorted(GRAPH[name] & names):
      if state.get(dep) == "open":
        return path[path.index(dep):] + [dep]
      if dep not in state:
        found = visit(dep, path + [dep])
        if found:
          return found
    state[name] = "done"
    return []

  for name in sorted(names):
    if name not in state:
      found = visit(name, [name])
      if found:
        return found
  return []


def test_no_import_cycles_in_the_library():
  library = {n for n in GRAPH if not n.startswith("stream_jax.models")}
  cycle = _cycle(library)
  assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycles_with_the_models():
  cycle = _cycle(set(GRAPH))
  assert not cycle, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if n.startswith("stream_jax.kernels.")))
def test_kernels_import_only_the_bottom(name):
  bad = {dep for dep in GRAPH[name] if dep not in KERNEL_DEPS and not dep.startswith("stream_jax.kernels")}
  assert not bad, f"{name} imports {sorted(bad)}: kernels may build on {sorted(KERNEL_DEPS)} only"


def test_numerics_is_the_bottom():
  assert not GRAPH["stream_jax.numerics"]


@pytest.mark.parametrize("name", ["stream_jax.numerics", "stream_jax.backend", "stream_jax.dense",
                                  "stream_jax.estimate", "stream_jax.attention",
                                  "stream_jax.kernels.estimate", "stream_jax.kernels.attention"])
def test_op_modules_import(name):
  importlib.import_module(name)
