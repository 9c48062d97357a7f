"""One module used by two threads at once, or again from inside its own func.

A module's solvers are shared by its calls. Two threads calling one NeuralODE crashed the
process (SEGV: one thread removed the PETSc trajectory the other was writing), and a func
that called its own module again failed with PETSc error 73, or, caught, left the outer
solve without its right-hand side. Threads now take turns on a solver, and a nested call
gets a solver of its own; either way the results are those of separate, sequential calls.
"""

import threading

import pytest
import torch
from torch import nn

import pnode
from helpers import MLP

T = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
MODES = {"graphs": {}, "states": {"memory": "states"}, "checkpoints": {"checkpoints": 2}}


def _gradients(node, func, y0):
    y0 = y0.clone().requires_grad_()
    ys = node(y0, T)
    return [ys.detach()] + list(torch.autograd.grad((ys ** 2).sum(), [y0, *func.parameters()]))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_two_threads_share_one_module(mode):
    func = MLP(seed=4)
    node = pnode.NeuralODE(func, method="rk4", options={"step_size": 0.05, **MODES[mode]})
    inputs = [torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    expected = [_gradients(node, func, y0) for y0 in inputs]
    results, errors = {}, []

    def work(i):
        try:
            results[i] = [_gradients(node, func, inputs[i]) for _ in range(6)]
        except Exception as exc:   # reported below: an assertion in a thread would be lost
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i in range(2):
        for got in results[i]:
            assert all(torch.equal(a, b) for a, b in zip(got, expected[i]))


LATER = T + 2.0


class Nested(nn.Module):
    """On [0, 1], dy/dt = (y carried over [2, 3] by this same module) - y; on [2, 3], an MLP.

    func calls its own NeuralODE with the same state shape and number of times (the same
    solver, had it not been busy); it branches on t, so the backward's recomputations
    take the same branches as the forward.
    """

    def __init__(self):
        super().__init__()
        self.mlp = MLP(seed=5)
        self.inner = None     # the NeuralODE that integrates this module; not a submodule

    def forward(self, t, y):
        if t >= 2.0:
            return self.mlp(t, y)
        return self.inner(y, LATER)[-1] - y


@pytest.mark.parametrize("mode", sorted(MODES))
def test_func_calls_its_own_module(mode):
    options = {"step_size": 0.25, **MODES[mode]}
    func = Nested()
    node = pnode.NeuralODE(func, method="rk4", options=options)
    object.__setattr__(func, "inner", node)           # the module solving calls itself
    reference = Nested()
    reference.mlp.load_state_dict(func.mlp.state_dict())
    object.__setattr__(reference, "inner", pnode.NeuralODE(reference, method="rk4", options=options))
    outer = pnode.NeuralODE(reference, method="rk4", options=options)   # two modules: two solvers
    y0 = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for got, want in zip(_gradients(node, func, y0), _gradients(outer, reference, y0)):
        assert torch.equal(got, want)


def test_a_thread_whose_call_fails_keeps_the_solver_while_it_is_rebuilt(monkeypatch):
    """A failed call rebuilds its solver (a fresh TS): the rebuild gave the solver a new,
    unheld lock and a zero busy count, so another thread's call took it half-built and ran
    on a destroyed TS (SEGV, 3 of 11 runs without the delay added here)."""
    import pnode._solver as solver_module
    build, rebuilding = solver_module.build_ts, threading.Event()

    def slow_rebuild(solver, *args, **kwargs):
        if threading.current_thread().name == "failing" and solver.ts is not None:
            rebuilding.set()
            threading.Event().wait(0.5)   # the window the other thread's call fell into
        return build(solver, *args, **kwargs)
    monkeypatch.setattr(solver_module, "build_ts", slow_rebuild)

    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = MLP(seed=2)

        def forward(self, t, y):
            if threading.current_thread().name == "failing" and float(t) > 0.5:
                raise ValueError("this thread's batch is bad")
            return self.inner(t, y)
    func = Fails()
    node = pnode.NeuralODE(func, method="rk4", options={"step_size": 0.05})
    y0 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = _gradients(node, func, y0)
    outcome = {}

    def failing():
        try:
            node(y0, T)
        except pnode.RHSError as exc:
            outcome["failing"] = exc

    def other():
        rebuilding.wait(10)
        try:
            outcome["other"] = _gradients(node, func, y0)
        except Exception as exc:
            outcome["other"] = exc
    threads = [threading.Thread(target=failing, name="failing"), threading.Thread(target=other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert "this thread's batch is bad" in str(outcome["failing"])
    assert isinstance(outcome["other"], list), outcome["other"]
    for a, b in zip(outcome["other"], expected):
        assert torch.equal(a, b)
