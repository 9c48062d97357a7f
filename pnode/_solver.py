"""A PETSc TS with its vectors, shells and callbacks, reused across calls.

``Solver.forward`` integrates from ``y0`` through the output times and keeps
PETSc's in-memory trajectory; ``Solver.backward`` runs TSAdjoint segment by
segment between output times, adding ``dL/dy(t_i)`` to the adjoint at each
output time, and returns ``dL/dy0`` and ``dL/dp``.

Adaptive steps: the adjoint differentiates the accepted steps of the forward
solve; the step-size controller itself is not differentiated (as in ACA and
PNODE), so the gradient is the exact derivative of the discrete solution that
was computed.
"""

import contextlib
import math
import threading
import time as _time
import weakref

import torch

from ._errors import NonFiniteError, PnodeError, RHSError, SolverError
from ._initial_step import initial_step
from ._petsc import PETSc, petsc_message
from ._rhs import close_times
from ._staging import Staging
from ._ts_builder import apply_options, build_ts


def _vec(n, comm):
    if comm.getSize() > 1:
        return PETSc.Vec().createMPI((PETSc.DECIDE, n), comm=comm)
    return PETSc.Vec().createSeq(n, comm=comm)


# TSConvergedReason values petsc4py (3.26) does not name
_TS_REASONS = {-3: "FORWARD_DIVERGED_LINEAR_SOLVE", -4: "ADJOINT_DIVERGED_LINEAR_SOLVE"}


def _enum_name(enum, code):
    """The name of a petsc4py enum value (TS, SNES or KSP converged reason), else the code."""
    fallback = _TS_REASONS.get(code, str(code)) if enum is PETSc.TS.ConvergedReason else str(code)
    return next((k for k in dir(enum) if k.isupper() and getattr(enum, k) == code), fallback)


class Solver:
    """Owns one TS configured for one (method, state size, parameter count)."""

    def __init__(self, config, n, n_params, parts, comm=None):
        self.config = config
        self.n = n
        self.n_params = n_params
        self.parts = parts
        self.comm = comm if comm is not None else PETSc.COMM_SELF
        self.rhs = None
        # One call at a time (Solver.held): threads wait; a call nested in func's evaluation,
        # which finds it busy, gets a solver of its own (_SolverCache.get). A rebuild after a
        # failure (_recover) keeps both, still held by the failing call: a fresh lock and a
        # zero count had let another thread's call run on the half-built TS (SEGV).
        if not hasattr(self, "lock"):
            self.lock = threading.RLock()
            self.busy = 0
        self._views = {}
        self._param_views_of = {}   # Vec id -> per-parameter views, cut for _param_shapes
        self._param_shapes = None
        self._pcache = None
        self.jac = {}     # part -> Jacobian shell context (set by build_ts)
        self.pjac = {}    # part -> parameter-Jacobian shell context
        self.pc = None    # BlockDiagonalPC when options['jacobian'] == 'blockdiag'
        self.dense = None  # assembled Mat when options['jacobian'] == 'dense'
        self.ts, self.u, self.lam, self.mu = build_ts(self, config, parts, *self.vectors())
        self.u_view = self.view(self.u)
        self.lam_view = self.view(self.lam)
        self.mu_view = self.view(self.mu) if n_params else None
        self._owner = None             # weak reference to the run whose trajectory the TS holds
        self.broken = False            # set when a failure left it unusable: the cache replaces it
        self._has_trajectory = True    # build_ts sets one up
        self._step_times = []
        self.step_sizes = []
        self._h = None
        self._replay = None            # (first step, step sizes) while replaying
        self._fixed_h = None           # the fixed step size of the running forward
        self._watch = None             # adaptive forwards: what a NaN from func does (_watch_output)
        self._nonfinite_time = None    # when func last returned NaN/Inf in this step's attempts
        self._nonfinite_at = ""        # and which of its entries (_nonfinite_where)
        self._outputs = ()
        self._next_output = 0
        self.step_bytes = config.method.stages * n * self.u_view.element_size()
        if config.replay == "advance":  # recomputation between checkpoints stores nothing
            self.ts.removeTrajectory()
            self._has_trajectory = False

    @contextlib.contextmanager
    def held(self):
        """Hold the solver for one call's solves; its ``rhs`` is dropped when the last hold ends.

        Two threads sharing a module crashed the process (one removed the trajectory
        the other was writing), and a func that called its own module again overwrote
        the state of the solve it was called from.
        """
        with self.lock:
            self.busy += 1
            try:
                yield self
            finally:
                self.busy -= 1
                if not self.busy:
                    self.rhs = None

    @property
    def trajectory_owner(self):
        """The run whose forward the TS's trajectory records, while it lives and has not used it."""
        return self._owner() if self._owner is not None else None

    def _own(self, owner):
        """Record the trajectory about to be made as ``owner``'s, held weakly.

        A strong reference kept a run whose outputs were dropped without a backward (a
        validation pass outside no_grad) alive with its tape: 500 MB per call, up to the
        cache size. When the run dies its trajectory goes too, unless a call holds the
        solver or the TS spans several ranks (the collector runs on each rank at its own
        moment, and destroying the trajectory is collective): the next forward replaces it.
        """
        me = weakref.ref(self)

        def dropped(ref):
            solver = me()
            if solver is None or solver._owner is not ref or solver.comm.getSize() > 1 \
                    or not solver.lock.acquire(blocking=False):
                return
            try:
                if not solver.busy:
                    solver.release_trajectory()
            finally:
                solver.lock.release()
        self._owner = weakref.ref(owner, dropped) if owner is not None else None

    def vectors(self):
        """New (state, parameter) Vecs; the parameter one is None without parameters."""
        return _vec(self.n, self.comm), _vec(self.n_params, self.comm) if self.n_params else None

    # -- Vec <-> tensor ---------------------------------------------------------------
    def view(self, vec):
        """A torch tensor sharing the Vec's memory (DLPack, zero-copy).

        Cached per Vec object id: PETSc's work vectors live as long as the TS,
        and object ids are never reused, unlike addresses.
        """
        key = vec.getId()
        t = self._views.get(key)
        if t is None:
            # 'r' because PETSc read-locks callback inputs; the memory is the same and
            # every write through a view is followed by stateIncrease().
            t = torch.from_dlpack(vec.toDLPack("r"))
            self._views[key] = t
        return t

    def _serve(self, rhs):
        """Take ``rhs`` (one call's functions and parameters) for the solve that follows."""
        shapes = [p.shape for p in rhs.params]
        if shapes != self._param_shapes:
            # The same parameter count cut another way (another subset of the model
            # trained): views made for the old shapes would take the new gradients wrongly.
            self._param_views_of = {}
            self._param_shapes = shapes
        self.rhs = rhs

    def _param_views(self, vec):
        """Per-parameter views into a parameter-sized Vec, made once per Vec."""
        views = self._param_views_of.get(vec.getId())
        if views is None:
            flat = self.view(vec)
            views, offset = [], 0
            for p in self.rhs.params:
                views.append(flat[offset:offset + p.numel()].view(p.shape))
                offset += p.numel()
            self._param_views_of[vec.getId()] = views
        return views

    def staging(self, dtype, device):
        """Buffers between PETSc's memory and a model of another dtype or device, made once."""
        if dtype == self.u_view.dtype and device == self.u_view.device:
            return None
        key = ("staging", dtype, device)
        buffers = self._views.get(key)
        if buffers is None:
            buffers = self._views[key] = Staging(self.n, self.u_view.dtype, dtype, device)
        return buffers

    # -- TS callbacks -------------------------------------------------------------------
    def rhs_function(self, ts, s, u, F):
        self._h = ts.getTimeStep()  # the step size of the attempt being evaluated
        out = self.view(F)
        self.rhs.evaluate("explicit", s, self.state_input(u), out, ts, u, self._h)
        F.stateIncrease()
        if self._watch is not None:
            self._watch_output(ts, s, out, F)

    def ifunction(self, ts, s, u, udot, F):
        self._h = ts.getTimeStep()
        out = self.view(F)
        self.rhs.evaluate("implicit", s, self.state_input(u), out, ts, u, self._h)
        if self._watch is not None:
            self._watch_output(ts, s, out, F)
        out.neg_().add_(self.view(udot))   # F = ydot - f
        F.stateIncrease()

    def _watch_output(self, ts, s, out, vec):
        """Adaptive steps: note (implicit) or raise on (explicit) a NaN or Inf from func.

        An explicit tableau's NaN reached PETSc's error norm, which raised without returning
        the work vector it had borrowed: a DM and two state-sized Vecs leaked per failure. An
        implicit method retries a failed Newton solve with shorter steps, and a func that stays
        NaN ended as "step size underflow", the NaN unmentioned.
        """
        if self._finite(out, vec):
            return
        if self._nonfinite_time is None:
            # every rank is here: _finite's verdict is shared, and so are the callbacks
            self._nonfinite_time, self._nonfinite_at = s, self._nonfinite_where(out)
        if self._watch == "raise" and not self.rhs.contain:   # contained: the step fails on every rank
            raise NonFiniteError(f"func returned NaN or Inf ({self._nonfinite_at})", phase="forward",
                                 time=self.rhs.user_time(s),
                                 step=ts.getStepNumber(), step_size=self.rhs.user_step(self._h),
                                 hint=self._NONFINITE_HINT)

    def rhs_jacobian(self, ts, s, u, J, P):
        self.jac["explicit"].point.set(s, u, ts.getStepNumber())

    def ijacobian(self, ts, s, u, udot, shift, A, P):
        self.jac["implicit"].point.set(s, u, ts.getStepNumber(), shift)
        if self.pc is not None:
            # The callback waits in the PCShell, which PETSc holds: a strong reference to
            # the solver there is a cycle Python's collector cannot see (a dropped or
            # evicted solver was never freed).
            point, y, me = self.jac["implicit"].point, self.view(u), weakref.proxy(self)

            def blocks():
                me.rhs.stats.jacobians += 1
                return me.rhs.jacobian_blocks("implicit", point, y)
            self.pc.prepare(blocks, shift)
        elif self.dense is not None:
            self.rhs.stats.jacobians += 1
            jac = self.rhs.dense_jacobian("implicit", self.jac["implicit"].point, self.view(u))
            eye = torch.eye(self.n, dtype=jac.dtype, device=jac.device)
            torch.from_numpy(P.getDenseArray()).copy_(shift * eye - jac)
            P.assemble()

    def rhs_jacobian_p(self, ts, s, u, Jp):
        self.pjac["explicit"].point.set(s, u, ts.getStepNumber())

    def ijacobian_p(self, ts, s, u, udot, shift, Jp):
        self.pjac["implicit"].point.set(s, u, ts.getStepNumber(), shift)

    def pre_step(self, ts):
        if self._replay is not None:
            first, sizes = self._replay
            ts.setTimeStep(sizes[ts.getStepNumber() - first])
        elif self._fixed_h is not None:
            # PETSc shortens a step to land on an output time and keeps the shortened
            # size afterwards (t = [0, 1e-3, 1] took 1000 steps of 1e-3): restore it.
            # The step that would pass the next output time, or stop within 1% of it
            # (rounding in t + h + ... + h), lands on it instead.
            s = ts.getTime()
            while self._outputs[self._next_output] <= s:
                self._next_output += 1
            left = self._outputs[self._next_output] - s
            ts.setTimeStep(left if 1.01 * self._fixed_h >= left else self._fixed_h)

    _NONFINITE_HINT = "reduce the step size or rtol/atol, or check func for overflow"

    def _newton_crawl(self):
        """(what to add to the message, the hint) when an adaptive implicit solve ran out of
        steps or step size crawling with Newton failing, else ("", "").

        Each failed Newton solve quarters the step, so a Newton or Krylov solve that cannot
        converge at reasonable steps creeps on at tiny ones (1e-13 of the span with
        ksp_max_it=1), where "raise max_num_steps" is the wrong advice. Failures alone do
        not say so: ARKIMEX on Van der Pol (mu 1000, rtol 1e-3) fails more solves than it
        takes steps while its steps stay large.
        """
        failed = self.ts.getSNESFailures() if "implicit" in self.parts else 0
        span = abs(self._outputs[-1] - self._outputs[0])
        if failed * 10 < self.ts.getStepNumber() or abs(self.ts.getTimeStep()) >= 1e-8 * span:
            return "", ""
        dense = "" if self.config.jacobian == "dense" else "options['jacobian']='dense' (small states), "
        return (f"{failed} Newton solves failed on the way ({self.ts.getStepNumber()} steps), each retried "
                f"with a quarter of the step",
                f"the steps shrank to what Newton can solve: if its linear solves fail, try {dense}"
                "petsc_options={'ksp_max_it': 2000} or another 'pc_type'; else petsc_options={'snes_max_it': "
                "200}; raising max_num_steps only crawls further ({'ts_max_snes_failures': 100} stops sooner)")

    def post_step(self, ts):
        s = ts.getTime()
        if not s > self._step_times[-1]:
            # t + dt == t: the step is below the resolution of the time variable, and
            # PETSc would spin to max_num_steps and return a state short of the end time.
            if self._nonfinite_time is not None:
                raise NonFiniteError(f"func returned NaN or Inf ({self._nonfinite_at}), and the shorter steps "
                                     "PETSc retried with shrank to nothing", phase="forward",
                                     time=self.rhs.user_time(self._nonfinite_time), step=ts.getStepNumber(),
                                     step_size=self.rhs.user_step(self._h),
                                     residual=math.nan if "implicit" in self.parts else None,
                                     hint="check func for overflow near that time")
            # A finite-time blow-up (dy/dt = y^2) ends here too, the steps shrinking towards it
            largest = self.u.norm(PETSc.NormType.INFINITY)   # collective: every rank is here
            crawl, crawl_hint = self._newton_crawl()
            raise SolverError(f"step size underflow: the time no longer advances (largest |y| {largest:.3g})"
                              + (crawl and f"; {crawl}"),
                              phase="forward", time=self.rhs.user_time(s), step=ts.getStepNumber(),
                              step_size=self.rhs.user_step(self._h),
                              reason="STEP_SIZE_UNDERFLOW",
                              hint="if |y| grew without bound, the solution blows up near this time and no "
                                   "step gets past it (check func, or end t before it); otherwise loosen "
                                   "rtol/atol if the steps collapsed, or split a very long span of t into "
                                   "shorter solves" + (crawl_hint and "; " + crawl_hint))
        self._step_times.append(s)
        self._nonfinite_time = None   # what a rejected attempt met is behind
        # ts.getTimeStep() is already the next step's size here; the accepted one was
        # seen by the right-hand side, and checkpointing replays it bit for bit.
        self.step_sizes.append(self._h)
        if not self._finite(self.u_view, self.u):
            raise NonFiniteError(f"NaN or Inf in the state ({self._nonfinite_where(self.u_view)})",
                                 phase="forward", time=self.rhs.user_time(s),
                                 step=ts.getStepNumber(), step_size=self.rhs.user_step(ts.getTimeStep()),
                                 hint=self._NONFINITE_HINT)

    @staticmethod
    def _finite(view, vec):
        # NaN and Inf survive a sum, and one reduction is far cheaper than isfinite().all()
        return math.isfinite(float(view.sum()))

    def _nonfinite_entries(self, view):
        """(how many entries of ``view``, a state-shaped Vec's, are NaN or Inf, of how many; the
        first one's index in f's output shape, or None)."""
        bad = ~torch.isfinite(self.rhs.layout.output(view))
        first = tuple(torch.nonzero(bad)[0].tolist()) if bad.any() else None
        return int(bad.sum()), bad.numel(), first

    def _nonfinite_where(self, view):
        """How many entries of ``view`` are NaN or Inf, and the first one's index.

        A large state's error is no use without it: a bad input entry or a single
        unstable component is found by its position. Only on the way to raising.
        """
        count, total, first = self._nonfinite_entries(view)
        return f"{count} of {total} entries, the first at index {first}"

    # -- products for the shells ----------------------------------------------------------
    # Hooks where a distributed state differs (pnode._grid): what f sees of a state or
    # direction Vec, and how a gradient with respect to that becomes a flat gradient.
    def state_input(self, vec):
        return self.view(vec)

    direction_input = state_input

    def _gradient(self, gy):
        # Another dtype stays: _finish's copy or arithmetic casts it, one pass fewer.
        return self.rhs.layout.flat(gy).to(self.u_view.device)

    def _finish(self, value, x, y, shift, add):
        """y = value (explicit part) or shift * x - value (implicit part), plus ``add``."""
        if shift is not None:
            value = shift * self.view(x) - value
        yv = self.view(y)
        if add is None:
            yv.copy_(value)
        elif add.getId() == y.getId():
            yv.add_(value)
        else:
            torch.add(self.view(add), value, out=yv)
        y.stateIncrease()

    def jvp(self, part, point, x, y, shift):
        jv = self.rhs.jvp(part, point, self.state_input(point.vec), self.direction_input(x))
        self._finish(self.rhs.layout.flat(jv).to(self.u_view.device), x, y, shift, None)

    def _store_gradient(self, gy, y):
        """y = gy, copied (and cast) through a view of y shaped like f's output.

        The explicit adjoint's product, once per stage: 5 us less per stage than
        flattening ``gy`` and going through :meth:`_finish` (tiny model, measured).
        """
        self.rhs.output_view(self.view(y)).copy_(gy)
        y.stateIncrease()

    def state_vjp(self, part, point, x, y, shift, add=None):
        want_p = part in self.pjac
        gy, gp = self.rhs.vjp(part, point, self.state_input(point.vec), self.view(x), want_p)
        if gy is not None and shift is None and add is None:
            self._store_gradient(gy, y)
        else:
            value = self._gradient(gy) if gy is not None else torch.zeros_like(self.u_view)
            self._finish(value, x, y, shift, add)
        self._pcache = (part, point.key, x.getId(), x.stateGet(), gp) if want_p else None

    def param_vjp(self, part, point, x, y, scale):
        c = self._pcache
        if c is not None and c[:4] == (part, point.key, x.getId(), x.stateGet()):
            gp = c[4]
        else:
            _, gp = self.rhs.vjp(part, point, self.state_input(point.vec), self.view(x), True)
        self.rhs.write_params(gp, self._param_views(y), scale)
        y.stateIncrease()

    # -- solves ---------------------------------------------------------------------------
    def _first_step(self, times, y0):
        cfg = self.config
        span = times[-1] - times[0]
        unit = abs(self.rhs.scale)   # options are in the user's time units, PETSc's s in these
        if cfg.fixed:
            return cfg.step_size / unit if cfg.step_size is not None else min(
                b - a for a, b in zip(times[:-1], times[1:]))
        # PETSc's theta error estimate needs a previous step, so it accepts the first one
        # unchecked: a user's first_step is capped at the estimate (1.0 gave beuler an
        # error of 3.9 where the default start gave 2e-2).
        unchecked = cfg.method.ts_type == "theta"
        if cfg.first_step is not None and not unchecked:
            return cfg.first_step / unit
        rhs = self.rhs

        # In t's units (u = unit * s): Hairer-Norsett-Wanner's estimate is not invariant under a
        # change of time unit (cn's first step on [0, 2, 1e5] was 1.0, not 0.027, and y(2) 9% off).
        def f(u, y):
            rhs.count_evaluation()
            y = self._state_tensor_input(y)
            out = sum(rhs.layout.flat(rhs.value(part, u / unit, y)) for part in self.parts).to(y.device, y.dtype)
            return out if rhs.scale > 0 else -out
        h = initial_step(f, times[0] * unit, y0.clone(), cfg.method.order, cfg.rtol, cfg.atol, span * unit,
                         self._sum_over_ranks) / unit
        return h if cfg.first_step is None else min(cfg.first_step / unit, h)

    # What a distributed state (pnode._grid) does differently for the initial step.
    _state_tensor_input = staticmethod(lambda y: y)
    _sum_over_ranks = staticmethod(lambda values: values)

    def _raise_contained(self, phase):
        """On a Grid over several ranks: raise the error func raised on some ranks (GridSolver)."""

    def forward(self, rhs, y0_flat, times, owner, sizes=None):
        """Integrate; return the states at ``times`` as a (len(times), n) tensor.

        With ``sizes``, take exactly those steps: a backward recomputing its forward.
        """
        self._serve(rhs)
        ts = self.ts
        self._pcache = None
        start = _time.perf_counter()
        self.u_view.copy_(y0_flat)
        self.u.stateIncrease()
        ts.setTime(times[0])
        ts.setStepNumber(0)
        ts.setMaxTime(times[-1])
        ts.setMaxSteps(self.config.max_num_steps)
        # Solvers are shared by calls that differ in tolerances (not part of the cache key).
        ts.setTolerances(rtol=self.config.rtol, atol=self.config.atol)
        try:   # func's first calls, before PETSc runs: the estimate of the starting step
            h = self._first_step(times, self.u_view)
            self._raise_contained("forward")
        except RHSError as exc:
            raise exc.locate(step=0, phase="forward")
        if not (math.isfinite(h) and h > 0):
            # f was NaN or Inf at t0 (the estimate's norms are summed over a Grid's ranks,
            # so every rank gets here); PETSc refused the step with a raw error 63.
            raise NonFiniteError("NaN or Inf in the state's derivative at t0, where the initial step size is "
                                 "estimated", phase="forward", time=rhs.user_time(times[0]), step=0,
                                 step_size=rhs.user_step(h),
                                 hint="check func and y0 for overflow, or set options['first_step']")
        ts.setTimeStep(h)
        ts.setEvaluationTimes(times)
        self._fixed_h = h if self.config.fixed else None
        self._watch = None if self.config.fixed else "raise" if "implicit" not in self.parts else "note"
        self._nonfinite_time = None
        self._outputs, self._next_output = times, 0
        self._prepare_trajectory(owner is not None)
        self._own(owner)
        self._step_times = [ts.getTime()]
        self.step_sizes = []
        self._replay = (0, sizes) if sizes is not None else None
        try:
            self._run(ts.solve, self.u, phase="forward")
        finally:
            self._replay = None
        failure = self._check_outputs(rhs, times, sizes)
        if failure is not None:
            # PETSc stopped without an error, with state a next solve would inherit (the step
            # size its adaptor cached to land on the output time it never reached: the next
            # call took other steps, 4.5e-10 off a fresh module's): start over.
            self._recover()
            raise failure
        sol_times, sols = ts.getEvaluationSolutions()
        index = {s: i for i, s in enumerate(self._step_times)}
        self.output_steps = [index[float(s)] for s in sol_times]
        ys = torch.stack([self.view(v).clone() for v in sols])
        st = rhs.stats
        st.steps = ts.getStepNumber()
        st.rejected_steps = ts.getStepRejections()
        st.newton_iterations = ts.getSNESIterations()
        st.krylov_iterations = ts.getKSPIterations()
        st.step_times = [rhs.user_time(s) for s in self._step_times]
        st.device_path = rhs.staging.path if rhs.staging is not None else "shared memory (DLPack)"
        st.trajectory_bytes = st.steps * self.step_bytes if owner is not None else 0
        st.forward_seconds = _time.perf_counter() - start
        return ys

    def _check_outputs(self, rhs, times, sizes):
        """The error of a solve that ended without reaching every output time, else None."""
        ts = self.ts
        if sizes is not None and self.step_sizes != sizes:
            return SolverError(f"the forward recomputed for the backward took {len(self.step_sizes)} steps other "
                               f"than the {len(sizes)} it recorded", phase="backward",
                               time=rhs.user_time(ts.getTime()), step=ts.getStepNumber(),
                               hint="a nondeterministic func cannot be recomputed; take the backward "
                                    "before another call of the same module")
        reason = ts.getConvergedReason()
        if reason < 0:
            return self._failure("the time integrator stopped", "forward", reason)
        sol_times, sols = ts.getEvaluationSolutions()
        if len(sols) != len(times):
            crawl, crawl_hint = self._newton_crawl()
            return SolverError(f"reached {len(sols)} of {len(times)} output times" + (crawl and f"; {crawl}"),
                               phase="forward", time=rhs.user_time(ts.getTime()), step=ts.getStepNumber(),
                               step_size=self.rhs.user_step(ts.getTimeStep()), reason="DIVERGED_MAX_STEPS",
                               hint=crawl_hint or "raise options['max_num_steps']")
        for want, got in zip(times, sol_times):
            # PETSc takes a step as landing on an output time within 1e-6 h relative to
            # |s|: a span of 1e6 would make that a whole step and shift the outputs.
            if not close_times(want, float(got)):
                return SolverError(f"PETSc stored the output for t={rhs.user_time(want):.17g} at "
                                   f"t={rhs.user_time(float(got)):.17g}", phase="forward",
                                   time=rhs.user_time(float(got)), step=ts.getStepNumber(),
                                   step_size=self.rhs.user_step(ts.getTimeStep()),
                                   hint="the span of t is too long for its steps in PETSc's time "
                                        "matching; split t into shorter solves")
        return None

    def recorded_steps(self):
        """(step times, step sizes, output step indices) of the last forward, for replays."""
        return list(self._step_times), list(self.step_sizes), list(self.output_steps)

    def replay(self, rhs, y_start, first, t_start, t_end, sizes):
        """Integrate len(sizes) steps from (t_start, y_start) with exactly these step sizes."""
        self._serve(rhs)
        ts = self.ts
        self._pcache = None
        self.u_view.copy_(y_start)
        self.u.stateIncrease()
        ts.setTime(t_start)
        ts.setStepNumber(first)
        ts.setMaxTime(t_end)
        ts.setMaxSteps(first + len(sizes))
        ts.setTimeStep(sizes[0])
        # TSSolve restarts FSAL tableaus only at step 0; a replay from step j > 0 must not
        # reuse the last stage of whatever this TS integrated before.
        ts.restartStep()
        self._replay = (first, sizes)
        self._step_times = [t_start]
        self.step_sizes = []
        try:
            self._run(ts.solve, self.u, phase="backward")
        finally:
            self._replay = None
        if ts.getStepNumber() != first + len(sizes) or ts.getTime() != t_end:
            raise SolverError(f"recomputation reached t={rhs.user_time(ts.getTime()):.17g}, step "
                              f"{ts.getStepNumber()} instead of t={rhs.user_time(t_end):.17g}, step "
                              f"{first + len(sizes)}", phase="backward",
                              hint="a nondeterministic func cannot be checkpointed; use the default "
                                   "store-everything mode")
        return self.u_view.clone()

    def adjoint_steps(self, rhs, lam, nsteps):
        """Run TSAdjoint back over the last ``nsteps`` steps of the stored trajectory."""
        self._serve(rhs)
        self._seed_adjoint(lam)
        self._adjoint_segment(nsteps)
        self._pcache = None
        rhs.release_graph()
        return self.lam_view.clone(), self.mu_view.clone() if self.n_params else None

    def _prepare_trajectory(self, wanted):
        """Give a recorded forward a brand-new PETSc trajectory.

        Reusing one is unsafe: PETSc 3.26's memory trajectory, set up again after it
        reset itself, raises its stack size for a longer solve but keeps the old,
        smaller stack, and the next pushes write past it (a segfault seen when a
        cached solver went from 10 to 20 steps). A stale trajectory of a forward
        that no adjoint consumed must not leak into the next solve either.
        """
        ts = self.ts
        if self._has_trajectory:
            ts.removeTrajectory()
            self._has_trajectory = False
        if wanted:
            ts.setSaveTrajectory()
            apply_options(ts)
            self._has_trajectory = True

    def release_trajectory(self):
        """Free the trajectory once its adjoint ran (a second backward recomputes the forward).

        Kept, it stayed allocated (98 MB in one case) in every cached solver until that
        solver's next forward.
        """
        self._owner = None
        self._prepare_trajectory(False)

    def backward(self, rhs, grad_ys):
        """Given dL/dy(t_i) as a (len(times), n) tensor, return (dL/dy0, dL/dp)."""
        self._serve(rhs)
        start = _time.perf_counter()
        self._seed_adjoint(grad_ys[-1])
        steps = self.output_steps
        for i in range(len(steps) - 1, 0, -1):
            self._adjoint_segment(steps[i] - steps[i - 1])
            self.lam_view.add_(grad_ys[i - 1])
            self.lam.stateIncrease()
        self.release_trajectory()
        self._pcache = None
        rhs.release_graph()
        rhs.stats.backward_seconds = _time.perf_counter() - start
        grad_p = self.mu_view.clone() if self.n_params else None
        return self.lam_view.clone(), grad_p

    def _seed_adjoint(self, lam):
        """lambda = dL/dy at the end of the span, mu = 0."""
        self.lam_view.copy_(lam)
        self.lam.stateIncrease()
        if self.n_params:
            self.mu_view.zero_()
            self.mu.stateIncrease()

    def _adjoint_segment(self, nsteps):
        ts = self.ts
        ts.adjointSetSteps(nsteps)
        self._run(ts.adjointSolve, phase="backward")
        if not self._finite(self.lam_view, self.lam):
            raise NonFiniteError(f"NaN or Inf in the adjoint ({self._nonfinite_where(self.lam_view)})",
                                 phase="backward",
                                 time=self.rhs.user_time(ts.getTime()), step=ts.getStepNumber(),
                                 hint="the loss gradient or the Jacobian of func overflows")

    def _run(self, call, *args, phase):
        # petsc4py's own error handler keeps PETSc's message in the exception (the
        # "traceback" handler prints it to stderr instead, once per failed call).
        PETSc.Sys.pushErrorHandler("python")
        try:
            call(*args)
            return
        except PnodeError:
            raise
        except PETSc.Error as exc:
            error = exc
        finally:
            PETSc.Sys.popErrorHandler()
        # A Python exception raised in a callback (func, a shell, the post-step check)
        # comes back as PETSc.Error(PETSC_ERR_PYTHON) with the original as __cause__:
        # surface the original, not the error code.
        cause = error.__cause__
        while isinstance(cause, PETSc.Error):
            cause = cause.__cause__
        if cause is None:
            failure = self._failure(None, phase, self.ts.getConvergedReason(), error)
        else:
            error.__cause__ = None  # the cause no longer refers to the PETSc error (no cycle)
            if callable(getattr(cause, "locate", None)):  # RHSError: add where PETSc was
                cause.locate(step=self.ts.getStepNumber(), phase=phase)
            failure = cause
        # PETSc does not unwind after an error: the vectors a callback was given stay
        # read-locked and borrowed work vectors stay borrowed, so the next solve on this
        # TS would fail ("Object is in wrong state"). Start over with a fresh TS.
        try:
            self._recover()
        except Exception as exc:  # keep the original failure; this solver stays unusable
            if hasattr(failure, "add_note"):  # Python >= 3.11
                failure.add_note(f"pnode could not rebuild the PETSc solver after the failure: {exc!r}")
        if failure is cause:
            raise cause
        raise failure from error

    def _init_args(self):
        return self.config, self.n, self.n_params, self.parts, self.comm

    def _recover(self):
        self.ts.destroy()
        type(self).__init__(self, *self._init_args())

    def _failure(self, message, phase, reason, error=None):
        """A SolverError (NonFiniteError for NaN/Inf) saying where PETSc stopped and why."""
        ts = self.ts
        hints = {
            "DIVERGED_STEP_REJECTED": "too many rejected steps in a row (the step size shrank without "
                                      "passing the error test): loosen rtol/atol, set options['first_step'] "
                                      "or raise options['max_rejections']; a stiff func needs an implicit "
                                      "method (beuler, cn, arkimex)",
            "DIVERGED_NONLINEAR_SOLVE": "Newton failed: reduce options['step_size'] (fixed steps), or pass "
                                        "SNES options such as petsc_options={'snes_max_it': 200}; check that "
                                        "func is differentiable in y",
            "ADJOINT_DIVERGED_LINEAR_SOLVE": "the adjoint's transposed linear solves failed: pass "
                                             "petsc_options={'ksp_max_it': 2000} or another 'pc_type', or "
                                             "use options['jacobian']='dense' for small states",
        }
        name = _enum_name(PETSc.TS.ConvergedReason, reason)
        details = []
        if error is not None:
            said = petsc_message(error)
            if said and self.config.fixed:   # PETSc's advice, which pnode refuses for fixed steps
                said = said.replace(", increase -ts_max_snes_failures or use unlimited to attempt recovery", "")
            details.append(f"PETSc error {error.ierr}" + (f": {said}" if said else ""))
        residual = None
        nonfinite = error is not None and error.ierr == 72  # PETSC_ERR_FP
        where = "the state" if phase == "forward" else "the adjoint"
        from_func = phase == "forward" and self._nonfinite_time is not None
        if from_func:
            # the attempts PETSc rejected met a NaN from func (see _watch_output)
            nonfinite = True
            where = f"func's output (at t={self.rhs.user_time(self._nonfinite_time):.6g}; {self._nonfinite_at})"
        if "implicit" in self.parts:
            snes = ts.getSNES()
            try:  # the adjoint runs transposed Krylov solves, no Newton: SNES is the forward's
                snes_reason = snes.getConvergedReason() if phase == "forward" else 0
                residual = snes.getFunctionNorm() if phase == "forward" else None
                ksp_reason = snes.getKSP().getConvergedReason()
            except PETSc.Error:
                snes_reason = ksp_reason = 0
            if snes_reason < 0:
                snes_name = _enum_name(PETSc.SNES.ConvergedReason, snes_reason)
                details.append(f"Newton (SNES) {snes_name} after {snes.getIterationNumber()} iterations")
                _, atol, stol, _ = snes.getTolerances()
                if snes_name == "DIVERGED_MAX_IT" and stol == 0 and atol <= 1e-14 and residual <= 1e3 * atol:
                    # Without the step test (off for line searches whose steps estimate no
                    # error) a residual at its rounding floor just above pnode's snes_atol never
                    # ends: more iterations do not help (VdP, l2 line search: 1.3-1.5e-14 for
                    # 200). A user's looser snes_atol is no rounding floor: not said there.
                    hints["DIVERGED_NONLINEAR_SOLVE"] = (
                        f"Newton's residual stalled at {residual:.3g}, just above snes_atol {atol:g}: its "
                        "rounding floor, where more iterations do not help (Newton's step test, which "
                        "ends such solves, is off for this nonlinear solver or line search). Raise "
                        f"snes_atol above it: petsc_options={{'snes_atol': {10 * residual:.0e}}}")
                if "NAN" in snes_name:
                    # PETSc keeps the last finite norm (0 before the first): not the residual that failed
                    nonfinite, residual = True, math.nan
                    where = "Newton's residual (func's output)" if where == "the state" else where
            if ksp_reason < 0:
                ksp_name = _enum_name(PETSc.KSP.ConvergedReason, ksp_reason)
                details.append(f"Krylov (KSP) {ksp_name} after {snes.getKSP().getIterationNumber()} iterations")
                if "NAN" in ksp_name and not nonfinite:
                    nonfinite = True
                    if phase == "forward":   # the state and func's output were finite
                        where = "Newton's linear solves (func's Jacobian, from its backward)"
                hints["DIVERGED_NONLINEAR_SOLVE"] = (
                    "the linear solves inside Newton failed: try options['jacobian']='dense' (small "
                    "states), or petsc_options={'ksp_max_it': 2000} / another 'pc_type'")
            if residual is not None and not math.isfinite(residual):
                nonfinite = True
            if from_func:
                # PETSc keeps the norm of the last residual it finished (2.2 was reported next
                # to a NaN from func): the failing one held func's NaN
                residual = math.nan
        hint = hints.get(name)
        cls = SolverError
        if nonfinite:
            cls = NonFiniteError
            hint = ("reduce the step size or rtol/atol, or check func for overflow" if phase == "forward"
                    else "the loss gradient or the Jacobian of func overflows")
            details.insert(0, f"NaN or Inf in {where}")
        if message:
            details.insert(0, message)
        return cls("; ".join(details) or "the solver stopped", phase=phase, time=self.rhs.user_time(ts.getTime()),
                   step=ts.getStepNumber(), step_size=self.rhs.user_step(ts.getTimeStep()), residual=residual,
                   reason=name if name not in ("ITERATING", "CONVERGED_ITERATING") else None, hint=hint)
