# make setup : create the venv of a stack and install it (STACK=current, the default: Python 3.12,
#              torch 2.14.1, numpy 2, detectron2 built from its pinned commit; STACK=oldest:
#              Python 3.10, torch 2.3.1, numpy<2, the sal-detectron2 wheel). The pins:
#              requirements/$(STACK).txt; tests and lint: requirements/dev.txt.
# make test  : run the test suite (sets up first); make test-fast: without the slow tests
# make lint  : black, isort and flake8 at line length 100 (settings: pyproject.toml, setup.cfg)
# make demo  : the embedded benchmark, tools/compare.py on synthetic data (SEEDS=N paired seeds,
#              default 3; VARIANTS=all: every term alone and with DKD, or e.g. "plain dkd dkd+pkd";
#              REGIME=pretrained: the paper-like students; MASK=1: Mask R-CNN plain vs DKD;
#              QUICK=1: toy size)
STACK ?= current
ifeq ($(STACK),current)
PYVER := 3.12
VENV  ?= .venv
else ifeq ($(STACK),oldest)
PYVER := 3.10
VENV  ?= .venv-oldest
else
$(error STACK=$(STACK): use STACK=current (the default) or STACK=oldest)
endif
PY     := $(VENV)/bin/python
# The first working python$(PYVER): on PATH, or a pyenv install whose shim is not active.
PYTHON ?= $(shell for p in python$(PYVER) $(HOME)/.pyenv/versions/$(PYVER)*/bin/python$(PYVER) /usr/bin/python$(PYVER); do \
	$$p -c 'import sys; assert sys.version_info[:2] == tuple(map(int, "$(PYVER)".split(".")))' >/dev/null 2>&1 && { echo $$p; break; }; done)
PYTEST_ARGS ?=
LINTED := dkd_det tools tests setup.py

.PHONY: setup test test-fast lint demo
setup: $(VENV)/.installed

$(VENV)/.installed: requirements/$(STACK).txt requirements/dev.txt setup.py tools/install_detectron2.sh
	@if [ ! -x $(PY) ]; then \
	  if [ -z "$(PYTHON)" ]; then echo "error: Python $(PYVER) not found (STACK=$(STACK) needs it); install it, e.g. 'pyenv install $(PYVER)', or pass PYTHON=/path/to/python$(PYVER)" >&2; exit 1; fi; \
	  $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/$(STACK).txt -r requirements/dev.txt
	$(if $(filter current,$(STACK)),PYTHON=$(PY) tools/install_detectron2.sh)
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
