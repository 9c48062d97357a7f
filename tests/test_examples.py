"""The examples run end to end in their --quick mode and meet their own checks.

Each runs in a subprocess, the way a user runs it, from the repository root;
the test checks the exit status (every quick run asserts its metric and exits
non-zero when it misses), the figure, and the metric line the script prints.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import mpiexec

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_quick(name, tmp_path, ranks=None):
    png = tmp_path / "x.png"
    command = [sys.executable, str(ROOT / "examples" / f"{name}.py"), "--quick", "--out", str(png)]
    env = None
    if ranks is not None:
        command, env = mpiexec(ranks, command)
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert png.is_file(), output[-2000:]
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    return proc.stdout


def result(stdout, pattern):
    match = re.search(r"^RESULT " + pattern, stdout, re.MULTILINE)
    assert match, stdout[-2000:]
    return [float(g) for g in match.groups()]


@pytest.mark.slow
def test_classify_digits_quick(tmp_path):
    out = run_quick("classify_digits", tmp_path)
    acc, = result(out, r"pnode_rk4_test_accuracy=(\S+)")
    assert acc > 0.8
    assert "| pnode rk4 |" in out and "| torchdiffeq rk4 adjoint |" in out and "| resnet |" in out


@pytest.mark.slow
def test_cnf_quick(tmp_path):
    out = run_quick("cnf", tmp_path)
    nll, baseline = result(out, r"test_nll=(\S+) gaussian_nll=(\S+)")
    assert nll < baseline


@pytest.mark.slow
def test_latent_timeseries_quick(tmp_path):
    out = run_quick("latent_timeseries", tmp_path)
    initial, final = result(out, r"pnode_initial_mse=(\S+) pnode_final_mse=(\S+)")
    assert final < 0.5 * initial


def test_three_body_quick(tmp_path):
    out = run_quick("three_body", tmp_path)
    err, = result(out, r"max_rel_mass_error=(\S+)")
    assert err < 0.01


@pytest.mark.slow
@pytest.mark.mpi
def test_neural_pde_quick_on_two_ranks(tmp_path):
    out = run_quick("neural_pde", tmp_path, ranks=2)
    initial, final, ranks = result(out, r"initial_mse=(\S+) final_mse=(\S+) reaction_rel_err=\S+ ranks=(\d+)")
    assert ranks == 2 and final < 0.1 * initial
