# Two entry points: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# DeepSpeed JIT-builds a small CPU op on first use; keep the build with this environment so two checkouts
# on one machine do not rebuild it over each other in ~/.cache.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions

.PHONY: setup test lint demo clean cluster-packages

$(BIN)/.installed: requirements.txt requirements-torch.txt requirements-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -r requirements-torch.txt
	$(BIN)/pip install -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -e . --no-deps
	touch $@

setup: $(BIN)/.installed

# The tests' two-node SLURM and pdsh/ssh cluster (tests/cluster.py) runs Debian's daemons: install them once
# when missing, as root only. A policy-rc.d that says "no" (exit 101) keeps the packages from starting them in
# the machine's own namespace (the tests start their own); one is put in place for the install if none is there.
# Not root, or not Debian: nothing is installed and those tests skip, saying why.
CLUSTER_BINS := slurmctld slurmd sbatch munged pdsh sshd
CLUSTER_DEBS := slurm-wlm munge pdsh openssh-server

cluster-packages:
	@missing=; for b in $(CLUSTER_BINS); do PATH=$$PATH:/usr/sbin command -v $$b >/dev/null || missing=1; done; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "cluster-packages: $(CLUSTER_DEBS) missing and not root with apt-get: the cluster tests will skip"; \
	else \
	  echo "cluster-packages: installing $(CLUSTER_DEBS)"; start=$$(date +%s); policy=; \
	  if [ ! -e /usr/sbin/policy-rc.d ]; then policy=1; printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; \
	    chmod 755 /usr/sbin/policy-rc.d; fi; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(CLUSTER_DEBS) >/dev/null \
	    || echo "cluster-packages: apt-get failed: the cluster tests will skip"; \
	  [ -z "$$policy" ] || rm -f /usr/sbin/policy-rc.d; \
	  echo "cluster-packages: took $$(( $$(date +%s) - start )) s"; \
	fi

# Lint (undefined names, syntax errors) and repository hygiene: no tracked file over 1 MB (a wheel, a shard or a
# checkpoint committed by accident).
lint: setup
	$(BIN)/ruff check --select F,E9 mfrnet_ds tests launch bench shards
	@big=$$(git ls-files -z 2>/dev/null | xargs -0 -r du -k --apparent-size 2>/dev/null | awk '$$1 > 1024 {print $$2}'); \
	if [ -n "$$big" ]; then echo "lint: tracked files over 1 MB: $$big"; exit 1; fi

test: setup cluster-packages lint
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q --durations=25 $(PYTEST_ARGS) tests

demo: setup
	PATH=$(CURDIR)/$(BIN):$$PATH bash launch/demo.sh

clean:
	rm -rf runs demo_out
