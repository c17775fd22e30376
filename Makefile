# `make test` and `make demo` are the two commands of the README's quick start.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: test test-all demo bench install

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned by the constraints file: an unpinned torch pulls a CUDA build of several GB
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest

test-all: $(VENV)/.installed
	$(PY) -m pytest -m "slow or not slow"

demo: $(VENV)/.installed
	$(PY) -m erase.classifier --dataset digits --forget random:0.1 --method salun --out demo/classifier_salun.json

bench: $(VENV)/.installed
	$(PY) bench/classifier.py --seeds 3 --out bench/results/classifier.json
	$(PY) bench/mask_memory.py --out bench/results/mask_memory.json
