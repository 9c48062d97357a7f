"""The stage tape (memory="graphs"): which forward evaluation a backward product uses.

End to end, the gradient tests assert that every VJP finds its graph (no f is
re-evaluated in the backward); these pin down the rules behind that.
"""

import pytest
import torch

import pnode
from pnode._rhs import Tape
from tests.reference.rk import explicit_rk


def _state(value):
    return torch.full((3,), value, dtype=torch.float64)


def test_newton_iterates_are_superseded_but_stages_with_equal_times_are_not():
    """ARKIMEX ars443 solves two stages at c = 1/2 on the same work vector: the second
    solve must not replace the first stage's value (it did: one f re-evaluated per step)."""
    tape = Tape()
    tape.record(0, "implicit", 75, 0.5, 0.1, _state(1.0), None, "stage 2, iterate 1")
    tape.record(0, "implicit", 75, 0.5, 0.1, _state(2.0), None, "stage 2, converged")
    tape.record(0, "explicit", 44, 0.5, 0.1, _state(2.0), None, "explicit part at stage 2")
    tape.record(0, "implicit", 75, 0.5, 0.1, _state(3.0), None, "stage 4")
    assert [e.out for e in tape.steps[0]] == ["stage 2, converged", "explicit part at stage 2", "stage 4"]
    # the adjoint asks on the stage vector (44), the forward evaluated on the work vector (75)
    assert tape.lookup(0, "implicit", 44, 0.5, _state(2.0)).out == "stage 2, converged"
    assert tape.lookup(0, "implicit", 75, 0.5, _state(3.0)).out == "stage 4"
    assert tape.lookup(0, "implicit", 75, 0.5, _state(1.0)) is None


def test_consecutive_evaluations_on_one_vector_at_other_times_are_kept():
    """Only an iterate of the same stage solve (same vector, part and time) is superseded:
    a rejected attempt and its retry at a shorter step reuse the work vector at another time."""
    tape = Tape()
    tape.record(0, "implicit", 75, 0.5, 0.1, _state(1.0), None, "attempt at h = 0.5")
    tape.record(0, "implicit", 75, 0.6, 0.1, _state(2.0), None, "another stage time")
    assert [e.out for e in tape.steps[0]] == ["attempt at h = 0.5", "another stage time"]
    assert tape.lookup(0, "implicit", 75, 0.5, _state(1.0)).out == "attempt at h = 0.5"


def test_an_equal_state_at_another_time_is_not_a_match():
    """f(t, y) depends on t: a rejected attempt's evaluation of the same state at another
    stage time must not stand in for this one."""
    tape = Tape()
    tape.record(4, "explicit", 10, 0.25, 0.1, _state(1.0), None, "rejected attempt")
    tape.record(4, "explicit", 11, 0.30, 0.1, _state(2.0), None, "accepted")
    assert tape.lookup(4, "explicit", 10, 0.2, _state(1.0)) is None
    assert tape.lookup(4, "explicit", 10, 0.25 + 1e-15, _state(1.0)).out == "rejected attempt"  # rounding
    assert tape.lookup(5, "explicit", 11, 0.30, _state(2.0)).out == "accepted"  # the previous step's


def test_stages_of_a_femtosecond_step_are_told_apart():
    """Stage times 1e-14 apart were all "close" (an absolute floor of 1e-12): a stage that
    left the state bitwise unchanged matched another stage's graph, at another time."""
    tape = Tape()
    tape.record(3, "explicit", 10, 1.0e-13, 5e-14, _state(1.0), None, "stage 1")
    tape.record(3, "explicit", 10, 1.1e-13, 5e-14, _state(1.0), None, "stage 2")
    assert tape.lookup(3, "explicit", 10, 1.1e-13, _state(1.0)).out == "stage 2"
    assert tape.lookup(3, "explicit", 12, 1.1e-13, _state(1.0)).out == "stage 2"   # another stage vector
    assert tape.lookup(3, "explicit", 12, 1.05e-13, _state(1.0)) is None


@pytest.mark.parametrize("method, tableau", [("bosh3", "3bs"), ("dopri5", "5dp")])
def test_gradient_on_a_femtosecond_time_scale(method, tableau):
    """End to end: dL/dp was 23% (bosh3) and 1.4e-3 (dopri5) off with the default memory."""
    p = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    f = lambda t, y: p * torch.cos(3e13 * t) * torch.ones_like(y)   # noqa: E731  (a drive at fs scale)
    t = torch.tensor([0, 1e-13, 2e-13], dtype=torch.float64)
    # |h f| below ulp(y): every stage state equals y_n
    y0 = torch.full((2,), 1e6, dtype=torch.float64, requires_grad=True)
    ys, stats = pnode.odeint(f, y0, t, method=method, adjoint_params=(p,), return_stats=True,
                             options={"step_size": 5e-14})
    loss = lambda ys: (ys[-1] * torch.tensor([1.0, 2.0], dtype=torch.float64)).sum()   # noqa: E731
    grads = torch.autograd.grad(loss(ys), (y0, p))
    refs = torch.autograd.grad(loss(explicit_rk(f, y0, tableau, stats.step_times)), (y0, p))
    assert stats.recomputed_rhs == 0
    for grad, ref in zip(grads, refs):
        torch.testing.assert_close(grad, ref, rtol=64 * torch.finfo(pnode.petsc_dtype).eps, atol=0)
