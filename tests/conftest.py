"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests' matrices are small: extra BLAS threads only add overhead, and on a busy
    2-core machine two threads wait on each other many times longer than one computes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
