"""What a torchdiffeq user brings along: tuple states, method=None, odeint_adjoint's
keywords, plain callables in the module wrapper, torch.func transforms. Each either works
like torchdiffeq or is refused with a message that says what to do instead."""

import re
import warnings

import pytest
import torch
import torchdiffeq
from torch import nn

import pnode

T = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
RK4 = dict(method="rk4", options={"step_size": 0.05})
# torchdiffeq's rk4 is the 3/8 rule, PETSc's the classical one; their midpoints are the same scheme
MIDPOINT = dict(method="midpoint", options={"step_size": 0.05})


class Coupled(nn.Module):
    """Position and velocity of different shapes, each rate depending on both."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(2, 2).double()
        self.b = nn.Linear(3, 3).double()

    def forward(self, t, state):
        x, v = state
        return torch.tanh(self.a(x)) + v[:, :2], self.b(v) * torch.cos(t) - x.mean()


def _state():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(4, 2, dtype=torch.float64, generator=g).requires_grad_(),
            torch.randn(4, 3, dtype=torch.float64, generator=g).requires_grad_())


def _loss(ys):
    return sum((y ** 2).sum() + y[-1].sum() for y in ys)


def test_tuple_state_matches_torchdiffeq():
    func, state = Coupled(), _state()
    ys = pnode.odeint(func, state, T, **MIDPOINT)
    ref = torchdiffeq.odeint(func, state, T, **MIDPOINT)
    assert isinstance(ys, tuple) and [y.shape for y in ys] == [(3, 4, 2), (3, 4, 3)]
    inputs = [*state, *func.parameters()]
    got, want = torch.autograd.grad(_loss(ys), inputs), torch.autograd.grad(_loss(ref), inputs)
    for a, b in zip(ys, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method, options", [("beuler", {"step_size": 0.1}), ("dopri5", {}),
                                             ("arkimex", {"step_size": 0.1})])
def test_tuple_state_equals_the_state_packed_by_hand(method, options):
    func, state = Coupled(), _state()

    def packed(t, y):
        return torch.cat([z.reshape(-1) for z in func(t, (y[:8].view(4, 2), y[8:].view(4, 3)))])
    params = list(func.parameters())
    ys = pnode.odeint(func, state, T, method=method, options=options)
    flat = pnode.odeint(packed, torch.cat([s.reshape(-1) for s in state]), T, method=method,
                        options=options, adjoint_params=params)
    torch.testing.assert_close(torch.cat([y.reshape(3, -1) for y in ys], 1), flat, rtol=0, atol=0)
    inputs = [*state, *params]
    got = torch.autograd.grad(_loss(ys), inputs)
    want = torch.autograd.grad(_loss((flat[:, :8].reshape(3, 4, 2), flat[:, 8:].reshape(3, 4, 3))), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_tuple_state_in_the_module_wrapper_and_bad_tuples():
    func, state = Coupled(), _state()
    ys = pnode.NeuralODE(func, **RK4)(state, T)
    torch.testing.assert_close(ys[1], pnode.odeint(func, state, T, **RK4)[1], rtol=0, atol=0)
    mixed = pnode.odeint(func, (state[0], state[1].float()), T, **RK4)   # promoted, as torchdiffeq's cat does
    assert [y.dtype for y in mixed] == [torch.float64] * 2
    torch.testing.assert_close(mixed[1], ys[1], rtol=1e-6, atol=1e-6)
    with pytest.raises(pnode.RHSError, match="must return a tuple of 2 tensors for a tuple y0, got Tensor"):
        pnode.odeint(lambda t, y: y[0], state, T, **RK4, adjoint_params=())


def test_tuple_state_with_a_0d_member_subset_parameters_and_edited_outputs():
    """A 0-d member failed to reshape; listing some of func's parameters warned about the
    others (func was hidden behind the packing closure); split's outputs could not be edited."""
    func = Coupled()
    state = (torch.tensor(0.5, dtype=torch.float64, requires_grad=True), *_state())

    def f(t, y):
        return (-y[0], *func(t, y[1:]))
    ys = pnode.odeint(f, state, T, **MIDPOINT, adjoint_params=list(func.parameters()))
    ref = torchdiffeq.odeint(f, state, T, **MIDPOINT)
    for a, b in zip(torch.autograd.grad(_loss(ys), state), torch.autograd.grad(_loss(ref), state)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = pnode.odeint(func, _state(), T, **MIDPOINT, adjoint_params=[func.a.weight])
    out[0][0] = 0.0
    out[1].mul_(2.0)
    g, = torch.autograd.grad(_loss(out), func.a.weight)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("swap", ["order", "dtype"])
def test_tuple_members_are_checked_one_by_one(swap):
    """Only the packed size was checked: members returned in the other order (equal total
    size) integrated another ODE, and a float32 member was cast, with no error."""
    state = (torch.ones(4, 3, dtype=torch.float64), torch.ones(6, 2, dtype=torch.float64))

    def f(t, y):
        return (y[1], y[0]) if swap == "order" else (-y[0], -y[1].float())
    words = "func's output [0] is shape (6, 2)" if swap == "order" else "func's output [1] is shape (6, 2), dtype torch.float32"
    with pytest.raises(pnode.RHSError, match=re.escape(words)):
        pnode.odeint(f, state, T, **RK4, adjoint_params=())


def test_step_size_with_an_adaptive_method_warns():
    """torchdiffeq ignores step_size for dopri5; pnode took fixed steps and ignored rtol with
    no word (h = 1 at rtol 1e-10: 2400% off)."""
    y0 = torch.ones(2, dtype=torch.float64)
    with pytest.warns(UserWarning, match="'dopri5' take fixed steps of that size") as record:
        pnode.odeint(lambda t, y: -y, y0, T, method="dopri5", rtol=1e-10, options={"step_size": 0.5},
                     adjoint_params=())
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pnode.odeint(lambda t, y: -y, y0, T, **RK4, adjoint_params=())


@pytest.mark.parametrize("options", [{"memory": "graphs"}, {"memory": "states"}, {"checkpoints": 2}])
def test_autocast_region_runs_func_in_the_state_dtype(options):
    """Under torch.autocast func returned bfloat16 and pnode refused it as a dtype mismatch;
    evaluated in bfloat16 in the forward and float32 in a recomputing backward (outside the
    region) it would not be one function. Inside the solve autocast is off."""
    torch.manual_seed(0)
    func = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    y0 = torch.randn(4, 3, requires_grad=True)
    t = T.float()
    opts = {"step_size": 0.05, **options}
    results = []
    for autocast in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            ys = pnode.odeint(lambda s, y: func(y), y0, t, method="rk4", options=opts,
                              adjoint_params=list(func.parameters()))
        assert ys.dtype == torch.float32
        results.append((ys, torch.autograd.grad(ys.pow(2).sum(), [y0, *func.parameters()])))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)


def test_method_none_is_dopri5():
    y0 = torch.ones(2, dtype=torch.float64)
    torch.testing.assert_close(pnode.odeint(lambda t, y: -y, y0, T, method=None, adjoint_params=()),
                               pnode.odeint(lambda t, y: -y, y0, T, method="dopri5", adjoint_params=()))


@pytest.mark.parametrize("key, words", [("adjoint_rtol", "no tolerances of its own: drop it"),
                                        ("adjoint_atol", "no tolerances of its own"),
                                        ("adjoint_method", "discrete adjoint"),
                                        ("adjoint_options", "options= sets the forward's"),
                                        ("event_fn", "no event handling"),
                                        ("rotl", "unexpected keyword argument 'rotl'")])
def test_odeint_adjoint_keywords(key, words):
    """They were a bare "got an unexpected keyword argument" that did not say they can go."""
    with pytest.raises(TypeError, match=re.escape(words)):
        pnode.odeint_adjoint(lambda t, y: -y, torch.ones(2, dtype=torch.float64), T, adjoint_params=(),
                             **{key: 1e-6})


def test_module_wrapper_takes_a_callable_with_adjoint_params():
    """NeuralODE(callable) failed only at its first call, asking for an adjoint_params it had no way to take."""
    with pytest.raises(ValueError, match="pass adjoint_params="):
        pnode.NeuralODE(lambda t, y: -y)
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    node = pnode.NeuralODE(lambda t, y: -w * y, adjoint_params=iter([w]), **RK4)
    y = node(torch.ones(2, dtype=torch.float64), T)
    y[-1].sum().backward()
    # d/dw of 2 exp(-w): the rk4 solution is accurate to 1e-7 at this step
    torch.testing.assert_close(w.grad, -2 * torch.exp(-w.detach()), rtol=1e-6, atol=0)
    node(torch.ones(2, dtype=torch.float64), T)[-1].sum().backward()   # the iterator was kept as a tuple
    torch.testing.assert_close(w.grad, -4 * torch.exp(-w.detach()), rtol=1e-6, atol=0)


def test_plain_callable_needs_no_adjoint_params_under_no_grad():
    """Evaluation and plotting code under torch.no_grad() was refused for a missing
    adjoint_params, though nothing can be differentiated there; in grad mode it still is."""
    y0 = torch.ones(2, dtype=torch.float64)
    with torch.no_grad():
        ys = pnode.odeint(lambda t, y: -y, y0, T, **RK4)
    with torch.inference_mode():
        pnode.odeint(lambda t, y: -y, y0, T, **RK4)
    torch.testing.assert_close(ys[-1], torch.exp(-T[-1]) * y0, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="pass adjoint_params="):
        pnode.odeint(lambda t, y: -y, y0, T, **RK4)
    # no_grad does not stop forward-mode AD: a closure over a dual tensor would lose its tangent
    import torch.autograd.forward_ad as fwAD
    with torch.no_grad(), fwAD.dual_level():
        w = fwAD.make_dual(torch.tensor(0.5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
        with pytest.raises(ValueError, match="pass adjoint_params="):
            pnode.odeint(lambda t, y: -w * y, y0, T, **RK4)


def test_adjoint_params_must_be_a_sequence_not_a_tensor():
    """A bare tensor was iterated into its rows: w got a zero gradient and a warning that it was
    not in adjoint_params."""
    w = torch.tensor([0.5, 0.25], dtype=torch.float64, requires_grad=True)
    y0 = torch.ones(2, dtype=torch.float64)
    for call in (lambda: pnode.odeint(lambda t, y: -w * y, y0, T, **RK4, adjoint_params=w),
                 lambda: pnode.NeuralODE(lambda t, y: -w * y, **RK4, adjoint_params=w)):
        with pytest.raises(TypeError, match=re.escape("got one tensor of shape (2,): pass (w,)")):
            call()


def test_tuple_state_with_a_pair_for_a_method_without_a_split():
    """With a tuple y0 the pair reached the solver and failed at the first step as "'tuple'
    object is not callable"; a tensor y0 was refused up front."""
    func = Coupled()
    with pytest.raises(TypeError, match=re.escape("func (explicit part) must be callable as f(t, y), got tuple")):
        pnode.odeint((func, func), _state(), T, **RK4, adjoint_params=list(func.parameters()))


@pytest.mark.parametrize("method, options, words", [
    ("rk4", {"first_step": 0.01}, "method 'rk4' takes fixed steps: use options['step_size']"),
    ("dopri5", {"first_step": 0.01, "step_size": 0.1}, "options['step_size'] fixes them: drop one")])
def test_first_step_that_would_be_ignored(method, options, words):
    """rk4 with first_step=0.01 took its two 0.5 steps, silently."""
    with pytest.raises(ValueError, match=re.escape(words)):
        pnode.odeint(lambda t, y: -y, torch.ones(2, dtype=torch.float64), T, method=method, options=options,
                     adjoint_params=())


def test_torch_func_transforms_are_refused():
    """vmap failed with "data-dependent control flow" from a check of y0's values; over the
    parameters (functional_call, y0 plain) grad, jvp and vmap failed inside torch."""
    def solve(y0):
        return pnode.odeint(lambda t, y: -y, y0, T, adjoint_params=())[-1]
    with pytest.raises(TypeError, match="under a torch.func transform"):
        torch.vmap(solve)(torch.ones(3, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="batch along y0's first dimension"):
        torch.func.grad(lambda y0: solve(y0).sum())(torch.ones(2, dtype=torch.float64))
    net = nn.Linear(2, 2).double()
    params = {k: v.detach() for k, v in net.named_parameters()}
    y0 = torch.ones(3, 2, dtype=torch.float64)

    def loss(p):
        f = lambda t, y: torch.func.functional_call(net, p, (y,))   # noqa: E731
        return pnode.odeint(f, y0, T, adjoint_params=tuple(p.values()), **RK4).sum()
    ones = {k: torch.ones_like(v) for k, v in params.items()}
    batched = {k: v.expand(2, *v.shape) for k, v in params.items()}
    for transform in (lambda: torch.func.grad(loss)(params), lambda: torch.func.jvp(loss, (params,), (ones,)),
                      lambda: torch.vmap(loss)(batched)):
        with pytest.raises(TypeError, match="under a torch.func transform"):
            transform()


def test_forward_mode_tangents_are_refused_not_dropped():
    """A dual y0 (or parameter) came out of odeint without a tangent under no_grad or with
    frozen parameters; torchdiffeq propagates it."""
    import torch.autograd.forward_ad as fwAD
    net = nn.Linear(2, 2).double()
    y0 = torch.ones(3, 2, dtype=torch.float64)
    with torch.no_grad(), fwAD.dual_level():
        with pytest.raises(TypeError, match="y0 carries a forward-mode tangent"):
            pnode.odeint(lambda t, y: net(y), fwAD.make_dual(y0, torch.ones_like(y0)), T,
                         adjoint_params=tuple(net.parameters()), **RK4)
        w = fwAD.make_dual(net.weight.detach(), torch.ones_like(net.weight))
        with pytest.raises(TypeError, match=r"a parameter \(shape \(2, 2\)\) carries a forward-mode tangent"):
            pnode.odeint(lambda t, y: y @ w.T, y0, T, adjoint_params=(w,), **RK4)
    with fwAD.dual_level():   # a level with plain tensors only: nothing to refuse
        assert pnode.odeint(lambda t, y: net(y), y0, T, adjoint_params=tuple(net.parameters()), **RK4).shape \
            == (3, 3, 2)


def test_batched_gradients_are_refused_by_name():
    """jacobian(vectorize=True) failed with torch's 'Batching rule not implemented for
    aten::detach'; vectorize=False is the way, and it matches torchdiffeq's backprop."""
    net = nn.Linear(2, 2).double()
    y0 = torch.ones(2, 2, dtype=torch.float64)
    params = tuple(net.parameters())
    solve = lambda y: pnode.odeint(lambda t, z: torch.tanh(net(z)), y, T, adjoint_params=params,  # noqa: E731
                                   **MIDPOINT)
    with pytest.raises(RuntimeError, match="one gradient at a time"):
        torch.autograd.functional.jacobian(solve, y0, vectorize=True)
    ref = lambda y: torchdiffeq.odeint(lambda t, z: torch.tanh(net(z)), y, T, **MIDPOINT)   # noqa: E731
    torch.testing.assert_close(torch.autograd.functional.jacobian(solve, y0),
                               torch.autograd.functional.jacobian(ref, y0), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["rk4", "beuler", "arkimex"])
def test_inference_mode_then_training(method):
    """A first call under torch.inference_mode (a validation pass) cached inference tensors
    as views of the solver's Vecs, and every later training call failed ('Inplace update to
    inference tensor outside InferenceMode'); implicit methods could not run in it at all
    (Newton's Jacobians need autograd)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2).double()

        def forward(self, t, y):
            return torch.tanh(self.lin(y))
    net = Net()
    y0 = torch.tensor([[1.0, -0.5], [0.25, 0.5]], dtype=torch.float64)
    node = pnode.NeuralODE(net, method=method, options={"step_size": 0.1})
    with torch.inference_mode():
        ys_inference = node(y0, T)
    ys = node(y0, T)
    ys.pow(2).sum().backward()
    fresh = pnode.NeuralODE(net, method=method, options={"step_size": 0.1})(y0, T)
    assert torch.equal(ys_inference, ys.detach()) and torch.equal(ys.detach(), fresh.detach())
    assert net.lin.weight.grad is not None


@pytest.mark.parametrize("options", [{"step_size": 0.1}, {"step_size": 0.1, "memory": "states"},
                                     {"step_size": 0.1, "checkpoints": 2}])
def test_backward_under_inference_mode(options):
    """PyTorch runs a backward under inference_mode when the graph was built outside it: the
    solver's views of its Vecs were then cached as inference tensors and every later call
    failed ('Inplace update to inference tensor'); with memory='states' the backward itself
    raised 'element 0 of tensors does not require grad'."""
    net = nn.Linear(2, 2).double()
    node = pnode.NeuralODE(lambda t, y: torch.tanh(net(y)), method="rk4", options=options,
                           adjoint_params=tuple(net.parameters()))
    y0 = torch.tensor([[1.0, -0.5], [0.25, 0.5]], dtype=torch.float64, requires_grad=True)
    loss = node(y0, T).pow(2).sum()
    with torch.inference_mode():
        grads = torch.autograd.grad(loss, [y0, *net.parameters()])
    again = torch.autograd.grad(node(y0, T).pow(2).sum(), [y0, *net.parameters()])
    for a, b in zip(grads, again):
        assert torch.equal(a, b)
