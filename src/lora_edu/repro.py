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

__all__ = ["DEFAULT_SEED", "DEVICE_ENV", "configure_deterministic_mode", "get_device",
           "seed_all"]

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


#: Environment variable that overrides :func:`get_device`'s choice ("cpu", "cuda" or "mps").
DEVICE_ENV = "LORA_EDU_DEVICE"

_DEVICE_TYPES = ("cuda", "mps", "cpu")


def _available(kind: str) -> bool:
    """Whether this runtime can compute on ``kind`` ("cuda", "mps" or "cpu")."""
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)  # absent from some minimal builds
        return mps is not None and mps.is_available()
    return True


def get_device() -> torch.device:
    """The device the chapters compute on: CUDA, then Apple's MPS, then the CPU.

    Set the environment variable ``LORA_EDU_DEVICE`` to ``cpu``, ``cuda`` or ``mps`` to choose
    instead (for example ``cpu`` on a Mac, to run a chapter exactly as the book was built).

    The book runs on all three, under one rule. MPS has no float64, so float64 work stays on
    the CPU: create float64 tensors without ``device=`` and never move them to this device
    (cast to float32 first). Tensors that meet in one operation are on one device.
    ``tests/test_repro.py`` scans every chapter's code for float64 sent to the device.

    Raises:
        ValueError: ``LORA_EDU_DEVICE`` names an unknown device type, or one this runtime
            does not have.
    """
    wanted = os.environ.get(DEVICE_ENV, "").strip().lower()
    if wanted:
        if wanted not in _DEVICE_TYPES:
            raise ValueError(f"{DEVICE_ENV}={wanted!r} is not a device type: use one of "
                             f"{', '.join(_DEVICE_TYPES)}, or unset it to choose automatically")
        if not _available(wanted):
            raise ValueError(f"{DEVICE_ENV}={wanted!r}, but this runtime has no {wanted} "
                             f"device: unset {DEVICE_ENV} or set it to cpu")
        return torch.device(wanted)
    for kind in _DEVICE_TYPES:
        if _available(kind):
            return torch.device(kind)
    return torch.device("cpu")  # unreachable: the CPU is always available
