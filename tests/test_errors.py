"""Every bad input gets a clear, early error; every solver failure a pnode exception that
says where and why; a failed call leaves the module reusable.

Each case asserts the exception type and the words of the message a user reads.
"""

import ast
import math
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable

import pnode
from pnode import NeuralODE, NonFiniteError, PnodeError, RHSError, SolverError, odeint
from pnode._petsc import PETSc

from helpers import rel_err

T = torch.linspace(0.0, 1.0, 3, dtype=torch.float64)
Y0 = torch.tensor([[1.0, -0.5, 0.25]], dtype=torch.float64)
RK4 = dict(method="rk4", options={"step_size": 0.25})


class Net(nn.Module):
    """A small nonlinear right-hand side; ``fail`` makes it misbehave on demand."""

    def __init__(self, seed=0, fail=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(0.5 * torch.randn(3, 3, generator=g, dtype=torch.float64))
        self.fail = fail      # None, or a function (t, y, net) -> tensor that may raise
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        if self.fail is not None:
            return self.fail(t, y, self)
        return torch.tanh(y @ self.w.T) - 0.2 * y


def minus(t, y):
    return -y


def grads_of(ys, y0, module):
    loss = (ys ** 2).sum() + ys[-1].sum()
    return torch.autograd.grad(loss, [y0] + list(module.parameters()))


def check(exc_info, *words):
    text = str(exc_info.value)
    for w in words:
        assert w in text, f"{w!r} not in the message: {text}"


# --------------------------------------------------------------------------------------------
# Bad input: a ValueError / TypeError before PETSc runs, naming the argument and the fix.

def check_both_entries(y0, t, exc, words):
    """odeint and NeuralODE reject the same bad (y0, t) with the same message."""
    for call in (lambda: odeint(minus, y0, t, adjoint_params=(), **RK4),
                 lambda: NeuralODE(Net(), **RK4)(y0, t)):
        with pytest.raises(exc) as info:
            call()
        check(info, *words)


BAD_T = [
    ("2-D", T.view(1, 3), ValueError, ["t must be 1-D", "(1, 3)"]),
    ("one point", T[:1], ValueError, ["at least 2 times"]),
    ("not monotone", torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64), ValueError,
     ["strictly increasing or strictly decreasing"]),
    ("repeated", torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64), ValueError,
     ["strictly increasing or strictly decreasing"]),
    ("NaN", torch.tensor([0.0, math.nan], dtype=torch.float64), ValueError, ["t contains NaN"]),
    ("Inf", torch.tensor([0.0, math.inf], dtype=torch.float64), ValueError, ["t contains NaN or Inf"]),
    ("integer", torch.tensor([0, 1]), TypeError, ["t must be a floating-point tensor", "int64"]),
    ("list", [0.0, 1.0], TypeError, ["t must be a 1-D torch.Tensor", "list"]),
    ("meta device", torch.empty(3, device="meta"), ValueError, ["t is on the meta device"]),
    ("requires grad", T.clone().requires_grad_(), ValueError, ["t requires grad", "t.detach()", "g(s, y) = T * func(T * s, y)"]),
]


@pytest.mark.parametrize("name, t, exc, words", BAD_T, ids=[c[0] for c in BAD_T])
def test_bad_t(name, t, exc, words):
    check_both_entries(Y0, t, exc, words)


BAD_Y0 = [
    ("empty", torch.empty(0, dtype=torch.float64), ValueError, ["y0 is empty", "(0,)"]),
    ("integer", torch.ones(3, dtype=torch.int64), TypeError, ["y0 must be a floating-point tensor",
                                                              "y0.double()"]),
    ("bool", torch.ones(3, dtype=torch.bool), TypeError, ["y0 must be a floating-point tensor"]),
    ("complex", torch.ones(3, dtype=torch.complex128), TypeError, ["y0 is complex", "real"]),
    ("NaN", torch.tensor([1.0, math.nan, 0.0], dtype=torch.float64), ValueError, ["y0 contains NaN"]),
    ("Inf", torch.tensor([1.0, -math.inf, 0.0], dtype=torch.float64), ValueError, ["y0 contains NaN or Inf"]),
    ("meta device", torch.empty(1, 3, dtype=torch.float64, device="meta"), ValueError,
     ["y0 is on the meta device", "real data"]),
    ("not a tensor", [1.0, 2.0, 3.0], TypeError, ["y0 must be a torch.Tensor", "list"]),
]


@pytest.mark.parametrize("name, y0, exc, words", BAD_Y0, ids=[c[0] for c in BAD_Y0])
def test_bad_y0(name, y0, exc, words):
    check_both_entries(y0, T, exc, words)


def test_y0_on_another_device_than_the_module():
    """The only second device a CPU-only machine has is "meta": parameters there, y0 on the CPU."""
    with torch.device("meta"):
        net = Net()
    with pytest.raises(ValueError) as info:
        NeuralODE(net, **RK4)(Y0, T)
    check(info, "y0 is on cpu", "parameters on meta", "func.to(")


BAD_OPTIONS = [
    ("unknown method", dict(method="rk45"), ValueError,
     ["unknown method 'rk45'", "valid methods", "dopri5", "beuler", "arkimex"]),
    ("method not a string", dict(method=4), TypeError, ["method must be a string", "dopri5"]),
    ("unknown option key", dict(options={"stepsize": 0.1}), ValueError,
     ["unknown options ['stepsize']", "step_size", "checkpoints"]),
    ("rtol zero", dict(rtol=0.0), ValueError, ["rtol must be a positive finite number", "0.0"]),
    ("rtol negative", dict(rtol=-1e-6), ValueError, ["rtol must be a positive finite number"]),
    ("atol negative", dict(atol=-1e-9), ValueError, ["atol must be a positive finite number"]),
    ("atol NaN", dict(atol=math.nan), ValueError, ["atol must be a positive finite number"]),
    ("rtol a string", dict(rtol="1e-6"), ValueError, ["rtol must be a positive finite number"]),
    ("step_size negative", dict(method="rk4", options={"step_size": -0.1}), ValueError,
     ["options['step_size'] must be positive", "magnitudes", "direction of integration comes from t"]),
    ("step_size zero", dict(method="rk4", options={"step_size": 0.0}), ValueError,
     ["options['step_size'] must be a positive finite number"]),
    ("first_step negative", dict(options={"first_step": -1e-3}), ValueError,
     ["options['first_step'] must be positive", "magnitudes"]),
    ("checkpoints zero", dict(options={"checkpoints": 0}), ValueError,
     ["options['checkpoints'] must be an integer >= 1", "minimum"]),
    ("checkpoints fractional", dict(options={"checkpoints": 2.5}), ValueError,
     ["options['checkpoints'] must be an integer >= 1"]),
    ("max_num_steps zero", dict(options={"max_num_steps": 0}), ValueError,
     ["options['max_num_steps'] must be a positive integer"]),
    ("memory", dict(options={"memory": "disk"}), ValueError, ["options['memory'] must be one of", "graphs"]),
    ("jacobian value", dict(method="beuler", options={"jacobian": "exact"}), ValueError,
     ["options['jacobian'] must be one of", "dense"]),
    ("jacobian for an explicit method", dict(options={"jacobian": "dense"}), ValueError,
     ["applies to implicit and IMEX methods"]),
    ("theta out of range", dict(method="theta", options={"theta": 1.5}), ValueError,
     ["options['theta'] must be in [1e-06, 1]", "method='euler'"]),
    ("theta so small that rounding rules", dict(method="theta", options={"theta": 1e-10}), ValueError,
     ["options['theta'] must be in [1e-06, 1]", "multiplies the stage's rounding by 1/theta"]),
    ("petsc_options not a dict", dict(petsc_options=["ts_adapt_type", "dsp"]), TypeError,
     ["petsc_options must be a dict"]),
    # "'float' object is not iterable"
    ("options not a dict", dict(options=0.1), TypeError,
     ["options must be a dict such as {'step_size': 0.1}, got float"]),
    ("PETSc rejects a type name", dict(petsc_options={"ts_adapt_type": "nonexistent"}), ValueError,
     ["PETSc rejected petsc_options", "'ts_adapt_type': 'nonexistent'", "Unknown TSAdapt type"]),
    ("PETSc rejects a number", dict(petsc_options={"ts_adapt_dt_min": "tiny", "ts_adapt_type": "dsp"}),
     ValueError, ["PETSc rejected petsc_options {'ts_adapt_dt_min': 'tiny'}", "no numeric value"]),
    # Accepted, they ran another scheme than the method named (beuler as the midpoint rule).
    ("a tableau pnode sets", dict(method="rk4", petsc_options={"ts_rk_type": "5dp"}), ValueError,
     ["petsc_options['ts_rk_type'] is set by pnode", "method= (e.g. 'dopri5'"]),
    ("theta pnode sets", dict(method="beuler", petsc_options={"ts_theta_theta": 0.5}), ValueError,
     ["petsc_options['ts_theta_theta'] is set by pnode", "method='theta' with options['theta']"]),
    ("an IMEX tableau pnode sets", dict(method="arkimex", petsc_options={"ts_arkimex_type": "1bee"}), ValueError,
     ["petsc_options['ts_arkimex_type'] is set by pnode", "method='arkimex-...'"]),
    ("PETSc rejects a Krylov method", dict(method="beuler", petsc_options={"ksp_type": "nonexistent"}),
     ValueError, ["'ksp_type': 'nonexistent'", "KSP type"]),
    ("an option pnode sets", dict(petsc_options={"ts_type": "bdf"}), ValueError,
     ["petsc_options['ts_type'] is set by pnode", "method="]),
    # It stopped the solve short of t[-1]: "reached 1 of 3 output times, raise max_num_steps".
    ("the end time", dict(petsc_options={"ts_max_time": 0.3}), ValueError,
     ["petsc_options['ts_max_time'] is set by pnode", "the output times t"]),
    # Fully implicit ARKIMEX adds the explicit Jacobian into pnode's shell: "No method getrow".
    ("fully implicit ARKIMEX", dict(method="arkimex", petsc_options={"ts_arkimex_fully_implicit": True}),
     ValueError, ["petsc_options['ts_arkimex_fully_implicit'] is set by pnode", "a single func",
                  "fully implicit through its IFunction"]),
    # Before they were reserved: the first two crashed the process (SEGV in TSSolve), the
    # step size was silently replaced by pnode's, the last two stopped short of t[-1].
    ("evaluation times", dict(petsc_options={"ts_eval_times": "0.25,0.5"}), ValueError,
     ["petsc_options['ts_eval_times'] is set by pnode", "the output times t"]),
    ("time span", dict(petsc_options={"ts_time_span": "0,0.5"}), ValueError,
     ["petsc_options['ts_time_span'] is set by pnode", "the output times t"]),
    ("the step size, PETSc 3.25's name", dict(**RK4, petsc_options={"ts_time_step": 0.5}), ValueError,
     ["petsc_options['ts_time_step'] is set by pnode", "options['step_size'] or options['first_step']"]),
    ("rejections, PETSc 3.25's name", dict(petsc_options={"ts_max_step_rejections": 3}), ValueError,
     ["petsc_options['ts_max_step_rejections'] is set by pnode", "options['max_rejections']"]),
    ("the initial time", dict(petsc_options={"ts_init_time": 0.3}), ValueError,
     ["petsc_options['ts_init_time'] is set by pnode", "t[0] is the initial time"]),
    ("steps per solve", dict(petsc_options={"ts_run_steps": 2}), ValueError,
     ["petsc_options['ts_run_steps'] is set by pnode", "options['max_num_steps']"]),
    ("the adjoint inside the forward", dict(petsc_options={"ts_adjoint_solve": True}), ValueError,
     ["petsc_options['ts_adjoint_solve'] is set by pnode", "loss.backward()"]),
    # It replaced pnode's IJacobian: AttributeError inside the callback.
    ("PETSc's finite-difference Jacobian", dict(method="beuler", petsc_options={"snes_mf": None}), ValueError,
     ["petsc_options['snes_mf'] is set by pnode", "options['jacobian']"]),
    # pnode resets the step before each step, the adapter shrank it after each rejection: beuler spun.
    ("an adapter on fixed steps", dict(method="beuler", options={"step_size": 0.25},
                                       petsc_options={"ts_adapt_type": "basic"}), ValueError,
     ["petsc_options['ts_adapt_type']='basic' adapts the steps", "options['step_size'] fixes them"]),
    ("an adapter on a fixed-step method", dict(method="rk4", petsc_options={"ts_adapt_type": "dsp"}), ValueError,
     ["'dsp' adapts the steps", "method 'rk4' has no error estimate", "'dopri5'"]),
    # PETSc's own advice after a Newton failure; it then quartered the "fixed" steps, silently.
    ("Newton failures retried on fixed steps", dict(method="beuler", options={"step_size": 0.25},
                                                   petsc_options={"ts_max_snes_failures": -1}), ValueError,
     ["petsc_options['ts_max_snes_failures']='-1' lets PETSc retry", "options['step_size'] fixes the steps"]),
    # PETSc dereferenced the RHS Jacobian theta methods do not have: SEGV.
    ("RHS Jacobian test on an implicit method",
     dict(method="cn", petsc_options={"ts_rhs_jacobian_test_mult_transpose": None}), ValueError,
     ["tests PETSc's RHS Jacobian, and method 'cn' has none", "IFunction"]),
    # PETSc's adjoint skipped pnode's Jacobian callback: products at the previous stage, 7-14% off.
    ("a lagged Jacobian", dict(method="cn", petsc_options={"snes_lag_jacobian": 2}), ValueError,
     ["petsc_options['snes_lag_jacobian']='2' reuses a Jacobian", "the adjoint then differentiates"]),
    ("a lagged preconditioner", dict(method="arkimex", petsc_options={"snes_lag_preconditioner": -1}), ValueError,
     ["petsc_options['snes_lag_preconditioner']='-1' reuses"]),
    ("Newton stopped early", dict(method="beuler", petsc_options={"snes_convergence_test": "skip"}), ValueError,
     ["'snes_convergence_test']='skip' stops the solves before they converge"]),
    ("Krylov stopped early", dict(method="beuler", petsc_options={"ksp_convergence_test": "skip"}), ValueError,
     ["'ksp_convergence_test']='skip' stops the solves"]),
    ("transposed stage equations", dict(method="cn", petsc_options={"snes_type": "ksptransposeonly"}), ValueError,
     ["'snes_type']='ksptransposeonly' solves the transposed stage equations"]),
    ("rtol a tensor of one value", dict(rtol=torch.tensor([1e-6])), ValueError,
     ["rtol must be a positive finite number (a float or a 0-d tensor)", "tensor([1.0000e-06])"]),
    ("atol a negative 0-d tensor", dict(atol=torch.tensor(-1e-9, dtype=torch.float64)), ValueError,
     ["atol must be a positive finite number", "-1e-09"]),
]


@pytest.mark.parametrize("name, kwargs, exc, words", BAD_OPTIONS, ids=[c[0] for c in BAD_OPTIONS])
def test_bad_options(name, kwargs, exc, words):
    # NeuralODE checks at construction, before any call.
    with pytest.raises(exc) as info:
        NeuralODE(Net(), **kwargs)
    check(info, *words)
    with pytest.raises(exc) as info:
        odeint(minus, Y0, T, adjoint_params=(), **kwargs)
    check(info, *words)


@pytest.mark.parametrize("jacobian, y0, pc", [(None, Y0.repeat(2, 1), "lu"), ("blockdiag", Y0.repeat(2, 1), "jacobi"),
                                           ("matrix-free", Y0[0], "ilu"), (None, torch.zeros(300, dtype=torch.float64),
                                                                            "bjacobi")])
def test_preconditioner_that_needs_matrix_entries(jacobian, y0, pc):
    """PETSc found out in the first Newton solve ("Could not locate a solver type for
    factorization type LU and matrix type python"); name the Jacobian choice that has entries."""
    options = {"step_size": 0.25} | ({"jacobian": jacobian} if jacobian else {})
    with pytest.raises(ValueError) as info:
        odeint(minus, y0, T, method="beuler", options=options, adjoint_params=(), petsc_options={"pc_type": pc})
    check(info, f"petsc_options['pc_type']={pc!r} needs the Jacobian's entries",
          f"options['jacobian']={jacobian or ('blockdiag' if y0.dim() == 2 else 'matrix-free')!r}",
          "options['jacobian']='dense'", "'none'")


def test_petsc_options_with_spaces():
    """PETSc refused " 1 " as "no integer value" and " dsp " as an unknown adapter."""
    ys, stats = odeint(minus, Y0, T, adjoint_params=(), return_stats=True,
                       petsc_options={" ts_adapt_type ": " dsp ", "ts_adapt_dt_max": " 0.05"})
    want, want_stats = odeint(minus, Y0, T, adjoint_params=(), return_stats=True,
                              petsc_options={"ts_adapt_type": "dsp", "ts_adapt_dt_max": "0.05"})
    assert stats.steps == want_stats.steps >= 20   # the step cap took effect
    torch.testing.assert_close(ys, want, rtol=0, atol=0)
    odeint(minus, Y0, T, method="beuler", options={"step_size": 0.25}, adjoint_params=(),
           petsc_options={"ts_max_snes_failures": " 1 "})


@pytest.mark.parametrize("jacobian, pc", [("dense", "jacobi"), ("dense", "lu"), ("blockdiag", "none"),
                                          ("matrix-free", "none")])
def test_preconditioners_that_work(jacobian, pc):
    want = odeint(minus, Y0.repeat(2, 1), T, method="beuler", options={"step_size": 0.25}, adjoint_params=())
    got = odeint(minus, Y0.repeat(2, 1), T, method="beuler", adjoint_params=(),
                 options={"step_size": 0.25, "jacobian": jacobian}, petsc_options={"pc_type": pc})
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_tolerances_as_0d_tensors():
    """rtol=torch.tensor(1e-6), as a tolerance schedule may hand it over, is that float."""
    want = odeint(Net(), Y0, T, rtol=1e-6, atol=1e-8)
    got = odeint(Net(), Y0, T, rtol=torch.tensor(1e-6, dtype=torch.float64),
                 atol=torch.tensor(1e-8, dtype=torch.float64))
    assert torch.equal(got, want)
    module = NeuralODE(Net(), rtol=torch.tensor(1e-6))
    assert module.config.rtol == float(torch.tensor(1e-6)) and type(module.config.rtol) is float


@pytest.mark.parametrize("method, options", [("rk4", {"step_size": 0.25}), ("dopri5", {}),
                                             ("beuler", {"step_size": 0.25})])
def test_y0_of_another_dtype_than_the_parameters(method, options):
    """A float32 y0 into a float64 model: torch's "mat1 and mat2 must have the same dtype"
    named neither y0 nor the parameters."""
    y0 = Y0.float()
    for call in (lambda: odeint(Net(), y0, T, method=method, options=options),
                 lambda: NeuralODE(Net(), method=method, options=options)(y0.requires_grad_(), T)):
        with pytest.raises(ValueError) as info:
            call()
        check(info, "y0 is torch.float32 but func's parameters are torch.float64", "same dtype",
              "y0.to(torch.float64) or func.to(torch.float32)")
        assert isinstance(info.value.__cause__, RHSError)


class CastsItsInput(nn.Module):
    """float32 parameters (a float32 layer next to a float64 one when ``mixed``) that cast y."""

    def __init__(self, mixed):
        super().__init__()
        self.a = nn.Linear(3, 3).float()
        self.b = nn.Linear(3, 3).double() if mixed else None

    def forward(self, t, y):
        out = self.a(y.float()).to(y.dtype)
        return -out if self.b is None else -self.b(out.double()).to(y.dtype)


@pytest.mark.parametrize("mixed", [False, True])
def test_y0_of_another_dtype_is_fine_when_func_casts_it(mixed):
    func = CastsItsInput(mixed)
    y0 = Y0.clone().requires_grad_()
    ys = odeint(func, y0, T, **RK4)
    grads = torch.autograd.grad(ys.sum(), [y0, *func.parameters()])
    assert ys.dtype == torch.float64 and all(torch.isfinite(g).all() for g in grads)

    def late(t, y):
        if float(t) > 0.6:
            raise RuntimeError("late")
        return func(t, y)
    with pytest.raises(RHSError, match="late"):   # func ran: a later failure is func's own
        odeint(late, Y0, T, **RK4, adjoint_params=tuple(func.parameters()))


def test_petsc_rejection_leaves_no_options_behind():
    before = PETSc.Options().getAll()
    with pytest.raises(ValueError):
        NeuralODE(Net(), petsc_options={"ts_adapt_type": "nonexistent", "ts_adapt_safety": "0.8"})
    assert PETSc.Options().getAll() == before


def test_misspelt_petsc_option_warns():
    with pytest.warns(UserWarning, match=r"\['ts_adapt_typo'\] were not read by PETSc"):
        NeuralODE(Net(), petsc_options={"ts_adapt_typo": "dsp"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # valid options are silent
        NeuralODE(Net(), petsc_options={"ts_adapt_type": "dsp", "ts_adapt_dt_min": 1e-12})
        NeuralODE(Net(), method="beuler", petsc_options={"snes_max_it": 100, "ksp_type": "gmres",
                                                         "pc_factor_mat_solver_type": "petsc"})


def test_step_limits_in_petsc_time_warn_on_a_long_span():
    """PETSc's time is (t - t[0]) / L for spans over 1: its own step limits are in that unit."""
    t = torch.tensor([0.0, 10.0], dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"\['ts_adapt_dt_max'\] are step sizes in PETSc's time s = \(t - t\[0\]\) / 16"):
        odeint(minus, Y0, t, adjoint_params=(), petsc_options={"ts_adapt_dt_max": 0.5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        odeint(minus, Y0, T, adjoint_params=(), petsc_options={"ts_adapt_dt_max": 0.5})


def test_solver_options_for_an_explicit_method_warn():
    """The dry run's RK TS read snes_rtol, so it passed as used, with no effect."""
    with pytest.warns(UserWarning, match=r"\['pc_type', 'snes_rtol'\] configure Newton and Krylov solves, which "
                                         "the explicit method 'dopri5' does not run"):
        NeuralODE(Net(), petsc_options={"snes_rtol": 1e-3, "pc_type": "jacobi"})


def test_non_integral_float_counts_are_rejected_but_1e6_is_accepted():
    NeuralODE(Net(), options={"max_num_steps": 1e6})
    with pytest.raises(ValueError):
        NeuralODE(Net(), options={"max_num_steps": 10.5})


# --------------------------------------------------------------------------------------------
# func returning something unusable, or raising: RHSError with the time and step, the
# original exception chained, never a PETSc error code.

BAD_RETURNS = [
    ("shape", lambda t, y, net: y[..., :2], ["returned shape (1, 2)", "y of shape (1, 3)", "must match y"]),
    ("dtype", lambda t, y, net: y.float(), ["dtype torch.float32", "dtype torch.float64", "must match y"]),
    ("device", lambda t, y, net: torch.empty_like(y, device="meta"), ["device meta", "device cpu"]),
    ("non-tensor", lambda t, y, net: 0.0, ["must return a torch.Tensor", "float"]),
    ("None", lambda t, y, net: None, ["must return a torch.Tensor", "NoneType"]),
    ("tuple", lambda t, y, net: (y,), ["must return a torch.Tensor", "tuple"]),
    # PyTorch's words were about a view made in no_grad mode, which the user never made
    ("y written in place", lambda t, y, net: y.mul_(-1), ["writes y in place", "y = y * 2 rather than y.mul_(2)"]),
]


@pytest.mark.parametrize("method, options", [("rk4", {"step_size": 0.25}), ("dopri5", {}),
                                             ("beuler", {"step_size": 0.25})])
@pytest.mark.parametrize("name, fail, words", BAD_RETURNS, ids=[c[0] for c in BAD_RETURNS])
def test_func_returns_something_unusable(name, fail, words, method, options):
    with pytest.raises(RHSError) as info:
        NeuralODE(Net(fail=fail), method=method, options=options)(Y0, T)
    check(info, *words, "t=0")


@pytest.mark.parametrize("method", ["rk4", "dopri5", "beuler"])
def test_func_writing_y_in_place_without_grad(method):
    """Without a graph the write went into PETSc's stage: dopri5's solution was 7e-10 off."""
    with torch.no_grad(), pytest.raises(RHSError) as info:
        odeint(lambda t, y: y.mul_(-1), Y0, T, method=method, adjoint_params=())
    check(info, "func writes y in place", "it is PETSc's state", "forward solve, t=0, step 0")


def test_func_returns_something_unusable_later():
    """A bad return inside a PETSc callback: the message has the time and the step index."""
    def late(t, y, net):
        return y[..., :2] if t > 0.6 else -y
    with pytest.raises(RHSError) as info:
        NeuralODE(Net(fail=late), **RK4)(Y0, T)
    # rk4's second stage of step 2 (from t=0.5) is the first evaluation past t=0.6
    check(info, "returned shape (1, 2)", "forward solve", "t=0.625", "step 2")
    assert info.value.step == 2 and info.value.phase == "forward" and info.value.time == 0.625


class Boom(Exception):
    pass


class BackwardBoom(torch.autograd.Function):
    """Identity whose backward raises: a custom op of the user's that fails when differentiated."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise Boom("backward boom")


@pytest.mark.parametrize("method, options", [
    ("rk4", {"step_size": 0.25}), ("beuler", {"step_size": 0.25, "jacobian": "dense"}),
    ("beuler", {"step_size": 0.25, "jacobian": "blockdiag"}), ("beuler", {"step_size": 0.25, "jacobian": "matrix-free"})])
def test_func_whose_backward_raises(method, options):
    """The adjoint's VJPs and Newton's Jacobian rows let the user's exception out raw
    (no time, no phase); it is an RHSError like a failure of func itself."""
    net = Net(fail=lambda t, y, net: BackwardBoom.apply(torch.tanh(y @ net.w.T)) - y)
    with pytest.raises(RHSError) as info:
        NeuralODE(net, method=method, options=options)(Y0.clone().requires_grad_(), T).sum().backward()
    check(info, "differentiating func raised Boom: backward boom", "solve", "t=")
    assert isinstance(info.value.__cause__, Boom)


def raise_after(t0):
    def fail(t, y, net):
        if float(t) > t0:
            raise Boom(f"boom at {float(t):.3f}")
        return torch.tanh(y @ net.w.T) - 0.2 * y
    return fail


@pytest.mark.parametrize("method, options, t0, time", [
    ("rk4", {"step_size": 0.25}, 0.6, 0.625),                      # explicit stage
    ("dopri5", {}, -1.0, 0.0),                                     # initial-step heuristic, before PETSc
    ("dopri5", {}, 0.3, None),                                     # adaptive stages
    ("beuler", {"step_size": 0.25}, 0.6, 0.75),                    # Newton (IFunction)
    ("arkimex", {}, 0.3, None),                                    # IMEX stage
    ("cn", {"step_size": 0.25, "checkpoints": 2}, 0.6, 0.75),      # Newton, no trajectory kept
])
def test_func_raises_in_the_forward(method, options, t0, time):
    net = Net(fail=raise_after(t0))
    with pytest.raises(RHSError) as info:
        NeuralODE(net, method=method, options=options)(Y0.clone().requires_grad_(), T)
    err = info.value
    assert isinstance(err.__cause__, Boom)          # the very exception func raised
    assert "PETSc error" not in str(err) and "error code" not in str(err)
    check(info, "func raised Boom", "boom at", "t=")
    if time is not None:
        assert err.time == pytest.approx(time)
    # the starting-step estimate too: phase and step were None there, with dopri5 the default
    assert err.phase == "forward" and err.step is not None
    check(info, "forward solve", f"step {err.step}")


@pytest.mark.parametrize("method, options", [
    ("rk4", {"step_size": 0.25, "memory": "states"}),      # the backward re-evaluates f for its VJPs
    ("rk4", {"step_size": 0.25, "checkpoints": 2}),        # the backward replays the forward
    ("dopri5", {"memory": "states"}),
    ("beuler", {"step_size": 0.25, "memory": "states"}),   # transposed Krylov solves
])
def test_func_raises_in_the_backward(method, options):
    net = Net()
    y0 = Y0.clone().requires_grad_()
    ys = NeuralODE(net, method=method, options=options)(y0, T)
    net.fail = raise_after(-1.0)
    with pytest.raises(RHSError) as info:
        ys.sum().backward()
    assert isinstance(info.value.__cause__, Boom)
    check(info, "func raised Boom", "t=")
    assert info.value.phase == "backward"


def test_keyboard_interrupt_in_func_is_not_swallowed():
    """Ctrl-C inside func must stop the job: it surfaces as itself, not as a PETSc error."""
    def interrupt(t, y, net):
        if float(t) > 0.3:
            raise KeyboardInterrupt
        return -y
    for method in ("rk4", "beuler"):
        with pytest.raises(KeyboardInterrupt):
            NeuralODE(Net(fail=interrupt), method=method, options={"step_size": 0.25})(Y0, T)


def test_rhs_error_pickles():
    """Errors cross process boundaries (DataLoader workers, multiprocessing) intact."""
    with pytest.raises(RHSError) as info:
        NeuralODE(Net(fail=raise_after(0.6)), **RK4)(Y0, T)
    copy = pickle.loads(pickle.dumps(info.value))
    assert str(copy) == str(info.value) and copy.step == info.value.step
    err = SolverError("x", phase="forward", time=1.0, step=3, step_size=0.1, reason="R", hint="h")
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err) and copy.step == 3


# --------------------------------------------------------------------------------------------
# Solver failures: a pnode exception with phase, time, step, step size, residual, reason, hint.

def blow_up(t, y, net):
    return y ** 3


def nan_after(t0):
    def fail(t, y, net):
        return -y if float(t) < t0 else y * math.nan
    return fail


@pytest.mark.parametrize("method, options, fail, y0", [
    ("rk4", {"step_size": 0.25}, lambda t, y, net: y * math.inf, Y0),   # the post-step check
    ("rk4", {"step_size": 0.25}, blow_up, 100 * Y0),
    ("dopri5", {}, nan_after(0.3), Y0),                                 # PETSc's error norm sees it
    ("dopri5", {}, lambda t, y, net: y * math.nan, Y0),                 # the initial step (PETSc error 63)
    ("beuler", {"step_size": 0.25}, nan_after(0.3), Y0),                # Newton sees it
])
def test_nonfinite_state_in_the_forward(method, options, fail, y0):
    with pytest.raises(NonFiniteError) as info:
        NeuralODE(Net(fail=fail), method=method, options=options)(y0, T)
    err = info.value
    assert isinstance(err, SolverError) and err.phase == "forward"
    assert err.time is not None and err.step is not None and err.step_size is not None
    assert err.hint
    if method == "beuler":   # PETSc's last finite norm (0 here) is not the residual that failed
        assert math.isnan(err.residual)
        check(info, "NaN or Inf in Newton's residual (func's output)")
    elif method == "dopri5" and err.step > 0:   # caught before PETSc's error norm (which leaked)
        check(info, "func returned NaN or Inf")
    else:
        check(info, "NaN or Inf in the state")
    check(info, "forward solve failed at t=", "Hint:")


@pytest.mark.parametrize("method, fail, y0, t_stop", [
    ("dopri5", blow_up, 100 * Y0, 5e-5),        # y' = y^3 from 100 blows up at t = 1 / (2 * 100^2)
    ("beuler", nan_after(0.3), Y0, 0.3),        # Newton fails past 0.3 at any step size
])
def test_adaptive_steps_shrinking_to_nothing(method, fail, y0, t_stop):
    """An adaptive method cuts the step until the NaN/Inf goes away or t stops moving:
    either way a SolverError, never a hang."""
    with pytest.raises(SolverError) as info:
        NeuralODE(Net(fail=fail), method=method)(y0, T)
    err = info.value
    # not before the singularity (past it the state may hold huge finite numbers a while)
    assert err.phase == "forward" and 0.999 * t_stop <= err.time < 1.0
    assert err.step_size < 1e-10 and err.hint
    if method == "beuler":   # every retry met the NaN: it was reported as a step size underflow
        assert isinstance(err, NonFiniteError)
        assert math.isnan(err.residual)
        assert "func returned NaN or Inf" in str(err) or "NaN or Inf in func's output (at t=0.3; " in str(err)
    else:
        assert "NaN or Inf" in str(err) or "underflow" in str(err)


@pytest.mark.parametrize("t", [T, T[::2]], ids=["underflow", "rejections"])
@pytest.mark.parametrize("jacobian, y0", [("blockdiag", torch.ones(2, 3, dtype=torch.float64)),
                                          ("matrix-free", torch.ones(3, dtype=torch.float64)),
                                          ("dense", torch.ones(3, dtype=torch.float64))])
def test_residual_of_a_newton_failure_from_nan_in_func_is_nan(jacobian, y0, t):
    """When the NaN reached Newton's linear solve first (blockdiag, matrix-free), the error's
    residual was PETSc's last finished norm (2.2), next to "NaN or Inf in func's output";
    when the retries shrank the step to nothing it was None."""
    def func(t, y):
        return -y * math.nan if float(t) > 0.1 else -y
    with pytest.raises(NonFiniteError) as info:
        odeint(func, y0, t, method="beuler", adjoint_params=(), options={"jacobian": jacobian})
    assert math.isnan(info.value.residual)
    assert info.value.time == pytest.approx(0.1, abs=1e-6)


def test_stiff_runs_out_of_steps_without_a_crawl_is_told_to_raise_max_num_steps():
    """ARKIMEX on Van der Pol (mu 1000, rtol 1e-3) fails more Newton solves than it takes steps
    while its steps stay large: the crawl note said raising max_num_steps would not help, where
    it does."""
    van_der_pol = _van_der_pol(1000)
    with pytest.raises(SolverError) as info:
        odeint(van_der_pol, torch.tensor([2.0, 0.0], dtype=torch.float64), torch.linspace(0, 3000, 4, dtype=torch.float64),
               method="arkimex", rtol=1e-3, atol=1e-3, adjoint_params=(),
               options={"jacobian": "dense", "max_num_steps": 60})
    assert info.value.hint == "raise options['max_num_steps']"
    assert "Newton solves failed" not in str(info.value)


def test_newton_failure_hints_fit_the_case():
    """Only a residual at pnode's own rounding-level snes_atol is "stalled" (a user's
    snes_atol=1e-6 under qn got that hint and a looser tolerance than it needed); PETSc's
    "increase -ts_max_snes_failures" is not quoted for fixed steps, where pnode refuses it."""
    van_der_pol = _van_der_pol(100)
    y0, t = torch.tensor([2.0, 0.0], dtype=torch.float64), torch.linspace(0, 0.5, 3, dtype=torch.float64)
    with pytest.raises(SolverError) as info:
        odeint(van_der_pol, y0, t, method="beuler", adjoint_params=(), options={"step_size": 0.01},
               petsc_options={"snes_type": "qn", "snes_atol": 1e-6, "snes_max_it": 5})
    check(info, "DIVERGED_MAX_IT", "snes_max_it")
    assert "stalled" not in str(info.value) and "ts_max_snes_failures" not in str(info.value)


def test_newton_stalled_at_its_rounding_floor_gets_a_hint_that_works():
    """Under an l2 line search (no step test) the residual sat at 1.3-1.5e-14, just above
    snes_atol, and the hint said raise snes_max_it, which stalls the same way."""
    van_der_pol = _van_der_pol(100)
    y0, t = torch.tensor([2.0, 0.0], dtype=torch.float64), torch.linspace(0, 0.5, 3, dtype=torch.float64)
    run = dict(method="beuler", adjoint_params=(), options={"step_size": 0.01})
    with pytest.raises(SolverError) as info:
        odeint(van_der_pol, y0, t, **run, petsc_options={"snes_linesearch_type": "l2"})
    check(info, "DIVERGED_MAX_IT", "stalled at", "Raise snes_atol above it: petsc_options={'snes_atol': ")
    advice = info.value.hint.split("petsc_options=")[1]
    ys = odeint(van_der_pol, y0, t, **run, petsc_options={"snes_linesearch_type": "l2", **ast.literal_eval(advice)})
    assert rel_err(ys, odeint(van_der_pol, y0, t, **run)) <= 1e-12


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])   # cn creeps up to it for 80,000 steps (30 s)
def test_step_size_underflow_at_a_blow_up_says_so(method):
    """y' = y^2 from 1 blows up at t = 1: the steps shrink towards it and the message said
    only "loosen rtol/atol", which does not help."""
    with pytest.raises(SolverError) as info:
        odeint(lambda t, y: y * y, torch.ones(1, dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64),
               method=method, adjoint_params=())
    err = info.value
    assert err.reason == "STEP_SIZE_UNDERFLOW" and err.time == pytest.approx(1.0, abs=1e-3)
    largest = float(str(err).split("largest |y| ")[1].split(")")[0])
    assert largest > 1e9
    check(info, "the solution blows up near this time")


def test_adaptive_newton_failing_on_and_on_is_named_not_max_num_steps():
    """Krylov solves that cannot converge (one iteration allowed, no preconditioner) made each
    failed Newton solve quarter the step until it succeeded at dt ~ 1e-13: after max_num_steps
    the error said only "raise max_num_steps" (the default 1e6 would take about 20 minutes)."""
    van_der_pol = _van_der_pol(100)
    with pytest.raises(SolverError) as info:
        odeint(van_der_pol, torch.tensor([2.0, 0.0], dtype=torch.float64), T, method="beuler",
               adjoint_params=(), options={"jacobian": "matrix-free", "max_num_steps": 300},
               petsc_options={"ksp_max_it": 1})
    assert info.value.reason == "DIVERGED_MAX_STEPS" and info.value.time < 1e-6
    check(info, "Newton solves failed on the way (300 steps)", "raising max_num_steps only crawls further",
          "ksp_max_it")


@pytest.mark.parametrize("method, options", [("rk4", {"step_size": 0.25}),
                                             ("rk4", {"step_size": 0.25, "checkpoints": 2}),
                                             ("dopri5", {}), ("beuler", {"step_size": 0.25})])
def test_nonfinite_adjoint_in_the_backward(method, options):
    y0 = Y0.clone().requires_grad_()
    ys = NeuralODE(Net(), method=method, options=options)(y0, T)
    g = torch.zeros_like(ys)
    g[-1, 0, 0] = math.nan
    with pytest.raises(NonFiniteError) as info:
        ys.backward(g)
    assert info.value.phase == "backward" and info.value.step is not None
    check(info, "backward solve failed", "NaN or Inf in the adjoint", "Hint:")


def _van_der_pol(mu):
    """Van der Pol's oscillator as a first-order system: stiff for large mu."""
    def func(t, y):
        return torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])
    return func


def _bad_entry(index, after):
    """dy/dt = -y, with NaN in entry ``index`` of func's output from t = ``after`` on."""
    def func(t, y):
        out = -y
        if float(t) >= after:
            out = out.clone()
            out[index] = math.nan
        return out
    return func


@pytest.mark.parametrize("method, options, where", [("rk4", {"step_size": 0.25}, "NaN or Inf in the state"),
                                                    ("dopri5", {}, "func returned NaN or Inf"),
                                                    ("beuler", {}, "func returned NaN or Inf"),
                                                    ("arkimex", {}, "func returned NaN or Inf")])
def test_nonfinite_forward_error_says_which_entries(method, options, where):
    """On a large state the time alone does not find the culprit: the count and the first index."""
    y0 = torch.ones(4, 2, dtype=torch.float64)
    with pytest.raises(NonFiniteError) as info:
        odeint(_bad_entry((2, 1), 0.3), y0, T, method=method, options=options, adjoint_params=())
    check(info, f"{where} (1 of 8 entries, the first at index (2, 1))")


def test_nonfinite_adjoint_error_says_which_entries():
    y0 = torch.ones(4, 2, dtype=torch.float64, requires_grad=True)
    ys = odeint(lambda t, y: -y, y0, T, method="rk4", options={"step_size": 0.25}, adjoint_params=())
    g = torch.zeros_like(ys)
    g[-1, 1, 0] = g[-1, 3, 1] = math.inf   # -y keeps the entries apart in the adjoint too
    with pytest.raises(NonFiniteError) as info:
        ys.backward(g)
    check(info, "NaN or Inf in the adjoint (2 of 8 entries, the first at index (1, 0))")


@pytest.mark.parametrize("method, options", [("rk4", {"step_size": 0.01, "max_num_steps": 5}),
                                             ("dopri5", {"max_num_steps": 2})])
def test_max_steps_exceeded(method, options):
    with pytest.raises(SolverError) as info:
        NeuralODE(Net(), method=method, options=options)(Y0, T)
    err = info.value
    assert not isinstance(err, NonFiniteError)
    assert err.phase == "forward" and err.step is not None and err.time < 1.0
    assert "max_num_steps" in err.hint
    check(info, "output times", "max_num_steps")


def test_step_rejections_exhausted():
    with pytest.raises(SolverError) as info:
        NeuralODE(Net(), method="dopri5", rtol=1e-13, atol=1e-15,
                  options={"max_rejections": 1, "first_step": 0.9})(Y0, T)
    err = info.value
    assert err.reason == "DIVERGED_STEP_REJECTED" and err.step_size is not None
    assert "max_rejections" in err.hint
    check(info, "DIVERGED_STEP_REJECTED", "Hint:")


@pytest.mark.parametrize("origin", [1e6, 1e9, 1e15])
def test_large_times_land_on_the_outputs(origin):
    """PETSc integrates from s = t - t_0, not from t_0.

    PETSc takes a step as landing on an output time within 1e-6 h relative to |s|:
    on [1e6, 1e6 + 1] that was a whole step, and the outputs were one step early
    (y(t_0 + 1) off by 4e-3 with rk4); at 1e15 PETSc could not resolve a step of 0.01.
    """
    t = torch.tensor([origin, origin + 0.5, origin + 1.0], dtype=torch.float64)
    for method, options in [("rk4", {"step_size": 0.01}), ("dopri5", {}), ("beuler", {"step_size": 0.01})]:
        ys, stats = odeint(minus, Y0, t, method=method, options=options, adjoint_params=(), return_stats=True)
        exact = Y0 * torch.exp(-(t - origin)).view(-1, 1, 1)
        err = float((ys - exact).abs().max() / exact.abs().max())
        assert err < (2e-2 if method == "beuler" else 1e-8), (method, err)
        assert stats.step_times[0] == origin and stats.step_times[-1] == origin + 1.0


@pytest.mark.parametrize("method", ["dopri5", "arkimex"])
@pytest.mark.parametrize("t", [[0.0, 2e6, 2e6 + 10], [0.0, 1e6], [4e10, 0.0]], ids=["2e6", "1e6", "4e10-back"])
def test_long_spans_land_on_the_outputs(t, method):
    """PETSc takes a step as landing on an output time within 1e-6 h relative to |s|: over
    [0, 1e6] that was a whole step, and the solve was refused ("PETSc stored the output for
    t=1000000 at t=997928"); with steps of ~1e6 it stored t = 2e6's output at t = 5e5. pnode
    integrates in s = (t - t_0) / 2^k, within [0, 1]."""
    t = torch.tensor(t, dtype=torch.float64)
    rate = 1.0 / float((t[-1] - t[0]).abs())
    y0 = Y0.clone().requires_grad_()
    ys, stats = odeint(lambda s, y: -rate * y, y0, t, method=method, rtol=1e-8, atol=1e-10, adjoint_params=(),
                       return_stats=True)
    decay = torch.exp(-rate * (t - t[0])).view(-1, 1, 1)   # grows backwards in time
    assert float((ys - Y0 * decay).abs().max()) <= 1e-6 * float(Y0.abs().max())
    assert stats.step_times[0] == t[0] and stats.step_times[-1] == t[-1]
    g, = torch.autograd.grad(ys[-1].sum(), y0)
    torch.testing.assert_close(g, torch.full_like(g, float(decay[-1])), rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["cn", "dopri5"])
def test_first_step_does_not_depend_on_the_span(method):
    """The starting-step estimate ran in PETSc's scaled time, where it is not the same rule:
    cn's first step on [0, 2, 1e5] was 1.0 instead of 0.022, and y(2) 9% off."""
    firsts = []
    for t in ([0.0, 2.0], [0.0, 2.0, 1000.0], [0.0, 2.0, 1e5]):
        _, stats = odeint(minus, Y0, torch.tensor(t, dtype=torch.float64), method=method, rtol=1e-3, atol=1e-6,
                          adjoint_params=(), return_stats=True)
        firsts.append(stats.step_times[1] - stats.step_times[0])
    assert firsts[0] == firsts[1] == firsts[2], firsts


def test_newton_divergence():
    def hard(t, y, net):
        return torch.sin(5 * y) * y ** 2
    with pytest.raises(SolverError) as info:
        NeuralODE(Net(fail=hard), method="beuler", options={"step_size": 0.5},
                  petsc_options={"snes_max_it": 1})(3 * Y0, T)
    err = info.value
    assert not isinstance(err, NonFiniteError)
    assert err.reason == "DIVERGED_NONLINEAR_SOLVE"
    assert err.residual is not None and err.residual > 0 and math.isfinite(err.residual)
    assert err.time == 0.0 and err.step == 0 and err.step_size == 0.5
    check(info, "Newton (SNES) DIVERGED_MAX_IT", "residual=", "Hint: Newton failed", "step_size")


def test_krylov_divergence():
    """ksp_max_it=1 with no preconditioner: the linear solve inside Newton fails."""
    with pytest.raises(SolverError) as info:
        NeuralODE(Net(), method="beuler", options={"step_size": 0.5, "jacobian": "matrix-free"},
                  petsc_options={"ksp_max_it": 1})(Y0, T)
    err = info.value
    assert err.reason == "DIVERGED_NONLINEAR_SOLVE" and err.residual is not None
    check(info, "Krylov (KSP) DIVERGED_MAX_IT", "linear solves", "Hint:")


def test_krylov_divergence_in_the_adjoint():
    """The transposed solves of the backward: the error said 'PETSc reason -4', without a hint."""
    y0 = Y0.clone().requires_grad_()
    ys = NeuralODE(Net(), method="beuler", options={"step_size": 0.1, "jacobian": "matrix-free"},
                   petsc_options={"ksp_max_it": 2, "snes_max_it": 1000, "snes_max_linear_solve_fail": 1000})(y0, T)
    with pytest.raises(SolverError) as info:
        ys.sum().backward()
    err = info.value
    assert err.phase == "backward" and err.reason == "ADJOINT_DIVERGED_LINEAR_SOLVE"
    check(info, "Krylov (KSP) DIVERGED_MAX_IT", "Hint: the adjoint's transposed linear solves failed", "ksp_max_it")


def _second_order_cases():
    """Ways to differentiate pnode's gradient again; the loss is linear in ys in the first
    three, so the incoming gradient needs no grad (PyTorch's @once_differentiable then
    raised nothing), and the last two differentiate with respect to y0 or a parameter."""
    w = torch.linspace(-1.0, 1.0, 9, dtype=torch.float64).view(3, 1, 3)

    def penalty(net, y0):           # task + |dL/dy0|^2, trained with .backward()
        task = (w * NeuralODE(net, **RK4)(y0, T)).sum()
        g, = torch.autograd.grad(task, y0, create_graph=True)
        (task + (g ** 2).sum()).backward()

    def hvp(net, y0):
        torch.autograd.functional.hvp(lambda y: (w * NeuralODE(net, **RK4)(y, T)).sum(), y0.detach(),
                                      torch.ones_like(y0))

    def gradgrad_params(net, y0):
        g, = torch.autograd.grad((NeuralODE(net, **RK4)(y0, T) ** 2).sum(), y0, create_graph=True)
        torch.autograd.grad((g ** 2).sum(), list(net.parameters()), allow_unused=True)

    def nonlinear(net, y0):
        g, = torch.autograd.grad((NeuralODE(net, **RK4)(y0, T) ** 2).sum(), y0, create_graph=True)
        g.sum().backward()
    return {"penalty": penalty, "hvp": hvp, "gradgrad_params": gradgrad_params, "nonlinear": nonlinear}


@pytest.mark.parametrize("case", sorted(_second_order_cases()))
def test_second_order_gradients_raise_instead_of_coming_out_zero(case):
    """pnode's backward is first order: differentiating through its gradient must fail
    loudly. A gradient penalty on a loss linear in ys lost pnode's part without a word
    (|grad| 4.1 against 36.1 by backprop), hvp returned the other terms only, and
    autograd.grad of |dL/dy0|^2 with respect to the parameters gave None."""
    with pytest.raises(RuntimeError) as info:
        _second_order_cases()[case](Net(), Y0.clone().requires_grad_())
    check(info, "pnode's gradients are first order", "torchdiffeq.odeint")


def test_create_graph_alone_still_gives_the_first_order_gradient():
    y0 = Y0.clone().requires_grad_()
    g, = torch.autograd.grad((NeuralODE(Net(), **RK4)(y0, T) ** 2).sum(), y0, create_graph=True)
    g_ref, = torch.autograd.grad((NeuralODE(Net(), **RK4)(y0, T) ** 2).sum(), y0)
    assert g.requires_grad and torch.equal(g.detach(), g_ref)


IMEX = [name for name, m in pnode.METHODS.items() if m.kind == "imex"]


@pytest.mark.parametrize("method", IMEX)
def test_imex_method_with_a_single_func(method):
    """A single func is the stiff part of a zero split. arkimex-ars122 (explicit first stage,
    not stiffly accurate) failed at t=0 with PETSc error 56 'explicit-first stage methods
    cannot be used if the equation is implicit' until pnode stated the zero explicit part."""
    net = Net()
    y0 = Y0.clone().requires_grad_()
    t = T + 0.5   # a stale stage time would show as another first slope
    runs = []
    for func in (net, (lambda t, y: torch.zeros_like(y), net)):
        ys = odeint(func, y0, t, method=method, options={"step_size": 0.1},
                    adjoint_params=tuple(net.parameters()))
        runs.append((ys.detach(),) + grads_of(ys, y0, net))
    for single, pair in zip(*runs):
        torch.testing.assert_close(single, pair, rtol=1e-13, atol=1e-15)


def test_every_pnode_error_is_a_runtime_error():
    for cls in (SolverError, NonFiniteError, RHSError):
        assert issubclass(cls, PnodeError) and issubclass(cls, RuntimeError)
    assert pnode.NonFiniteError is NonFiniteError


# --------------------------------------------------------------------------------------------
# A failed call leaves the module reusable: the next call matches a fresh module bit for bit.

FAILURES = [
    ("func raises", lambda net: setattr(net, "fail", raise_after(0.6)), "forward"),
    ("NaN state", lambda net: setattr(net, "fail", nan_after(0.6)), "forward"),
    ("func raises in backward", lambda net: setattr(net, "fail", raise_after(-1.0)), "backward"),
    ("NaN adjoint", None, "backward"),
]


REUSE_MODES = [("rk4", {"step_size": 0.25}), ("rk4", {"step_size": 0.25, "memory": "states"}),
               ("dopri5", {"checkpoints": 2}), ("beuler", {"step_size": 0.25, "memory": "states"})]


# Not "func raises in backward" under memory='graphs': that backward differentiates the
# forward's graphs and calls no func.
@pytest.mark.parametrize("method, options, name, break_it, phase", [
    pytest.param(method, options, *failure, id=f"{failure[0]}-{method}-{'-'.join(map(str, options.values()))}")
    for method, options in REUSE_MODES for failure in FAILURES
    if failure[0] != "func raises in backward" or options.get("memory") == "states" or "checkpoints" in options])
def test_module_is_reusable_after_a_failure(name, break_it, phase, method, options):
    net = Net()
    module = NeuralODE(net, method=method, options=options)
    y0 = Y0.clone().requires_grad_()
    with pytest.raises(PnodeError):
        if phase == "forward":
            break_it(net)
            module(y0, T)
        else:
            ys = module(y0, T)
            if break_it is None:
                ys.backward(torch.full_like(ys, math.nan))
            else:
                break_it(net)
                ys.sum().backward()
    net.fail = None
    ys = module(y0, T)
    got = (ys.detach(),) + grads_of(ys, y0, net)
    fresh = NeuralODE(net, method=method, options=options)
    ys = fresh(y0, T)
    want = (ys.detach(),) + grads_of(ys, y0, net)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_odeint_is_reusable_after_a_failure():
    net = Net()
    y0 = Y0.clone().requires_grad_()
    ys = odeint(net, y0, T, **RK4)
    want = (ys.detach(),) + grads_of(ys, y0, net)
    net.fail = raise_after(0.6)
    with pytest.raises(RHSError):
        odeint(net, y0, T, **RK4)
    net.fail = None
    ys = odeint(net, y0, T, **RK4)
    for a, b in zip((ys.detach(),) + grads_of(ys, y0, net), want):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# petsc4py missing or too old: an ImportError at `import pnode` that says what to install.

@pytest.mark.parametrize("fake, words", [
    ("__version__ = '3.20.0'\n", ["pnode needs petsc4py >= 3.21.4, found 3.20.0", "pip install petsc==",
                                  "wrong parameter gradients"]),
    ("raise ImportError('libpetsc.so: cannot open shared object file')\n",
     ["pnode needs petsc4py >= 3.21.4, which is not installed", "pip install petsc4py=="]),
])
def test_import_error_says_what_to_install(tmp_path, fake, words):
    import os
    import subprocess
    import sys
    (tmp_path / "petsc4py").mkdir()
    (tmp_path / "petsc4py" / "__init__.py").write_text(fake)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), root]))
    out = subprocess.run([sys.executable, "-c", "import pnode"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert "ImportError" in out.stderr
    for w in words:
        assert w in out.stderr, out.stderr[-2000:]


class Cube(torch.autograd.Function):
    """x**3 with a backward autograd cannot differentiate again."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, = ctx.saved_tensors
        return 3 * x ** 2 * g


@pytest.mark.parametrize("jacobian", ["blockdiag", "matrix-free"])
@pytest.mark.parametrize("op", ["once_differentiable", "cdist", "torch.compile"])
def test_func_that_is_not_twice_differentiable(jacobian, op):
    """The JVPs of Newton-Krylov differentiate a VJP. torch.cdist raised a bare
    NotImplementedError from inside PETSc; a @once_differentiable backward silently dropped
    its terms from J v, and Newton failed with DIVERGED_MAX_IT and a hint to shrink the step;
    a compiled func's RuntimeError was reported without the fix."""
    c = torch.tensor([[0.5, -1.0], [2.0, 0.3]], dtype=torch.float64)
    f = {"once_differentiable": lambda t, y: -2 * Cube.apply(y) - y,
         "cdist": lambda t, y: -torch.tanh(torch.cdist(y, c)) @ c - 5 * y,
         "torch.compile": lambda t, y: -torch.tanh(y @ c) - 5 * y}[op]
    if op == "torch.compile":
        f = torch.compile(f, backend="aot_eager")   # aot_autograd, without inductor's C++ build
    y0 = torch.tensor([[1.5, -0.5], [0.3, 1.1], [-0.7, 0.2]], dtype=torch.float64)
    t = torch.tensor([0.0, 0.5], dtype=torch.float64)
    opts = {"step_size": 0.1}
    with pytest.raises(RHSError) as info:
        odeint(f, y0, t, method="beuler", options=opts | {"jacobian": jacobian}, adjoint_params=())
    check(info, "func is not twice differentiable", "options['jacobian']='dense'", "forward solve, t=0.1")
    odeint(f, y0, t, method="beuler", options=opts | {"jacobian": "dense"}, adjoint_params=())


@pytest.mark.parametrize("jacobian", ["blockdiag", "matrix-free", "dense"])
def test_func_with_no_derivative(jacobian):
    """torch.igamma has no derivative in its first argument: not a double-backward problem, and
    the 'use dense' advice of one (given here for a while) failed again."""
    a = torch.tensor(2.0, dtype=torch.float64)
    y0 = torch.tensor([[1.5, 0.5], [0.3, 1.1], [0.7, 0.2]], dtype=torch.float64)
    with pytest.raises(RHSError) as info:
        odeint(lambda t, y: -torch.igamma(y, a) - y, y0, T, method="beuler",
               options={"step_size": 0.25, "jacobian": jacobian}, adjoint_params=())
    check(info, "differentiating func raised NotImplementedError", "igamma", "forward solve")
    assert "twice" not in str(info.value)


def test_blockdiag_with_a_0d_state():
    """IndexError from inside PETSc's preconditioner."""
    with pytest.raises(ValueError) as info:
        odeint(minus, torch.tensor(1.0, dtype=torch.float64), T, method="beuler",
               options={"step_size": 0.25, "jacobian": "blockdiag"}, adjoint_params=())
    check(info, "options['jacobian']='blockdiag' needs a batch dimension", "use 'dense'")


@pytest.mark.parametrize("shape, expected", [((8, 3), "blockdiag"), ((8, 1, 16, 16), "blockdiag"),
                                             ((8, 1, 16, 17), "matrix-free"), ((200,), "dense"),
                                             ((300,), "matrix-free"), ((), "dense")])
def test_default_jacobian(shape, expected):
    """blockdiag takes d VJPs per Newton step: for 32x32 images it was 100x slower than matrix-free."""
    config = pnode._options.make_config("beuler", 1e-6, 1e-8, None, None)
    assert config.for_state(torch.zeros(shape, dtype=torch.float64)).jacobian == expected


@pytest.mark.parametrize("petsc_options", [{"pc_type": "jacobi"}, {"pc_type": "none"},
                                           {"ksp_type": "bcgs", "pc_type": "none"}, {"pc_type": "cholesky"}])
def test_dense_jacobian_with_an_approximate_pc_still_solves_exactly(petsc_options):
    """jacobian='dense' runs preonly + LU: a user's pc_type replaced the LU and each linear
    solve was one preconditioner application (gradients 1e-3 off with jacobi, 1e30 with
    none); a user's ksp_type ran at PETSc's default ksp_rtol 1e-5."""
    options = {"step_size": 0.25, "jacobian": "dense"}
    y0 = Y0.clone().requires_grad_()
    ref_net = Net()
    reference = grads_of(NeuralODE(ref_net, method="beuler", options=options)(y0, T), y0, ref_net)
    net = Net()
    got = grads_of(NeuralODE(net, method="beuler", options=options, petsc_options=petsc_options)(y0, T), y0, net)
    for a, b in zip(got, reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("jacobian, pc", [("blockdiag", None), ("matrix-free", None), ("dense", "jacobi")])
def test_preonly_needs_an_exact_preconditioner(jacobian, pc):
    petsc_options = {"ksp_type": "preonly", **({"pc_type": pc} if pc else {})}
    with pytest.raises(ValueError) as info:
        NeuralODE(Net(), method="beuler", options={"step_size": 0.25, "jacobian": jacobian},
                  petsc_options=petsc_options)(Y0.clone().unsqueeze(0) if jacobian == "blockdiag" else Y0, T)
    check(info, "'preonly' applies the preconditioner once", "options['jacobian']='dense'")
    NeuralODE(Net(), method="beuler", options={"step_size": 0.25, "jacobian": "dense"},
              petsc_options={"ksp_type": "preonly", "pc_type": "lu"})(Y0, T)   # LU: exact


def test_theta_from_a_tensor_or_numpy():
    """rtol and step_size took 0-d tensors; theta said 'must be in (0, 1], got tensor(0.5000)'."""
    import numpy as np
    ys = [NeuralODE(Net(), method="theta", options={"theta": theta, "step_size": 0.25})(Y0, T)
          for theta in (0.5, torch.tensor(0.5), np.float32(0.5))]
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])
    with pytest.raises(ValueError, match=r"options\['theta'\] must be in \[1e-06, 1\]"):
        NeuralODE(Net(), method="theta", options={"theta": torch.tensor(True)})


class _Cubic(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = nn.Linear(3, 3).double()
        with torch.no_grad():
            for p in self.lin.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        self.k = nn.Parameter(torch.tensor([2.0, 10.0, 40.0], dtype=torch.float64))

    def forward(self, t, y):
        return torch.tanh(self.lin(y)) * (1 + t) - self.k * y - 0.5 * y ** 3


@pytest.mark.parametrize("petsc_options", [{"snes_type": "qn"}, {"snes_linesearch_type": "cp"}])
def test_a_nonlinear_solver_other_than_newton_converges_on_its_residual(petsc_options):
    """PETSc's step test (snes_stol) ended qn's solves after a step that left the residual
    as it was: the solution came out 6% off, the gradients 20%, without a word."""
    y0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_()
    t = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)
    options = {"step_size": 0.05, "jacobian": "dense"}
    func = _Cubic()
    reference = odeint(func, y0, t, method="beuler", options=options)
    ys = odeint(func, y0, t, method="beuler", options=options, petsc_options=petsc_options)
    torch.testing.assert_close(ys, reference, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads_of(ys, y0, func), grads_of(reference, y0, func)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_lagged_jacobian_is_fine_for_explicit_methods_and_ksponly_warns():
    NeuralODE(Net(), method="rk4", options={"step_size": 0.25}, petsc_options={"snes_lag_jacobian": 2})(Y0, T)
    with pytest.warns(UserWarning, match="'ksponly' takes one Newton step per stage: exact when func is linear"):
        NeuralODE(Net(), method="beuler", options={"step_size": 0.25}, petsc_options={"snes_type": "ksponly"})


@pytest.mark.parametrize("pc", ["sor", "eisenstat"])
def test_preconditioner_without_a_transpose_is_refused_before_the_forward(pc):
    """PETSc failed in the backward, after the whole forward ('Can only apply transpose of SOR
    if matrix is symmetric')."""
    with pytest.raises(ValueError) as info:
        NeuralODE(Net(), method="beuler", options={"step_size": 0.25, "jacobian": "dense"},
                  petsc_options={"pc_type": pc})(Y0, T)
    check(info, f"petsc_options['pc_type']={pc!r} cannot be applied transposed")
