"""Reproducibility: one seed for every random number generator, and device selection.

Every chapter starts with ``seed_all()`` so that its numbers, tables and figures are the
same each time the book is built. Bit-for-bit equality is only promised on the same
hardware and library versions; on a GPU some kernels have no deterministic variant, and
``configure_deterministic_mode`` asks PyTorch to warn about those rather than fail.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["DEFAULT_SEED", "seed_all", "configure_deterministic_mode", "get_device"]

#: The seed every chapter uses unless it says otherwise.
DEFAULT_SEED = 1992

_SEED_MAX = 2**32 - 1  # NumPy's legacy seeding accepts exactly the unsigned 32-bit range


def seed_all(seed: int = DEFAULT_SEED, seed_torch: bool = True,
             set_torch_deterministic: bool = True) -> int:
    """Seed Python's ``random``, NumPy and PyTorch (CPU and every CUDA device).

    Args:
        seed: an integer in ``[0, 2**32 - 1]``.
        seed_torch: also seed PyTorch's generators.
        set_torch_deterministic: also call :func:`configure_deterministic_mode`.

    Returns:
        The seed, so that a chapter can print what it used.

    Raises:
        TypeError: if ``seed`` is not an integer (``bool`` is refused too).
        ValueError: if ``seed`` lies outside the unsigned 32-bit range.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int in [0, {_SEED_MAX}], got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed <= _SEED_MAX:
        raise ValueError(f"seed must lie in the unsigned 32-bit range [0, {_SEED_MAX}], "
                         f"got {seed}")
    random.seed(seed)
    np.random.seed(seed)
    # Hash randomisation only affects processes started after this point (e.g. workers).
    os.environ["PYTHONHASHSEED"] = str(seed)
    if seed_torch:
        torch.manual_seed(seed)  # seeds the CPU generator and every CUDA device's
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)
    if set_torch_deterministic:
        configure_deterministic_mode()
    return seed


def configure_deterministic_mode() -> None:
    """Ask PyTorch for deterministic kernels.

    cuDNN's auto-tuner is switched off (it picks kernels by timing, which varies between
    runs), and ``torch.use_deterministic_algorithms(True, warn_only=True)`` makes
    operations without a deterministic implementation warn instead of raise. cuBLAS needs
    ``CUBLAS_WORKSPACE_CONFIG`` set before its first use to be deterministic.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def get_device() -> torch.device:
    """The best device this runtime has: CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
