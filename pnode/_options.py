"""Checking the user's arguments once, up front, into a frozen :class:`Config`.

Every mistake is reported before PETSc runs, with the argument's name and the
fix; unknown option keys are an error, never silently ignored.
"""

import math
from dataclasses import dataclass, field, replace
from typing import Optional, Tuple

import torch

from ._methods import Method, get_method

MEMORY_MODES = ("graphs", "states")
JACOBIANS = ("blockdiag", "dense", "matrix-free")

_OPTION_DOCS = {
    "step_size": "fixed step size (a positive float); the last step before each output time is shortened",
    "first_step": "initial step size of an adaptive method",
    "max_num_steps": "maximum number of steps of one solve (default 1e6)",
    "max_rejections": "maximum consecutive step rejections before failing (default 50)",
    "memory": f"what the forward keeps for the backward: one of {MEMORY_MODES} (default 'graphs')",
    "theta": "theta of the 'theta' method, in (0, 1]",
    "checkpoints": "keep at most this many states (>= 1, y0 included) and recompute the rest in the "
                   "backward by the binomial (revolve) schedule; default: store everything",
    "jacobian": f"Newton-Krylov Jacobian of implicit methods: one of {JACOBIANS} (default: 'blockdiag' "
                "for a batch y0 of 2+ dims, 'dense' for a 1-D y0 of up to 256 entries, else 'matrix-free')",
}


@dataclass(frozen=True)
class Config:
    method: Method
    rtol: float
    atol: float
    step_size: Optional[float] = None
    first_step: Optional[float] = None
    max_num_steps: int = 1_000_000
    max_rejections: int = 50
    memory: str = "graphs"
    theta: Optional[float] = None
    jacobian: Optional[str] = None
    checkpoints: Optional[int] = None
    replay: str = ""              # "advance" or "tape": a solver replaying recorded step sizes
    petsc_options: Tuple[Tuple[str, str], ...] = field(default_factory=tuple)

    def solver_key(self):
        """What a cached Solver depends on (tolerances and steps are set per call)."""
        return (self.method.name, self.fixed, self.theta, self.jacobian, self.petsc_options,
                self.max_rejections, self.replay)

    @property
    def fixed(self):
        return bool(self.replay) or self.step_size is not None or not self.method.embedded

    def for_state(self, y0):
        """The configuration with the Jacobian choice resolved for this state."""
        if self.jacobian is not None or self.method.kind == "explicit":
            return self
        if y0.dim() >= 2 and y0.shape[0] > 1:
            jacobian = "blockdiag"
        elif y0.numel() <= 256:
            jacobian = "dense"
        else:
            jacobian = "matrix-free"
        return replace(self, jacobian=jacobian)


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _petsc_options(petsc_options):
    if petsc_options is None:
        return ()
    if not isinstance(petsc_options, dict):
        raise TypeError("petsc_options must be a dict such as {'ts_rk_type': '5bs'}, "
                        f"got {type(petsc_options).__name__}")
    items = []
    for key, value in petsc_options.items():
        if not isinstance(key, str) or not key.lstrip("-"):
            raise ValueError(f"petsc_options keys must be PETSc option names like 'ts_adapt_type', got {key!r}")
        value = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        items.append((key.lstrip("-"), value))
    return tuple(sorted(items))


def make_config(method, rtol, atol, options, petsc_options):
    m = get_method(method)
    rtol = _positive("rtol", rtol)
    atol = _positive("atol", atol)
    options = dict(options or {})
    unknown = sorted(set(options) - set(_OPTION_DOCS))
    if unknown:
        known = "; ".join(f"{k}: {v}" for k, v in _OPTION_DOCS.items())
        raise ValueError(f"unknown options {unknown}; valid options are {known}")
    kw = {}
    for key in ("step_size", "first_step"):
        if options.get(key) is not None:
            kw[key] = _positive(f"options['{key}']", options[key])
    for key in ("max_num_steps", "max_rejections", "checkpoints"):
        if key in options:
            value = options[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"options['{key}'] must be a positive integer, got {value!r}")
            kw[key] = value
    if "memory" in options:
        if options["memory"] not in MEMORY_MODES:
            raise ValueError(f"options['memory'] must be one of {MEMORY_MODES}, got {options['memory']!r}")
        kw["memory"] = options["memory"]
    if "jacobian" in options:
        if options["jacobian"] not in JACOBIANS:
            raise ValueError(f"options['jacobian'] must be one of {JACOBIANS}, got {options['jacobian']!r}")
        if m.kind == "explicit":
            raise ValueError(f"options['jacobian'] applies to implicit and IMEX methods, not {m.name!r}")
        kw["jacobian"] = options["jacobian"]
    if "theta" in options:
        if m.name != "theta":
            raise ValueError(f"options['theta'] applies to method='theta' only, not {m.name!r}")
        theta = options["theta"]
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 < theta <= 1:
            raise ValueError(f"options['theta'] must be in (0, 1], got {theta!r}")
        kw["theta"] = float(theta)
    elif m.theta is not None:
        kw["theta"] = m.theta
    return Config(method=m, rtol=rtol, atol=atol, petsc_options=_petsc_options(petsc_options), **kw)


def check_time(t, y0):
    """Validate ``t`` and return it as a list of floats in the user's time variable."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a 1-D torch.Tensor of times, got {type(t).__name__}")
    if t.dim() != 1 or t.numel() < 2:
        raise ValueError(f"t must be 1-D with at least 2 times, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"t must be a floating-point tensor, got dtype {t.dtype}")
    if t.requires_grad:
        raise ValueError("t requires grad, but pnode does not differentiate with respect to the output "
                         "times; pass t.detach()")
    times = [float(x) for x in t.detach().cpu().double()]
    if not all(math.isfinite(x) for x in times):
        raise ValueError("t contains NaN or Inf")
    diffs = [b - a for a, b in zip(times[:-1], times[1:])]
    if not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
        raise ValueError("t must be strictly increasing or strictly decreasing")
    return times


def check_y0(y0):
    if not isinstance(y0, torch.Tensor):
        raise TypeError(f"y0 must be a torch.Tensor, got {type(y0).__name__}")
    if y0.numel() == 0:
        raise ValueError(f"y0 is empty (shape {tuple(y0.shape)})")
    if y0.is_complex():
        raise TypeError("y0 is complex; pnode integrates real states (split real and imaginary parts)")
    if not y0.is_floating_point():
        raise TypeError(f"y0 must be a floating-point tensor, got dtype {y0.dtype}; use y0.double() or y0.float()")
    if not bool(torch.isfinite(y0).all()):
        raise ValueError("y0 contains NaN or Inf")


def check_step_sign(config, times):
    # step sizes are magnitudes: the direction comes from t
    if config.step_size is not None and config.step_size > abs(times[-1] - times[0]):
        raise ValueError(f"options['step_size']={config.step_size} exceeds the integration span "
                         f"{abs(times[-1] - times[0])}")
