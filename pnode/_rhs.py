"""The user's right-hand side as PETSc sees it: flat vectors in, flat vectors out.

PETSc integrates ``dy/ds = scale * f(t_0 + scale * s, y)`` on flat vectors in its
precision, from s = 0 to at most 1; a negative ``scale`` turns a decreasing user time
grid into an increasing one (see :class:`pnode._bridge.Run`). A problem has one or two
*parts*: ``"explicit"`` (PETSc's RHSFunction) and ``"implicit"`` (posed as the IFunction
``ydot - f``); IMEX methods use both. This module owns every call of the user's functions: evaluations,
vector-Jacobian products (VJPs) for the adjoint, Jacobian-vector products
(JVPs) for Newton-Krylov, and Jacobian blocks for preconditioners.

Memory modes. With a :class:`Tape` (``memory="graphs"``) every evaluation of
the forward solve keeps its autograd graph, so the backward runs VJPs only (and
Newton's Jacobians in the forward reuse the residual's graph); a graph is found
again by step, part, stage time and stage vector, and accepted only if the input
f saw then equals exactly what f would see at PETSc's state now. Without
a tape (``memory="states"``) PETSc's trajectory stores the stage states and each
VJP re-evaluates ``f`` with grad at that state (the last such graph is reused
while PETSc stays at one point, as in a transposed Krylov solve). Either way the
VJP is taken at exactly the state PETSc hands over, so both modes give the same
gradient.
"""

import threading
import warnings

import torch
from torch.nn.utils import parametrize

from ._buffers import buffer_owners
from ._errors import RHSError, caller_level
from ._petsc import EPS as PETSC_EPS

try:
    from torch.autograd.graph import _engine_run_backward
except ImportError:  # a torch without it: the public path, ~13 us slower per VJP
    _engine_run_backward = None
_foreach_copy = getattr(torch, "_foreach_copy_", None)  # torch >= 2.1


def _vjp(out, inputs, w):
    """``torch.autograd.grad(out, inputs, w, retain_graph=True, allow_unused=True)``.

    Without the argument normalisation and checks of torch.autograd.grad's Python
    layer (measured 13 us per call, a fifth of a tiny model's whole VJP): pnode has
    already checked that ``w`` matches ``out`` in shape, dtype and device
    (:meth:`RHS._call`), and the engine call below is what that layer ends in.
    """
    if _engine_run_backward is None:
        return torch.autograd.grad(out, inputs, w, retain_graph=True, allow_unused=True)
    return _engine_run_backward((out,), (w,), True, False, tuple(inputs), True, accumulate_grad=False)


def _with_graph(out, y_in):
    """f's output, on a graph from ``y_in`` even when f ignores y and every parameter.

    dy/dt = g(t) is a valid ODE; its VJPs, JVPs and Jacobian blocks are zero, but
    autograd refuses to differentiate a tensor with no graph at all.
    """
    return out if out.requires_grad else out + 0 * y_in.sum()


def autograd_edges(roots, skip=frozenset(), seen=None):
    """Every autograd edge ``(node, output index)`` reachable from ``roots``, depth first.

    Each edge reached is yielded, but a node's inputs are followed only once (``seen``,
    which walks may share) and never past an edge in ``skip``.
    """
    seen = set() if seen is None else seen
    stack = list(roots)
    while stack:
        edge = stack.pop()
        node = edge[0]
        if node is None or edge in skip:
            continue
        yield edge
        if node not in seen:
            seen.add(node)
            stack.extend(node.next_functions)


def _warn_unlisted_leaves(out, y_in, params, parts):
    """Warn when f's output depends on tensors that need a gradient pnode will not give them.

    torchdiffeq's backprop differentiates whatever f touches; an adjoint differentiates
    the parameters it was given: a learnable tensor kept outside func's modules, or an
    encoder's parameters reached through a context vector f closes over, would silently
    get no gradient. Parameters of func's own modules left out of ``adjoint_params`` on
    purpose are not reported.
    """
    own = {id(p) for module in buffer_owners(list(parts.values())) for p in module.parameters()}
    known = own | {id(y_in)} | {id(p) for p in params}
    # A listed non-leaf (a context vector, functional_call's tensors) gets its gradient from
    # pnode, and autograd carries it on into its history: that history is not missed.
    # Edges, not nodes: mu, logvar = h.chunk(2) share a node, and listing mu says nothing of logvar.
    listed = {(p.grad_fn, p.output_nr) for p in params if p.grad_fn is not None}
    unlisted = {}
    for node, _ in autograd_edges([(out.grad_fn, out.output_nr)], skip=listed):
        leaf = getattr(node, "variable", None)   # AccumulateGrad: a leaf that requires grad
        if leaf is not None and id(leaf) not in known:
            unlisted[id(leaf)] = tuple(leaf.shape)
    unlisted = list(unlisted.values())
    if unlisted:
        warnings.warn(f"func's output depends on {len(unlisted)} tensor(s) that require grad but are not "
                      f"parameters of func's modules nor in adjoint_params (shapes {unlisted}): pnode's "
                      "adjoint gives them no gradient. Make them nn.Parameters of func (or of a submodule), "
                      "or pass adjoint_params=(...) including them", stacklevel=caller_level())
    return bool(unlisted)


class LeafCheck:
    """Where one call looks for tensors func depends on that pnode will not differentiate.

    On two graphs, walked whole: the forward's first evaluation (at t0, given a graph for
    the purpose when the forward keeps none, and even when nothing is differentiated: a
    module's layers kept in a plain list have no registered parameters, and the backward
    failed with PyTorch's "does not require grad") and the first graph the backward or
    the end of the forward holds, near the end time. A tensor func uses only after t0
    then warns too (only the first was walked: its gradient was dropped silently, with
    the default memory mode); one used only in between goes unseen, as walking every
    stage's graph costs too much. One warning per call, however many pieces a
    checkpointed backward replays.
    """

    def __init__(self, params, parts):
        self.params = params
        self.parts = parts
        self.start = self.end = self.warned = False   # checked at t0 / near the end; warned
        self._last = None                             # (out, y_in) of the forward's latest graph

    def saw(self, out, y_in, in_backward):
        """One of the call's graphs: walked if it is the forward's or the backward's first."""
        if in_backward:
            if not self.end:
                self.end = True
                self._check(out, y_in)
        elif not self.start:
            self.start = True
            self._check(out, y_in)
        else:
            self._last = (out, y_in)

    def forward_done(self):
        """Walk the forward's last graph (then the backward need not)."""
        if self._last is not None:
            self.end = True
            self._check(*self._last)
            self._last = None

    def _check(self, out, y_in):
        if not self.warned:
            self.warned = _warn_unlisted_leaves(out, y_in, self.params, self.parts)


_local = threading.local()


def evaluating_func():
    """Whether this thread is inside one of pnode's calls of a user's func."""
    return getattr(_local, "evaluating", False)


def _evaluate(fn, t, y):
    """fn(t, y), marked as pnode's evaluation (:func:`evaluating_func`).

    In a ``torch.nn.utils.parametrize.cached()`` block the cache is emptied before and
    after: it keeps a parametrized weight (weight_norm, ...) from its first computation
    on, and an evaluation without grad (the starting-step estimate, ``memory="states"``)
    cached one with no history, so every later graph, the backward's included, gave the
    weight's parameters a zero gradient, silently. Each evaluation computes the weight
    afresh (and may reuse it within itself) and leaves none behind for the caller's code.
    Emptied, not switched off: the switch is a counter that other threads' blocks change.
    """
    outer = evaluating_func()
    cached = parametrize._cache_enabled
    _local.evaluating = True
    if cached:
        parametrize._cache.clear()
    try:
        return fn(t, y)
    finally:
        _local.evaluating = outer
        if cached:
            parametrize._cache.clear()


def _not_twice_differentiable(detail):
    return RHSError(
        f"func is not twice differentiable ({detail}), and Newton-Krylov's Jacobian-vector products "
        "differentiate a VJP of func (the 'blockdiag' and 'matrix-free' Jacobians, and a Grid's "
        "'colored' one). Use options['jacobian']='dense' (Jacobian rows from VJPs only; small states), "
        "or write func with twice-differentiable operations")


def _compiled_refusal(exc):
    """A torch.compile'd f refusing create_graph (aot_autograd has no double backward).

    Not a NotImplementedError (a subclass of RuntimeError): raised by the first
    differentiation, that means f has no derivative at all (torch.igamma in its first
    argument), and no Jacobian choice helps.
    """
    return not isinstance(exc, NotImplementedError) and "double backward" in str(exc)


def _check_twice_differentiable(g):
    """Raise if g = (df/dy)^T u silently lost terms that depend on u.

    A custom autograd.Function marked @once_differentiable leaves an Error node that
    autograd only trips over when it is reached; differentiating g with respect to u does
    not reach it, so its terms were dropped from J v and Newton ran with a wrong Jacobian.
    """
    if any(node.name() == "torch::autograd::Error" for node, _ in autograd_edges([(g.grad_fn, g.output_nr)])):
        raise _not_twice_differentiable("its graph holds a backward marked @once_differentiable")


class _Entry:
    __slots__ = ("part", "handle", "time", "step_size", "seen", "y_in", "out")

    def __init__(self, part, handle, time, step_size, seen, y_in, out):
        self.part = part
        self.handle = handle
        self.time = time
        self.step_size = step_size
        self.seen = seen    # flat: what decides a match (see RHS._seen)
        self.y_in = y_in
        self.out = out


def close_times(a, b, step_size=0.0):
    """Whether two of PETSc's times are one time computed two ways.

    PETSc computes a stage time in its own precision, t + c h forward and
    t + h (1 - c) backward: they differ by rounding, a few eps of the largest of
    |t| and |h|. No absolute floor: with steps of 1e-14 (femtoseconds in seconds), a
    floor of 1e-12 made every stage of a step "close", and a stage that left the state
    bitwise unchanged was differentiated at another stage's time.
    """
    return abs(a - b) <= 64 * PETSC_EPS * max(abs(a), abs(b), abs(step_size))


def _same_up_to_rounding(a, b):
    scale = float(a.abs().max())
    return bool((a - b).abs().max() <= 64 * torch.finfo(a.dtype).eps * max(scale, 1e-300))


class Tape:
    """Autograd graphs of the forward's evaluations, grouped by step index."""

    def __init__(self):
        self.steps = {}

    def record(self, step, part, handle, time, step_size, seen, y_in, out):
        entries = self.steps.setdefault(step, [])
        entry = _Entry(part, handle, time, step_size, seen, y_in, out)
        last = entries[-1] if entries else None
        if last is not None and last.handle == handle and last.part == part and last.time == time:
            # The previous Newton (or line-search) iterate of this stage solve: only the
            # last one can be the stage value. Only the immediately preceding entry: two
            # stages with equal c (ARKIMEX ars443 and 1bee have such pairs) solve on the same
            # work vector at the same time, and the first one's value must survive the second.
            entries[-1] = entry
        else:
            entries.append(entry)

    def lookup(self, step, part, handle, time, y):
        """The entry of this part, at this stage time, whose ``seen`` equals ``y``, else None.

        The time is checked too: f(t, y) depends on t, and an entry of a rejected step
        attempt can hold the same state at another time.
        """
        # The common case first: the stage vector the forward evaluated on, at this step.
        for e in self.steps.get(step, ()):
            if e.handle == handle and e.part == part and close_times(e.time, time, e.step_size) \
                    and torch.equal(e.seen, y):
                return e
        for s in (step, step - 1):
            for e in self.steps.get(s, ()):
                if e.part == part and close_times(e.time, time, e.step_size) and torch.equal(e.seen, y):
                    return e
        # First-same-as-last RK tableaus (dopri5, bosh3, ...) never evaluate stage 0:
        # the forward reused f at the previous step's last stage, whose state equals
        # y_n up to the summation order of VecMAXPY. Differentiating that evaluation
        # is differentiating what the forward computed.
        for e in self.steps.get(step - 1, ()):
            if e.part == part and close_times(e.time, time, e.step_size) and _same_up_to_rounding(e.seen, y):
                return e
        return None


class FlatLayout:
    """How the model sees PETSc's vectors: here, y0's shape over the same memory.

    A layout maps flat PETSc arrays to model tensors for f's input (``input``)
    and output (``output``) and back (``flat``). :class:`pnode.Grid` has another
    one, where f's input is a patch with ghost points and its output is not.
    """

    def __init__(self, shape):
        # A plain tuple: Tensor.view(torch.Size) costs 1.5 us more per call (symbolic-shape checks).
        self.shape = tuple(shape)     # of the state, as the user passes y0
        self.out_shape = self.shape   # of what f returns

    def input(self, flat):
        # unpacked: 0.5 us faster than view(tuple); a 0-d state is the one shape it cannot say
        return flat.view(*self.shape) if self.shape else flat.view(())

    output = input

    @staticmethod
    def flat(t):
        return t.reshape(-1)

    def to_flat(self, t, lead=0):
        """Tensors shaped (*lead dims, *shape) to (*lead dims, n) in PETSc's order."""
        return t.reshape(*t.shape[:lead], -1)

    def from_flat(self, flat, lead=0):
        return flat.reshape((*flat.shape[:lead], *self.shape))


class RHS:
    """One call's view of the user's functions: parameters, shapes, dtypes, counters."""

    def __init__(self, parts, params, layout, dtype, device, scale, origin, stats, tape=None, staging=None,
                 in_backward=False, leaves=None):
        self.parts = parts            # {"explicit": f} and/or {"implicit": f}
        self.params = params          # tensors that need a gradient
        self.layout = layout
        self.shape = layout.shape
        self.dtype = dtype            # the model's dtype (PETSc's may differ)
        self.device = device
        self.scale = scale            # dt/ds: a power of two, negative for a decreasing t
        self.origin = origin          # t_0: the user's time at s = 0
        self.stats = stats
        self.tape = tape
        self.staging = staging        # pnode._staging.Staging unless f runs on PETSc's memory as is
        self.in_backward = in_backward  # where a graph built at a point is counted (stats)
        self._graph = None            # ((part, point key), [y_in, out, u, g]) at PETSc's last point
        self._output_views = {}       # id(flat) -> (flat, layout.output(flat)), see output_view
        self.leaves = leaves          # the call's LeafCheck, or None (grad off at the call)
        self._second_order_checked = False
        # On a Grid over several ranks an exception must not leave PETSc on one rank only
        # (the others wait in a collective forever): see _failed.
        self.contain = False
        self.failure = None

    # -- evaluation -----------------------------------------------------------------
    def user_time(self, s):
        """The user's time at PETSc's time ``s``."""
        return self.origin + self.scale * s

    def user_step(self, h):
        """A PETSc step size in the user's time units."""
        return None if h is None else abs(self.scale) * h

    def _scaled(self, value):
        return value if self.scale == 1.0 else value * self.scale

    def _time(self, s):
        return torch.scalar_tensor(self.user_time(s), dtype=self.dtype, device=self.device)  # 1.3 us < torch.tensor

    def _model_input(self, y_flat, copy):
        if self.staging is not None:
            return self.layout.input(self.staging.to_model(y_flat, copy))
        return self.layout.input(y_flat.clone() if copy else y_flat)

    def output_view(self, flat):
        """``layout.output(flat)``, made once per call for each tensor.

        The adjoint passes the same few Vecs (and the staging buffer) again and
        again; reshaping them anew cost 1-3 us per VJP. The entry holds ``flat``,
        so its id cannot be reused while cached.
        """
        hit = self._output_views.get(id(flat))
        if hit is None:
            hit = self._output_views[id(flat)] = (flat, self.layout.output(flat))
        return hit[1]

    def _model_output(self, w_flat):
        """A cotangent of f's output, from PETSc's memory, in the model's dtype and device."""
        if self.staging is not None:
            return self.output_view(self.staging.to_model(w_flat, False))
        return self.output_view(w_flat)

    def _name(self, part):
        return "func" if len(self.parts) == 1 else f"func ({part} part)"

    def _failed(self, error, cause, nan):
        """Raise ``error`` (an RHSError, from ``cause``); under ``contain``, keep it and return ``nan()``.

        Contained (a Grid over several ranks), the failing rank goes on with NaN where
        the result would be: the step then fails on every rank together, because the
        solver's finiteness checks and PETSc's norms are collective, and the solver
        raises the kept error on every rank (GridSolver._run). Raised there, it had left
        the other ranks in a ghost exchange forever.
        """
        if not self.contain:
            try:
                raise error from cause
            finally:   # the traceback holds this frame: its locals would make a cycle through it
                error = cause = None
        error.__cause__ = cause
        if self.failure is None:
            self.failure = error
        return nan()

    def _nan_output(self, *lead):
        """What a contained failure returns in place of f's output (or of products shaped like it)."""
        return torch.full((*lead, *self.layout.out_shape), float("nan"), dtype=self.dtype, device=self.device)

    _IN_PLACE = ("writes y in place, which pnode's y does not allow: it is PETSc's state, or under autograd a "
                 "copy that the graph records. Write y = y * 2 rather than y.mul_(2) (or y *= 2), or clone y "
                 "first")

    def _call(self, part, s, y):
        # The solver adds the step and phase (RHSError.locate) when the error crosses PETSc.
        version = y._version
        try:
            out = _evaluate(self.parts[part], self._time(s), y)
        except Exception as exc:
            # Under a graph PyTorch refuses the write with words about a view made in no_grad mode
            hint = f"; if func {self._IN_PLACE}" if isinstance(exc, RuntimeError) and y.requires_grad and \
                ("inplace" in str(exc) or "in-place" in str(exc)) else ""
            return self._failed(RHSError(f"{self._name(part)} raised {type(exc).__name__}: {exc}{hint}",
                                         time=self.user_time(s)), exc, self._nan_output)
        if y._version != version:
            # Without a graph the write went through: into PETSc's stage (dopri5 was 7e-10 off)
            return self._failed(RHSError(f"{self._name(part)} {self._IN_PLACE}", time=self.user_time(s)), None,
                                self._nan_output)
        if not isinstance(out, torch.Tensor):
            return self._failed(RHSError(f"{self._name(part)} must return a torch.Tensor shaped like y, got "
                                         f"{type(out).__name__}", time=self.user_time(s)), None,
                                self._nan_output)
        expected = self.layout.out_shape
        if out.shape != expected or out.dtype != y.dtype or out.device != y.device:
            like = "must match y in all three" if expected == y.shape else \
                f"must have this rank's owned shape {tuple(expected)} and y's dtype and device"
            return self._failed(RHSError(
                f"{self._name(part)} returned shape {tuple(out.shape)}, dtype {out.dtype}, device {out.device} "
                f"for y of shape {tuple(y.shape)}, dtype {y.dtype}, device {y.device}; dy/dt {like}",
                time=self.user_time(s)), None, self._nan_output)
        return out

    def _derivative_failed(self, part, point, exc, nan):
        """An exception from differentiating f (its backward, or a double backward) as an RHSError."""
        try:
            if isinstance(exc, RHSError):
                return self._failed(exc.locate(time=self.user_time(point.time)), exc.__cause__, nan)
            return self._failed(RHSError(f"differentiating {self._name(part)} raised {type(exc).__name__}: {exc}",
                                         time=self.user_time(point.time)), exc, nan)
        finally:   # as in _failed
            exc = None

    def _call_with_grad(self, part, s, y_in):
        """f(t, y_in) on a graph from y_in, shown to the call's LeafCheck."""
        with torch.enable_grad():
            out = _with_graph(self._call(part, s, y_in), y_in)
        if self.leaves is not None:
            self.leaves.saw(out, y_in, self.in_backward)
        return out

    def _seen(self, y_flat):
        """(seen, f's input) for the tape: ``seen`` is what the backward's check compares.

        f's input is a private copy, and ``seen`` is normally its flat base: on the
        host, f's input is a deterministic function of the Vec (itself, or its cast),
        so the backward applies it again to PETSc's state and compares exactly
        (:meth:`_probe`). A float32 model then keeps no float64 copy of each stage
        (10 of 72.6 MB in the rk4 benchmark). On a device that comparison would
        synchronise every stage, so ``seen`` is there a host copy of the Vec.
        """
        if self.staging is None or self.staging.on_host:
            seen = y_flat.clone() if self.staging is None else self.staging.to_model(y_flat, copy=True)
            return seen, self.layout.input(seen)
        return y_flat.clone(), self._model_input(y_flat, copy=True)

    def _probe(self, y_flat):
        """PETSc's state as the tape's ``seen`` holds it (see :meth:`_seen`)."""
        if self.staging is not None and self.staging.on_host:
            return self.staging.to_model(y_flat, copy=False)
        return y_flat

    def count_evaluation(self):
        """One evaluation of f: the forward's (rhs_evals), or the backward's recomputation."""
        if self.in_backward:
            self.stats.recomputed_rhs += 1
        else:
            self.stats.rhs_evals += 1

    def value(self, part, s, y_flat):
        """f(t_0 + scale * s, y) without a graph, shaped like y (the initial-step heuristic uses it too)."""
        if self.leaves is not None and not self.leaves.start and not self.in_backward:
            return self._call_with_grad(part, s, self._model_input(y_flat, copy=True).requires_grad_()).detach()
        with torch.no_grad():
            return self._call(part, s, self._model_input(y_flat, copy=False))

    def evaluate(self, part, s, y_flat, out_flat, ts, u, step_size):
        """out = scale * f(t_0 + scale * s, y); with a tape, keep the graph for the backward.

        ``ts``, ``u`` and ``step_size`` (the TS, the input Vec, the attempted step) name the
        stage for the tape.
        """
        self.count_evaluation()
        if self.tape is None:
            out = self.value(part, s, y_flat)
        else:
            # A private copy: PETSc overwrites its stage vectors, the graph must not see that.
            seen, y_in = self._seen(y_flat)
            out = self._call_with_grad(part, s, y_in.requires_grad_())
            self.tape.record(ts.getStepNumber(), part, u.getId(), s, step_size, seen, y_in, out)
            out = out.detach()
        if self.staging is not None:
            self.staging.to_petsc(out, out_flat, self.scale)
        else:
            out_flat.copy_(self.layout.flat(out))
            if self.scale != 1.0:
                out_flat.mul_(self.scale)

    # -- derivatives ----------------------------------------------------------------
    def _point_graph(self, part, point, y_flat):
        """[y_in, out, u, g]: f's autograd graph at PETSc's point, made once per point.

        From the tape when the forward kept an evaluation at exactly this state:
        every stage of the backward, and in the forward every Newton Jacobian, which
        PETSc asks for at an iterate whose residual it has just evaluated. Else f
        is evaluated with grad here. Newton iterations, transposed Krylov solves
        and block extraction ask for many products at one point and share this
        graph; ``u`` and ``g`` are the double-VJP linearisation, made on the first JVP.
        """
        key = (part, point.key)
        if self._graph is not None and self._graph[0] == key:
            return self._graph[1]
        entry = self.tape.lookup(point.step, part, point.vec.getId(), point.time, self._probe(y_flat)) \
            if self.tape is not None else None
        if entry is not None:
            graph = [entry.y_in, entry.out, None, None]
        else:
            if self.in_backward:
                self.stats.recomputed_rhs += 1
            else:
                self.stats.linearisations += 1
            y_in = self._model_input(y_flat, copy=True).requires_grad_()
            graph = [y_in, self._call_with_grad(part, point.time, y_in), None, None]
        self._graph = (key, graph)
        return graph

    def vjp(self, part, point, y_flat, w_flat, want_params):
        """Return (w^T df/dy, [w^T df/dp_k]) at PETSc's point, in PETSc's time variable.

        One autograd call gives the state and parameter products together. The
        graph is retained: FSAL tableaus and Krylov solves differentiate it again,
        and it dies with the tape or when PETSc moves to another point.
        """
        self.stats.vjps += 1
        y_in, out = self._point_graph(part, point, y_flat)[:2]
        w = self._scaled(self._model_output(w_flat))
        inputs = (y_in, *self.params) if want_params else (y_in,)
        try:
            grads = _vjp(out, inputs, w)
        except Exception as exc:
            grads = self._derivative_failed(part, point, exc,
                                            lambda: [torch.full_like(x, float("nan")) for x in inputs])
        return grads[0], grads[1:]

    def release_graph(self):
        self._graph = None

    def _linearisation(self, part, point, y_flat):
        """(u, g = (df/dy)^T u) at PETSc's point, for Jacobian-vector products."""
        graph = self._point_graph(part, point, y_flat)
        if graph[2] is None:
            y_in, out = graph[0], graph[1]
            u = torch.zeros_like(out, requires_grad=True)
            with torch.enable_grad():
                try:
                    g, = torch.autograd.grad(out, y_in, u, create_graph=True, allow_unused=True)
                except RuntimeError as exc:
                    if _compiled_refusal(exc):
                        raise _not_twice_differentiable(f"torch: {exc}") from exc
                    raise
            if g is not None and not self._second_order_checked:
                self._second_order_checked = True   # once per call: the graph's ops do not change
                _check_twice_differentiable(g)
            graph[2], graph[3] = u, g
        return graph[2], graph[3]

    @staticmethod
    def _differentiate_vjp(g, u, v, batched):
        try:
            jv, = torch.autograd.grad(g, u, v, retain_graph=True, allow_unused=not batched,
                                      is_grads_batched=batched)
        except RuntimeError as exc:   # NotImplementedError: an op with no double backward (torch.cdist)
            if isinstance(exc, NotImplementedError) or _compiled_refusal(exc):
                raise _not_twice_differentiable(f"torch: {exc}") from exc
            raise
        return jv

    def jvp(self, part, point, y_flat, v_flat):
        """J v = scale * df/dy v at PETSc's point, by the double-VJP trick.

        g(u) = (df/dy)^T u is linear in u, so dg/du^T v = (df/dy) v: one reverse
        pass per product through a graph built once per point, several times
        cheaper here than forward-mode AD through torch.func.
        """
        try:
            u, g = self._linearisation(part, point, y_flat)
            # v only now: a float32 model takes both through the one staging buffer, and the
            # tape's probe of the state in _linearisation overwrote v there (J y, not J v: Newton
            # stalled or took 120 iterations for 27).
            v = self._model_input(v_flat, copy=False)
            jv = None
            if g is not None and g.requires_grad:
                jv = self._differentiate_vjp(g, u, v, batched=False)
        except Exception as exc:
            return self._derivative_failed(part, point, exc, self._nan_output)
        if jv is None:  # f does not depend on y
            jv = torch.zeros_like(u)
        return self._scaled(jv)

    def jvps(self, part, point, y_flat, directions):
        """J v for a batch of directions (k, *input shape) in one vmapped reverse pass."""
        try:
            u, g = self._linearisation(part, point, y_flat)
            if g is None or not g.requires_grad:
                return torch.zeros(len(directions), *u.shape, dtype=u.dtype, device=u.device)
            jv = self._differentiate_vjp(g, u, directions, batched=True)
        except Exception as exc:
            return self._derivative_failed(part, point, exc, lambda: self._nan_output(len(directions)))
        return self._scaled(jv)

    def _jacobian_row(self, part, point, out, y_in, cotangent):
        """(df/dy)^T cotangent, None where f ignores y: rows of the assembled Jacobians."""
        try:
            return torch.autograd.grad(out, y_in, cotangent, retain_graph=True, allow_unused=True)[0]
        except Exception as exc:
            return self._derivative_failed(part, point, exc, lambda: torch.full_like(y_in, float("nan")))

    def jacobian_blocks(self, part, point, y_flat):
        """Per-sample Jacobians scale * df_b/dy_b, shape (batch, d, d), for y of shape (batch, ...).

        Row i of every block comes from one VJP with the cotangent e_i in every
        sample, d VJPs in all. That is exact when f acts sample by sample (the
        batch dimension first) and any module works, no vmap needed; for an f that
        couples samples it is still a preconditioner, and the Krylov operator stays exact.
        """
        y_in, out = self._point_graph(part, point, y_flat)[:2]
        batch = self.shape[0]
        d = y_in[0].numel()
        rows = []
        for i in range(d):
            e = torch.zeros(batch, d, dtype=out.dtype, device=out.device)
            e[:, i] = 1.0
            g = self._jacobian_row(part, point, out, y_in, e.view(self.shape))
            rows.append(torch.zeros(batch, d, dtype=out.dtype, device=out.device) if g is None
                        else g.reshape(batch, d))
        blocks = torch.stack(rows, dim=1).to(device=y_flat.device, dtype=y_flat.dtype)
        return self._scaled(blocks)

    def dense_jacobian(self, part, point, y_flat):
        """The full Jacobian scale * df/dy, shape (n, n), for small states (one VJP per row)."""
        y_in, out = self._point_graph(part, point, y_flat)[:2]
        n = y_in.numel()
        eye = torch.eye(n, dtype=out.dtype, device=out.device).view(n, *self.shape)
        jac = torch.stack([g.reshape(-1) if g is not None else torch.zeros(n, dtype=out.dtype)
                           for g in (self._jacobian_row(part, point, out, y_in, eye[i]) for i in range(n))])
        jac = jac.to(device=y_flat.device, dtype=y_flat.dtype)
        return self._scaled(jac)

    @staticmethod
    def write_params(grads, out_views, scale=1.0):
        """out_views[k] = scale * grads[k] (cast to PETSc's dtype); zero where f ignores p_k."""
        if _foreach_copy is not None:
            # One dispatch for every parameter (2-3 us less per stage than a loop of copy_).
            # It rejects a None before writing; catching that is 3 us per stage cheaper
            # than scanning for one first (`None in grads` is worse: Tensor.__eq__).
            try:
                _foreach_copy(out_views, grads)
            except TypeError:
                pass
            else:
                if scale != 1.0:
                    torch._foreach_mul_(out_views, scale)
                return
        for view, g in zip(out_views, grads):
            if g is None:
                view.zero_()
            elif scale == 1.0:
                view.copy_(g)
            else:
                torch.mul(g.to(view.dtype), scale, out=view)
