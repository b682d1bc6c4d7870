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

LOCKS  := requirements/runtime.txt requirements/dev.txt requirements/ray.txt requirements/legacy-parity.txt
# make test installs the ray extra from requirements/ray.txt (dev.txt plus Ray, the same versions) for the Ray
# Serve tests; RAY=0 tests on dev.txt alone (those tests then skip, saying why). make run never needs Ray.
RAY    ?= 1
TEST_LOCK := $(if $(filter 1,$(RAY)),requirements/ray.txt,requirements/dev.txt)
TEST_ENV  := $(if $(filter 1,$(RAY)),$(VENV)/.ray-done,$(VENV)/.dev-done)

.PHONY: setup dev run test test-fast test-legacy-parity check-lock lock bench-env clean

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

$(VENV)/.ray-done: $(VENV)/.dev-done requirements/ray.txt
	$(PY) -m pip install -q --no-deps -r requirements/ray.txt
	$(PY) requirements/check_lock.py requirements/ray.txt --also "$(TORCH)"
	touch $@

# transformers >= 4.56 no longer ships contrastive search and group (diverse) beam search, so their parity
# tests (tests/decoding/test_parity_legacy.py) run in a second venv, with transformers 4.55 from its own lock.
$(LEGACY)/.done: pyproject.toml requirements/legacy-parity.txt
	$(call install-lock,$(LEGACY),requirements/legacy-parity.txt)
	touch $@

# The benchmark venv: dev + llama.cpp's bindings built for this CPU (benchmarks/vs_llamacpp.py). AMX stays off:
# CPUs that report AMX without allowing it (some VMs) die with "Illegal instruction" otherwise. A CPU without
# AVX-512 gets llama.cpp's AVX2 build (the AVX-512 one would die the same way there).
BENCH ?= .venv-bench
ifneq ($(shell grep -c avx512f /proc/cpuinfo 2>/dev/null),0)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
                    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
else
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
endif
$(BENCH)/.done: pyproject.toml requirements/bench.txt
	rm -rf $(BENCH)
	$(PYTHON) -m venv $(BENCH)
	grep -v '^llama-cpp-python' requirements/bench.txt > $(BENCH).reqs
	$(BENCH)/bin/python -m pip install -q --no-deps "$(TORCH)" -r $(BENCH).reqs
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BENCH)/bin/python -m pip install -q --no-deps \
	    $$(grep '^llama-cpp-python' requirements/bench.txt)
	$(BENCH)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BENCH)/bin/python requirements/check_lock.py requirements/bench.txt --also "$(TORCH)"
	rm -f $(BENCH).reqs
	touch $@

bench-env: $(BENCH)/.done

setup: $(VENV)/.setup-done

dev: $(VENV)/.dev-done

run: setup
	$(VENV)/bin/tachy generate --chat "Write a Python function that checks whether a number is prime, then explain it." --max-new-tokens 128

check-lock: $(TEST_ENV)
	$(PY) requirements/check_lock.py $(TEST_LOCK) --also "$(TORCH)"

# --dist loadgroup: the tests of one xdist_group (the Ray cluster's) share a worker and so one cluster
test: check-lock $(LEGACY)/.done
	$(PY) -m pytest -q --durations=15 -n $(JOBS) --dist loadgroup
	$(MAKE) --no-print-directory test-legacy-parity

# The legacy venv reads the embedded model's converted cache; the main venv converts it (GGUF tokenizers need
# transformers >= 5).
test-legacy-parity: $(LEGACY)/.done setup
	$(LEGACY)/bin/python requirements/check_lock.py requirements/legacy-parity.txt --also "$(TORCH)"
	$(VENV)/bin/tachy convert smollm2-135m
	TACHY_REQUIRE_LEGACY_PARITY=1 $(LEGACY)/bin/python -m pytest -q -p no:cacheprovider \
	    tests/decoding/test_parity_legacy.py

test-fast: check-lock
	$(PY) -m pytest -q -m "not slow" -n $(JOBS) --dist loadgroup

# Regenerate the locks after changing dependencies in pyproject.toml or requirements/*.in, or to move to newer
# releases on purpose; run `make test` on the new locks before committing them.
lock:
	test -x $(TOOLS)/bin/uv || ($(PYTHON) -m venv $(TOOLS) && $(TOOLS)/bin/python -m pip install -q "$(UV)")
	UV=$(TOOLS)/bin/uv TORCH="$(TORCH)" requirements/lock.sh

clean:
	rm -rf $(VENV) $(LEGACY) $(TOOLS) $(BENCH) build *.egg-info src/*.egg-info
