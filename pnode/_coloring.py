"""The sparse Jacobian of a grid right-hand side, assembled from JVPs by colouring.

On a DMDA with stencil width ``w``, dy/dt at a point depends only on the points
within ``w`` of it, so the Jacobian is sparse with a known pattern. Colour the
grid points so that no two points in one stencil share a colour (point ``i``
along dimension ``k`` gets colour ``i mod m_k`` with ``m_k >= 2w + 1``, times the
component): then one Jacobian-vector product with the indicator vector of each
colour yields every nonzero, ``J[r, c] = (J e_colour(c))[r]`` (Curtis, Powell and
Reid, "On the estimation of sparse Jacobian matrices", IMA J. Appl. Math. 13,
1974; Coleman and More, SIAM J. Numer. Anal. 20, 1983). The products are exact
(automatic differentiation, not differences), so the assembled matrix is the
Jacobian whenever ``f`` reads no farther than the stencil.

pnode uses it as the preconditioning matrix ``P = shift * I - J`` of the
implicit stage equations; the Krylov operator stays the exact matrix-free
shell, so a right-hand side that couples more than the stencil still gets
exact Newton steps and gradients, with a weaker preconditioner.
"""

import itertools
import weakref

import numpy as np
import torch

from ._petsc import PETSc


def _period(n, width, periodic):
    """Colours along one dimension: >= 2w + 1, and a divisor of n when the grid wraps."""
    need = 2 * width + 1
    if n <= need:
        return n
    if not periodic:
        return need
    return next(m for m in range(need, n + 1) if n % m == 0)


def _offsets(dim, width, stencil):
    if stencil == "box":
        return [np.array(o) for o in itertools.product(range(-width, width + 1), repeat=dim)]
    offsets = [np.zeros(dim, dtype=np.int64)]
    for k in range(dim):
        for step in range(1, width + 1):
            for sign in (-1, 1):
                o = np.zeros(dim, dtype=np.int64)
                o[k] = sign * step
                offsets.append(o)
    return offsets


class Coloring:
    """The pattern, colours and AIJ matrix of one grid's Jacobian, built once."""

    def __init__(self, grid):
        dim, dof, width = len(grid.shape), grid.dof, grid.stencil_width
        shape = np.array(grid.shape)
        start, stop = np.array(grid.start), np.array(grid.stop)
        ghosted = np.array(grid.ghosted_shape[1:])
        periods = np.array([_period(n, width, p) for n, p in zip(grid.shape, grid.periodic)])
        strides = np.cumprod(np.concatenate([[1], periods[::-1][:-1]]))[::-1]  # tensor order

        # Owned points in PETSc's local order (the last tensor dimension fastest).
        axes = np.meshgrid(*[np.arange(a, b) for a, b in zip(start, stop)], indexing="ij")
        points = np.stack([a.reshape(-1) for a in axes], axis=1)
        point_index = np.arange(len(points))
        own_colour = ((points % periods) * strides).sum(axis=1)
        self.own_colour = torch.from_numpy((own_colour[:, None] * dof + np.arange(dof)).reshape(-1))
        self.n_colours = int(np.prod(periods)) * dof

        rows, cols, colours = [], [], []
        for offset in _offsets(dim, width, grid.stencil):
            q = points + offset
            inside = np.all((q >= 0) & (q < shape) | np.array(grid.periodic), axis=1)
            local_point = np.ravel_multi_index((q - np.array(grid.ghost_start)).T, ghosted)
            colour = (((q % shape) % periods) * strides).sum(axis=1)
            for c_row, c_col in itertools.product(range(dof), repeat=2):
                rows.append((point_index * dof + c_row)[inside])
                cols.append((local_point * dof + c_col)[inside])
                colours.append((colour * dof + c_col)[inside])
        rows, cols, colours = (np.concatenate(a).astype(np.int64) for a in (rows, cols, colours))
        rstart = grid.da.createGlobalVec().getOwnershipRange()[0]
        global_rows = rows + rstart
        global_cols = np.asarray(grid.da.getLGMap().apply(cols.astype(PETSc.IntType)), dtype=np.int64)
        # A periodic dimension shorter than the stencil meets one point twice.
        _, first = np.unique(np.stack([global_rows, global_cols]), axis=1, return_index=True)
        first.sort()
        self.rows = torch.from_numpy(rows[first])
        self.colours = torch.from_numpy(colours[first])
        self.diagonal = torch.from_numpy(global_rows[first] == global_cols[first])

        n_local = len(points) * dof
        self.matrix = PETSc.Mat().createAIJ(((n_local, PETSc.DECIDE), (n_local, PETSc.DECIDE)),
                                            comm=grid.comm)
        self._last = None  # (point key, RHS, -J entries) of the last assembly
        self.matrix.setPreallocationCOO(global_rows[first].astype(PETSc.IntType),
                                        global_cols[first].astype(PETSc.IntType))

    def assemble(self, solver, point, shift, P):
        """P = shift * I - d f/dy at PETSc's point, from one JVP per colour."""
        last = self._last
        if last is None or last[0] != point.key or last[1]() is not solver.rhs:
            # PETSc's theta adjoint asks twice at one point with different shifts; the
            # entries also depend on the parameters, which a new call (new RHS) may change.
            last = self._last = (point.key, weakref.ref(solver.rhs), self._jacobian_entries(solver, point))
        values = last[2].clone()
        values[self.diagonal] += shift
        P.setValuesCOO(values.numpy(), addv=PETSc.InsertMode.INSERT_VALUES)

    def _jacobian_entries(self, solver, point):
        """-J at the pattern's entries."""
        rhs = solver.rhs
        y = solver.state_input(point.vec)
        direction, view = solver.gwork, solver.gwork_view
        inputs = []
        for k in range(self.n_colours):  # each colour's indicator, with its ghosts
            view.copy_(self.own_colour == k)
            direction.stateIncrease()
            inputs.append(rhs.layout.input(solver.direction_input(direction).clone()))
        products = rhs.jvps("implicit", point, y, torch.stack(inputs))
        products = products.movedim(1, -1).reshape(self.n_colours, -1)  # PETSc's order per colour
        return -products[self.colours, self.rows]
