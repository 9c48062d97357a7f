"""Run under `mpiexec -n 3`: a grid of 5 points with stencil width 2 leaves one rank a
block of 1 point. PETSc found that on that rank alone, inside the DMDA's creation, and the
other ranks waited there forever; every rank must get the ValueError and go on."""

import pnode
from pnode._petsc import PETSc

rank = PETSc.COMM_WORLD.getRank()
try:
    pnode.Grid((5,), dof=1, stencil_width=2)
except ValueError as exc:
    print(f"rank {rank}: ValueError {exc}", flush=True)
PETSc.COMM_WORLD.barrier()
print(f"rank {rank}: past the barrier", flush=True)
