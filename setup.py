"""Packaging for pnode: neural ODEs in PyTorch with PETSc's TS solvers (petsc4py).

PETSc, petsc4py and mpi4py need system MPI/BLAS and a compiler; the supported
way to set everything up is ``scripts/setup.sh`` (run by ``make setup``).
"""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(HERE, "pnode", "_version.py"), encoding="utf-8") as fh:
        match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", fh.read(), re.M)
    if match is None:
        raise RuntimeError("cannot find __version__ in pnode/_version.py")
    return match.group(1)


def read_long_description():
    path = os.path.join(HERE, "README.md")
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as fh:
        return fh.read()


setup(
    name="pnode",
    version=read_version(),
    description="Neural ODEs in PyTorch trained with PETSc TS time integrators and adjoints (petsc4py)",
    long_description=read_long_description(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pnode", "pnode.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch",
        "numpy",
        "petsc4py>=3.21.4",
        "mpi4py",
    ],
    extras_require={
        # torchdiffeq is only the comparison baseline of the tests and benchmark
        "test": ["pytest", "torchdiffeq", "tqdm", "matplotlib", "scikit-learn"],
        "examples": ["matplotlib", "tqdm", "scikit-learn"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Mathematics",
        "Intended Audience :: Science/Research",
    ],
    zip_safe=False,
)
