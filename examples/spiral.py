"""Learn the dynamics of a spiral with a neural ODE integrated by PETSc.

The classic demonstration of R. T. Q. Chen, Y. Rubanova, J. Bettencourt and
D. Duvenaud, "Neural Ordinary Differential Equations", NeurIPS 2018
(arXiv:1806.07366), as in torchdiffeq's ``examples/ode_demo.py``: data come from

    dy/dt = (y**3) @ A,   A = [[-0.1, 2.0], [-2.0, -0.1]],   y(0) = [2, 0],

observed at 1000 times in [0, 25]. An MLP applied to ``y**3`` is fitted to short
windows of that trajectory; pnode integrates it with PETSc TS and computes the
gradient with PETSc's discrete adjoint, so every gradient is the exact
derivative of the trajectory the solver actually computed.

    python examples/spiral.py                 # full run (40-75 s on 2 cores), asserts the fit
    python examples/spiral.py --quick         # ~10 s smoke run, asserts that the error fell
    python examples/spiral.py --method rk4    # any explicit method of pnode.METHODS

Writes a figure of true vs learned trajectories to ``--out``
(default ``outputs/spiral.png``).
"""

import time

_T_START = time.perf_counter()  # the time budget of the demo includes its imports

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import pnode  # noqa: E402
from _common import finish, plt, progress, save_figure, setup  # noqa: E402

TRUE_A = [[-0.1, 2.0], [-2.0, -0.1]]
DATA_SIZE = 1000
T_END = 25.0

# Calibrated on a busy 2-core machine: the default run (seed 0) takes 40-75 s and ends
# at a full-trajectory MAE of 0.12; seeds 0-5 end between 0.10 and 0.18. The
# threshold leaves that spread as margin, since another torch/BLAS build perturbs
# the optimisation much as another seed does.
FULL_NITERS = 1500
FULL_MAX_MAE = 0.35
QUICK_NITERS = 80
QUICK_MAX_RATIO = 0.5
DEFAULT_LR = 5e-3
EXPLICIT_METHODS = [name for name, m in pnode.METHODS.items() if m.kind == "explicit"]


class Cubic(nn.Module):
    """The true dynamics, f(t, y) = (y**3) @ A."""

    def __init__(self, A):
        super().__init__()
        self.register_buffer("A", A)

    def forward(self, t, y):
        return (y ** 3) @ self.A


class ODEFunc(nn.Module):
    """dy/dt = MLP(y**3): the cubic feature is the prior knowledge of Chen et al.'s demo."""

    def __init__(self, hidden=50):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2))
        # As in the original demo: small weights make the untrained dynamics nearly
        # dy/dt = 0, so the first solves are cheap and nothing blows up through the cubic.
        for m in self.net.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.1)
                nn.init.zeros_(m.bias)

    def forward(self, t, y):
        return self.net(y ** 3)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--niters", type=int, default=None,
                   help=f"training iterations (default {FULL_NITERS}, or {QUICK_NITERS} with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="a short smoke run that only asserts that the error fell by half")
    p.add_argument("--method", default="dopri5", choices=EXPLICIT_METHODS,
                   help="pnode integration method; fixed-step ones step at the data spacing")
    p.add_argument("--rtol", type=float, default=1e-7)
    p.add_argument("--atol", type=float, default=1e-9)
    p.add_argument("--batch-time", type=int, default=10, help="points per training window")
    p.add_argument("--batch-size", type=int, default=20, help="windows per batch")
    p.add_argument("--optimizer", choices=("adam", "rmsprop"), default="adam")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help="initial learning rate")
    p.add_argument("--constant-lr", action="store_true", help="no cosine decay of the learning rate")
    p.add_argument("--test-freq", type=int, default=None,
                   help="evaluate the full trajectory every this many iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("outputs", "spiral.png"), help="PNG file to write")
    p.add_argument("--no-check", action="store_true", help="report the metric without asserting it")
    args = p.parse_args(argv)
    if args.niters is None:
        args.niters = QUICK_NITERS if args.quick else FULL_NITERS
    if args.test_freq is None:
        args.test_freq = max(args.niters // (2 if args.quick else 10), 1)
    if args.niters < 1 or args.batch_time < 2 or args.batch_size < 1:
        p.error("--niters and --batch-size must be >= 1, --batch-time >= 2")
    return args


def true_trajectory(dtype):
    t = torch.linspace(0.0, T_END, DATA_SIZE, dtype=dtype)
    y0 = torch.tensor([[2.0, 0.0]], dtype=dtype)
    with torch.no_grad():
        # Tighter than training so that the data's own error is far below the fit's.
        y = pnode.odeint(Cubic(torch.tensor(TRUE_A, dtype=dtype)), y0, t, method="dopri5",
                         rtol=1e-10, atol=1e-12)
    return y0, t, y


def get_batch(true_y, t, batch_time, batch_size, gen):
    """Random windows of the true trajectory: (y at window start, window times, y on the window).

    Every window starts at t = 0 in its own clock: the dynamics are autonomous,
    so one shared time grid lets the whole batch go through a single solve.
    """
    s = torch.randperm(DATA_SIZE - batch_time, generator=gen)[:batch_size]
    batch_y0 = true_y[s]                                         # (M, 1, 2)
    batch_t = t[:batch_time]                                     # (T,)
    batch_y = torch.stack([true_y[s + i] for i in range(batch_time)], dim=0)  # (T, M, 1, 2)
    return batch_y0, batch_t, batch_y


def lr_at(it, niters, lr0):
    # Cosine decay: large early steps find the spiral quickly, small late steps
    # settle the fit, so fewer iterations reach a given error than with a constant rate.
    return lr0 * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * it / niters)))


def plot(path, t, true_y, pred_y, mae, method):
    t = t.numpy()
    ty = true_y[:, 0].numpy()
    py = pred_y[:, 0].numpy()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), constrained_layout=True)
    ax = axes[0]
    ax.plot(ty[:, 0], ty[:, 1], "g-", lw=1.5, label="true")
    ax.plot(py[:, 0], py[:, 1], "b--", lw=1.2, label="learned")
    ax.set(title="phase portrait", xlabel="y1", ylabel="y2", aspect="equal")
    ax.legend(loc="upper right")
    for ax, k in zip(axes[1:], range(2)):
        ax.plot(t, ty[:, k], "g-", lw=1.5, label="true")
        ax.plot(t, py[:, k], "b--", lw=1.2, label="learned")
        ax.set(title=f"y{k + 1}(t)", xlabel="t", ylabel=f"y{k + 1}")
        ax.legend(loc="upper right")
    fig.suptitle(f"pnode neural ODE ({method}): full-trajectory mean |error| = {mae:.4f}")
    save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    # One thread (measured here: 2 threads made iterations up to 20x slower).
    setup(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    # float64 everywhere: PETSc integrates in double precision anyway, and a
    # float32 f would put rounding noise of ~1e-7 into an error control asked for rtol 1e-7.
    dtype = torch.float64

    true_y0, t, true_y = true_trajectory(dtype)
    func = ODEFunc().to(dtype)
    # One NeuralODE for the whole run: it builds the PETSc TS once and reuses it.
    node = pnode.NeuralODE(func, method=args.method, rtol=args.rtol, atol=args.atol)
    # A second instance on the same func for evaluation, so that node.stats keep
    # describing the last training call (NeuralODE.stats cover its own last call).
    evaluator = pnode.NeuralODE(func, method=args.method, rtol=args.rtol, atol=args.atol)
    lr0 = args.lr
    opt_class = torch.optim.Adam if args.optimizer == "adam" else torch.optim.RMSprop
    optimizer = opt_class(func.parameters(), lr=lr0)

    def full_mae():
        with torch.no_grad():
            pred = evaluator(true_y0, t)
        return float((pred - true_y).abs().mean()), pred

    initial_mae, _ = full_mae()
    print(f"method {args.method}, rtol {args.rtol:g}, atol {args.atol:g}, {args.niters} iterations, "
          f"batch {args.batch_size} x {args.batch_time} points")
    print(f"initial full-trajectory MAE {initial_mae:.4f}")

    bar = progress(range(1, args.niters + 1), desc="training")
    for it in bar:
        if not args.constant_lr:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(it - 1, args.niters, lr0)
        batch_y0, batch_t, batch_y = get_batch(true_y, t, args.batch_time, args.batch_size, gen)
        optimizer.zero_grad()
        pred_y = node(batch_y0, batch_t)
        loss = (pred_y - batch_y).abs().mean()
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if it % args.test_freq == 0 or it == args.niters:
            final_mae, pred_y = full_mae()
            bar.write(f"iter {it:5d}  batch loss {loss.item():.4f}  full-trajectory MAE {final_mae:.4f}")
    bar.close()
    print(f"last training call: {node.stats}")
    print(f"last evaluation call: {evaluator.stats}")
    plot(args.out, t, true_y, pred_y, final_mae, args.method)
    elapsed = time.perf_counter() - _T_START

    checks = [(math.isfinite(final_mae) and final_mae < QUICK_MAX_RATIO * initial_mae,
               f"the full-trajectory MAE fell from {initial_mae:.4f} to {final_mae:.4f}, "
               f"less than the required factor {1 / QUICK_MAX_RATIO:g}")]
    # The absolute target was calibrated for the default full run only.
    if (not args.quick and args.niters == FULL_NITERS and args.method == "dopri5"
            and args.lr == DEFAULT_LR and not args.constant_lr and args.optimizer == "adam"
            and args.batch_time == 10 and args.batch_size == 20
            and args.rtol == 1e-7 and args.atol == 1e-9):
        checks.append((final_mae < FULL_MAX_MAE, f"full-trajectory MAE {final_mae:.4f} >= {FULL_MAX_MAE}"))
        ok = f"full-trajectory MAE {final_mae:.4f} < {FULL_MAX_MAE}"
    else:
        ok = f"full-trajectory MAE fell {initial_mae / final_mae:.1f}x"
    return finish(f"initial_mae={initial_mae:.5f} final_mae={final_mae:.5f} "
                  f"ratio={final_mae / initial_mae:.4f} elapsed_s={elapsed:.1f}", checks,
                  enforce=not args.no_check, ok=ok)


if __name__ == "__main__":
    sys.exit(main())
