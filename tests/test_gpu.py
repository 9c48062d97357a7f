"""Models on another device or dtype than PETSc's memory: the staging path.

PETSc from PyPI keeps Vecs on the host in float64. The staging logic is exercised
here on the CPU with a float32 model; the CUDA tests skip cleanly without a GPU."""

import pytest
import torch

import pnode
from helpers import MLP, loss_fn, rel_err
from pnode._staging import Staging

T = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("transfer", [True, False], ids=["device-path", "host-cast"])
def test_staging_reuses_its_buffers(transfer):
    st = Staging(6, torch.float64, torch.float32, torch.device("cpu"), transfer=transfer)
    a = torch.arange(6, dtype=torch.float64)
    first = st.to_model(a, copy=False)
    second = st.to_model(a * 2, copy=False)
    assert first.data_ptr() == second.data_ptr()  # no allocation per call
    assert second.dtype == torch.float32 and torch.equal(second, (a * 2).float())
    fresh = st.to_model(a, copy=True)
    assert fresh.data_ptr() != second.data_ptr()  # the tape owns its input
    out = torch.empty(6, dtype=torch.float64)
    st.to_petsc(torch.ones(2, 3), out, scale=-1.0)
    assert torch.equal(out, -torch.ones(6, dtype=torch.float64))


def test_float32_model_goes_through_staging():
    func = MLP(seed=0).float()
    y0 = torch.randn(3, 3).requires_grad_()
    ys, stats = pnode.odeint(func, y0, T.float(), method="rk4", options={"step_size": 0.1},
                             return_stats=True)
    assert stats.device_path == "host cast"
    loss_fn(ys).backward()
    assert y0.grad.dtype == torch.float32
    assert stats.recomputed_rhs == 0  # the tape recognised every stage through the cast
    ys64, stats64 = pnode.odeint(MLP(seed=0), y0.detach().double(), T, method="rk4",
                                 options={"step_size": 0.1}, return_stats=True)
    assert stats64.device_path == "shared memory (DLPack)"
    assert rel_err(ys, ys64) <= 1e-5


@pytest.mark.parametrize("method, options", [("rk4", {"step_size": 0.1}), ("dopri5", {}),
                                             ("beuler", {"step_size": 0.1})])
def test_float32_model_backwards_in_time(method, options):
    """A decreasing t through staging: PETSc integrates -f in its own time, so every value
    and cotangent crossing the cast changes sign; gradients match the float64 model's."""
    t = torch.tensor([1.0, 0.4, 0.0])
    y0 = torch.randn(3, 3, generator=torch.Generator().manual_seed(1))
    grads = []
    for func, y in ((MLP(seed=2).float(), y0.clone()), (MLP(seed=2), y0.double())):
        y.requires_grad_()
        ys = pnode.odeint(func, y, t.to(y.dtype), method=method, options=options)
        grads.append(torch.autograd.grad(loss_fn(ys), [y, *func.parameters()]))
    for a, b in zip(*grads):
        assert a.dtype == torch.float32 and rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("memory", ["graphs", "states"])
@pytest.mark.parametrize("method, options", [("rk4", {"step_size": 0.1}), ("dopri5", {}),
                                             ("beuler", {"step_size": 0.1})])
def test_device_path_on_the_cpu_matches_host_cast(monkeypatch, method, options, memory):
    """The staging path a GPU model takes (host copy, transfer, cast), forced on the CPU:
    it moves the same values as the direct host cast, so everything is bit for bit equal."""
    y0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.0, 0.4, 1.0])
    results = []
    for transfer in (False, True):
        monkeypatch.setattr(pnode._solver, "Staging",
                            lambda *args, transfer=transfer: Staging(*args, transfer=transfer))
        func = MLP(seed=4).float()
        y = y0.clone().requires_grad_()
        ys, stats = pnode.odeint(func, y, t, method=method, options=dict(options, memory=memory),
                                 return_stats=True)
        grads = torch.autograd.grad(loss_fn(ys), [y, *func.parameters()])
        results.append((stats.device_path, stats.recomputed_rhs, ys, grads))
    (path_a, rec_a, ys_a, g_a), (path_b, rec_b, ys_b, g_b) = results
    assert (path_a, path_b) == ("host cast", "host staging")
    assert rec_a == rec_b
    if memory == "graphs" and method != "beuler":  # beuler builds Jacobian graphs in the forward
        assert rec_b == 0
    assert torch.equal(ys_a, ys_b)
    for a, b in zip(g_a, g_b):
        assert torch.equal(a, b)


@cuda
@pytest.mark.parametrize("method, options", [("dopri5", {}), ("rk4", {"step_size": 0.1}),
                                             ("beuler", {"step_size": 0.1})])
def test_cuda_model_matches_cpu(method, options):
    func = MLP(seed=1)
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    ys = pnode.odeint(func, y0, T, method=method, options=options)
    g = torch.autograd.grad(loss_fn(ys), [y0] + list(func.parameters()))
    func_cuda = MLP(seed=1).cuda()
    y0c = y0.detach().cuda().requires_grad_()
    ysc, stats = pnode.odeint(func_cuda, y0c, T.cuda(), method=method, options=options, return_stats=True)
    assert ysc.is_cuda and "staging" in stats.device_path
    gc = torch.autograd.grad(loss_fn(ysc), [y0c] + list(func_cuda.parameters()))
    assert rel_err(ysc.cpu(), ys) <= 1e-12
    for a, b in zip(gc, g):
        assert a.is_cuda and rel_err(a.cpu(), b) <= 1e-10
