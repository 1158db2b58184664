# The two commands of the README: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test lock lock-check bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[engine]'
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[engine,test]'
	@touch $@ $(VENV)/.installed-run

# The suite on one worker more than the cores (up to 4), each taking a whole test module at a time, so that a module's
# engines and gateways start once, in one worker. One more than the cores because a quarter of the suite's time is
# spent waiting (engines starting, backoffs, timeouts running out): on 2 cores, 1 process 8 min 16 s, 2 workers
# 4 min 57 s, 3 workers 4 min 33 s (4 min 3 s once pytest's plugins were named, not discovered: pyproject.toml).
# tests/conftest.py gives each real engine its share of the cores.
# `make test PYTEST_WORKERS=` runs the suite in one process.
PYTEST_WORKERS ?= -n $(shell $(PYTHON) -c 'import os; print(min(4, len(os.sched_getaffinity(0)) + 1))') --dist loadfile

run: $(VENV)/.installed-run
	$(BIN)/mistral-gateway

test: $(VENV)/.installed-test lock-check
	$(BIN)/ruff check gateway tests
	$(BIN)/ruff format --check gateway tests
	$(BIN)/mypy
	$(BIN)/pytest -q $(PYTEST_WORKERS)

# requirements.lock: every runtime dependency, with the engine extra, pinned by hash for Python 3.11 on Linux x86_64
# (the container image's). `make lock` adds what pyproject.toml now needs and keeps the other pins;
# `make lock LOCK_ARGS=--upgrade` moves every pin to the newest release. pip-tools runs in a throwaway venv, from PyPI
# alone (no pip configuration of this machine), so the lock names the files everyone downloads.
LOCK       := requirements.lock
LOCK_VENV  ?= .venv-lock
LOCK_ARGS  ?=

lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -c 'import platform, sys; \
		assert sys.version_info[:2] == (3, 11) and sys.platform == "linux" and platform.machine() == "x86_64", \
		"make lock resolves for the image: run it with Python 3.11 on Linux x86_64 (PYTHON=python3.11)"'
	env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
		$(LOCK_VENV)/bin/pip install --quiet pip-tools
	env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
		CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe \
		--all-build-deps --extra engine --strip-extras --no-emit-index-url $(LOCK_ARGS) \
		--output-file $(LOCK) pyproject.toml
	rm -rf $(LOCK_VENV)

# Seconds: pip resolves the lock as the image installs it (every dependency pinned, every file's hash known) without
# installing anything; tests/unit/test_lock.py checks that it covers what pyproject.toml names.
# The lock names the files of Python 3.11 on Linux x86_64 (the image's); elsewhere it cannot resolve, and says so.
lock-check: $(VENV)/.installed-test
	@if $(BIN)/python -c 'import platform, sys; \
		sys.exit(not (sys.version_info[:2] == (3, 11) and sys.platform == "linux" and platform.machine() == "x86_64"))'; \
	then $(BIN)/python -m pip install --quiet --dry-run --ignore-installed --require-hashes -r $(LOCK); \
	else echo "lock-check skipped: $(LOCK) is for Python 3.11 on Linux x86_64"; fi

# Benchmarks print numbers; they are not tests. LiteLLM gets a venv of its own (it pins many packages),
# installed on first use; set BENCH_LITELLM=0 to leave it out.
BENCH_LITELLM ?= 1
LITELLM_VENV  ?= .venv-litellm

bench: $(VENV)/.installed-test
	@if [ "$(BENCH_LITELLM)" = 1 ] && [ ! -x $(LITELLM_VENV)/bin/litellm ]; then \
		$(PYTHON) -m venv $(LITELLM_VENV) && $(LITELLM_VENV)/bin/pip install --quiet 'litellm[proxy]'; fi
	LITELLM_BIN=$(if $(filter 1,$(BENCH_LITELLM)),$(LITELLM_VENV)/bin/litellm,) $(BIN)/python -m tests.bench.overhead $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(LITELLM_VENV) $(LOCK_VENV) .pytest_cache .mypy_cache .ruff_cache
