"""Run under `mpiexec -n 3`: a grid of 5 points with stencil width 2 leaves one rank a
block of 1 point (and a grid of 2 points one of none). PETSc found that on that rank alone, inside the DMDA's creation, and the
other ranks waited there forever; every rank must get the ValueError and go on. A 3-D grid
of one periodic plane, which PETSc lays out with a stencil wider than the plane, must still
build."""

import pnode
from pnode._petsc import PETSc

rank = PETSc.COMM_WORLD.getRank()
try:
    pnode.Grid((5,), dof=1, stencil_width=2)
except ValueError as exc:
    print(f"rank {rank}: ValueError {exc}", flush=True)
try:   # 2 points on 3 ranks: an empty block, which odeint then refused on that rank alone (a hang)
    pnode.Grid((2,), dof=1, stencil_width=0)
except ValueError as exc:
    print(f"rank {rank}: ValueError {exc}", flush=True)
PETSc.COMM_WORLD.barrier()
print(f"rank {rank}: past the barrier", flush=True)
plane = pnode.Grid((1, 6, 9), dof=1, stencil_width=2)
print(f"rank {rank}: built a plane, ghosted block {plane.ghosted_shape}", flush=True)
