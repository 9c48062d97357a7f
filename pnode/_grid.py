"""One ODE state spread over MPI ranks on a structured grid (PETSc DMDA).

For neural PDEs and other large systems on a 1-D, 2-D or 3-D grid, the state
is one PETSc Vec distributed by a DMDA. Before every call of ``f`` the DMDA
fills this rank's ghost points from its neighbours (DMGlobalToLocal), so
``f(t, u)`` sees a patch that is ``stencil_width`` points wider than the block
the rank owns on every side, and returns dy/dt on the owned block only. All of
PETSc's vector and solver work (norms, step-size control, Newton-Krylov with a
parallel preconditioner, the adjoint) runs across ranks.

Gradients. A vector-Jacobian product of ``f`` on one rank is a gradient with
respect to the ghosted patch; its ghost entries belong to the neighbours and
are added into their owners (DMLocalToGlobal with ADD_VALUES), which is the
transpose of the ghost exchange. Parameters are replicated: the parameter
adjoint Vec gives every rank a private block of ``n_params`` entries, so
PETSc's adjoint accumulates each rank's partial ``dL/dp`` with no
communication, and one allreduce after the backward sums them.
"""

import dataclasses
import math
import numbers

import numpy as np
import torch

from ._coloring import Coloring
from ._errors import PnodeError, RHSError
from ._petsc import DTYPE as PETSC_DTYPE, PETSc, petsc_message
from ._rhs import evaluating_func
from ._solver import Solver

_BOUNDARIES = {"periodic": PETSc.DMDA.BoundaryType.PERIODIC,
               "ghosted": PETSc.DMDA.BoundaryType.GHOSTED}
_STENCILS = {"box": PETSc.DMDA.StencilType.BOX, "star": PETSc.DMDA.StencilType.STAR}


def _checksum(p):
    """The sum of p's bit patterns as integers: equal on ranks that hold the same values.

    Integer sums do not depend on the summation order (threads), as float sums may;
    overflow wraps alike on every rank.
    """
    p = p.detach().reshape(-1)
    size = p.element_size()
    bits = torch.int64 if size % 8 == 0 else torch.int32 if size % 4 == 0 else torch.int16 if size % 2 == 0 \
        else torch.uint8
    return int(p.view(bits).sum(dtype=torch.int64))


def _is_count(value, minimum):
    # numpy's integers too; 4.5 was truncated to 4 by int()
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum


class Grid:
    """A structured grid whose field is spread over the ranks of ``comm``.

    Args:
        shape: grid points per dimension, in tensor order: ``(nx,)``, ``(ny, nx)`` or
            ``(nz, ny, nx)``.
        dof: values per grid point (channels); tensors on the grid are ``(dof, *shape)``.
        stencil_width: ghost points on each side of a rank's block that ``func`` reads.
        boundary: ``"periodic"`` or ``"ghosted"`` (the points outside the domain are
            zero; ``func`` may replace them to impose other boundary conditions), one
            for all dimensions or one per dimension in tensor order.
        stencil: ``"box"`` (ghost corners filled, for convolutions) or ``"star"``.
        comm: a PETSc or mpi4py communicator; default: all ranks (PETSc.COMM_WORLD).

    ``func(t, u)`` gets ``u`` of shape :attr:`ghosted_shape` and returns dy/dt of shape
    :attr:`owned_shape`; ``y0`` and the solution are this rank's :attr:`owned_shape` block.
    """

    def __init__(self, shape, dof=1, stencil_width=1, boundary="periodic", stencil="box", comm=None):
        sizes = (shape,) if isinstance(shape, numbers.Integral) else tuple(shape)
        if not 1 <= len(sizes) <= 3 or not all(_is_count(n, 1) for n in sizes):
            raise ValueError(f"Grid shape must hold 1 to 3 positive integer sizes, got {shape!r}")
        shape = tuple(int(n) for n in sizes)
        if not _is_count(dof, 1) or not _is_count(stencil_width, 0):
            raise ValueError(f"Grid needs an integer dof >= 1 and an integer stencil_width >= 0, got "
                             f"{dof!r} and {stencil_width!r}")
        boundaries = (boundary,) * len(shape) if isinstance(boundary, str) else tuple(boundary)
        if len(boundaries) != len(shape) or any(b not in _BOUNDARIES for b in boundaries):
            raise ValueError(f"Grid boundary must be one of {tuple(_BOUNDARIES)} or one per dimension, "
                             f"got {boundary!r}")
        if stencil not in _STENCILS:
            raise ValueError(f"Grid stencil must be one of {tuple(_STENCILS)}, got {stencil!r}")
        if comm is None:
            comm = PETSc.COMM_WORLD
        elif not isinstance(comm, PETSc.Comm):  # an mpi4py communicator
            try:
                comm = PETSc.Comm(comm)
            except Exception as exc:
                raise TypeError(f"Grid comm must be a PETSc or mpi4py communicator, got {type(comm).__name__}") \
                    from exc
        self.shape = shape
        self.dof = int(dof)
        self.stencil_width = int(stencil_width)
        self.boundary = boundaries
        self.periodic = tuple(b == "periodic" for b in boundaries)
        self.stencil = stencil
        self.comm = comm
        if comm.getSize() > 1:
            # A rank that raises would leave its neighbours waiting in a ghost exchange.
            from .distributed import abort_on_error
            abort_on_error()
            self._check_blocks_cover_the_stencil()
        self.da = self._create(self.stencil_width)
        self.start = tuple(a for a, _ in self.da.getRanges()[::-1])
        self.stop = tuple(b for _, b in self.da.getRanges()[::-1])
        self.ghost_start = tuple(a for a, _ in self.da.getGhostRanges()[::-1])
        owned = tuple(b - a for a, b in zip(self.start, self.stop))
        ghosted = tuple(b - a for a, b in self.da.getGhostRanges()[::-1])
        self.owned_shape = (self.dof,) + owned
        self.ghosted_shape = (self.dof,) + ghosted
        self.layout = GridLayout(self.owned_shape, self.ghosted_shape)

    def _create(self, stencil_width):
        # PETSc orders dimensions x, y, z: the reverse of tensor order.
        PETSc.Sys.pushErrorHandler("python")  # PETSc's words in the exception, not on stderr
        try:
            return PETSc.DMDA().create(
                dim=len(self.shape), dof=self.dof, sizes=self.shape[::-1], stencil_width=stencil_width,
                boundary_type=tuple(_BOUNDARIES[b] for b in self.boundary[::-1]),
                stencil_type=_STENCILS[self.stencil], comm=self.comm)
        except PETSc.Error as exc:
            raise ValueError(self._cannot_lay_out(petsc_message(exc) or exc)) from None
        finally:
            PETSc.Sys.popErrorHandler()

    def _cannot_lay_out(self, why):
        return (f"PETSc cannot lay out a grid of shape {self.shape} (stencil width {self.stencil_width}) "
                f"on {self.comm.getSize()} ranks: {why}; use a larger grid, fewer ranks or a smaller stencil")

    def _check_blocks_cover_the_stencil(self):
        """Raise the same ValueError on every rank when some rank's block is narrower than the stencil.

        PETSc checks that on each rank alone, inside the DMDA's creation: the rank that
        raised left the others in the creation's collectives, and the job hung. Blocks
        do not depend on the stencil width, so a DMDA without one shows every rank's.
        """
        probe = self._create(0)
        widths = probe.getOwnershipRanges()   # every rank's block widths along x, y, z
        probe.destroy()
        for axis, along in enumerate(widths):
            # Along an axis one rank spans, every block is the whole axis and PETSc's verdict
            # is the same on every rank (it accepts a periodic z of one plane, for instance).
            # An empty block (a rank more than points, stencil width 0) has nothing to integrate.
            if len(along) > 1 and min(along) < max(1, self.stencil_width):
                raise ValueError(self._cannot_lay_out(
                    f"the narrowest rank's block is {min(along)} points wide along {'xyz'[axis]} (tensor "
                    f"dimension {len(self.shape) - 1 - axis}), less than " +
                    ("the stencil width" if min(along) else "one point")))

    def __repr__(self):
        return (f"Grid(shape={self.shape}, dof={self.dof}, stencil_width={self.stencil_width}, "
                f"boundary={self.boundary}, rank {self.comm.getRank()} of {self.comm.getSize()} owns "
                f"{self.owned_shape})")

    @property
    def owned(self):
        """Slices of the full grid that this rank owns, in tensor order."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    def local(self, field):
        """This rank's block of a full field ``(..., dof, *shape)`` given on every rank."""
        if tuple(field.shape[-len(self.shape) - 1:]) != (self.dof,) + self.shape:
            raise ValueError(f"field must end in (dof, *shape) = {(self.dof,) + self.shape}, "
                             f"got {tuple(field.shape)}")
        return field[(Ellipsis,) + self.owned]

    def gather(self, block):
        """The full field ``(..., dof, *shape)`` on every rank, from each rank's block (no grad)."""
        block = block.detach().cpu()
        pieces = self.comm.tompi4py().allgather((self.owned, block.numpy()))
        lead = block.shape[:-len(self.shape) - 1]
        field = torch.empty(*lead, self.dof, *self.shape, dtype=block.dtype)
        for owned, piece in pieces:
            field[(Ellipsis,) + owned] = torch.from_numpy(piece)
        return field

    def sum(self, x):
        """The sum of ``x`` over all ranks, differentiable (a global loss from local losses).

        Its gradient on each rank is the incoming gradient itself: the global sum
        depends on this rank's ``x`` with coefficient one.
        """
        return _GlobalSum.apply(x, self)

    def replicated(self, x):
        """``x``, the same on every rank, for use on this rank's block outside the solve.

        The backward sums the parameter gradients of ``func`` over the ranks; a tensor
        that is also used on this rank's block elsewhere (a decoder applied to ``ys``, an
        encoder of ``y0``) collects only this rank's share there. Used through
        ``replicated``, that share is summed over the ranks too (the transpose of "every
        rank holds the same value"), so ``p.grad`` is the global loss's gradient on every rank.
        A module used only outside the solve can instead call :meth:`allreduce_gradients`.
        Inside ``func`` it is ``x`` itself: there the backward sums already (summed twice, the
        gradient was the number of ranks times too large).
        """
        return x if evaluating_func() else _Replicated.apply(x, self)

    def allreduce_gradients(self, parameters):
        """Sum ``p.grad`` over the grid's ranks, for parameters used *only* outside the solve.

        ``func``'s parameters arrive summed already; summing theirs again counts them once
        per rank. For a tensor used in both places, use :meth:`replicated` instead.
        """
        from .distributed import allreduce_gradients
        return allreduce_gradients(parameters, self.comm.tompi4py())

    # -- private: used by pnode's bridge and solver cache ---------------------------------
    def _allreduce(self, value):
        """The sum of a tensor over this grid's ranks (a float64 copy)."""
        # Imported here: importing pnode.distributed under mpiexec installs its abort hook.
        from .distributed import allreduce_sum
        return allreduce_sum(value, self.comm.tompi4py())

    def _agree(self, check):
        """check() on every rank, and the first rank's exception from it raised on all of them.

        A rank that raised alone (y0 with a NaN in its block, a petsc_option one rank
        misspelt) left the others to pair their solve with its next call: wrong results,
        then a hang.
        """
        try:
            result, mine = check(), None
        except Exception as exc:   # noqa: BLE001 - said on every rank, then raised
            result, mine = None, exc
        said = self.comm.tompi4py().allgather(None if mine is None else (type(mine).__name__, str(mine)))
        if mine is not None:
            raise mine
        for rank, what in enumerate(said):
            if what is not None:
                kind = {"TypeError": TypeError, "RuntimeError": RuntimeError}.get(what[0], ValueError)
                raise kind(f"on rank {rank}: {what[1]}")
        return result

    def _check_block(self, y0):
        """Raise unless y0 is this rank's block in PETSc's memory (inside _agree: on every rank)."""
        if tuple(y0.shape) != self.owned_shape:
            raise ValueError(f"with grid=..., y0 is this rank's block of shape grid.owned_shape = "
                             f"{self.owned_shape}, got {tuple(y0.shape)}: pass grid.local(field)")
        if y0.dtype != PETSC_DTYPE or y0.device.type != "cpu":
            raise ValueError(f"with grid=..., y0 must be a {PETSC_DTYPE} CPU tensor (PETSc's own memory), got "
                             f"{y0.dtype} on {y0.device}; cast inside func if the model differs")

    def _check_state(self, times, config, params, frozen=()):
        """Refuse arguments that differ between ranks, on every rank.

        Arguments that differ between ranks (method, step size, checkpoints, ...) made the
        ranks' TS take different steps and hang. One allgather compares them all; what a
        rank can refuse alone was refused on every rank already (_agree).
        """
        arguments = {"t": tuple(times), "parameter shapes": [tuple(p.shape) for p in params],
                     "parameter values (checksums)": [_checksum(p) for p in params],
                     "frozen parameter values (checksums)": [_checksum(p) for p in frozen]}
        arguments.update((f.name, getattr(config, f.name)) for f in dataclasses.fields(config))
        arguments["method"] = config.method.name
        said = self.comm.tompi4py().allgather(arguments)
        differ = [name for name in arguments if len({repr(a[name]) for a in said}) > 1]
        if differ:
            values = "; ".join(f"{name}: " + ", ".join(f"{a[name]!r} on rank {r}" for r, a in enumerate(said))
                               for name in differ)
            raise ValueError(f"the arguments differ between ranks ({values}): every rank of a Grid must pass "
                             "the same t, method, rtol, atol, options, petsc_options and parameters (initialise "
                             "parameters alike on every rank: the same seed, or pnode.distributed.broadcast_)")
        # Every rank is here on every call: the place to destroy dropped solvers. petsc4py
        # only parks a parallel object Python frees (its destruction is collective), so
        # evicted solvers and those of throwaway closures piled up (+300 MB per 100 calls).
        PETSc.garbage_cleanup(self.comm)

    def _make_solver(self, config, n_params, parts):
        return GridSolver(config, int(np.prod(self.owned_shape)), n_params, parts, self.comm, self)


class _GlobalSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grid):
        return grid._allreduce(x).to(x.device, x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Replicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grid):
        ctx.grid = grid
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.grid._allreduce(grad).to(grad.device, grad.dtype), None


class GridLayout:
    """A grid field as the model sees it, ``(dof, *spatial)``, over PETSc's ``(*spatial, dof)``."""

    def __init__(self, owned_shape, ghosted_shape):
        self.shape = self.out_shape = owned_shape
        self._owned = owned_shape[1:] + owned_shape[:1]
        self._ghosted = ghosted_shape[1:] + ghosted_shape[:1]

    def input(self, flat):
        return flat.view(self._ghosted).movedim(-1, 0)

    def output(self, flat):
        return flat.view(self._owned).movedim(-1, 0)

    @staticmethod
    def flat(t):
        return t.movedim(0, -1).reshape(-1)

    def to_flat(self, t, lead=0):
        return t.movedim(lead, -1).reshape(*t.shape[:lead], -1)

    def from_flat(self, flat, lead=0):
        return flat.reshape(*flat.shape[:lead], *self._owned).movedim(-1, lead)


class GridSolver(Solver):
    """A Solver whose state Vec is laid out by the grid's DMDA across ranks."""

    def __init__(self, config, n, n_params, parts, comm, grid):
        self.grid = grid
        da = grid.da
        self.uloc, self.vloc, self.gloc = (da.createLocalVec() for _ in range(3))
        for v in (self.uloc, self.vloc, self.gloc):
            v.zeroEntries()  # ghosts outside a "ghosted" boundary stay zero
        self.coloring = Coloring(grid) if config.jacobian == "colored" and "implicit" in parts else None
        super().__init__(config, n, n_params, parts, comm)
        self.gwork = self.u.duplicate()
        self.gwork_view = self.view(self.gwork)

    def vectors(self):
        mu = PETSc.Vec().createMPI((self.n_params, PETSc.DECIDE), comm=self.comm) if self.n_params else None
        return self.grid.da.createGlobalVec(), mu

    def assembled_preconditioner(self):
        return self.coloring.matrix

    def _recover(self):
        if self.comm.getSize() > 1:
            # Destroying and building PETSc objects is collective, and after an exception
            # on one rank the others may be waiting in a ghost exchange: leave this solver
            # for the cache to replace at the next call, which every rank makes.
            self.broken = True
            return
        super()._recover()

    def _init_args(self):
        return super()._init_args() + (self.grid,)

    def _serve(self, rhs):
        super()._serve(rhs)
        rhs.contain = self.comm.getSize() > 1

    def _run(self, call, *args, phase):
        try:
            super()._run(call, *args, phase=phase)
        except PnodeError as failure:
            self._raise_contained(phase)
            raise failure
        self._raise_contained(phase)

    def _raise_contained(self, phase):
        """Raise on every rank the error func raised on some ranks only (RHS.contain).

        Called where every rank is: after a PETSc call returned or failed on all of them.
        The failing rank raises its own RHSError, the others one that quotes it.
        """
        if self.comm.getSize() == 1:
            return
        mine = self.rhs.failure
        said = self.comm.tompi4py().allgather(None if mine is None else (mine.message, mine.time))
        if mine is not None:
            mine.locate(phase=phase)   # not the step: the failure surfaced steps later, maybe
            raise mine
        failed = [rank for rank, what in enumerate(said) if what is not None]
        if failed:
            message, time = said[failed[0]]
            raise RHSError(f"on rank {failed[0]} of {len(said)}: {message}", time=time, phase=phase)

    # Ghost exchange before f sees a state or a direction; its transpose after a VJP.
    def state_input(self, vec):
        self.grid.da.globalToLocal(vec, self.uloc)
        return self.view(self.uloc)

    def direction_input(self, vec):
        self.grid.da.globalToLocal(vec, self.vloc)
        return self.view(self.vloc)

    def _gradient(self, gy):
        self.view(self.gloc).copy_(self.rhs.layout.flat(gy))
        self.gloc.stateIncrease()
        self.gwork.zeroEntries()
        self.grid.da.localToGlobal(self.gloc, self.gwork, addv=PETSc.InsertMode.ADD_VALUES)
        return self.gwork_view

    def _store_gradient(self, gy, y):
        # gy covers the ghosted patch: its ghost parts belong to other points' owners
        self._finish(self._gradient(gy), None, y, None, None)

    def _state_tensor_input(self, y):
        self.gwork_view.copy_(y)
        self.gwork.stateIncrease()
        return self.state_input(self.gwork)

    def _sum_over_ranks(self, values):
        return self.grid._allreduce(torch.tensor(values, dtype=torch.float64)).tolist()

    @staticmethod
    def _finite(view, vec):
        return np.isfinite(vec.sum())  # VecSum: the same verdict on every rank

    def _nonfinite_where(self, view):
        """The count over all ranks and the first bad entry's rank, grid point and component.

        Collective: called where :meth:`_finite`'s shared verdict makes every rank raise.
        """
        count, _, first = self._nonfinite_entries(view)
        if first is not None:
            component, *point = first
            first = (tuple(i + a for i, a in zip(point, self.grid.start)), component)
        said = self.comm.tompi4py().allgather((count, first))
        ranks = [rank for rank, (count, _) in enumerate(said) if count]
        total = sum(count for count, _ in said)
        text = f"{total} of {self.grid.dof * math.prod(self.grid.shape)} entries"
        if not ranks:
            return text
        point, component = said[ranks[0]][1]
        return (f"{text} on {len(ranks)} of {len(said)} ranks, the first on rank {ranks[0]} at grid "
                f"point {point}, component {component}")

    def ijacobian(self, ts, s, u, udot, shift, A, P):
        super().ijacobian(ts, s, u, udot, shift, A, P)
        if self.coloring is not None:
            self.rhs.stats.jacobians += 1
            self.coloring.assemble(self, self.jac["implicit"].point, shift, P)
