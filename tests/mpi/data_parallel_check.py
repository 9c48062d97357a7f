"""Run under `mpiexec -n 2`: sharded training steps equal the single-process step.

Every rank also computes the whole-batch gradient on its own (a COMM_SELF solve),
so the comparison needs no file exchange. Exits non-zero on any mismatch.
"""

import os
import sys

import torch

import pnode
from pnode import distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import MLP, rel_err  # noqa: E402

torch.set_num_threads(1)
rank, size = dist.rank(), dist.size()
assert size == 2, "run with mpiexec -n 2"

func = MLP(seed=0)
y0 = torch.randn(7, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
t = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)
options = {"step_size": 0.05}


def loss_of(ys):
    return (ys ** 2).sum() + ys[1].sum()


def grads(module, batch):
    module.zero_grad()
    y = batch.clone().requires_grad_()
    loss = loss_of(pnode.odeint(module, y, t, method="dopri5", options=options))
    loss.backward()
    return loss.detach(), y.grad, [p.grad.clone() for p in module.parameters()]


# single process, whole batch
loss_full, gy_full, gp_full = grads(func, y0)

# data parallel: shard, solve, one allreduce of all parameter gradients
loss_local, gy_local, _ = grads(func, dist.shard(y0))
dist.allreduce_gradients(func)
loss_dp = dist.allreduce_sum(loss_local)
gp_dp = [p.grad for p in func.parameters()]
errors = [rel_err(loss_dp, loss_full), rel_err(gy_local, dist.shard(gy_full))]
errors += [rel_err(a, b) for a, b in zip(gp_dp, gp_full)]
assert max(errors) <= 1e-12, f"rank {rank}: data-parallel errors {errors}"

# A model initialised with each rank's own seed: refused on every rank, not averaged silently
with torch.no_grad():
    first = next(func.parameters())
    first[0] += 1e-12 * rank
grads(func, dist.shard(y0))
try:
    dist.allreduce_gradients(func)
    raise AssertionError(f"rank {rank}: differing parameters were not refused")
except ValueError as exc:
    assert "parameter values differ between ranks" in str(exc), str(exc)
with torch.no_grad():
    first[0] -= 1e-12 * rank
dist.broadcast_(func)
grads(func, dist.shard(y0))
dist.allreduce_gradients(func)   # the same values again: accepted

# the same step through torch.distributed DistributedDataParallel (gloo over loopback)
import torch.distributed as tdist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

port = dist.comm().bcast(29500 + os.getpid() % 1000 if rank == 0 else None, root=0)
tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
node = pnode.NeuralODE(func, method="dopri5", options=options)
ddp = DDP(node)
func.zero_grad()
y = dist.shard(y0).clone().requires_grad_()
loss_of(ddp(y, t)).backward()
# DDP averages gradients over ranks; the summed loss's gradient is size times that
errors = [rel_err(size * p.grad, g) for p, g in zip(func.parameters(), gp_full)]
assert max(errors) <= 1e-12, f"rank {rank}: DDP errors {errors}"
tdist.destroy_process_group()
print(f"rank {rank}: data-parallel OK (max rel err {max(errors):.1e})", flush=True)

# Interpreter teardown with torch.distributed's threads still parked can abort the process
# ("terminate called without an active exception"); end MPI cleanly and skip that teardown.
from mpi4py import MPI  # noqa: E402

dist.comm().Barrier()
MPI.Finalize()
os._exit(0)
