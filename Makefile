# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-install lint bench docs install clean

# torch first, pinned, and CPU: the demo and the tests need no GPU. Where the CPU wheel is
# not the default (PyPI on Linux resolves torch to the CUDA build, several GB), point
# TORCH_INDEX_URL at a CPU index, e.g. make TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
TORCH_INDEX := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL),)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_INDEX) torch==2.13.0
	# Everything else at the exact versions the tests ran with (constraints.txt): [dev] is
	# every extra ([all]: what the demo runs) with the trainer libraries and test tools.
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rewardq demo

test: $(STAMP)
	$(BIN)/python -m pytest

# The tests that start no process, server or connection (tests/conftest.py marks the others
# `processes`): pure modules and the judge client on an in-memory transport, in under a minute.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not processes" -q

# The install checks, from the wheel built from this checkout: fresh lean venvs (the core
# install, and a worker from rewardq[worker]) and rewardq[trainer] resolved beside verl and
# TRL. Minutes of pip, so outside `make test`; CI runs them after it.
test-install: $(STAMP)
	REWARDQ_TEST_LEAN_INSTALL=1 REWARDQ_TEST_PIP_CHECK=1 $(BIN)/python -m pytest -m install

lint: $(STAMP)
	$(BIN)/ruff check broker judge workers producer gateway monitoring judge_server rewardq tests \
		benchmarks
	$(BIN)/mypy -p rewardq.broker -p rewardq.judge -p rewardq.producer -p rewardq.workers \
		-p rewardq.gateway
	$(BIN)/hadolint Dockerfile

bench: $(STAMP)
	$(BIN)/rewardq bench

# The documentation site (mkdocs.yml) into build/site; --strict fails on a broken link,
# a broken anchor or a page missing from the nav.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
