"""Where a forward+backward's time goes, by sampling: py-spy's stacks sorted into f, VJPs, PETSc, glue.

A sampling profiler reads the interpreter's stack at fixed intervals and hooks no call,
so unlike cProfile it does not inflate the many short Python functions of pnode's glue.
py-spy (https://github.com/benfred/py-spy) samples a worker process in its default,
blocking mode (the process is paused while its stack is read: slower, but no torn
stacks). The worker warms up and times its contender unprofiled first, then waits;
py-spy attaches and the worker repeats the same forward+backward, so no import or
warm-up lands in the samples. Shares are fractions of samples; milliseconds are those
fractions of the unprofiled median time.

Each sample goes to exactly one category, by its frames (root first):

* phase: the benchmark's ``_forward`` or ``_backward`` frame (others are ignored);
* ``f``: the user's module (``Counted.forward``) is on the stack;
* ``VJPs``: pnode's one autograd-engine call per stage (``pnode._rhs._vjp``);
* ``PETSc``: the innermost Python frame is the call of ``ts.solve`` or
  ``ts.adjointSolve`` (``pnode._solver.Solver._run``): C code, no callback running;
* ``torch autograd``: the innermost frame is the engine call of ``loss.backward()``
  (for torchdiffeq's backprop that is its whole backward: the VJPs of its f calls
  and of its Runge-Kutta arithmetic, in one chained pass);
* ``torchdiffeq``: torchdiffeq's own Python (its Runge-Kutta arithmetic in autograd);
* ``glue``: everything else (pnode's callbacks and conversions, the autograd.Function).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

CATEGORIES = ("f", "VJPs", "PETSc", "torch autograd", "torchdiffeq", "glue")


def _frame(name, path):
    return lambda frame: frame.startswith(name + " (") and path in frame


_is_f = _frame("Counted.forward", "bench_gradients.py")
_is_vjp = _frame("_vjp", os.path.join("pnode", "_rhs.py"))
_is_petsc_call = _frame("Solver._run", os.path.join("pnode", "_solver.py"))
_is_engine = _frame("_engine_run_backward", os.path.join("torch", "autograd"))


def classify(frames):
    """(phase, category) of one sample's stack (root first), or None outside the timed calls."""
    phase = None
    for frame in frames:
        if frame.startswith(("_forward (", "_backward (")) and "bench_gradients.py" in frame:
            phase = "forward" if frame.startswith("_forward") else "backward"
    if phase is None:
        return None
    if any(map(_is_f, frames)):
        return phase, "f"
    if any(map(_is_vjp, frames)):
        return phase, "VJPs"
    if _is_petsc_call(frames[-1]):
        return phase, "PETSc"
    if _is_engine(frames[-1]):
        return phase, "torch autograd"
    if any("(torchdiffeq" + os.sep in frame for frame in frames):
        return phase, "torchdiffeq"
    return phase, "glue"


def tally(raw_lines):
    """Counter of (phase, category) -> samples, from py-spy's ``--format raw`` output."""
    counts = Counter()
    for line in raw_lines:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, n = line.rpartition(" ")
        key = classify(stack.split(";"))
        if key is not None:
            counts[key] += int(n)
    return counts


def py_spy():
    """The py-spy executable next to this interpreter or on PATH, else None."""
    here = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return here if os.access(here, os.X_OK) else shutil.which("py-spy")


def profile(worker_argv, rate=250):
    """Run ``worker_argv`` (it prints its unprofiled time, then waits for a line on stdin)
    under py-spy; return (unprofiled seconds per fwd+bwd, Counter of samples)."""
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed: `.venv/bin/pip install py-spy` (scripts/setup.sh installs it)")
    worker = subprocess.Popen(worker_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        seconds = float(worker.stdout.readline())
        with tempfile.TemporaryDirectory() as tmp:
            raw, log = os.path.join(tmp, "samples.txt"), os.path.join(tmp, "py-spy.log")
            with open(log, "w") as log_fh:
                spy = subprocess.Popen([exe, "record", "--pid", str(worker.pid), "--rate", str(rate),
                                        "--format", "raw", "--output", raw],
                                       stdout=log_fh, stderr=subprocess.STDOUT)
            # py-spy says so once it is sampling; only then may the worker start.
            deadline = time.monotonic() + 60
            while "Sampling process" not in _read(log) and spy.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            worker.stdin.write("go\n")
            worker.stdin.flush()
            worker.wait()
            if spy.wait() != 0 or not os.path.exists(raw):
                raise RuntimeError(f"py-spy failed (it needs permission to ptrace the worker): {_read(log).strip()}")
            with open(raw) as fh:
                return seconds, tally(fh)
    finally:
        if worker.poll() is None:
            worker.kill()


def _read(path):
    with open(path) as fh:
        return fh.read()


def report(label, seconds, counts):
    """Lines: per phase, each category's share of the samples and its milliseconds."""
    total = sum(counts.values())
    if total == 0:
        return [f"- {label}: no samples (py-spy saw none of the timed calls)"]
    lines = [f"- {label}: {1e3 * seconds:.1f} ms per forward+backward unprofiled, {total} samples"]
    for phase in ("forward", "backward"):
        parts = [(c, counts[phase, c]) for c in CATEGORIES if counts[phase, c]]
        share = sum(n for _, n in parts) / total
        body = ", ".join(f"{c} {1e3 * seconds * n / total:.1f} ms ({100 * n / total:.0f}%)" for c, n in parts)
        lines.append(f"  - {phase} {1e3 * seconds * share:.1f} ms: {body}")
    return lines
