"""Shared test problems and comparison helpers, and how the tests launch MPI jobs."""

import os
import shutil

import torch
from torch import nn


class MLP(nn.Module):
    """A nonlinear, time-dependent right-hand side acting sample by sample on a batch."""

    def __init__(self, dim=3, hidden=8, seed=0, scale=1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = nn.Linear(dim + 1, hidden)
        self.l2 = nn.Linear(hidden, dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 * scale)
        self.double()

    def forward(self, t, y):
        tt = t.expand(*y.shape[:-1], 1)
        return self.l2(torch.tanh(self.l1(torch.cat([y, torch.sin(tt)], -1)))) - 0.1 * y


class Stiff(nn.Module):
    """dy/dt = -k * y + mlp(t, y): stiff linear decay (rates k) plus a nonlinear part,
    with the IMEX split exposed as stiff() and nonstiff()."""

    def __init__(self, seed=1, rates=(20.0, 5.0, 50.0)):
        super().__init__()
        self.mlp = MLP(seed=seed)
        self.k = nn.Parameter(torch.tensor(rates, dtype=torch.float64))

    def forward(self, t, y):
        return self.stiff(t, y) + self.nonstiff(t, y)

    def stiff(self, t, y):
        return -self.k * y

    def nonstiff(self, t, y):
        return self.mlp(t, y)


def loss_fn(ys, seed=1):
    """A loss that depends nonlinearly on every output time."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(ys.shape, generator=g, dtype=torch.float64).to(ys.device, ys.dtype)
    return (w * ys).sum() + 0.5 * (ys ** 2).sum()


def rel_err(a, b):
    a, b = a.detach().double().reshape(-1), b.detach().double().reshape(-1)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


def output_rows(step_times, t):
    """Indices of the output times among the step boundaries (they coincide up to rounding)."""
    st = torch.tensor(step_times, dtype=torch.float64)
    return [int(torch.argmin((st - float(ti)).abs())) for ti in t]


def mpiexec(ranks, command):
    """(argv, environment) to run ``command`` on ``ranks`` MPI ranks from a test.

    Open MPI refuses root without the two ALLOW variables (containers, CI) and more
    ranks than cores without oversubscription; one thread per rank.
    """
    launcher = shutil.which("mpiexec")
    assert launcher, "mpiexec not found: scripts/setup.sh installs Open MPI (openmpi-bin)"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", OMP_NUM_THREADS="1")
    return [launcher, "-n", str(ranks)] + list(command), env
