"""The order the files go to pytest-xdist workers in (`make test`: -n 2 --dist loadfile); no fixtures here.

xdist hands out whole files, by default the ones with the most tests first; a long file with few tests then
starts last and one worker idles while it runs (test_readme.py, 2 tests and ~130 s on 2 cores, started 45th
of 47 files). Under xdist the longest files (measured in the default run on 2 cores) go first, the rest keep
xdist's order (most tests first). A single-process run is left as it is.
"""

import collections

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
