# `make demo` and `make test` each set up .venv on first use, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-composer bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test,notebooks,timm,lightning,lint]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m fxghost build
	$(PY) -m fxghost demo

test: $(STAMP)
	$(PY) -m pytest

# Composer pins an older torch (its last release: torch<2.7.1), so its tests get their own venv
# with the newest torch and torchvision it accepts; inside .venv/ so that git ignores it.
COMPOSER_VENV := .venv/composer
COMPOSER_PY := $(COMPOSER_VENV)/bin/python
COMPOSER_STAMP := $(COMPOSER_VENV)/.installed

$(COMPOSER_STAMP): pyproject.toml
	test -x $(COMPOSER_PY) || $(PYTHON) -m venv $(COMPOSER_VENV)
	$(COMPOSER_PY) -m pip install --upgrade pip
	$(COMPOSER_PY) -m pip install 'torch==2.7.0' 'torchvision==0.22.0' -e '.[composer]' 'pytest>=7'
	touch $(COMPOSER_STAMP)

test-composer: $(COMPOSER_STAMP)
	$(COMPOSER_PY) -m pytest tests/composer

bench: $(STAMP)
	$(PY) benchmarks/run.py

# ruff's rules and formatter, and mypy on the package (configured in pyproject.toml).
LINTED := fxghost tests benchmarks examples
lint: $(STAMP)
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)
	$(PY) -m mypy fxghost

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
