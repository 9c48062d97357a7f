"""The user's right-hand side as PETSc sees it: flat vectors in, flat vectors out.

PETSc integrates ``dy/ds = sign * f(sign * s, y)`` on flat PETSc-precision
vectors; ``sign = -1`` turns a decreasing user time grid into an increasing
one. This module owns every call of the user's ``f``: plain evaluations,
vector-Jacobian products (VJPs) for the adjoint, and Jacobian-vector products
(JVPs) for Newton-Krylov.

Memory modes. With a :class:`Tape` (``memory="graphs"``) each stage evaluation
of the forward solve keeps its autograd graph, so the backward runs VJPs only
and never evaluates ``f`` again; the graph is found again by the step index and
the stage vector PETSc passes in, and confirmed by comparing the state bit for
bit. Without a tape (``memory="states"``) PETSc's trajectory stores the stage
states and every VJP re-evaluates ``f`` with grad at that state. Both give the
same gradient: the VJP is taken at exactly the state PETSc hands over.
"""

import torch

from ._errors import RHSError


class Tape:
    """Autograd graphs of the forward's stage evaluations, keyed by (step, stage Vec)."""

    __slots__ = ("entries", "by_step", "hits", "fsal_hits")

    def __init__(self):
        self.entries = {}
        self.by_step = {}
        self.hits = 0
        self.fsal_hits = 0

    def record(self, step, handle, t, y_ref, y_in, out):
        key = (step, handle)
        if key not in self.entries:
            self.by_step.setdefault(step, []).append(key)
        # A rejected step attempt is overwritten by the retry on the same stage vector.
        self.entries[key] = (t, y_ref, y_in, out)

    def lookup(self, step, handle, t, y):
        entry = self.entries.get((step, handle))
        if entry is not None and torch.equal(entry[1], y):
            self.hits += 1
            return entry
        # First-same-as-last tableaus (dopri5, bosh3, ...) never evaluate stage 0:
        # the forward reused f at the previous step's last stage, whose state equals
        # y_{n} up to the summation order of VecMAXPY. Differentiating that very
        # evaluation is what the forward actually computed.
        for key in self.by_step.get(step - 1, ()):
            t_e, y_e, y_in, out = self.entries[key]
            if abs(t_e - t) <= 1e-12 * max(1.0, abs(t)) and _same_up_to_rounding(y_e, y):
                self.fsal_hits += 1
                return self.entries[key]
        return None

    def clear(self):
        self.entries.clear()
        self.by_step.clear()


def _same_up_to_rounding(a, b):
    scale = float(a.abs().max()) if a.numel() else 0.0
    return bool((a - b).abs().max() <= 64 * torch.finfo(a.dtype).eps * max(scale, 1e-300))


class RHS:
    """One call's view of ``func``: parameters, shapes, dtypes, and counters."""

    def __init__(self, func, params, shape, dtype, device, sign, stats, tape=None):
        self.func = func
        self.params = params          # tensors that need a gradient
        self.shape = shape
        self.dtype = dtype            # the model's dtype (PETSc's may differ)
        self.device = device
        self.sign = sign
        self.stats = stats
        self.tape = tape
        self.n_params = sum(p.numel() for p in params)

    # -- evaluation -----------------------------------------------------------------
    def _time(self, s):
        return torch.tensor(self.sign * s, dtype=self.dtype, device=self.device)

    def _model_input(self, y_flat, copy):
        y = y_flat.to(device=self.device, dtype=self.dtype, copy=copy)
        return y.view(self.shape)

    def _call(self, s, y):
        try:
            out = self.func(self._time(s), y)
        except Exception as exc:
            raise RHSError(f"func raised {type(exc).__name__} at t={self.sign * s:.6g}: {exc}") from exc
        if not isinstance(out, torch.Tensor):
            raise RHSError(f"func must return a torch.Tensor, got {type(out).__name__}")
        if out.shape != y.shape or out.dtype != y.dtype or out.device != y.device:
            raise RHSError(
                f"func returned shape {tuple(out.shape)}, dtype {out.dtype}, device {out.device} "
                f"for y of shape {tuple(y.shape)}, dtype {y.dtype}, device {y.device}; "
                "dy/dt must match y in all three")
        return out

    def _store(self, value, out_flat):
        out_flat.copy_(value.reshape(-1))
        if self.sign < 0:
            out_flat.neg_()

    def value(self, s, y_flat):
        """f(sign * s, y) without a graph, shaped like y (the initial-step heuristic uses it too)."""
        with torch.no_grad():
            return self._call(s, self._model_input(y_flat, copy=False))

    def evaluate(self, s, y_flat, out_flat, ts, u):
        """out = sign * f(sign * s, y); with a tape, keep the graph for the backward.

        ``ts`` and ``u`` (the TS and the input Vec) name the stage for the tape.
        """
        self.stats.rhs_evals += 1
        if self.tape is None:
            out = self.value(s, y_flat)
        else:
            # A private copy: PETSc overwrites its stage vectors, the graph must not see that.
            y_in = self._model_input(y_flat, copy=True).requires_grad_()
            y_ref = y_in.detach().view(-1) if y_in.dtype == y_flat.dtype and y_in.device == y_flat.device \
                else y_flat.clone()
            with torch.enable_grad():
                out = self._call(s, y_in)
            self.tape.record(ts.getStepNumber(), u.getId(), s, y_ref, y_in, out)
            out = out.detach()
        self._store(out, out_flat)

    # -- derivatives ----------------------------------------------------------------
    def vjp(self, s, y_flat, w_flat, want_params, step=None, handle=None):
        """Return (w^T df/dy, [w^T df/dp_k]) at (s, y), both in PETSc's time variable.

        One autograd call gives the state and parameter products together.
        """
        self.stats.vjps += 1
        entry = self.tape.lookup(step, handle, s, y_flat) if self.tape is not None else None
        if entry is None:
            self.stats.recomputed_rhs += 1
            y_in = self._model_input(y_flat, copy=True).requires_grad_()
            with torch.enable_grad():
                out = self._call(s, y_in)
            retain = False
        else:
            _, _, y_in, out = entry
            # FSAL tableaus differentiate one graph twice; the tape is dropped after backward.
            retain = True
        w = self._model_input(w_flat, copy=False)
        if self.sign < 0:
            w = -w
        inputs = [y_in] + list(self.params) if want_params else [y_in]
        grads = torch.autograd.grad(out, inputs, w, retain_graph=retain, allow_unused=True)
        return grads[0], grads[1:]

    def jvp(self, s, y_flat, v_flat):
        """J v = sign * df/dy v at (s, y), by forward-mode AD."""
        y = self._model_input(y_flat, copy=False).detach()
        v = self._model_input(v_flat, copy=False)
        with torch.no_grad():
            _, jv = torch.func.jvp(lambda x: self._call(s, x), (y,), (v,))
        return -jv if self.sign < 0 else jv

    def write_grad(self, g, out_flat):
        if g is None:
            out_flat.zero_()
        else:
            out_flat.copy_(g.reshape(-1))

    @staticmethod
    def write_param_grads(grads, out_views):
        for view, g in zip(out_views, grads):
            if g is None:
                view.zero_()
            else:
                view.copy_(g)
