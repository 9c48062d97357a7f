"""MPI runs launched from the normal test command with `mpiexec -n 2` (CI runs them)."""

import os
import subprocess
import sys

import pytest

from helpers import mpiexec

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.mpi


def _mpiexec(script, timeout=240, ranks=2):
    argv, env = mpiexec(ranks, [sys.executable, os.path.join(HERE, "mpi", script)])
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("script, marker", [("data_parallel_check.py", "data-parallel OK"),
                                            ("grid_check.py", "grid OK")], ids=["data-parallel", "grid"])
def test_two_ranks_equal_one(script, marker):
    out = _mpiexec(script)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(marker) == 2, out.stdout + out.stderr


@pytest.mark.parametrize("script", ["raise_check.py", "grid_raise_check.py"], ids=["data-parallel", "grid"])
def test_exception_on_one_rank_stops_every_rank(script):
    out = _mpiexec(script, timeout=120)  # a hang would end in TimeoutExpired
    assert out.returncode != 0
    assert "rank 1 diverged on purpose" in out.stderr
    assert "unreachable" not in out.stdout


def test_unused_parameters_and_dropped_solvers():
    out = _mpiexec("lifecycle_check.py")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("allreduce OK") == 2 and out.stdout.count("solves OK") == 2, out.stdout + out.stderr
    # the last call's solver is dropped after the last cleanup: a few of its objects stay parked
    entries = [int(line.split(":")[-1]) for line in out.stdout.splitlines() if "Total entries" in line]
    assert len(entries) == 2 and max(entries) <= 8, out.stdout


def test_grid_too_small_for_its_ranks_fails_on_every_rank():
    out = _mpiexec("layout_check.py", timeout=120, ranks=3)   # a hang would end in TimeoutExpired
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("less than the stencil width") == 3, out.stdout + out.stderr
    assert out.stdout.count("past the barrier") == 3, out.stdout + out.stderr
    assert out.stdout.count("built a plane") == 3, out.stdout + out.stderr
