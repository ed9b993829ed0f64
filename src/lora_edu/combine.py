"""Combining LoRA adapters: task arithmetic, concatenation, TIES, DARE, magnitude pruning, SVD.

Several adapters trained on the same base ``W0 ∈ R^{d×k}`` for different tasks each add an
update ``ΔW_i = s_i B_i A_i`` (``B_i ∈ R^{d×r_i}``, ``A_i ∈ R^{r_i×k}``, scaling ``s_i``). One
adapter that does all the tasks at once is a *combination* of them. This module implements
the combination types of Hugging Face PEFT's ``add_weighted_adapter`` from scratch, in small
functions, with the same results:

``linear``
    task arithmetic (Ilharco et al., 2023) applied to the factors: with
    ``c_i = sign(w_i s_i)·√|w_i s_i|`` and ``c'_i = √|w_i s_i|``,
    ``A = Σ c_i A_i``, ``B = Σ c'_i B_i``. All ranks must be equal. Its product
    ``B A = Σ_i Σ_j c'_i c_j B_i A_j`` has **cross terms** ``B_i A_j`` (i ≠ j): it is *not*
    ``Σ w_i ΔW_i``.
``cat``
    ``A = [w_1 s_1 A_1; …; w_n s_n A_n]`` (stacked rows), ``B = [B_1 … B_n]`` (stacked
    columns): ``B A = Σ w_i ΔW_i`` exactly, at rank ``Σ r_i``.
``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``
    the same merge rule as the paper names, applied to the A's and to the B's separately
    (with the weights ``c_i`` and ``c'_i`` above), equal ranks required. The factors of an
    update are defined only up to an invertible ``G`` (r×r): ``(B G, G⁻¹ A)`` gives the same
    ``ΔW``, so the sign and size of one entry of ``A`` or ``B`` mean something only when the
    adapters share a basis (for instance a common initial ``A``); the ``*_svd`` types below
    work on ``ΔW_i`` itself and do not depend on the factorisation.
``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``
    the merge rule applied to the full updates ``ΔW_i`` with the weights ``w_i`` (``svd`` is
    exact task arithmetic ``Σ w_i ΔW_i``), then re-compressed to rank ``rank`` by a truncated
    SVD (Eckart–Young: the error is the tail of the singular values).

The merge rules, on tensors ``T_1 … T_n`` of one shape with weights ``w_i``:

* task arithmetic: ``Σ w_i T_i``;
* magnitude pruning: keep the ``⌊density·numel⌋`` largest ``|T_i|`` of each tensor, then
  task arithmetic;
* TIES (Yadav et al., 2023): trim each tensor as above, elect a sign per entry (the sign of
  ``Σ_i trim(T_i)``), and average ``w_i trim(T_i)`` over the tensors whose sign agrees with
  the elected one (the *disjoint mean*);
* DARE (Yu et al., 2024): drop each entry with probability ``1 − density`` and rescale the
  survivors by ``1/density`` (so the expectation is unchanged), then task arithmetic
  (``dare_linear``) or TIES' sign election and disjoint mean (``dare_ties``). ``density`` is
  the *keep* probability, as in PEFT; the DARE paper's ``p`` is the drop rate ``1 − density``.

The combined adapter has scaling 1: its ``ΔW = B A``. As in PEFT, a single adapter is always
combined with ``linear`` whatever ``combination_type`` says.

rsLoRA inputs
    Every type uses each input's ``s_i`` only through the products ``w_i s_i`` (folded into the
    factors, or into ``ΔW_i = s_i B_i A_i`` for the ``*_svd`` types), so an rsLoRA adapter
    (``use_rslora=True``, ``s_i = α_i/√r_i``) is combined like any other once its ``s_i`` is
    right: :func:`adapter_from_model` takes the layer's ``scaling`` and :func:`read_adapter`
    computes ``α/√r`` from the config's ``use_rslora``. Adapters with and without rsLoRA, and
    of different ranks where the type allows it, mix freely (PEFT refuses none of these mixes;
    it refuses different ranks for the types in :data:`EQUAL_RANK_TYPES`, as we do). The result
    still has scaling 1 at its rank ``r'`` (``Σ r_i`` for ``cat``), so ``cat`` and full-rank
    ``svd`` give exactly ``Σ w_i ΔW_i``. As a LoRA config that is ``r = lora_alpha = r'`` with
    ``use_rslora=False`` (what :func:`install_adapter` writes), or ``lora_alpha = √r'`` with
    ``use_rslora=True``.

    PEFT's ``add_weighted_adapter`` (the released versions up to the one the tests pin)
    creates the same ``lora_A`` / ``lora_B`` but copies ``use_rslora`` from the first adapter
    into the new config with ``lora_alpha = r = r'``; when that adapter is an rsLoRA one, the
    new adapter's scaling is ``r'/√r' = √r'`` and its ``ΔW`` is ``√r'`` times
    ``Σ w_i ΔW_i``. We do not copy that: the upstream fix
    (https://github.com/huggingface/peft/pull/3449, merged after the release the tests pin)
    sets ``use_rslora=False`` for the new adapter, and with it PEFT's ``ΔW`` equals ours
    (https://github.com/huggingface/peft/issues/3761 reports the rsLoRA case as still wrong
    on a later main).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from lora_edu.linalg import truncated_svd

__all__ = [
    "COMBINATION_TYPES", "SVD_TYPES", "EQUAL_RANK_TYPES",
    "combine_adapters", "combine_named_adapters", "adapter_from_model", "read_adapter",
    "install_adapter", "task_arithmetic", "trim", "elect_sign", "disjoint_mean", "ties_merge",
    "dare_drop", "dare_linear", "dare_ties", "magnitude_prune", "recompress",
    "linear_factor_weights", "sign_conflicts", "merged", "answer_items",
]

#: Every ``combination_type`` PEFT's ``add_weighted_adapter`` knows.
COMBINATION_TYPES = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties",
                     "dare_linear_svd", "dare_ties_svd", "magnitude_prune",
                     "magnitude_prune_svd")
#: Types that merge the full ΔW_i and then re-compress by SVD to rank ``rank``.
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
#: Types that merge the A's and B's entry by entry: all adapters need the same rank.
EQUAL_RANK_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
#: Types that use ``density``; DARE's also use ``generator``.
_DENSITY_TYPES = ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                  "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")

Factors = tuple[torch.Tensor, torch.Tensor]
#: One adapter, layer by layer: module name → (A (r×k), B (d×r), scaling s), as
#: :func:`lora_edu.serving.inject_multi_lora` takes them.
Adapter = dict[str, tuple[torch.Tensor, torch.Tensor, float]]
AdapterSource = Union[Mapping[str, tuple], nn.Module, str, Path]


# --------------------------------------------------------------------------- merge rules
# Each takes a list of same-shaped tensors T_i and a list of float weights w_i.

def task_arithmetic(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``Σ_i w_i T_i`` (Ilharco et al., 2023): the weighted sum of task vectors."""
    return sum(w * t for w, t in zip(weights, tensors))


def trim(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``⌊density·numel⌋`` entries of largest magnitude, zero the rest.

    TIES' "trim" step and the pruning of ``magnitude_prune``. ``density >= 1`` keeps all.
    """
    if density >= 1:
        return tensor
    keep = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[tensor.abs().flatten().topk(keep).indices] = 1
    return tensor * mask.view_as(tensor)


def elect_sign(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES' sign election: per entry, the sign (+1 or −1) of ``Σ_i T_i`` (a tie elects +1).

    The sum weighs each tensor's vote by its magnitude (PEFT's ``majority_sign_method="total"``).
    """
    return torch.where(torch.stack(list(tensors)).sum(0) >= 0, 1.0, -1.0)


def disjoint_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float],
                  sign: torch.Tensor) -> torch.Tensor:
    """TIES' disjoint merge: per entry, the mean of ``w_i T_i`` over the tensors whose own sign
    agrees with the elected ``sign`` (entries that were trimmed to 0 agree with neither).

    An entry where no tensor agrees becomes 0.
    """
    agrees = [(t.sign() == sign).to(t.dtype) for t in tensors]
    total = sum(w * t * a for w, t, a in zip(weights, tensors, agrees))
    count = sum(agrees)
    return total / count.clamp(min=1)


def ties_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float],
               density: float) -> torch.Tensor:
    """TIES-merging (Yadav et al., 2023): trim, elect signs, disjoint mean.

    The signs are elected from the trimmed tensors before they are weighted, as PEFT does.
    """
    trimmed = [trim(t, density) for t in tensors]
    return disjoint_mean(trimmed, weights, elect_sign(trimmed))


def dare_drop(tensor: torch.Tensor, density: float,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE's drop-and-rescale (Yu et al., 2024): keep each entry with probability ``density``
    and divide the survivors by ``density``, so that ``E[dare_drop(T)] = T``.

    The keep-mask is ``Bernoulli(density)`` drawn from ``generator`` (the global generator if
    ``None``). ``density >= 1`` keeps all.
    """
    if density >= 1:
        return tensor
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * keep / density


def dare_linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], density: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE then task arithmetic: ``Σ_i w_i dare_drop(T_i)``; unbiased for ``Σ_i w_i T_i``."""
    return task_arithmetic([dare_drop(t, density, generator) for t in tensors], weights)


def dare_ties(tensors: Sequence[torch.Tensor], weights: Sequence[float], density: float,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE's random drop in place of TIES' trim, then sign election and disjoint mean."""
    dropped = [dare_drop(t, density, generator) for t in tensors]
    return disjoint_mean(dropped, weights, elect_sign(dropped))


def magnitude_prune(tensors: Sequence[torch.Tensor], weights: Sequence[float],
                    density: float) -> torch.Tensor:
    """Trim each tensor by magnitude, then task arithmetic: ``Σ_i w_i trim(T_i)``."""
    return task_arithmetic([trim(t, density) for t in tensors], weights)


def _merge(rule: str, tensors: list[torch.Tensor], weights: list[float], density: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """Apply merge rule ``rule`` (a combination type without ``_svd``; ``svd`` → ``linear``)."""
    if rule == "linear":
        return task_arithmetic(tensors, weights)
    if rule == "ties":
        return ties_merge(tensors, weights, density)
    if rule == "dare_linear":
        return dare_linear(tensors, weights, density, generator)
    if rule == "dare_ties":
        return dare_ties(tensors, weights, density, generator)
    return magnitude_prune(tensors, weights, density)


def recompress(delta: torch.Tensor, rank: int) -> Factors:
    """The best rank-``rank`` factors of ``delta`` (d×k): ``A = V_rᵀ`` (r×k) and
    ``B = U_r diag(σ_1..σ_r)`` (d×r), so ``B A`` is the truncated SVD of ``delta``
    (chapter 2). ``‖delta − B A‖_F² = Σ_{i>r} σ_i²``."""
    U, S, Vh = truncated_svd(delta, rank)
    return Vh, U * S


def linear_factor_weights(weights: Sequence[float], scalings: Sequence[float]
                          ) -> tuple[list[float], list[float]]:
    """PEFT's weights for combining the factors separately: for A ``sign(w s)·√|w s|``, for B
    ``√|w s|``, so that one adapter alone gets back ``(c A)(c' B) = w s B A``."""
    products = [w * s for w, s in zip(weights, scalings)]
    for_A = [math.sqrt(abs(p)) * (1.0 if p >= 0 else -1.0) for p in products]
    for_B = [math.sqrt(abs(p)) for p in products]
    return for_A, for_B


def sign_conflicts(tensors: Sequence[torch.Tensor]) -> float:
    """The fraction of entries where two of the tensors are non-zero with opposite signs:
    the interference TIES' sign election resolves."""
    stacked = torch.stack(list(tensors))
    has_pos = (stacked > 0).any(0)
    has_neg = (stacked < 0).any(0)
    return float((has_pos & has_neg).double().mean())


# --------------------------------------------------------------------------- validation

def _check_type(combination_type: Any) -> str:
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"unknown combination_type {combination_type!r}; use one of "
                         f"{', '.join(COMBINATION_TYPES)} (as in peft's add_weighted_adapter)")
    return combination_type


def _check_number(value: Any, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _check_numbers(values: Any, n: int, name: str) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, torch.Tensor)):
        raise TypeError(f"{name} must be a list of {n} numbers (one per adapter), got "
                        f"{type(values).__name__}")
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but there are {n} adapters; give "
                         f"one {name[:-1]} per adapter")
    return [_check_number(v, f"{name}[{i}]") for i, v in enumerate(values)]


def _check_factors(factors: Any) -> list[Factors]:
    """Every (A_i, B_i) is a float A (r_i×k) and B (d×r_i) with the same d, k, and device."""
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence) or not factors:
        raise TypeError("factors must be a non-empty list of (A, B) pairs: A (r×k) and B "
                        "(d×r) of one layer, as LoRA layers store them")
    checked = []
    for i, pair in enumerate(factors):
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError(f"factors[{i}] must be a pair (A, B), got {type(pair).__name__}")
        A, B = pair
        if not (isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)):
            raise TypeError(f"factors[{i}]: A and B must be torch.Tensors")
        if not (A.is_floating_point() and B.is_floating_point()):
            raise TypeError(f"factors[{i}]: A and B must be floating point, got {A.dtype} "
                            f"and {B.dtype}")
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"factors[{i}]: expected A (r×k) and B (d×r) with the same r, "
                             f"got A {tuple(A.shape)} and B {tuple(B.shape)}; pass "
                             "(lora_A, lora_B) in that order")
        checked.append((A.detach(), B.detach()))
    d, k = checked[0][1].shape[0], checked[0][0].shape[1]
    for i, (A, B) in enumerate(checked):
        if (B.shape[0], A.shape[1]) != (d, k):
            raise ValueError(f"factors[{i}] updates a {B.shape[0]}×{A.shape[1]} weight but "
                             f"factors[0] a {d}×{k} one; combine adapters of the same layer")
        if A.device != checked[0][0].device or B.device != checked[0][0].device:
            raise ValueError(f"factors[{i}] is on another device than factors[0]; move them "
                             "to one device first")
    return checked


def _check_density(density: Any, combination_type: str) -> float:
    if density is None and combination_type not in _DENSITY_TYPES:
        return 1.0  # unused
    if density is None:
        raise ValueError(f"combination_type={combination_type!r} needs a density in (0, 1], "
                         "the fraction of entries kept, e.g. density=0.5")
    density = _check_number(density, "density")
    if not 0 < density <= 1:
        raise ValueError(f"density is the fraction of entries kept and must lie in (0, 1], "
                         f"got {density}; density=1 keeps everything")
    return density


def _check_rank(rank: Any, combination_type: str, ranks: list[int], d: int, k: int) -> int:
    """The rank of the combined adapter (checked against the type and the layer's size)."""
    if combination_type in EQUAL_RANK_TYPES and len(set(ranks)) != 1:
        raise ValueError(f"combination_type={combination_type!r} combines the A's and B's "
                         f"entry by entry, so all adapters need the same rank, got ranks "
                         f"{ranks}; use 'cat' or an '_svd' type (e.g. 'svd', 'ties_svd') "
                         "for adapters of different ranks")
    if combination_type not in SVD_TYPES:
        if rank is not None:
            raise ValueError(f"rank is the target rank of the SVD types {SVD_TYPES}; "
                             f"combination_type={combination_type!r} has rank "
                             f"{sum(ranks) if combination_type == 'cat' else ranks[0]}: "
                             "leave rank=None")
        return sum(ranks) if combination_type == "cat" else ranks[0]
    if rank is None:
        return max(ranks)  # PEFT's default svd_rank
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"rank must be an int or None, got {type(rank).__name__}")
    if not 1 <= rank <= min(d, k):
        raise ValueError(f"rank must lie in [1, min(d, k)] = [1, {min(d, k)}] for a {d}×{k} "
                         f"layer, got {rank}")
    return int(rank)


def _check_generator(generator: Any, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    if torch.device(generator.device).type != device.type:
        raise ValueError(f"generator is on {generator.device} but the factors are on {device}; "
                         f"create it with torch.Generator(device={str(device)!r})")


# --------------------------------------------------------------------------- one layer

def _combine_checked(factors: list[Factors], weights: list[float], scalings: list[float],
                     combination_type: str, density: float, rank: int,
                     generator: torch.Generator | None) -> Factors:
    """The combination itself, on checked input; returns (A, B) with scaling 1."""
    out_dtype = factors[0][0].dtype
    for A, B in factors:
        out_dtype = torch.promote_types(out_dtype, torch.promote_types(A.dtype, B.dtype))
    work = torch.promote_types(out_dtype, torch.float32)  # half precision: compute in fp32
    As = [A.to(work) for A, _ in factors]
    Bs = [B.to(work) for _, B in factors]
    if combination_type == "cat":
        # rows of A carry w_i s_i; B's columns stay: B A = Σ_i w_i s_i B_i A_i exactly
        A = torch.cat([w * s * A for w, s, A in zip(weights, scalings, As)], dim=0)
        B = torch.cat(Bs, dim=1)
    elif combination_type in SVD_TYPES:
        deltas = [s * (B @ A) for s, A, B in zip(scalings, As, Bs)]
        rule = "linear" if combination_type == "svd" else combination_type[: -len("_svd")]
        A, B = recompress(_merge(rule, deltas, weights, density, generator), rank)
    else:
        for_A, for_B = linear_factor_weights(weights, scalings)
        # A first, then B (PEFT's order, which fixes the order of DARE's random draws)
        A = _merge(combination_type, As, for_A, density, generator)
        B = _merge(combination_type, Bs, for_B, density, generator)
    return A.to(out_dtype).contiguous(), B.to(out_dtype).contiguous()


def _prepare(factors: Any, weights: Any, scalings: Any, combination_type: Any, density: Any,
             rank: Any, generator: Any) -> tuple:
    """Check every argument of :func:`combine_adapters`; returns them normalised."""
    combination_type = _check_type(combination_type)
    factors = _check_factors(factors)
    n = len(factors)
    weights = _check_numbers(weights, n, "weights")
    scalings = [1.0] * n if scalings is None else _check_numbers(scalings, n, "scalings")
    density = _check_density(density, combination_type)
    d, k = factors[0][1].shape[0], factors[0][0].shape[1]
    ranks = [A.shape[0] for A, _ in factors]
    rank = _check_rank(rank, combination_type, ranks, d, k)
    _check_generator(generator, factors[0][0].device)
    if n == 1:  # PEFT combines a single adapter with "linear", whatever the type says
        combination_type, rank = "linear", ranks[0]
    return factors, weights, scalings, combination_type, density, rank, generator


def combine_adapters(factors: Sequence[Factors], weights: Sequence[float],
                     scalings: Sequence[float] | None = None, combination_type: str = "ties",
                     density: float | None = 0.5, rank: int | None = None,
                     generator: torch.Generator | None = None) -> Factors:
    """Combine the LoRA adapters of one layer into one adapter, as PEFT's
    ``add_weighted_adapter`` does.

    Args:
        factors: ``[(A_1, B_1), …]``, ``A_i`` of shape (r_i, k), ``B_i`` of shape (d, r_i).
        weights: ``w_i``, one per adapter (negative values subtract a task).
        scalings: the adapters' ``s_i`` (``α/r``, or ``α/√r`` for rsLoRA adapters); ``None``:
            all 1.
        combination_type: one of :data:`COMBINATION_TYPES` (see the module docstring).
        density: fraction of entries kept by the pruning types, in (0, 1].
        rank: target rank of the ``*_svd`` types (``None``: the largest ``r_i``); must be
            ``None`` for the others (``cat`` has rank ``Σ r_i``, the rest ``r``).
        generator: the random generator of the DARE types (``None``: torch's global one).

    Returns:
        ``(A, B)``: A of shape (r', k), B of shape (d, r'), in the factors' dtype, for an
        adapter with scaling 1 (its ``ΔW = B A``). For the deterministic types they equal the
        ``lora_A`` / ``lora_B`` weights ``add_weighted_adapter`` creates (the ``*_svd`` types:
        the products ``B A``, since singular vectors are defined up to sign).

    Raises:
        ValueError, TypeError: bad input (checked before anything is computed).
    """
    return _combine_checked(*_prepare(factors, weights, scalings, combination_type, density,
                                      rank, generator))


# --------------------------------------------------------------------------- whole adapters

def adapter_from_model(model: nn.Module) -> Adapter:
    """A model's LoRA adapter as ``{module name: (A, B, s)}`` (detached copies).

    Raises ``ValueError`` if the model has no :class:`~lora_edu.lora.LoRALinear` layer or has
    DoRA layers (their magnitude vector is not a low-rank update).
    """
    from lora_edu.lora import lora_layers

    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("model has no LoRA layers; inject LoRA with lora_edu.lora.inject_lora "
                         "and train it, or pass the adapter as {module: (A, B, s)}")
    dora = [name for name, layer in layers if hasattr(layer, "magnitude")]
    if dora:
        raise ValueError(f"layer {dora[0]!r} is a DoRA layer; combining adapters works on "
                         "plain LoRA updates s·B A only")
    return {name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone(),
                   float(layer.scaling)) for name, layer in layers}


def _scaling_from(config: Mapping[str, Any], source: Path) -> tuple[int, float]:
    from lora_edu.lora import lora_scaling

    if config.get("use_dora"):
        raise ValueError(f"{source}: a DoRA adapter; combining works on plain LoRA only")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{source}: per-module rank_pattern/alpha_pattern are not supported; "
                         "save the adapter with one r and lora_alpha")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{source}: the adapter trains biases (bias={config.get('bias')!r}); "
                         "biases are not low-rank updates and cannot be combined")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{source}: the config must give r and lora_alpha")
    return r, lora_scaling(alpha, r, bool(config.get("use_rslora", False)))


def read_adapter(directory: str | Path) -> Adapter:
    """Read a saved adapter directory (lora_edu's layout or PEFT's) as ``{module: (A, B, s)}``.

    No model is needed: the module names come from the tensor names, ``s`` from the config.
    Half-precision tensors are returned as float32 (as PEFT loads them into a float32 model).
    """
    from lora_edu import adapters as io

    src = Path(directory)
    if (src / io.CONFIG_NAME).is_file():
        config = io._read_json(src / io.CONFIG_NAME).get("config", {})
        tensors = io._read_safetensors(src / io.WEIGHTS_NAME)
    elif (src / io.PEFT_CONFIG_NAME).is_file():
        config = io._read_json(src / io.PEFT_CONFIG_NAME)
        raw = io._read_safetensors(src / io.PEFT_WEIGHTS_NAME)
        tensors = {io._from_peft_key(key): value for key, value in raw.items()}
    else:
        raise FileNotFoundError(f"{src} holds no adapter ({io.CONFIG_NAME} or "
                                f"{io.PEFT_CONFIG_NAME}); save one with save_adapter or "
                                "save_peft_adapter")
    r, s = _scaling_from(config, src)
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    unknown = [k for k in tensors if not k.endswith((".lora_A", ".lora_B"))]
    missing = [n for n in names if f"{n}.lora_A" not in tensors or f"{n}.lora_B" not in tensors]
    if unknown or missing:
        raise ValueError(f"{src}: expected only <module>.lora_A / .lora_B tensors, got "
                         f"unexpected {unknown[:3]} and incomplete modules {missing[:3]}")
    def as_float(t: torch.Tensor) -> torch.Tensor:  # a bf16/fp16 file is read as float32
        return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

    return {n: (as_float(tensors[f"{n}.lora_A"]), as_float(tensors[f"{n}.lora_B"]), s)
            for n in names}


def _as_adapter(name: str, source: Any) -> Adapter:
    if isinstance(source, nn.Module):
        return adapter_from_model(source)
    if isinstance(source, (str, Path)):
        return read_adapter(source)
    if isinstance(source, Mapping) and source:
        for layer, value in source.items():
            if not (isinstance(value, Sequence) and len(value) == 3):
                raise TypeError(f"adapter {name!r}, layer {layer!r}: expected (A, B, s), got "
                                f"{type(value).__name__}")
        return {layer: (A, B, s) for layer, (A, B, s) in source.items()}
    raise TypeError(f"adapter {name!r} must be a LoRA model, a saved adapter directory or a "
                    f"non-empty dict {{module: (A, B, s)}}, got {type(source).__name__}")


def combine_named_adapters(adapters: Mapping[str, AdapterSource], weights: Mapping[str, float],
                           combination_type: str = "ties", density: float | None = 0.5,
                           rank: int | None = None,
                           generator: torch.Generator | None = None) -> Adapter:
    """Combine whole adapters, layer by layer, into a new adapter (PEFT's
    ``add_weighted_adapter`` for a whole model).

    Args:
        adapters: name → adapter, each a LoRA model (:func:`adapter_from_model`), a saved
            adapter directory (:func:`read_adapter`) or ``{module: (A, B, s)}``.
        weights: name → weight, for the adapters to combine (in this order; a subset of
            ``adapters`` is fine, as PEFT's ``adapters=[…], weights=[…]``).
        combination_type, density, rank, generator: as in :func:`combine_adapters`, per layer
            in the adapters' layer order (the generator's draws follow that order).

    Returns:
        ``{module: (A, B, 1.0)}``: the combined adapter, scaling 1 per layer. Put it into a
        base model with :func:`install_adapter`, or serve it with
        :func:`lora_edu.serving.inject_multi_lora`.

    Every layer is checked before any is combined, so bad input raises with nothing computed.
    """
    if not isinstance(weights, Mapping) or not weights:
        raise TypeError("weights must be a non-empty dict {adapter name: weight}, e.g. "
                        "{'docs': 1.0, 'code': 1.0}")
    if not isinstance(adapters, Mapping):
        raise TypeError(f"adapters must be a dict {{name: adapter}}, got "
                        f"{type(adapters).__name__}")
    unknown = [n for n in weights if n not in adapters]
    if unknown:
        raise ValueError(f"weights name adapter(s) {unknown} that are not in adapters "
                         f"({list(adapters)})")
    chosen = {n: _as_adapter(n, adapters[n]) for n in weights}
    names = list(chosen)
    layers = list(chosen[names[0]])
    for n in names[1:]:
        if set(chosen[n]) != set(layers):
            only = sorted(set(chosen[n]) ^ set(layers))[:3]
            raise ValueError(f"adapters {names[0]!r} and {n!r} adapt different modules (e.g. "
                             f"{only}); combine adapters of the same target modules")
    w = [weights[n] for n in names]
    prepared = {}
    for layer in layers:  # check everything first: nothing half-combined
        try:
            prepared[layer] = _prepare(
                [chosen[n][layer][:2] for n in names], w, [chosen[n][layer][2] for n in names],
                combination_type, density, rank, generator)
        except (TypeError, ValueError) as err:
            raise type(err)(f"layer {layer!r}: {err}") from None
    return {layer: (*_combine_checked(*args), 1.0) for layer, args in prepared.items()}


def install_adapter(model: nn.Module, adapter: Mapping[str, tuple]) -> nn.Module:
    """Put an adapter ``{module: (A, B, s)}`` into a model without LoRA, in place.

    Injects :class:`~lora_edu.lora.LoRALinear` into exactly those modules with the adapter's
    rank and ``lora_alpha`` chosen so that the layer's scaling is ``s`` (``α = s·r``), then
    copies A and B. All layers need the same rank and scaling (one ``LoraConfig``). Everything
    is checked before the model changes. Returns ``model``.
    """
    from lora_edu.lora import LoraConfig, inject_lora, lora_layers

    if list(lora_layers(model)):
        raise ValueError("model already has LoRA layers; install the adapter into a copy of "
                         "the base model without LoRA")
    adapter = _as_adapter("adapter", adapter)
    modules = dict(model.named_modules())
    ranks = {A.shape[0] for A, _, _ in adapter.values()}
    scalings = {float(s) for _, _, s in adapter.values()}
    if len(ranks) != 1 or len(scalings) != 1:
        raise ValueError(f"the adapter's layers have ranks {sorted(ranks)} and scalings "
                         f"{sorted(scalings)}; one LoraConfig needs one of each")
    for name, (A, B, _) in adapter.items():
        base = modules.get(name)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"module {name!r} is not an nn.Linear of the model")
        if (B.shape[0], A.shape[1]) != tuple(base.weight.shape) or B.shape[1] != A.shape[0]:
            raise ValueError(f"module {name!r} is {tuple(base.weight.shape)} but the adapter "
                             f"has A {tuple(A.shape)}, B {tuple(B.shape)}")
    (r,), (s,) = ranks, scalings
    if s <= 0:
        raise ValueError(f"scaling must be positive to be written as α/r, got {s}; fold it "
                         "into B first")
    targets = "|".join(re.escape(name) for name in adapter)
    inject_lora(model, LoraConfig(r=r, lora_alpha=s * r, target_modules=targets))
    layers = dict(lora_layers(model))
    with torch.no_grad():
        for name, (A, B, _) in adapter.items():
            layers[name].lora_A.copy_(A)
            layers[name].lora_B.copy_(B)
    return model


# --------------------------------------------------------------------------- evaluating one

@contextmanager
def merged(model: nn.Module, adapter: Mapping[str, tuple], scale: float = 1.0
           ) -> Iterator[nn.Module]:
    """Merge ``scale · s · B A`` of ``adapter`` ({module: (A, B, s)}) into the weights of a
    model without LoRA for the length of a ``with`` block; the weights are restored exactly.

    ``scale`` is the overall factor λ of a merge (``W0 + λ ΔW``), the one hyperparameter
    every combination type has: TIES-merging and DARE tune it on validation data. Every
    module and shape is checked before any weight changes.
    """
    scale = _check_number(scale, "scale")
    modules = dict(model.named_modules())
    for name, value in adapter.items():
        base = modules.get(name)
        if base is None:
            raise ValueError(f"the model has no module {name!r}; merge the adapter into the "
                             "base model it was trained on")
        if not isinstance(base, nn.Linear):
            raise TypeError(f"module {name!r} is a {type(base).__name__}, not an nn.Linear; "
                            "merge into a model without LoRA layers")
        A, B = value[0], value[1]
        if (B.shape[0], A.shape[1]) != tuple(base.weight.shape) or B.shape[1] != A.shape[0]:
            raise ValueError(f"module {name!r} is {tuple(base.weight.shape)} but the adapter "
                             f"has A {tuple(A.shape)}, B {tuple(B.shape)}")
    saved = {name: modules[name].weight.detach().clone() for name in adapter}
    try:
        with torch.no_grad():
            for name, (A, B, s) in adapter.items():
                weight = modules[name].weight
                delta = (B.to(weight.device, torch.float32) @ A.to(weight.device, torch.float32))
                weight.add_((scale * float(s) * delta).to(weight.dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                modules[name].weight.copy_(original)


@torch.no_grad()
def answer_items(model: nn.Module, batch: Any, chunk: int = 64) -> dict[str, torch.Tensor]:
    """Per prompt of a :class:`lora_edu.letter_tasks.TaskBatch`: ``"hits"`` (n,), how many of
    its L answer tokens the argmax predicts with the gold answer fed in, and ``"loss"`` (n,),
    their mean cross-entropy (nats/token).

    ``hits == L`` is a greedy exact match: greedy decoding reproduces the answer exactly when
    every answer token is the argmax given the gold prefix, so one teacher-forced pass scores
    it without generating. (The letter tasks have no end token; generation would go on
    after the L tokens, which this does not score.)
    """
    from lora_edu.letter_tasks import TaskBatch, _answer_logits

    if not isinstance(batch, TaskBatch):
        raise TypeError(f"batch must be a lora_edu.letter_tasks.TaskBatch, got "
                        f"{type(batch).__name__}")
    hits, losses = [], []
    for i in range(0, batch.input_ids.shape[0], chunk):
        part = TaskBatch(batch.input_ids[i:i + chunk], batch.answer_start)
        logits = _answer_logits(model, part).float()
        targets = part.input_ids[:, part.answer_start:]
        hits.append((logits.argmax(-1) == targets).sum(-1).cpu())
        losses.append(torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), targets, reduction="none").mean(-1).cpu())
    return {"hits": torch.cat(hits), "loss": torch.cat(losses)}

