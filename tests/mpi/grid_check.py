"""Run under `mpiexec -n 2`: a distributed state (pnode.Grid) on 2 ranks equals 1 rank.

Every rank also solves the whole field on a grid of its own (PETSc.COMM_SELF), so the
comparison needs no file exchange: the loss (summed over ranks), dL/dy0 (gathered)
and every parameter gradient must agree to 1e-10 for explicit and implicit methods.
Exits non-zero on any mismatch.
"""

import os
import sys

import torch

import pnode
from pnode._petsc import PETSc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grid_problems import Reaction, initial_field, loss  # noqa: E402
from helpers import rel_err  # noqa: E402

torch.set_num_threads(1)
rank, size = PETSc.COMM_WORLD.getRank(), PETSc.COMM_WORLD.getSize()
assert size == 2, "run with mpiexec -n 2"
t = torch.tensor([0.0, 0.2, 0.5], dtype=torch.float64)

CASES = [
    # (grid, method, options)
    (dict(shape=(8, 6), dof=2), "rk4", {"step_size": 0.05}),
    (dict(shape=(8, 6), dof=2), "dopri5", {"step_size": 0.05}),
    (dict(shape=(12,), dof=1, stencil_width=2, boundary="ghosted"), "rk4", {"step_size": 0.05, "checkpoints": 3}),
    (dict(shape=(8, 6), dof=2), "beuler", {"step_size": 0.1}),                            # coloured + bjacobi
    (dict(shape=(8, 6), dof=2, boundary="ghosted"), "cn", {"step_size": 0.1, "jacobian": "matrix-free"}),
    (dict(shape=(4, 4, 6), dof=1, stencil="star"), "arkimex", {"step_size": 0.1}),
    (dict(shape=(8, 6), dof=2), "dopri5", {}),                                            # adaptive
]


def solve(grid, method, options):
    func = Reaction(dim=len(grid.shape), dof=grid.dof, width=grid.stencil_width, seed=3,
                    star=grid.stencil == "star")
    y0 = grid.local(initial_field(grid)).clone().requires_grad_()
    ys, stats = pnode.odeint(func, y0, t, method=method, rtol=1e-10, atol=1e-10, options=options, grid=grid,
                             return_stats=True)
    total = grid.sum(loss(ys))
    grads = torch.autograd.grad(total, [y0] + list(func.parameters()))
    return float(total.detach()), grid.gather(grads[0]), grads[1:], stats


for kw, method, options in CASES:
    shared = solve(pnode.Grid(**kw), method, options)
    alone = solve(pnode.Grid(**kw, comm=PETSc.COMM_SELF), method, options)
    errors = [abs(shared[0] - alone[0]) / abs(alone[0]), rel_err(shared[1], alone[1])]
    errors += [rel_err(a, b) for a, b in zip(shared[2], alone[2])]
    assert shared[3].steps == alone[3].steps, (method, shared[3].steps, alone[3].steps)
    if not options:
        assert shared[3].steps > 4, f"the adaptive case took only {shared[3].steps} steps"
    assert max(errors) <= 1e-10, f"rank {rank}: {method} {kw} {options}: errors {errors}"
    print(f"rank {rank}: {method:7s} {str(options):40s} steps {shared[3].steps:3d} "
          f"max rel err {max(errors):.1e}", flush=True)


def used_outside(grid):
    """A decoder parameter used only on this rank's block (summed by grid.allreduce_gradients),
    and func's own diffusion weight used there too (through grid.replicated): each rank held
    only its share of those terms, so the replicas drifted apart after an optimizer step."""
    func = Reaction(seed=3)
    decoder = torch.nn.Conv2d(2, 2, 1, dtype=torch.float64)
    scale = torch.nn.Parameter(torch.tensor(0.9, dtype=torch.float64))
    y0 = grid.local(initial_field(grid))
    # replicated inside func is the identity: the backward sums func's parameters already
    ys = pnode.odeint(lambda t, u: grid.replicated(scale) * func(t, u), y0, t, method="rk4",
                      options={"step_size": 0.05}, grid=grid, adjoint_params=[scale, *func.parameters()])
    decoded = decoder(ys) * grid.replicated(func.diffusion.weight).sum()
    grid.sum(loss(decoded)).backward()
    grid.allreduce_gradients(decoder)
    return [p.grad for p in [scale, *func.parameters(), *decoder.parameters()]]


shared, alone = used_outside(pnode.Grid((8, 6), dof=2)), used_outside(pnode.Grid((8, 6), dof=2, comm=PETSc.COMM_SELF))
errors = [rel_err(a, b) for a, b in zip(shared, alone)]
assert max(errors) <= 1e-10, f"rank {rank}: parameters used outside func: errors {errors}"
print(f"rank {rank}: used outside func max rel err {max(errors):.1e}", flush=True)
print(f"rank {rank}: grid OK", flush=True)
