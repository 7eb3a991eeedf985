# Everything installs into local virtual environments; nothing outside the checkout is touched.
PYTHON ?= python3
VENV := .venv
FHIR_VENV := .fhir-venv
SEKMET_VERSION := 0.1.1

.PHONY: install test fhir-server clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet '.[test]'

# The real FHIR R4 server the integration tests run against (its own environment, its own deps).
$(FHIR_VENV)/bin/sekmet:
	$(PYTHON) -m venv $(FHIR_VENV)
	$(FHIR_VENV)/bin/pip install --quiet sekmet-fhir==$(SEKMET_VERSION)

fhir-server: $(FHIR_VENV)/bin/sekmet

test: install fhir-server
	CRS_CDS_SEKMET=$(FHIR_VENV)/bin/sekmet $(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) $(FHIR_VENV) build dist *.egg-info .pytest_cache .hypothesis
