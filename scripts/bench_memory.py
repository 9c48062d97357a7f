"""Memory and time of one forward+backward versus the number of steps, for every way
of getting the gradient: pnode's store-everything and checkpointed modes, torchdiffeq's
backpropagation and continuous adjoint, and an ACA-style per-step checkpoint.

Problem: dy/dt = MLP(y), MLP 32-64-32 (tanh), state 32, batch 16, float64, over
[0, 1] with fixed-step RK4, step size 1/n for n = 10, 100, 1000, 10000 (--quick: up
to 1000); loss = (y(1)**2).sum(); gradients w.r.t. y0 and the MLP's parameters.

Contenders:

* ``pnode all``: ``memory="graphs"`` (every stage's autograd graph kept; backward = VJPs).
* ``pnode states``: ``memory="states"`` (PETSc keeps the stage states; backward recomputes f).
* ``pnode k=4``, ``pnode k=16``, ``pnode k=sqrt(n)``: ``checkpoints=k`` (at most k
  states, y0 included; the binomial/revolve schedule recomputes the rest).
* ``tdq odeint``: ``torchdiffeq.odeint(method="rk4")``, backpropagation through the
  solver's operations. torchdiffeq's "rk4" is the 3/8-rule variant: another scheme, so
  its gradient differs from pnode's by discretisation error, not by gradient error.
* ``tdq adjoint``: ``torchdiffeq.odeint_adjoint`` (same method and step; the continuous
  adjoint solved backwards with the same settings).
* ``ACA (torch)``: Adaptive Checkpoint Adjoint style (Zhuang et al., ICML 2020), written
  here in plain torch with classic RK4: the forward runs without a graph and keeps only
  the state at each step; the backward walks the steps in reverse, re-executes each one
  with a graph from its stored state and backpropagates the running adjoint through it
  (``torch.autograd.grad`` with the adjoint as ``grad_outputs``). Same scheme as pnode's
  rk4 (PETSc TSRK 4 is classic RK4), so its gradient must match pnode's to rounding.

Memory: bytes held for the backward when the forward has returned, the same way for
every contender: (a) tensors autograd saved during the forward, counted by a
``saved_tensors_hooks`` pack hook, each storage once (y0 and the parameters excluded:
the caller holds them anyway). This covers torchdiffeq's graph, pnode's stage graphs
("all") and ACA's stored states (saved with ``save_for_backward``). (b) pnode's buffers
outside autograd: PETSc's in-memory trajectory (``Stats.trajectory_bytes``: steps x
stages x state x 8) in the store-everything modes, plus with ``memory="graphs"`` the
stage outputs its tape keeps (f evaluations x state bytes; the MLP's last op, a Linear,
does not save its output, so these are not counted twice); in checkpoint modes the
peak of k states plus one step's stages (``Stats.peak_checkpoint_bytes``), which is
reached inside the backward. Graphs built inside the backward, one step (ACA, pnode
checkpoints) or one f call (pnode states, odeint_adjoint) at a time, are not counted;
odeint_adjoint keeps nothing from its forward, so its column is ~0. The hook pass is a
separate, untimed forward (the pack hook costs ~10-20 us per saved tensor, which would
bias the timings against the contenders that save the most).

Time: wall time of forward + backward, median of 3 repetitions (1 at the largest n,
where one call is estimated to take over 5 s, and with --quick), one thread, contenders interleaved
within each repetition with a rotating order so that load bursts on a shared machine
hit them alike. A contender is skipped (and the table says why) when its estimated
time per call exceeds 60 s (8 s with --quick) or what is left of the run's time
budget; the estimate scales the time it took at the previous n by the step
executions (n forward steps, plus for checkpointing the Griewank-Walther count
T(n, k) of steps re-executed in the backward).

Gradient column: max over y0 and each parameter of max|g - g_ref| / max|g_ref|, g_ref
from ``pnode all`` at the same n. pnode's modes and ACA differentiate the same
discrete solution and should agree to ~1e-12; torchdiffeq's rows are labelled
"3/8 rule": that number is the discretisation difference between the two RK4 schemes
(plus, for odeint_adjoint, its continuous-adjoint error), not a gradient error.

Usage: python scripts/bench_memory.py [--quick] [--out outputs/bench_memory.md]
(the PNG goes next to the table, same name with .png; --quick prints only, unless
--out is given; full run < ~6 min, --quick < 1 min.)
"""

import argparse
import gc
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

# One thread for PETSc's OpenBLAS too (read when libopenblas loads: set before the imports).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torchdiffeq  # noqa: E402
from torch import nn  # noqa: E402

import pnode  # noqa: E402
from _bench_common import SavedBytes, rel_err  # noqa: E402  (scripts/ is on sys.path)

STATE, HIDDEN, BATCH = 32, 64, 16
DTYPE = torch.float64
MB = 2.0 ** 20


# -- the problem -------------------------------------------------------------------------
class Func(nn.Module):
    """f(t, y) = MLP(y), counting its calls."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(STATE, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, STATE))
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return self.net(y)


# -- ACA-style per-step checkpoint in plain torch -------------------------------------------
def rk4_step(func, t, y, h):
    """Classic RK4 (the scheme of PETSc's TSRK 4)."""
    k1 = func(t, y)
    k2 = func(t + h / 2, y + (h / 2) * k1)
    k3 = func(t + h / 2, y + (h / 2) * k2)
    k4 = func(t + h, y + h * k3)
    return y + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


class _ACA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, func, t0, h, n, y0, *params):
        # autograd.Function.forward runs without a graph: only the states are kept.
        states = [y0]
        y = y0
        for i in range(n):
            y = rk4_step(func, t0 + i * h, y, h)
            states.append(y)
        ctx.func, ctx.t0, ctx.h, ctx.n = func, t0, h, n
        ctx.save_for_backward(*states[:-1])   # y_0 .. y_{n-1}: what re-executing each step needs
        return y

    @staticmethod
    def backward(ctx, grad_y):
        func, t0, h, n = ctx.func, ctx.t0, ctx.h, ctx.n
        states = ctx.saved_tensors
        params = [p for p in func.parameters() if p.requires_grad]
        adj = grad_y
        pgrads = [torch.zeros_like(p) for p in params]
        for i in reversed(range(n)):
            with torch.enable_grad():
                y = states[i].detach().requires_grad_()
                y_next = rk4_step(func, t0 + i * h, y, h)
                grads = torch.autograd.grad(y_next, [y, *params], grad_outputs=adj)
            adj = grads[0]
            for acc, g in zip(pgrads, grads[1:]):
                acc.add_(g)
        return (None, None, None, None, adj, *pgrads)


def aca_odeint(func, y0, t0, t1, n):
    params = [p for p in func.parameters() if p.requires_grad]
    return _ACA.apply(func, float(t0), (float(t1) - float(t0)) / n, n, y0, *params)


# -- checkpoint cost (Griewank 1992; Griewank & Walther, revolve, 2000) -------------------
def revolve_cost(l, s):
    """Step executions to reverse l steps with at most s states held (y0 included)."""
    if s == 1:
        return l * (l + 1) // 2
    r = 0
    while math.comb(s + r, s) < l:
        r += 1
    return (r + 1) * l - math.comb(s + r, s + 1)


# -- contenders -------------------------------------------------------------------------------
@dataclass
class Contender:
    name: str
    kind: str                              # "pnode", "tdq", "aca"
    k: Optional[Callable] = None           # checkpoint budget as a function of n (pnode)
    memory: str = "graphs"
    solve: Optional[Callable] = None       # solve(func, y0, n) -> (y1, stats or None)
    results: dict = field(default_factory=dict)   # n -> row dict
    nodes: dict = field(default_factory=dict)     # n -> pnode.NeuralODE (its PETSc objects)

    def release(self, n):
        self.nodes.pop(n, None)

    def budget(self, n):
        return None if self.k is None else self.k(n)

    def work(self, n):
        """Step executions of one forward + backward (the unit of the time estimate)."""
        k = self.budget(n)
        if self.kind == "pnode" and k is not None:
            return n + revolve_cost(n, k)
        if self.kind == "aca":
            return 2 * n
        return n


def make_contenders():
    t = torch.tensor([0.0, 1.0], dtype=DTYPE)

    def pnode_solve(nodes, memory, budget):
        # One NeuralODE (so one set of PETSc objects) per n, built by the first (untimed)
        # call at that n: a cached solver must not be reused for a solve with more steps
        # than its first one (pnode at commit ebac99d segfaults in the backward, likely
        # PETSc's memory trajectory sized at setup from the first solve's step count).
        def solve(func, y0, n):
            node = nodes.get(n)
            if node is None:
                opts = {"step_size": 1.0 / n, "memory": memory}
                if budget is not None:
                    opts["checkpoints"] = budget(n)
                node = nodes[n] = pnode.NeuralODE(func, method="rk4", options=opts)
            ys = node(y0, t)
            return ys[-1], node.stats
        return solve

    def tdq_solve(fn):
        def solve(func, y0, n):
            return fn(func, y0, t, method="rk4", options={"step_size": 1.0 / n})[-1], None
        return solve

    def aca_solve(func, y0, n):
        return aca_odeint(func, y0, 0.0, 1.0, n), None

    cs = [Contender("pnode all", "pnode", memory="graphs"),
          Contender("pnode states", "pnode", memory="states"),
          Contender("pnode k=4", "pnode", k=lambda n: 4),
          Contender("pnode k=16", "pnode", k=lambda n: 16),
          Contender("pnode k=sqrt(n)", "pnode", k=lambda n: max(2, round(math.sqrt(n)))),
          Contender("tdq odeint", "tdq"),
          Contender("tdq adjoint", "tdq"),
          Contender("ACA (torch)", "aca")]
    for c in cs:
        if c.kind == "pnode":
            c.solve = pnode_solve(c.nodes, c.memory, c.k)
    cs[5].solve = tdq_solve(torchdiffeq.odeint)
    cs[6].solve = tdq_solve(torchdiffeq.odeint_adjoint)
    cs[7].solve = aca_solve
    return cs


def fwd_bwd(c, func, y0, n):
    """One timed forward + backward; returns (fwd s, bwd s, grads, stats, forward f calls)."""
    func.zero_grad(set_to_none=True)
    y0 = y0.detach().requires_grad_()
    gc.collect()
    func.calls = 0
    start = time.perf_counter()
    y1, st = c.solve(func, y0, n)
    loss = y1.pow(2).sum()
    mid = time.perf_counter()
    fwd_calls = func.calls
    loss.backward()
    end = time.perf_counter()
    grads = [y0.grad.detach().clone()] + [p.grad.detach().clone() for p in func.parameters()]
    return mid - start, end - mid, grads, st, fwd_calls


def held_bytes_forward(c, func, y0, n):
    """Autograd-saved bytes after an (untimed) forward under the pack hook; graph dropped."""
    y0 = y0.detach().requires_grad_()
    saved = SavedBytes(exclude=[y0, *func.parameters()])
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        y1, st = c.solve(func, y0, n)
    del y1, st
    gc.collect()
    return saved.bytes


def solver_bytes(c, st, state_bytes):
    """pnode's buffers held for the backward outside autograd (see the module docstring)."""
    if c.kind != "pnode" or st is None:
        return 0
    if c.k is not None:
        return st.peak_checkpoint_bytes
    tape = st.rhs_evals * state_bytes if c.memory == "graphs" else 0
    return st.trajectory_bytes + tape


# -- the run -------------------------------------------------------------------------------
def run(ns, per_call_limit, budget_s, slow_call_s, log, quick=False):
    torch.manual_seed(0)
    func = Func().to(DTYPE)
    y0 = torch.randn(BATCH, STATE, dtype=DTYPE)
    state_bytes = y0.numel() * y0.element_size()
    cs = make_contenders()
    start = time.perf_counter()

    for c in cs:   # warm-up: PETSc objects, torch kernels, caches
        fwd_bwd(c, func, y0, 10)
        held_bytes_forward(c, func, y0, 10)
    # What exists now lives for the whole run: out of the collector's sight, so that the
    # gc.collect() before each call costs microseconds instead of ~0.25 s.
    gc.collect()
    gc.freeze()

    rate = {}   # contender -> seconds per step execution (fwd+bwd), forward share
    for n in ns:
        last = n == ns[-1]
        plan = []
        for c in cs:
            row = c.results.setdefault(n, {"n": n, "contender": c.name})
            est = rate[c.name][0] * c.work(n) if c.name in rate else 0.0
            est_fwd = rate[c.name][1] * est if c.name in rate else 0.0
            row["est"] = est
            if est > per_call_limit:
                row["skip"] = f"skipped: estimated {est:.0f} s per call > {per_call_limit:g} s"
                continue
            reps = 1 if (last or est > slow_call_s or quick) else 3
            plan.append((c, reps, est, est_fwd))
        # Cheapest first, so that a tight budget drops the slowest contenders.
        plan.sort(key=lambda p: p[2] * p[1] + p[3])
        kept = []
        committed = 0.0
        for c, reps, est, est_fwd in plan:
            left = budget_s - (time.perf_counter() - start) - committed
            cost = est * reps + est_fwd
            if cost > left:
                c.results[n]["skip"] = (f"skipped: estimated {cost:.0f} s (fwd+bwd x{reps} and the "
                                        f"memory pass) > {max(left, 0):.0f} s left of the run's budget")
                continue
            committed += cost
            kept.append((c, reps, est, est_fwd))
        # Interleaved repetitions; the budget is checked again before every call (the
        # estimates cannot foresee a burst of load on a shared machine).
        max_reps = max((r for _, r, *_ in kept), default=0)
        for rep in range(max_reps):
            todo = [(c, est, est_fwd) for c, r, est, est_fwd in kept if r > rep]
            k = rep % max(len(todo), 1)
            for c, est, est_fwd in todo[k:] + todo[:k]:
                row = c.results[n]
                left = budget_s - (time.perf_counter() - start)
                if rep == 0:
                    if est + est_fwd > left:
                        row["skip"] = (f"skipped: estimated {est + est_fwd:.0f} s (fwd+bwd and the "
                                       f"memory pass) > {max(left, 0):.0f} s left of the run's budget")
                        continue
                    # untimed forward under the pack hook; it also builds this n's PETSc objects
                    row["held_autograd"] = held_bytes_forward(c, func, y0, n)
                    row["times"], row["fwd"], row["bwd"] = [], [], []
                elif "times" not in row or est > left:
                    continue      # skipped, or no time left for another repetition
                t_f, t_b, grads, st, fwd_calls = fwd_bwd(c, func, y0, n)
                row["times"].append(t_f + t_b)
                row["fwd"].append(t_f)
                row["bwd"].append(t_b)
                row["grads"] = grads
                if c.kind == "pnode":
                    row["steps"] = st.steps
                    row["recomputed"] = st.recomputed_steps
                    row["checkpoints"] = st.checkpoints
                    row["held_solver"] = solver_bytes(c, st, state_bytes)
                else:
                    row["steps"] = fwd_calls // 4   # RK4: four f calls per step
                    row["recomputed"] = n if c.kind == "aca" else None
                    row["held_solver"] = 0
        for c in cs:
            c.release(n)
        for c, *_ in kept:
            row = c.results[n]
            if "times" not in row:
                continue
            row["time"] = statistics.median(row["times"])
            row["fwd_med"] = statistics.median(row["fwd"])
            row["bwd_med"] = statistics.median(row["bwd"])
            rate[c.name] = (row["time"] / c.work(n), row["fwd_med"] / row["time"])
        # gradient errors vs pnode all (or, if that was skipped, pnode states)
        ref_name = next((name for name in ("pnode all", "pnode states")
                         if "grads" in next(c for c in cs if c.name == name).results[n]), None)
        ref = next(c for c in cs if c.name == ref_name).results[n]["grads"] if ref_name else None
        for c in cs:
            row = c.results[n]
            if "grads" not in row:
                continue
            if ref is None:
                row["err"] = "no reference"
            elif c.name == ref_name:
                row["err"] = "reference" if ref_name == "pnode all" else "reference (pnode all skipped)"
            else:
                e = f"{rel_err(row['grads'], ref):.1e}"
                row["err"] = f"{e} (3/8 rule)" if c.kind == "tdq" else e
            del row["grads"]
        for c in cs:
            log(format_row(c.results[n]))
    return cs, time.perf_counter() - start


# -- report ----------------------------------------------------------------------------------
HEADER = ("| n | contender | steps | time s (fwd + bwd) | peak MB held for backward "
          "(autograd + solver) | recomputed steps | grad rel err vs pnode all |")
RULE = "| ---: | --- | ---: | --- | --- | ---: | --- |"


def format_row(r):
    if "skip" in r and "time" not in r:
        return f"| {r['n']} | {r['contender']} | - | {r['skip']} | - | - | - |"
    total = (r["held_autograd"] + r["held_solver"]) / MB
    held = f"{total:.2f} ({r['held_autograd'] / MB:.2f} + {r['held_solver'] / MB:.2f})"
    tm = f"{r['time']:.3f} ({r['fwd_med']:.3f} + {r['bwd_med']:.3f})"
    if len(r["times"]) > 1:
        tm += f" [median of {len(r['times'])}]"
    rec = "-" if r["recomputed"] is None else str(r["recomputed"])
    if r["contender"].startswith("pnode k="):
        rec += f" ({r['checkpoints']} ckpts)"
    return f"| {r['n']} | {r['contender']} | {r['steps']} | {tm} | {held} | {rec} | {r['err']} |"


def table(cs, ns):
    lines = [HEADER, RULE]
    for n in ns:
        for c in cs:
            lines.append(format_row(c.results[n]))
    return lines


def plot(cs, ns, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"pnode all": ("C0", "o", "-"), "pnode states": ("C1", "s", "-"),
              "pnode k=4": ("C2", "v", "--"), "pnode k=16": ("C3", "^", "--"),
              "pnode k=sqrt(n)": ("C4", "D", "--"), "tdq odeint": ("C5", "x", ":"),
              "tdq adjoint": ("C6", "+", ":"), "ACA (torch)": ("C7", "*", "-.")}
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(12, 4.8))
    for c in cs:
        pts = [(n, c.results[n]) for n in ns if "time" in c.results[n]]
        if not pts:
            continue
        color, marker, ls = styles.get(c.name, (None, "o", "-"))
        xs = [n for n, _ in pts]
        mem = [max((r["held_autograd"] + r["held_solver"]) / MB, 1e-3) for _, r in pts]
        tms = [r["time"] for _, r in pts]
        ax_m.plot(xs, mem, marker=marker, ls=ls, color=color, label=c.name)
        ax_t.plot(xs, tms, marker=marker, ls=ls, color=color, label=c.name)
    for ax, ylabel in ((ax_m, "peak MB held for the backward"), (ax_t, "forward + backward time [s]")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of RK4 steps n")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_m.set_title("memory (autograd saved tensors + solver buffers)")
    ax_t.set_title("time (one thread)")
    ax_t.legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="n up to 1000, tighter limits (< 1 min)")
    p.add_argument("--out", default=None,
                   help="markdown table path; the PNG goes next to it (default outputs/bench_memory.md; "
                        "with --quick, print only)")
    p.add_argument("--budget", type=float, default=None,
                   help="time budget of the measurements in s (default 300, 45 with --quick)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    ns = (10, 100, 1000) if args.quick else (10, 100, 1000, 10000)
    per_call_limit = 8.0 if args.quick else 60.0
    budget = args.budget or (45.0 if args.quick else 300.0)
    out = args.out or (None if args.quick else os.path.join("outputs", "bench_memory.md"))

    title = (f"MLP {STATE}-{HIDDEN}-{STATE} (tanh), batch {BATCH}, float64, RK4 on [0, 1] with "
             f"step 1/n, loss (y(1)**2).sum(); torch {torch.__version__.split('+')[0]}, "
             f"torchdiffeq {torchdiffeq.__version__}, pnode {pnode.__version__}, 1 thread")
    print(title, flush=True)
    print(HEADER + "\n" + RULE, flush=True)
    wall = time.perf_counter()
    cs, measured = run(ns, per_call_limit, budget, slow_call_s=5.0, log=lambda s: print(s, flush=True),
                       quick=args.quick)
    lines = [f"Memory and time of one forward + backward versus the number of steps "
             f"(`scripts/bench_memory.py{' --quick' if args.quick else ''}`).", "", title + ".", "",
             *table(cs, ns), "",
             "- peak MB: bytes held for the backward once the forward has returned: tensors autograd "
             "saved (pack hook, each storage once, y0 and parameters excluded) + pnode's buffers "
             "outside autograd (PETSc trajectory, and the tape's stage outputs with memory='graphs'; "
             "checkpoint modes: peak of k states + one step's stages, reached in the backward). "
             "Graphs built inside a backward one step / one f call at a time are not counted.",
             "- recomputed steps: pnode's Stats.recomputed_steps (checkpoint modes: steps re-executed "
             "in the backward, the Griewank-Walther optimum for k states, including the one re-execution "
             "of every step that is reversed); ACA re-executes every step once.",
             "- grad rel err: max over y0 and each parameter of max|g - g_ref| / max|g_ref| vs pnode "
             "all at the same n. '3/8 rule': torchdiffeq's rk4 is the 3/8-rule variant, so this is the "
             "discretisation difference between two RK4 schemes (and, for odeint_adjoint, its "
             "continuous-adjoint error), not a gradient error. ACA uses classic RK4 like PETSc.",
             f"- skipped: estimated time per call over {per_call_limit:g} s, or over what was left of "
             f"the {budget:g} s budget (estimate: time per step execution at the previous n x step "
             f"executions at this n).",
             f"- measurements took {measured:.0f} s."]
    print("\n" + "\n".join(lines[-6:]))   # the rows were printed as they came
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        png = os.path.splitext(out)[0] + ".png"
        plot(cs, ns, png, title)
        print(f"\nwrote {out} and {png} in {time.perf_counter() - wall:.0f} s")
    else:
        print(f"\ndone in {time.perf_counter() - wall:.0f} s (no files written; pass --out to save)")


if __name__ == "__main__":
    main()
