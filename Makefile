# acme-registry: `make test` installs what the tests need (Debian packages, a venv) and runs them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := pebble docker-registry skopeo util-linux iproute2 curl podman buildah runc debootstrap docker.io bind9 bind9-dnsutils haproxy

.PHONY: test demo bench lint unit integration e2e system-deps venv clean

# Two pytest processes side by side, each line tagged with its part. Part 1: the image tests
# (tests/e2e, which build the image once) and the longest integration files (the replicas
# on SeaweedFS, the gc agent); part 2: everything else, so a new test file lands there.
# Most tests wait on servers rather than compute, so two cores run both parts in a little
# over the time of the longer one.
PART1 := tests/e2e tests/integration/test_replicas.py tests/integration/test_replicas_token.py \
	tests/integration/test_s3storage.py tests/integration/test_statestore.py tests/integration/test_gc_agent.py
test: system-deps venv lint
	@( $(BIN)/pytest $(PART1) 2>&1 | sed -u 's/^/[part1] /'; exit $${PIPESTATUS[0]} ) & one=$$!; \
	( $(BIN)/pytest tests $(addprefix --ignore=,$(PART1)) 2>&1 | sed -u 's/^/[part2] /'; exit $${PIPESTATUS[0]} ) & two=$$!; \
	status=0; wait $$one || status=$$?; wait $$two || status=$$?; \
	[ $$status -eq 0 ] && echo "make test: both parts passed" || echo "make test: a part failed (exit $$status)"; \
	exit $$status

# The whole job on this machine: a local CA, the image, a push and a pull; cleans up after.
demo: system-deps venv
	$(BIN)/python scripts/demo.py

# Ours against Caddy, certbot (standalone and its RFC 2136 plugin) and the bare registry;
# rewrites docs/benchmarks.md and charts.
bench: system-deps venv
	@missing=""; for p in caddy certbot python3-certbot-dns-rfc2136; do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python -m bench

e2e: system-deps venv
	$(BIN)/pytest tests/e2e

unit: venv
	$(BIN)/pytest tests/unit

integration: system-deps venv
	$(BIN)/pytest tests/integration

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

# Installs only what is missing, so a second run costs nothing.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@# Pebble 2.10 (ARI, profiles) from Debian sid, unpacked under .cache: nothing else from sid.
	@scripts/install-pebble-sid.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache
