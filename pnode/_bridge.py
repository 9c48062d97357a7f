"""The autograd bridge: a torch.autograd.Function whose backward is TSAdjoint.

Forward runs the PETSc TS under no_grad (or, with ``memory="graphs"``, keeping
each stage's autograd graph); backward runs PETSc's discrete adjoint through
the same steps, so the gradient is the exact derivative of the discrete
solution the forward computed (reverse-accurate), for ``y0`` and every
parameter.
"""

import contextlib
import math
import time as _time
import warnings
from dataclasses import replace

import torch

from ._checkpoint import Checkpointer
from ._errors import caller_level
from ._petsc import DTYPE as PETSC_DTYPE
from ._rhs import RHS, LeafCheck, Tape
from ._stats import Stats


def _autocast_off(device):
    """Switch off a caller's ``torch.autocast`` for func's evaluations: they run in y's dtype.

    The adjoint differentiates the forward's evaluations, and a backward that evaluates
    func again runs outside the caller's autocast region: func in bfloat16 in the forward
    and float32 in the backward is not one function. (func's bfloat16 output also failed
    the check that dy/dt has y's dtype.)
    """
    stack = contextlib.ExitStack()
    for kind in {device.type, "cpu"}:
        stack.enter_context(torch.autocast(kind, enabled=False))
    return stack


# Modules that draw random numbers in training mode (the _DropoutNd family, and RReLU's slopes).
_RANDOM_MODULES = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
                   torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout, torch.nn.RReLU)


@contextlib.contextmanager
def _random_draws_noted(roots, drawn):
    """Append to ``drawn`` the names of func's modules that draw random numbers in this block.

    Dropout and RReLU in training mode that func calls: a backward that evaluates func again
    draws other masks, and its gradient belongs to no function the forward evaluated (5% off,
    silently, with nn.Dropout(0.3)). Watched as called, not as present: the module behind a
    bound method may hold a Dropout only its other methods use. Functional dropout in func's
    code is not seen.
    """
    found = {m: name or type(root).__name__ for root in roots for name, m in root.named_modules()
             if m.training and isinstance(m, _RANDOM_MODULES) and getattr(m, "p", 1) > 0}

    def note(module, args):
        if found[module] not in drawn:
            drawn.append(found[module])
    handles = [m.register_forward_pre_hook(note) for m in found]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Run:
    """One call of odeint: the problem, its solver, and what backward needs."""

    def __init__(self, cache, solver, parts, params, y0, times, config, stats, layout, grid, current_params,
                 buffers):
        self.cache = cache
        self.solver = solver
        self.parts = parts
        self.params = params
        self.current_params = current_params  # func's parameters now, when they came from its modules
        self.buffers = buffers        # pnode._buffers.Buffers of func's modules
        self.layout = layout
        self.grid = grid              # pnode.Grid of a distributed state, else None
        self.dtype = y0.dtype
        self.device = y0.device
        # PETSc's time is s = (t - t_0) / scale: increasing, from 0 and at most 1, because PETSc
        # decides that a step reached an output time to within 1e-6 h *relative to |s|*: around
        # t = 1e6 that was a whole step (outputs taken a step early, or a solve refused). scale
        # is the span rounded up to a power of two, with the sign of the direction, so that
        # f * scale, h / scale and t_0 + scale * s are exact: the steps are the same numbers.
        span = abs(times[-1] - times[0])
        self.scale = (1.0 if span <= 1 else 2.0 ** math.ceil(math.log2(span))) * (
            1.0 if times[-1] > times[0] else -1.0)
        timed = [k for k, _ in config.petsc_options if k in ("ts_adapt_dt_min", "ts_adapt_dt_max")]
        if timed and abs(self.scale) != 1.0:
            warnings.warn(f"petsc_options {timed} are step sizes in PETSc's time s = (t - t[0]) / {abs(self.scale):g} "
                          "for this t: divide them by that, or set options['first_step']/['step_size'], which "
                          "are in t's units", stacklevel=caller_level())
        self.origin = times[0]
        # In PETSc's precision: a single-precision PETSc lands on f32(s_i), and a float64
        # s_i just past it would ask for a last step below float32's resolution.
        self.times = torch.tensor([(s - self.origin) / self.scale for s in times], dtype=PETSC_DTYPE).tolist()
        self.config = config
        self.stats = stats
        self.y0 = None
        # Under no_grad nothing is differentiated and nothing is missed.
        self.leaves = LeafCheck(params, parts) if torch.is_grad_enabled() else None

    def _rhs(self, tape, in_backward, stats=None):
        return RHS(self.parts, self.params, self.layout, self.dtype, self.device, self.scale, self.origin,
                   self.stats if stats is None else stats, tape,
                   self.solver.staging(self.dtype, self.device), in_backward, self.leaves)

    def forward(self, y0, need_grad):
        """Integrate; with need_grad, keep what the backward needs."""
        # A copy: for a float64 CPU y0 this was a view, and a buffer refilled in place before
        # a backward that integrates again (memory="states", a second backward) started there.
        self.y0 = self.layout.to_flat(y0.detach()).to(dtype=PETSC_DTYPE, device="cpu", copy=True)
        checkpointed = need_grad and self.config.checkpoints is not None
        self.drawn = []   # func's modules that drew random numbers in this forward
        self.tape = Tape() if need_grad and self.config.memory == "graphs" and not checkpointed else None
        self.stats.method = self.config.method.name
        self.stats.memory = self.config.memory
        self.stats.rhs_evals = 0
        self.stats.jacobians = 0
        self.stats.linearisations = 0
        self.stats.reset_backward()
        with self.solver.held() as solver, self.buffers.forward(), _autocast_off(self.device), \
                _random_draws_noted(self.buffers.roots if need_grad else (), self.drawn):
            # Calls that differ only in tolerances share a solver: this call's are set now.
            solver.config = self.config
            # With a checkpoint budget the forward keeps no trajectory, only y0 and the steps.
            owner = self if need_grad and not checkpointed else None
            ys = solver.forward(self._rhs(self.tape, in_backward=False), self.y0, self.times, owner=owner)
            if self.leaves is not None:
                self.leaves.forward_done()
            if need_grad:
                self.recorded = solver.recorded_steps()
        if self.drawn and self._mode_evaluates_again:
            self._refuse_random_draws()
        return self.layout.from_flat(ys.to(dtype=self.dtype, device=self.device), lead=1)

    def _checkpointed_backward(self, g):
        start = _time.perf_counter()
        n, n_params = self.y0.numel(), sum(p.numel() for p in self.params)
        names = sorted(self.parts)
        advance = self.cache.get(replace(self.config, replay="advance"), n, n_params, tuple(names),
                                 grid=self.grid)
        tape = self.cache.get(replace(self.config, replay="tape"), n, n_params, tuple(names), grid=self.grid)
        memory_graphs = self.config.memory == "graphs"

        def make_rhs(for_tape):
            return self._rhs(Tape() if for_tape and memory_graphs else None, in_backward=True)
        times, sizes, outputs = self.recorded
        cp = Checkpointer(advance, tape, make_rhs, self.config.checkpoints, times, sizes, outputs,
                          self.stats)
        with advance.held(), tape.held():
            grad_y0, grad_p = cp.backward(self.y0, g, n_params)
        self.stats.backward_seconds = _time.perf_counter() - start
        return grad_y0, grad_p

    @property
    def _mode_evaluates_again(self):
        """Whether the memory option itself makes every backward evaluate func again."""
        return self.config.checkpoints is not None or self.config.memory != "graphs"

    def _refuse_random_draws(self):
        if self._mode_evaluates_again:
            fix = ("Use memory='graphs' (the default) without checkpoints, which keeps the forward's "
                   "evaluations, or put those modules in eval mode")
        else:
            fix = ("Call backward once per forward, before another call of func, or put those modules in "
                   "eval mode (for the whole forward and backward)")
        raise ValueError(f"func's modules {self.drawn} drew random numbers in the forward (training mode), and "
                         f"{self._evaluates_again()}, with other random numbers: the gradient would not be the "
                         f"forward's. {fix}")

    def _evaluates_again(self):
        """Why the backward evaluates func again, as the end of a sentence."""
        if self.config.checkpoints is not None:
            cause = f"checkpoints={self.config.checkpoints}"
        elif self.config.memory != "graphs":
            cause = f"memory={self.config.memory!r}"
        else:
            cause = ("its forward is recomputed: a first backward used its trajectory, or another call's "
                     "forward came in between")
        return f"the backward evaluates func again ({cause})"

    def _check_same_func(self):
        """Refuse to evaluate func again for the backward if it is made of other tensors now.

        In-place edits of a parameter are caught by autograd's version counter (they are
        saved for backward), those of a buffer by Buffers.changed; a replaced submodule or
        buffer, or a switched requires_grad, would make the re-evaluated f use the new
        tensors while the gradient goes to the old ones.
        """
        if self.drawn:
            self._refuse_random_draws()
        again = self._evaluates_again()
        # A superset is fine (parameters unfrozen since): the backward differentiates its own list.
        if self.current_params is not None and \
                not {id(p) for p in self.params} <= {id(p) for p in self.current_params()}:
            what, how = "parameters", ("a submodule was replaced, a parameter frozen, or the forward ran on "
                                       "swapped-in tensors, as in torch.func.functional_call: use memory='graphs' "
                                       "without checkpoints there, and one backward per forward")
        else:
            what, how = "modules", self.buffers.changed()
        if how is not None:
            raise RuntimeError(f"func's {what} changed between this call's forward and its backward ({how}): "
                               f"{again} and would differentiate another func than the forward's. Call backward "
                               "before changing func")
        read_back = self.buffers.read_back()
        if read_back:
            raise RuntimeError(
                f"func's forward wrote buffers its output may depend on ({', '.join(read_back)}; "
                f"spectral_norm's power iteration, say), and {again} on their values after the forward, not "
                "those each evaluation saw: its gradient would not be the forward's. Use memory='graphs' (the "
                "default) without checkpoints, call backward before calling the module again, or put the "
                "module in eval mode")

    def backward(self, grad_ys):
        g = self.layout.to_flat(grad_ys.detach(), lead=1).to(dtype=PETSC_DTYPE, device="cpu")
        with _autocast_off(self.device):
            return self._backward(g)

    def _backward(self, g):
        if self.config.checkpoints is not None:
            self._check_same_func()
            with self.buffers.aside():
                return self._unflatten(*self._checkpointed_backward(g))
        with self.solver.held() as solver:   # from the ownership check to the adjoint's end
            recompute = solver.trajectory_owner is not self
            evaluates = self.config.memory != "graphs" or recompute
            if evaluates:
                self._check_same_func()
            with self.buffers.aside() if evaluates else contextlib.nullcontext():
                solver.config = self.config
                if recompute:
                    # Another forward overwrote the trajectory, or a first backward consumed it
                    # (retain_graph): recompute the forward so the adjoint sees this run's steps.
                    # Counted apart: the stats (a NeuralODE's are shared) keep describing the last forward.
                    scratch = Stats()
                    self.tape = Tape() if self.config.memory == "graphs" else None
                    # On the recorded steps: a TS another call left in another state (the step size
                    # PETSc's adaptor cached for an output time that call never reached) chose
                    # other steps, and the adjoint of those was 2% off this forward's gradient.
                    solver.forward(self._rhs(self.tape, in_backward=True, stats=scratch), self.y0, self.times,
                                   owner=self, sizes=self.recorded[1])
                    self.stats.recomputed_steps += scratch.steps
                    self.stats.recomputed_rhs += scratch.recomputed_rhs
                    self.stats.jacobians += scratch.jacobians
                try:
                    grad_y0, grad_p = solver.backward(self._rhs(self.tape, in_backward=True), g)
                finally:
                    self.tape = None
        return self._unflatten(grad_y0, grad_p)

    def _unflatten(self, grad_y0, grad_p):
        if self.grid is not None and grad_p is not None:
            # Each rank's adjoint holds its own part of dL/dp; one allreduce per backward.
            grad_p = self.grid._allreduce(grad_p)
        grad_y0 = self.layout.from_flat(grad_y0.to(dtype=self.dtype, device=self.device))
        grads = []
        offset = 0
        for p in self.params:
            n = p.numel()
            grads.append(grad_p[offset:offset + n].to(dtype=p.dtype, device=p.device).view_as(p))
            offset += n
        return grad_y0, grads


_SECOND_ORDER = (
    "pnode's gradients are first order: differentiating them again (a gradient penalty, a Hessian-vector "
    "product, gradgradcheck, create_graph=True followed by another backward) would need PETSc's "
    "second-order adjoint, which pnode does not wire in. For second derivatives use torchdiffeq.odeint "
    "(backpropagation through the solver), or finite differences of pnode's gradient")


def _is_batched(grad):
    # torch.autograd.grad(is_grads_batched=True) vmaps the backward with the legacy batching,
    # whose tensors look plain to every other check (and failed in Run.backward's detach).
    functorch = torch._C._functorch
    legacy = getattr(functorch, "is_legacy_batchedtensor", None)
    return functorch.is_functorch_wrapped_tensor(grad) or (legacy is not None and legacy(grad))


class _FirstOrderOnly(torch.autograd.Function):
    """Pass pnode's gradients on, tied to everything they depend on, with a backward that raises.

    PyTorch's @once_differentiable ties its error node to the incoming gradient only:
    when that needs no grad (any loss linear in ys) or when one differentiates with
    respect to y0 or a parameter, the error was never reached and pnode's share of a
    second derivative was silently zero.
    """

    @staticmethod
    def forward(ctx, n, *tensors):
        return tensors[:n]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_SECOND_ORDER)


@contextlib.contextmanager
def _hooks_suspended(params):
    """Hold back the parameters' gradient hooks (and a non-leaf's retained .grad) meanwhile.

    Each stage's VJP captures the parameters' gradients, and autograd runs a tensor's hooks
    on every capture: a hook that scales, clips or logs a gradient acted once per stage and
    then once more on PETSc's sum (``g * 3`` gave 9x over 20 steps, a retained .grad 81x
    over 80 stages). Suspended, the hooks run once, on the total, as in backprop. (Another
    thread's backward through the same tensors meanwhile would find them suspended too.)
    """
    saved = []
    for p in params:
        hooks = p._backward_hooks
        # The hook object autograd calls reads this dict: emptied, it calls nothing.
        items = list(hooks.items()) if hooks else []
        if items:
            hooks.clear()
        saved.append((p, items, p.grad if p.retains_grad else None))
    try:
        yield
    finally:
        for p, items, grad in saved:
            if items:
                p._backward_hooks.update(items)
            if p.retains_grad:
                p.grad = grad


class PnodeFunction(torch.autograd.Function):
    """ys = ODESolve(y0, params); backward by PETSc TSAdjoint."""

    @staticmethod
    def forward(ctx, run, y0, *params):
        ctx.run = run
        ctx.y0 = y0   # not saved: only what a second differentiation would depend on (see backward)
        ys = run.forward(y0, need_grad=True)
        if ys._base is not None:
            # A view (of the stacked outputs, reshaped): autograd forbids editing in place a
            # view a Function returns (ys[0] = 0 raised), which torchdiffeq's outputs allow.
            ys = ys.clone()
        # Saved only for autograd's checks: a second backward without retain_graph gets
        # PyTorch's usual error (saved tensors are freed after the first one), and so does a
        # backward after a parameter was edited in place (an optimizer step between two
        # backwards): a backward that evaluates f again would use the edited values. Not y0,
        # which the run keeps a copy of (torchdiffeq's adjoint lets an input buffer be
        # refilled), nor ys: saving it would make an in-place edit of the outputs fail the
        # backward.
        ctx.save_for_backward(ys.new_empty(0), *params)
        return ys

    @staticmethod
    def backward(ctx, grad_ys):
        params = ctx.saved_tensors[1:1 + len(ctx.run.params)]   # raises on a second backward without retain_graph
        if _is_batched(grad_ys):
            raise RuntimeError("pnode's backward takes one gradient at a time, not a batch of them "
                               "(torch.autograd.grad(is_grads_batched=True), jacobian(vectorize=True), "
                               "gradcheck(check_batched_grad=True)): use vectorize=False, or a loop")
        create_graph = torch.is_grad_enabled()
        # A backward under inference_mode (PyTorch allows one) made the solver's cached views of
        # its Vecs inference tensors, and every later call of the module failed on them.
        with torch.inference_mode(False), torch.no_grad(), _hooks_suspended(ctx.run.params):
            grad_y0, grad_params = ctx.run.backward(grad_ys)
        grads = [grad_y0, *grad_params]
        if create_graph:
            depends = [x for x in (grad_ys, ctx.y0, *params) if x.requires_grad]
            if depends:
                grads = list(_FirstOrderOnly.apply(len(grads), *grads, *depends))
        return (None, *grads)
