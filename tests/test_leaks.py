"""Nothing leaks: thousands of forward+backward calls keep the process RSS and the number
of live PETSc objects flat, and each backward releases its trajectory and checkpoints.

Each measurement runs in a fresh interpreter, so other tests neither pollute the RSS nor
see PETSc's object log switched on. Live PETSc objects are counted exactly from PETSc's
own log (creations minus destructions per class), which sees the TS's internal work
vectors, not just the Python wrappers.
"""

import gc
import json
import os
import subprocess
import sys
import warnings
import weakref

import pytest
import torch

import pnode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r'''
import gc, json, os, re, sys, tempfile, time
import torch
from torch import nn
torch.set_num_threads(1)
from pnode._petsc import PETSc
PETSc.Log.begin()          # before any PETSc object of the run exists
import pnode
from pnode._petsc import PETSc


def live_petsc():
    fd, path = tempfile.mkstemp(suffix=".log"); os.close(fd)
    viewer = PETSc.Viewer().createASCII(path, comm=PETSc.COMM_SELF)
    PETSc.Log.view(viewer)
    viewer.destroy()
    with open(path) as f:
        text = f.read()
    os.unlink(path)
    table = text.split("Object Type", 1)[1].split("=====", 1)[0]
    live = {}
    for line in table.splitlines()[1:]:
        m = re.match(r"\s+(\S.*?)\s+(\d+)\s+(\d+)\s*$", line)
        if m and m.group(1) != "Viewer":
            live[m.group(1)] = live.get(m.group(1), 0) + int(m.group(2)) - int(m.group(3))
    return live


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class F(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(2, 8, dtype=torch.float64)
        self.l2 = nn.Linear(8, 2, dtype=torch.float64)

    poison = False

    def forward(self, t, y):
        out = self.l2(torch.tanh(self.l1(y)))
        return out * float("nan") if self.poison and t > 0.5 else out


mode, n = sys.argv[1], int(sys.argv[2])
func = F()
method = "beuler" if "implicit" in mode else "rk4"
options = {"step_size": 0.5}
if "nan" in mode:   # every other call fails: an adaptive method's NaN
    method, options = "dopri5", {}
if "checkpoints" in mode:
    options["checkpoints"] = 2
module = pnode.NeuralODE(func, method=method, options=options)


def call(i):
    # "lengths": a series of another length every call, as when training on series of varying length
    t = torch.linspace(0.0, 1.0, 2 + i % 30 if "lengths" in mode else 2, dtype=torch.float64)
    y0 = torch.tensor([[1.0, -0.5]], dtype=torch.float64, requires_grad=True)
    func.poison = "nan" in mode and i % 2 == 1
    if func.poison:
        try:
            module(y0, t)
        except pnode.NonFiniteError:
            return
        raise AssertionError("the NaN was not reported")
    if mode.startswith("module"):
        ys = module(y0, t)
    elif mode.startswith("fresh"):   # a new closure every call: a new solver every call
        ys = pnode.odeint(lambda s, y: func(s, y), y0, t, method=method, options=options,
                          adjoint_params=tuple(func.parameters()))
    else:
        ys = pnode.odeint(func, y0, t, method=method, options=options)
    (ys ** 2).sum().backward()


warm = max(1, n // 10)
samples = []
start = time.perf_counter()
for i in range(n):
    call(i)
    if i + 1 in (warm, n):
        gc.collect()
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrappers = sum(isinstance(o, PETSc.Object) for o in gc.get_objects())
        samples.append({"rss": rss(), "petsc": live_petsc(), "wrappers": wrappers,
                        "options": len(PETSc.Options().getAll()), "cached": len(module._cache.solvers)})
print(json.dumps({"seconds": time.perf_counter() - start, "warm": samples[0], "end": samples[1]}))
'''


def measure(mode, n):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", WORKER, mode, str(n)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def assert_flat(result, n, rss_mb=8.0):
    warm, end = result["warm"], result["end"]
    grown = {k: end["petsc"].get(k, 0) - v for k, v in warm["petsc"].items() if end["petsc"].get(k, 0) != v}
    assert not grown, f"live PETSc objects changed over {n} calls: {grown}"
    assert end["wrappers"] - warm["wrappers"] <= 2, (warm["wrappers"], end["wrappers"])
    assert end["options"] == warm["options"], \
        f"PETSc's options database grew from {warm['options']} to {end['options']} entries"
    growth = (end["rss"] - warm["rss"]) / 2 ** 20
    assert growth < rss_mb, f"RSS grew by {growth:.1f} MiB over {n} calls"


@pytest.mark.slow
@pytest.mark.parametrize("mode, n", [("module", 2000), ("odeint", 2000), ("module-checkpoints", 600),
                                     ("odeint-implicit", 400)])
def test_no_leak_over_many_calls(mode, n):
    assert_flat(measure(mode, n), n)


def test_no_leak_over_failed_calls():
    """dopri5's NaN reached PETSc's error norm, which raised without returning the work vector
    it had borrowed: a DM and two state-sized Vecs per failed call."""
    assert_flat(measure("module-nan", 100), 100)


def test_no_leak_when_func_is_a_new_closure_every_call():
    """odeint(lambda t, y: net(t, y), ..., adjoint_params=...) builds a solver per call; each
    must be freed with its closure (PETSc's MatPython/PCPython contexts hide reference
    cycles from Python's garbage collector, so a context that holds the solver keeps it
    and its TS alive forever)."""
    assert_flat(measure("fresh", 150), 150)


def test_series_of_many_lengths_keep_a_bounded_number_of_solvers():
    """A solver serves one len(t); 30 lengths in turn must not keep 30 TSs with their
    trajectories (a 64x64 MLP kept 4 GB over 120 lengths): the least recently used go."""
    from pnode._odeint import _SolverCache
    n = 300   # both samples hold the solvers of the same 8 lengths, with as many output Vecs
    result = measure("module-lengths", n)
    assert result["warm"]["cached"] == result["end"]["cached"] == _SolverCache.size
    assert_flat(result, n)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 2)).double()


class Fn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _net()

    def forward(self, t, y):
        return torch.tanh(self.net(y))


@pytest.mark.parametrize("options", [{"step_size": 0.25}, {"step_size": 0.25, "checkpoints": 2},
                                     {"step_size": 0.25, "memory": "states"}])
def test_backward_releases_the_run(options):
    """After backward and once the graph is gone, nothing of the call survives: no Run, no
    tape of autograd graphs, no checkpoint, and the solver holds no trajectory owner."""
    from pnode._bridge import Run
    func = Fn()
    module = pnode.NeuralODE(func, method="rk4", options=options)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    y0 = torch.tensor([[1.0, -0.5]], dtype=torch.float64, requires_grad=True)
    gc.collect()
    before = {id(r) for r in _live(Run)}     # what earlier tests may have left
    ys = module(y0, t)
    runs = [r for r in _live(Run) if id(r) not in before]
    assert len(runs) == 1
    run = weakref.ref(runs[0])
    del runs
    (ys ** 2).sum().backward()
    assert run().tape is None
    for solver in module._cache.solvers.values():
        assert solver.trajectory_owner is None
        # it held one per solver (a checkpointed backward's one-step replays keep theirs)
        assert not solver._has_trajectory or solver.config.replay == "tape"
        assert solver.rhs is None
    del ys
    gc.collect()
    assert run() is None
    assert not [r for r in _live(Run) if id(r) not in before]


@pytest.mark.parametrize("options", [{"step_size": 0.25}, {"step_size": 0.25, "memory": "states"}])
def test_outputs_dropped_without_a_backward_release_the_run(options):
    """A validation pass outside no_grad: the solver held its run strongly as the trajectory's
    owner, and with it the tape of graphs (500 MB a call in a larger model) until the cache
    evicted the solver. The trajectory goes with the run."""
    from pnode._bridge import Run
    module = pnode.NeuralODE(Fn(), method="rk4", options=options)
    y0 = torch.tensor([[1.0, -0.5]], dtype=torch.float64, requires_grad=True)
    gc.collect()
    before = {id(r) for r in _live(Run)}
    for n in (3, 4, 5):
        module(y0, torch.linspace(0.0, 1.0, n, dtype=torch.float64))
    gc.collect()
    assert not [r for r in _live(Run) if id(r) not in before]
    assert len(module._cache.solvers) == 3
    for solver in module._cache.solvers.values():
        assert solver.trajectory_owner is None and not solver._has_trajectory


@pytest.mark.parametrize("options", [{"step_size": 0.25}, {"step_size": 0.25, "checkpoints": 2},
                                     {"step_size": 0.25, "memory": "states"}])
def test_backward_after_its_solver_was_evicted(options):
    """Forwards of more lengths than the cache holds, then their backwards in another order
    (the first ones' solvers are gone from the cache by then), and a retained graph run twice:
    every gradient is the one a fresh module gives."""
    from pnode._odeint import _SolverCache
    module = pnode.NeuralODE(Fn(), method="rk4", options=options)
    y0 = torch.tensor([[1.0, -0.5]], dtype=torch.float64, requires_grad=True)
    lengths = range(2, 2 + _SolverCache.size + 3)
    outputs = {k: module(y0, torch.linspace(0.0, 1.0, k, dtype=torch.float64)) for k in lengths}
    assert len(module._cache.solvers) <= _SolverCache.size
    for k in sorted(lengths, key=lambda k: (k % 3, k)):
        t = torch.linspace(0.0, 1.0, k, dtype=torch.float64)
        fresh = pnode.NeuralODE(Fn(), method="rk4", options=options)
        expected = torch.autograd.grad((fresh(y0, t) ** 2).sum(), [y0, *fresh.parameters()])
        loss = (outputs.pop(k) ** 2).sum()
        for retain in (True, False):
            got = torch.autograd.grad(loss, [y0, *module.parameters()], retain_graph=retain)
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)
        module(y0, torch.linspace(0.0, 1.0, 40 + k, dtype=torch.float64))   # evicts some more


def _live(cls):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # isinstance() on some torch objects warns
        return [o for o in gc.get_objects() if isinstance(o, cls)]


@pytest.mark.parametrize("jacobian", ["blockdiag", "dense", "matrix-free"])
def test_dropped_implicit_solver_is_freed(jacobian):
    """The block-diagonal preconditioner's pending factorisation held its solver strongly
    inside the PCShell that PETSc owns: a cycle the collector cannot see, so a dropped
    (or evicted) blockdiag solver lived forever."""
    refs = []
    for _ in range(3):
        module = pnode.NeuralODE(Fn(), method="beuler", options={"step_size": 0.25, "jacobian": jacobian})
        y0 = torch.tensor([[1.0, -0.5], [0.3, 0.2]], dtype=torch.float64, requires_grad=True)
        module(y0, torch.linspace(0.0, 1.0, 3, dtype=torch.float64)).sum().backward()
        refs += [weakref.ref(s) for s in module._cache.solvers.values()]
        del module
    gc.collect()
    assert refs and not [r for r in refs if r() is not None]


@pytest.mark.parametrize("method, options", [
    ("rk4", {"step_size": 0.25}), ("dopri5", {}), ("rk4", {"step_size": 0.25, "checkpoints": 2}),
    ("rk4", {"step_size": 0.25, "memory": "states"}), ("beuler", {"step_size": 0.25, "jacobian": "blockdiag"}),
    ("beuler", {"step_size": 0.25, "jacobian": "dense"}), ("cn", {"step_size": 0.25, "jacobian": "matrix-free"}),
    ("arkimex", {"step_size": 0.25})])
def test_dropped_solver_is_freed_without_the_cycle_collector(method, options):
    """A solver held by its TS's callbacks (bound methods) was a cycle that only a full
    collection freed: evicted solvers piled up between collections (2.2 GB over 120 series
    lengths). Callbacks and shells hold the solver weakly, so dropping it frees it at once."""
    gc.collect()
    gc.disable()
    try:
        module = pnode.NeuralODE(Fn(), method=method, options=options)
        y0 = torch.tensor([[1.0, -0.5], [0.3, 0.2]], dtype=torch.float64, requires_grad=True)
        module(y0, torch.linspace(0.0, 1.0, 3, dtype=torch.float64)).sum().backward()
        refs = [weakref.ref(s) for s in module._cache.solvers.values()]
        del module
        assert refs and not [r for r in refs if r() is not None]
    finally:
        gc.enable()
