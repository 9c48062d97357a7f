"""The same inputs give bit-identical outputs and gradients on repeated calls, whatever ran
in between; backward twice on one graph is PyTorch's usual error, or with retain_graph the
same gradient again; two forwards through one module, then one backward, are exact."""

import pytest
import torch
from torch import nn

import pnode

T = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)
Y0 = torch.tensor([[1.0, -0.5, 0.25], [0.3, 0.8, -0.2]], dtype=torch.float64)
OTHER_Y0 = torch.tensor([[-0.7, 0.1, 0.9], [0.2, -0.3, 0.4]], dtype=torch.float64)
OTHER_T = torch.tensor([0.5, 0.1, -0.3], dtype=torch.float64)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.l1 = nn.Linear(3, 8, dtype=torch.float64)
        self.l2 = nn.Linear(8, 3, dtype=torch.float64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y))) * torch.cos(t) - 0.1 * y


class Split(nn.Module):
    """An IMEX pair: a nonstiff network and a stiff linear decay."""

    def __init__(self):
        super().__init__()
        self.net = Net()

    def nonstiff(self, t, y):
        return self.net(t, y)

    def stiff(self, t, y):
        return -20.0 * y


CASES = [
    ("rk4", {"step_size": 0.1}),
    ("dopri5", {}),
    ("dopri5", {"memory": "states"}),
    ("dopri5", {"checkpoints": 3}),
    ("bosh3", {"checkpoints": 1}),
    ("beuler", {}),
    ("cn", {"step_size": 0.2, "memory": "states"}),
    ("arkimex", {}),
]
IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for m, o in CASES]


def outputs(call, func, y0=Y0, t=T):
    """(ys, dL/dy0, dL/dp...) of one forward+backward."""
    y0 = y0.clone().requires_grad_()
    ys = call(y0, t)
    w = torch.linspace(-1.0, 1.0, ys.numel(), dtype=ys.dtype).view_as(ys)
    loss = (w * ys).sum() + (ys ** 2).sum()
    return (ys.detach(),) + torch.autograd.grad(loss, [y0] + list(func.parameters()))


def assert_identical(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


def make(method, options):
    func = Split() if method == "arkimex" else Net()
    return func, pnode.NeuralODE(func, method=method, rtol=1e-4, atol=1e-6, options=options)


@pytest.mark.parametrize("method, options", CASES, ids=IDS)
def test_repeated_calls_are_bit_identical(method, options):
    func, module = make(method, options)
    first = outputs(module, func)
    # Something else in between: another state, another (decreasing) time grid.
    outputs(module, func, OTHER_Y0, OTHER_T)
    assert_identical(outputs(module, func), first)
    # odeint with the same func and a fresh module give the same bits as well.
    via_odeint = outputs(lambda y0, t: pnode.odeint(func, y0, t, method=method, rtol=1e-4, atol=1e-6,
                                                    options=options), func)
    assert_identical(via_odeint, first)
    assert_identical(via_odeint, outputs(lambda y0, t: pnode.odeint(
        func, y0, t, method=method, rtol=1e-4, atol=1e-6, options=options), func))
    func2, module2 = make(method, options)   # same seeds: the same numbers in new objects
    assert_identical(outputs(module2, func2), first)


def test_forward_without_grad_matches_forward_with_grad():
    func, module = make("dopri5", {})
    with torch.no_grad():
        plain = module(Y0, T)
    assert torch.equal(plain, outputs(module, func)[0])


# --------------------------------------------------------------------------------------------
# backward twice on the same graph

@pytest.mark.parametrize("options", [{"step_size": 0.1}, {"step_size": 0.1, "checkpoints": 2},
                                     {"step_size": 0.1, "memory": "states"}])
def test_backward_twice_without_retain_graph_is_pytorchs_error(options):
    func, module = make("rk4", options)
    y0 = Y0.clone().requires_grad_()
    loss = module(y0, T).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


@pytest.mark.parametrize("method, options", [("rk4", {"step_size": 0.1}),
                                             ("rk4", {"step_size": 0.1, "checkpoints": 2}),
                                             ("dopri5", {"memory": "states"}), ("beuler", {})])
def test_backward_twice_with_retain_graph_doubles_the_gradient_exactly(method, options):
    func, module = make(method, options)
    y0 = Y0.clone().requires_grad_()
    loss = module(y0, T).sum()
    loss.backward(retain_graph=True)
    once = [y0.grad.clone()] + [p.grad.clone() for p in func.parameters()]
    # Another call in between overwrites the solver's trajectory: the second backward
    # must still differentiate the first call.
    outputs(module, func, OTHER_Y0, OTHER_T)
    loss.backward()
    twice = [y0.grad] + [p.grad for p in func.parameters()]
    for a, b in zip(once, twice):
        assert torch.equal(2 * a, b)


@pytest.mark.parametrize("method, options", [("rk4", {"step_size": 0.1}), ("dopri5", {}),
                                             ("dopri5", {"checkpoints": 2}), ("beuler", {})])
def test_two_forwards_then_one_backward(method, options):
    """The second forward overwrites the solver's trajectory; the first call's backward
    recomputes it. The gradient of the sum is the sum of the separate gradients."""
    func, module = make(method, options)
    a = Y0.clone().requires_grad_()
    b = OTHER_Y0.clone().requires_grad_()
    loss = (module(a, T) ** 2).sum() + module(b, OTHER_T).sum()
    together = torch.autograd.grad(loss, [a, b] + list(func.parameters()))

    ga = torch.autograd.grad((module(a, T) ** 2).sum(), [a] + list(func.parameters()))
    gb = torch.autograd.grad(module(b, OTHER_T).sum(), [b] + list(func.parameters()))
    assert torch.equal(together[0], ga[0])
    assert torch.equal(together[1], gb[0])
    for g, x, y in zip(together[2:], ga[1:], gb[1:]):
        torch.testing.assert_close(g, x + y, rtol=1e-14, atol=1e-14)   # the sum's rounding only
