"""Per-call statistics: what the forward and backward solves cost."""

from dataclasses import dataclass, field
from typing import List


@dataclass
class Stats:
    """Counters and timings of the last forward (and its backward).

    ``step_times`` holds the accepted step boundaries t_0 < ... < t_N of the
    forward solve in the user's time variable (so a reference implementation
    can replay exactly the steps pnode took).

    ``rhs_evals`` counts the forward's evaluations of f; ``linearisations`` the
    forward's evaluations of f with grad at Newton points (implicit methods), for
    Jacobian products and preconditioners; ``recomputed_rhs`` every evaluation of
    f in the backward (none for explicit methods with ``memory="graphs"``);
    ``jacobians`` the Jacobian assemblies (``jacobian="dense"`` or ``"blockdiag"``)
    of the forward and then of its backward.

    Every forward resets the backward's counters (``vjps``, ``recomputed_*``,
    ``checkpoints``); they then add up over the backwards that follow (a second backward
    with ``retain_graph``, or a NeuralODE's earlier call differentiated later, whose
    recomputed forward is counted in ``recomputed_steps`` and ``recomputed_rhs`` and
    leaves the forward's fields alone).
    """

    method: str = ""
    memory: str = ""
    device_path: str = ""
    steps: int = 0
    rejected_steps: int = 0
    rhs_evals: int = 0
    jacobians: int = 0
    linearisations: int = 0
    newton_iterations: int = 0
    krylov_iterations: int = 0
    vjps: int = 0
    recomputed_rhs: int = 0
    recomputed_steps: int = 0
    checkpoints: int = 0
    peak_checkpoint_bytes: int = 0
    trajectory_bytes: int = 0
    forward_seconds: float = 0.0
    backward_seconds: float = 0.0
    step_times: List[float] = field(default_factory=list)

    def reset_backward(self):
        self.vjps = 0
        self.recomputed_rhs = 0
        self.recomputed_steps = 0
        self.checkpoints = 0
        self.peak_checkpoint_bytes = 0
        self.backward_seconds = 0.0

    def __str__(self):
        return (f"{self.method}: {self.steps} steps ({self.rejected_steps} rejected), "
                f"{self.rhs_evals} f evals, "
                + (f"{self.linearisations} linearisations, " if self.linearisations else "")
                + f"{self.vjps} VJPs, "
                f"{self.recomputed_rhs} f recomputed, "
                f"forward {self.forward_seconds * 1e3:.1f} ms, "
                f"backward {self.backward_seconds * 1e3:.1f} ms")
