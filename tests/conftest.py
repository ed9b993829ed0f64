"""Shared test settings."""

import importlib
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests' matrices are small: extra BLAS threads only add overhead, and on a busy
    2-core machine two threads wait on each other many times longer than one computes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def import_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (benchmarks/ is on the path while it imports, for
    its ``_provenance`` import), so that tests can call its functions without running it."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))
