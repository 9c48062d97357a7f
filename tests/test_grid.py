"""Distributed-state mode (pnode.Grid) in one process: gradients against backprop through
an independent pure-torch solve of the whole field, finite differences, the coloured
Jacobian against autograd's dense one, checkpointing, and input errors. The same
problems on 2 ranks are compared with 1 rank in tests/mpi/grid_check.py."""

import pytest
import torch

import pnode
from grid_problems import Reaction, full_field, initial_field, loss
from helpers import output_rows, rel_err
from pnode._options import make_config
from pnode._rhs import RHS
from reference.rk import arkimex, explicit_rk, theta_method

T = torch.tensor([0.0, 0.2, 0.5], dtype=torch.float64)

GRIDS = {
    "2d-periodic": dict(shape=(6, 7), dof=2),
    "1d-ghosted-w2": dict(shape=(11,), dof=1, stencil_width=2, boundary="ghosted"),
    "3d-mixed-star": dict(shape=(3, 4, 5), dof=1, boundary=("ghosted", "periodic", "periodic"),
                          stencil="star"),
}


def _solve(grid_kw, method, options, seed=0):
    grid = pnode.Grid(**grid_kw)
    func = Reaction(dim=len(grid.shape), dof=grid.dof, width=grid.stencil_width, seed=seed,
                    star=grid.stencil == "star")
    field = initial_field(grid)
    y0 = grid.local(field).clone().requires_grad_()
    ys, stats = pnode.odeint(func, y0, T, method=method, rtol=1e-6, atol=1e-8, options=options,
                             grid=grid, return_stats=True)
    grads = torch.autograd.grad(loss(ys), [y0] + list(func.parameters()))
    return grid, func, field, ys, grads, stats


def _check_reference(grid_kw, method, options, scheme, tol):
    grid, func, field, ys, grads, stats = _solve(grid_kw, method, options)
    y0 = field.clone().requires_grad_()
    ref = scheme(full_field(func, grid), y0, stats.step_times, list(func.parameters()))[output_rows(stats.step_times, T)]
    ref_grads = torch.autograd.grad(loss(ref), [y0] + list(func.parameters()))
    assert rel_err(ys, ref) <= 1e-10
    names = ["y0"] + [n for n, _ in func.named_parameters()]
    for name, a, b in zip(names, grads, ref_grads):
        assert rel_err(a, b) <= tol, f"{method}: d/d{name} off by {rel_err(a, b):.2e}"
    return stats


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("method, options", [("rk4", {"step_size": 0.05}), ("dopri5", {}),
                                             ("bosh3", {"step_size": 0.1})], ids=["rk4", "dopri5", "bosh3"])
def test_explicit_matches_reference(grid, method, options):
    tableau = pnode.METHODS[method].subtype
    _check_reference(GRIDS[grid], method, options, lambda f, y0, steps, params: explicit_rk(f, y0, tableau, steps),
                     1e-10)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("jacobian", ["colored", "matrix-free"])
@pytest.mark.parametrize("method", ["beuler", "cn"])
def test_theta_methods_match_reference(grid, method, jacobian):
    m = pnode.METHODS[method]
    theta = 1.0 if method == "beuler" else 0.5

    def scheme(f, y0, steps, params):
        return theta_method(f, y0, theta, steps, endpoint=m.endpoint, params=params)
    stats = _check_reference(GRIDS[grid], method, {"step_size": 0.1, "jacobian": jacobian}, scheme, 1e-8)
    assert stats.newton_iterations > 0


def test_arkimex_matches_reference():
    tableau = pnode.METHODS["arkimex"].subtype

    def scheme(f, y0, steps, params):
        return arkimex(None, f, y0, tableau, steps, params=params)
    _check_reference(GRIDS["2d-periodic"], "arkimex", {"step_size": 0.1}, scheme, 1e-8)


def test_colored_preconditioner_cuts_krylov_iterations():
    *_, colored = _solve(GRIDS["2d-periodic"], "beuler", {"step_size": 0.1, "jacobian": "colored"})
    *_, free = _solve(GRIDS["2d-periodic"], "beuler", {"step_size": 0.1, "jacobian": "matrix-free"})
    assert colored.jacobians > 0
    assert colored.krylov_iterations < free.krylov_iterations


@pytest.mark.parametrize("memory", ["graphs", "states"])
def test_checkpointing_and_memory_modes_give_identical_gradients(memory):
    base = _solve(GRIDS["2d-periodic"], "rk4", {"step_size": 0.05})[4]
    for options in ({"memory": memory}, {"memory": memory, "checkpoints": 3}):
        grads = _solve(GRIDS["2d-periodic"], "rk4", dict(options, step_size=0.05))[4]
        for a, b in zip(grads, base):
            assert rel_err(a, b) <= 1e-12


def test_finite_differences():
    kw = dict(shape=(5,), dof=1, boundary="ghosted")
    grid, func, field, ys, grads, _ = _solve(kw, "beuler", {"step_size": 0.1})

    def value(y0):
        with torch.no_grad():
            return float(loss(pnode.odeint(func, y0, T, method="beuler", options={"step_size": 0.1},
                                           grid=grid)))
    eps = 1e-6
    fd = torch.zeros_like(field)
    for i in range(field.numel()):
        e = torch.zeros_like(field).view(-1)
        e[i] = eps
        fd.view(-1)[i] = (value(field + e.view_as(field)) - value(field - e.view_as(field))) / (2 * eps)
    assert rel_err(grads[0], fd) <= 1e-6
    bias = func.out.bias
    index = [n for n, _ in func.named_parameters()].index("out.bias")
    fd_bias = []
    for i in range(bias.numel()):
        with torch.no_grad():
            bias[i] += eps
            up = value(field)
            bias[i] -= 2 * eps
            down = value(field)
            bias[i] += eps
        fd_bias.append((up - down) / (2 * eps))
    assert rel_err(grads[1 + index], torch.tensor(fd_bias, dtype=torch.float64)) <= 1e-6


@pytest.mark.parametrize("kw", [dict(shape=(7,), dof=2),                         # 7 colours per line
                                dict(shape=(4, 5), dof=2, boundary="ghosted"),
                                dict(shape=(4, 6), dof=1, stencil="star"),
                                dict(shape=(8,), dof=1, stencil_width=2),          # period 8, not 5
                                dict(shape=(3, 3, 4), dof=1)], ids=str)
def test_colored_jacobian_equals_autograd(kw):
    grid = pnode.Grid(**kw)
    func = Reaction(dim=len(grid.shape), dof=grid.dof, width=grid.stencil_width, star=grid.stencil == "star")
    field = initial_field(grid)
    config = make_config("beuler", 1e-6, 1e-8, {"jacobian": "colored"}, None).for_state(field, grid)
    solver = grid._make_solver(config, 0, ("implicit",))
    solver.rhs = RHS({"implicit": func}, [], grid.layout, torch.float64, torch.device("cpu"), 1.0, 0.0,
                     pnode.Stats())
    solver.view(solver.u).copy_(grid.layout.to_flat(field))
    solver.u.stateIncrease()
    point = solver.jac["implicit"].point
    point.set(0.3, solver.u, 0, 7.0)
    P = solver.coloring.matrix
    solver.coloring.assemble(solver, point, 7.0, P)
    assembled = torch.from_numpy(P.convert("dense").getDenseArray().copy())

    f = full_field(func, grid)
    jac = torch.autograd.functional.jacobian(
        lambda v: grid.layout.to_flat(f(torch.tensor(0.3, dtype=torch.float64), grid.layout.from_flat(v))),
        grid.layout.to_flat(field))
    expected = 7.0 * torch.eye(jac.shape[0], dtype=torch.float64) - jac
    assert (assembled - expected).abs().max() <= 1e-13 * expected.abs().max()


def test_bad_input():
    grid = pnode.Grid((4, 5), dof=2)
    func = Reaction(dof=2)
    y0 = grid.local(initial_field(grid))
    with pytest.raises(ValueError, match="owned_shape"):
        pnode.odeint(func, y0[:, :2], T, method="rk4", grid=grid)
    with pytest.raises(ValueError, match="float64 CPU"):
        pnode.odeint(func, y0.float(), T, method="rk4", grid=grid)
    with pytest.raises(ValueError, match="'colored'"):
        pnode.odeint(func, y0, T, method="beuler", options={"jacobian": "dense"}, grid=grid)
    with pytest.raises(ValueError, match="needs the stencil"):
        pnode.odeint(func, y0, T, method="beuler", options={"jacobian": "colored"})
    with pytest.raises(pnode.RHSError, match="owned shape"):
        pnode.odeint(lambda t, u: u, y0, T, method="rk4", grid=grid, adjoint_params=())
    with pytest.raises(ValueError, match="boundary"):
        pnode.Grid((4, 5), boundary="reflect")
    with pytest.raises(ValueError, match="cannot lay out .* smaller than stencil width"):
        pnode.Grid((1,), stencil_width=2)
    # int() truncated 4.5 to 4, and a bad comm gave petsc4py's own error
    with pytest.raises(ValueError, match=r"positive integer sizes, got \(4.5, 5\)"):
        pnode.Grid((4.5, 5))
    with pytest.raises(ValueError, match="integer dof >= 1 .* got 1.5 and 1"):
        pnode.Grid((4, 5), dof=1.5)
    with pytest.raises(TypeError, match="Grid comm must be a PETSc or mpi4py communicator, got int"):
        pnode.Grid((4, 5), comm=3)


@pytest.mark.parametrize("method", ["rk4", "beuler"])
def test_decreasing_time_and_expert_pc(method):
    grid = pnode.Grid(**GRIDS["2d-periodic"])
    func = Reaction(dim=2, dof=2)
    field = initial_field(grid)
    t = T.flip(0)
    y0 = grid.local(field).clone().requires_grad_()
    ys, stats = pnode.odeint(func, y0, t, method=method, options={"step_size": 0.1}, grid=grid,
                             petsc_options={"pc_type": "asm"} if method == "beuler" else None, return_stats=True)
    grads = torch.autograd.grad(loss(ys), [y0] + list(func.parameters()))

    f = full_field(func, grid)
    steps = [-s for s in stats.step_times]  # the reference integrates s = -t forwards

    def backwards(s, y):
        return -f(-s, y)
    y_ref = field.clone().requires_grad_()
    params = list(func.parameters())
    ref = explicit_rk(backwards, y_ref, "4", steps) if method == "rk4" else \
        theta_method(backwards, y_ref, 1.0, steps, params=params)
    ref = ref[output_rows(steps, -t)]
    ref_grads = torch.autograd.grad(loss(ref), [y_ref] + params)
    assert rel_err(ys, ref) <= 1e-10
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) <= 1e-8
