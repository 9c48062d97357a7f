"""Memory-bounded checkpointing: same gradients as storing everything, the binomial
optimum of recomputed steps, and memory that stays flat as the number of steps grows."""

from functools import lru_cache
from math import comb

import pytest
import torch

import pnode
from helpers import MLP, Stiff, loss_fn, rel_err
from pnode._checkpoint import split, sweeps

T = torch.tensor([0.0, 0.3, 0.75, 1.2], dtype=torch.float64)


@lru_cache(None)
def dp_optimum(l, s):
    """Fewest step executions reversing l steps with s stored states (the start included),
    when reversing a step means executing it once more with its stages kept.
    Computed by brute-force dynamic programming, independently of pnode's formula."""
    if l == 1:
        return 1
    if s == 1:
        return l * (l + 1) // 2
    return min(m + dp_optimum(l - m, s - 1) + dp_optimum(m, s) for m in range(1, l))


def optimal_cost(l, s):
    """T(l, s) = (r + 1) l - C(s + r, s + 1) of Griewank & Walther (ACM TOMS 2000), the formula
    the README quotes; l (l + 1) / 2 with the start alone stored."""
    if s == 1:
        return l * (l + 1) // 2
    r = sweeps(l, s)
    return (r + 1) * l - comb(s + r, s + 1)


@pytest.mark.parametrize("s", [1, 2, 3, 4, 6])
def test_schedule_formula_and_split_are_optimal(s):
    for l in range(1, 60):
        assert optimal_cost(l, s) == dp_optimum(l, s), (l, s)
        if l >= 2 and s >= 2:
            m = split(l, s)
            assert m + dp_optimum(l - m, s - 1) + dp_optimum(m, s) == dp_optimum(l, s), (l, s, m)


def _grads(func, y0, method, options, t=T, rtol=1e-5):
    ys, stats = pnode.odeint(func, y0, t, method=method, rtol=rtol, atol=1e-7, options=options,
                             return_stats=True)
    return torch.autograd.grad(loss_fn(ys), [y0] + list(func.parameters())), stats


CASES = [("rk4", {"step_size": 0.05}), ("dopri5", {}), ("bosh3", {}), ("verner8", {}),
         ("beuler", {"step_size": 0.05}), ("cn", {}), ("arkimex-3", {})]


@pytest.mark.parametrize("method, options", CASES, ids=[c[0] + ("-fixed" if c[1] else "-adaptive") for c in CASES])
@pytest.mark.parametrize("memory", ["graphs", "states"])
def test_any_budget_gives_the_store_everything_gradient(method, options, memory):
    implicit = pnode.METHODS[method].kind != "explicit"
    func = Stiff(seed=2, rates=(10.0, 3.0, 30.0)) if implicit else MLP(seed=3)
    y0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64,
                     requires_grad=True)
    rtol = 1e-3 if implicit else 1e-5
    reference, ref_stats = _grads(func, y0, method, dict(options, memory=memory), rtol=rtol)
    if implicit:  # Newton's Jacobians evaluate f with grad only where no tape keeps the residual's graph
        assert (ref_stats.linearisations > 0) == (memory == "states")
    n = ref_stats.steps
    # k = 1 recomputes n(n+1)/2 steps: only on short runs
    for k in ((1, 2, 5, n + 1) if n <= 30 else (2, 5, n + 1)):
        g, stats = _grads(func, y0, method, dict(options, memory=memory, checkpoints=k), rtol=rtol)
        assert stats.step_times == ref_stats.step_times
        for a, b in zip(g, reference):
            assert rel_err(a, b) <= 1e-12, f"k={k}: {rel_err(a, b):.2e}"
        assert stats.checkpoints <= k
        # the checkpoint at step 0 is y0 itself: s = k states reverse n steps
        assert stats.recomputed_steps == dp_optimum(n, min(k, n)), (k, n)


@pytest.mark.parametrize("k", [2, 3])
def test_recomputed_steps_match_binomial_optimum(k):
    func = MLP(seed=7)
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for n in (5, 9, 17, 30):
        _, stats = _grads(func, y0, "rk4", {"step_size": 1.0 / n, "checkpoints": k}, t=t)
        assert stats.steps == n
        assert stats.recomputed_steps == dp_optimum(n, k)


def test_memory_is_flat_in_the_number_of_steps():
    func = MLP(seed=9)
    y0 = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    peak, traj = [], []
    for n in (20, 200):
        _, stats = _grads(func, y0, "rk4", {"step_size": 1.0 / n, "checkpoints": 4}, t=t)
        peak.append(stats.peak_checkpoint_bytes)
        _, full = _grads(func, y0, "rk4", {"step_size": 1.0 / n, "memory": "states"}, t=t)
        traj.append(full.trajectory_bytes)
    state = y0.numel() * 8
    assert peak[0] == peak[1] <= 4 * state + 4 * state  # 4 checkpoints + one step's 4 stages
    assert traj[1] == 10 * traj[0]


def test_budget_validation():
    func = MLP(seed=1)
    y0 = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="checkpoints"):
        pnode.odeint(func, y0, T, options={"checkpoints": 0})
    for bad in (True, 1.5, torch.tensor(2.5)):
        with pytest.raises(ValueError, match="checkpoints"):
            pnode.odeint(func, y0, T, options={"checkpoints": bad})


def test_budget_from_numpy_or_a_tensor():
    """int(np.sqrt(n))-style budgets are numpy integers: they were refused as not integers."""
    import numpy as np
    func = MLP(seed=1)
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    reference, _ = _grads(func, y0, "rk4", {"step_size": 0.1, "checkpoints": 3})
    for k in (np.int64(3), torch.tensor(3), 3.0):
        g, stats = _grads(func, y0, "rk4", {"step_size": 0.1, "checkpoints": k})
        assert stats.checkpoints <= 3 and all(torch.equal(a, b) for a, b in zip(g, reference))


def test_a_budget_deeper_than_pythons_recursion_limit():
    """The schedule nests once per stored checkpoint: with 1000 of them the recursion ran out
    of Python's stack, reported as 'func raised RecursionError'."""
    func = MLP(seed=1)
    y0 = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    reference, _ = _grads(func, y0, "euler", {"step_size": 1 / 1200}, t=t)
    g, stats = _grads(func, y0, "euler", {"step_size": 1 / 1200, "checkpoints": 1000}, t=t)
    assert stats.steps == 1200 and stats.recomputed_steps == optimal_cost(1200, 1000)   # formula: checked by DP above
    assert all(rel_err(a, b) <= 1e-12 for a, b in zip(g, reference))


class _Counted(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return self.inner(t, y)


@pytest.mark.parametrize("options", [{"checkpoints": 2}, {"checkpoints": 3, "memory": "states"},
                                     {"memory": "states"}])
def test_stats_count_the_backward_apart(options):
    """With checkpoints the backward's replays were counted as forward evaluations
    (rhs_evals 93 -> 366) and recomputed_rhs stayed 0."""
    func = _Counted(MLP(dim=2, seed=1))
    y0 = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ys, stats = pnode.odeint(func, y0, T, method="dopri5", options=options, return_stats=True)
    forward = func.calls
    assert stats.rhs_evals == forward
    loss_fn(ys).backward()
    assert stats.rhs_evals == forward
    assert stats.recomputed_rhs == func.calls - forward > 0


def test_an_earlier_call_differentiated_later_leaves_the_last_forward_stats():
    """Its recomputed forward overwrote steps, step_times and forward_seconds of the latest call."""
    func = MLP(dim=2, seed=1)
    node = pnode.NeuralODE(func, method="dopri5", options={"memory": "states"})
    ya = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    first = node(ya, T)
    first_steps = node.stats.steps
    node(3 * ya, T * 2)
    latest = (node.stats.steps, list(node.stats.step_times), node.stats.forward_seconds, node.stats.rhs_evals)
    assert latest[0] != first_steps
    loss_fn(first).backward()
    assert (node.stats.steps, node.stats.step_times, node.stats.forward_seconds, node.stats.rhs_evals) == latest
    assert node.stats.recomputed_steps == first_steps
