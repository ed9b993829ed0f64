"""Why a low-rank update can be enough: intrinsic dimension, intrinsic rank, subspace similarity.

Three measurements, in the order the book makes them.

**Intrinsic dimension** (Li et al., 2018; Aghajanyan et al., 2021). Freeze the model's
``D`` parameters at ``θ0`` and train only ``z ∈ R^d`` in

    θ = θ0 + P z,        P ∈ R^{D×d} random and fixed,  z = 0 at the start,

so training starts exactly at the given model. The smallest ``d`` that reaches 90% of what
ordinary training reaches is ``d90``. A dense ``P`` would hold ``D·d`` numbers (a million
parameters and ``d = 1000`` is 4 GB), so :class:`SparseProjection` keeps ``s`` non-zeros per
column (``2·d·s`` numbers: a row index and a value each) and :class:`HadamardProjection` keeps
only ``D + 2d`` indices and signs. Both have columns of unit Euclidean norm *exactly*, as Li
et al. prescribe: a unit step in ``z`` moves ``θ`` by a unit step. With orthonormal columns,
plain SGD's step ``η P Pᵀ ∇θL`` is the ordinary step projected onto the subspace; its length
is about ``√(d/D)`` of the ordinary step's. Adam's first step moves every ``z_j`` by ``η``, so
``‖Δθ‖ = η √d``, again ``√(d/D)`` of ordinary Adam's first step ``η √D``: the two optimisers'
steps grow alike with ``d`` and differ in direction. Neither fixes how the best learning rate
depends on ``d``, so chapter 4 tunes it for every ``d``. :class:`SubspaceModel` wraps any
``nn.Module`` so that its only trainable parameter is ``z`` (and, for SAID, the per-tensor
scales ``λ``). :class:`TransferExperiment` is chapter 4's experiment: two tasks that share
features and a small network pretrained on one of them.

**Intrinsic rank** (Hu et al., 2022, Section 7). For a weight ``W0 ∈ R^{d×k}`` and its
fine-tuned value ``W0 + ΔW``: the singular values of ``ΔW``, the rank that keeps a fraction
of ``‖ΔW‖_F²`` (:func:`lora_edu.linalg.rank_for_energy`), and a model whose updates are cut
to their best rank-``r`` approximations (:func:`truncate_updates`).

**What LoRA learns** (Hu et al., 2022, Sections 7.2-7.3). The subspace similarity

    φ(A1, A2, i, j) = ‖V1[:, :i]ᵀ V2[:, :j]‖_F² / min(i, j)  ∈ [0, 1]

between the top-``i`` and top-``j`` right singular vectors of two adapters' ``A`` matrices
(:func:`subspace_similarity`), and how strongly ``ΔW`` amplifies directions of ``W``:
``‖Uᵀ W Vᵀ‖_F`` with ``U``, ``V`` the top-``r`` singular directions of ``ΔW``, and the
amplification factor ``‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F`` (:func:`amplification`).

Bad input raises ``TypeError``/``ValueError`` naming the argument before anything changes.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from lora_edu.linalg import (
    MatrixLike,
    as_matrix,
    low_rank_approx,
    rank_for_energy,
    truncated_svd,
)

__all__ = [
    "METHODS",
    "Amplification",
    "HadamardProjection",
    "SparseProjection",
    "SubspaceModel",
    "TaskSplits",
    "TransferExperiment",
    "accuracy",
    "amplification",
    "amplification_factor",
    "amplification_ratio",
    "d90",
    "delta_weights",
    "fit",
    "fwht",
    "linear_weights",
    "lora_delta_weights",
    "lowrank_svd",
    "make_projection",
    "projection_matrix",
    "projection_norm",
    "random_similarity",
    "rank_for_energy",
    "similarity_grid",
    "subspace_similarity",
    "truncate_updates",
]


# --------------------------------------------------------------------------- checks

def _check_int(value: Any, name: str, low: int, high: int | None = None, hint: str = "") -> int:
    """``value`` must be an int in ``[low, high]``; the message says the range and ``hint``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        upper = "" if high is None else f" <= {high}"
        raise ValueError(f"{name} must satisfy {low} <= {name}{upper}, got {name}={value}"
                         f"{'; ' + hint if hint else ''}")
    return value


def _as_float64(M: MatrixLike, name: str) -> torch.Tensor:
    # φ and the projections are ratios of small numbers: compute them in float64 on the CPU.
    return as_matrix(M.detach() if isinstance(M, torch.Tensor) else M, name).to(
        device="cpu", dtype=torch.float64)


# --------------------------------------------------------------------------- projections

def fwht(x: torch.Tensor) -> torch.Tensor:
    """The unnormalised Walsh–Hadamard transform ``H x`` along the last axis.

    ``x`` has shape ``(..., L)`` with ``L`` a power of two; ``H`` is the ``L×L`` Sylvester
    Hadamard matrix (entries ±1, ``Hᵀ H = L·I``). Costs ``L log2 L`` additions instead of the
    ``L²`` of a matrix product, and is differentiable (``Hᵀ = H``).
    """
    L = x.shape[-1]
    if L < 1 or L & (L - 1):
        raise ValueError(f"fwht needs a last dimension that is a power of two, got {L}; "
                         f"pad x with zeros to {1 << max(0, (L - 1).bit_length())}")
    batch = x.shape[:-1]
    h = 1
    while h < L:
        # Butterfly: pair entries h apart, replace (a, b) by (a + b, a − b).
        y = x.reshape(*batch, L // (2 * h), 2, h)
        x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return x.reshape(*batch, L)


def _check_sizes(D: int, d: int) -> tuple[int, int]:
    D = _check_int(D, "D", 1, hint="D is the number of parameters the subspace lives in")
    d = _check_int(d, "d", 1, D, hint="a subspace has at least one and at most D dimensions")
    return D, d


class SparseProjection(nn.Module):
    """``P ∈ R^{D×d}`` with ``s`` non-zeros per column, values ``±1/√s``: ``z (d,) -> P z (D,)``.

    Each column's ``s`` rows are distinct and drawn uniformly, its signs are fair coins, so
    **every column has unit norm exactly** (``s · (1/√s)² = 1``) and two columns are
    orthogonal in expectation. The default ``s = ⌈√D⌉`` is the "very sparse" projection of
    Li, Hastie and Church (2006). Memory: ``2·d·s`` numbers (``d·s`` row indices and ``d·s``
    values ``±1/√s``), not ``D·d``.
    """

    def __init__(self, D: int, d: int, s: int | None = None, seed: int = 0) -> None:
        super().__init__()
        D, d = _check_sizes(D, d)
        s = math.ceil(math.sqrt(D)) if s is None else _check_int(
            s, "s", 1, D, hint="s is the number of non-zeros per column")
        g = torch.Generator().manual_seed(seed)
        self.D, self.d, self.s = D, d, s
        self.register_buffer("rows", _distinct_rows(D, d, s, g))
        signs = torch.randint(0, 2, (d, s), generator=g).float() * 2 - 1
        self.register_buffer("values", signs / math.sqrt(s))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``P z``: ``(d,) -> (D,)``, as ``Σ_j z_j P[:, j]`` scattered into a zero vector."""
        _check_vector(z, self.d)
        contrib = (self.values * z[:, None]).flatten()
        return z.new_zeros(self.D).index_add(0, self.rows.flatten(), contrib)

    def extra_repr(self) -> str:
        return f"D={self.D}, d={self.d}, s={self.s}"


def _distinct_rows(D: int, d: int, s: int, g: torch.Generator) -> torch.Tensor:
    """``(d, s)`` row indices, distinct within each row of the result (redraw the collisions)."""
    rows = torch.randint(D, (d, s), generator=g)
    while True:
        rows, _ = rows.sort(dim=1)
        dup = torch.zeros_like(rows, dtype=torch.bool)
        dup[:, 1:] = rows[:, 1:] == rows[:, :-1]
        if not dup.any():
            return rows
        rows[dup] = torch.randint(D, (int(dup.sum()),), generator=g)


class HadamardProjection(nn.Module):
    """A subsampled randomised Hadamard transform: ``z (d,) -> P z (D,)``, ``P`` never stored.

    With ``L`` the smallest power of two ``>= D`` and ``H`` the ``L×L`` Hadamard matrix,

        P = (1/√D) · R H S C,

    where ``C`` puts ``z``'s ``d`` entries at ``d`` random distinct positions of ``R^L``,
    ``S`` flips random signs, ``H`` mixes every entry into every output, and ``R`` keeps
    ``D`` random distinct rows. :meth:`forward` applies ``H`` as two small matrix products
    (``L(a + b)`` multiply-adds with ``a·b = L``, ``a ≈ b ≈ √L``); :func:`fwht`, the
    reference, would take ``L log2 L`` additions. Memory: ``D + 2d`` stored indices and signs
    (plus the ``a² + b²`` entries of the two factors, shared by every projection of that
    ``L``), never ``D·d``. Every entry of ``P`` is
    ``±1/√D``, so **every column has unit norm exactly**; columns are nearly orthogonal, and
    exactly orthonormal when ``D = L`` (``Hᵀ H = L·I``), in which case ``d = D`` makes ``P``
    an orthogonal matrix and plain SGD on ``z`` retraces plain SGD on ``θ``.

    This *simplifies* the Fastfood transform (Le et al., 2013) that Li et al. (2018) and
    Aghajanyan et al. (2021) use, ``V = (1/(σ√d)) S H G Π H B`` (random signs ``B``, a
    Hadamard ``H``, a random permutation ``Π``, a Gaussian diagonal ``G``, a second ``H``, a
    scaling ``S``), to one Hadamard between random signs and random row and column choices:
    the subsampled randomised Hadamard transform.
    """

    def __init__(self, D: int, d: int, seed: int = 0) -> None:
        super().__init__()
        D, d = _check_sizes(D, d)
        L = 1 << (D - 1).bit_length()
        g = torch.Generator().manual_seed(seed)
        self.D, self.d, self.L = D, d, L
        self.register_buffer("cols", torch.randperm(L, generator=g)[:d])
        self.register_buffer("signs", torch.randint(0, 2, (d,), generator=g).float() * 2 - 1)
        self.register_buffer("rows", torch.randperm(L, generator=g)[:D])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``P z``: ``(d,) -> (D,)``, never forming ``P``.

        ``H`` is applied as the Kronecker product ``H_a ⊗ H_b`` of two small Hadamard
        matrices (``a·b = L``, Sylvester's construction): ``H x = vec(H_a X H_b)`` for ``X``
        the ``a×b`` reshaping of ``x``. That is ``L(a + b)`` multiply-adds (about
        ``2 L √L``) in two library matrix products; :func:`fwht`, the reference the tests
        compare with, needs only ``L log2 L`` additions but ``log2 L`` passes. Only the
        ``a² + b²`` entries of the factors are kept (cached per size, device and dtype).
        """
        _check_vector(z, self.d)
        spread = z.new_zeros(self.L).index_copy(0, self.cols, z * self.signs)
        h_a, h_b = _hadamard_factors(self.L, z.device, z.dtype)
        mixed = (h_a @ spread.view(h_a.shape[0], h_b.shape[0]) @ h_b).reshape(self.L)
        return mixed[self.rows] / math.sqrt(self.D)

    def extra_repr(self) -> str:
        return f"D={self.D}, d={self.d}, L={self.L}"


@functools.lru_cache(maxsize=16)
def _hadamard_factors(L: int, device: torch.device, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sylvester Hadamard matrices ``H_a``, ``H_b``, ``a·b = L``, ``a ≈ b``: ``H_L = H_a ⊗ H_b``."""
    m = L.bit_length() - 1
    a, b = 1 << (m // 2), 1 << (m - m // 2)
    return (fwht(torch.eye(a, dtype=dtype)).to(device), fwht(torch.eye(b, dtype=dtype)).to(device))


def _check_vector(z: torch.Tensor, d: int) -> None:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor of shape ({d},), got {type(z).__name__}")
    if z.shape != (d,):
        raise ValueError(f"z must have shape ({d},) for this {d}-dimensional subspace, got "
                         f"{tuple(z.shape)}")


def make_projection(kind: str, D: int, d: int, seed: int = 0) -> nn.Module:
    """``"sparse"`` -> :class:`SparseProjection`, ``"hadamard"`` -> :class:`HadamardProjection`."""
    kinds = {"sparse": SparseProjection, "hadamard": HadamardProjection}
    if kind not in kinds:
        raise ValueError(f"projection must be one of {sorted(kinds)}, got {kind!r}")
    return kinds[kind](D, d, seed=seed)


def projection_matrix(projection: nn.Module, max_entries: int = 10_000_000) -> torch.Tensor:
    """The dense ``D×d`` matrix of a projection (for checks and small pictures only)."""
    D, d = projection.D, projection.d
    if D * d > max_entries:
        raise ValueError(f"a dense {D}×{d} matrix has {D * d:,} entries, more than "
                         f"max_entries={max_entries:,}; raise max_entries if you mean it")
    eye = torch.eye(d, device=projection.rows.device)
    return torch.stack([projection(eye[j]) for j in range(d)], dim=1)


# --------------------------------------------------------------------------- subspace model

class SubspaceModel(nn.Module):
    """``model`` with its ``D`` parameters replaced by ``θ0 + P z``; only ``z`` trains.

    ``θ0`` is a frozen copy of the model's parameters at construction (flattened into one
    ``(D,)`` buffer), ``P`` a ``D×d`` projection from :func:`make_projection`, and ``z`` a
    ``(d,)`` parameter that starts at zero, so the wrapped model starts exactly at ``θ0``.
    The forward pass calls ``model`` with the parameters ``θ0 + P z`` (``torch.func``), so
    gradients reach ``z`` as ``Pᵀ ∂L/∂θ``. ``config`` is forwarded, so the training loop of
    :mod:`lora_edu.train` accepts a wrapped GPT.

    With ``said=True`` it is Aghajanyan et al.'s *structure-aware* intrinsic dimension
    (SAID): each of the model's ``m`` parameter tensors ``i`` (every weight and every bias)
    gets its own trainable scale ``λ_i``,

        θ_i = θ0_i + λ_i (P z)_i,        z ∈ R^{d−m},  λ ∈ R^m,

    and the ``m`` scales count in ``d``, so a SAID model and a plain (DID) one of the same
    ``d`` train the same number of numbers. ``λ`` starts at 1: at ``z = 0`` the model is
    still ``θ0``, and the first step's gradient in ``z`` is DID's (``∂L/∂λ = 0`` there).

    Args:
        model: any ``nn.Module``; its parameters are set to ``requires_grad=False`` (their
            values are never changed: :meth:`export` writes ``θ0 + P z`` into a copy).
        d: the number of trained numbers, ``1 <= d <= D`` (SAID: ``m < d <= D + m``).
        projection: ``"sparse"`` or ``"hadamard"``.
        seed: seeds ``P`` (``z`` needs none: it starts at zero).
        said: add the per-tensor scales ``λ``.
    """

    def __init__(self, model: nn.Module, d: int, projection: str = "sparse",
                 seed: int = 0, said: bool = False) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(said, bool):
            raise TypeError(f"said must be True or False, got {said!r}")
        named = list(model.named_parameters())
        D = sum(p.numel() for _, p in named)
        if D == 0:
            raise ValueError("model has no parameters, so there is no space to take a "
                             "subspace of")
        m = len(named) if said else 0
        _check_int(d, "d", m + 1, D + m,
                   hint=(f"SAID trains {m} scales (one per parameter tensor) and at least one "
                         f"direction" if said else f"the model has D={D:,} parameters"))
        self.projection = make_projection(projection, D, int(d) - m, seed)
        self.model = model.requires_grad_(False)
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.register_buffer("theta0", torch.cat([p.detach().flatten() for _, p in named]))
        self.z = nn.Parameter(torch.zeros(int(d) - m, dtype=self.theta0.dtype,
                                          device=self.theta0.device))
        self.said = said
        if said:
            self.lam = nn.Parameter(torch.ones(m, dtype=self.theta0.dtype,
                                               device=self.theta0.device))
            self.register_buffer("sizes", torch.tensor([p.numel() for _, p in named],
                                                       device=self.theta0.device))

    @property
    def D(self) -> int:
        return self.theta0.numel()

    @property
    def d(self) -> int:
        """The number of trained numbers: ``z``'s entries, plus the ``m`` scales for SAID."""
        return self.z.numel() + (self.lam.numel() if self.said else 0)

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)

    def theta(self) -> torch.Tensor:
        """The current full parameter vector ``θ0 + P z`` (SAID: ``θ0 + λ ⊙ P z``), ``(D,)``."""
        step = self.projection(self.z)
        if self.said:  # λ_i multiplies the entries of parameter tensor i
            step = torch.repeat_interleave(self.lam, self.sizes, output_size=self.D) * step
        return self.theta0 + step

    def parameter_dict(self) -> dict[str, torch.Tensor]:
        """``θ0 + P z`` split back into the model's named parameter shapes (views, no copy)."""
        pieces = self.theta().split([math.prod(s) for s in self.shapes])
        return {n: t.view(s) for n, t, s in zip(self.names, pieces, self.shapes)}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, self.parameter_dict(), args, kwargs)

    @torch.no_grad()
    def export(self) -> nn.Module:
        """A copy of the wrapped model with ``θ0 + P z`` written into its parameters."""
        out = copy.deepcopy(self.model)
        params = dict(out.named_parameters())
        for name, value in self.parameter_dict().items():
            params[name].copy_(value)
        return out

    def extra_repr(self) -> str:
        return f"D={self.D:,}, d={self.d:,}" + (", said" if self.said else "")


# --------------------------------------------------------------------------- chapter 4's experiment

@dataclass(frozen=True)
class TaskSplits:
    """One task: inputs ``X*`` (n×n_in, float32) and labels ``y*`` (n,) for train/val/test."""

    X: torch.Tensor
    y: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor


METHODS = ("full", "head", "lora", "did", "said")


def d90(dims: Iterable[int], accuracies: Iterable[float], bar: float) -> int | None:
    """The smallest ``d`` of the grid whose accuracy reaches ``bar`` (``None`` if none does).

    ``dims`` ascending; on a grid that doubles ``d`` the value is an upper bound within a
    factor of two of the smallest ``d`` that would reach the bar.
    """
    dims, accuracies = list(dims), list(accuracies)
    if len(dims) != len(accuracies) or dims != sorted(dims):
        raise ValueError("dims must be ascending and as long as accuracies")
    return next((int(d) for d, a in zip(dims, accuracies) if a >= bar), None)


class TransferExperiment:
    """Chapter 4's experiment: two tasks that share features, a small network pretrained on one.

    A fixed random *teacher* computes ``n_feat`` features ``sin(w_mᵀ x)`` of a Gaussian input
    ``x ∈ R^{n_in}``; a task labels ``x`` with the largest of ``n_class`` random linear
    read-outs of those features. Task A (pretraining, plenty of data) and task B (the target,
    little data) share the teacher and differ in the read-out; ``task_b_teacher`` other than
    0 gives task B a teacher of its own (nothing shared). The student is an
    ``n_in–width–width–n_class`` ReLU network, trained by full-batch Adam on the
    cross-entropy.

    :meth:`run` adapts a start to task B by one method for ``steps`` steps and returns its
    validation and test accuracy:

    * ``"full"``: every parameter; ``"head"``: only the output layer;
    * ``"lora"``: LoRA of rank ``size`` (``α = r``) on both hidden layers, plus the head;
    * ``"did"``: ``θ0 + P z`` with ``d = size`` (:class:`SubspaceModel`); ``"said"``: the
      same with one scale per parameter tensor, the scales counted in ``size``.

    Seed ``s`` fixes everything random in a run, the same way in every method: the start
    (pretrained: the new head, drawn with ``torch.manual_seed(100 + s)``; from scratch: the
    whole network, ``1000 + s``), ``P`` (seed ``10000·s + size``; DID and SAID alike) and
    LoRA's ``A`` (``200 + s``). So run ``s`` of two methods on one start share the head,
    and two subspace runs of one ``d`` on the two starts share ``P``: comparisons are paired.
    The data are fixed (full batches), so the seed is the only randomness.

    Everything runs on the CPU in float32, on every machine: the networks are so small that
    a GPU would spend its time launching kernels, and the CPU makes a run repeatable.
    """

    def __init__(self, n_a: int = 4096, n_b: int = 256, width: int = 64, steps: int = 200,
                 pre_lr: float = 3e-3, n_in: int = 16, n_feat: int = 8, n_class: int = 4,
                 n_val: int = 2048, n_test: int = 2048, task_b_teacher: int = 0,
                 projection: str = "hadamard") -> None:
        for name, value in (("n_a", n_a), ("n_b", n_b), ("width", width), ("steps", steps),
                            ("n_in", n_in), ("n_feat", n_feat), ("n_val", n_val),
                            ("n_test", n_test)):
            _check_int(value, name, 1)
        _check_int(n_class, "n_class", 2, hint="a classification task has two classes or more")
        _check_int(task_b_teacher, "task_b_teacher", 0)
        if projection not in ("sparse", "hadamard"):
            raise ValueError(f"projection must be 'sparse' or 'hadamard', got {projection!r}")
        self.n_in, self.n_feat, self.n_class, self.width = n_in, n_feat, n_class, width
        self.n_val, self.n_test, self.steps, self.pre_lr = n_val, n_test, steps, pre_lr
        self.n_b = n_b
        self.projection = projection
        self.task_a = self._task(seed=1, n_train=n_a, teacher_seed=0)
        self.task_b = self._task(seed=2, n_train=n_b, teacher_seed=task_b_teacher)
        self._pretrained: dict[int, nn.Module] = {}
        self.pretrain_accuracy: dict[int, float] = {}

    def _task(self, seed: int, n_train: int, teacher_seed: int) -> TaskSplits:
        teacher = torch.randn(self.n_feat, self.n_in,
                              generator=torch.Generator().manual_seed(teacher_seed))
        teacher = teacher / self.n_in ** 0.5
        g = torch.Generator().manual_seed(seed)
        readout = torch.randn(self.n_class, self.n_feat, generator=g)
        X = torch.randn(n_train + self.n_val + self.n_test, self.n_in, generator=g)
        y = (torch.sin(X @ teacher.T) @ readout.T).argmax(dim=1)
        cuts = (n_train, self.n_val, self.n_test)
        return TaskSplits(*(t for pair in zip(X.split(cuts), y.split(cuts)) for t in pair))

    def variant(self, task_b_teacher: int | None = None, projection: str | None = None
                ) -> TransferExperiment:
        """The same experiment with task B's teacher or the projection changed.

        Task A and the pretrained networks are shared with ``self`` (nothing is retrained),
        so a variant's runs start from exactly the same networks.
        """
        out = copy.copy(self)   # shallow: the cache of pretrained networks is shared
        if projection is not None:
            if projection not in ("sparse", "hadamard"):
                raise ValueError(f"projection must be 'sparse' or 'hadamard', got {projection!r}")
            out.projection = projection
        if task_b_teacher is not None:
            _check_int(task_b_teacher, "task_b_teacher", 0)
            out.task_b = self._task(seed=2, n_train=self.n_b, teacher_seed=task_b_teacher)
        return out

    def student(self, seed: int) -> nn.Sequential:
        """A freshly initialised ``n_in–width–width–n_class`` ReLU network (seeded)."""
        torch.manual_seed(seed)
        w = self.width
        return nn.Sequential(nn.Linear(self.n_in, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(),
                             nn.Linear(w, self.n_class))

    @property
    def D(self) -> int:
        """The student's parameter count."""
        return sum(p.numel() for p in self.student(0).parameters())

    def pretrained(self, steps: int = 1000) -> nn.Module:
        """The student (seed 0) after ``steps`` full-batch Adam steps on task A (cached).

        ``steps = 0`` is the untrained network. Its test accuracy on task A is kept in
        :attr:`pretrain_accuracy`.
        """
        steps = _check_int(steps, "steps", 0)
        if steps not in self._pretrained:
            model = self.student(0)
            _, acc = fit(model, list(model.parameters()), self.task_a, steps, self.pre_lr)
            self._pretrained[steps], self.pretrain_accuracy[steps] = model, acc
        return self._pretrained[steps]

    def start(self, kind: str, seed: int, pre_steps: int = 1000) -> nn.Module:
        """``"pretrained"``: a copy of :meth:`pretrained` with a new head (seed ``100 + s``);
        ``"scratch"``: a fresh network (seed ``1000 + s``)."""
        if kind == "pretrained":
            model = copy.deepcopy(self.pretrained(pre_steps))
            torch.manual_seed(100 + seed)
            model[-1].reset_parameters()
            return model
        if kind == "scratch":
            return self.student(1000 + seed)
        raise ValueError(f"kind must be 'pretrained' or 'scratch', got {kind!r}")

    def prepare(self, method: str, size: int, model: nn.Module, seed: int
                ) -> tuple[nn.Module, list[torch.Tensor]]:
        """``(module to call, its trainable tensors)`` for ``method`` applied to ``model``."""
        from lora_edu.lora import LoraConfig, inject_lora

        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if method == "full":
            return model, list(model.parameters())
        if method in ("did", "said"):
            sub = SubspaceModel(model, size, projection=self.projection,
                                seed=10_000 * seed + size, said=method == "said")
            return sub, [p for p in sub.parameters() if p.requires_grad]
        if method == "head":
            model.requires_grad_(False)
        else:
            torch.manual_seed(200 + seed)
            inject_lora(model, LoraConfig(r=size, lora_alpha=size, target_modules=["0", "2"]))
        model[-1].requires_grad_(True)
        return model, [p for p in model.parameters() if p.requires_grad]

    def trainable(self, method: str, size: int = 0) -> int:
        """How many numbers ``method`` trains (``size`` is ``d`` or the LoRA rank)."""
        _, params = self.prepare(method, size, self.student(0), seed=0)
        return sum(p.numel() for p in params)

    def run(self, method: str, size: int, lr: float, seed: int, start: str = "pretrained",
            pre_steps: int = 1000) -> dict[str, float]:
        """Adapt ``start`` (seed ``seed``) to task B by ``method``; ``{"val": …, "test": …}``."""
        module, params = self.prepare(method, size, self.start(start, seed, pre_steps), seed)
        val, test = fit(module, params, self.task_b, self.steps, lr)
        return {"val": val, "test": test}


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction of rows of ``X`` whose largest logit is at the label ``y``."""
    with torch.no_grad():
        return (model(X).argmax(dim=1) == y).float().mean().item()


def fit(model: nn.Module, params: list[torch.Tensor], task: TaskSplits, steps: int,
        lr: float) -> tuple[float, float]:
    """``steps`` full-batch Adam steps on the cross-entropy of ``task``'s training split;
    returns its (validation, test) accuracy."""
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(task.X), task.y).backward()
        opt.step()
    return accuracy(model, task.X_val, task.y_val), accuracy(model, task.X_test, task.y_test)


# --------------------------------------------------------------------------- ΔW and its rank

def linear_weights(model: nn.Module, names: Iterable[str] | None = None
                   ) -> dict[str, torch.Tensor]:
    """``{module name: weight (d×k)}`` of every ``nn.Linear`` whose last name part is in ``names``.

    ``names=None`` takes every ``nn.Linear``. A LoRA layer's frozen base weight appears under
    the LoRA layer's own name (``blocks.0.attn.q``, not ``blocks.0.attn.q.base``).
    """
    wanted = None if names is None else set(names)
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        name = name.removesuffix(".base")
        if wanted is None or name.rsplit(".", 1)[-1] in wanted:
            out[name] = module.weight.detach()
    return out


def delta_weights(base: nn.Module, tuned: nn.Module, names: Iterable[str] | None = None
                  ) -> dict[str, torch.Tensor]:
    """``{name: ΔW = W_tuned − W0}`` (each ``d×k``) for the ``nn.Linear`` layers of both models.

    Raises:
        ValueError: the two models do not have the same Linear layers and shapes.
    """
    w0, w1 = linear_weights(base, names), linear_weights(tuned, names)
    if w0.keys() != w1.keys() or any(w0[n].shape != w1[n].shape for n in w0):
        raise ValueError("base and tuned must have the same nn.Linear layers with the same "
                         f"shapes; base has {sorted(w0)}, tuned has {sorted(w1)}")
    if not w0:
        raise ValueError(f"no nn.Linear layer matches names={names!r}")
    return {n: (w1[n].double() - w0[n].double()) for n in w0}


def lora_delta_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: ΔW = s·B A}`` (each ``d×k``, float64) of every LoRA layer of ``model``."""
    from lora_edu.lora import lora_layers

    out = {name: layer.delta_weight().detach().double() for name, layer in lora_layers(model)}
    if not out:
        raise ValueError("model has no LoRA layer; call lora_edu.lora.inject_lora first")
    return out


@torch.no_grad()
def truncate_updates(base: nn.Module, tuned: nn.Module, r: int,
                     names: Iterable[str] | None = None) -> nn.Module:
    """A copy of ``tuned`` whose Linear weights are ``W0 + [ΔW]_r``, the best rank-r cut of ΔW.

    Every other parameter (biases, norms, embeddings) keeps its ``tuned`` value. A matrix
    with ``min(d, k) <= r`` keeps its whole update. ``base`` and ``tuned`` are not modified.
    """
    r = _check_int(r, "r", 1, hint="r is the rank each update ΔW is cut to")
    deltas = delta_weights(base, tuned, names)
    base_w = linear_weights(base, names)
    out = copy.deepcopy(tuned)
    modules = dict(out.named_modules())
    for name, dW in deltas.items():
        cut = dW if r >= min(dW.shape) else low_rank_approx(dW, r)
        weight = modules[name].weight
        weight.copy_((base_w[name].double() + cut).to(weight.dtype))
    return out


# --------------------------------------------------------------------------- φ

def _right_singular_vectors(M: torch.Tensor) -> torch.Tensor:
    """``V`` (k×m, m = min(n, k)) with orthonormal columns: the top right singular vectors."""
    return torch.linalg.svd(M, full_matrices=False).Vh.T


def _check_pair(A1: MatrixLike, A2: MatrixLike) -> tuple[torch.Tensor, torch.Tensor]:
    A1, A2 = _as_float64(A1, "A1"), _as_float64(A2, "A2")
    if A1.shape[1] != A2.shape[1]:
        raise ValueError(f"A1 ({A1.shape[0]}×{A1.shape[1]}) and A2 ({A2.shape[0]}×"
                         f"{A2.shape[1]}) must have the same number of columns k: φ compares "
                         "subspaces of the same input space R^k. Pass the A matrices (r×k) of "
                         "the same module, or B.T for the B matrices")
    return A1, A2


def subspace_similarity(A1: MatrixLike, A2: MatrixLike, i: int, j: int) -> float:
    """The LoRA paper's normalised subspace similarity φ (Hu et al., 2022, eq. (4)).

    With ``A1 = U1 Σ1 V1ᵀ`` and ``A2 = U2 Σ2 V2ᵀ`` (SVDs; ``A1`` is ``r1×k``, ``A2`` is
    ``r2×k``) and ``V1ᵢ`` the first ``i`` columns of ``V1`` (the top-``i`` **right**
    singular vectors, ``k×i``),

        φ(A1, A2, i, j) = ‖V1ᵢᵀ V2ⱼ‖_F² / min(i, j)  ∈ [0, 1].

    Right singular vectors, because they live in ``R^k``, the space of the layer's inputs
    that ``A`` reads: the adapters of two runs share that space. The left singular vectors
    (``r×r``) only describe a basis of the ``r``-dimensional bottleneck, which each run picks
    arbitrarily. For ``B`` (``d×r``) pass ``B.T`` to compare output directions. φ is 1 when
    one subspace contains the other and 0 when they are orthogonal; two random subspaces
    give ``max(i, j)/k`` on average (:func:`random_similarity`).

    Args:
        A1, A2: real matrices with the same number of columns ``k``.
        i: ``1 <= i <= min(r1, k)``; j: ``1 <= j <= min(r2, k)``.
    """
    A1, A2 = _check_pair(A1, A2)
    i = _check_int(i, "i", 1, min(A1.shape), hint="A1 has that many right singular vectors")
    j = _check_int(j, "j", 1, min(A2.shape), hint="A2 has that many right singular vectors")
    overlap = _right_singular_vectors(A1)[:, :i].T @ _right_singular_vectors(A2)[:, :j]
    return float(overlap.square().sum() / min(i, j))


def similarity_grid(A1: MatrixLike, A2: MatrixLike) -> torch.Tensor:
    """φ(A1, A2, i, j) for every ``i`` and ``j`` at once, as a ``(m1, m2)`` float64 tensor.

    Entry ``[i-1, j-1]`` is :func:`subspace_similarity` ``(A1, A2, i, j)``; one SVD each and
    a double cumulative sum of ``(V1ᵀ V2)²`` instead of ``m1·m2`` separate products.
    """
    A1, A2 = _check_pair(A1, A2)
    overlap2 = (_right_singular_vectors(A1).T @ _right_singular_vectors(A2)).square()
    cumulative = overlap2.cumsum(0).cumsum(1)
    i = torch.arange(1, cumulative.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, cumulative.shape[1] + 1, dtype=torch.float64)[None, :]
    return cumulative / torch.minimum(i, j)


def random_similarity(i: int, j: int, k: int) -> float:
    """The expected φ of a fixed ``i``-dim and a uniformly random ``j``-dim subspace of ``R^k``.

    Each of the ``j`` random orthonormal columns keeps on average ``i/k`` of its unit squared
    norm in the ``i``-dim subspace, so ``E‖V1ᵢᵀ V2ⱼ‖_F² = i·j/k`` and ``E φ = max(i, j)/k``.
    """
    k = _check_int(k, "k", 1, hint="k is the dimension of the space")
    i = _check_int(i, "i", 1, k, hint="a subspace of R^k has at most k dimensions")
    j = _check_int(j, "j", 1, k, hint="a subspace of R^k has at most k dimensions")
    return max(i, j) / k


# --------------------------------------------------------------------------- ΔW against W

def projection_norm(W: MatrixLike, U: MatrixLike, V: MatrixLike) -> float:
    """``‖Uᵀ W Vᵀ‖_F``: how much of ``W`` (d×k) lies in the ``r``-dim directions ``U``, ``V``.

    ``U`` is ``d×r`` and ``V`` is ``r×k`` (rows: right singular directions), the paper's
    Section 7.3 convention. With orthonormal ``U`` columns and ``V`` rows it is the norm of
    ``W`` projected on both sides onto those directions.
    """
    W, U, V = _as_float64(W, "W"), _as_float64(U, "U"), _as_float64(V, "V")
    d, k = W.shape
    if U.shape[0] != d or V.shape[1] != k or U.shape[1] != V.shape[0]:
        raise ValueError(f"for W of shape {d}×{k}, U must be {d}×r and V r×{k} with the same r; "
                         f"got U {tuple(U.shape)} and V {tuple(V.shape)}")
    return float(torch.linalg.matrix_norm(U.T @ W @ V.T))


@dataclass(frozen=True)
class Amplification:
    """The Section 7.3 numbers for one ``(ΔW, W, r)``; norms are Frobenius norms.

    Attributes:
        r: how many singular directions.
        delta_norm: ``‖ΔW‖_F``.
        weight_norm: ``‖W‖_F``.
        proj_delta: ``‖Uᵀ W Vᵀ‖_F`` with ``U``, ``V`` the top-r directions of ``ΔW``.
        proj_weight: the same with the top-r directions of ``W`` itself (its largest part).
        proj_random: the same with random orthonormal directions (the chance level).
    """

    r: int
    delta_norm: float
    weight_norm: float
    proj_delta: float
    proj_weight: float
    proj_random: float

    @property
    def factor(self) -> float:
        """The amplification factor ``‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F`` (ΔW's directions)."""
        return self.delta_norm / self.proj_delta if self.proj_delta > 0 else math.inf


def _top_directions(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, _, Vh = truncated_svd(M, r)
    return U, Vh


def _random_directions(d: int, k: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(k, r, generator=g, dtype=torch.float64))
    return U, V.T


def amplification(delta_W: MatrixLike, W: MatrixLike, r: int, seed: int = 0) -> Amplification:
    """The LoRA paper's Table 7 for one matrix: does ``ΔW`` amplify directions already in ``W``?

    ``U`` (d×r) and ``V`` (r×k) are the top-``r`` left/right singular directions of ``ΔW``;
    ``‖Uᵀ W Vᵀ‖_F`` is small when ``ΔW`` points where ``W`` is weak, and
    ``‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F`` is how much the update magnifies those directions (the paper:
    about 21.5 for ``r = 4`` and 2 for ``r = 64`` on GPT-3's ``W_q``).

    Args:
        delta_W: the update, ``d×k``; W: the weight it is compared with (usually ``W0``), ``d×k``.
        r: ``1 <= r <= min(d, k)``; use the adapter's rank.
        seed: for the random directions.
    """
    dW, W = _as_float64(delta_W, "delta_W"), _as_float64(W, "W")
    if dW.shape != W.shape:
        raise ValueError(f"delta_W {tuple(dW.shape)} and W {tuple(W.shape)} must have the same "
                         "shape: ΔW is an update of W")
    r = _check_int(r, "r", 1, min(W.shape), hint="U and V have at most min(d, k) directions")
    if not bool(dW.abs().max() > 0):
        raise ValueError("delta_W is the zero matrix, so it has no directions to project on; "
                         "train the adapter first (LoRA starts with ΔW = B A = 0)")
    fro = lambda M: float(torch.linalg.matrix_norm(M))
    return Amplification(
        r=r, delta_norm=fro(dW), weight_norm=fro(W),
        proj_delta=projection_norm(W, *_top_directions(dW, r)),
        proj_weight=projection_norm(W, *_top_directions(W, r)),
        proj_random=projection_norm(W, *_random_directions(*W.shape, r, seed)))


def amplification_factor(delta_W: MatrixLike, W: MatrixLike, r: int) -> float:
    """``‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F`` with ``U``, ``V`` the top-``r`` singular directions of ``ΔW``."""
    return amplification(delta_W, W, r).factor


# --------------------------------------------------------------------------- scale-free amplification

def lowrank_svd(B: MatrixLike, A: MatrixLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of ``B A`` (``B`` d×r, ``A`` r×k) without forming the d×k product.

    With ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (QR), ``B A = Q_B (R_B R_Aᵀ) Q_Aᵀ``; the SVD of the
    r×r core ``R_B R_Aᵀ = X Σ Yᵀ`` gives ``U = Q_B X`` (d×r), ``σ`` (r,, descending) and
    ``Vᵀ = Yᵀ Q_Aᵀ`` (r×k), so ``B A = U diag(σ) Vᵀ``. Cost O((d + k) r²) instead of
    O(d k min(d, k)): a LoRA update's singular directions for the price of its factors.
    """
    B, A = _as_float64(B, "B"), _as_float64(A, "A")
    if B.shape[1] != A.shape[0]:
        raise ValueError(f"B ({B.shape[0]}×{B.shape[1]}) and A ({A.shape[0]}×{A.shape[1]}) "
                         "must share the inner dimension r: pass lora_B (d×r) and lora_A (r×k)")
    QB, RB = torch.linalg.qr(B)
    QA, RA = torch.linalg.qr(A.T)
    X, S, Yh = torch.linalg.svd(RB @ RA.T)
    return QB @ X, S, Yh @ QA.T


def amplification_ratio(W: MatrixLike, U: MatrixLike, V: MatrixLike) -> float:
    """How much more of ``W`` (d×k) lies in the directions ``U`` (d×r), ``V`` (r×k) than in
    random directions of the same rank, a number that does not depend on any scale:

        ρ = ‖Uᵀ W Vᵀ‖_F / (r ‖W‖_F / √(d k)).

    The denominator is the root-mean-square of ``‖Uᵀ W Vᵀ‖_F`` over independent, uniformly
    random orthonormal ``U`` and ``V``: ``E[U Uᵀ] = (r/d) I`` and ``E[Vᵀ V] = (r/k) I`` give
    ``E‖Uᵀ W Vᵀ‖_F² = (r/d)(r/k)‖W‖_F²``. So ρ = 1 is chance, ρ > 1 means the directions point
    where ``W`` is strong, and ρ is unchanged when ``W`` is rescaled; the paper's
    amplification factor ``‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F`` instead grows with the size of the update
    (the learning rate, the number of steps). ``U`` needs orthonormal columns and ``V``
    orthonormal rows (the singular directions of an update, e.g. from :func:`lowrank_svd`).
    """
    W, U, V = _as_float64(W, "W"), _as_float64(U, "U"), _as_float64(V, "V")
    d, k = W.shape
    r = U.shape[1]
    for name, Q in (("U", U.T), ("V", V)):
        if Q.shape[0] == r and not torch.allclose(Q @ Q.T, torch.eye(r, dtype=Q.dtype),
                                                   atol=1e-6):
            raise ValueError(f"{name} must have orthonormal {'columns' if name == 'U' else 'rows'}"
                             ": pass singular directions (lowrank_svd or truncated_svd), not "
                             "the factors B and A themselves")
    norm = float(torch.linalg.matrix_norm(W))
    if norm == 0:
        raise ValueError("W is the zero matrix: it has no directions to be amplified")
    return projection_norm(W, U, V) / (r * norm / math.sqrt(d * k))
