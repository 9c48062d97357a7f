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
    assert out.stdout.count("0 points wide along x (tensor dimension 0), less than one point") == 3, out.stdout
    assert out.stdout.count("past the barrier") == 3, out.stdout + out.stderr
    assert out.stdout.count("built a plane") == 3, out.stdout + out.stderr


def test_failures_on_one_rank_of_a_grid_are_caught_on_every_rank():
    """func raising on one rank only (a training loop catching PnodeError), arguments that
    differ between ranks, and NaN at t0: rank 0 hung in a ghost exchange or in PETSc.
    Parameter values that differ were not seen at all."""
    out = _mpiexec("grid_recover_check.py", timeout=180)   # a hang would end in TimeoutExpired
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert text.count("caught") == 24 and "no exception" not in text, text + out.stderr
    assert text.count("next call same gradient") == 24, text + out.stderr
    assert text.count("ValueError caught: y0 contains NaN or Inf") == 1, text
    assert text.count("ValueError caught: on rank 1: y0 contains NaN or Inf") == 1, text
    assert text.count("ValueError caught: on rank 1: PETSc rejected petsc_options") == 1, text
    assert text.count("RHSError caught: func raised FloatingPointError: rank 1 failed on purpose") == 2, text
    assert text.count("RHSError caught: on rank 1 of 2: func raised FloatingPointError") == 2, text
    assert text.count("rank 1's backward failed on purpose") == 2, text
    assert text.count("NonFiniteError caught") == 4 and text.count("arguments differ between ranks") == 8, text
    assert text.count("parameter values (checksums): [") == 4, text   # trained, then frozen
    assert text.count("frozen parameter values (checksums): [") == 2, text
    assert text.count("got (1, 3)") == 2, text
    assert text.count("NaN or Inf in the state (1 of 16 entries on 1 of 2 ranks, the first on rank 1 at grid "
                      "point (11,), component 0)") == 2, text


class _TwoRanks:
    """The rank-1 view of a 2-rank communicator, for shard's arithmetic."""

    def Get_size(self):
        return 2

    def Get_rank(self):
        return 1


def test_shard_refuses_fewer_samples_than_ranks():
    """A last batch of 1 on 2 ranks gave rank 1 an empty y0: odeint raised there alone."""
    import torch

    from pnode import distributed as dist
    with pytest.raises(ValueError, match="1 samples along dim 0 cannot be shared by 2 ranks"):
        dist.shard(torch.zeros(1, 3), communicator=_TwoRanks())
    assert dist.shard(torch.arange(3.0), communicator=_TwoRanks()).tolist() == [2.0]
