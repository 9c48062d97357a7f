"""Run under `mpiexec -n 2`: failures on one rank of a Grid that a training loop catches.

func raising on rank 1 only (in the forward, in its backward, with an explicit and an
implicit method), arguments that differ between the ranks, and a func that is NaN at t0
or at one point of one rank's block must give every rank a pnode exception (arguments one rank alone refuses: the same
ValueError), and the next call must give the same gradient as before. Each of these used to leave rank 0 waiting in a collective call forever.
"""

import torch

import pnode
from pnode._petsc import PETSc

rank = PETSc.COMM_WORLD.getRank()
grid = pnode.Grid((16,), dof=1)
w = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
fault = {"kind": None}


class FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        if rank == 1:
            raise FloatingPointError("rank 1's backward failed on purpose")
        return g


def func(t, u):
    lap = w * (u[:, 2:] - 2 * u[:, 1:-1] + u[:, :-2])
    if fault["kind"] == "raise" and rank == 1:
        raise FloatingPointError("rank 1 failed on purpose")
    if fault["kind"] == "nan":
        return lap * float("nan")
    if fault["kind"] == "nan at 11" and rank == 1 and float(t) >= 0.2:
        lap = lap.clone()
        lap[0, 11 - grid.start[0]] = float("nan")   # one point of rank 1's block
    return FailingBackward.apply(lap) if fault["kind"] == "backward" else lap


y0 = grid.local(torch.linspace(0, 1, 16, dtype=torch.float64).view(1, 16))
t = torch.tensor([0.0, 0.5], dtype=torch.float64)
RK4 = dict(method="rk4", options={"step_size": 0.01})
BEULER = dict(method="beuler", options={"step_size": 0.05})


def gradient(kind=None, **kwargs):
    fault["kind"] = kind
    w.grad = None
    try:
        ys = pnode.odeint(func, y0, t, adjoint_params=[w], grid=grid, **kwargs)
        grid.sum((ys ** 2).sum()).backward()
    finally:
        fault["kind"] = None
    return w.grad.clone()


def differing_parameters():
    """A model initialised with each rank's own seed: one model per rank, trained on."""
    with torch.no_grad():
        w.mul_(1 + rank)
    try:
        return gradient(**RK4)
    finally:
        with torch.no_grad():
            w.div_(1 + rank)


class Frozen(torch.nn.Module):
    """func scaled by a frozen parameter drawn with each rank's own seed (random features)."""

    def __init__(self):
        super().__init__()
        self.c = torch.nn.Parameter(torch.full((1,), 1.0 + rank, dtype=torch.float64), requires_grad=False)

    def forward(self, t, u):
        return self.c * func(t, u)


cases = {
    "forward raise, rk4": lambda: gradient("raise", **RK4),
    "forward raise, beuler": lambda: gradient("raise", **BEULER),
    "backward raise, rk4": lambda: gradient("backward", **RK4),
    "NaN at t0, dopri5": lambda: gradient("nan", method="dopri5"),
    # euler keeps the NaN where func put it: the message must name that point on both ranks
    "NaN at one point of rank 1": lambda: gradient("nan at 11", method="euler", options={"step_size": 0.05}),
    "step_size differs": lambda: gradient(method="rk4", options={"step_size": 0.01 * (1 + rank)}),
    "method differs": lambda: gradient(method=["rk4", "dopri5"][rank]),
    "parameter values differ": differing_parameters,
    "frozen parameter values differ": lambda: pnode.odeint(Frozen(), y0, t, adjoint_params=[w], grid=grid, **RK4),
    "y0 shape on rank 1": lambda: pnode.odeint(func, y0[:, :3] if rank else y0, t, adjoint_params=[w], grid=grid, **RK4),
    # Checks each rank made alone: the others' solve paired with rank 1's next call (wrong losses, then a hang).
    "NaN in rank 1's y0": lambda: pnode.odeint(func, y0 * float("nan") if rank else y0, t, adjoint_params=[w],
                                                grid=grid, **RK4),
    "petsc_options rank 1 misspelt": lambda: pnode.odeint(func, y0, t, adjoint_params=[w], grid=grid,
                                                          petsc_options={"ts_adapt_type": "nonexistent"} if rank
                                                          else None, method="dopri5"),
}
good = {"rk4": gradient(**RK4), "beuler": gradient(**BEULER)}
for name, case in cases.items():
    try:
        case()
        print(f"rank {rank}: {name}: no exception", flush=True)
    except pnode.PnodeError as exc:
        print(f"rank {rank}: {name}: {type(exc).__name__} caught: {exc}", flush=True)
    except ValueError as exc:
        print(f"rank {rank}: {name}: ValueError caught: {exc}", flush=True)
    again = {"rk4": gradient(**RK4), "beuler": gradient(**BEULER)}
    same = all(torch.equal(again[k], good[k]) for k in good)
    print(f"rank {rank}: {name}: next call {'same gradient' if same else 'DIFFERENT gradient'}", flush=True)
