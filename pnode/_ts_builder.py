"""Building a PETSc TS for a method: type, tableau, callbacks, shells, solvers, options.

Explicit methods use PETSc's RHSFunction form. Implicit parts are posed as the
IFunction ``ydot - f`` with IJacobian ``shift * I - df/dy``: PETSc's ARKIMEX
adjoint is only correct in that form (in RHSFunction form it returns garbage).

petsc4py wraps neither TSAdapt nor TSTrajectory, so those are configured
through the options database under a prefix private to each TS; the user's
expert ``petsc_options`` go under the same prefix and are applied last, so
they override pnode's choices.
"""

import itertools
import weakref

from ._options import DIRECT_PCS
from ._petsc import PETSc
from ._shells import BlockDiagonalPC, ExplicitJacobian, ImplicitJacobian, ParamJacobian, ZeroJacobian

_ids = itertools.count()

_SOLVER_OPTIONS = {
    "matrix-free": {"ksp_type": "gmres", "pc_type": "none"},
    "blockdiag": {"ksp_type": "gmres"},
    "dense": {"ksp_type": "preonly", "pc_type": "lu"},
    "colored": {"ksp_type": "gmres", "pc_type": "bjacobi"},  # ILU on each rank's block
}


# Nonlinear solvers whose step is Newton's own error estimate, with the line searches
# that keep it so (see _tolerances); None: no line search.
_NEWTON = {"newtonls": ("bt", "basic"), "newtontr": None}


def _tolerances(eps, user):
    """Newton and Krylov tolerances for a model computing in precision ``eps``.

    Tight: the discrete adjoint differentiates the converged stage equations, so
    gradients are only as accurate as these solves. But not below what the model
    can resolve: a float32 f leaves rounding noise of about eps * |f| in every
    residual, so Newton asked for 1e-12 never converges (every float32 implicit
    solve failed at the first step). 100 eps is the relative floor, for the residual
    and for Newton's step; a float64 model keeps the tight values.

    Newton's step test (snes_stol, unless the user sets it) ends a solve when the
    update is below stol times the stage's norm, whatever the residual. With pnode's
    exact Jacobians and tight linear solves a Newton update is Newton's own error
    estimate, and a stiff solve has to end so at the rounding floor of its residual
    (Robertson under beuler: 900 of 6,400 stage solves; without the test the first step
    failed). Other nonlinear solvers' steps, and steps a minimising line search
    shortened, estimate nothing: under snes_type qn a solve "converged" after one step
    that left its residual as it was, and the solution came out 6% wrong without a
    word. There the step test is off and the residual decides.
    """
    floor = min(100 * eps, 1e-3)   # past 1e-3 (float16, bfloat16) fail loudly rather than accept noise
    options = {"snes_rtol": max(1e-12, floor), "snes_atol": 1e-14, "ksp_rtol": max(1e-13, eps),
               "ksp_atol": 1e-15, "ksp_max_it": 500, "snes_max_it": 50,
               "snes_stol": max(1e-8, floor)}   # 1e-8: PETSc's default
    line_searches = _NEWTON.get(user.get("snes_type", "newtonls").lower(), ())
    if line_searches is not None and user.get("snes_linesearch_type", "bt").lower() not in line_searches:
        options["snes_stol"] = 0
    return {key: f"{value:g}" for key, value in options.items()}


def _clear_options(prefix, keys):
    """Drop a garbage-collected TS's options, so the database does not grow per solver."""
    if PETSc.Sys.isFinalized():
        return
    db = PETSc.Options()
    for key in keys:
        db.delValue(f"-{prefix}{key}")


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


def _weak(solver, name):
    """``getattr(solver, name)`` as a callback that holds the solver weakly.

    The TS keeps its callbacks, and the solver keeps the TS: bound methods made a
    cycle that only Python's full collections free, so evicted or dropped solvers
    (TS, Vecs, Mats, a trajectory each) piled up between them (2.2 GB over 120 series
    lengths). The shells hold it weakly for the same reason.
    """
    ref, method = weakref.ref(solver), getattr(type(solver), name)

    def callback(*args):
        return method(ref(), *args)
    return callback


def _no_point(ts, t, u, J, P):
    """The zero explicit Jacobian does not depend on the point."""


def _zero_function(ts, t, u, F):
    F.zeroEntries()


def _python_mat(rows, cols, context, comm):
    mat = PETSc.Mat().createPython([rows, cols], context=context, comm=comm)
    mat.setUp()
    return mat


def _param_jacobian(solver, part, sizes, mu):
    solver.pjac[part] = ParamJacobian(solver, part)
    return _python_mat(sizes, mu.getSizes(), solver.pjac[part], mu.getComm())


def build_ts(solver, config, parts, u, mu):
    """Return (ts, u, lam, mu) with the solver's callbacks and shells installed."""
    method = config.method
    user = dict(config.petsc_options)
    comm = u.getComm()
    prefix = f"pnode{next(_ids)}_"
    ts = PETSc.TS().create(comm=comm)
    ts.setOptionsPrefix(prefix)
    ts.setProblemType(PETSc.TS.ProblemType.NONLINEAR)
    ts.setType(method.ts_type)
    if method.ts_type == "rk":
        ts.setRKType(method.subtype)
    elif method.ts_type == "theta":
        ts.setTheta(config.theta)
        ts.setThetaEndpoint(method.endpoint)
    elif method.ts_type == "arkimex":
        ts.setARKIMEXType(method.subtype)
        # Without a split the explicit part is zero but the method stays in IMEX mode:
        # fully implicit mode would add the RHS Jacobian into the shell (MatAXPY).
        ts.setARKIMEXFullyImplicit(False)

    sizes = u.getSizes()
    options = {"ts_adapt_type": "none" if config.fixed else "basic"}

    if "explicit" in parts:
        solver.jac["explicit"] = ExplicitJacobian(solver)
        J = _python_mat(sizes, sizes, solver.jac["explicit"], comm)
        ts.setRHSFunction(_weak(solver, "rhs_function"), u.duplicate())
        ts.setRHSJacobian(_weak(solver, "rhs_jacobian"), J, J)
        if mu is not None:
            ts.setRHSJacobianP(_weak(solver, "rhs_jacobian_p"), _param_jacobian(solver, "explicit", sizes, mu))
    if "implicit" in parts:
        solver.jac["implicit"] = ImplicitJacobian(solver)
        if config.jacobian == "dense":
            solver.dense = PETSc.Mat().createDense([sizes, sizes], comm=comm)
            solver.dense.setUp()
            A = P = solver.dense
        elif config.jacobian == "colored":  # exact shell operator, assembled sparse preconditioner
            A = _python_mat(sizes, sizes, solver.jac["implicit"], comm)
            P = solver.assembled_preconditioner()
        else:
            A = P = _python_mat(sizes, sizes, solver.jac["implicit"], comm)
        ts.setIFunction(_weak(solver, "ifunction"), u.duplicate())
        ts.setIJacobian(_weak(solver, "ijacobian"), A, P)
        if mu is not None:
            ts.setIJacobianP(_weak(solver, "ijacobian_p"), _param_jacobian(solver, "implicit", sizes, mu))
        if method.ts_type == "arkimex" and "explicit" not in parts:
            # An explicit part that is zero, stated: with no RHSFunction PETSc (3.26)
            # takes its fully implicit path, which finds the first stage's slope of an
            # explicit-first-stage tableau by solving F(t, y_n, ydot) = 0 at its last
            # *stage* time instead of t_n (0 on a fresh TS, the previous solve's end
            # after that): silently wrong for an f that depends on t. In IMEX form the
            # first stage is f(t_n, y_n), and the adjoint differentiates exactly that.
            ts.setRHSFunction(_zero_function, u.duplicate())
            Z = _python_mat(sizes, sizes, ZeroJacobian(), comm)
            ts.setRHSJacobian(_no_point, Z, Z)
        options.update(_tolerances(config.eps, user))
        options.update(_SOLVER_OPTIONS[config.jacobian])
        user_pc = user.get("pc_type")
        if config.jacobian == "dense" and user_pc is not None and user_pc.lower() not in DIRECT_PCS:
            # preonly applies the preconditioner once: with a user's approximate one in place of
            # the LU every stage solve, and every adjoint solve, was inexact (gradients off by
            # 1e-3 with jacobi, by 1e30 without a preconditioner). Krylov iterates to the
            # tolerances above instead; they stay set for a user's ksp_type too (PETSc's
            # default 1e-5 left gradients 1e-6 off).
            options["ksp_type"] = "gmres"

    lam = u.duplicate()
    ts.setCostGradients([lam], [mu] if mu is not None else None)
    ts.setExactFinalTime(PETSc.TS.ExactFinalTime.MATCHSTEP)
    ts.setPreStep(_weak(solver, "pre_step"))
    ts.setPostStep(_weak(solver, "post_step"))
    ts.setTolerances(rtol=config.rtol, atol=config.atol)
    ts.setMaxStepRejections(config.max_rejections)
    # A failed Newton solve shrinks the step (adaptive) instead of ending the run at once.
    ts.setMaxSNESFailures(-1 if not config.fixed else 1)
    options.update(user)
    _set_options(prefix, options)
    weakref.finalize(ts, _clear_options, prefix, list(options))
    ts.setSaveTrajectory()
    apply_options(ts)
    if config.jacobian == "blockdiag" and "implicit" in parts and "pc_type" not in user:
        solver.pc = BlockDiagonalPC(solver)
        pc = ts.getSNES().getKSP().getPC()
        pc.setType(PETSc.PC.Type.PYTHON)
        pc.setPythonContext(solver.pc)
    return ts, u, lam, mu
