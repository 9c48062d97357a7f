"""The public entry points: ``odeint`` (torchdiffeq-compatible) and ``NeuralODE``."""

import weakref
from collections import OrderedDict

import torch
from torch import nn

from ._bridge import PnodeFunction, Run
from ._buffers import Buffers, buffer_owners
from ._errors import RHSError
from ._rhs import FlatLayout, autograd_edges
from ._options import check_devices, check_dtypes, check_no_transform, check_time, check_y0, make_config
from ._solver import Solver
from ._stats import Stats


def _parts(func, method):
    """Which functions PETSc calls: the explicit (RHSFunction) and/or implicit (IFunction) part."""
    if method.kind == "explicit":
        pair = {"explicit": func}
    elif method.kind == "implicit":
        pair = {"implicit": func}
    elif isinstance(func, (tuple, list)):
        if len(func) != 2:
            raise ValueError(f"an IMEX func is a pair (nonstiff, stiff), got {len(func)} items")
        pair = {"explicit": func[0], "implicit": func[1]}
    elif callable(getattr(func, "nonstiff", None)) and callable(getattr(func, "stiff", None)):
        pair = {"explicit": func.nonstiff, "implicit": func.stiff}
    else:  # no split given: ARKIMEX runs fully implicit
        pair = {"implicit": func}
    for name, f in pair.items():
        if not callable(f):
            raise TypeError(f"func ({name} part) must be callable as f(t, y), got {type(f).__name__}")
    return pair


def _modules(func):
    if isinstance(func, (tuple, list)):
        return [f for f in func if isinstance(f, nn.Module)]
    return [func] if isinstance(func, nn.Module) else []


def _listed(adjoint_params):
    """adjoint_params as a tuple; a bare tensor is refused, not iterated into its rows."""
    if isinstance(adjoint_params, torch.Tensor):
        # Its rows are views, none of them the tensor func uses: it got zeros, and a warning
        # that it was not listed.
        raise TypeError(f"adjoint_params must be a sequence of tensors, got one tensor of shape "
                        f"{tuple(adjoint_params.shape)}: pass (w,) for a single tensor w")
    return None if adjoint_params is None else tuple(adjoint_params)


def _forward_ad_level():
    """The innermost forward-mode AD level (-1 outside any): no_grad does not stop dual
    tensors, and a closure over one must not lose its tangent silently."""
    return getattr(torch.autograd.forward_ad, "_current_level", -1)


def _parameters(func, adjoint_params):
    adjoint_params = _listed(adjoint_params)
    if adjoint_params is None:
        modules = _modules(func)
        if not modules and not torch.is_grad_enabled() and _forward_ad_level() < 0:
            return []   # under torch.no_grad() nothing is differentiated: nothing to find
        if not modules:
            raise ValueError("func is not an nn.Module, so pnode cannot find its parameters: pass "
                             "adjoint_params=(tensors to differentiate), or adjoint_params=() if none")
        adjoint_params = [p for m in modules for p in m.parameters()]
    params, seen = [], set()
    for p in adjoint_params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"adjoint_params must hold tensors, got {type(p).__name__}")
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    _check_not_derived(params)
    return params


def _check_not_derived(params):
    """Refuse a listed tensor computed from another listed tensor.

    pnode differentiates every listed tensor directly through f, and autograd then
    carries the gradient of a listed non-leaf (``c = encoder(x)``) on into its
    history: listing the encoder's parameters as well counted their gradient twice.
    """
    index = {id(p): i for i, p in enumerate(params)}
    # A non-leaf is an output of its grad_fn: the edge (grad_fn, output_nr). Siblings such
    # as mu, logvar = h.chunk(2) share the node, not the edge.
    edges = {(p.grad_fn, p.output_nr): i for i, p in enumerate(params) if p.grad_fn is not None}
    seen = set()   # shared: below a node already walked there is no listed tensor
    for i, p in enumerate(params):
        if p.grad_fn is None:
            continue
        for node, output in autograd_edges(p.grad_fn.next_functions, seen=seen):
            j = edges.get((node, output), index.get(id(getattr(node, "variable", None))))
            if j is not None:
                raise ValueError(
                    f"adjoint_params[{i}] (shape {tuple(p.shape)}) is computed from adjoint_params[{j}] "
                    f"(shape {tuple(params[j].shape)}): its gradient would reach adjoint_params[{j}] twice, "
                    "once through f directly and once back through the computation. List the tensors f "
                    "uses (a context vector), or the leaves they come from, not both")


class _SolverCache:
    """Solvers keyed by what their PETSc objects depend on, so calls reuse them."""

    # Each solver holds a TS, its Vecs and Mats and its last trajectory, and one serves a
    # single len(t): series of many lengths would keep gigabytes. The least recently used
    # go; a Run keeps its own solver, so a pending backward survives its eviction.
    size = 8

    def __init__(self):
        self.solvers = OrderedDict()

    # A copied or pickled module (an EMA copy, torch.save(model)) starts with no solvers and
    # builds its own: PETSc objects cannot be copied or pickled.
    def __deepcopy__(self, memo):
        return _SolverCache()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    @staticmethod
    def _build(config, n, n_params, parts, grid):
        return Solver(config, n, n_params, parts) if grid is None else grid._make_solver(config, n_params, parts)

    def get(self, config, n, n_params, parts, n_times=None, grid=None):
        # PETSc 3.26's TSSetEvaluationTimes frees its arrays and writes into NULL when
        # the number of times changes, so a TS serves one len(t) only.
        key = (config.solver_key(), n, n_params, parts, n_times, grid)
        solver = self.solvers.get(key)
        if solver is not None and solver.busy:
            # Solving further up this thread's stack (func calls its own module) or in another
            # thread: a solver of this call's own, not cached.
            return self._build(config, n, n_params, parts, grid)
        if solver is None or solver.broken:
            solver = self.solvers[key] = self._build(config, n, n_params, parts, grid)
        self.solvers.move_to_end(key)
        if len(self.solvers) > self.size:
            self.solvers.popitem(last=False)
        solver.config = config
        return solver


# odeint(func, ...) keeps its PETSc objects alive as long as func lives.
_caches = weakref.WeakKeyDictionary()


def _cache_for(func):
    try:
        return _caches.setdefault(func, _SolverCache())
    except TypeError:  # func cannot be weakly referenced: no reuse across calls
        return _SolverCache()


class _Packed:
    """A tuple state as one flat tensor, the way torchdiffeq integrates ``y0=(a, b, ...)``.

    func keeps seeing (and returning) the tuple; PETSc sees the concatenation, so every
    method and Jacobian choice applies (a 1-D state: 'dense' or 'matrix-free').
    """

    def __init__(self, y0):
        for i, y in enumerate(y0):
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"y0[{i}] must be a torch.Tensor, got {type(y).__name__}")
        if len({y.device for y in y0}) > 1:
            raise ValueError(f"the tensors of a tuple y0 must be on one device, got {[str(y.device) for y in y0]}")
        # Mixed dtypes are promoted by the concatenation, as in torchdiffeq: func then sees
        # and returns every member in the promoted dtype.
        self.shapes = [y.shape for y in y0]
        self.sizes = [y.numel() for y in y0]

    def pack(self, ys):
        return torch.cat([y.reshape(-1) for y in ys])

    def unpack(self, flat):
        """A (..., n) tensor as a tuple shaped like y0, with the leading dimensions kept.

        Sliced rather than split: split's outputs are views autograd forbids editing in
        place, and torchdiffeq's tuple outputs can be edited.
        """
        lead, parts, start = flat.shape[:-1], [], 0
        for size, shape in zip(self.sizes, self.shapes):
            parts.append(flat[..., start:start + size].reshape((*lead, *shape)))
            start += size
        return tuple(parts)

    def wrap(self, f):
        def packed(t, y):
            out = f(t, self.unpack(y))
            if not isinstance(out, (tuple, list)) or len(out) != len(self.shapes):
                raise TypeError(f"func must return a tuple of {len(self.shapes)} tensors for a tuple y0, "
                                f"got {type(out).__name__}")
            self._check_members(out, y)
            return self.pack(out)
        # where the unlisted-tensor check finds func's own modules (a module, or a bound method's)
        packed.__self__ = getattr(f, "__self__", f)
        return packed

    def _check_members(self, out, y):
        # Checked one by one: the packed check compares total sizes only, so members returned
        # in another order or shape integrated another ODE, and a float32 member was cast.
        for i, (o, shape) in enumerate(zip(out, self.shapes)):
            if not isinstance(o, torch.Tensor) or o.shape != shape or o.dtype != y.dtype or o.device != y.device:
                got = f"shape {tuple(o.shape)}, dtype {o.dtype}, device {o.device}" \
                    if isinstance(o, torch.Tensor) else type(o).__name__
                raise TypeError(f"func's output [{i}] is {got}; dy/dt of y0[{i}] must have its shape "
                                f"{tuple(shape)} and the state's dtype {y.dtype} and device {y.device}")

    def wrap_func(self, func, method):
        # The split as _parts reads it, so a pair given to a method without one is refused
        # here as it is for a tensor y0 (it failed at the first call, as "'tuple' object is not
        # callable").
        parts = _parts(func, method)
        if len(parts) == 2:
            return self.wrap(parts["explicit"]), self.wrap(parts["implicit"])
        return self.wrap(next(iter(parts.values())))


def _validate(func, y0, t, adjoint_params, grid):
    """Check a call's arguments: (parameters, times, y0 as one tensor, its _Packed or None)."""
    check_no_transform(y0 if isinstance(y0, tuple) else (y0,),
                       lambda: [p for m in _modules(func) for p in m.parameters()] if adjoint_params is None
                       else adjoint_params)
    params = _parameters(func, adjoint_params)
    packed = None
    if isinstance(y0, tuple):
        if grid is not None:
            raise TypeError("a tuple y0 cannot be spread over a pnode.Grid; pass the field as one tensor")
        packed = _Packed(y0)
        y0 = packed.pack(y0)
    check_y0(y0)
    check_devices(y0, params)
    times = check_time(t, y0)
    if grid is not None:
        grid._check_block(y0)
    return params, times, y0, packed


def _integrate(cache, func, y0, t, config, adjoint_params, stats, grid):
    """odeint and NeuralODE: check the arguments, find the parameters, pack a tuple state, solve."""
    if torch.is_inference_mode_enabled():
        # Tensors made in inference mode cannot be updated outside it: the solver's cached
        # views of its Vecs would fail every later call. Nor can autograd run in it, which
        # Newton's Jacobians need. The outputs are then ordinary tensors.
        with torch.inference_mode(False), torch.no_grad():
            return _integrate(cache, func, y0, t, config, adjoint_params, stats, grid)
    check = lambda: _validate(func, y0, t, adjoint_params, grid)   # noqa: E731
    # On a Grid one verdict for all ranks: a rank that raised alone left the others to pair
    # their solve with its next call (Grid._check_state then compares what must agree).
    params, times, flat, packed = check() if grid is None else grid._agree(check)
    # Parameters taken from func's modules are looked up again by a backward that evaluates func.
    current = (lambda: _parameters(func, None)) if adjoint_params is None else None
    buffers = Buffers(buffer_owners(func))
    if packed is None:
        return _solve(cache, func, flat, times, config, params, buffers, current, stats, grid)
    return packed.unpack(_solve(cache, packed.wrap_func(func, config.method), flat, times, config, params,
                                buffers, current, stats, None))


def _solve(cache, func, y0, times, config, params, buffers, current_params, stats, grid):
    if grid is not None:   # func's frozen parameters must agree too (buffers may not: BatchNorm statistics)
        listed = {id(p) for p in params}
        grid._check_state(times, config, params, [p for m in buffers.roots for p in m.parameters()
                                                  if id(p) not in listed])
    config = config.for_state(y0, grid)
    parts = _parts(func, config.method)
    solver = cache.get(config, y0.numel(), sum(p.numel() for p in params), tuple(sorted(parts)),
                       len(times), grid)
    layout = FlatLayout(y0.shape) if grid is None else grid.layout
    run = Run(cache, solver, parts, params, y0, times, config, stats, layout, grid, current_params, buffers)
    try:
        if torch.is_grad_enabled() and (y0.requires_grad or params):
            return PnodeFunction.apply(run, y0, *params)
        return run.forward(y0, need_grad=False)
    except RHSError as exc:
        if stats.rhs_evals <= 1:   # func failed at its first call: y0 may not mix with the parameters
            check_dtypes(y0, params, exc)
        raise


# torchdiffeq keywords that have no meaning for a discrete adjoint, with what to do instead.
_TORCHDIFFEQ_ONLY = {
    "adjoint_rtol": "pnode's discrete adjoint runs back over the forward's own steps, with no tolerances of "
                    "its own: drop it",
    "adjoint_atol": "pnode's discrete adjoint runs back over the forward's own steps, with no tolerances of "
                    "its own: drop it",
    "adjoint_method": "the adjoint of pnode's forward method is that method's discrete adjoint: drop it",
    "adjoint_options": "the adjoint takes the forward's steps: drop it (options= sets the forward's)",
    "event_fn": "pnode has no event handling: integrate to a fixed t and locate the event afterwards",
}


def _refuse_unknown(kwargs):
    for key in kwargs:
        if key in _TORCHDIFFEQ_ONLY:
            raise TypeError(f"odeint got torchdiffeq's {key}=: {_TORCHDIFFEQ_ONLY[key]}")
        raise TypeError(f"odeint got an unexpected keyword argument {key!r}")


def _make_config(grid, *args):
    # On a Grid every rank passes its own arguments: one rank's bad option raised there alone.
    return make_config(*args) if grid is None else grid._agree(lambda: make_config(*args))


def odeint(func, y0, t, *, method="dopri5", rtol=1e-7, atol=1e-9, options=None,
           adjoint_params=None, petsc_options=None, grid=None, return_stats=False, **kwargs):
    """Solve dy/dt = func(t, y) from y(t[0]) = y0 and return y at every time in ``t``.

    A drop-in for ``torchdiffeq.odeint`` / ``odeint_adjoint``: returns a tensor of
    shape ``(len(t), *y0.shape)``; gradients w.r.t. ``y0`` and the parameters come
    from PETSc's discrete adjoint and are the exact derivative of the computed
    discrete solution.

    Args:
        func: ``nn.Module`` or callable ``f(t, y)`` returning dy/dt shaped like ``y``. For
            IMEX methods (``arkimex*``): a pair ``(nonstiff, stiff)`` or an object with
            ``nonstiff(t, y)`` and ``stiff(t, y)`` methods; a single func runs fully implicit.
        y0: initial state, any shape, float32 or float64; or a tuple of such tensors (then
            func takes and returns tuples, and so does odeint), as in torchdiffeq.
        t: 1-D tensor of strictly increasing or strictly decreasing output times.
        method: one of ``pnode.METHODS`` (for example ``"dopri5"``, ``"rk4"``, ``"beuler"``);
            None is ``"dopri5"``, as in torchdiffeq.
        rtol, atol: tolerances of adaptive methods.
        options: ``step_size``, ``first_step``, ``max_num_steps``, ``max_rejections``,
            ``memory`` (``"graphs"``: keep each stage's autograd graph, fastest;
            ``"states"``: keep states only and recompute f in the backward), ``theta``,
            ``jacobian`` (implicit methods: ``"blockdiag"``, ``"dense"``, ``"matrix-free"``, and
            ``"colored"`` on a Grid),
            ``checkpoints`` (keep at most k states and recompute by the binomial schedule).
        adjoint_params: tensors to differentiate when ``func`` is not an ``nn.Module``.
        petsc_options: expert PETSc options for this solve, e.g. ``{"ts_adapt_type": "dsp"}``.
        grid: a :class:`pnode.Grid` to spread one state over MPI ranks: ``y0`` is then this
            rank's block of the field (``grid.owned_shape``), ``func(t, u)`` gets that block
            with ghost points (``grid.ghosted_shape``) and returns the block's dy/dt, and
            every rank gets the full parameter gradient (summed over ranks once per backward).
        return_stats: also return a :class:`pnode.Stats` (filled in by backward too).
    """
    _refuse_unknown(kwargs)
    config = _make_config(grid, method, rtol, atol, options, petsc_options)
    stats = Stats()
    ys = _integrate(_cache_for(func), func, y0, t, config, adjoint_params, stats, grid)
    return (ys, stats) if return_stats else ys


odeint_adjoint = odeint


class NeuralODE(nn.Module):
    """``nn.Module`` wrapper that builds the PETSc TS, Vecs and Mats once and reuses them.

    ``NeuralODE(func, method="dopri5", ...)(y0, t)`` returns ``odeint(func, y0, t, ...)``;
    ``.stats`` describes the last call (and its backward).
    """

    def __init__(self, func, method="dopri5", rtol=1e-7, atol=1e-9, options=None,
                 petsc_options=None, grid=None, adjoint_params=None):
        super().__init__()
        self.func = func
        if isinstance(func, (tuple, list)):
            # nn.Module registers a module, not a tuple of them: an IMEX pair's weights were
            # missing from parameters(), state_dict(), eval() and .to() of this wrapper.
            self.pair = nn.ModuleList(_modules(func))
        self.grid = grid
        self.config = _make_config(grid, method, rtol, atol, options, petsc_options)
        self.adjoint_params = _listed(adjoint_params)
        _parameters(func, self.adjoint_params)   # a plain callable without adjoint_params fails here (grad mode)
        self.stats = Stats()
        self._cache = _SolverCache()

    def forward(self, y0, t):
        return _integrate(self._cache, self.func, y0, t, self.config, self.adjoint_params, self.stats, self.grid)

    def extra_repr(self):
        c = self.config
        return f"method={c.method.name!r}, rtol={c.rtol}, atol={c.atol}, memory={c.memory!r}"
