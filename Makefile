# Two commands, each doing its own set-up (idempotently):
#   make demo   the main job on the embedded Gemma 3 270M (CPU is fine)
#   make test   the test suite (the default run skips tests marked slow; `make test-slow` runs them)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The PyTorch CPU build is the numerics reference of the tests; pinning it keeps pip from pulling a CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.stamp

.PHONY: setup test test-slow demo bench-small clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(VENV)/bin/stream-jax demo --out reports/demo

bench-small: $(STAMP)
	$(PY) benchmarks/scaling.py --small

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache reports
