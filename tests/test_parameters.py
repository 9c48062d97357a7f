"""What pnode differentiates, as a training loop changes it: parameters edited or replaced
between a forward and its backward, another subset trained from one call to the next,
tensors derived from other listed tensors, and copies of a used module.

References are torchdiffeq-style backprop through the same scheme (tests/reference).
"""

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import pnode
from helpers import output_rows
from reference.rk import explicit_rk, theta_method

T = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
STEPS = [0.1 * k for k in range(11)]
RK4 = dict(method="rk4", options={"step_size": 0.1})
# Backwards that evaluate f again: memory='states', a checkpoint budget, a recomputed forward.
RECOMPUTING = [{"memory": "states"}, {"checkpoints": 2}]


class Two(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = nn.Linear(2, 8).double()
        self.l2 = nn.Linear(8, 2).double()

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y)))


def y0_():
    return torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def rk4(memory_options, **kw):
    return dict(method="rk4", options={"step_size": 0.1, **memory_options}, **kw)


@pytest.mark.parametrize("memory_options", [{}] + RECOMPUTING)
def test_parameter_edited_between_forward_and_backward_raises(memory_options):
    """An optimizer step between the forward and a (second) backward: torch and torchdiffeq
    raise; pnode's recomputing backwards used the edited weights silently (37% off)."""
    func = Two()
    ys = pnode.odeint(func, y0_(), T, **rk4(memory_options))
    ys.sum().backward(retain_graph=True)
    with torch.no_grad():
        func.l1.weight.mul_(1.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        ys.sum().backward()


@pytest.mark.parametrize("memory_options", [{}] + RECOMPUTING)
def test_buffer_of_func_edited_between_forward_and_backward_raises(memory_options):
    """A buffer f reads (a scale, a mask, running statistics) edited after the forward: the
    recomputing backwards evaluated f with the new value, 213% (states) and 271% (checkpoints)
    off the forward's gradient, where torchdiffeq and the default mode raise."""
    func = Two()
    func.register_buffer("scale", torch.tensor(1.0, dtype=torch.float64))
    func.forward = lambda t, y: func.scale * Two.forward(func, t, y)
    ys = pnode.odeint(func, y0_().requires_grad_(), T, **rk4(memory_options))
    with torch.no_grad():
        func.scale.mul_(3.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        ys.sum().backward()


class _Normalised(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(2, 2).double()
        self.bn = nn.BatchNorm1d(2).double()

    def forward(self, t, y):
        return self.bn(torch.tanh(self.lin(y)))


def _same_in_every_mode(grads):
    """Gradients of one problem in each memory mode, the first the reference: equal to 1e-12."""
    for other in grads[1:]:
        for a, b in zip(other, grads[0]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_running_statistics_do_not_depend_on_the_memory_mode():
    """A BatchNorm in training mode updates its running statistics on every call of f: the
    backwards that evaluate f again updated them once more per evaluation (rk4, 10 steps:
    40 updates with 'graphs', 80 with 'states', 160 with checkpoints=2)."""
    results = []
    for memory_options in [{}] + RECOMPUTING:
        func = _Normalised()
        y0 = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        ys = pnode.odeint(func, y0, T, **rk4(memory_options))
        grads = torch.autograd.grad((ys ** 2).sum(), [y0, *func.parameters()], retain_graph=True)
        again = torch.autograd.grad((ys ** 2).sum(), [y0, *func.parameters()])   # a second backward
        results.append((grads, again, [b.clone() for b in func.buffers()]))
    assert int(func.bn.num_batches_tracked) == 40
    # every mode's first and second backward against the first backward of 'graphs'
    _same_in_every_mode([results[0][0] * 2] + [grads + again for grads, again, _ in results])
    for _, _, buffers in results:
        for a, b in zip(buffers, results[0][2]):
            assert torch.equal(a, b)


def test_a_buffer_that_needs_a_gradient_gets_it_in_every_mode():
    """A tensor in adjoint_params that func keeps as a buffer: the recomputing backwards
    evaluated f on a copy of it made under no_grad, and its gradient came out 0."""
    func = Two()
    func.register_buffer("c", torch.tensor([0.5, -1.5], dtype=torch.float64, requires_grad=True))
    func.forward = lambda t, y: func.c * Two.forward(func, t, y)
    params = [func.c, *func.parameters()]
    grads = [torch.autograd.grad(pnode.odeint(func, y0_(), T, **rk4(m), adjoint_params=params).pow(2).sum(), params)
             for m in [{}] + RECOMPUTING]
    assert grads[0][0].abs().min() > 0
    _same_in_every_mode(grads)


@pytest.mark.parametrize("replace", ["buffer", "submodule"])
@pytest.mark.parametrize("memory_options", RECOMPUTING)
def test_buffer_or_submodule_replaced_between_forward_and_backward_raises(memory_options, replace):
    """The version check sees edits in place only: a running_var assigned anew, or a
    parameter-free submodule swapped, and the recomputing backwards evaluated the new func
    (gradients 77% off the forward's) without a word."""
    func = Two()
    func.norm = nn.BatchNorm1d(2, affine=False).double().eval()
    func.forward = lambda t, y: func.norm(Two.forward(func, t, y))
    ys = pnode.odeint(func, y0_(), T, **rk4(memory_options))
    if replace == "buffer":
        func.norm.running_var = torch.full((2,), 4.0, dtype=torch.float64)
    else:
        func.norm = nn.BatchNorm1d(2, affine=False).double().eval()
    with pytest.raises(RuntimeError, match="func's modules changed between this call's forward and its backward"):
        ys.sum().backward()


def test_running_statistics_of_a_bound_method_s_module():
    """func = module.method: its module's buffers were neither kept from the recomputing
    backwards (running statistics updated 40, 80, 160 times) nor version-checked."""
    stats = []
    for memory_options in [{}] + RECOMPUTING:
        module = _Normalised()
        module.dynamics = module.forward
        ys = pnode.odeint(module.dynamics, y0_().repeat(2, 1), T, **rk4(memory_options),
                          adjoint_params=tuple(module.parameters()))
        ys.pow(2).sum().backward()
        stats.append([b.clone() for b in module.buffers()])
    for other in stats[1:]:
        assert all(torch.equal(a, b) for a, b in zip(other, stats[0]))


class _Decoded(nn.Module):
    """func is a method of a model whose decoder, run after the solve, edits its own buffers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(2, 2).double()
        self.dec = nn.utils.spectral_norm(nn.Linear(2, 1).double())

    def dynamics(self, t, y):
        return torch.tanh(self.lin(y))

    def forward(self, y0, memory_options):
        ys = pnode.odeint(self.dynamics, y0, T, **rk4(memory_options), adjoint_params=tuple(self.lin.parameters()))
        return self.dec(ys[-1])


@pytest.mark.parametrize("memory_options", [{}] + RECOMPUTING)
def test_buffers_func_does_not_touch_may_change_before_the_backward(memory_options):
    """Saving every buffer of func's modules for autograd's version check made any in-place
    write to any of them fail the backward, here spectral_norm's in a decoder after the solve,
    even a backward that does not evaluate func again. One that does cannot tell which of the
    model's buffers the method reads, and names the one that changed."""
    model = _Decoded()
    loss = model(y0_(), memory_options).pow(2).sum()
    if memory_options:
        with pytest.raises(RuntimeError, match="buffer 'weight_u' was modified by an inplace operation"):
            loss.backward()
        return
    loss.backward()
    assert model.lin.weight.grad.abs().sum() > 0


class _Lazy(Two):
    def forward(self, t, y):
        if not hasattr(self, "scale"):
            self.register_buffer("scale", torch.full((2,), 0.5, dtype=torch.float64))
        return self.scale * super().forward(t, y)


def test_buffer_registered_by_the_first_call():
    """The forward's own new buffer is what the backward compares with, not a change since."""
    grads = []
    for memory_options in [{}] + RECOMPUTING:
        func = _Lazy()
        g = torch.autograd.grad(pnode.odeint(func, y0_(), T, **rk4(memory_options)).pow(2).sum(),
                                list(func.parameters()))
        grads.append(g)
    _same_in_every_mode(grads)


@pytest.mark.parametrize("memory_options", RECOMPUTING)
def test_buffers_the_forward_writes_and_reads_refuse_a_recomputing_backward(memory_options):
    """spectral_norm in training updates its u, v on every call and uses them: the backward's
    evaluations saw them as the forward left them, and the gradient was 1.9% off 'graphs'."""
    func = Two()
    func.l2 = nn.utils.spectral_norm(func.l2)
    ys = pnode.odeint(func, y0_(), T, **rk4(memory_options))
    with pytest.raises(RuntimeError, match=r"func's forward wrote buffers its output may depend on \(Linear.weight_u"):
        ys.pow(2).sum().backward()


@pytest.mark.parametrize("backward_in_block", [True, False], ids=["backward-inside", "backward-after"])
@pytest.mark.parametrize("call", [dict(method="dopri5"), dict(method="beuler", rtol=1e-3),
                                  rk4({"memory": "states"}), rk4({"checkpoints": 2})],
                         ids=["dopri5", "beuler-adaptive", "rk4-states", "rk4-checkpoints"])
def test_parametrize_cached(call, backward_in_block):
    """Under parametrize.cached() a weight_norm weight is computed once and reused: pnode's
    evaluations without grad (dopri5's starting step, memory='states') cached one with no
    history, and its parameters got a zero gradient, silently."""
    func = Two()
    nn.utils.parametrizations.weight_norm(func.l1)
    y0 = y0_().requires_grad_()
    inputs = [y0] + list(func.parameters())
    with nn.utils.parametrize.cached():
        ys, stats = pnode.odeint(func, y0, T, return_stats=True, **call)
        if backward_in_block:
            got = torch.autograd.grad(ys.pow(2).sum(), inputs)
    if not backward_in_block:
        got = torch.autograd.grad(ys.pow(2).sum(), inputs)
    assert nn.utils.parametrize._cache_enabled == 0
    # backprop through the same scheme on pnode's steps, in pure torch and uncached
    method = pnode.METHODS[call["method"]]
    steps = stats.step_times
    ref = theta_method(func, y0, method.theta, steps, endpoint=method.endpoint) if method.kind == "implicit" \
        else explicit_rk(func, y0, method.subtype, steps)
    want = torch.autograd.grad(ref[output_rows(steps, T)].pow(2).sum(), inputs)
    assert all(float(g.abs().max()) > 0 for g in want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("memory_options", [{}] + RECOMPUTING)
def test_y0_buffer_refilled_before_the_backward(memory_options):
    """Gradient accumulation over batches copied into one input buffer, as torchdiffeq's
    adjoint allows: pnode's float64 y0 was a view of the buffer, so a backward that
    integrates again started from the last batch (off by 23)."""
    func, buffer = Two(), torch.empty(3, 2, dtype=torch.float64)
    batches = [y0_(), y0_().flip(0)]
    want = [torch.autograd.grad(explicit_rk(func, b, "4", STEPS)[[0, 5, 10]].pow(2).sum(),
                                list(func.parameters())) for b in batches]
    loss = 0
    for b in batches:
        buffer.copy_(b)
        loss = loss + pnode.odeint(func, buffer, T, **rk4(memory_options)).pow(2).sum()
    got = torch.autograd.grad(loss, list(func.parameters()))
    for g, w0, w1 in zip(got, *want):
        torch.testing.assert_close(g, w0 + w1, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("memory_options", RECOMPUTING)
@pytest.mark.parametrize("change", ["replace a submodule", "freeze a parameter"])
def test_parameters_changed_between_forward_and_backward_raise(memory_options, change):
    """A recomputing backward evaluated f with the new module and gave the old parameters zero."""
    func = Two()
    ys = pnode.NeuralODE(func, **rk4(memory_options))(y0_(), T)
    if change == "replace a submodule":
        func.l2 = nn.Linear(8, 2).double()
    else:
        func.l1.bias.requires_grad_(False)
    with pytest.raises(RuntimeError, match="func's parameters changed between this call's forward and its") as info:
        ys.sum().backward()
    # only the cause that applies (the message said "memory='graphs', checkpoints=2, or ...")
    cause = "checkpoints=2" if "checkpoints" in memory_options else "memory='states'"
    assert f"the backward evaluates func again ({cause}) and would" in str(info.value)


@pytest.mark.parametrize("memory_options", [{}] + RECOMPUTING)
def test_functional_call(memory_options):
    """torch.func.functional_call swaps tensors in for the forward only (MAML's fast weights):
    graphs differentiate them exactly; a recomputing backward must refuse, and say why."""
    func = Two()
    node = pnode.NeuralODE(func, **rk4(memory_options))
    fast = {name: (p * 1.5).detach().requires_grad_() for name, p in node.named_parameters()}
    ys = torch.func.functional_call(node, fast, (y0_(), T))
    if memory_options:
        with pytest.raises(RuntimeError, match=r"swapped-in tensors, as in torch.func.functional_call: use memory='graphs'"):
            ys.sum().backward()
        return
    got = torch.autograd.grad(ys.pow(2).sum(), list(fast.values()))
    with torch.no_grad():
        for name, p in func.named_parameters():
            p.copy_(fast["func." + name])
    want = torch.autograd.grad(explicit_rk(func, y0_(), "4", STEPS)[[0, 5, 10]].pow(2).sum(), list(func.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_unfreezing_between_two_forwards_and_one_backward():
    """More parameters trained now than in the first forward: its backward differentiates its own."""
    func = Two()
    node = pnode.NeuralODE(func, **rk4({"memory": "states"}))
    func.l1.weight.requires_grad_(False)
    first = node(y0_(), T).pow(2).sum()
    func.l1.weight.requires_grad_(True)
    second = node(y0_(), T).pow(2).sum()
    (first + second).backward()
    ref = explicit_rk(func, y0_(), "4", STEPS)[[0, 5, 10]].pow(2).sum()
    w1, w2 = torch.autograd.grad(ref, [func.l1.weight, func.l2.weight])
    torch.testing.assert_close(func.l1.weight.grad, w1, rtol=1e-12, atol=1e-14)   # the second call's only
    torch.testing.assert_close(func.l2.weight.grad, 2 * w2, rtol=1e-12, atol=1e-14)


def test_replaced_submodule_is_fine_when_the_backward_uses_the_forward_graphs():
    func = Two()
    old = list(func.parameters())
    ys = pnode.odeint(func, y0_(), T, **RK4)
    want = torch.autograd.grad(explicit_rk(func, y0_(), "4", STEPS)[[0, 5, 10]].sum(), old)
    func.l2 = nn.Linear(8, 2).double()
    got = torch.autograd.grad(ys.sum(), old)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("memory_options", [{}] + RECOMPUTING)
def test_training_another_subset_of_the_same_size(memory_options):
    """Progressive unfreezing: l1.weight (8x2) trained, then l2.weight (2x8). The cached
    solver cut its parameter Vec for the first shapes: a shape error in the backward."""
    func = Two()
    node = pnode.NeuralODE(func, **rk4(memory_options))
    for trained in (func.l1.weight, func.l2.weight, func.l1.weight):
        for p in func.parameters():
            p.requires_grad_(p is trained)
            p.grad = None
        node(y0_(), T).pow(2).sum().backward()
        ref = explicit_rk(func, y0_(), "4", STEPS)[[0, 5, 10]]
        want, = torch.autograd.grad(ref.pow(2).sum(), trained)
        torch.testing.assert_close(trained.grad, want, rtol=1e-12, atol=1e-14)


def test_context_vector_listed_gets_its_gradient_without_a_warning():
    """The warning about unlisted tensors looked through a listed non-leaf into its history
    (an encoder's parameters) and said they got no gradient; they did, through autograd."""
    enc, func = nn.Linear(3, 2).double(), Two()
    x = torch.randn(3, 3, dtype=torch.float64)
    c = enc(x)

    def f(t, y):
        return func(t, y) + c
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ys = pnode.odeint(f, y0_(), T, **RK4, adjoint_params=(c, *func.parameters()))
    got = torch.autograd.grad(ys.pow(2).sum(), list(enc.parameters()), retain_graph=True)
    ref = explicit_rk(f, y0_(), "4", STEPS)[[0, 5, 10]]
    want = torch.autograd.grad(ref.pow(2).sum(), list(enc.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_sibling_outputs_of_one_op_listed_together():
    """mu, logvar = h.chunk(2), both used by f and both listed (a latent ODE's context): they
    share one autograd node, and the derived-tensor check refused them."""
    enc, func = nn.Linear(3, 4).double(), Two()
    mu, logvar = enc(torch.randn(3, 3, dtype=torch.float64)).chunk(2, dim=1)
    sigma = logvar.exp()

    def f(t, y):
        return func(t, y) * sigma + mu
    ys = pnode.odeint(f, y0_(), T, **RK4, adjoint_params=(mu, sigma, *func.parameters()))
    got = torch.autograd.grad(ys.pow(2).sum(), list(enc.parameters()), retain_graph=True)
    want = torch.autograd.grad(explicit_rk(f, y0_(), "4", STEPS)[[0, 5, 10]].pow(2).sum(), list(enc.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # one sibling listed: the other's history is reported as missing its gradient
    with pytest.warns(UserWarning, match=r"depends on 2 tensor\(s\) that require grad"):
        pnode.odeint(f, y0_(), T, **RK4, adjoint_params=(mu, *func.parameters()))


def test_listing_a_tensor_and_what_it_is_computed_from_is_refused():
    """c = enc(x) and enc's parameters both listed: the encoder's gradient came out 2x."""
    enc, func = nn.Linear(3, 2).double(), Two()
    c = enc(torch.randn(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"adjoint_params\[0\] \(shape \(3, 2\)\) is computed from "
                                         r"adjoint_params\[1\] \(shape \(2, 3\)\)"):
        pnode.odeint(lambda t, y: func(t, y) + c, y0_(), T, **RK4,
                     adjoint_params=(c, *enc.parameters(), *func.parameters()))


def test_a_used_module_can_be_copied_and_saved():
    """deepcopy (an EMA copy) and torch.save of a model holding a NeuralODE that has run:
    "cannot pickle 'petsc4py.PETSc.Comm' object". The copy builds its own solvers."""
    model = nn.Sequential()
    model.node = pnode.NeuralODE(Two(), **RK4)
    y0 = y0_()
    want = model.node(y0, T)
    twin = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (twin, loaded):
        got = other.node(y0, T)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        g_other = torch.autograd.grad(got.sum(), list(other.node.func.parameters()))
        g_model = torch.autograd.grad(model.node(y0, T).sum(), list(model.node.func.parameters()))
        for a, b in zip(g_other, g_model):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("memory_options", [{}] + RECOMPUTING)
def test_gradient_hooks_act_once_on_the_total(memory_options):
    """A hook on a parameter (scaling, clipping, logging) ran on every stage's VJP and then on
    PETSc's sum: g * 3 gave 9x over 20 steps; a context vector's retained .grad summed 80
    hooked stage products (81x), and its encoder got 2x the hooked gradient."""
    enc, func = nn.Linear(3, 2).double(), Two()
    c = enc(torch.randn(3, 3, dtype=torch.float64))
    c.retain_grad()
    calls = []
    func.l1.weight.register_hook(lambda g: calls.append("w") or g * 3)
    c.register_hook(lambda g: calls.append("c") or g.clamp(-0.5, 0.5))

    def f(t, y):
        return func(t, y) + c
    y0 = y0_().requires_grad_()
    inputs = [y0, *func.parameters(), c, *enc.parameters()]
    pnode.odeint(f, y0, T, **rk4(memory_options), adjoint_params=(c, *func.parameters())).pow(2).sum().backward(
        inputs=inputs, retain_graph=True)
    got = [x.grad for x in inputs]
    assert sorted(calls) == ["c", "w"]
    for x in inputs:
        x.grad = None
    explicit_rk(f, y0, "4", STEPS)[[0, 5, 10]].pow(2).sum().backward(inputs=inputs)
    assert float(c.grad.abs().max()) == 0.5   # the clamp acted on the total
    for a, b in zip(got, [x.grad for x in inputs]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


class _Dropped(Two):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.3)
        self.head = nn.Sequential(nn.Linear(2, 2).double(), nn.Dropout(0.5))   # used after the solve only

    def forward(self, t, y):
        return self.l2(self.drop(torch.tanh(self.l1(y))))

    def undropped(self, t, y):
        return Two.forward(self, t, y)


@pytest.mark.parametrize("memory_options", RECOMPUTING)
def test_dropout_refuses_a_backward_that_evaluates_func_again(memory_options):
    """The backward's evaluations drew other masks: the gradient was 5% off, silently."""
    func = _Dropped()
    option = "checkpoints=2" if "checkpoints" in memory_options else "memory='states'"
    with pytest.raises(ValueError, match=rf"func's modules \['drop'\] drew random numbers in the forward "
                                         rf"\(training mode\), and the backward evaluates func again \({option}\).*"
                                         r"Use memory='graphs'"):
        pnode.odeint(func, y0_(), T, **rk4(memory_options))
    func.eval()   # fixed: the modes agree
    params = _solved_parameters(func)
    got = torch.autograd.grad(pnode.odeint(func, y0_(), T, **rk4(memory_options)).pow(2).sum(), params)
    want = torch.autograd.grad(explicit_rk(func, y0_(), "4", STEPS)[[0, 5, 10]].pow(2).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def _solved_parameters(func):
    return list(func.l1.parameters()) + list(func.l2.parameters())


@pytest.mark.parametrize("memory_options", [{}] + RECOMPUTING)
def test_a_dropout_func_does_not_call_is_not_refused(memory_options):
    """A bound method's module holds a Dropout only its other methods use (a readout): it was
    refused, also with the default mode when another call had shared the solver."""
    func = _Dropped()
    params = _solved_parameters(func)
    ys = pnode.odeint(func.undropped, y0_(), T, **rk4(memory_options), adjoint_params=params)
    pnode.odeint(func.undropped, y0_().flip(0), T, **rk4(memory_options), adjoint_params=params)
    got = torch.autograd.grad(func.head(ys).pow(2).sum(), params)
    assert all(float(g.abs().max()) > 0 for g in got)


def test_dropout_keeps_its_masks_with_graphs_and_refuses_a_recomputed_second_backward():
    func = _Dropped()
    torch.manual_seed(5)
    ys = pnode.odeint(func, y0_(), T, **RK4)
    got = torch.autograd.grad(ys.pow(2).sum(), _solved_parameters(func), retain_graph=True)
    torch.manual_seed(5)   # the same masks, drawn in the same order
    ref = explicit_rk(func, y0_(), "4", STEPS)[[0, 5, 10]]
    want = torch.autograd.grad(ref.pow(2).sum(), _solved_parameters(func))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    func.eval()   # the forward drew masks: a recomputation in eval mode differentiated another func (21% off)
    with pytest.raises(ValueError, match=r"\['drop'\] drew random numbers .*\(its forward is recomputed.*"
                                         r"Call backward once per forward"):
        ys.pow(2).sum().backward()
