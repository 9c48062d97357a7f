"""Checking the user's arguments once, up front, into a frozen :class:`Config`.

Every mistake is reported before PETSc runs, with the argument's name and the
fix; unknown option keys are an error, never silently ignored.
"""

import functools
import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Optional, Tuple

import torch
import torch.autograd.forward_ad as fwAD

from ._errors import caller_level
from ._methods import Method, get_method
from ._petsc import DTYPE as PETSC_DTYPE, EPS as PETSC_EPS, PETSc, petsc_message

MEMORY_MODES = ("graphs", "states")
# Exact solves with the dense Jacobian. Not cholesky: shift * I - df/dy is not symmetric, and a
# Cholesky factor reads one triangle (the adjoint's transposed solves were 3% off).
DIRECT_PCS = ("lu",)
# Preconditioners PETSc cannot apply transposed to a general matrix, as the adjoint must
_NO_TRANSPOSE_PCS = ("sor", "eisenstat")
JACOBIANS = ("blockdiag", "dense", "matrix-free", "colored")
# The midpoint theta form divides the stage increment by theta: below this, rounding
# alone costs more than 1e-9 over 20 steps (theta = 1e-6: 4.6e-9; 1e-8: 8.6e-7).
THETA_MIN = 1e-6
# Preconditioners built from products with the operator alone: what PETSc can do with
# pnode's shell Jacobians ('blockdiag' under a user's pc_type, and 'matrix-free').
_MATRIX_FREE_PCS = ("none", "mat", "ksp", "composite")

_OPTION_DOCS = {
    "step_size": "fixed step size (a positive float); the last step before each output time is shortened",
    "first_step": "initial step size of an adaptive method",
    "max_num_steps": "maximum number of steps of one solve (default 1e6)",
    "max_rejections": "maximum consecutive step rejections before failing (default 50)",
    "memory": f"what the forward keeps for the backward: one of {MEMORY_MODES} (default 'graphs')",
    "theta": f"theta of the 'theta' method, in [{THETA_MIN:g}, 1]",
    "checkpoints": "keep at most this many states (>= 1, y0 included) and recompute the rest in the "
                   "backward by the binomial (revolve) schedule; default: store everything",
    "jacobian": f"Newton-Krylov Jacobian of implicit methods: one of {JACOBIANS} (default: 'blockdiag' "
                "for a batch y0 of 2+ dims, 2+ samples and up to 256 entries per sample, 'dense' for any "
                "other y0 of up to 256 entries, else 'matrix-free'; "
                "with a pnode.Grid, 'colored': the stencil's sparse Jacobian assembled from JVPs by "
                "graph colouring, preconditioned by block Jacobi/ILU across ranks)",
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
    eps: float = 2.0 ** -52       # machine epsilon of the model's dtype: the floor of Newton's residual
    petsc_options: Tuple[Tuple[str, str], ...] = field(default_factory=tuple)

    def solver_key(self):
        """What a cached Solver depends on (tolerances and steps are set per call)."""
        return (self.method.name, self.fixed, self.theta, self.jacobian, self.petsc_options,
                self.max_rejections, self.replay, self.eps)

    @property
    def fixed(self):
        return bool(self.replay) or self.step_size is not None or not self.method.embedded

    def for_state(self, y0, grid=None):
        """The configuration with the Jacobian choice and the model's precision resolved for this state."""
        if self.method.kind == "explicit":
            return self
        cfg = replace(self, eps=max(torch.finfo(y0.dtype).eps, PETSC_EPS))._with_jacobian(y0, grid)
        cfg._check_preconditioner(grid)
        return cfg

    def _check_preconditioner(self, grid):
        """Refuse a user's pc_type that needs matrix entries pnode's shell Jacobians do not have.

        PETSc only finds out inside the first Newton solve ("Could not locate a solver type
        for factorization type LU and matrix type python"; jacobi also left the KSP in a state
        TSDestroy complained about on stderr).
        """
        user = dict(self.petsc_options)
        pc, ksp = user.get("pc_type"), user.get("ksp_type")
        if ksp is not None and ksp.lower() == "preonly" and not (
                self.jacobian == "dense" and (pc is None or pc.lower() in DIRECT_PCS)):
            raise ValueError(
                "petsc_options['ksp_type']='preonly' applies the preconditioner once, so every stage solve and "
                "every adjoint solve is only as exact as the preconditioner: the gradient was silently off "
                "(4.6e-2 with blockdiag on an f that couples samples). It is exact only with "
                f"options['jacobian']='dense' and a factorization (pc_type among {DIRECT_PCS}); otherwise drop "
                "ksp_type and let Krylov iterate to pnode's tolerances")
        if pc is not None and pc.lower() in _NO_TRANSPOSE_PCS:
            # PETSc found out in the backward, after the whole forward ("Can only apply transpose of
            # SOR if matrix is symmetric")
            raise ValueError(f"petsc_options['pc_type']={pc!r} cannot be applied transposed to pnode's "
                             "nonsymmetric Jacobian, as the adjoint's solves need: use another pc_type "
                             "(ilu, jacobi, or lu with options['jacobian']='dense')")
        if pc is None or self.jacobian not in ("blockdiag", "matrix-free") or pc.lower() in _MATRIX_FREE_PCS:
            return
        fix = "'colored' (the stencil's assembled sparse Jacobian)" if grid is not None else \
            "'dense' (assembled; for small states)"
        raise ValueError(f"petsc_options['pc_type']={pc!r} needs the Jacobian's entries, but "
                         f"options['jacobian']={self.jacobian!r} gives PETSc only products with it: use "
                         f"options['jacobian']={fix}, a pc_type among {_MATRIX_FREE_PCS}, or no pc_type"
                         + (" (blockdiag then preconditions with its exact per-sample blocks)"
                            if self.jacobian == "blockdiag" else ""))

    def _with_jacobian(self, y0, grid):
        if grid is not None:
            if self.jacobian in ("blockdiag", "dense"):
                raise ValueError(f"options['jacobian']={self.jacobian!r} does not apply to a distributed "
                                 "state (grid=...): use 'colored' (the default) or 'matrix-free'")
            return self if self.jacobian is not None else replace(self, jacobian="colored")
        if self.jacobian == "colored":
            raise ValueError("options['jacobian']='colored' needs the stencil of a pnode.Grid (grid=...); "
                             "without one use 'blockdiag', 'dense' or 'matrix-free'")
        if self.jacobian == "blockdiag" and y0.dim() == 0:
            raise ValueError("options['jacobian']='blockdiag' needs a batch dimension (y0 of 1+ dims, samples "
                             "first); y0 is 0-d: use 'dense'")
        if self.jacobian is not None:
            return self
        # blockdiag costs d VJPs per Newton step and batch * d^2 entries: for per-sample
        # states of more than 256 (images) it was 100x slower than matrix-free.
        if y0.dim() >= 2 and y0.shape[0] > 1 and y0[0].numel() <= 256:
            jacobian = "blockdiag"
        elif y0.numel() <= 256:
            jacobian = "dense"
        else:
            jacobian = "matrix-free"
        return replace(self, jacobian=jacobian)


def _as_number(value):
    """A 0-d tensor or a numpy scalar as a Python int or float; anything else (a bool too) as it is."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = value.item()   # a bool or complex tensor stays one, and is refused by the caller
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _positive(name, value):
    value = _as_number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number (a float or a 0-d tensor), got {value!r}")
    return float(value)


def _petsc_options(petsc_options):
    if petsc_options is None:
        return ()
    if not isinstance(petsc_options, Mapping):
        raise TypeError("petsc_options must be a dict such as {'ts_rk_type': '5bs'}, "
                        f"got {type(petsc_options).__name__}")
    items = []
    for key, value in petsc_options.items():
        if not isinstance(key, str) or not key.strip().lstrip("-"):
            raise ValueError(f"petsc_options keys must be PETSc option names like 'ts_adapt_type', got {key!r}")
        # PETSc reads " 1 " as no integer and " dsp " as no adapter: spaces are never meant
        value = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value).strip()
        items.append((key.strip().lstrip("-"), value))
    return tuple(sorted(items))


# Adaptive methods torchdiffeq has under the same name (it ignores their step_size).
_TORCHDIFFEQ_ADAPTIVE = ("dopri5", "bosh3")


def make_config(method, rtol, atol, options, petsc_options):
    m = get_method("dopri5" if method is None else method)   # None: torchdiffeq's default
    rtol = _positive("rtol", rtol)
    atol = _positive("atol", atol)
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"options must be a dict such as {{'step_size': 0.1}}, got {type(options).__name__}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(_OPTION_DOCS))
    if unknown:
        known = "; ".join(f"{k}: {v}" for k, v in _OPTION_DOCS.items())
        raise ValueError(f"unknown options {unknown}; valid options are {known}")
    kw = {}
    for key in ("step_size", "first_step"):
        if options.get(key) is not None:
            value = options[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"options['{key}'] must be positive, got {value!r}: step sizes are "
                                 "magnitudes, the direction of integration comes from t (pass a "
                                 f"decreasing t to integrate backwards, and options['{key}']={-value!r})")
            kw[key] = _positive(f"options['{key}']", value)
    for key in ("max_num_steps", "max_rejections", "checkpoints"):
        if key in options:
            value = _as_number(options[key])   # numpy's integers too (int(np.sqrt(n)) is one)
            if isinstance(value, float) and value.is_integer():
                value = int(value)  # 1e6 reads as a count
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                if key == "checkpoints":
                    raise ValueError(f"options['checkpoints'] must be an integer >= 1, got {value!r}: the "
                                     "budget counts the stored states, y0 included, so 1 is the minimum "
                                     "(fewest states, most recomputation); leave it out to store every step")
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
        theta = _as_number(options["theta"])   # a 0-d tensor, as rtol and step_size accept
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not THETA_MIN <= theta <= 1:
            raise ValueError(f"options['theta'] must be in [{THETA_MIN:g}, 1], got {theta!r}: the midpoint form "
                             "ends a step with y_n + (stage - y_n) / theta, which multiplies the stage's rounding "
                             "by 1/theta (theta = 1e-10 was 1.5e-4 off); for theta -> 0 use method='euler'")
        kw["theta"] = float(theta)
    elif m.theta is not None:
        kw["theta"] = m.theta
    config = Config(method=m, rtol=rtol, atol=atol, petsc_options=_petsc_options(petsc_options), **kw)
    if config.first_step is not None and config.fixed:
        raise ValueError("options['first_step'] starts adaptive steps, but "
                         + ("options['step_size'] fixes them: drop one of the two" if m.embedded else
                            f"method {m.name!r} takes fixed steps: use options['step_size']"))
    if config.step_size is not None and m.name in _TORCHDIFFEQ_ADAPTIVE:
        # torchdiffeq ignores step_size for these: code moved from it would get fixed steps
        # that no rtol/atol controls (dopri5 at rtol 1e-10 with h = 1: 2400% off).
        warnings.warn(f"options['step_size'] makes {m.name!r} take fixed steps of that size, and rtol/atol "
                      f"are not used, where torchdiffeq's {m.name} ignores step_size and adapts. For adaptive "
                      "steps starting there pass options['first_step'] instead", stacklevel=caller_level())
    if config.petsc_options:
        _check_petsc_options(m, config.petsc_options, config.fixed)
    return config


# Options pnode sets from its own arguments; overriding them breaks the discrete adjoint.
# PETSc 3.25 renamed ts_dt and ts_max_reject (to ts_time_step, ts_max_step_rejections) and
# reads both spellings. Set by hand, ts_eval_times and ts_time_span crashed the process (SEGV),
# ts_time_step was silently overridden, ts_init_time and ts_run_steps stopped short of t[-1].
_RESERVED = {"ts_type": "method=", "ts_rtol": "rtol=", "ts_atol": "atol=",
             # the method's tableau: every one PETSc has a name in pnode's table
             "ts_rk_type": "method= (e.g. 'dopri5', 'bs5', 'verner7')",
             "ts_arkimex_type": "method='arkimex-...' (e.g. 'arkimex-4')",
             "ts_theta_theta": "method='theta' with options['theta']",
             "ts_theta_endpoint": "method='cn' (endpoint) or method='theta' (midpoint)",
             "ts_max_steps": "options['max_num_steps']", "ts_run_steps": "options['max_num_steps']",
             "ts_dt": "options['step_size'] or options['first_step']",
             "ts_time_step": "options['step_size'] or options['first_step']",
             "ts_max_reject": "options['max_rejections']", "ts_max_step_rejections": "options['max_rejections']",
             "ts_exact_final_time": "the output times t", "ts_max_time": "the output times t",
             "ts_init_time": "the output times t (t[0] is the initial time)",
             "ts_eval_times": "the output times t", "ts_time_span": "the output times t",
             "ts_save_trajectory": "nothing: pnode keeps what the backward needs",
             "ts_adjoint_solve": "nothing: the backward (loss.backward()) runs the adjoint",
             # Jacobians PETSc would build instead of pnode's (snes_mf crashed in pnode's IJacobian)
             "snes_mf": "options['jacobian']", "snes_mf_operator": "options['jacobian']",
             "snes_fd": "options['jacobian']", "snes_fd_color": "options['jacobian']",
             "ts_fd_color": "options['jacobian']",
             "ts_trajectory_type": "options['checkpoints']",
             "ts_arkimex_fully_implicit": "a single func rather than a (nonstiff, stiff) pair (pnode runs a "
                                          "single func fully implicit through its IFunction already)"}


@functools.lru_cache(maxsize=256)
def _petsc_verdict(ts_type, items):
    """(PETSc's complaint or None, keys PETSc never read) for these options on a bare TS.

    A throwaway TS of the method's type under a private prefix reads the options
    (TS, TSAdapt, SNES, KSP and PC all parse theirs in TSSetFromOptions); nothing
    is left in the options database. Cached: odeint checks on every call.
    """
    db = PETSc.Options()
    prefix = "pnodecheck_"
    ts = PETSc.TS().create(comm=PETSc.COMM_SELF)
    PETSc.Sys.pushErrorHandler("python")  # keeps PETSc's message in the exception, off stderr
    try:
        ts.setOptionsPrefix(prefix)
        ts.setType(ts_type)
        for key, value in items:
            db.setValue(f"-{prefix}{key}", value)
        try:
            ts.setFromOptions()
        except PETSc.Error as exc:
            return petsc_message(exc) or f"PETSc error code {exc.ierr}", ()
        return None, tuple(key for key, _ in items if not db.used(f"-{prefix}{key}"))
    finally:
        PETSc.Sys.popErrorHandler()
        for key, _ in items:
            db.delValue(f"-{prefix}{key}")
        ts.destroy()


# Families of options the dry run reads in full, and families it cannot judge (read later,
# by another object, or only under a solver type pnode picks per state).
_PARSED = ("ts", "snes", "ksp")
_OTHER = ("pc", "mat", "vec", "dm", "is", "sf", "log", "options", "malloc", "info", "viewer", "draw",
          "help", "history", "on", "fp", "check", "memory", "objects", "python", "saws", "sys",
          "petsc", "tao", "da", "start", "stop", "debugger", "no", "skip", "use", "device", "cuda",
          "hip", "sycl", "kokkos", "blas", "mpi", "error", "citations", "nox", "x", "display")


def _surely_unused(key):
    family = key.split("_", 1)[0]
    if family in _PARSED:
        return "view" not in key and not key.startswith(("ts_trajectory", "ts_adjoint"))
    return family not in _OTHER


def _inexact(key, value):
    """Why this option makes an implicit solve's adjoint differentiate another thing than the solution, or None."""
    value = value.lower()
    if key in ("snes_lag_jacobian", "snes_lag_preconditioner") and value != "1":
        # PETSc's adjoint then skipped pnode's Jacobian callback: products at the previous stage
        return "reuses a Jacobian or its factorisation from another point, in the adjoint too (gradients 14% off)"
    if key in ("snes_convergence_test", "ksp_convergence_test") and value == "skip":
        return "stops the solves before they converge, the adjoint's too"
    if key == "snes_type" and value == "ksptransposeonly":
        return "solves the transposed stage equations"
    return None


def _as_int(value):
    try:
        return int(str(value).strip())
    except ValueError:   # PETSc's "unlimited"
        return None


def _check_petsc_options(method, items, fixed):
    for key, value in items:
        if key in _RESERVED:
            raise ValueError(f"petsc_options[{key!r}] is set by pnode; use {_RESERVED[key]} instead")
        if key == "ts_adapt_type" and fixed and value.lower() != "none":
            # pnode resets the fixed step before every step; an adapter that shrinks it after a
            # rejection then fights it (beuler spun without end).
            raise ValueError(f"petsc_options['ts_adapt_type']={value!r} adapts the steps, but "
                             + ("options['step_size'] fixes them: drop one of the two" if method.embedded else
                                f"method {method.name!r} has no error estimate: use an adaptive method "
                                "such as 'dopri5' or 'bosh3'"))
        if key == "ts_max_snes_failures" and fixed and method.kind != "explicit" and _as_int(value) not in (0, 1):
            # PETSc retries a failed Newton solve with a quarter of the step: the fixed steps shrank
            raise ValueError(f"petsc_options['ts_max_snes_failures']={value!r} lets PETSc retry a failed Newton "
                             "solve with a smaller step, but options['step_size'] fixes the steps: reduce "
                             "step_size, or drop it for adaptive steps")
        why = _inexact(key, value) if method.kind != "explicit" else None
        if why is not None:
            raise ValueError(f"petsc_options[{key!r}]={value!r} {why}: the adjoint then "
                             "differentiates something other than the solution it returns. Drop it "
                             "(loosen snes_rtol/ksp_rtol instead if you want speed over gradient accuracy)")
        if key == "snes_type" and value.lower() == "ksponly" and method.kind != "explicit":
            warnings.warn("petsc_options['snes_type']='ksponly' takes one Newton step per stage: exact when "
                          "func is linear in y, otherwise the solution is one Newton iterate and pnode's "
                          "gradient is not its derivative", stacklevel=caller_level())
        if key.startswith("ts_rhs_jacobian_test") and method.kind == "implicit":
            # PETSc dereferences the RHS Jacobian these methods do not have (SEGV).
            raise ValueError(f"petsc_options[{key!r}] tests PETSc's RHS Jacobian, and method {method.name!r} "
                             "has none: pnode poses func as the IFunction ydot - f")
    complaint, unused = _petsc_verdict(method.ts_type, items)
    if complaint is not None:
        # Name the culprit: the options PETSc rejects on their own (else the combination).
        bad = tuple(kv for kv in items if _petsc_verdict(method.ts_type, (kv,))[0] is not None) or items
        named = ", ".join(f"{k!r}: {v!r}" for k, v in bad)
        reason = complaint if bad == items else _petsc_verdict(method.ts_type, bad)[0]
        raise ValueError(f"PETSc rejected petsc_options {{{named}}}: {reason}")
    if method.kind == "explicit":
        # The dry run's TS reads them even for a Runge-Kutta type, which never solves anything.
        solvers = [key for key, _ in items if key.split("_", 1)[0] in ("snes", "ksp", "pc")]
        if solvers:
            warnings.warn(f"petsc_options {solvers} configure Newton and Krylov solves, which the explicit "
                          f"method {method.name!r} does not run: they have no effect", stacklevel=caller_level())
    unused = [key for key in unused if _surely_unused(key)]
    if unused:
        warnings.warn(f"petsc_options {list(unused)} were not read by PETSc's {method.ts_type!r} TS: "
                      "misspelt, or not an option of this method's solvers? They have no effect "
                      "(PETSc names option keys without the leading '-' here, e.g. 'ts_adapt_type')",
                      stacklevel=caller_level())


def check_time(t, y0):
    """Validate ``t`` and return it as a list of floats in the user's time variable."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a 1-D torch.Tensor of times, got {type(t).__name__}")
    if t.dim() != 1 or t.numel() < 2:
        raise ValueError(f"t must be 1-D with at least 2 times, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"t must be a floating-point tensor, got dtype {t.dtype}")
    if t.device.type == "meta":
        raise ValueError("t is on the meta device and holds no values; pass real output times")
    if t.device != y0.device and t.device.type != "cpu":
        raise ValueError(f"t is on {t.device} but y0 is on {y0.device}; pass t on y0's device or on "
                         "the CPU: t.to(y0.device)")
    if t.requires_grad:
        raise ValueError("t requires grad, but pnode does not differentiate with respect to the output "
                         "times; pass t.detach(). To learn a time span T, integrate over s in [0, 1] with "
                         "g(s, y) = T * func(T * s, y) and make T a parameter of g: its gradient is then exact")
    times = [float(x) for x in t.detach().cpu().double()]
    if not all(math.isfinite(x) for x in times):
        raise ValueError("t contains NaN or Inf")
    diffs = [b - a for a, b in zip(times[:-1], times[1:])]
    if not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
        raise ValueError("t must be strictly increasing or strictly decreasing")
    return times


def check_no_transform(states, candidates):
    """Refuse torch.func transforms and forward-mode duals: PETSc sees plain values only.

    ``states`` are y0's tensors; ``candidates()`` lists every tensor that may be a
    parameter, frozen ones included (under torch.func.jvp the parameters are duals that
    do not require grad), and is called only inside a forward-AD level. A dual's tangent
    was silently dropped (the output had none), and transforms failed deep inside torch.
    """
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    if torch._C._are_functorch_transforms_active() or any(
            isinstance(y, torch.Tensor) and wrapped(y) for y in states):
        raise TypeError("pnode runs under a torch.func transform (vmap, grad, jvp, jacrev, ...): it hands "
                        "concrete tensors to PETSc and cannot run under these transforms; batch along y0's "
                        "first dimension instead of vmap, and use loss.backward() / torch.autograd.grad")
    if getattr(fwAD, "_current_level", -1) < 0:
        return
    named = [("y0", y) for y in states] + [(f"a parameter (shape {tuple(p.shape)})", p) for p in candidates()]
    for name, x in named:
        if isinstance(x, torch.Tensor) and fwAD.unpack_dual(x).tangent is not None:
            raise TypeError(f"{name} carries a forward-mode tangent (torch.autograd.forward_ad.make_dual), "
                            "which pnode would drop: its derivatives come from PETSc's adjoint, in reverse "
                            "mode only. Use loss.backward() / torch.autograd.grad")


def check_y0(y0):
    if not isinstance(y0, torch.Tensor):
        raise TypeError(f"y0 must be a torch.Tensor or a tuple of them, got {type(y0).__name__}")
    if y0.numel() == 0:
        raise ValueError(f"y0 is empty (shape {tuple(y0.shape)}): pass at least one sample (an empty batch "
                         "has nothing to integrate; skip it)")
    if y0.is_complex():
        raise TypeError("y0 is complex; pnode integrates real states (split real and imaginary parts)")
    if not y0.is_floating_point():
        raise TypeError(f"y0 must be a floating-point tensor, got dtype {y0.dtype}; use y0.double() or y0.float()")
    if y0.device.type == "meta":
        raise ValueError("y0 is on the meta device and holds no values; pnode integrates real data: "
                         "create y0 on the CPU or a GPU (the device of func's parameters)")
    if not bool(torch.isfinite(y0).all()):
        raise ValueError("y0 contains NaN or Inf")
    if torch.finfo(y0.dtype).eps < PETSC_EPS:
        warnings.warn(f"y0 is {y0.dtype} but PETSc is built in single precision: the state is integrated "
                      "in float32, so results and gradients are only float32-accurate; use the default "
                      "double-precision PETSc for a float64 model", stacklevel=caller_level())


def check_devices(y0, params):
    """Parameters of func must live where y0 does: PETSc hands func tensors on y0's device."""
    for p in params:
        if p.device != y0.device:
            raise ValueError(f"y0 is on {y0.device} but func has parameters on {p.device}; move one "
                             f"of them: y0.to({str(p.device)!r}) or func.to({str(y0.device)!r})")


def check_dtypes(y0, params, failure):
    """After func raised at its first call: a ValueError when y0's dtype is not its parameters'.

    Not up front: a func may cast its input itself (a Grid state is float64 whatever the
    model), and a mixed-precision model has no one dtype for y0 to match.
    """
    dtypes = {p.dtype for p in params}
    if failure.__cause__ is None or len(dtypes) != 1:
        return
    dtype, = dtypes
    if dtype == y0.dtype or not dtype.is_floating_point:
        return
    raise ValueError(f"y0 is {y0.dtype} but func's parameters are {dtype}, and func raised at its first "
                     f"call ({failure.message}): pass y0.to({dtype}) or func.to({y0.dtype})") from failure
