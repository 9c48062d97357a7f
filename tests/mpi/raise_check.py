"""Run under `mpiexec -n 2`: rank 1's right-hand side raises mid-training; rank 0 is
then waiting in the gradient allreduce. The job must end with rank 1's error, not hang."""

import torch

import pnode
from pnode import distributed as dist

torch.set_num_threads(1)
rank = dist.rank()


class F(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        if rank == 1 and self.calls > 30:
            raise FloatingPointError("rank 1 diverged on purpose")
        return -self.w * y


func = F()
for step in range(100):
    func.zero_grad()
    y0 = torch.ones(3, 2, dtype=torch.float64)
    ys = pnode.odeint(func, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="rk4",
                      options={"step_size": 0.1})
    ys.sum().backward()
    dist.allreduce_gradients(func)
print("unreachable: the job should have been aborted", flush=True)
