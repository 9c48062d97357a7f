"""Test-session settings shared by every test file."""

import torch

# CI machines have 2 cores and some tests launch 2 MPI ranks: one intra-op thread per
# process avoids oversubscription, which makes tiny LAPACK calls a thousand times slower.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s (CI still runs it)")
    config.addinivalue_line("markers", "mpi: launches mpiexec -n 2")
