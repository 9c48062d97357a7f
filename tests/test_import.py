"""What `import pnode` does to the user's process (README: "What `import pnode` does to the process").

Each check runs in a fresh interpreter: PETSc is initialised once per process.
"""

import os
import subprocess
import sys

import pytest

PETSC_BLAS_THREADS = """
import ctypes, os
import pnode
# PETSc links the system OpenBLAS; numpy's wheel bundles its own (another file name)
libs = {line.split()[-1] for line in open("/proc/self/maps") if "libopenblas" in line}
for path in sorted(libs):
    print(os.path.basename(path), ctypes.CDLL(path).openblas_get_num_threads())
print("env", os.environ.get("OPENBLAS_NUM_THREADS"))
"""


def _python(code, env=None, **kwargs):
    full = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    full.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=full, **kwargs)


def test_petsc_blas_runs_one_thread_and_the_environment_is_left_alone():
    """OPENBLAS_NUM_THREADS=1 stayed set for the whole process: numpy's BLAS lost its threads
    when pnode came first, and every child process inherited it."""
    out = _python(PETSC_BLAS_THREADS)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "env None"
    petsc_blas = lines[:-1]
    if not petsc_blas:
        pytest.skip("PETSc links no OpenBLAS here")
    assert all(line.endswith(" 1") for line in petsc_blas), out.stdout
    kept = _python(PETSC_BLAS_THREADS, env={"OPENBLAS_NUM_THREADS": "2"})
    assert kept.returncode == 0 and kept.stdout.splitlines()[-1] == "env 2", kept.stdout + kept.stderr


def test_no_petsc_signal_handlers():
    """PETSc's handlers turned SIGURG (ignored by Python) and SIGPIPE into MPI_Abort (exit 59)."""
    out = _python("import os, signal, time, pnode\nos.kill(os.getpid(), signal.SIGURG)\ntime.sleep(0.1)\n"
                  "print('alive')")
    assert out.returncode == 0 and out.stdout.strip() == "alive", out.stdout + out.stderr
    piped = subprocess.run(f"{sys.executable} -c 'import pnode\nfor i in range(10 ** 6): print(i)' | head -1",
                           shell=True, capture_output=True, text=True, timeout=120)
    assert piped.stdout.strip() == "0"
    assert "BrokenPipeError" in piped.stderr and "PETSC ERROR" not in piped.stderr, piped.stderr


def test_users_own_petsc_errors_are_not_printed():
    """A global "traceback" error handler printed an 8-line PETSC ERROR block for a PETSc
    error the user's own petsc4py code caught."""
    out = _python("import pnode\nfrom petsc4py import PETSc\nts = PETSc.TS().create()\n"
                  "try:\n    ts.setType('nonexistent')\nexcept PETSc.Error:\n    print('caught')")
    assert out.returncode == 0 and out.stdout.strip() == "caught", out.stdout + out.stderr
    assert "PETSC ERROR" not in out.stderr, out.stderr
