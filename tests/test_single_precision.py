"""A single-precision PETSc (configure option --with-precision=single): float32 models run
on PETSc's own memory with no casts, and gradients still match backprop through the
independent pure-torch schemes, to float32 accuracy.

Skipped on the default double-precision build; the README ("float32 models") says how
to build a single-precision environment and run this file in it.
"""

import copy
import warnings

import pytest
import torch

import pnode
import grid_problems
from helpers import MLP, Stiff, loss_fn, output_rows, rel_err
from reference.rk import arkimex, explicit_rk, theta_method
from reference.tableaus import IMEX_TABLEAUS

pytestmark = pytest.mark.skipif(pnode.petsc_dtype != torch.float32,
                                reason="needs PETSc built with --with-precision=single")

# 0.1 and 0.7 are not float32 numbers: the solve must land on float32(0.7), not 1 ulp short.
T = torch.tensor([0.0, 0.1, 0.7, 1.3], dtype=torch.float64)
EXPLICIT = [m.name for m in pnode.METHODS.values() if m.kind == "explicit"]


def _pair(module):
    """(float32 copy, float64 copy) with the same parameter values."""
    return copy.deepcopy(module).float(), copy.deepcopy(module).double()


def _y0():
    return torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _check(func, method, options, reference, y_tol, g_tol, rtol=1e-4):
    """pnode on the float32 model against the float64 reference scheme on pnode's steps."""
    f32, f64 = _pair(func)
    y32 = _y0().float().requires_grad_()
    ys, stats = pnode.odeint(f32, y32, T, method=method, rtol=rtol, atol=1e-6, options=options,
                             return_stats=True)
    assert ys.dtype == torch.float32
    assert stats.device_path == "shared memory (DLPack)"   # no staging, no casts
    g = torch.autograd.grad(loss_fn(ys), [y32, *f32.parameters()])

    y64 = y32.detach().double().requires_grad_()
    ref = reference(f64, y64, stats.step_times)[output_rows(stats.step_times, T)]
    g_ref = torch.autograd.grad(loss_fn(ref), [y64, *f64.parameters()])
    assert rel_err(ys, ref) <= y_tol
    names = ["y0"] + [n for n, _ in f32.named_parameters()]
    for name, a, b in zip(names, g, g_ref):
        assert a.dtype == torch.float32
        assert rel_err(a, b) <= g_tol, f"{method}: d/d{name} off by {rel_err(a, b):.2e}"
    return stats


@pytest.mark.parametrize("method", EXPLICIT)
def test_explicit_fixed_steps(method):
    tableau = pnode.METHODS[method].subtype
    stats = _check(MLP(), method, {"step_size": 0.1},
                   lambda f, y0, steps: explicit_rk(f, y0, tableau, steps), 1e-6, 1e-5)
    assert stats.steps == 13 and stats.recomputed_rhs == 0   # 1 + 6 + 6 steps of 0.1, no re-evaluation


@pytest.mark.parametrize("memory", ["graphs", "states"])
def test_explicit_adaptive(memory):
    stats = _check(MLP(), "dopri5", {"memory": memory},
                   lambda f, y0, steps: explicit_rk(f, y0, "5dp", steps), 1e-6, 1e-5)
    widths = torch.diff(torch.tensor(stats.step_times))
    assert widths.max() / widths.min() > 1.05


@pytest.mark.parametrize("jacobian", ["blockdiag", "dense", "matrix-free"])
@pytest.mark.parametrize("method, theta", [("beuler", 1.0), ("cn", 0.5)])
def test_theta_methods(method, theta, jacobian):
    endpoint = pnode.METHODS[method].endpoint
    _check(Stiff(), method, {"step_size": 0.05, "jacobian": jacobian},
           lambda f, y0, steps: theta_method(f, y0, theta, steps, endpoint=endpoint), 1e-6, 1e-5)


def test_arkimex_split():
    tab = IMEX_TABLEAUS[pnode.METHODS["arkimex"].subtype]
    _check(Stiff(), "arkimex", {"step_size": 0.05},
           lambda f, y0, steps: arkimex(f.nonstiff, f.stiff, y0, tab, steps, params=list(f.parameters())),
           1e-6, 1e-5)


@pytest.mark.parametrize("method, options", [("rk4", {"step_size": 0.05}),
                                             ("beuler", {"step_size": 0.05, "jacobian": "colored"})],
                         ids=["rk4", "beuler-colored"])
def test_grid(method, options):
    """A distributed state (here one rank): y0 is PETSc's float32, ghosts and colouring too."""
    grid = pnode.Grid(shape=(6, 7), dof=2)
    f32, f64 = _pair(grid_problems.Reaction(dim=2, dof=2))
    field = grid_problems.initial_field(grid)
    y0 = grid.local(field).float().requires_grad_()
    ys, stats = pnode.odeint(f32, y0, T, method=method, options=options, grid=grid, return_stats=True)
    assert ys.dtype == torch.float32
    grads = torch.autograd.grad(grid_problems.loss(ys), [y0, *f32.parameters()])

    y64 = field.clone().requires_grad_()
    f = grid_problems.full_field(f64, grid)
    ref = (explicit_rk(f, y64, "4", stats.step_times) if method == "rk4" else
           theta_method(f, y64, 1.0, stats.step_times, params=list(f64.parameters())))
    ref = ref[output_rows(stats.step_times, T)]
    ref_grads = torch.autograd.grad(grid_problems.loss(ref), [y64, *f64.parameters()])
    assert rel_err(ys, ref) <= 1e-6
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) <= 1e-5


def test_memory_modes_agree():
    f32 = MLP().float()
    y0 = _y0().float()
    grads = []
    for options in ({"memory": "graphs"}, {"memory": "states"}, {"checkpoints": 3}):
        y = y0.clone().requires_grad_()
        ys = pnode.odeint(f32, y, T.float(), method="rk4", options={"step_size": 0.05, **options})
        grads.append(torch.autograd.grad(loss_fn(ys), [y, *f32.parameters()]))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert rel_err(a, b) <= 1e-6


def test_float64_model_warns_and_still_runs():
    func = MLP()
    y0 = _y0().requires_grad_()
    with pytest.warns(UserWarning, match="single precision"):
        ys = pnode.odeint(func, y0, T, method="rk4", options={"step_size": 0.1})
    assert ys.dtype == torch.float64
    g = torch.autograd.grad(loss_fn(ys), [y0])[0]
    assert torch.isfinite(g).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a float32 model is what this build is for: no warning
        pnode.odeint(func.float(), y0.detach().float(), T.float(), method="rk4", options={"step_size": 0.1})
