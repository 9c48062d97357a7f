"""Exceptions a pnode user can meet.

Every solver failure carries where it happened (time, step index, last step
size) and a hint naming the option to change, so a training job that dies
says why instead of printing a PETSc error code.
"""


class PnodeError(RuntimeError):
    """Base class of pnode's runtime errors."""


class SolverError(PnodeError):
    """The time integrator (forward) or its adjoint (backward) failed.

    Attributes: ``phase`` ("forward" or "backward"), ``time``, ``step``,
    ``step_size``, ``residual`` (None when not applicable), ``reason`` (PETSc's
    converged reason name) and ``hint``.
    """

    def __init__(self, message, *, phase, time=None, step=None, step_size=None,
                 residual=None, reason=None, hint=None):
        self.phase = phase
        self.time = time
        self.step = step
        self.step_size = step_size
        self.residual = residual
        self.reason = reason
        self.hint = hint
        where = []
        if time is not None:
            where.append(f"t={time:.6g}")
        if step is not None:
            where.append(f"step {step}")
        if step_size is not None:
            where.append(f"dt={step_size:.3g}")
        if residual is not None:
            where.append(f"residual={residual:.3g}")
        text = f"{phase} solve failed"
        if where:
            text += " at " + ", ".join(where)
        text += f": {message}"
        if reason:
            text += f" (PETSc reason {reason})"
        if hint:
            text += f". Hint: {hint}"
        super().__init__(text)


class NonFiniteError(SolverError):
    """NaN or Inf appeared in the state (forward) or the adjoint (backward)."""


class RHSError(PnodeError):
    """The user's right-hand side raised or returned something unusable.

    The original exception is chained as ``__cause__``.
    """
