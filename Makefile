# The two commands of the README: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[engine]'
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[engine,test]'
	@touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(BIN)/mistral-gateway

test: $(VENV)/.installed-test
	$(BIN)/ruff check gateway tests
	$(BIN)/ruff format --check gateway tests
	$(BIN)/mypy
	$(BIN)/pytest -q

# Benchmarks print numbers; they are not tests. LiteLLM gets a venv of its own (it pins many packages),
# installed on first use; set BENCH_LITELLM=0 to leave it out.
BENCH_LITELLM ?= 1
LITELLM_VENV  ?= .venv-litellm

bench: $(VENV)/.installed-test
	@if [ "$(BENCH_LITELLM)" = 1 ] && [ ! -x $(LITELLM_VENV)/bin/litellm ]; then \
		$(PYTHON) -m venv $(LITELLM_VENV) && $(LITELLM_VENV)/bin/pip install --quiet 'litellm[proxy]'; fi
	LITELLM_BIN=$(if $(filter 1,$(BENCH_LITELLM)),$(LITELLM_VENV)/bin/litellm,) $(BIN)/python -m tests.bench.overhead $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(LITELLM_VENV) .pytest_cache .mypy_cache .ruff_cache
