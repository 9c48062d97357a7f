"""A neural reaction-diffusion right-hand side on a pnode.Grid, and its full-field twin.

``Reaction`` sees a rank's ghosted patch and returns dy/dt on the owned block, as
pnode's distributed mode requires; ``full_field`` applies the same module to the
whole field padded by the boundary condition, in a single process, which is the
independent reference the distributed gradients are checked against.
"""

import torch
from torch import nn

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class Reaction(nn.Module):
    """du/dt = (learned (2w+1)^dim-point stencil) u + pointwise MLP reaction(u) - 0.1 t u."""

    def __init__(self, dim=2, dof=2, width=1, hidden=6, seed=0, star=False):
        super().__init__()
        torch.manual_seed(seed)
        conv = _CONV[dim]
        self.dim, self.width = dim, width
        self.diffusion = conv(dof, dof, 2 * width + 1, bias=False, dtype=torch.float64)
        self.inp = conv(dof, hidden, 1, dtype=torch.float64)
        self.out = conv(hidden, dof, 1, dtype=torch.float64)
        with torch.no_grad():
            self.diffusion.weight.mul_(0.5)
        # A star stencil leaves the patch's corners unfilled: read along the axes only.
        mask = torch.zeros((2 * width + 1,) * dim, dtype=torch.float64)
        for k in range(dim):
            index = [width] * dim
            index[k] = slice(None)
            mask[tuple(index)] = 1.0
        self.register_buffer("mask", mask if star else torch.ones_like(mask))

    def forward(self, t, u):
        x = u.unsqueeze(0)
        w = self.width
        core = x[(Ellipsis,) + (slice(w, -w),) * self.dim] if w else x
        react = self.out(torch.tanh(self.inp(core)))
        diffusion = self.diffusion._conv_forward(x, self.diffusion.weight * self.mask, None)
        return (diffusion + react - 0.1 * t * core).squeeze(0)


def pad(field, grid):
    """The field with ``stencil_width`` ghost layers: wrapped (periodic) or zero (ghosted)."""
    w = grid.stencil_width
    for k, periodic in enumerate(grid.periodic):
        d = k + 1 + field.dim() - len(grid.shape) - 1  # the tensor dim of grid dimension k
        n = field.shape[d]
        if periodic:
            left, right = field.narrow(d, n - w, w), field.narrow(d, 0, w)
        else:
            shape = list(field.shape)
            shape[d] = w
            left = right = field.new_zeros(shape)
        field = torch.cat([left, field, right], dim=d)
    return field


def full_field(func, grid):
    """f on the whole (dof, *shape) field, in one process."""
    def f(t, field):
        return func(t, pad(field, grid))
    return f


def initial_field(grid, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(grid.dof, *grid.shape, generator=g, dtype=torch.float64)


def loss(ys):
    """Pointwise and nonlinear, so the losses of the ranks' blocks add up to the whole one."""
    return 0.5 * (ys ** 2).sum() + torch.sin(3 * ys).sum() + (ys[-1] ** 3).sum()
