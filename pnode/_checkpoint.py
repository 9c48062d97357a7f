"""Memory-bounded reverse sweeps: the binomial checkpoint schedule on top of PETSc TS.

PETSc's own limited-memory trajectories need revolve or CAMS, which cannot be
installed from PyPI or Debian, and its ``petsc`` memory type ignores the budget,
so pnode schedules checkpoints itself.

The schedule is the binomial one of Griewank, "Achieving logarithmic growth of
temporal and spatial complexity in reverse automatic differentiation" (1992),
and Griewank & Walther, "Algorithm 799: revolve" (ACM TOMS 26, 2000): with
``s`` stored states (the start included) and ``l`` steps to reverse, where one
step is reversed by re-executing it once with its stages kept (taping) and then
running TSAdjoint over it, the fewest step executions are

    T(l, s) = (r + 1) l - C(s + r, s + 1),  r the least integer with C(s + r, s) >= l,

reached by advancing ``m`` steps, storing a checkpoint there, reversing the last
``l - m`` steps with ``s - 1`` states and then the first ``m`` with ``s``.

Adaptive steps: the forward records the accepted step sizes, and every
recomputation replays them exactly (fixed-step replay TS), so the gradient
equals the store-everything gradient.
"""

from math import comb

import torch


def sweeps(l, s):
    """The least r with C(s + r, s) >= l: how often the worst step is executed, less one."""
    r = 0
    while comb(s + r, s) < l:
        r += 1
    return r


def split(l, s):
    """Steps to advance before storing the next checkpoint, for l >= 2 steps and s >= 2 states.

    The remaining s - 1 states must reverse the last l - m steps in r - 1 sweeps
    (l - m <= C(s + r - 2, s - 1)), and the first m steps, reversed later with s
    states, in r - 1 sweeps as well (m <= C(s + r - 1, s)); the largest such m is
    optimal for T(l, s) (the tests check it against the dynamic-programming optimum).
    """
    r = sweeps(l, s)
    return max(1, min(l - comb(s + r - 2, s - 1), comb(s + r - 1, s), l - 1))


class Checkpointer:
    """Reverses a forward solve of which only y0 and the step sizes were kept."""

    def __init__(self, advance, tape, make_rhs, budget, step_times, step_sizes, output_steps, stats):
        self.advance = advance        # replaying Solver without a trajectory: moves between checkpoints
        self.tape = tape              # replaying Solver with a trajectory: re-executes one step to reverse it
        self.make_rhs = make_rhs      # make_rhs(for_tape: bool) -> RHS for one replayed piece
        self.budget = budget
        self.times = step_times
        self.sizes = step_sizes
        self.outputs = {step: i for i, step in enumerate(output_steps)}
        self.stats = stats
        self.live = 0

    def backward(self, y0, grad_ys, n_params):
        stats = self.stats
        state_bytes = y0.numel() * y0.element_size()
        self.state_bytes = state_bytes
        self.lam = grad_ys[-1].clone()
        self.grad_ys = grad_ys
        self.mu = torch.zeros(n_params, dtype=y0.dtype)  # PETSc's
        self.live = 1
        stats.checkpoints = 1
        self._reverse(0, len(self.sizes), y0, self.budget)
        if 0 in self.outputs:
            self.lam += grad_ys[self.outputs[0]]
        return self.lam, self.mu

    def _reverse(self, a, b, y_a, s):
        """Reverse steps a..b-1 given the state at step a and s states (y_a included).

        The schedule recurses once per stored checkpoint; as recursion that ran out of
        Python's stack for budgets near 1000, so the pending segments are a list. A
        None on it marks where the checkpoint of the segment above it is freed.
        """
        pending = [(a, b, y_a, s)]
        while pending:
            segment = pending.pop()
            if segment is None:
                self._note_checkpoint(-1)
                continue
            a, b, y_a, s = segment
            if b - a == 1:
                self._reverse_step(a, y_a)
            elif s == 1:
                self._reverse_step(b - 1, self._advance(a, b - 1, y_a))
                pending.append((a, b - 1, y_a, 1))
            else:
                m = a + split(b - a, s)
                y_m = self._advance(a, m, y_a)
                self._note_checkpoint(+1)
                # last in, first out: reverse m..b with the checkpoint, free it, then a..m
                pending += [(a, m, y_a, s), None, (m, b, y_m, s - 1)]
                del y_m
            del segment, y_a

    def _note_checkpoint(self, delta):
        self.live += delta
        st = self.stats
        st.checkpoints = max(st.checkpoints, self.live)
        st.peak_checkpoint_bytes = max(st.peak_checkpoint_bytes,
                                       self.live * self.state_bytes + self.tape.step_bytes)

    def _advance(self, a, m, y_a):
        if m == a:
            return y_a
        self.stats.recomputed_steps += m - a
        return self.advance.replay(self.make_rhs(False), y_a, a, self.times[a], self.times[m],
                                   self.sizes[a:m])

    def _reverse_step(self, j, y_j):
        """Re-execute step j with its stages kept, run TSAdjoint over it, add dL/dy_j."""
        self.stats.recomputed_steps += 1
        rhs = self.make_rhs(True)
        self.tape.replay(rhs, y_j, j, self.times[j], self.times[j + 1], self.sizes[j:j + 1])
        self.lam, mu = self.tape.adjoint_steps(rhs, self.lam, 1)
        if mu is not None:
            self.mu += mu
        if j in self.outputs and j > 0:
            self.lam += self.grad_ys[self.outputs[j]]
        self._note_checkpoint(0)
