# The two commands of the README's quick start, and the checks CI runs.
VENV ?= .venv
EXTRAS ?= dev,tinymodel,mlx,llamacpp,gateway
BIN := $(VENV)/bin
STAMP := $(VENV)/.genq-$(subst $(comma),-,$(EXTRAS))
comma := ,

.PHONY: demo test lint unit setup llama-server clean

setup: $(STAMP)

$(STAMP): pyproject.toml ops/bootstrap.sh
	VENV=$(VENV) EXTRAS=$(EXTRAS) ops/bootstrap.sh
	touch $@

demo: setup
	$(BIN)/genq demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

llama-server:
	@ops/build_llama_server.sh | tail -n 1 > $(VENV)/llama-server.path

test: setup llama-server lint
	GENQ_TEST_LLAMA_SERVER=$$(cat $(VENV)/llama-server.path) $(BIN)/pytest -q

unit: setup
	$(BIN)/pytest -q tests/test_contract.py tests/test_jobstore.py tests/test_broker.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
