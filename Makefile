# `make test` and `make demo` are the two commands of the README's quick start.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: test test-all lint demo bench install

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned by the constraints file: an unpinned torch pulls a CUDA build of several GB
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

# ruff: pyflakes, pycodestyle, import order, 150 columns (pyproject.toml)
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# two workers, one thread each (tests/conftest.py): on 2 cores 4.5 minutes against 6 one at a time
test: $(VENV)/.installed
	$(PY) -m pytest -n 2

test-all: $(VENV)/.installed
	$(PY) -m pytest -n 2 -m "slow or not slow"

# `make demo`: erase "seven" from the embedded model (reused on later runs), compare before and
# after (accuracy table and image grid in demo/report), then say how to open the app.
DEMO_MODEL := demo/seven-erased
DEMO_REPORT := demo/report

demo: $(DEMO_MODEL)/erase_config.json $(DEMO_REPORT)/report.md
	@cat $(DEMO_REPORT)/report.md
	@echo
	@echo "Before/after image grid: $(DEMO_REPORT)/grid.png"
	@echo "Open the demo app:  $(PY) app.py   then browse to the address it prints (http://127.0.0.1:7860 when free)"

$(DEMO_MODEL)/erase_config.json: $(VENV)/.installed
	$(VENV)/bin/accelerate launch -q --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		erase/train.py --model digits --concept seven --output-dir $(DEMO_MODEL) --overwrite

$(DEMO_REPORT)/report.md: $(DEMO_MODEL)/erase_config.json
	$(PY) -m eval compare digits $(DEMO_MODEL) --out $(DEMO_REPORT)

# `make bench`: every CPU benchmark behind the README's tables (about 3 hours on 2 cores; the
# speed and mask benchmarks need ~15 GiB of RAM). GPU figures: bench/speed.py --device cuda.
bench: $(VENV)/.installed
	$(PY) bench/classifier.py --seeds 3 --out bench/results/classifier.json
	$(PY) bench/worst_case.py --seeds 5 --out bench/results/worst_case.json
	$(PY) bench/erase_digits.py --seeds 3 --out bench/results/erase_digits.json
	$(PY) bench/attack_digits.py --seeds 3 --out bench/results/attack_digits.json
	$(PY) bench/digits_quality.py --n-per-prompt 50 --out bench/results/digits_quality.json
	$(PY) bench/nudenet_throughput.py --out bench/results/nudenet_throughput.json
	$(PY) bench/mask_memory.py --out bench/results/mask_memory.json
	$(PY) bench/speed.py --device cpu --latent-size 16 --batch-size 1 --out bench/results/speed_cpu.json
