"""The linear algebra of low rank: rank, the SVD, the best rank-r approximation, factorisation.

Notation follows the LoRA paper (Hu et al., 2022): a weight matrix ``W ∈ R^{d×k}`` (``d`` rows,
``k`` columns), and a rank-``r`` product ``B A`` with ``B ∈ R^{d×r}`` and ``A ∈ R^{r×k}``.
The singular value decomposition is ``W = U diag(σ) Vᵀ`` with ``σ_1 ≥ σ_2 ≥ … ≥ 0``.

Every function accepts a 2-D ``torch.Tensor`` or ``numpy.ndarray`` of real floating point
numbers and returns torch objects (or plain Python numbers). Bad input raises a
``TypeError``/``ValueError`` that names the argument, what was wrong and how to fix it, before
anything is computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence, Union

import numpy as np
import torch

__all__ = [
    "MatrixLike",
    "as_matrix",
    "exact_rank",
    "singular_values",
    "default_tolerance",
    "numerical_rank",
    "truncated_svd",
    "low_rank_approx",
    "eckart_young_error",
    "energy_curve",
    "rank_for_energy",
    "Factorisation",
    "factorisation_loss",
    "init_factors",
    "factorise",
    "dense_params",
    "lora_params",
    "lora_paper_params",
]

MatrixLike = Union[torch.Tensor, np.ndarray]
Norm = Literal["fro", "spectral"]


# --------------------------------------------------------------------------- validation

def as_matrix(W: MatrixLike, name: str = "W") -> torch.Tensor:
    """Check that ``W`` is a finite, real, floating-point 2-D matrix and return it as a tensor.

    NumPy arrays are wrapped without copying (``float64`` stays ``float64``).

    Raises:
        TypeError: ``W`` is not a tensor/array, or its dtype is not a real floating type
            (integers are refused because the SVD is only defined in floating point).
        ValueError: ``W`` is not 2-D, is empty, or holds NaN or Inf.
    """
    if isinstance(W, np.ndarray):
        if not np.issubdtype(W.dtype, np.floating):
            raise TypeError(f"{name} must hold real floating-point numbers, got NumPy dtype "
                            f"{W.dtype}; convert it first, e.g. {name}.astype(np.float64)")
        W = torch.from_numpy(W)
    elif not isinstance(W, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got "
                        f"{type(W).__name__}; wrap it with torch.tensor(..., dtype=torch.float64)")
    if not W.is_floating_point():
        raise TypeError(f"{name} must have a real floating dtype (float32 or float64), got "
                        f"{W.dtype}; convert it first, e.g. {name}.double()")
    if W.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix (d×k), got {W.ndim} dimension(s) with "
                         f"shape {tuple(W.shape)}; reshape it or pass one matrix at a time")
    if W.numel() == 0:
        raise ValueError(f"{name} must have at least one row and one column, got shape "
                         f"{tuple(W.shape)}")
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{name} contains NaN or Inf entries; rank and SVD are undefined for "
                         f"them: clean or mask the matrix first")
    return W


def _check_rank(r: int, W: torch.Tensor, name: str = "r", minimum: int = 1) -> int:
    """``r`` must be an int in ``[minimum, min(d, k)]``.

    ``minimum`` is 0 for the truncated SVD (``W_0 = 0``) and 1 for a factor pair to train; a
    d×k matrix has no rank above ``min(d, k)``.
    """
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(r).__name__}")
    limit = min(W.shape)
    if not minimum <= int(r) <= limit:
        raise ValueError(f"{name} must satisfy {minimum} <= {name} <= min(d, k) = {limit} for a "
                         f"{W.shape[0]}×{W.shape[1]} matrix, got {name}={r}; no rank exceeds "
                         f"min(d, k)" + (", and a factor pair needs at least one column"
                                         if minimum == 1 else "")
                         + f", so pick {name} in that range")
    return int(r)


def _check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


def _check_positive_float(value: float, name: str, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not (ok and math.isfinite(value)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return value


# --------------------------------------------------------------------------- rank

def exact_rank(W: MatrixLike | list[list[int]]) -> int:
    """The rank of a matrix of integers or exact fractions, by exact row reduction (SymPy).

    No tolerance is involved, so this is the rank of the blackboard. Floating-point matrices
    are refused: their "exact" rank is an artefact of rounding; use :func:`numerical_rank`.
    """
    import sympy  # imported here: only chapter 1 needs exact arithmetic

    if isinstance(W, torch.Tensor):
        if W.is_floating_point() or W.is_complex():
            raise TypeError(f"W must hold integers for an exact rank, got {W.dtype}; "
                            "use numerical_rank(W) for floating-point matrices")
        W = W.tolist()
    elif isinstance(W, np.ndarray):
        if not np.issubdtype(W.dtype, np.integer):
            raise TypeError(f"W must hold integers for an exact rank, got {W.dtype}; "
                            "use numerical_rank(W) for floating-point matrices")
        W = W.tolist()
    M = sympy.Matrix(W)
    if any(isinstance(x, sympy.Float) for x in M):
        raise TypeError("W must hold integers or sympy.Rational entries for an exact rank; "
                        "use numerical_rank(W) for floating-point matrices")
    return int(M.rank())


def singular_values(W: MatrixLike) -> torch.Tensor:
    """The singular values ``σ_1 ≥ … ≥ σ_min(d,k) ≥ 0`` of ``W`` (shape ``(min(d, k),)``)."""
    return torch.linalg.svdvals(as_matrix(W))


def default_tolerance(W: MatrixLike, sigma: torch.Tensor | None = None) -> float:
    """The tolerance below which a singular value counts as zero: ``τ = σ_1 · max(d, k) · ε``.

    ``ε`` is the machine epsilon of ``W``'s dtype (``W`` is d×k, ``σ_1 = ‖W‖₂``). This is the
    rule of NumPy's ``matrix_rank`` and of ``torch.linalg.matrix_rank``. Why it works: the
    SVD is backward stable, so the singular values it returns are the exact singular values
    of ``W + E`` for some ``E`` with ``‖E‖₂ ≤ c · ε · σ_1``, ``c`` a modest function of ``d``
    and ``k``; and Weyl's inequality ``|σ_i(W + E) − σ_i(W)| ≤ ‖E‖₂`` (for every ``i``) bounds
    how far that moves each singular value. A matrix of exact rank ``r`` therefore comes back
    with ``σ_{r+1}, σ_{r+2}, … ≤ c · ε · σ_1``; ``τ`` takes ``c = max(d, k)``.
    """
    W = as_matrix(W)
    s = torch.linalg.svdvals(W) if sigma is None else sigma
    return float(s.max()) * max(W.shape) * torch.finfo(W.dtype).eps


def numerical_rank(W: MatrixLike, tol: float | None = None) -> int:
    """The number of singular values of ``W`` (d×k) strictly above ``tol``.

    Args:
        W: a real floating-point matrix, ``d×k``.
        tol: an absolute threshold ``≥ 0``; ``None`` uses :func:`default_tolerance`
            (``σ_max · max(d, k) · ε``, as ``numpy.linalg.matrix_rank`` does).

    Returns:
        ``#{i : σ_i > tol}``, an integer in ``[0, min(d, k)]``.
    """
    W = as_matrix(W)
    if tol is not None:
        tol = _check_positive_float(tol, "tol", allow_zero=True)
    s = torch.linalg.svdvals(W)
    threshold = default_tolerance(W, s) if tol is None else tol
    return int((s > threshold).sum())


# --------------------------------------------------------------------------- SVD

def truncated_svd(W: MatrixLike, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-r part of the SVD: ``U_r`` (d×r), ``σ_{1..r}`` (r,), ``V_rᵀ`` (r×k).

    ``W_r = U_r diag(σ_{1..r}) V_rᵀ`` is a best rank-r approximation of ``W`` (see
    :func:`low_rank_approx` for when it is the only one).
    """
    W = as_matrix(W)
    r = _check_rank(r, W, minimum=0)   # r = 0: empty factors, W_0 = 0
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r], S[:r], Vh[:r, :]


def low_rank_approx(W: MatrixLike, r: int) -> torch.Tensor:
    """A best rank-r approximation ``W_r = Σ_{i≤r} σ_i u_i v_iᵀ`` of ``W`` (d×k → d×k).

    Best in every unitarily invariant norm (Eckart–Young–Mirsky): ``‖W − M‖ ≥ ‖W − W_r‖ =
    ‖diag(σ_{r+1}, …)‖`` for every ``M`` of rank ≤ r, in particular ``‖W − W_r‖_F² =
    Σ_{i>r} σ_i²``, ``‖W − W_r‖₂ = σ_{r+1}`` and ``‖W − W_r‖_* = Σ_{i>r} σ_i`` (nuclear).
    In the Frobenius norm it is the only minimiser exactly when ``σ_r > σ_{r+1}`` or
    ``σ_{r+1} = 0`` (then ``W_r = W``); in the spectral norm it is never the only one once
    ``σ_{r+1} > 0``. Under a tie ``σ_r = σ_{r+1} > 0`` the SVD routine picks one of many.
    ``r = 0`` gives the zero matrix, the only matrix of rank 0 (``0 ≤ r ≤ min(d, k)``).
    """
    U, S, Vh = truncated_svd(W, r)
    return (U * S) @ Vh  # scales column i of U by σ_i, without forming diag(σ)


def eckart_young_error(W: MatrixLike, r: int, norm: Norm = "fro") -> float:
    """The smallest possible error of a rank-r approximation, read off the singular values.

    ``norm="fro"``: ``‖W − W_r‖_F = sqrt(Σ_{i>r} σ_i²)``; ``norm="spectral"``:
    ``‖W − W_r‖₂ = σ_{r+1}`` (0 when ``r = min(d, k)``). Note the Frobenius value is the
    norm, not its square.
    """
    if norm not in ("fro", "spectral"):
        raise ValueError(f"norm must be 'fro' or 'spectral', got {norm!r}")
    W = as_matrix(W)
    r = _check_rank(r, W, minimum=0)   # r = 0: the error of M = 0, the whole norm
    s = torch.linalg.svdvals(W).double()  # sum the tail in float64: it may be tiny
    tail = s[r:]
    if norm == "spectral":
        return float(tail[0]) if tail.numel() else 0.0
    return float(tail.square().sum().sqrt())


def energy_curve(W: MatrixLike) -> torch.Tensor:
    """The fraction of ``‖W‖_F² = Σ σ_i²`` kept by the best rank-r approximation, r = 1…min(d,k).

    Entry ``r−1`` is ``Σ_{i≤r} σ_i² / Σ_i σ_i²`` (a float64 CPU tensor of shape
    ``(min(d, k),)``, ending at 1).
    """
    # a short vector: summed on the CPU, where cumsum is deterministic and exact in float64
    s2 = singular_values(W).cpu().double().square()
    total = s2.sum()
    if total == 0:
        raise ValueError("W is the zero matrix: its energy is 0, so no fraction is defined")
    return s2.cumsum(0) / total


def rank_for_energy(W: MatrixLike, fraction: float = 0.9) -> int:
    """The smallest r whose best rank-r approximation keeps ``fraction`` of ``‖W‖_F²``."""
    fraction = _check_positive_float(fraction, "fraction")
    if fraction > 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    curve = energy_curve(W)
    # a tiny slack so that fraction=1.0 is reached despite rounding in the cumulative sum
    return int(torch.searchsorted(curve, torch.tensor(fraction - 1e-12, dtype=curve.dtype))) + 1


# --------------------------------------------------------------------------- factorisation

@dataclass
class Factorisation:
    """The result of :func:`factorise`: ``B`` (d×r), ``A`` (r×k) and the loss after each step.

    ``losses[0]`` is the loss at the initialisation, ``losses[t]`` after ``t`` steps, with
    ``loss = ½‖BA − W‖_F²``. ``floor`` is the Eckart–Young optimum ``½ Σ_{i>r} σ_i²``.
    ``snapshots[t]`` is ``(B, A)`` after ``t`` steps, for the steps asked for.
    """

    B: torch.Tensor
    A: torch.Tensor
    losses: list[float] = field(repr=False)
    floor: float
    snapshots: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict,
                                                                   repr=False)

    @property
    def product(self) -> torch.Tensor:
        """``BA`` (d×k)."""
        return self.B @ self.A


def factorisation_loss(B: torch.Tensor, A: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``½‖BA − W‖_F²`` for ``B`` (d×r), ``A`` (r×k), ``W`` (d×k); its gradients are
    ``∂/∂B = (BA − W)Aᵀ`` and ``∂/∂A = Bᵀ(BA − W)``."""
    return 0.5 * (B @ A - W).square().sum()


def init_factors(d: int, k: int, r: int, init: Literal["lora", "small", "zero"] = "lora",
                 scale: float = 1.0, seed: int = 0, dtype: torch.dtype = torch.float32,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Starting factors ``B`` (d×r) and ``A`` (r×k) for :func:`factorise`.

    ``"lora"``: ``B = 0`` and ``A ~ U(−s/√k, s/√k)`` (PEFT's ``kaiming_uniform_(a=√5)`` for
    ``s = 1``), so ``BA = 0`` yet ``∇_B ≠ 0``. ``"small"``: both ``N(0, s²)``. ``"zero"``:
    ``A = B = 0``, a stationary point. ``seed`` drives a private generator, so the global
    random state is left alone.
    """
    d, k, r = (_check_positive_int(v, n) for v, n in ((d, "d"), (k, "k"), (r, "r")))
    scale = _check_positive_float(scale, "scale", allow_zero=True)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if init == "lora":
        A = (torch.rand(r, k, generator=gen, dtype=dtype) * 2 - 1) * scale / math.sqrt(k)
        return torch.zeros(d, r, dtype=dtype), A
    if init == "small":
        return (scale * torch.randn(d, r, generator=gen, dtype=dtype),
                scale * torch.randn(r, k, generator=gen, dtype=dtype))
    if init == "zero":
        return torch.zeros(d, r, dtype=dtype), torch.zeros(r, k, dtype=dtype)
    raise ValueError(f"init must be 'lora', 'small' or 'zero', got {init!r}")


def factorise(W: MatrixLike, r: int, *, steps: int = 1000, lr: float = 0.05,
              optimizer: Literal["gd", "adam", "adamw"] = "gd",
              init: Literal["lora", "small", "zero"]
              = "lora", init_scale: float = 1.0, seed: int = 0,
              start: tuple[torch.Tensor, torch.Tensor] | None = None,
              lr_lambda: Callable[[int], float] | None = None,
              snapshots: Sequence[int] = ()) -> Factorisation:
    """Fit ``min_{B,A} ½‖BA − W‖_F²`` with ``B ∈ R^{d×r}``, ``A ∈ R^{r×k}`` by gradient steps.

    Args:
        W: the target, d×k (real floating point; the factors get its dtype).
        r: the rank of the factorisation, ``1 ≤ r ≤ min(d, k)``.
        steps: number of optimiser steps.
        lr: step size. Plain gradient descent can settle at a minimum only for ``lr`` below
            ``1/σ_1(W)``: at every minimum the Hessian's largest eigenvalue is at least
            ``‖A‖₂² + ‖B‖₂² ≥ 2σ_1`` (chapter 3, Solution 3).
        optimizer: ``"gd"`` (``torch.optim.SGD`` without momentum), ``"adam"`` or ``"adamw"``
            (``torch.optim.AdamW`` with PyTorch's default weight decay, 0.01).
        init, init_scale, seed: passed to :func:`init_factors` (LoRA's start by default).
        start: optional starting factors ``(B0, A0)`` of shapes (d×r, r×k), used instead of
            ``init`` (copied, never modified).
        lr_lambda: optional multiplier of ``lr`` by step, ``lr_t = lr · lr_lambda(t)``
            (``torch.optim.lr_scheduler.LambdaLR``), e.g. a decay.
        snapshots: steps ``t`` (``0 ≤ t ≤ steps``) at which to keep copies of ``(B, A)``.

    Returns:
        A :class:`Factorisation` with ``B``, ``A`` (detached), the loss history
        (``steps + 1`` values), the Eckart–Young floor and the requested snapshots.
    """
    W = as_matrix(W).detach()
    r = _check_rank(r, W)
    steps = _check_positive_int(steps, "steps")
    lr = _check_positive_float(lr, "lr")
    init_scale = _check_positive_float(init_scale, "init_scale", allow_zero=True)
    if optimizer not in ("gd", "adam", "adamw"):
        raise ValueError(f"optimizer must be 'gd', 'adam' or 'adamw', got {optimizer!r}")
    if lr_lambda is not None and not callable(lr_lambda):
        raise TypeError(f"lr_lambda must be a callable step -> factor, got "
                        f"{type(lr_lambda).__name__}")
    wanted = sorted({int(t) for t in snapshots})
    if wanted and not 0 <= wanted[0] <= wanted[-1] <= steps:
        raise ValueError(f"snapshots must lie in [0, steps] = [0, {steps}], got {wanted}")
    if start is None:
        B0, A0 = init_factors(W.shape[0], W.shape[1], r, init, init_scale, seed, W.dtype)
    else:
        if not (isinstance(start, (tuple, list)) and len(start) == 2
                and all(isinstance(t, torch.Tensor) for t in start)):
            raise TypeError("start must be a pair of tensors (B0, A0)")
        B0, A0 = start
        expected = ((W.shape[0], r), (r, W.shape[1]))
        if (tuple(B0.shape), tuple(A0.shape)) != expected:
            raise ValueError(f"start must have shapes B0 {expected[0]} and A0 {expected[1]} "
                             f"(d×r, r×k), got {tuple(B0.shape)} and {tuple(A0.shape)}")
        B0, A0 = B0.detach().clone().to(W.dtype), A0.detach().clone().to(W.dtype)
    B = B0.to(W.device).requires_grad_()
    A = A0.to(W.device).requires_grad_()
    opt_cls = {"gd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[
        optimizer]
    opt = opt_cls([B, A], lr=lr)
    schedule = (torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
                if lr_lambda is not None else None)
    losses, kept = [], {}
    for t in range(steps):
        if t in wanted:
            kept[t] = (B.detach().clone(), A.detach().clone())
        opt.zero_grad()
        loss = factorisation_loss(B, A, W)
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
        if schedule is not None:
            schedule.step()
    with torch.no_grad():
        losses.append(float(factorisation_loss(B, A, W)))
    if steps in wanted:
        kept[steps] = (B.detach().clone(), A.detach().clone())
    floor = 0.5 * eckart_young_error(W, r, "fro") ** 2
    return Factorisation(B=B.detach(), A=A.detach(), losses=losses, floor=floor,
                         snapshots=kept)


# --------------------------------------------------------------------------- counting

def dense_params(d: int, k: int) -> int:
    """Entries of a dense ``W ∈ R^{d×k}``: ``d·k``."""
    return _check_positive_int(d, "d") * _check_positive_int(k, "k")


def lora_params(d: int, k: int, r: int) -> int:
    """Entries of ``B ∈ R^{d×r}`` and ``A ∈ R^{r×k}``: ``r(d + k)``."""
    d, k, r = (_check_positive_int(v, n) for v, n in ((d, "d"), (k, "k"), (r, "r")))
    if r > min(d, k):
        raise ValueError(f"r must satisfy 1 <= r <= min(d, k) = {min(d, k)}, got r={r}; "
                         "a larger r stores more than the rank can use")
    return r * (d + k)


def lora_paper_params(n_matrices: int, d_model: int, r: int) -> int:
    """The LoRA paper's count ``|Θ| = 2 · L̂ · d_model · r`` (Hu et al., 2022, Section 5.1).

    ``L̂`` (``n_matrices``) is the number of adapted weight matrices, each ``d_model×d_model``,
    so each contributes ``r(d_model + d_model) = 2·d_model·r`` entries.
    """
    n, dm, r = (_check_positive_int(v, name) for v, name in
                ((n_matrices, "n_matrices"), (d_model, "d_model"), (r, "r")))
    return n * lora_params(dm, dm, r)
