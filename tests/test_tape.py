"""The stage tape (memory="graphs"): which forward evaluation a backward product uses.

End to end, the gradient tests assert that every VJP finds its graph (no f is
re-evaluated in the backward); these pin down the two rules behind that.
"""

import torch

from pnode._rhs import Tape


def _state(value):
    return torch.full((3,), value, dtype=torch.float64)


def test_newton_iterates_are_superseded_but_stages_with_equal_times_are_not():
    """ARKIMEX ars443 solves two stages at c = 1/2 on the same work vector: the second
    solve must not replace the first stage's value (it did: one f re-evaluated per step)."""
    tape = Tape()
    tape.record(0, "implicit", 75, 0.5, _state(1.0), None, "stage 2, iterate 1")
    tape.record(0, "implicit", 75, 0.5, _state(2.0), None, "stage 2, converged")
    tape.record(0, "explicit", 44, 0.5, _state(2.0), None, "explicit part at stage 2")
    tape.record(0, "implicit", 75, 0.5, _state(3.0), None, "stage 4")
    assert [e.out for e in tape.steps[0]] == ["stage 2, converged", "explicit part at stage 2", "stage 4"]
    # the adjoint asks on the stage vector (44), the forward evaluated on the work vector (75)
    assert tape.lookup(0, "implicit", 44, 0.5, _state(2.0)).out == "stage 2, converged"
    assert tape.lookup(0, "implicit", 75, 0.5, _state(3.0)).out == "stage 4"
    assert tape.lookup(0, "implicit", 75, 0.5, _state(1.0)) is None


def test_an_equal_state_at_another_time_is_not_a_match():
    """f(t, y) depends on t: a rejected attempt's evaluation of the same state at another
    stage time must not stand in for this one."""
    tape = Tape()
    tape.record(4, "explicit", 10, 0.25, _state(1.0), None, "rejected attempt")
    tape.record(4, "explicit", 11, 0.30, _state(2.0), None, "accepted")
    assert tape.lookup(4, "explicit", 10, 0.2, _state(1.0)) is None
    assert tape.lookup(4, "explicit", 10, 0.25 + 1e-15, _state(1.0)).out == "rejected attempt"  # rounding
    assert tape.lookup(5, "explicit", 11, 0.30, _state(2.0)).out == "accepted"  # the previous step's
