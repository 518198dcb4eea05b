# Two entry points: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# DeepSpeed JIT-builds a small CPU op on first use; keep the build with this environment so two checkouts
# on one machine do not rebuild it over each other in ~/.cache.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions

.PHONY: setup test demo clean

$(BIN)/.installed: requirements.txt requirements-torch.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -r requirements-torch.txt
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install -e . --no-deps
	touch $@

setup: $(BIN)/.installed

test: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

demo: setup
	PATH=$(CURDIR)/$(BIN):$$PATH bash launch/demo.sh

clean:
	rm -rf runs demo_out
