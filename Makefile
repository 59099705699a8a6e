# make setup : create .venv with Python 3.10 and install the tested stack
# make test  : run the test suite (sets up first); make test-fast: without the slow tests
# make setup-deploy : also the optional deploy extra (onnx, onnxruntime: requirements-deploy.txt)
# make lint  : black, isort and flake8 at line length 100 (settings: pyproject.toml, setup.cfg)
# make demo  : the embedded benchmark, tools/compare.py on synthetic data (SEEDS=N paired seeds,
#              default 3; VARIANTS=all: every term alone and with DKD, or e.g. "plain dkd dkd+pkd";
#              REGIME=pretrained: the paper-like students; MASK=1: Mask R-CNN plain vs DKD;
#              QUICK=1: toy size)
VENV   := .venv
PY     := $(VENV)/bin/python
# The first working python3.10: on PATH, or a pyenv install whose shim is not active.
PYTHON310 ?= $(shell for p in python3.10 $(HOME)/.pyenv/versions/3.10*/bin/python3.10 /usr/bin/python3.10; do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1 && { echo $$p; break; }; done)
PYTEST_ARGS ?=
LINTED := dkd_det tools tests setup.py

.PHONY: setup setup-deploy test test-fast lint demo
setup: $(VENV)/.installed

setup-deploy: setup
	$(PY) -m pip install -r requirements-deploy.txt

$(VENV)/.installed: requirements.txt setup.py
	@if [ ! -x $(PY) ]; then \
	  if [ -z "$(PYTHON310)" ]; then echo "error: Python 3.10 not found (the detectron2 wheel is built for CPython 3.10); install it, e.g. 'pyenv install 3.10', or pass PYTHON310=/path/to/python3.10" >&2; exit 1; fi; \
	  $(PYTHON310) -m venv $(VENV); fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

lint: setup
	$(PY) -m black --check --quiet $(LINTED)
	$(PY) -m isort --check-only --quiet $(LINTED)
	$(PY) -m flake8 $(LINTED)

demo: setup
	$(PY) tools/synthetic_benchmark.py $(if $(QUICK),--quick) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(VARIANTS),--variants $(VARIANTS)) $(if $(REGIME),--regime $(REGIME)) $(if $(MASK),--mask)
