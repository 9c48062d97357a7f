"""Starting step size for adaptive methods.

The algorithm of Hairer, Norsett and Wanner, "Solving Ordinary Differential
Equations I", 2nd ed., Sec. II.4 (the same rule torchdiffeq and diffrax use), so
adaptive solves start from a comparable step in every library.
"""


def initial_step(f, s0, y0, order, rtol, atol, span, total=lambda values: values):
    """Return h0 for y' = f(s, y) from (s0, y0); ``f`` maps flat tensors to flat tensors.

    ``total`` sums a list of floats over the ranks that share a distributed state,
    so that every rank computes the same norms and the same h0.
    """
    def _rms(x):
        squares, count = total([float(x.square().sum()), float(x.numel())])
        return (squares / max(count, 1.0)) ** 0.5

    scale = atol + y0.abs() * rtol
    f0 = f(s0, y0)
    d0 = _rms(y0 / scale)
    d1 = _rms(f0 / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, span)
    f1 = f(s0 + h0, y0 + h0 * f0)
    d2 = _rms((f1 - f0) / scale) / h0
    if max(d1, d2) <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    return min(100 * h0, h1, span)
