# Everything installs into local virtual environments; nothing outside the checkout is touched.
PYTHON ?= python3
VENV := .venv
FHIR_VENV := .fhir-venv
SEKMET_VERSION := 0.1.1

.PHONY: install lint test fhir-server system-packages chromium bench scaleout-bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet '.[test]'

# The real FHIR R4 server the integration tests run against (its own environment, its own deps).
$(FHIR_VENV)/bin/sekmet:
	$(PYTHON) -m venv $(FHIR_VENV)
	$(FHIR_VENV)/bin/pip install --quiet sekmet-fhir==$(SEKMET_VERSION)

fhir-server: $(FHIR_VENV)/bin/sekmet

# Real servers the tests start on loopback: Debian's nginx and the PostgreSQL 15 server binaries.
# Installed only when missing (needs root, as on CI's fresh Debian machine).
NGINX := /usr/sbin/nginx
INITDB := /usr/lib/postgresql/15/bin/initdb

system-packages:
	@if [ ! -x $(NGINX) ] || [ ! -x $(INITDB) ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $$([ -x $(NGINX) ] || echo nginx) $$([ -x $(INITDB) ] || echo postgresql); \
	fi


# Debian's Chromium for the SMART app's browser test (Playwright drives it; never `playwright install`).
chromium:
	@test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium)

lint: install
	$(VENV)/bin/ruff check cds_service tests benchmarks
	$(VENV)/bin/mypy cds_service

test: install fhir-server system-packages chromium lint
	CRS_CDS_SEKMET=$(FHIR_VENV)/bin/sekmet $(VENV)/bin/python -m pytest -q

# Throughput, latency and memory under gunicorn against a bare Flask reference (benchmarks/README.md).
# BENCH_ARGS: e.g. --quick, or --runs 3 --duration 10.
bench: install fhir-server
	$(VENV)/bin/pip install --quiet '.[production]'
	$(VENV)/bin/python benchmarks/run.py $(BENCH_ARGS)

# Calls/s and p99 through nginx with 2 instances against 1, and slowloris before/after (benchmarks/README.md).
scaleout-bench: install system-packages
	@command -v wrk >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y wrk)
	$(VENV)/bin/python benchmarks/scaleout.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(FHIR_VENV) build dist *.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache
