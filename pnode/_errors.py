"""Exceptions a pnode user can meet.

Every solver failure carries where it happened (time, step index, last step
size) and a hint naming the option to change, so a training job that dies
says why instead of printing a PETSc error code.
"""


import sys


def caller_level():
    """warnings' stacklevel of the first frame outside pnode and torch: the user's call.

    Warnings come from inside PETSc callbacks or several calls deep in argument
    checks; a fixed level pointed into pnode.
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("pnode", "torch"):
        frame, level = frame.f_back, level + 1
    return level


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
        self.message = message
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

    def __reduce__(self):  # keyword-only arguments: pickle (multiprocessing) needs help
        return _rebuild, (type(self), self.message, self._fields())

    def _fields(self):
        return {k: getattr(self, k) for k in ("phase", "time", "step", "step_size", "residual",
                                              "reason", "hint")}


class NonFiniteError(SolverError):
    """NaN or Inf appeared in the state (forward) or the adjoint (backward)."""


class RHSError(PnodeError):
    """The user's right-hand side raised or returned something unusable.

    The original exception is chained as ``__cause__``. Attributes: ``time``
    (the user's time of the failing call), ``step`` (the index of the step
    being taken; 0 in the starting-step estimate), ``phase`` ("forward" or
    "backward"; None for a failure outside a solve) and ``message``.
    """

    def __init__(self, message, *, time=None, step=None, phase=None):
        self.message = message
        self.time = time
        self.step = step
        self.phase = phase
        super().__init__(self._text())

    def _text(self):
        where = []
        if self.phase is not None:
            where.append(f"{self.phase} solve")
        if self.time is not None:
            where.append(f"t={self.time:.6g}")
        if self.step is not None:
            where.append(f"step {self.step}")
        return f"{self.message} (at {', '.join(where)})" if where else self.message

    def locate(self, *, step=None, phase=None, time=None):
        """Add where PETSc was when the call failed (the solver knows, the caller did not)."""
        if self.time is None:
            self.time = time
        if self.step is None:
            self.step = step
        if self.phase is None:
            self.phase = phase
        self.args = (self._text(),)
        return self

    def __reduce__(self):
        return _rebuild, (type(self), self.message,
                          {"time": self.time, "step": self.step, "phase": self.phase})


def _rebuild(cls, message, fields):
    return cls(message, **fields)
