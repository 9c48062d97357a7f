"""The method table: user-facing method names mapped to PETSc TS types.

Only TS types with a discrete adjoint in PETSc are listed (TSRK, TSTHETA and
TSARKIMEX); PETSc's euler, ssp, rosw, bdf, glee and alpha have no TSAdjoint,
so ``euler`` is PETSc's one-stage RK tableau ``1fe``.
"""

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Method:
    name: str
    ts_type: str          # PETSc TSType
    subtype: Optional[str]  # RK / ARKIMEX tableau name, None for theta methods
    order: int
    kind: str             # "explicit", "implicit" or "imex"
    embedded: bool        # has an error estimator (theta: PETSc's LTE estimate), so adaptive steps work
    theta: Optional[float] = None
    endpoint: bool = False
    description: str = ""
    stages: int = 2       # stage vectors PETSc's trajectory keeps per step


_RK_STAGES = {'1fe': 1, '2a': 2, '2b': 2, '3': 3, '3bs': 4, '4': 4, '5f': 6, '5dp': 7, '5bs': 8, '6vr': 9, '7vr': 10, '8vr': 13}
_ARKIMEX_STAGES = {'1bee': 3, 'ars122': 2, 'a2': 2, 'l2': 2, '2c': 3, '2d': 3, '2e': 3, 'prssp2': 3, '3': 4, 'ars443': 5, 'bpr3': 5, '4': 6, '5': 8}


def _rk(name, subtype, order, embedded, description):
    return Method(name, "rk", subtype, order, "explicit", embedded, description=description,
                  stages=_RK_STAGES[subtype])


def _imex(name, subtype, order, description, embedded=True):
    return Method(name, "arkimex", subtype, order, "imex", embedded, description=description,
                  stages=_ARKIMEX_STAGES[subtype])


_TABLE = [
    _rk("euler", "1fe", 1, False, "forward Euler"),
    _rk("midpoint", "2b", 2, False, "explicit midpoint"),
    _rk("heun", "2a", 2, True, "Heun (explicit trapezoid) with embedded Euler"),
    _rk("rk2", "2a", 2, True, "alias of heun"),
    _rk("rk3", "3", 3, False, "PETSc's three-stage third-order RK (c = 0, 2/3, 2/3; b = 1/4, 1/2, 1/4)"),
    _rk("bosh3", "3bs", 3, True, "Bogacki-Shampine 3(2), FSAL"),
    _rk("rk4", "4", 4, False, "classical fourth-order Runge-Kutta"),
    _rk("fehlberg5", "5f", 5, True, "Fehlberg 5(4)"),
    _rk("dopri5", "5dp", 5, True, "Dormand-Prince 5(4), FSAL"),
    _rk("bs5", "5bs", 5, True, "Bogacki-Shampine 5(4), FSAL"),
    _rk("verner6", "6vr", 6, True, "Verner 6(5), FSAL"),
    _rk("verner7", "7vr", 7, True, "Verner 7(6)"),
    _rk("verner8", "8vr", 8, True, "Verner 8(7)"),
    Method("beuler", "theta", None, 1, "implicit", True, theta=1.0,
           description="backward Euler (theta = 1)"),
    Method("cn", "theta", None, 2, "implicit", True, theta=0.5, endpoint=True,
           description="Crank-Nicolson (theta = 0.5, endpoint form)"),
    Method("theta", "theta", None, 2, "implicit", True, theta=0.5,
           description="theta method (midpoint form), theta set by options['theta']"),
    _imex("arkimex", "3", 3, "ARKIMEX with PETSc's default tableau 3 (Kennedy-Carpenter ARK3(2)4L[2]SA)"),
    _imex("arkimex-1bee", "1bee", 1, "ARKIMEX 1bee: backward Euler + extrapolation (PETSc registers order 2; it converges at order 1)"),
    _imex("arkimex-a2", "a2", 2, "ARKIMEX a2"),
    _imex("arkimex-l2", "l2", 2, "ARKIMEX l2 (L-stable)"),
    _imex("arkimex-ars122", "ars122", 2, "ARKIMEX ars122 (Ascher-Ruuth-Spiteri)"),
    _imex("arkimex-2c", "2c", 2, "ARKIMEX 2c"),
    _imex("arkimex-2d", "2d", 2, "ARKIMEX 2d"),
    _imex("arkimex-2e", "2e", 2, "ARKIMEX 2e"),
    _imex("arkimex-prssp2", "prssp2", 2, "ARKIMEX prssp2 (no error estimator: fixed steps)", embedded=False),
    _imex("arkimex-3", "3", 3, "ARKIMEX 3 (Kennedy-Carpenter ARK3(2)4L[2]SA)"),
    _imex("arkimex-bpr3", "bpr3", 3, "ARKIMEX bpr3 (no error estimator: fixed steps; its explicit part as PETSc registers it is first order)", embedded=False),
    _imex("arkimex-ars443", "ars443", 3, "ARKIMEX ars443 (no error estimator: fixed steps)", embedded=False),
    _imex("arkimex-4", "4", 4, "ARKIMEX 4 (Kennedy-Carpenter ARK4(3)6L[2]SA)"),
    _imex("arkimex-5", "5", 5, "ARKIMEX 5 (Kennedy-Carpenter ARK5(4)8L[2]SA)"),
]

METHODS = {m.name: m for m in _TABLE}


def get_method(name):
    """Look a method up by name; unknown names are an error, never a fallback."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, got {type(name).__name__}; "
                        f"valid methods: {', '.join(METHODS)}")
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}") from None
