"""Run under `mpiexec -n 2`: what a long data-parallel or distributed training job repeats.

1. allreduce_gradients with a parameter only one rank used (grad None on the other): it
   was dropped from that rank's flat buffer, so b's and c's gradients were swapped into
   each other, or the allreduce aborted when their sizes differed. broadcast_ gives every
   rank rank 0's parameters and buffers (complex ones whole: their imaginary part was lost).
2. Distributed solves with a new closure per call: petsc4py only parks a parallel object
   Python frees, and pnode never destroyed them (+300 MB per 100 calls). PETSc's garbage
   is printed last; the test reads its size.
"""

import gc

import torch

import pnode
from pnode import distributed as dist
from pnode._petsc import PETSc

rank = dist.rank()
a, b = (torch.nn.Parameter(torch.ones(2, dtype=torch.float64)) for _ in range(2))
c = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
frozen = torch.nn.Parameter(torch.ones(1, dtype=torch.float64), requires_grad=False)
loss = a.sum() + ((3.0 * b).sum() if rank == 0 else (5.0 * c).sum())
loss.backward()
dist.allreduce_gradients([a, b, frozen, c])
grads = [None if p.grad is None else p.grad.tolist() for p in (a, b, c)]
assert grads == [[2.0] * 2, [3.0] * 2, [5.0] * 3], f"rank {rank}: {grads}"
assert frozen.grad is None
model = torch.nn.Linear(3, 2).to(torch.float32)   # initialised with each rank's own seed
torch.manual_seed(rank)
torch.nn.init.normal_(model.weight)
model.register_buffer("features", torch.randn(4, dtype=torch.float64))   # random Fourier features, say
model.spectrum = torch.nn.Parameter(torch.randn(2, dtype=torch.complex128))
dist.broadcast_(model)
assert model.weight.requires_grad and model.weight.dtype == torch.float32
torch.manual_seed(0)
want = [torch.nn.init.normal_(torch.empty(2, 3)), torch.randn(4, dtype=torch.float64),
        torch.randn(2, dtype=torch.complex128)]
for got, w in zip([model.weight, model.features, model.spectrum], want):
    assert torch.equal(got.detach(), w.to(got.dtype)), f"rank {rank}: not rank 0's {got} {w}"
print(f"rank {rank}: allreduce OK", flush=True)

grid = pnode.Grid((32,), dof=1)
w = torch.nn.Parameter(torch.tensor(0.1, dtype=torch.float64))
y0 = grid.local(torch.linspace(0, 1, 32, dtype=torch.float64).view(1, 32))
t = torch.tensor([0.0, 0.1], dtype=torch.float64)
for _ in range(10):
    ys = pnode.odeint(lambda t, u: w * (u[:, 2:] - 2 * u[:, 1:-1] + u[:, :-2]), y0, t, method="rk4",
                      options={"step_size": 0.02}, adjoint_params=[w], grid=grid)
    grid.sum(ys[-1].sum()).backward()
    del ys
    gc.collect()
print(f"rank {rank}: solves OK", flush=True)
PETSc.garbage_view(PETSc.COMM_WORLD)
