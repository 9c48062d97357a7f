"""Matrix-free Jacobians as PETSc MatPython shells, evaluated with torch autograd.

PETSc's adjoint asks for ``J^T w`` (state) and ``J_p^T w`` (parameters) at the
point it last passed to the Jacobian callbacks. Both products are computed by
one autograd call (see :meth:`pnode._rhs.RHS.vjp`); the parameter half is
cached only together with the identity *and* the PETSc object state of ``w`` and
of the point, so a parameter product is never taken from a vector that another
product (for example a Krylov iteration) has since overwritten.
"""


class Point:
    """Where a Jacobian is evaluated: time, state Vec, and step index."""

    __slots__ = ("time", "vec", "step", "key")

    def __init__(self):
        self.time = None
        self.vec = None
        self.step = None
        self.key = None

    def set(self, time, vec, step):
        self.time = time
        self.vec = vec
        self.step = step
        self.key = (time, vec.handle, vec.stateGet())


class StateJacobian:
    """Shell for J = d f_ts / dy; ``mult`` by forward-mode AD, ``multTranspose`` by a VJP."""

    def __init__(self, bridge):
        self.bridge = bridge
        self.point = Point()

    def mult(self, mat, x, y):
        self.bridge.jvp(self.point, x, y)

    def multTranspose(self, mat, x, y):
        self.bridge.state_vjp(self.point, x, y)


class ParamJacobian:
    """Shell for J_p = d f_ts / dp; only ``multTranspose`` is needed by the adjoint."""

    def __init__(self, bridge):
        self.bridge = bridge
        self.point = Point()

    def multTranspose(self, mat, x, y):
        self.bridge.param_vjp(self.point, x, y)
