"""Data-parallel training over MPI ranks (launched with ``mpiexec -n P python ...``).

Each rank integrates its shard of the batch on its own PETSc TS (COMM_SELF, the
default of every pnode solve), so ranks never talk during a solve; after the
backward, :func:`allreduce_gradients` sums the parameter gradients of all ranks
in a single MPI allreduce over one flat buffer (not one per stage or per
parameter). With a loss that is a sum over samples, the result equals the
single-process gradient of the whole batch: bit for bit up to the order of the
floating-point sum across ranks.

Adaptive steps: each shard picks its own steps (its error estimate sees only its
own samples), so adaptive runs on P ranks are a different discretisation than
one rank on the whole batch; fixed steps give the same one.

The transport is mpi4py on PETSc's communicator, nothing home-made; the same
training loop also works with ``torch.distributed`` DistributedDataParallel
(see ``tests/mpi/data_parallel_check.py``). For one large state spread over the ranks
instead of a batch, see :class:`pnode.Grid`.
"""

import sys

import numpy as np
import torch

__all__ = ["comm", "rank", "size", "shard", "allreduce_", "allreduce_gradients", "allreduce_sum", "broadcast_",
           "abort_on_error"]


def comm():
    """The MPI communicator pnode uses for data parallelism (PETSc's COMM_WORLD)."""
    from ._petsc import PETSc
    return PETSc.COMM_WORLD.tompi4py()


def rank():
    return comm().Get_rank()


def size():
    return comm().Get_size()


def _bounds(n, parts, index):
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def shard(x, dim=0, communicator=None):
    """This rank's contiguous share of ``x`` along ``dim`` (sizes differ by at most one).

    Fewer samples than ranks is a ValueError on every rank alike (some shards would be
    empty, and an empty y0 fails on those ranks only, leaving the others waiting).
    """
    c = communicator or comm()
    if x.shape[dim] < c.Get_size():
        raise ValueError(f"shard: {x.shape[dim]} samples along dim {dim} cannot be shared by {c.Get_size()} "
                         "ranks; use batches of at least as many samples as ranks (DataLoader(drop_last=True) "
                         "drops a short last batch)")
    start, stop = _bounds(x.shape[dim], c.Get_size(), c.Get_rank())
    return x.narrow(dim, start, stop - start)


def allreduce_(tensors, communicator=None):
    """Sum ``tensors`` over all ranks in place, with one allreduce of one flat buffer."""
    from mpi4py import MPI
    c = communicator or comm()
    tensors = [t for t in tensors if t is not None]
    if c.Get_size() == 1 or not tensors:
        return tensors
    flat = _flatten(tensors)
    c.Allreduce(MPI.IN_PLACE, flat.numpy(), op=MPI.SUM)
    _unflatten_into(flat, tensors)
    return tensors


def broadcast_(tensors, root=0, communicator=None):
    """Overwrite ``tensors`` with rank ``root``'s values: a module's parameters and buffers, or an iterable.

    Every rank must start from the same model, as DistributedDataParallel makes it at
    construction: a model initialised on each rank with its own seed trains one model
    per rank, which the summed gradients do not reconcile (a Grid and
    :func:`allreduce_gradients` refuse parameters that differ).
    """
    if isinstance(tensors, torch.nn.Module):
        tensors = [*tensors.parameters(), *tensors.buffers()]
    tensors = list(tensors)
    c = communicator or comm()
    if c.Get_size() == 1 or not tensors:
        return tensors
    flat = _flatten(tensors)
    c.Bcast(flat.numpy(), root=root)
    with torch.no_grad():
        _unflatten_into(flat, tensors)
    return tensors


def _same_on_every_rank(tensors, c):
    """Whether ``tensors`` hold the same values on every rank: one allreduce of two integers."""
    from mpi4py import MPI

    from ._grid import _checksum
    total = sum(_checksum(t) for t in tensors)
    total = (total + 2 ** 62) % 2 ** 63 - 2 ** 62   # wrapped: its negative is an int64 too
    extremes = np.array([total, -total], dtype=np.int64)
    c.Allreduce(MPI.IN_PLACE, extremes, op=MPI.MAX)
    return extremes[0] == -extremes[1]


def _real(t):
    """t as real numbers (a complex tensor's real and imaginary parts), for one float64 buffer."""
    return torch.view_as_real(t) if t.is_complex() else t


def _flatten(tensors):
    return torch.cat([_real(t.detach()).reshape(-1).to("cpu", torch.float64) for t in tensors])


def _unflatten_into(flat, tensors):
    offset = 0
    for t in tensors:
        target = _real(t)
        n = target.numel()
        target.copy_(flat[offset:offset + n].view_as(target))
        offset += n


def allreduce_gradients(parameters, communicator=None):
    """Sum ``p.grad`` over all ranks for every parameter that requires grad (a module or an iterable).

    A parameter this rank's shard never used has ``grad = None``; it becomes zeros, as in
    DistributedDataParallel. Dropped instead, it shifted the flat buffer on this rank only:
    another parameter's gradient was summed into it, or the allreduce aborted the job.
    """
    if isinstance(parameters, torch.nn.Module):
        parameters = parameters.parameters()
    trained = [p for p in parameters if p.requires_grad]
    c = communicator or comm()
    if c.Get_size() > 1 and not _same_on_every_rank(trained, c):
        # Summed gradients of different models train none of them; each rank's solve is
        # its own (COMM_SELF), so this is the one place the ranks meet to see it.
        raise ValueError("allreduce_gradients: the parameter values differ between ranks (checksums of their "
                         "bits), so each rank trains its own model: call pnode.distributed.broadcast_(model) "
                         "once before training, and give every rank the same optimizer steps")
    for p in trained:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return allreduce_([p.grad for p in trained], c)


def abort_on_error():
    """Make an uncaught exception on any rank end the whole job with its message.

    Otherwise the other ranks wait forever in their next collective call. Installed
    when this module is imported under mpiexec with more than one rank (the same
    thing ``python -m mpi4py script.py`` does).
    """
    previous = sys.excepthook
    if getattr(previous, "pnode_abort", False):
        return

    def hook(kind, value, tb):
        previous(kind, value, tb)
        sys.stderr.write(f"pnode: rank {rank()} raised {kind.__name__}; aborting all ranks\n")
        sys.stderr.flush()
        comm().Abort(1)
    hook.pnode_abort = True
    sys.excepthook = hook


def allreduce_sum(value, communicator=None):
    """The sum over ranks of a Python number or a tensor (a copy; e.g. the global loss)."""
    t = torch.as_tensor(value).detach().clone().to(torch.float64)
    allreduce_([t], communicator)
    return t if isinstance(value, torch.Tensor) else t.item()


if size() > 1:
    abort_on_error()
