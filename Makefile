# pnode: `make demo` and `make test` set everything up on first use (scripts/setup.sh,
# ~15 min the first time on a 2-core machine because PETSc is built from source).
#
#   make setup                  create/refresh .venv (fast no-op when up to date)
#   make demo                   run examples/spiral.py
#   make test [PYTEST_ARGS=...] run the test suite, e.g. PYTEST_ARGS='-k adjoint -x'
#             [TESTS=...]       (default: tests), e.g. TESTS=tests/test_dockerfiles.py
#   make test-single            tests/test_single_precision.py in .venv-single, a venv with
#                               PETSc built in single precision (another ~12 min the first time)
#   make bench [BENCH_ARGS=...] run scripts/bench_gradients.py
#   make clean                  remove the venvs (the pip wheel cache keeps the PETSc builds)

ROOT := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
PNODE_VENV ?= $(ROOT)/.venv
PY := $(PNODE_VENV)/bin/python
TESTS ?= tests
PYTEST_ARGS ?=
BENCH_ARGS ?=

SHELL := /bin/bash

# Open MPI refuses to start as root (CI, containers) without these, and would
# refuse `mpiexec -n N` with more ranks than cores.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export OMPI_MCA_rmaps_base_oversubscribe := 1
export PNODE_VENV

.PHONY: setup demo test test-single bench clean

setup:
	bash "$(ROOT)/scripts/setup.sh"

demo: setup
	cd "$(ROOT)" && "$(PY)" examples/spiral.py

test: setup
	cd "$(ROOT)" && "$(PY)" -m pytest -q -ra --durations=15 $(TESTS) $(PYTEST_ARGS)

SINGLE_VENV ?= $(ROOT)/.venv-single

test-single:
	PNODE_VENV="$(SINGLE_VENV)" PNODE_PETSC_PRECISION=single bash "$(ROOT)/scripts/setup.sh"
	cd "$(ROOT)" && "$(SINGLE_VENV)/bin/python" -m pytest -q -ra tests/test_single_precision.py $(PYTEST_ARGS)

bench: setup
	cd "$(ROOT)" && "$(PY)" scripts/bench_gradients.py $(BENCH_ARGS)

clean:
	rm -rf "$(PNODE_VENV)" "$(SINGLE_VENV)" "$(ROOT)/build" "$(ROOT)"/*.egg-info "$(ROOT)/.pytest_cache"
