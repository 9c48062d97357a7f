"""MPI scaling of pnode: time per forward + backward on 1 and 2 ranks.

Modes:

* ``data-parallel``: a batch of independent samples (2048 x 32, MLP 32-128-128-32,
  rk4, step 0.025 over [0, 1]); each rank integrates its shard on its own solver,
  then ``pnode.distributed.allreduce_gradients`` sums the parameter gradients.
* ``grid-explicit``: one neural reaction-diffusion state (2 channels on a periodic
  256 x 256 grid, fixed 5-point diffusion + a learned 1x1-conv reaction) spread over
  the ranks by a ``pnode.Grid`` (PETSc DMDA), rk4, step 0.01 over [0, 0.1].
* ``grid-implicit``: the same model on 96 x 96 with ``beuler``, step 0.02 over
  [0, 0.1]: Newton-Krylov with pnode's default colored Jacobian (block Jacobi/ILU, so
  Krylov counts change with the number of ranks).

Each timed call is one forward + backward (+ the gradient allreduce of data
parallelism) between two barriers; a call's time is the max over ranks, and the
table gives the median of ``--repeats`` calls after one warm-up, the speedup over
the first rank count and the parallel efficiency (speedup / rank ratio). Workers
run one thread each, so the ranks, not torch's thread pool, provide the parallelism.

Usage::

    python scripts/bench_mpi.py                 # all modes on 1 and 2 ranks, ~2-3 min
    python scripts/bench_mpi.py --quick         # small sizes, a smoke run (< 60 s)
    python scripts/bench_mpi.py --ranks 1 2 4 --modes grid-explicit --mpiexec /opt/mpi/bin/mpiexec

The driver launches ``mpiexec -n P python scripts/bench_mpi.py --worker MODE`` per
mode and rank count. On a cluster, run the workers under the batch system's
launcher instead; rank 0 prints one ``BENCH_JSON {...}`` line::

    srun -n 2 python scripts/bench_mpi.py --worker grid-explicit --repeats 5

Timings are noisy on a shared machine (other jobs steal cores, and with as many
ranks as cores any background load lands on a rank that the others wait for):
compare runs made back to back, and prefer several repeats.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from importlib.metadata import version

MODES = ("data-parallel", "grid-explicit", "grid-implicit")
TAG = "BENCH_JSON "  # marks the result line among whatever MPI or PETSc print


# -- worker: runs under mpiexec, imports torch and pnode ----------------------------------

def data_parallel(quick):
    import torch
    from torch import nn
    import pnode
    from pnode import distributed as dist

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(),
                                     nn.Linear(128, 32))

        def forward(self, t, y):
            return self.net(y)

    batch = 256 if quick else 2048
    func = MLP().double()
    full = torch.randn(batch, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y0, t = dist.shard(full), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)

    def call():
        func.zero_grad(set_to_none=True)
        ys, stats = pnode.odeint(func, y0, t, method="rk4", options={"step_size": 0.025},
                                 return_stats=True)
        (ys ** 2).sum().backward()
        dist.allreduce_gradients(func)
        return stats

    return call, f"batch {batch}x32, MLP 32-128-128-32, rk4 dt 0.025, t in [0, 1]"


def grid_mode(quick, implicit):
    import torch
    import torch.nn.functional as F
    from torch import nn
    import pnode

    class ReactionDiffusion(nn.Module):
        """D * Laplacian(u) (fixed stencil, reads the ghosts) + a learned pointwise reaction."""

        def __init__(self, D=0.1):  # D * dt / h^2 = 1e-3: far inside rk4's stability region
            super().__init__()
            lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
            self.register_buffer("kernel", (D * lap).expand(2, 1, 3, 3).clone())
            self.reaction = nn.Sequential(nn.Conv2d(2, 32, 1), nn.Tanh(), nn.Conv2d(32, 2, 1)).double()

        def forward(self, t, u):
            diffusion = F.conv2d(u.unsqueeze(0), self.kernel, groups=2)[0]
            return diffusion + self.reaction(u[:, 1:-1, 1:-1].unsqueeze(0))[0]

    if implicit:
        # A periodic side divisible by 3 lets the colored Jacobian use 3 x 3 x dof = 18 JVPs
        # (a side of 128 needs 4 x 4 x 2 = 32).
        n, method, options = (48 if quick else 96), "beuler", {"step_size": 0.02}
    else:
        n, method, options = (64 if quick else 256), "rk4", {"step_size": 0.01}
    grid = pnode.Grid((n, n), dof=2, stencil_width=1, boundary="periodic")
    func = ReactionDiffusion()
    field = torch.randn(2, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 0.1], dtype=torch.float64)

    def call():
        func.zero_grad(set_to_none=True)
        y0 = grid.local(field).clone().requires_grad_()
        ys, stats = pnode.odeint(func, y0, t, method=method, options=options, grid=grid,
                                 return_stats=True)
        grid.sum((ys ** 2).sum()).backward()  # pnode already sums parameter grads over ranks
        return stats

    return call, f"{n}x{n}x2 periodic, {method} dt {options['step_size']}, t in [0, 0.1]"


def worker(mode, repeats, quick):
    os.environ["OMP_NUM_THREADS"] = "1"  # before torch loads its OpenMP runtime
    import torch
    from mpi4py import MPI
    from pnode import distributed as dist

    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial weights on every rank
    comm = dist.comm()  # PETSc.COMM_WORLD, which pnode's grids and solvers use
    if mode == "data-parallel":
        call, problem = data_parallel(quick)
    else:
        call, problem = grid_mode(quick, implicit=mode == "grid-implicit")

    times = []
    for i in range(repeats + 1):
        comm.Barrier()
        start = time.perf_counter()
        stats = call()
        comm.Barrier()
        elapsed = comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
        if i > 0:  # the first call builds the solver and warms the caches
            times.append(elapsed)
    if comm.Get_rank() == 0:
        print(TAG + json.dumps({
            "mode": mode, "ranks": comm.Get_size(), "problem": problem, "times": times,
            "median": statistics.median(times), "steps": stats.steps,
            "newton": stats.newton_iterations, "krylov": stats.krylov_iterations}), flush=True)


# -- driver: launches the workers and prints the table ------------------------------------

def launch(args, mode, ranks):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # Containers often run as root, which Open MPI refuses unless told otherwise.
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    cmd = [args.mpiexec, "-n", str(ranks), sys.executable, os.path.abspath(__file__),
           "--worker", mode, "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line[len(TAG):] for line in proc.stdout.splitlines() if line.startswith(TAG)]
    if proc.returncode != 0 or not lines:
        sys.exit(f"worker failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                 f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def table(results, ranks):
    base = ranks[0]
    head = (["mode", "problem"] + [f"{p} rank{'s' * (p > 1)} (s)" for p in ranks]
            + [h for p in ranks[1:] for h in (f"speedup {p}/{base}", f"efficiency {p}/{base}")]
            + ["steps", "Newton / Krylov its per rank count"])
    rows = [head, ["---"] * len(head)]
    for mode, runs in results.items():
        t0 = runs[base]["median"]
        row = [mode, runs[base]["problem"]] + [f"{runs[p]['median']:.3f}" for p in ranks]
        for p in ranks[1:]:
            speedup = t0 / runs[p]["median"]
            row += [f"{speedup:.2f}", f"{speedup * base / p:.0%}"]
        its = " ; ".join(f"{runs[p]['newton']} / {runs[p]['krylov']}" for p in ranks)
        rows.append(row + [str(runs[base]["steps"]), its if runs[base]["newton"] else "-"])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls after one warm-up (median)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--mpiexec", default=shutil.which("mpiexec") or "mpiexec")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--worker", choices=MODES, help="internal: run one mode under MPI")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.worker:
        return worker(args.worker, args.repeats, args.quick)

    load = os.getloadavg()[0]  # before our own workers add to it: other jobs compete for the cores
    results = {}
    for mode in args.modes:
        results[mode] = {}
        for p in args.ranks:
            print(f"running {mode} on {p} rank(s) ...", file=sys.stderr, flush=True)
            results[mode][p] = launch(args, mode, p)
    print(table(results, args.ranks))
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\nmachine: {platform.node()}, {nproc} cores (nproc), {platform.machine()}, "
          f"Python {platform.python_version()}, torch {version('torch')}, "
          f"petsc4py {version('petsc4py')}, mpi4py {version('mpi4py')}; "
          f"load average {load:.2f} before the run; "
          f"median of {args.repeats} fwd+bwd after 1 warm-up, 1 thread per rank"
          f"{', --quick sizes' if args.quick else ''}")


if __name__ == "__main__":
    main()
