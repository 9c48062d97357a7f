"""Helpers shared by the examples: output files, progress bars, memory and timing, tables, verdict."""

import os
import sys
import time
from contextlib import contextmanager

import matplotlib

matplotlib.use("Agg")  # headless: CI and containers have no display
import matplotlib.pyplot as plt  # noqa: E402,F401  (re-exported so examples import Agg-backed pyplot)
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import pnode  # noqa: E402

PNG_DPI = 100


def setup(seed, threads=1):
    """Seed torch and pin the thread count.

    One intra-op thread: the tensors of these examples are small, and on a
    shared machine a descheduled helper thread stalls every operation.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)


def progress(iterable, desc, **kw):
    # stdout, not stderr: the tests and the README read one stream
    return tqdm(iterable, desc=desc, dynamic_ncols=True, mininterval=0.5, file=sys.stdout, **kw)


def save_figure(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=PNG_DPI)
    plt.close(fig)
    print(f"wrote {path}")


def checkpoints_supported():
    """Whether this pnode accepts options={'checkpoints': k} (a checkpoint budget).

    Checked by building a configuration rather than by version number, so the
    examples pick the option up as soon as pnode has it.
    """
    try:
        pnode.odeint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0]), method="rk4",
                     options={"step_size": 0.5, "checkpoints": 1}, adjoint_params=())
    except ValueError as exc:
        if "unknown options" in str(exc):
            return False
        raise
    return True


@contextmanager
def saved_tensor_bytes():
    """Count the bytes autograd saves for the backward inside the block.

    Yields a one-entry dict whose ``"bytes"`` is filled in on exit. Tensors are
    deduplicated by storage address, since one activation is often saved by
    several operations; the graph keeps every packed tensor alive until the
    backward, so an address cannot be reused within the block.
    """
    seen = {}

    def pack(t):
        seen.setdefault(t.data_ptr(), t.numel() * t.element_size())
        return t

    result = {"bytes": 0}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result["bytes"] = sum(seen.values())


class Timer:
    """Wall-clock seconds accumulated over several ``with timer:`` blocks."""

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._start


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mib(nbytes):
    return f"{nbytes / 2 ** 20:.2f}"


def finish(result, checks=(), enforce=True, ok=None):
    """Print the ``RESULT`` line that the tests and the README read, then the verdict.

    ``checks`` are ``(passed, message)`` pairs, judged only when ``enforce``.
    Returns the exit status: 1 after printing the message of every failed check
    to stderr, else 0 (after printing ``ok``, if given, when the checks were judged).
    """
    print(f"RESULT {result}")
    if not enforce:
        return 0
    failures = [message for passed, message in checks if not passed]
    for message in failures:
        print(f"FAILED: {message}", file=sys.stderr)
    if failures:
        return 1
    if ok is not None:
        print(f"OK: {ok}")
    return 0
