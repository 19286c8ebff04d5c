# Two entry points (see README): `make dashboard` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[dev,zoo]"
	touch $(STAMP)

.PHONY: install dashboard test
install: $(STAMP)

dashboard: $(STAMP)
	$(VENV)/bin/streamlit run dashboard

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
