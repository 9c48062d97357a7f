"""Self-checks of the pure-PyTorch reference integrators in ``tests/reference``.

No PETSc and no pnode here: these tests establish that the reference itself is
right (tableau consistency and order conditions, observed convergence orders,
exact gradients of the implicit solves), so that it can serve as the ground truth
for pnode's adjoint gradients elsewhere.
"""

import itertools
import math

import numpy as np
import pytest
import torch

from tests.reference.rk import ImplicitSolve, arkimex, explicit_rk, theta_method
from tests.reference.tableaus import IMEX_TABLEAUS, RK_TABLEAUS, Tableau

DTYPE = torch.float64

# Registered orders PETSc 3.26.1 gets wrong, with the order the pair really has
# (for the coupled IMEX conditions; each part's own order is checked separately).
# 1bee is backward Euler with an extrapolation error estimator, registered as order 2.
# bpr3's explicit tableau has A[4][2] = 3/5, so its last abscissa is c[4] = 0.85.
# With 3/4 (c[4] = 1, as in the Boscarino-Pareschi-Russo scheme) the pair meets
# every third-order condition; with 3/5 its explicit part, and so the pair, is
# only first order.
_PAIR_ORDER = {"1bee": 1, "bpr3": 1}
_EXPLICIT_PART_ORDER = {"1bee": 1, "bpr3": 1}
_IMPLICIT_PART_ORDER = {"1bee": 1}


# --- order conditions -------------------------------------------------------
# Rooted trees (Hairer, Nørsett, Wanner, Solving ODEs I, Sec. II.2) as sorted tuples
# of subtrees; for additive methods each node is coloured by the tableau whose
# function it evaluates (bi-coloured trees as for partitioned RK methods, HNW
# Sec. II.15; Kennedy & Carpenter, Appl. Numer. Math. 44 (2003), Sec. 2), and the
# condition is Phi(tau) = 1 / gamma(tau) for every coloured tree tau.


def _trees(n):
    if n == 1:
        return [()]
    found = set()
    for k in range(1, n):
        for first in _trees(k):
            for rest in _trees(n - k):
                # Grafting ``first`` onto the root of ``rest`` enumerates every tree.
                found.add(tuple(sorted(rest + (first,))))
    return sorted(found)


def _size(tree):
    return 1 + sum(_size(child) for child in tree)


def _gamma(tree):
    return _size(tree) * math.prod(_gamma(child) for child in tree)


def _colourings(tree, ncolours):
    for colour in range(ncolours):
        for children in itertools.product(*(list(_colourings(c, ncolours)) for c in tree)):
            yield colour, children


def _stage_weights(coloured, matrices):
    _, children = coloured
    v = np.ones(matrices[0].shape[0])
    for child in children:
        v = v * (matrices[child[0]] @ _stage_weights(child, matrices))
    return v


def _order_defect(matrices, weights, order):
    """Largest |Phi(tau) - 1/gamma(tau)| over all coloured trees with at most ``order`` nodes."""
    matrices = [np.array(m) for m in matrices]
    weights = [np.array(w) for w in weights]
    defect = 0.0
    for n in range(1, order + 1):
        for tree in _trees(n):
            for coloured in _colourings(tree, len(matrices)):
                phi = weights[coloured[0]] @ _stage_weights(coloured, matrices)
                defect = max(defect, abs(phi - 1.0 / _gamma(tree)))
    return defect


def _assert_row_sums(rows, cs):
    # PETSc accumulates left to right; compare with the exact sum up to that rounding.
    for row, c in zip(rows, cs):
        assert abs(math.fsum(row) - c) <= 1e-15 * max(1.0, math.fsum(abs(a) for a in row))


def test_tree_counts():
    assert [len(_trees(n)) for n in range(1, 6)] == [1, 1, 2, 4, 9]


def test_all_petsc_types_present():
    assert set(RK_TABLEAUS) == {"1fe", "2a", "2b", "3", "3bs", "4", "5f", "5dp", "5bs", "6vr", "7vr", "8vr"}
    assert set(IMEX_TABLEAUS) == {
        "1bee", "a2", "l2", "ars122", "2c", "2d", "2e", "prssp2", "3", "bpr3", "ars443", "4", "5"
    }


@pytest.mark.parametrize("name", RK_TABLEAUS)
def test_rk_tableau_consistency(name):
    tab = RK_TABLEAUS[name]
    s = tab.stages
    assert len(tab.A) == s and all(len(row) == s for row in tab.A)
    assert all(tab.A[i][j] == 0.0 for i in range(s) for j in range(i, s))
    _assert_row_sums(tab.A, tab.c)
    assert abs(math.fsum(tab.b) - 1.0) <= 1e-12
    assert _order_defect([tab.A], [tab.b], min(tab.order, 4)) <= 1e-12
    if tab.bembed is not None:
        assert _order_defect([tab.A], [tab.bembed], min(tab.order - 1, 4)) <= 1e-12


@pytest.mark.parametrize("name", IMEX_TABLEAUS)
def test_imex_tableau_consistency(name):
    tab = IMEX_TABLEAUS[name]
    s = tab.stages
    assert all(tab.At[i][j] == 0.0 for i in range(s) for j in range(i + 1, s))
    assert all(tab.A[i][j] == 0.0 for i in range(s) for j in range(i, s))
    _assert_row_sums(tab.At, tab.ct)
    _assert_row_sums(tab.A, tab.c)
    assert abs(math.fsum(tab.bt) - 1.0) <= 1e-12
    assert abs(math.fsum(tab.b) - 1.0) <= 1e-12
    implicit = min(_IMPLICIT_PART_ORDER.get(name, tab.order), 4)
    explicit = min(_EXPLICIT_PART_ORDER.get(name, tab.order), 4)
    pair = min(_PAIR_ORDER.get(name, tab.order), 4)
    assert _order_defect([tab.At], [tab.bt], implicit) <= 1e-12
    assert _order_defect([tab.A], [tab.b], explicit) <= 1e-12
    assert _order_defect([tab.A, tab.At], [tab.b, tab.bt], pair) <= 1e-12
    if tab.bembedt is not None:
        embedded = min(_PAIR_ORDER.get(name, tab.order - 1), tab.order - 1, 4)
        assert _order_defect([tab.A, tab.At], [tab.bembed, tab.bembedt], embedded) <= 1e-12


@pytest.mark.parametrize("name", sorted(_PAIR_ORDER))
def test_imex_registered_order_is_not_met(name):
    """Pins the PETSc defects documented at ``_PAIR_ORDER``: one order higher fails clearly."""
    tab = IMEX_TABLEAUS[name]
    assert _order_defect([tab.A, tab.At], [tab.b, tab.bt], _PAIR_ORDER[name] + 1) > 1e-2


def test_bpr3_explicit_entry():
    tab = IMEX_TABLEAUS["bpr3"]
    assert tab.A[4][2] == 3.0 / 5.0 and tab.c[4] == 0.85
    fixed = [list(row) for row in tab.A]
    fixed[4][2] = 3.0 / 4.0
    assert _order_defect([fixed, tab.At], [tab.b, tab.bt], 3) <= 1e-12


def test_petsc_flags():
    assert {n for n, t in RK_TABLEAUS.items() if t.fsal} == {"3bs", "5dp", "5bs", "6vr"}
    assert {n for n, t in IMEX_TABLEAUS.items() if not t.stiffly_accurate} == {"ars122", "l2"}
    assert {n for n, t in IMEX_TABLEAUS.items() if not t.explicit_first_stage} == {"1bee", "l2", "prssp2"}
    assert {n for n, t in IMEX_TABLEAUS.items() if t.bembedt is None} == {"prssp2", "ars443", "bpr3"}


# --- convergence --------------------------------------------------------------


def _observed_order(errors):
    return math.log2(errors[0] / errors[1])


def _forced_decay(t, y):
    return -y + torch.sin(t)


def _forced_decay_exact(t):
    # y' = -y + sin t, y(0) = 1
    return 1.5 * torch.exp(-t) + 0.5 * (torch.sin(t) - torch.cos(t))


# Step counts on [0, 2] keeping the error well above rounding and in the asymptotic range.
_RK_STEPS = {1: (16, 32), 2: (16, 32), 3: (16, 32), 4: (16, 32), 5: (16, 32), 6: (8, 16), 7: (8, 16), 8: (4, 8)}


@pytest.mark.parametrize("name", RK_TABLEAUS)
def test_explicit_rk_convergence(name):
    tab = RK_TABLEAUS[name]
    errors = []
    for n in _RK_STEPS[tab.order]:
        times = torch.linspace(0.0, 2.0, n + 1, dtype=DTYPE)
        ys = explicit_rk(_forced_decay, torch.tensor(1.0, dtype=DTYPE), tab, times)
        errors.append((ys - _forced_decay_exact(times)).abs().max().item())
    assert abs(_observed_order(errors) - tab.order) < 0.3


def test_explicit_rk_shapes_and_fsal_reuse():
    calls = []

    def f(t, y):
        calls.append(float(t))
        return -y

    y0 = torch.ones(2, 3, dtype=DTYPE)
    ys = explicit_rk(f, y0, "5dp", [0.0, 0.1, 0.3, 0.4])
    assert ys.shape == (4, 2, 3)
    assert torch.equal(ys[0], y0)
    # FSAL: 7 evaluations on the first step, 6 on each later one (as in TSStep_RK).
    assert len(calls) == 7 + 6 + 6
    assert torch.allclose(ys[-1], torch.exp(torch.tensor(-0.4, dtype=DTYPE)) * y0, atol=1e-9)


@pytest.mark.parametrize(
    "theta, endpoint, order", [(1.0, False, 1), (0.5, True, 2), (0.5, False, 2)], ids=["beuler", "cn", "midpoint"]
)
def test_theta_convergence(theta, endpoint, order):
    errors = []
    for n in (32, 64):
        times = torch.linspace(0.0, 2.0, n + 1, dtype=DTYPE)
        ys = theta_method(_forced_decay, torch.tensor([1.0], dtype=DTYPE), theta, times, endpoint)
        errors.append((ys[:, 0] - _forced_decay_exact(times)).abs().max().item())
    assert abs(_observed_order(errors) - order) < 0.3


def test_theta_one_step_formulas():
    """One step on y' = lam*y against the closed forms of TSBEULER, TSCN and the midpoint form."""
    lam, h, theta = -3.0, 0.1, 0.7

    def f(t, y):
        return lam * y

    y0 = torch.tensor([2.0], dtype=DTYPE)
    z = lam * h
    cases = {
        (1.0, False): 1 / (1 - z),
        (0.5, True): (1 + z / 2) / (1 - z / 2),
        (theta, True): (1 + (1 - theta) * z) / (1 - theta * z),
        # Stage X = y/(1 - theta z); y1 = y + (X - y)/theta = y (1 + z/(1 - theta z)).
        (theta, False): 1 + z / (1 - theta * z),
    }
    for (th, endpoint), amplification in cases.items():
        y1 = theta_method(f, y0, th, [0.0, h], endpoint)[1]
        assert torch.allclose(y1, amplification * y0, rtol=1e-14, atol=0)


# Manufactured split problem with exact solution y = cos t (y(0) = 1): a stiff linear
# relaxation F towards cos t, treated implicitly, and a non-stiff nonlinear G that
# reduces to -sin t on the exact solution, treated explicitly.
_STIFFNESS = 10.0


def _stiff_part(t, y):
    return -_STIFFNESS * (y - torch.cos(t))


def _nonstiff_part(t, y):
    return -torch.sin(t) + 0.5 * (torch.cos(t) ** 2 - y**2)


def _arkimex_errors(name, f_explicit, f_implicit, steps):
    errors = []
    for n in steps:
        times = torch.linspace(0.0, 1.0, n + 1, dtype=DTYPE)
        ys = arkimex(f_explicit, f_implicit, torch.tensor([1.0], dtype=DTYPE), name, times)
        errors.append((ys[:, 0] - torch.cos(times)).abs().max().item())
    return errors


@pytest.mark.parametrize("name, order", [("ars122", 2), ("2c", 2), ("l2", 2), ("3", 3), ("4", 4)])
def test_arkimex_convergence(name, order):
    errors = _arkimex_errors(name, _nonstiff_part, _stiff_part, (32, 64))
    assert abs(_observed_order(errors) - order) < 0.3


def test_arkimex_implicit_only_convergence():
    def whole(t, y):
        return _stiff_part(t, y) + _nonstiff_part(t, y)

    errors = _arkimex_errors("3", None, whole, (32, 64))
    assert abs(_observed_order(errors) - 3) < 0.3


def test_arkimex_without_implicit_part_is_the_explicit_tableau():
    """A TS with only an RHSFunction runs ARKIMEX's explicit tableau (F = 0)."""
    tab = IMEX_TABLEAUS["3"]
    explicit = Tableau("3-explicit", tab.order, tab.A, tab.b, tab.c, None)
    times = torch.linspace(0.0, 1.0, 9, dtype=DTYPE)
    y0 = torch.tensor([0.3, -0.2], dtype=DTYPE)
    ref = explicit_rk(_nonstiff_part, y0, explicit, times)
    ys = arkimex(_nonstiff_part, None, y0, tab, times)
    assert torch.allclose(ys, ref, rtol=0, atol=1e-15)


# --- gradients ----------------------------------------------------------------


def test_implicit_solve_gradcheck():
    h = 0.3

    def residual(y, y_n, p):
        return y - y_n - h * torch.tanh(p * y) * y_n.sum()

    y_n = torch.tensor([0.4, -0.7, 1.1], dtype=DTYPE, requires_grad=True)
    p = torch.tensor([0.9, -1.3, 0.5], dtype=DTYPE, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda y_n, p: ImplicitSolve.apply(residual, y_n.detach(), 1e-13, 50, y_n, p), (y_n, p)
    )


def test_implicit_solve_gradcheck_closure_input():
    """An input the residual reaches only through a closure (like nn.Module weights)."""
    h = 0.2
    w = torch.tensor([[0.5, -1.0], [0.8, 0.3]], dtype=DTYPE, requires_grad=True)

    def residual(y, y_n, *_):
        return y - y_n - h * torch.tanh(w @ y)

    y_n = torch.tensor([0.6, -0.4], dtype=DTYPE, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda y_n, w: ImplicitSolve.apply(residual, y_n.detach(), 1e-13, 50, y_n, w), (y_n, w)
    )


class _TinyField(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2, dtype=DTYPE)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[-1.0, 0.4], [-0.3, -0.8]]))
            self.lin.bias.copy_(torch.tensor([0.1, -0.2]))

    def forward(self, t, y):
        return torch.tanh(self.lin(y)) + 0.1 * torch.sin(t)


def _check_module_gradient(integrate):
    """Autograd gradients w.r.t. y0 and the module's weight against central differences."""
    field = _TinyField()
    y0 = torch.tensor([0.5, -0.3], dtype=DTYPE, requires_grad=True)
    weights = torch.tensor([0.7, -1.1], dtype=DTYPE)

    def loss():
        return (integrate(field, y0)[-1] * weights).sum()

    loss().backward()
    eps = 1e-6
    with torch.no_grad():
        for tensor in (y0, field.lin.weight):
            flat = tensor.view(-1)
            for i in range(flat.numel()):
                flat[i] += eps
                up = loss().item()
                flat[i] -= 2 * eps
                down = loss().item()
                flat[i] += eps
                assert abs(tensor.grad.view(-1)[i].item() - (up - down) / (2 * eps)) < 1e-8


TIMES = [0.0, 0.1, 0.25, 0.4]


def test_explicit_rk_module_gradient():
    _check_module_gradient(lambda f, y0: explicit_rk(f, y0, "5dp", TIMES))


@pytest.mark.parametrize(
    "theta, endpoint", [(1.0, False), (0.5, True), (0.5, False)], ids=["beuler", "cn", "midpoint"]
)
def test_theta_module_gradient(theta, endpoint):
    _check_module_gradient(lambda f, y0: theta_method(f, y0, theta, TIMES, endpoint))


@pytest.mark.parametrize("name", ["l2", "3"])
def test_arkimex_module_gradient(name):
    def integrate(f, y0):
        return arkimex(lambda t, y: -0.5 * y**3, f, y0, name, TIMES)

    _check_module_gradient(integrate)


def test_theta_gradcheck_explicit_params():
    """``params`` routes gradients to tensors a plain function closes over."""
    a = torch.tensor([-2.0, 0.7], dtype=DTYPE, requires_grad=True)

    def run(y0, a):
        def f(t, y):
            return a * y + torch.cos(t) * y.flip(0)

        return theta_method(f, y0, 0.5, [0.0, 0.2, 0.5], True, params=(a,))

    y0 = torch.tensor([1.0, 0.5], dtype=DTYPE, requires_grad=True)
    assert torch.autograd.gradcheck(run, (y0, a))
