"""The README's ```python blocks run as written, on the embedded Gemma 3 270M.

Each `## ` section's blocks run in order in one namespace: a block may use names an earlier block of its own
section defined, never another section's (a reader copies one section at a time). They run in a subprocess
(`python tests/test_readme.py README.md`) with two fake CPU devices, because the multi-GPU section's mesh
has data=2, and in a temporary working folder, because blocks write folders (out/sweep). `load_model` is
memoised so the embedded model loads once for every section. One size is cut to keep the test fast (SMALL:
the core example's 8192 tokens become 2048), and each section's result is checked (CHECKS).
"""

import os
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# section title prefix -> (text, replacement): sizes cut for the test
SMALL = {"Worked example": ("8192", "2048")}
# section title prefix -> an expression over the section's names that must hold after its blocks ran
CHECKS = {
    "Worked example": "out.shape == q.shape and 0 < float(sj.kept_fraction(mask).mean()) < 1",
    "Loading a model": "run.hidden.shape[:2] == (18, 1) and one.logits.ndim == 2 and 0 < float(run.trace."
                       "kept_fraction()) <= 1",
    "Causal tests": "run.logits.shape[:2] == (1, T) and bool(np.isfinite(np.asarray(run.logits)).all())",
    "Faithfulness": "0 < float(trace.coverage()) <= 1 and trace.layers[5].coverage.shape[:2] == (1, 4)",
    "Multi-GPU": "len(trace) == 18 and run.logits.shape[0] == 2",
    "Exploring": "(folder / 'index.html').exists() and (both / 'compare').is_dir() and len(sents) > 10",
    "Composing": "bcoo.shape == blocks.shape == (1, 4, 11, 11) and len(best) == 3 and "
                 "measured * e['estimate'] > 0 and silenced.hooked['last'][5].shape == (1, 640) and "
                 "sorted(silenced.hooked['last']) == list(range(18))",
}


def python_blocks(text: str) -> list[tuple[str, int, str]]:
  """(section title, line number, code) of every ```python block, in order."""
  blocks, section, code, start = [], "", None, 0
  for i, line in enumerate(text.splitlines(), 1):
    if code is None and line.startswith("## "):
      section = line[3:].strip()
    elif code is None and line.strip() == "```python":
      code, start = [], i + 1
    elif code is not None and line.strip() == "```":
      blocks.append((section, start, "\n".join(code)))
      code = None
    elif code is not None:
      code.append(line)
  return blocks


def test_readme_has_python_blocks_in_several_sections():
  blocks = python_blocks(README.read_text())
  assert len(blocks) >= 5 and len({s for s, _, _ in blocks}) >= 5


def test_readme_python_blocks_run_as_written(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             MPLBACKEND="Agg")
  r = subprocess.run([sys.executable, __file__, str(README)], cwd=tmp_path, env=env, capture_output=True,
                     text=True, timeout=900)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
  assert r.stdout.count("ok: README.md line") == len(python_blocks(README.read_text())), r.stdout


def _run(readme: str) -> int:
  import functools  # pylint: disable=import-outside-toplevel
  import stream_jax.models  # pylint: disable=import-outside-toplevel
  load = functools.lru_cache(maxsize=None)(stream_jax.models.load_model)
  stream_jax.models.load_model = load  # `from stream_jax.models import load_model` in a block gets this one
  namespaces: dict[str, dict] = {}
  for section, line, code in python_blocks(pathlib.Path(readme).read_text()):
    t0 = time.perf_counter()
    ns = namespaces.setdefault(section, {"__name__": "__readme__"})
    for prefix, (text, small) in SMALL.items():
      if section.startswith(prefix):
        code = code.replace(text, small)
    try:
      exec(compile(code, f"README.md line {line}", "exec"), ns)  # pylint: disable=exec-used
    except Exception:  # pylint: disable=broad-except
      import traceback  # pylint: disable=import-outside-toplevel
      print(f"FAILED: README.md line {line} (section {section!r}):\n{code}", file=sys.stderr)
      traceback.print_exc()
      return 1
    print(f"ok: README.md line {line} ({section}) in {time.perf_counter() - t0:.1f} s", flush=True)
  for prefix, check in CHECKS.items():
    ns = next((v for k, v in namespaces.items() if k.startswith(prefix)), None)
    if ns is None or not eval(check, ns):  # pylint: disable=eval-used
      print(f"FAILED: README section {prefix!r}: {check}", file=sys.stderr)
      return 1
  return 0


if __name__ == "__main__":
  sys.path.remove(str(pathlib.Path(__file__).resolve().parent))  # tests/ holds helper modules, not packages
  sys.exit(_run(sys.argv[1]))
