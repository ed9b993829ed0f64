"""lora_edu.repro: one seed makes Python, NumPy and PyTorch draw the same numbers."""

import random

import numpy as np
import pytest
import torch

from lora_edu.repro import DEFAULT_SEED, configure_deterministic_mode, get_device, seed_all


def _draws() -> tuple[float, np.ndarray, torch.Tensor]:
    return random.random(), np.random.rand(4), torch.rand(4)


def test_same_seed_same_draws_from_all_three_generators():
    seed_all(123)
    first = _draws()
    seed_all(123)
    second = _draws()
    assert first[0] == second[0]
    np.testing.assert_array_equal(first[1], second[1])
    assert torch.equal(first[2], second[2])


def test_different_seeds_differ_in_every_generator():
    seed_all(1)
    a = _draws()
    seed_all(2)
    b = _draws()
    assert a[0] != b[0]
    assert not np.array_equal(a[1], b[1])
    assert not torch.equal(a[2], b[2])


def test_returns_the_seed_and_defaults_to_1992():
    assert seed_all() == DEFAULT_SEED == 1992
    assert seed_all(np.uint32(7)) == 7


def test_seed_torch_false_leaves_torch_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    seed_all(99, seed_torch=False)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("seed", [-1, 2**32, 10**20])
def test_seed_outside_unsigned_32_bit_range_raises(seed):
    with pytest.raises(ValueError, match=r"unsigned 32-bit range \[0, 4294967295\]"):
        seed_all(seed)


@pytest.mark.parametrize("seed", [1.5, "42", None, True])
def test_non_integer_seed_raises_type_error(seed):
    with pytest.raises(TypeError, match="seed must be an int"):
        seed_all(seed)


def test_boundaries_of_the_range_are_accepted():
    assert seed_all(0) == 0
    assert seed_all(2**32 - 1) == 2**32 - 1


def test_deterministic_mode_is_switched_on():
    configure_deterministic_mode()
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark is False


def test_get_device_is_a_usable_device():
    device = get_device()
    assert device.type in {"cuda", "mps", "cpu"}
    assert torch.zeros(1, device=device).device.type == device.type
