# The two commands of the README's quick start, and the checks CI runs.
#
# `make demo` installs only what the demo runs (genq, the mlx and tinymodel extras, redis-server);
# `make test` adds the rest (dev, llamacpp, gateway extras; redis-sentinel, prometheus; llama-server)
# to the same venv. Each extras set has its own stamp, so `make demo` then `make test` installs
# only what is missing and neither redoes the other's work.
VENV ?= .venv
BIN := $(VENV)/bin
comma := ,
DEMO_EXTRAS := tinymodel,mlx
EXTRAS ?= dev,tinymodel,mlx,llamacpp,gateway
stamp = $(VENV)/.genq-$(subst $(comma),-,$(1))
DEMO_STAMP := $(call stamp,$(DEMO_EXTRAS))
STAMP := $(call stamp,$(EXTRAS))

.PHONY: demo test lint unit setup setup-demo system-demo system-test llama-server clean

# One stamp per extras set: .venv/.genq-tinymodel-mlx, .venv/.genq-dev-tinymodel-mlx-llamacpp-gateway.
$(VENV)/.genq-%: pyproject.toml ops/bootstrap.sh
	VENV=$(VENV) ops/bootstrap.sh python $(subst -,$(comma),$*)
	touch $@

system-demo:
	@ops/bootstrap.sh system demo

system-test:
	@ops/bootstrap.sh system test

setup-demo: system-demo $(DEMO_STAMP)

setup: system-test $(STAMP)

demo: setup-demo
	$(BIN)/genq demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

llama-server: setup
	@ops/build_llama_server.sh | tail -n 1 > $(VENV)/llama-server.path

# pytest's own exit status is make's: failures (1), errors, and "no tests collected" (5) all fail.
test: setup llama-server lint
	GENQ_TEST_LLAMA_SERVER=$$(cat $(VENV)/llama-server.path) $(BIN)/pytest -q

unit: setup
	$(BIN)/pytest -q tests/test_contract.py tests/test_jobstore.py tests/test_broker.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
