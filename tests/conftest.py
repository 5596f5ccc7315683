"""The order the files go to pytest-xdist workers in (`make test`: -n 2 --dist loadfile) and the run's shared
JAX compilation cache; no fixtures here.

xdist hands out whole files, by default the ones with the most tests first; a long file with few tests then
starts last and one worker idles while it runs (test_readme.py, 2 tests and ~130 s on 2 cores, started 45th
of 47 files). Under xdist the longest files (measured in the default run on 2 cores) go first, the rest keep
xdist's order (most tests first). A single-process run is left as it is.
"""

import atexit
import collections
import os
import shutil
import sys
import tempfile

# Longest first (seconds per file in the default run on 2 cores, both workers busy).
LONGEST_FIRST = (
    "test_calibration.py",  # ~200 s
    "test_readme.py",  # ~135 s in one test (a subprocess running every README block)
    "test_cli.py",  # ~140 s
    "test_viewer_browser.py",  # ~130 s
    "test_ideal.py",
    "test_model_gemma3_270m.py",
    "test_table.py",  # the real-text test alone ~57 s
    "test_causal.py",
    "test_gguf_tokenizer.py",
    "test_sharding.py",
    "test_notebooks.py",
)


def pytest_configure(config):
  if getattr(config.option, "dist", "no") == "loadfile" and hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False  # the order below is the work queue's
  _share_compilations()


def _share_compilations():
  """One JAX compilation cache for the run, shared by both workers and every subprocess the tests start (the
  CLI, the README, the notebooks): they compile the same model programs. Fresh per run (a temporary folder, set
  by the controller before the workers start, so they inherit it), unless JAX_COMPILATION_CACHE_DIR is set.
  Every compilation is kept, however short: on 2 cores the suite's test time fell 2,693 -> 2,460 s caching those
  over 0.2 s and -> 2,267 s caching all (22 min 57 s -> 21:00 -> 19:17 wall)."""
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    folder = tempfile.mkdtemp(prefix="stream_jax_tests_jax_cache_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  if "jax" in sys.modules:  # read at import: a plugin may have imported jax already
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")))


def pytest_collection_modifyitems(config, items):
  if not hasattr(config, "workerinput"):  # not an xdist worker: the collection order stays
    return
  count = collections.Counter(item.nodeid.split("::")[0] for item in items)
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

  def key(item):
    path = item.nodeid.split("::")[0]
    name = path.rsplit("/", 1)[-1]
    return (rank.get(name, len(rank)), -count[path], path)
  items.sort(key=key)  # stable: the tests of a file keep their order
