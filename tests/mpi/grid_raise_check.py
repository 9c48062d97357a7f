"""Run under `mpiexec -n 2`: rank 1's right-hand side raises inside a distributed-state
solve, while rank 0 waits for it in PETSc's ghost exchange. The job must end with rank
1's error, not hang."""

import torch

import pnode
from pnode._petsc import PETSc

rank = PETSc.COMM_WORLD.getRank()
grid = pnode.Grid((16,), dof=1)
w = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
calls = 0


def func(t, u):
    global calls
    calls += 1
    if rank == 1 and calls > 25:
        raise FloatingPointError("rank 1 diverged on purpose")
    return w * (u[:, 2:] - 2 * u[:, 1:-1] + u[:, :-2])


y0 = grid.local(torch.linspace(0, 1, 16, dtype=torch.float64).view(1, 16))
for step in range(100):
    ys = pnode.odeint(func, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="rk4",
                      options={"step_size": 0.01}, adjoint_params=[w], grid=grid)
    grid.sum(ys.sum()).backward()
print("unreachable: the job should have been aborted", flush=True)
