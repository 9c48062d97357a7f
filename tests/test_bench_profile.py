"""The benchmark's profile split (scripts/_profile_split.py): each sample lands in the right category.

The split is how the README says where pnode's time goes, so a renamed function in
pnode (the engine call, the ts.solve call) must fail here rather than silently move
time into "glue". The stacks below are in py-spy's raw format, as recorded.
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import _profile_split as ps  # noqa: E402

BASE = "<module> (bench_gradients.py:680);main (bench_gradients.py:640);profile_worker (bench_gradients.py:492);" \
       "fwd_bwd (bench_gradients.py:170)"
FWD = BASE + ";_forward (bench_gradients.py:158);Module._wrapped_call_impl (torch/nn/modules/module.py:1778);" \
             "NeuralODE.forward (pnode/_odeint.py:162);Run.forward (pnode/_bridge.py:60);" \
             "Solver.forward (pnode/_solver.py:296);Solver._run (pnode/_solver.py:419)"
BWD = BASE + ";_backward (bench_gradients.py:162);Tensor.backward (torch/_tensor.py:623);" \
             "_engine_run_backward (torch/autograd/graph.py:979)"
PN_BWD = BWD + ";PnodeFunction.backward (pnode/_bridge.py:139);Solver.backward (pnode/_solver.py:395);" \
               "Solver._run (pnode/_solver.py:419)"
F = ";Solver.rhs_function (pnode/_solver.py:118);RHS.evaluate (pnode/_rhs.py:250);" \
    "Counted.forward (bench_gradients.py:118);Linear.forward (torch/nn/modules/linear.py:134)"


@pytest.mark.parametrize("stack, expected", [
    (FWD + F, ("forward", "f")),
    (FWD, ("forward", "PETSc")),
    (FWD + ";Solver.rhs_function (pnode/_solver.py:118);Staging.to_petsc (pnode/_staging.py:50)", ("forward", "glue")),
    (PN_BWD + ";ExplicitJacobian.multTranspose (pnode/_shells.py:65);RHS.vjp (pnode/_rhs.py:302);"
              "_vjp (pnode/_rhs.py:41)", ("backward", "VJPs")),
    (PN_BWD, ("backward", "PETSc")),
    (PN_BWD + ";ParamJacobian.multTranspose (pnode/_shells.py:119);RHS.write_params (pnode/_rhs.py:383)",
     ("backward", "glue")),
    (PN_BWD + F, ("backward", "f")),   # memory="states" evaluates f again in the backward
    (BWD, ("backward", "torch autograd")),
    (BASE + ";_forward (bench_gradients.py:158);odeint (torchdiffeq/_impl/odeint.py:80);"
            "rk4_alt_step_func (torchdiffeq/_impl/rk_common.py:116)", ("forward", "torchdiffeq")),
    (BASE + ";_forward (bench_gradients.py:158);odeint (torchdiffeq/_impl/odeint.py:80);"
            "_PerturbFunc.forward (torchdiffeq/_impl/misc.py:197);Counted.forward (bench_gradients.py:118)",
     ("forward", "f")),
    (BASE, None),                                   # between the timed calls
    ("<module> (bench_gradients.py:680);_find_and_load (<frozen importlib._bootstrap>:1176)", None),
])
def test_classify(stack, expected):
    assert ps.classify(stack.split(";")) == expected


def test_tally_and_report():
    raw = [f"{FWD + F} 60\n", f"{FWD} 5\n", f"{PN_BWD};_vjp (pnode/_rhs.py:41) 30\n", f"{BASE} 7\n", "\n"]
    counts = ps.tally(raw)
    assert counts == {("forward", "f"): 60, ("forward", "PETSc"): 5, ("backward", "VJPs"): 30}
    lines = ps.report("pnode graphs, float64", 0.190, counts)
    assert lines[0] == "- pnode graphs, float64: 190.0 ms per forward+backward unprofiled, 95 samples"
    assert lines[1] == "  - forward 130.0 ms: f 120.0 ms (63%), PETSc 10.0 ms (5%)"
    assert lines[2] == "  - backward 60.0 ms: VJPs 60.0 ms (32%)"


@pytest.mark.skipif(ps.py_spy() is None, reason="py-spy not installed (scripts/setup.sh installs it)")
def test_profile_of_a_real_run():
    """py-spy on the benchmark's worker: pnode's real frames fill every category.

    A renamed engine call or ts.solve wrapper in pnode would move its time into "glue".
    """
    argv = [sys.executable, os.path.join(ROOT, "scripts", "bench_gradients.py"),
            "--profile-worker", "float64:pnode graphs", "--reps", "2"]
    try:
        seconds, counts = ps.profile(argv)
    except RuntimeError as exc:
        # A container without CAP_SYS_PTRACE; any other py-spy failure is a failure.
        if "permission denied" in str(exc).lower() or "operation not permitted" in str(exc).lower():
            pytest.skip(f"py-spy may not attach to processes here: {exc}")
        raise
    total = sum(counts.values())
    share = {key: n / total for key, n in counts.items()}
    assert seconds > 0 and total > 100
    assert set(counts) <= {("forward", c) for c in ("f", "PETSc", "glue")} | \
        {("backward", c) for c in ("VJPs", "PETSc", "glue", "torch autograd")}, counts
    assert share["forward", "f"] > 0.2 and share["backward", "VJPs"] > 0.2, share
    assert share["forward", "PETSc"] > 0 and share["backward", "PETSc"] > 0, share
    assert share["forward", "glue"] + share["backward", "glue"] < 0.3, share
