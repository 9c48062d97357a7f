"""Pure-PyTorch reference integrators that mirror PETSc 3.26.1's TSRK, TSTHETA and TSARKIMEX.

They exist so that gradients computed by pnode (PETSc's discrete adjoints) can be
checked against plain autograd backpropagation through the very same discrete
scheme, implemented independently here. Every integrator takes fixed step
boundaries ``times`` (t_0 < t_1 < ... < t_N; step n has h = t_{n+1} - t_n) and
returns the states at all boundaries, shape ``(N + 1, *y0.shape)``.

The right-hand sides are called as ``f(t, y)`` with ``t`` a 0-d tensor of ``y0``'s
dtype and device. Stage times are formed in Python double precision exactly as
PETSc forms them (``t_n + h * c_i``) before being wrapped in a tensor.

Implicit stages are solved by dense Newton iterations and differentiated with the
implicit function theorem (:class:`ImplicitSolve`). Gradients reach the parameters of
the implicit right-hand side only through the tensors passed as ``params`` (by
default the ``parameters()`` of an ``nn.Module``); any other tensor it closes over
is treated as a constant by the implicit solves.

Scheme details, read off the C sources:

* TSRK (``src/ts/impls/explicit/rk/rk.c``, ``TSStep_RK``, ``TSEvaluateStep_RK``):
  ``Y_i = y_n + sum_{j<i} (h A_ij) k_j``, ``k_i = f(t_n + h c_i, Y_i)``,
  ``y_{n+1} = y_n + sum_i (h b_i) k_i``. For FSAL tableaus (last row of A equal to
  b) PETSc does not evaluate stage 0 after the first step but reuses the previous
  step's last stage ``k_{s-1}``; mathematically the same value (that stage sits at
  ``y_{n+1}``), and :func:`explicit_rk` reuses it the same way.
* TSTHETA (``src/ts/impls/implicit/theta/theta.c``, ``TSStep_Theta``,
  ``SNESTSFormFunction_Theta``): with ``shift = 1 / (theta h)``,

  - midpoint form (``endpoint=False``; TSBEULER is this with theta = 1, and
    ``-ts_type theta`` defaults to theta = 0.5, the implicit midpoint rule): solve
    ``shift (X - y_n) = f(t_n + theta h, X)`` for the stage X, then
    ``y_{n+1} = y_n + h shift (X - y_n)``, i.e. ``y_n + (X - y_n) / theta``; for
    theta = 1 PETSc copies ``y_{n+1} = X``.
  - endpoint form (``endpoint=True``; TSCN is this with theta = 0.5): solve
    ``shift (X - y_n) = f(t_n + h, X) + (1 - theta) / theta * f(t_n, y_n)``
    (PETSc's "affine" right-hand side ``(theta - 1) / theta * F(t_n, y_n, 0)``),
    then ``y_{n+1} = X``. This is
    ``y_{n+1} = y_n + h ((1 - theta) f(t_n, y_n) + theta f(t_{n+1}, y_{n+1}))``.
* TSARKIMEX (``src/ts/impls/arkimex/arkimex.c``, ``TSStep_ARKIMEX``,
  ``SNESTSFormFunction_ARKIMEX``, ``TSEvaluateStep_ARKIMEX``) for
  ``y' = G(t, y) + F(t, y)``, posed as IFunction ``ydot - F`` (``f_implicit``) and
  RHSFunction ``G`` (``f_explicit``): stage i forms
  ``Z_i = y_n + sum_{j<i} (h At_ij) kI_j + sum_{j<i} (h A_ij) kE_j``; if
  ``At_ii == 0`` the stage is explicit, ``Y_i = Z_i`` and ``kI_i = F(t_n + h ct_i, Y_i)``;
  otherwise PETSc solves ``shift (Y_i - Z_i) - F(t_n + h ct_i, Y_i) = 0`` with
  ``shift = (1 / At_ii) / h`` and sets ``kI_i = shift (Y_i - Z_i)`` (not a fresh
  evaluation of F). Then ``kE_i = G(t_n + h c_i, Y_i)`` (explicit abscissae c, not
  ct) and ``y_{n+1} = y_n + sum_j (h bt_j) kI_j + sum_j (h b_j) kE_j``.

Stages, weights and sums skip zero coefficients instead of multiplying by 0. The
IMEX form is that of Ascher, Ruuth and Spiteri, Appl. Numer. Math. 25 (1997)
151-167; explicit RK as in Hairer, Nørsett and Wanner, *Solving Ordinary
Differential Equations I*, Sec. II.1.
"""

import torch
from torch.autograd.function import once_differentiable

from .tableaus import IMEX_TABLEAUS, RK_TABLEAUS, IMEXTableau, Tableau

__all__ = ["ImplicitSolve", "explicit_rk", "theta_method", "arkimex"]


def _step_times(times):
    ts = [float(t) for t in times]
    if len(ts) < 1:
        raise ValueError("times must contain at least the initial time")
    if any(b <= a for a, b in zip(ts[:-1], ts[1:])):
        raise ValueError("times must be strictly increasing")
    return ts


def _time(t, like):
    return torch.tensor(t, dtype=like.dtype, device=like.device)


def _axpy(y, terms):
    """``y + sum w * k`` over the (w, k) pairs with a nonzero weight, in order (VecMAXPY)."""
    for w, k in terms:
        if w != 0.0:
            y = y + w * k
    return y


def _default_params(f, params):
    if params is not None:
        return tuple(params)
    if isinstance(f, torch.nn.Module):
        return tuple(f.parameters())
    return ()


def _newton(residual, guess, inputs, newton_tol, max_newton):
    """Dense Newton on the flattened state; returns the root and the Jacobian there."""
    shape = guess.shape
    # A tolerance below the dtype's resolution could never be met.
    tol = max(newton_tol, 16 * torch.finfo(guess.dtype).eps)
    # Detached: each Jacobian's backward would otherwise walk the inputs' whole history
    # (every earlier step), quadratic in the number of steps (720 steps: 16x slower).
    inputs = [x.detach() for x in inputs]

    def flat_residual(v):
        return residual(v.view(shape), *inputs).reshape(-1)

    def jacobian(v):
        return torch.autograd.functional.jacobian(flat_residual, v)

    y = guess.detach().reshape(-1).clone()
    for _ in range(max_newton):
        step = torch.linalg.solve(jacobian(y), flat_residual(y))
        y = y - step
        if step.abs().max() <= tol * (1 + y.abs().max()):
            # The implicit function theorem needs the Jacobian at the root itself.
            return y.view(shape), jacobian(y)
    raise RuntimeError(f"Newton did not converge in {max_newton} iterations")


class ImplicitSolve(torch.autograd.Function):
    """Root Y of ``residual(Y, *inputs) = 0``, differentiable by the implicit function theorem.

    ``ImplicitSolve.apply(residual, guess, newton_tol, max_newton, *inputs)``.
    Forward: dense Newton from ``guess`` (no gradient flows to the guess), stopping
    when the update is below ``newton_tol * (1 + max|Y|)``. Backward: with
    ``J = dG/dY`` at the root, the vector-Jacobian product of ``dY/dinputs =
    -J^{-1} dG/dinputs`` is ``-(dG/dinputs)^T lambda`` with ``J^T lambda = grad_Y``;
    the second factor is taken by autograd through ``residual``.

    ``inputs`` are all tensors the root depends on and that need gradients. The
    residual may read an input through its arguments or through a closure (the
    parameters of an ``nn.Module``, say). The backward takes the partial derivative
    of G with respect to each input along both routes: arguments are passed as
    detached copies, so that autograd does not also follow an argument's own history
    back to other inputs (the endpoint theta method's ``f(t_n, y_n)`` depends on
    ``y_n`` and on the parameters), while closures still see the original tensors.
    Inputs reached through a closure must not be computed from one another, or the
    shared path would be counted twice; leaves, such as module parameters, are
    safe. Only first derivatives are supported.
    """

    @staticmethod
    def forward(ctx, residual, guess, newton_tol, max_newton, *inputs):
        root, jac = _newton(residual, guess, inputs, newton_tol, max_newton)
        ctx.residual = residual
        ctx.save_for_backward(root, jac, *inputs)
        return root

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_root):
        root, jac, *inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad[4:]
        if not any(needs):
            return (None,) * (4 + len(inputs))
        lam = torch.linalg.solve(jac.mT, grad_root.reshape(-1)).view(root.shape)
        args = [x.detach().requires_grad_(need) for x, need in zip(inputs, needs)]
        with torch.enable_grad():
            # root detached too: through its own grad_fn autograd would re-enter this node.
            g = ctx.residual(root.detach(), *args)
        by_argument = [a for a, need in zip(args, needs) if need]
        by_closure = [x for x, need in zip(inputs, needs) if need]
        # retain_graph: a closure may run through nodes of the caller's graph that
        # the outer backward still has to traverse.
        grads = torch.autograd.grad(
            g, by_argument + by_closure, grad_outputs=-lam, allow_unused=True, retain_graph=True
        )
        totals = iter(_add_optional(a, c) for a, c in zip(grads[: len(by_argument)], grads[len(by_argument) :]))
        return (None, None, None, None, *(next(totals) if need else None for need in needs))


def _add_optional(a, b):
    if a is None:
        return b
    return a if b is None else a + b


def explicit_rk(f, y0, tableau, times):
    """Integrate ``y' = f(t, y)`` with an explicit RK tableau exactly as PETSc's TSRK does.

    ``tableau``: a :class:`~tests.reference.tableaus.Tableau` or a PETSc RK type name
    (``"5dp"``, ...). Returns the states at all ``times``, shape ``(N + 1, *y0.shape)``.
    """
    tab = RK_TABLEAUS[tableau] if isinstance(tableau, str) else tableau
    if not isinstance(tab, Tableau):
        raise TypeError("tableau must be a Tableau or an RK type name")
    ts = _step_times(times)
    s = tab.stages
    y, out = y0, [y0]
    k_last = None
    for t, t_next in zip(ts[:-1], ts[1:]):
        h = t_next - t
        k = []
        for i in range(s):
            stage = _axpy(y, [(h * tab.A[i][j], k[j]) for j in range(i)])
            if i == 0 and tab.fsal and k_last is not None:
                k.append(k_last)
            else:
                k.append(f(_time(t + h * tab.c[i], y0), stage))
        y = _axpy(y, [(h * tab.b[j], k[j]) for j in range(s)])
        k_last = k[-1]
        out.append(y)
    return torch.stack(out)


def theta_method(f, y0, theta, times, endpoint=False, newton_tol=1e-13, max_newton=50, *, params=None):
    """Integrate ``y' = f(t, y)`` with PETSc's TSTHETA (see the module docstring).

    ``theta=1, endpoint=False`` is TSBEULER; ``theta=0.5, endpoint=True`` is TSCN;
    ``theta=0.5, endpoint=False`` is the implicit midpoint rule (``-ts_type theta``).
    ``params``: tensors ``f`` closes over that need gradients (default: ``f.parameters()``
    if ``f`` is an ``nn.Module``). Returns the states at all ``times``.
    """
    if not 0.0 < theta <= 1.0:
        raise ValueError("theta must lie in (0, 1]")
    ts = _step_times(times)
    params = _default_params(f, params)
    y, out = y0, [y0]
    for t, t_next in zip(ts[:-1], ts[1:]):
        h = t_next - t
        shift = 1 / (theta * h)
        if endpoint:
            t_stage = _time(t + h, y0)
            affine = (1 - theta) / theta * f(_time(t, y0), y)

            # Loop values are bound as defaults: the backward calls residual later.
            def residual(x, y_n, affine, *_, shift=shift, t_stage=t_stage):
                return shift * (x - y_n) - f(t_stage, x) - affine

            y = ImplicitSolve.apply(residual, y, newton_tol, max_newton, y, affine, *params)
        else:
            t_stage = _time(t + theta * h, y0)

            # Loop values are bound as defaults: the backward calls residual later.
            def residual(x, y_n, *_, shift=shift, t_stage=t_stage):
                return shift * (x - y_n) - f(t_stage, x)

            x = ImplicitSolve.apply(residual, y, newton_tol, max_newton, y, *params)
            y = x if theta == 1.0 else y + h * (shift * (x - y))
        out.append(y)
    return torch.stack(out)


def arkimex(f_explicit, f_implicit, y0, tableau, times, newton_tol=1e-13, max_newton=50, *, params=None):
    """Integrate ``y' = f_explicit(t, y) + f_implicit(t, y)`` with PETSc's TSARKIMEX.

    ``tableau``: an :class:`~tests.reference.tableaus.IMEXTableau` or a PETSc ARKIMEX
    type name (``"3"``, ``"l2"``, ...). Either function may be ``None`` for a zero
    part: a TS with only an RHSFunction has F = 0 (``TSComputeIFunction`` with
    ``imex`` true returns just ``ydot``), so it runs the explicit tableau (A, b); a
    TS with only an IFunction runs the implicit tableau (At, bt). ``params``: tensors
    ``f_implicit`` closes over that need gradients (default: its ``parameters()`` if
    it is an ``nn.Module``). Returns the states at all ``times``.

    Every tableau PETSc registers has at most its first stage explicit (``At_00 ==
    0``); an explicit stage is completed here with ``kI_i = F(t_n + h ct_i, Y_i)`` as
    PETSc's IMEX path does for the first stage.
    """
    tab = IMEX_TABLEAUS[tableau] if isinstance(tableau, str) else tableau
    if not isinstance(tab, IMEXTableau):
        raise TypeError("tableau must be an IMEXTableau or an ARKIMEX type name")
    if f_explicit is None and f_implicit is None:
        raise ValueError("at least one of f_explicit and f_implicit is required")
    ts = _step_times(times)
    params = _default_params(f_implicit, params)
    s = tab.stages
    y, out = y0, [y0]
    for t, t_next in zip(ts[:-1], ts[1:]):
        h = t_next - t
        stages, k_imp, k_exp = [], [], []
        for i in range(s):
            z = _axpy(y, [(h * tab.At[i][j], k_imp[j]) for j in range(i) if k_imp[j] is not None])
            z = _axpy(z, [(h * tab.A[i][j], k_exp[j]) for j in range(i) if k_exp[j] is not None])
            t_imp = _time(t + h * tab.ct[i], y0)
            if f_implicit is None:
                stage, ki = z, None
            elif tab.At[i][i] == 0.0:
                stage, ki = z, f_implicit(t_imp, z)
            else:
                shift = (1.0 / tab.At[i][i]) / h

                # Loop values are bound as defaults: the backward calls residual later.
                def residual(x, z, *_, shift=shift, t_imp=t_imp):
                    return shift * (x - z) - f_implicit(t_imp, x)

                # PETSc's initial guess is the previous stage.
                guess = stages[i - 1] if i > 0 else y
                stage = ImplicitSolve.apply(residual, guess, newton_tol, max_newton, z, *params)
                ki = shift * (stage - z)
            stages.append(stage)
            k_imp.append(ki)
            k_exp.append(None if f_explicit is None else f_explicit(_time(t + h * tab.c[i], y0), stage))
        y = _axpy(y, [(h * tab.bt[j], k_imp[j]) for j in range(s) if k_imp[j] is not None])
        y = _axpy(y, [(h * tab.b[j], k_exp[j]) for j in range(s) if k_exp[j] is not None])
        out.append(y)
    return torch.stack(out)
