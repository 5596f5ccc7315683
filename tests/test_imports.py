"""The import graph of stream_jax: no cycles, and the Pallas kernels sit below the op entries.

Read from the source (ast, function-level imports included), so a lazy import cannot hide a cycle.
"""

import ast
import importlib
import pathlib
import re

import pytest

import stream_jax

ROOT = pathlib.Path(stream_jax.__file__).parent
MODELS = ROOT.parent / "models"  # installs as stream_jax.models
# What a kernel may build on: the bottom module and the plain data types (op entries import the kernels).
KERNEL_DEPS = {"stream_jax.numerics", "stream_jax.mask", "stream_jax.config"}


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


def _runtime_nodes(tree: ast.AST):
  """Every node of the module, function bodies included, except `if TYPE_CHECKING:` blocks: those imports
  never run (annotations only), so they cannot take part in an import cycle."""
  stack = [tree]
  while stack:
    node = stack.pop()
    yield node
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
      stack.extend(node.orelse)
      continue
    stack.extend(ast.iter_child_nodes(node))


def _imports(name: str, path: pathlib.Path) -> set[str]:
  """stream_jax modules that `name` imports anywhere in its source (an imported name that is a submodule
  counts as that submodule)."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in _runtime_nodes(ast.parse(path.read_text())):
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


# Call-time edges that are not layering: a Trace displays itself in a notebook through the viewer
# (`Trace._repr_html_` imports stream_jax.viewer.notebook when a notebook renders it, long after every module
# is initialised). The viewer sits above the trace and the analyses; this edge points back down the graph by
# design, so it is the one left out of the cycle check. Any other back-edge still fails.
DISPLAY_EDGES = {("stream_jax.trace", "stream_jax.viewer.notebook")}

GRAPH = {name: _imports(name, path) - {dep for src, dep in DISPLAY_EDGES if src == name}
         for name, path in SOURCES.items()}


def test_graph_sees_the_core_modules():
  for name in ("stream_jax.numerics", "stream_jax.estimate", "stream_jax.blocksparse", "stream_jax.dense",
               "stream_jax.kernels.estimate_triton", "stream_jax.kernels.blocksparse_triton"):
    assert name in GRAPH
  assert "stream_jax.kernels.estimate_triton" in GRAPH["stream_jax.estimate"]


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


@pytest.mark.parametrize("name", ["stream_jax.numerics", "stream_jax.kernels.implementations",
                                  "stream_jax.dense", "stream_jax.estimate", "stream_jax.blocksparse",
                                  "stream_jax.ideal", "stream_jax.kernels.estimate_triton",
                                  "stream_jax.kernels.blocksparse_triton"])
def test_op_modules_import(name):
  importlib.import_module(name)


def test_the_display_edge_is_taken_only_when_a_notebook_renders():
  """DISPLAY_EDGES is left out of the cycle check because it is a call-time edge: importing the trace (and
  the whole core) must not import the viewer."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  code = ("import sys, stream_jax, stream_jax.trace, stream_jax.analysis; "
          "bad = sorted(m for m in sys.modules if m.startswith('stream_jax.viewer')); assert not bad, bad")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]


# ------------------------------------------------------------------------------------------- boundaries


def test_analysis_never_imports_the_model():
  """`stream_jax.analysis` is pure functions of traces and arrays: the experiments that run the model live
  in `stream_jax.experiments` (function-level imports count: the graph is read from the source)."""
  analysis = [n for n in GRAPH if n == "stream_jax.analysis" or n.startswith("stream_jax.analysis.")]
  bad = {n: sorted(d for d in GRAPH[n] if d.startswith("stream_jax.models")) for n in analysis}
  assert "stream_jax.analysis.causal" in bad  # the scan sees the package
  bad = {k: v for k, v in bad.items() if v}
  assert not bad, f"analysis modules import the model: {bad}"


# The command line is where the environment becomes arguments.
ENV_READERS = {"stream_jax/cli.py"}
ENV_NAMES = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}


def _reads_environment(path: pathlib.Path) -> list[str]:
  """`os.environ`, `os.getenv`, `from os import environ` and the like in a module's source (any depth)."""
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Attribute) and node.attr in ENV_NAMES:
      found.append(f"line {node.lineno}: {ast.unparse(node)}")
    elif isinstance(node, ast.ImportFrom) and node.module == "os" and \
        {a.name for a in node.names} & ENV_NAMES:
      found.append(f"line {node.lineno}: from os import {', '.join(a.name for a in node.names)}")
  return found


def _repo_path(path: pathlib.Path) -> str:
  return path.relative_to(ROOT.parent).as_posix()


def test_only_the_cli_reads_the_environment():
  """The library and the model port take what they need as arguments (a setting read from the environment
  while a function is traced is not part of its jit cache key); the CLI reads the environment."""
  readers = {_repo_path(p): hits for p in SOURCES.values() if (hits := _reads_environment(p))}
  assert "stream_jax/cli.py" in readers  # the scan finds the one that is allowed
  unexpected = {k: v for k, v in readers.items() if k not in ENV_READERS}
  assert not unexpected, f"environment read outside the CLI: {unexpected}"


def test_the_environment_scan_sees_every_form(tmp_path):
  src = tmp_path / "m.py"
  src.write_text("import os\nfrom os import getenv\ndef f():\n  return os.environ.get('A'), os.getenv('B')\n")
  assert [h.split(":")[0] for h in _reads_environment(src)] == ["line 2", "line 4", "line 4"]


def _flag_strings(path: pathlib.Path) -> list[str]:
  """String constants, docstrings aside, that name a command-line flag ("--top-k")."""
  flag = re.compile(r"(?<![\w-])--[a-z][a-z-]+")
  tree = ast.parse(path.read_text())
  docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
  return [f"line {n.lineno}: {n.value!r}" for n in ast.walk(tree)
          if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs and flag.search(n.value)]


def test_experiments_name_parameters_not_flags():
  """Experiments raise errors (InputError.params) and write notes naming their Python parameters; the CLI
  (stream_jax/cli.py) says them as its flags."""
  found = {name: hits for name, path in SOURCES.items() if name.startswith("stream_jax.experiments")
           and (hits := _flag_strings(path))}
  assert not found, f"CLI wording outside the CLI: {found}"
  assert _flag_strings(SOURCES["stream_jax.cli"])  # the scan sees flags where they belong
