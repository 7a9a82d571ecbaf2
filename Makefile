# `make demo` and `make test` each set up .venv on first use, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-composer test-matrix test-matrix-min test-matrix-new bench lint docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test,notebooks,timm,lightning,lint]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m fxghost build
	$(PY) -m fxghost demo

# One worker per core, each test file in one worker: files share expensive set-up (spawned
# process groups, compiled models) through module-scoped fixtures.
test: $(STAMP)
	$(PY) -m pytest -n auto --dist loadfile

# The torch range that pyproject.toml declares, tested at both ends, each in a venv of its own
# inside .venv/ (so that git ignores it): the declared minimum (torch>=2.7, torchvision>=0.22) and
# the newest torch release with the torchvision released with it. The minimum's venv also holds
# Composer, whose last release requires torch<2.7.1 (so 2.7.0, not 2.7.1): its tests run there too,
# which keeps CI at three CUDA builds of torch on disk rather than four. To bump, set MATRIX_NEW to
# the newest torch and its torchvision (torchvision's metadata pins the torch it needs); when
# pyproject.toml's floor moves, set MATRIX_MIN to match. The stamps depend on this Makefile, so a
# bump reinstalls.
MATRIX_MIN := torch==2.7.0 torchvision==0.22.0
MATRIX_NEW := torch==2.15.0 torchvision==0.29.2
MIN_VENV := .venv/torch-min
NEW_VENV := .venv/torch-new
# The core promises (equivalence to the chunked reference, compiling with changing batch sizes,
# process groups, double backward, the in-place API), under ten minutes per torch version on two
# cores; make test runs every test on the main venv's torch.
MATRIX_TESTS := tests/test_reference.py tests/test_equivalence.py tests/test_promises.py \
	tests/test_compile_and_models.py tests/test_process_group.py tests/test_double_backward.py \
	tests/test_inplace.py tests/test_user_model.py

$(MIN_VENV)/.installed: pyproject.toml Makefile
	test -x $(MIN_VENV)/bin/python || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install --upgrade pip
	$(MIN_VENV)/bin/python -m pip install $(MATRIX_MIN) -e '.[composer]' 'pytest>=7' 'pytest-xdist>=3'
	echo '$(MATRIX_MIN)' > $@

# This machine's pip configuration caps torch, through a constraint file, at the release cached on
# its disk; the newest release lies above the cap, so this install alone drops the constraint (its
# other settings, the find-links and extra indexes, still apply).
$(NEW_VENV)/.installed: pyproject.toml Makefile
	test -x $(NEW_VENV)/bin/python || $(PYTHON) -m venv $(NEW_VENV)
	$(NEW_VENV)/bin/python -m pip install --upgrade pip
	PIP_CONSTRAINT=/dev/null $(NEW_VENV)/bin/python -m pip install $(MATRIX_NEW) -e . 'pytest>=7' \
		'pytest-xdist>=3'
	echo '$(MATRIX_NEW)' > $@

test-composer: $(MIN_VENV)/.installed
	$(MIN_VENV)/bin/python -m pytest tests/composer

# Each end on its own target too, so that CI can drop a venv once its tests have run.
test-matrix-min: $(MIN_VENV)/.installed
	$(MIN_VENV)/bin/python -m pytest -n auto --dist loadfile $(MATRIX_TESTS)

test-matrix-new: $(NEW_VENV)/.installed
	$(NEW_VENV)/bin/python -m pytest -n auto --dist loadfile $(MATRIX_TESTS)

test-matrix: test-matrix-min test-matrix-new

bench: $(STAMP)
	$(PY) benchmarks/run.py

# ruff's rules and formatter, and mypy on the package (configured in pyproject.toml).
LINTED := fxghost tests benchmarks examples
lint: $(STAMP)
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)
	$(PY) -m mypy fxghost

# The documentation site (mkdocs.yml, docs/) into site/. Its tools go into the main venv under a
# stamp of their own, so that make test does not install them; --strict turns every warning (a
# broken link or anchor, a name mkdocstrings cannot resolve) into a failure. Material's notice of
# its end of life is silenced: it is news for whoever picks the tools, not for each build.
DOCS_STAMP := $(VENV)/.docs-installed

$(DOCS_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
