"""Building a PETSc TS for a method: type, tableau, adaptivity, shells, options.

petsc4py wraps neither TSAdapt nor TSTrajectory, so those are configured
through the options database under a prefix private to each TS; the user's
expert ``petsc_options`` go under the same prefix and are applied last, so
they override pnode's choices.
"""

import itertools

from ._petsc import PETSc

_ids = itertools.count()


def _set_options(prefix, options):
    db = PETSc.Options()
    for key, value in options.items():
        db.setValue(f"-{prefix}{key}", value)


def apply_options(ts):
    """ts.setFromOptions(), with the trajectory made an in-memory one.

    PETSc's TSTrajectory does not inherit the TS's options prefix, so its type is
    set as a global option only for the duration of this call.
    """
    db = PETSc.Options()
    previous = db.getString("ts_trajectory_type") if db.hasName("ts_trajectory_type") else None
    db.setValue("-ts_trajectory_type", "memory")
    try:
        ts.setFromOptions()
    finally:
        if previous is None:
            db.delValue("-ts_trajectory_type")
        else:
            db.setValue("-ts_trajectory_type", previous)


def build_ts(solver, config, n, n_params, comm):
    """Return (ts, u, lam, mu) with the solver's callbacks installed."""
    method = config.method
    prefix = f"pnode{next(_ids)}_"
    ts = PETSc.TS().create(comm=comm)
    ts.setOptionsPrefix(prefix)
    ts.setProblemType(PETSc.TS.ProblemType.NONLINEAR)
    ts.setType(method.ts_type)
    if method.ts_type == "rk":
        ts.setRKType(method.subtype)

    u = PETSc.Vec().createMPI((PETSc.DECIDE, n), comm=comm) if comm.getSize() > 1 \
        else PETSc.Vec().createSeq(n, comm=comm)
    F = u.duplicate()
    ts.setRHSFunction(solver.rhs_function, F)
    J = PETSc.Mat().createPython([u.getSizes(), u.getSizes()], context=solver.J, comm=comm)
    J.setUp()
    ts.setRHSJacobian(solver.rhs_jacobian, J, J)

    lam = u.duplicate()
    mu = None
    if n_params:
        mu = PETSc.Vec().createSeq(n_params, comm=PETSc.COMM_SELF) if comm.getSize() == 1 \
            else PETSc.Vec().createMPI((PETSc.DECIDE, n_params), comm=comm)
        Jp = PETSc.Mat().createPython([u.getSizes(), mu.getSizes()], context=solver.Jp, comm=comm)
        Jp.setUp()
        ts.setRHSJacobianP(solver.rhs_jacobian_p, Jp)
    ts.setCostGradients([lam], [mu] if mu is not None else None)

    ts.setExactFinalTime(PETSc.TS.ExactFinalTime.MATCHSTEP)
    ts.setPostStep(solver.post_step)
    ts.setTolerances(rtol=config.rtol, atol=config.atol)
    ts.setMaxStepRejections(config.max_rejections)
    options = {"ts_adapt_type": "none" if config.fixed else "basic"}
    options.update(config.petsc_options)
    _set_options(prefix, options)
    ts.setSaveTrajectory()
    apply_options(ts)
    return ts, u, lam, mu
