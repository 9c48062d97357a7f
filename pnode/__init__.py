"""pnode: neural ODEs trained with PETSc time integrators and PETSc's discrete adjoint.

Public surface: :func:`odeint` (alias :func:`odeint_adjoint`), :class:`NeuralODE`,
:class:`Grid` (one state spread over MPI ranks), :class:`Stats`, the method table :data:`METHODS`,
:data:`petsc_dtype` (the precision PETSc was built in), and the exceptions.
"""

from . import _petsc  # noqa: F401  (version check and PETSc initialisation come first)
from ._errors import NonFiniteError, PnodeError, RHSError, SolverError
from ._grid import Grid
from ._methods import METHODS
from ._odeint import NeuralODE, odeint, odeint_adjoint
from ._petsc import DTYPE as petsc_dtype  # torch.float64, or float32 for a single-precision PETSc
from ._stats import Stats
from ._version import __version__

__all__ = ["odeint", "odeint_adjoint", "NeuralODE", "Grid", "Stats", "METHODS", "PnodeError",
           "SolverError", "NonFiniteError", "RHSError", "petsc_dtype", "__version__"]
