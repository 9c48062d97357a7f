"""Importing and initialising petsc4py, with the version pnode needs.

PETSc before 3.21.4 computes wrong parameter gradients for Runge-Kutta stages
whose weight b_i is zero (dopri5's last stage, the midpoint method), so older
versions are refused at import rather than returning silently wrong gradients.
"""

import os
import sys

MIN_VERSION = (3, 21, 4)
INSTALL_HINT = ("run scripts/setup.sh (it builds PETSc 3.26.1 from PyPI), or "
                "`pip install petsc==3.26.1` then `pip install petsc4py==3.26.1`")


def _parse(version):
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


try:
    import petsc4py
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(f"pnode needs petsc4py >= {'.'.join(map(str, MIN_VERSION))}, "
                      f"which is not installed: {INSTALL_HINT}") from exc

if _parse(petsc4py.__version__) < MIN_VERSION:
    raise ImportError(
        f"pnode needs petsc4py >= {'.'.join(map(str, MIN_VERSION))}, found {petsc4py.__version__}: "
        "PETSc before 3.21.4 computes wrong parameter gradients for Runge-Kutta stages with "
        f"b_i = 0 (dopri5, midpoint). To upgrade, {INSTALL_HINT}")

# numpy before the variable below: its own BLAS keeps its threads for the user's work.
import numpy as np  # noqa: E402

# PETSc's vector kernels call BLAS on vectors far too short for threads; an idle
# OpenBLAS pool spinning on a busy core made one VecAXPY 80x slower in our benchmark.
# OpenBLAS reads the variable when PETSc loads it; only then, and only PETSc's pool:
# a user's own OPENBLAS_NUM_THREADS is kept, and none is left for child processes.
_user_blas_threads = os.environ.get("OPENBLAS_NUM_THREADS")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
try:
    if "petsc4py.PETSc" not in sys.modules:  # a user who called petsc4py.init(args) keeps their args
        # Not the script's command line: its arguments are not PETSc's (PETSC_OPTIONS in the
        # environment and pnode's petsc_options still reach PETSc). No signal handlers:
        # PETSc's turned SIGPIPE (`python train.py | head`) and a forked child's crash into
        # MPI_Abort, and hid Python's faulthandler stack.
        petsc4py.init(["-no_signal_handler"])
    from petsc4py import PETSc  # noqa: E402
finally:
    if _user_blas_threads is None:
        del os.environ["OPENBLAS_NUM_THREADS"]
import torch  # noqa: E402

PETSC_VERSION = PETSc.Sys.getVersion()
if PETSC_VERSION < MIN_VERSION:
    raise ImportError(
        f"pnode needs PETSc >= {'.'.join(map(str, MIN_VERSION))}, petsc4py is linked against "
        f"{'.'.join(map(str, PETSC_VERSION))}: PETSc before 3.21.4 computes wrong parameter "
        f"gradients for Runge-Kutta stages with b_i = 0 (dopri5, midpoint). {INSTALL_HINT}")

_scalar = np.dtype(PETSc.ScalarType)
if _scalar.kind == "c":
    raise ImportError("pnode needs a real-valued PETSc build (PetscScalar is complex here); "
                      f"{INSTALL_HINT}")
if _scalar not in (np.float64, np.float32):
    raise ImportError(f"pnode needs a double- or single-precision PETSc build, PetscScalar is "
                      f"{_scalar} here; {INSTALL_HINT}")

# PETSc's precision (--with-precision=double, the default, or single): Vecs are DLPack
# views of this dtype, and states, adjoints and step times are computed in it.
DTYPE = torch.float64 if _scalar == np.float64 else torch.float32
EPS = torch.finfo(DTYPE).eps


def petsc_message(error):
    """PETSc's own words in a petsc4py error raised under the "python" error handler:
    the last entry of its traceback that is not a "f() at file:line" frame, else None."""
    words = [str(e) for e in getattr(error, "_traceback", ()) if "() at " not in str(e)]
    return words[-1] if words else None

