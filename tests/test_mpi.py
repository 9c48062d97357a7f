"""MPI runs launched from the normal test command with `mpiexec -n 2` (CI runs them)."""

import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
MPIEXEC = shutil.which("mpiexec")
pytestmark = pytest.mark.mpi


def _mpiexec(script, timeout=240):
    assert MPIEXEC, "mpiexec not found: scripts/setup.sh installs Open MPI (openmpi-bin)"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", OMP_NUM_THREADS="1")
    return subprocess.run([MPIEXEC, "-n", "2", sys.executable, os.path.join(HERE, "mpi", script)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_data_parallel_equals_single_process():
    out = _mpiexec("data_parallel_check.py")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("data-parallel OK") == 2, out.stdout + out.stderr


def test_exception_on_one_rank_stops_every_rank():
    out = _mpiexec("raise_check.py", timeout=120)  # a hang would end in TimeoutExpired
    assert out.returncode != 0
    assert "rank 1 diverged on purpose" in out.stderr
    assert "unreachable" not in out.stdout


def test_distributed_state_on_two_ranks_equals_one_rank():
    out = _mpiexec("grid_check.py")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("grid OK") == 2, out.stdout + out.stderr


def test_exception_on_one_rank_stops_a_distributed_state_solve():
    out = _mpiexec("grid_raise_check.py", timeout=120)  # a hang would end in TimeoutExpired
    assert out.returncode != 0
    assert "rank 1 diverged on purpose" in out.stderr
    assert "unreachable" not in out.stdout
