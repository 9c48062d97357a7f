"""Matrix-free Jacobians as PETSc MatPython shells, and a block-diagonal PCShell.

PETSc's adjoint asks for ``J^T w`` (state) and ``J_p^T w`` (parameters) at the
point it last passed to the Jacobian callbacks. Both products are computed by
one autograd call (:meth:`pnode._rhs.RHS.vjp`); the parameter half is reused
only when the parameter product comes at the same point *and* on the same
vector in the same PETSc object state, so a parameter product is never taken
from a vector that another product (a Krylov iteration, say) has overwritten.
That cache is what the predecessor of this design got wrong: it reused the
parameter product of the last Jacobian-transpose product, which inside a
transposed Krylov solve belongs to a Krylov vector, not to the adjoint.

Implicit parts are posed as the IFunction ``F(t, y, ydot) = ydot - f(t, y)``,
so their Jacobian is ``shift * I - df/dy`` and their parameter Jacobian is
``-df/dp``.
"""

import weakref

import torch

from ._errors import PnodeError


class PreconditionerError(PnodeError):
    """The block-diagonal preconditioner met a singular block."""


class Point:
    """Where a Jacobian is evaluated: time, state Vec, step index, shift."""

    __slots__ = ("time", "vec", "step", "shift", "key")

    def __init__(self):
        self.time = None
        self.vec = None
        self.step = None
        self.shift = 0.0
        self.key = None

    def set(self, time, vec, step, shift=0.0):
        self.time = time
        self.vec = vec
        self.step = step
        self.shift = shift
        self.key = (time, vec.getId(), vec.stateGet())


class ExplicitJacobian:
    """Shell for J = d f_ts / dy of the explicit part (RHSFunction form)."""

    part = "explicit"

    def __init__(self, bridge):
        # weak: PETSc holds these contexts, a cycle through them is invisible to Python's GC
        self.bridge = weakref.proxy(bridge)
        self.point = Point()

    def mult(self, mat, x, y):
        self.bridge.jvp(self.part, self.point, x, y, None)

    def multTranspose(self, mat, x, y):
        self.bridge.state_vjp(self.part, self.point, x, y, None)

    def multTransposeAdd(self, mat, x, v, y):
        self.bridge.state_vjp(self.part, self.point, x, y, None, add=v)


class ImplicitJacobian(ExplicitJacobian):
    """Shell for dF/dy + shift dF/dydot = shift * I - d f_ts / dy of the implicit part.

    No MatScale: ARKIMEX scales the Jacobian only to solve for a DAE's initial
    slope, and pnode's equations are ODEs (PETSc's default equation type), so
    PETSc would report the missing operation rather than go on without it.
    """

    part = "implicit"

    def mult(self, mat, x, y):
        self.bridge.jvp(self.part, self.point, x, y, self.point.shift)

    def multTranspose(self, mat, x, y):
        self.bridge.state_vjp(self.part, self.point, x, y, self.point.shift)

    def multTransposeAdd(self, mat, x, v, y):
        self.bridge.state_vjp(self.part, self.point, x, y, self.point.shift, add=v)


class ZeroJacobian:
    """The explicit part's Jacobian when there is none (fully implicit ARKIMEX).

    PETSc's ARKIMEX adjoint always multiplies by an RHS Jacobian; without one it
    would duplicate the implicit shell, which a MatPython cannot do.
    """

    def multTranspose(self, mat, x, y):
        y.zeroEntries()

    def multTransposeAdd(self, mat, x, v, y):
        if v.getId() != y.getId():
            v.copy(y)


class ParamJacobian:
    """Shell for the parameter Jacobian of one part: +df/dp (explicit) or -df/dp (implicit)."""

    def __init__(self, bridge, part):
        # weak: PETSc holds these contexts, a cycle through them is invisible to Python's GC
        self.bridge = weakref.proxy(bridge)
        self.part = part
        self.scale = 1.0 if part == "explicit" else -1.0
        self.point = Point()

    def multTranspose(self, mat, x, y):
        self.bridge.param_vjp(self.part, self.point, x, y, self.scale)


class BlockDiagonalPC:
    """PCShell applying (shift * I - blockdiag(df_b/dy_b))^{-1} by batched LU in torch.

    When f acts sample by sample on a batch, the Jacobian of the implicit
    stage equation is block diagonal; its per-sample blocks come from d VJPs
    (:meth:`pnode._rhs.RHS.jacobian_blocks`) and their LU factors make this preconditioner exact, so
    GMRES converges in one or two iterations and the cost is linear in the
    batch size. For a right-hand side that couples samples it is still a sound
    (approximate) preconditioner: the Krylov operator stays exact.
    """

    def __init__(self, bridge):
        # weak: PETSc holds these contexts, a cycle through them is invisible to Python's GC
        self.bridge = weakref.proxy(bridge)
        self.pending = None     # (blocks callback, shift) until the first application
        self.lu = None
        self.pivots = None

    def prepare(self, blocks, shift):
        """Factor lazily: PETSc also builds Jacobians it never solves with (ARKIMEX's
        adjoint passes shift 0 for explicit stages, which can be singular)."""
        self.pending = (blocks, shift)

    def _factor(self):
        blocks, shift = self.pending
        self.pending = None
        b = blocks()
        eye = torch.eye(b.shape[-1], dtype=b.dtype, device=b.device)
        self.lu, self.pivots, info = torch.linalg.lu_factor_ex(shift * eye - b)
        if bool((info > 0).any()):
            raise PreconditionerError(
                f"a per-sample block of shift*I - df/dy is singular (shift={shift:.3g}); "
                "use options['jacobian']='dense' or 'matrix-free'")

    def _solve(self, x, y, adjoint):
        if self.pending is not None:
            self._factor()
        b = x.view(self.lu.shape[0], -1, 1).to(self.lu.dtype)
        y.copy_(torch.linalg.lu_solve(self.lu, self.pivots, b, adjoint=adjoint).reshape(-1))

    def apply(self, pc, x, y):
        self._solve(self.bridge.view(x), self.bridge.view(y), False)
        y.stateIncrease()

    def applyTranspose(self, pc, x, y):
        self._solve(self.bridge.view(x), self.bridge.view(y), True)
        y.stateIncrease()
