# `make demo` and `make test` each set up .venv on first use, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test,notebooks,timm,lightning]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m fxghost demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m fxghost bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
