"""Time pnode's forward+backward against torchdiffeq, and check every gradient.

Side by side in one run, on the same MLP right-hand side (32-128-128-32, tanh),
the same initial states and the same output times t = 0, 0.5, 1, with
loss = sum over the output times of (y**2).sum():

* pnode ``memory="graphs"`` (each stage keeps its autograd graph; backward runs VJPs),
* pnode ``memory="states"`` (stage states only; backward recomputes f),
* ``torchdiffeq.odeint`` (backpropagation through the solver's operations),
* ``torchdiffeq.odeint_adjoint`` (continuous adjoint: a second ODE solved backwards),

for rk4 (40 fixed steps of 0.025) and dopri5 (rtol 1e-5, atol 1e-6), float64 and
float32, batch 16 and 256. Each contender is warmed up once, then timed in 7
interleaved repetitions (the order rotates each repetition); the table shows the
median, and ratios are medians of the per-repetition ratios, so a burst of load
on a shared machine hits both sides of a ratio alike. One thread throughout.

Gradient error. pnode claims the exact gradient of its discrete solution. The
reference is float64 backpropagation (plain autograd) through an independent
pure-torch implementation of PETSc's Runge-Kutta scheme (``tests/reference``)
replaying the very steps pnode accepted (``Stats.step_times``). Two columns:

* ``grad err (own scheme)``: each method against the exact gradient of its *own*
  discrete solution: pnode vs that reference; torchdiffeq's ``odeint`` is exact by
  construction (autograd through its own operations); ``odeint_adjoint`` vs
  ``odeint`` backprop with the same solver and tolerances (its continuous-adjoint error).
* ``diff vs pnode ref``: torchdiffeq's gradient against pnode's reference, for
  dopri5 only: both solve the same ODE at the same tolerances, but on different
  steps, so this mixes discretisation and gradient error; it is not a gradient
  error of either. (torchdiffeq's "rk4" is the 3/8-rule variant, another scheme.)

Errors are max over y0 and each parameter tensor of max|g - g_ref| / max|g_ref|.

Memory, next to each time: bytes held for the backward after the forward, i.e.
tensors autograd saved during the forward (``saved_tensors_hooks``, each storage
counted once, parameters and y0 excluded) plus, for pnode, its other buffers:
PETSc's in-memory trajectory (per step the solution and every stage vector, in
double precision) and, with ``memory="graphs"``, the tape's stage outputs.
Graphs built inside a backward (pnode "states", odeint_adjoint) live one f call
at a time and are not counted; tensors saved for rejected step attempts are
counted although they may be freed early (an upper bound; few steps are rejected here),
and so is the graph of the one evaluation at t0 that pnode's "states" forward builds to check
func for tensors it will not differentiate (0.6 MB here, freed at once).

Then the bridge's own overhead on a tiny right-hand side (2-D state, hidden 16,
rk4, 4000 steps): microseconds per f call and per VJP beyond bare torch calls.

With --profile, where the rk4 batch-256 time goes for pnode and torchdiffeq's
backprop (f, VJPs, PETSc, glue; sampled by py-spy, see scripts/_profile_split.py),
and what differentiating stage by stage costs in the autograd engine alone.

Usage: python scripts/bench_gradients.py [--quick] [--reps N] [--profile] [--out FILE]
"""

import argparse
import copy
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

# "One thread" must hold for PETSc too: its Vec kernels call OpenBLAS, which
# otherwise starts a thread per core; on a busy machine a descheduled helper
# thread stalls every VecAXPY (measured here: 0.7 ms instead of 10 us on 25k
# entries). Read when libopenblas loads, so it is set before the imports.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/reference: the independent RK implementation

import torch  # noqa: E402
import torchdiffeq  # noqa: E402
from torch import nn  # noqa: E402

import pnode  # noqa: E402
from pnode._rhs import _vjp  # noqa: E402
from tests.reference.rk import explicit_rk  # noqa: E402
from tests.reference.tableaus import RK_TABLEAUS  # noqa: E402
import _profile_split  # noqa: E402  (scripts/ is on sys.path)
from _bench_common import SavedBytes, rel_err  # noqa: E402

T_OUT = (0.0, 0.5, 1.0)
METHOD_SETTINGS = {
    # name: (pnode kwargs, torchdiffeq kwargs)
    "rk4": (dict(method="rk4", options={"step_size": 0.025}),
            dict(method="rk4", options={"step_size": 0.025})),
    "dopri5": (dict(method="dopri5", rtol=1e-5, atol=1e-6),
               dict(method="dopri5", rtol=1e-5, atol=1e-6)),
}
CONTENDERS = ("pnode graphs", "pnode states", "tdq odeint", "tdq adjoint")
TARGET_OVERHEAD_US = 20.0


# -- the right-hand side ------------------------------------------------------------------
class MLP(nn.Sequential):
    def __init__(self, sizes):
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.Tanh())
        super().__init__(*layers)


class Counted(nn.Module):
    """f(t, y) = net(y), counting its calls (every contender pays the same increment)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return self.net(y)


# -- memory --------------------------------------------------------------------------------
def pnode_other_bytes(stats, n, itemsize, subtype):
    """Buffers pnode holds for the backward outside autograd's saved tensors."""
    stages = RK_TABLEAUS[subtype].stages
    # PETSc's memory trajectory keeps, per step, the solution and every stage vector.
    petsc = stats.steps * (stages + 1) * n * torch.finfo(pnode.petsc_dtype).bits // 8
    # With memory="graphs" the tape keeps each stage's output; its input (f's own
    # copy, in the model's dtype on the host) is already among autograd's saved tensors.
    tape = stats.rhs_evals * n * itemsize if stats.memory == "graphs" else 0
    return petsc + tape


# -- one problem ---------------------------------------------------------------------------
@dataclass
class Contender:
    name: str
    solve: Callable
    node: Optional[pnode.NeuralODE] = None
    times: list = field(default_factory=list)
    ratio_odeint: list = field(default_factory=list)
    ratio_adjoint: list = field(default_factory=list)
    nfe: str = ""
    saved: int = 0
    other: int = 0
    grads: Optional[list] = None
    step_times: Optional[list] = None


def make_contenders(func, method):
    pn_kw, tdq_kw = METHOD_SETTINGS[method]
    out = []
    for memory in ("graphs", "states"):
        kw = dict(pn_kw)
        kw["options"] = {**kw.get("options", {}), "memory": memory}
        node = pnode.NeuralODE(func, **kw)
        out.append(Contender(f"pnode {memory}", node, node))
    out.append(Contender("tdq odeint", lambda y0, t: torchdiffeq.odeint(func, y0, t, **tdq_kw)))
    out.append(Contender("tdq adjoint", lambda y0, t: torchdiffeq.odeint_adjoint(func, y0, t, **tdq_kw)))
    return out


def _forward(c, y0, t):
    return c.solve(y0, t).pow(2).sum()


def _backward(loss):  # a frame of its own, like _forward: the profile's phases
    loss.backward()


def fwd_bwd(c, func, y0, t):
    """One forward+backward; returns (forward seconds, backward seconds)."""
    func.zero_grad(set_to_none=True)
    y0 = y0.detach().requires_grad_()
    start = time.perf_counter()
    loss = _forward(c, y0, t)
    middle = time.perf_counter()
    _backward(loss)
    return middle - start, time.perf_counter() - middle


def measured_run(c, func, y0, t, subtype):
    """One untimed fwd+bwd recording calls, held memory and the gradient."""
    func.zero_grad(set_to_none=True)
    y0 = y0.detach().requires_grad_()
    saved = SavedBytes(exclude=[y0, *func.parameters()])
    func.calls = 0
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        loss = c.solve(y0, t).pow(2).sum()
    fwd_calls = func.calls
    loss.backward()
    bwd_calls = func.calls - fwd_calls
    c.saved = saved.bytes
    c.grads = [y0.grad.detach().clone()] + [p.grad.detach().clone() for p in func.parameters()]
    if c.node is not None:
        st = c.node.stats
        c.nfe = f"{st.rhs_evals} / {st.vjps} VJP" + (f" (+{st.recomputed_rhs} f)" if st.recomputed_rhs else "")
        c.other = pnode_other_bytes(st, y0.numel(), y0.element_size(), subtype)
        c.step_times = list(st.step_times)
    elif c.name == "tdq odeint":
        c.nfe = f"{fwd_calls} / {fwd_calls} VJP (autograd)"
    else:
        c.nfe = f"{fwd_calls} / {bwd_calls} VJP (+{bwd_calls} f)"


def reference_grads(net, y0, t, subtype, step_times):
    """float64 autograd through PETSc's RK scheme on pnode's accepted steps."""
    net64 = copy.deepcopy(net).double()
    y0r = y0.detach().double().requires_grad_()
    states = explicit_rk(lambda s, y: net64(y), y0r, subtype, step_times)
    idx = []
    for tk in t.tolist():
        i = min(range(len(step_times)), key=lambda j: abs(step_times[j] - tk))
        if abs(step_times[i] - tk) > 1e-12 * max(1.0, abs(tk)):
            raise RuntimeError(f"output time {tk} is not a step boundary of pnode's solve")
        idx.append(i)
    loss = states[idx].pow(2).sum()
    return list(torch.autograd.grad(loss, [y0r, *net64.parameters()]))


def make_problem(dtype, batch, seed=0):
    """(func, y0, t): the benchmark's MLP right-hand side, initial states and output times."""
    torch.manual_seed(seed)
    func = Counted(MLP([32, 128, 128, 32])).to(dtype)
    return func, torch.randn(batch, 32, dtype=dtype), torch.tensor(T_OUT, dtype=dtype)


def run_problem(dtype, batch, method, reps, seed=0):
    func, y0, t = make_problem(dtype, batch, seed)
    subtype = pnode.METHODS[method].subtype
    cs = make_contenders(func, method)

    for c in cs:  # warm-up: builds pnode's PETSc objects, torch's kernels, caches
        fwd_bwd(c, func, y0, t)
    for c in cs:
        measured_run(c, func, y0, t, subtype)
    for rep in range(reps):
        k = rep % len(cs)
        rep_times = {}
        for c in cs[k:] + cs[:k]:
            gc.collect()
            start = time.perf_counter()
            fwd_bwd(c, func, y0, t)
            rep_times[c.name] = time.perf_counter() - start
            c.times.append(rep_times[c.name])
        for c in cs:
            c.ratio_odeint.append(rep_times[c.name] / rep_times["tdq odeint"])
            c.ratio_adjoint.append(rep_times[c.name] / rep_times["tdq adjoint"])

    by = {c.name: c for c in cs}
    refs = {}

    def ref_for(step_times):
        key = tuple(step_times)
        if key not in refs:
            refs[key] = reference_grads(func.net, y0, t, subtype, step_times)
        return refs[key]

    errs = {}
    for c in cs:
        if c.node is not None:
            errs[c.name] = (f"{rel_err(c.grads, ref_for(c.step_times)):.1e}", "")
    errs["tdq odeint"] = ("exact (autograd)", "")
    errs["tdq adjoint"] = (f"{rel_err(by['tdq adjoint'].grads, by['tdq odeint'].grads):.1e} vs odeint", "")
    if method == "dopri5":
        ref = ref_for(by["pnode graphs"].step_times)
        for name in ("tdq odeint", "tdq adjoint"):
            errs[name] = (errs[name][0], f"{rel_err(by[name].grads, ref):.1e}")
    rows = []
    for c in cs:
        rows.append(dict(
            problem="MLP 32-128-128-32", dtype=str(dtype).replace("torch.", ""), batch=batch,
            method=method, contender=c.name, ms=1e3 * statistics.median(c.times),
            spread=1e3 * (max(c.times) - min(c.times)),
            r_odeint=statistics.median(c.ratio_odeint), r_adjoint=statistics.median(c.ratio_adjoint),
            nfe=c.nfe, saved=c.saved, other=c.other, err_own=errs[c.name][0], err_ref=errs[c.name][1]))
    return rows


# -- report ----------------------------------------------------------------------------
HEADER = ("| problem | dtype | batch | method | contender | median ms | ratio vs tdq odeint "
          "| ratio vs tdq adjoint | NFE fwd / bwd | held MB (autograd + solver) "
          "| grad err (own scheme) | diff vs pnode ref |")


def format_row(r):
    mb = (r["saved"] + r["other"]) / 2**20
    held = f"{mb:.1f} ({r['saved'] / 2**20:.1f} + {r['other'] / 2**20:.1f})"
    return (f"| {r['problem']} | {r['dtype']} | {r['batch']} | {r['method']} | {r['contender']} "
            f"| {r['ms']:.1f} | {r['r_odeint']:.2f}x | {r['r_adjoint']:.2f}x | {r['nfe']} | {held} "
            f"| {r['err_own']} | {r['err_ref'] or '-'} |")


def targets(rows):
    lines = []
    for r in rows:
        if r["contender"] != "pnode graphs" or r["batch"] != 256:
            continue
        checks = [("tdq odeint", r["r_odeint"], 1.0)]
        if r["method"] == "dopri5":
            checks.append(("tdq adjoint", r["r_adjoint"], 0.4))
        for name, ratio, goal in checks:
            ok = "met" if ratio <= goal else "MISSED"
            lines.append(f"- {r['method']} {r['dtype']} batch 256: pnode graphs / {name} = "
                         f"{ratio:.2f}x (target <= {goal}x): {ok}")
    return lines


# -- tiny right-hand side: the bridge's own overhead --------------------------------------
def overhead(reps, steps):
    """The bridge's own cost per f call and per VJP, against the same torch calls made bare.

    Forward and backward are timed apart: pnode's forward with memory='graphs' against a
    loop of f calls with grad that keeps every graph, its backward against a loop of VJPs
    on those graphs through the same engine call pnode makes (pnode._rhs._vjp, not the
    slower torch.autograd.grad), so each figure is pnode's own work only.
    """
    torch.manual_seed(0)
    func = Counted(MLP([2, 16, 2])).double()
    params = list(func.parameters())
    y0 = torch.randn(1, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    opts = {"step_size": 1.0 / steps}
    graphs = pnode.NeuralODE(func, method="rk4", options={**opts, "memory": "graphs"})
    states = pnode.NeuralODE(func, method="rk4", options={**opts, "memory": "states"})
    tdq_kw = dict(method="rk4", options={"step_size": 1.0 / steps})

    with torch.no_grad():
        graphs(y0, t)
    n_f = graphs.stats.rhs_evals
    fwd_bwd(Contender("g", graphs), func, y0, t)
    n_vjp = graphs.stats.vjps
    tt = torch.tensor(0.5, dtype=torch.float64)
    w = torch.ones_like(y0)

    def pnode_nograd():
        with torch.no_grad():
            graphs(y0, t)

    def bare_f():
        with torch.no_grad():
            for _ in range(n_f):
                func(tt, y0)

    def bare_graphs():  # what pnode's graphs mode does per stage: f with grad kept, later its VJP
        start = time.perf_counter()
        kept = []
        for _ in range(n_vjp):
            y = y0.detach().requires_grad_()
            with torch.enable_grad():
                kept.append((y, func(tt, y)))
        middle = time.perf_counter()
        for y, out in kept:
            _vjp(out, (y, *params), w)
        kept.clear()   # freeing the graphs is part of a backward (pnode's tape dies in it)
        return middle - start, time.perf_counter() - middle

    def tdq_nograd():
        with torch.no_grad():
            torchdiffeq.odeint(func, y0, t, **tdq_kw)

    # A case that returns a tuple reports its phases' seconds itself; any other is timed whole.
    cases = {
        "pnode fwd (no grad)": pnode_nograd,
        "bare f loop (no grad)": bare_f,
        "pnode graphs fwd, bwd": lambda: fwd_bwd(Contender("g", graphs), func, y0, t),
        "bare f-with-grad loop, VJP loop": bare_graphs,
        "pnode states fwd+bwd": lambda: (sum(fwd_bwd(Contender("s", states), func, y0, t)),),
        "tdq odeint fwd (no grad)": tdq_nograd,
        "tdq odeint fwd+bwd": lambda: (sum(fwd_bwd(Contender("t", lambda a, b: torchdiffeq.odeint(func, a, b, **tdq_kw)),
                                                   func, y0, t)),),
    }
    for fn in cases.values():
        fn()
    times = {k: [] for k in cases}
    names = list(cases)
    for rep in range(reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            gc.collect()
            start = time.perf_counter()
            parts = cases[name]()
            times[name].append(parts if isinstance(parts, tuple) else (time.perf_counter() - start,))
    med = {k: [statistics.median(p[i] for p in v) for i in range(len(v[0]))] for k, v in times.items()}
    func.calls = 0
    with torch.no_grad():
        torchdiffeq.odeint(func, y0, t, **tdq_kw)
    n_tdq = func.calls
    us = 1e6
    pn_fwd, pn_bwd = med["pnode graphs fwd, bwd"]
    bare_fwd, bare_bwd = med["bare f-with-grad loop, VJP loop"]
    bare_f_each = med["bare f loop (no grad)"][0] / n_f
    per_f = (med["pnode fwd (no grad)"][0] - med["bare f loop (no grad)"][0]) / n_f * us
    per_f_graph = (pn_fwd - bare_fwd) / n_vjp * us
    per_vjp = (pn_bwd - bare_bwd) / n_vjp * us
    per_vjp_s = (med["pnode states fwd+bwd"][0] - med["bare f loop (no grad)"][0] - bare_fwd - bare_bwd) / n_vjp * us
    tdq_f = (med["tdq odeint fwd (no grad)"][0] - bare_f_each * n_tdq) / n_tdq * us

    def verdict(x):
        return f"target < {TARGET_OVERHEAD_US:g} us: {'met' if x < TARGET_OVERHEAD_US else 'MISSED'}"
    lines = [
        f"Tiny right-hand side: 2-D state, MLP 2-16-2, float64, rk4, {graphs.stats.steps} steps "
        f"({n_f} f calls, {n_vjp} VJPs), median of {reps} interleaved runs, one thread.",
        "",
        "| case | median ms |",
        "| --- | --- |",
        *[f"| {k} | {' + '.join(f'{1e3 * x:.1f}' for x in v)} |" for k, v in med.items()],
        "",
        f"- bare torch: {bare_f_each * us:.1f} us per f call (no grad), {bare_fwd / n_vjp * us:.1f} us per "
        f"f call with grad, {bare_bwd / n_vjp * us:.1f} us per VJP (the engine call pnode makes)",
        f"- pnode overhead per f call (forward, no grad): {per_f:.1f} us ({verdict(per_f)})",
        f"- pnode overhead per f call keeping its graph (forward of memory='graphs'): {per_f_graph:.1f} us",
        f"- pnode overhead per VJP (backward of memory='graphs'): {per_vjp:.1f} us ({verdict(per_vjp)})",
        f"- pnode overhead per VJP, memory='states' (forward f + recomputed f + VJP per stage): {per_vjp_s:.1f} us",
        f"- for scale, torchdiffeq odeint: {tdq_f:.1f} us per f call beyond bare f (no grad); its fwd+bwd "
        f"costs {med['tdq odeint fwd+bwd'][0] / n_tdq * us:.1f} us per f call all in (one backprop through "
        f"every call), pnode graphs {(pn_fwd + pn_bwd) / n_vjp * us:.1f} us per f + VJP all in",
        petsc_floor(reps, steps),
    ]
    return lines


class _Nothing:
    """A MatPython context whose products do nothing."""

    def mult(self, mat, x, y):
        pass

    multTranspose = mult


def petsc_floor(reps, steps):
    """PETSc's and petsc4py's own share: the same rk4 solve and adjoint with empty callbacks.

    One callback per stage forward (the right-hand side) and four per stage backward (state
    Jacobian, parameter Jacobian and their transposed products), as pnode installs them.
    """
    from petsc4py import PETSc
    n, n_params = 2, 82   # MLP 2-16-2
    u, mu = PETSc.Vec().createSeq(n), PETSc.Vec().createSeq(n_params)
    ts = PETSc.TS().create(comm=PETSc.COMM_SELF)
    ts.setOptionsPrefix("floor_")
    options = PETSc.Options()
    options["floor_ts_adapt_type"] = "none"
    options["ts_trajectory_type"] = "memory"   # TSTrajectory ignores the TS's prefix
    ts.setType("rk")
    ts.setRKType("4")
    J, Jp = (PETSc.Mat().createPython(size, context=_Nothing()) for size in ([n, n], [n, n_params]))
    J.setUp()
    Jp.setUp()
    ts.setRHSFunction(lambda ts, t, u, F: None, u.duplicate())
    ts.setRHSJacobian(lambda ts, t, u, A, P: None, J, J)
    ts.setRHSJacobianP(lambda ts, t, u, A: None, Jp)
    lam = u.duplicate()   # named: TSSetCostGradients does not take a reference to its Vecs
    ts.setCostGradients([lam], [mu])
    ts.setExactFinalTime(PETSc.TS.ExactFinalTime.MATCHSTEP)
    fwd, bwd = [], []
    for _ in range(reps + 1):
        ts.removeTrajectory()   # a fresh trajectory per solve, as pnode does
        ts.setSaveTrajectory()
        ts.setFromOptions()
        ts.setTime(0.0)
        ts.setStepNumber(0)
        ts.setTimeStep(1.0 / steps)
        ts.setMaxTime(1.0)
        start = time.perf_counter()
        ts.solve(u)
        middle = time.perf_counter()
        ts.adjointSetSteps(steps)
        ts.adjointSolve()
        fwd.append(middle - start)
        bwd.append(time.perf_counter() - middle)
    del options["ts_trajectory_type"]
    del options["floor_ts_adapt_type"]
    stages = 4 * steps
    return (f"- PETSc's own floor, the same rk4 solve and adjoint with empty Python callbacks: "
            f"{1e6 * statistics.median(fwd[1:]) / stages:.1f} us per stage forward, "
            f"{1e6 * statistics.median(bwd[1:]) / stages:.1f} us per stage backward")


# -- where pnode's time goes ----------------------------------------------------------------
PROFILED = ("pnode graphs", "tdq odeint")


def profile_worker(spec, reps):
    """``--profile-worker DTYPE:CONTENDER``: rk4 at batch 256, timed, then profiled on cue.

    Prints the unprofiled median seconds per forward+backward, waits for a line on
    stdin (py-spy attaching, see scripts/_profile_split.py), then repeats the calls.
    """
    dtype_name, name = spec.split(":", 1)
    func, y0, t = make_problem(getattr(torch, dtype_name), 256)
    c = {c.name: c for c in make_contenders(func, "rk4")}[name]
    fwd_bwd(c, func, y0, t)
    print(statistics.median(sum(fwd_bwd(c, func, y0, t)) for _ in range(reps)), flush=True)
    sys.stdin.readline()
    for _ in range(4 * reps):
        fwd_bwd(c, func, y0, t)


def profile_split(reps, dtypes):
    """py-spy split of pnode graphs and torchdiffeq odeint, rk4, batch 256 (scripts/_profile_split.py)."""
    lines = ["Profile (py-spy, sampling 250 Hz; rk4, 40 steps, MLP 32-128-128-32, batch 256, one thread): "
             "where each contender's forward and backward time goes. f = the user's module, VJPs = "
             "pnode's autograd-engine call per stage, PETSc = C code inside ts.solve/adjointSolve "
             "(no callback running), torch autograd = the engine call of loss.backward() "
             "(torchdiffeq's whole chained backward), torchdiffeq = its Runge-Kutta arithmetic, "
             "glue = the rest (pnode's callbacks, casts, copies, checks)."]
    for dtype in dtypes:
        for name in PROFILED:
            label = f"{name}, {str(dtype)[6:]}"
            argv = [sys.executable, os.path.abspath(__file__), "--profile-worker",
                    f"{str(dtype)[6:]}:{name}", "--reps", str(reps)]
            try:
                seconds, counts = _profile_split.profile(argv)
            except RuntimeError as exc:
                return lines + [f"- split unavailable: {exc}"]
            lines += _profile_split.report(label, seconds, counts)
    return lines


def engine_split(reps=7, dtype=torch.float64, stages=160, h=0.025):
    """What any stage-by-stage adjoint pays in the autograd engine, before PETSc.

    The MLP of the table (batch 256) evaluated 160 times along an explicit
    Euler chain y_{k+1} = y_k + h f(y_k), and dL/dy_0, dL/dp for L = sum(y_160)
    computed three ways: one backward through the whole chain (what torchdiffeq's
    backprop does); one VJP per evaluation on its retained graph, the state and
    parameter products summed by hand (what TSAdjoint asks for, stage by stage);
    and the same VJPs with their products dropped, which separates the engine
    calls from the summing. Same arithmetic, same graphs.
    """
    torch.manual_seed(0)
    net = MLP([32, 128, 128, 32]).to(dtype)
    params = tuple(net.parameters())
    y0 = torch.randn(256, 32, dtype=dtype)

    def chained():
        y = y0.clone().requires_grad_()
        out = y
        for _ in range(stages):
            out = out + h * net(out)
        start = time.perf_counter()
        torch.autograd.grad(out.sum(), (y, *params))
        return time.perf_counter() - start

    def per_stage(summed):
        graphs, y = [], y0
        for _ in range(stages):
            y_in = y.clone().requires_grad_()
            graphs.append((y_in, net(y_in)))
            y = y + h * graphs[-1][1].detach()
        start = time.perf_counter()
        lam = torch.ones_like(y0)
        acc = [torch.zeros_like(p) for p in params]
        for y_in, out in reversed(graphs):
            g = _vjp(out, (y_in, *params), h * lam)   # the engine call pnode's bridge makes
            if summed:
                lam = lam + g[0]
                torch._foreach_add_(acc, list(g[1:]))
        return time.perf_counter() - start

    cases = {"chained": chained, "summed": lambda: per_stage(True), "dropped": lambda: per_stage(False)}
    for fn in cases.values():
        fn()
    times = {k: [] for k in cases}
    for _ in range(reps):
        for k, fn in cases.items():
            times[k].append(fn())
    a, b, c = (statistics.median(times[k]) for k in cases)
    return [f"Autograd engine, same 160 MLP evaluations ({str(dtype)[6:]}, batch 256): one backward through "
            f"the chain {1e3 * a:.1f} ms; 160 separate VJPs on retained graphs, products summed, "
            f"{1e3 * b:.1f} ms ({b / a:.2f}x), the same VJPs with their products dropped {1e3 * c:.1f} ms "
            f"({c / a:.2f}x). The first ratio is what differentiating stage by stage costs before any "
            f"PETSc work; the gap between the two, summing the parameter products outside the engine."]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="batch 256 only, 3 repetitions, 1000 steps in the tiny right-hand-side section")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7, 3 with --quick)")
    p.add_argument("--dtypes", default="float64,float32")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 16,256)")
    p.add_argument("--methods", default="rk4,dopri5")
    p.add_argument("--profile", action="store_true",
                   help="also split pnode's and torchdiffeq's rk4 time with py-spy (needs py-spy)")
    p.add_argument("--profile-worker", metavar="DTYPE:CONTENDER", help=argparse.SUPPRESS)
    p.add_argument("--no-overhead", action="store_true", help="skip the tiny right-hand-side section")
    p.add_argument("--out", default=os.path.join("outputs", "bench_gradients.md"))
    args = p.parse_args(argv)
    reps = args.reps or (3 if args.quick else 7)
    torch.set_num_threads(1)   # the targets are per thread; and the machine is shared
    if args.profile_worker:
        return profile_worker(args.profile_worker, reps)
    batches = [int(b) for b in (args.batches or ("256" if args.quick else "16,256")).split(",")]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    methods = args.methods.split(",")

    started = time.perf_counter()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    precision = "double" if pnode.petsc_dtype == torch.float64 else "single"
    header = [f"pnode {pnode.__version__} on a {precision}-precision PETSc, torch {torch.__version__}, "
              f"torchdiffeq {torchdiffeq.__version__}; "
              f"{os.cpu_count()} cores, load average {load}; torch threads {torch.get_num_threads()}, "
              f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}; median of {reps} interleaved runs, "
              f"outputs at t = {', '.join(map(str, T_OUT))}, loss = sum_t (y(t)**2).sum()", ""]
    print("\n".join(header), flush=True)
    rows = []
    table = [HEADER, "|" + " --- |" * (HEADER.count("|") - 1)]
    print("\n".join(table), flush=True)
    for dtype in dtypes:
        for method in methods:
            for batch in batches:
                for r in run_problem(dtype, batch, method, reps):
                    rows.append(r)
                    table.append(format_row(r))
                    print(table[-1], flush=True)
    notes = ["", "Targets (batch 256):", *targets(rows), "",
             "NFE: pnode 'f evals / VJPs' (+ f recomputed in the backward); torchdiffeq odeint "
             "backprops through each forward call; odeint_adjoint calls f again for each VJP.",
             "grad err (own scheme): pnode vs float64 autograd through PETSc's RK on pnode's steps; "
             "odeint_adjoint vs odeint backprop (same solver, tolerances, dtype).",
             "diff vs pnode ref: torchdiffeq (own steps) vs that reference; discretisation + gradient "
             "difference, dopri5 only.", ""]
    print("\n".join(notes), flush=True)
    out = header + table + notes
    if not args.no_overhead:
        lines = overhead(reps, steps=1000 if args.quick else 4000)
        print("\n".join(lines), flush=True)
        out += lines + [""]
    if args.profile:
        lines = profile_split(reps, dtypes) + [""] + engine_split(reps) + engine_split(reps, torch.float32)
        print("\n".join([""] + lines), flush=True)
        out += lines + [""]
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(out) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
