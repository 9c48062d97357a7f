"""A continuous normalizing flow on 2-D toy densities, trained by maximum likelihood.

FFJORD of W. Grathwohl, R. T. Q. Chen, J. Bettencourt, I. Sutskever and
D. Duvenaud, "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
Generative Models", ICLR 2019 (arXiv:1810.01367), after the continuous
normalizing flows of Chen et al., "Neural Ordinary Differential Equations",
NeurIPS 2018. A time-conditioned MLP f(t, z) moves the base density N(0, I)
at t = 0 to the data at t = 1, and the log-density obeys

    d log p(z(t)) / dt = -tr(df/dz),

so integrating the augmented state [z, a] with da/dt = -tr(df/dz) from a data
point at t = 1 (a = 0) back to t = 0 gives

    log p(x) = log N(z(0); 0, I) - a(0).

pnode integrates that with PETSc (decreasing t), and PETSc's discrete adjoint
gives the exact gradient of the computed log-likelihood. The trace is exact
(one autograd pass per dimension, kept differentiable), or Hutchinson's
estimate e^T (df/dz) e with one noise draw per batch (``--hutchinson``, the
FFJORD estimator that scales to high dimensions); the test NLL always uses the
exact trace.

    python examples/cnf.py                         # two moons, dopri5 rtol 1e-5 (a few minutes)
    python examples/cnf.py --data checkerboard     # also: circles, 8gaussians
    python examples/cnf.py --quick                 # rk4 with 8 fixed steps; asserts NLL < Gaussian
    python examples/cnf.py --hutchinson --method arkimex --quick

Reports the test NLL in nats, in the standardized data space, next to the NLL
of the standard Gaussian on the same data, and writes data samples, model
samples and the learned density to ``--out`` (default ``outputs/cnf.png``).
"""

import argparse
import math
import os
import sys

import numpy as np
import torch
from torch import nn

import pnode
from _common import Timer, finish, plt, progress, save_figure, setup

DATASETS = ("moons", "circles", "8gaussians", "checkerboard")
DIM = 2
GRID = 80      # heatmap resolution per axis
LIM = 3.0      # plotted square, in standardized units


def sample_data(name, n, rng):
    """n points of a toy density, as numpy float64 (n, 2), before standardization."""
    if name == "moons":
        a = rng.uniform(0, np.pi, n)
        upper = rng.random(n) < 0.5
        x = np.where(upper, np.cos(a), 1 - np.cos(a))
        y = np.where(upper, np.sin(a), 0.5 - np.sin(a))
        return np.stack([x, y], 1) + 0.08 * rng.standard_normal((n, 2))
    if name == "circles":
        a = rng.uniform(0, 2 * np.pi, n)
        r = np.where(rng.random(n) < 0.5, 1.0, 0.5)
        return r[:, None] * np.stack([np.cos(a), np.sin(a)], 1) + 0.04 * rng.standard_normal((n, 2))
    if name == "8gaussians":
        k = rng.integers(0, 8, n) * (np.pi / 4)
        return 2.0 * np.stack([np.cos(k), np.sin(k)], 1) + 0.2 * rng.standard_normal((n, 2))
    # checkerboard, as in FFJORD's toy data: 8 unit squares of a 4x4 board
    x1 = rng.uniform(-2, 2, n)
    x2 = rng.uniform(0, 1, n) + rng.integers(0, 2, n) * 2.0 - 2.0 + (np.floor(x1) % 2)
    return np.stack([x1, x2], 1)


class ConcatLinear(nn.Module):
    """A linear layer that also sees t: FFJORD's simplest time conditioning."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.linear = nn.Linear(n_in + 1, n_out)

    def forward(self, t, x):
        return self.linear(torch.cat([x, t.to(x.dtype).expand(x.shape[0], 1)], 1))


class Velocity(nn.Module):
    """f(t, z): an MLP with t fed to every layer; tanh keeps f smooth, so the adaptive solver takes few steps."""

    def __init__(self, hidden):
        super().__init__()
        self.layers = nn.ModuleList([ConcatLinear(DIM, hidden), ConcatLinear(hidden, hidden),
                                     ConcatLinear(hidden, DIM)])

    def forward(self, t, z):
        for layer in self.layers[:-1]:
            z = torch.tanh(layer(t, z))
        return self.layers[-1](t, z)


class CNFDynamics(nn.Module):
    """d[z, a]/dt = [f(t, z), -tr(df/dz)] on a batch of shape (N, DIM + 1).

    ``noise`` set: Hutchinson's estimate with that (N, DIM) draw, which must stay
    fixed through a solve and its backward, since every f evaluation, including
    those the adjoint recomputes, has to be the same function.
    """

    def __init__(self, velocity):
        super().__init__()
        self.velocity = velocity
        self.noise = None

    def forward(self, t, state):
        # Graph mode tells training (pnode records f with grad, and the trace must then be
        # differentiable) from evaluation (f under no_grad: only the trace's value is needed).
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            z = state[:, :DIM]
            if not z.requires_grad:
                z = z.detach().requires_grad_()
            dz = self.velocity(t, z)
            if self.noise is None:
                trace = sum(torch.autograd.grad(dz[:, i].sum(), z, create_graph=create_graph,
                                                retain_graph=True)[0][:, i] for i in range(DIM))
            else:
                e_j, = torch.autograd.grad(dz, z, self.noise, create_graph=create_graph)
                trace = (e_j * self.noise).sum(1)
        out = torch.cat([dz, -trace[:, None]], 1)
        return out if create_graph else out.detach()


def gaussian_logp(z):
    return -0.5 * (z ** 2).sum(1) - 0.5 * DIM * math.log(2 * math.pi)


def log_likelihood(node, x):
    """log p(x) per point: integrate [x, 0] from t = 1 back to t = 0."""
    state = torch.cat([x, torch.zeros(x.shape[0], 1, dtype=x.dtype)], 1)
    out = node(state, torch.tensor([1.0, 0.0], dtype=x.dtype))[-1]
    return gaussian_logp(out[:, :DIM]) - out[:, DIM]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short rk4 run that asserts NLL < Gaussian NLL")
    p.add_argument("--data", choices=DATASETS, default="moons")
    p.add_argument("--niters", type=int, default=None, help="default 1000, or 80 with --quick")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--method", choices=list(pnode.METHODS), default=None,
                   help="pnode method (default dopri5, or rk4 with --quick); IMEX methods run fully implicit")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=8, help="steps over [0, 1] of fixed-step methods")
    p.add_argument("--hutchinson", action="store_true", help="train with Hutchinson's trace estimator")
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("outputs", "cnf.png"), help="PNG file to write")
    args = p.parse_args(argv)
    args.niters = args.niters or (80 if args.quick else 1000)
    args.method = args.method or ("rk4" if args.quick else "dopri5")
    return args


def make_node(func, args):
    method = pnode.METHODS[args.method]
    options = {} if method.embedded else {"step_size": 1.0 / args.steps}
    if method.kind != "explicit":
        # Not the block-diagonal preconditioner: the log-density column never feeds back,
        # so each sample's block of shift*I - df/dy is singular at shift 0, where PETSc's
        # adjoint evaluates the Jacobian, and pnode's LU factorisation of it fails.
        options["jacobian"] = "matrix-free"
    return pnode.NeuralODE(func, method=args.method, rtol=args.rtol, atol=args.atol, options=options)


def plot(path, args, test_x, samples, logp_grid, nll, baseline):
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4), constrained_layout=True)
    extent = (-LIM, LIM, -LIM, LIM)
    for ax, pts, title in ((axes[0], test_x, "test data"), (axes[1], samples, "model samples")):
        ax.hist2d(pts[:, 0], pts[:, 1], bins=GRID, range=[[-LIM, LIM], [-LIM, LIM]], cmap="viridis")
        ax.set(title=title, aspect="equal")
    axes[2].imshow(np.exp(logp_grid), origin="lower", extent=extent, cmap="viridis")
    axes[2].set(title="model density", aspect="equal")
    fig.suptitle(f"CNF on {args.data} ({args.method}{', Hutchinson' if args.hutchinson else ''}): "
                 f"test NLL {nll:.3f} nats vs Gaussian {baseline:.3f}")
    save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    setup(args.seed)
    rng = np.random.default_rng(args.seed)
    dtype = torch.float64   # PETSc integrates in double; a float32 f would be noise at rtol 1e-5

    # Standardize with statistics of a large draw, so the Gaussian baseline is the
    # NLL of a moment-matched Gaussian and both NLLs are in the same units.
    ref = sample_data(args.data, 100_000, rng)
    mean, std = ref.mean(0), ref.std(0)

    def draw(n):
        return torch.tensor((sample_data(args.data, n, rng) - mean) / std, dtype=dtype)

    test_x = draw(args.n_test)
    baseline = float(-gaussian_logp(test_x).mean())

    func = CNFDynamics(Velocity(args.hidden)).to(dtype)
    node = make_node(func, args)
    optimizer = torch.optim.Adam(func.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.niters, eta_min=args.lr / 20)
    print(f"{args.data}: {args.method}, {'Hutchinson' if args.hutchinson else 'exact'} trace, "
          f"{args.niters} iterations of {args.batch_size} points; Gaussian test NLL {baseline:.4f}")

    timer = Timer()
    bar = progress(range(1, args.niters + 1), desc="training")
    for it in bar:
        x = draw(args.batch_size)
        with timer:
            if args.hutchinson:
                func.noise = torch.randint(0, 2, x.shape, dtype=dtype) * 2 - 1   # Rademacher
            optimizer.zero_grad()
            loss = -log_likelihood(node, x).mean()
            loss.backward()
            optimizer.step()
            scheduler.step()
        bar.set_postfix_str(f"nll {loss.item():.3f}, {node.stats.steps} steps", refresh=False)
    bar.close()
    func.noise = None
    train_stats = str(node.stats)

    with torch.no_grad():
        nll = float(-log_likelihood(node, test_x).mean())
        z = torch.randn(args.n_test * 5, DIM, dtype=dtype)
        samples = pnode.odeint(func.velocity, z, torch.tensor([0.0, 1.0], dtype=dtype), method="dopri5",
                               rtol=1e-6, atol=1e-6)[-1]
        g = torch.linspace(-LIM, LIM, GRID, dtype=dtype)
        grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, DIM)
        logp_grid = log_likelihood(node, grid).reshape(GRID, GRID)
    plot(args.out, args, test_x.numpy(), samples.numpy(), logp_grid.numpy(), nll, baseline)
    print(f"last training solve: {train_stats}")
    return finish(f"test_nll={nll:.4f} gaussian_nll={baseline:.4f} s_per_iter={timer.seconds / args.niters:.3f}",
                  [(nll < baseline, f"test NLL {nll:.4f} is not below the Gaussian baseline {baseline:.4f}")],
                  enforce=args.quick)


if __name__ == "__main__":
    sys.exit(main())
