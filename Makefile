# tachy: the two commands of the quick start are `make run` and `make test`.
#
# Every environment is installed from a committed lock (requirements/*.txt, made by `make lock`): exact
# versions, no dependency resolution at install time, so a fresh machine installs what passed last time.
PYTHON ?= python3
VENV   ?= .venv
LEGACY ?= .venv-legacy
TOOLS  ?= .venv-tools
PY     := $(VENV)/bin/python
# The CPU build of PyTorch (it lies on this machine's disk); any other pin pulls a multi-GB CUDA build.
# Left out of the locks because the right build depends on the machine.
TORCH  ?= torch==2.13.0
UV     ?= uv==0.13.9
# Workers for the test suite (pytest-xdist); the suite's models run one torch thread each.
JOBS   ?= 2

LOCKS  := requirements/runtime.txt requirements/dev.txt requirements/legacy-parity.txt

.PHONY: setup dev run test test-fast test-legacy-parity check-lock lock clean

# install-lock VENV LOCK: a fresh venv holding exactly LOCK, torch and tachy (editable), checked against LOCK
define install-lock
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --no-deps "$(TORCH)" -r $(2)
	$(1)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	$(1)/bin/python requirements/check_lock.py $(2) --also "$(TORCH)"
endef

$(VENV)/.setup-done: pyproject.toml requirements/runtime.txt requirements/dev.txt
	$(call install-lock,$(VENV),requirements/runtime.txt)
	touch $@

$(VENV)/.dev-done: $(VENV)/.setup-done
	$(PY) -m pip install -q --no-deps -r requirements/dev.txt
	$(PY) requirements/check_lock.py requirements/dev.txt --also "$(TORCH)"
	touch $@

# transformers >= 4.56 no longer ships contrastive search and group (diverse) beam search, so their parity
# tests (tests/decoding/test_parity_legacy.py) run in a second venv, with transformers 4.55 from its own lock.
$(LEGACY)/.done: pyproject.toml requirements/legacy-parity.txt
	$(call install-lock,$(LEGACY),requirements/legacy-parity.txt)
	touch $@

setup: $(VENV)/.setup-done

dev: $(VENV)/.dev-done

run: setup
	$(VENV)/bin/tachy generate --chat "Write a Python function that checks whether a number is prime, then explain it." --max-new-tokens 128

check-lock: dev
	$(PY) requirements/check_lock.py requirements/dev.txt --also "$(TORCH)"

test: check-lock $(LEGACY)/.done
	$(PY) -m pytest -q --durations=15 -n $(JOBS)
	$(MAKE) --no-print-directory test-legacy-parity

# The legacy venv reads the embedded model's converted cache; the main venv converts it (GGUF tokenizers need
# transformers >= 5).
test-legacy-parity: $(LEGACY)/.done setup
	$(LEGACY)/bin/python requirements/check_lock.py requirements/legacy-parity.txt --also "$(TORCH)"
	$(VENV)/bin/tachy convert smollm2-135m
	TACHY_REQUIRE_LEGACY_PARITY=1 $(LEGACY)/bin/python -m pytest -q -p no:cacheprovider \
	    tests/decoding/test_parity_legacy.py

test-fast: check-lock
	$(PY) -m pytest -q -m "not slow" -n $(JOBS)

# Regenerate the locks after changing dependencies in pyproject.toml or requirements/*.in, or to move to newer
# releases on purpose; run `make test` on the new locks before committing them.
lock:
	test -x $(TOOLS)/bin/uv || ($(PYTHON) -m venv $(TOOLS) && $(TOOLS)/bin/python -m pip install -q "$(UV)")
	UV=$(TOOLS)/bin/uv TORCH="$(TORCH)" requirements/lock.sh

clean:
	rm -rf $(VENV) $(LEGACY) $(TOOLS) build *.egg-info src/*.egg-info
