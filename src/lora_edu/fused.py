"""LoRA on chosen slices of a fused projection: the paper's ``MergedLinear``.

GPT-2 computes queries, keys and values with one fused layer, ``c_attn``, whose output is
``[q; k; v]``. The LoRA paper adapts only :math:`W_q` and :math:`W_v`, so its reference code
(``loralib.MergedLinear(..., enable_lora=[True, False, True])``) gives each *enabled slice*
of the fused output its own pair of factors and leaves the other slices alone.

With the fused weight :math:`W_0 \\in \\mathbb{R}^{d\\times k}` split row-wise into ``n``
slices of :math:`d_s = d/n` rows each, and :math:`E` the set of enabled slices
(:math:`m = |E|`), :class:`MergedLoRALinear` computes

.. math::  h = W_0 x + b + s\\,\\begin{bmatrix} \\vdots \\\\ [i \\in E]\\; B_i A_i x \\\\
           \\vdots \\end{bmatrix}, \\qquad A_i \\in \\mathbb{R}^{r\\times k},\\;
           B_i \\in \\mathbb{R}^{d_s\\times r},\\; s = \\alpha / r,

so :math:`\\Delta W` is block-structured: rows of a disabled slice are exactly zero, and each
enabled slice has its own rank-:math:`r` update. As in loralib, the factors are stored
stacked: ``lora_A`` is ``(m·r, k)`` (the :math:`A_i` on top of one another) and ``lora_B`` is
``(m·d_s, r)`` (the :math:`B_i`). ``m·r·(k + d_s)`` parameters train.

PEFT has no ``enable_lora``: its LoRA on ``c_attn`` is one :math:`BA` over the whole fused
output. The same *function* is a PEFT adapter of rank :math:`m r` with
:math:`A = [A_1; \\dots; A_m]` and a block-diagonal :math:`B` whose disabled rows are zero
(:meth:`MergedLoRALinear.peft_factors`); training that PEFT adapter would not keep the zeros,
which is why ``enable_lora`` exists.

Precision follows :class:`lora_edu.lora.LoRALinear` (and PEFT's default): with an fp16 or bf16
fused weight, ``lora_A`` and ``lora_B`` are float32, the branch runs in float32 and is rounded
once to the output's dtype, and :meth:`~MergedLoRALinear.merge` forms ``W0 + ΔW`` in float32
and rounds it once to the weight's dtype (never ΔW first and then the sum).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lora_edu.lora import mark_only_lora_as_trainable, replace_module

__all__ = ["MergedLoRALinear", "inject_merged_lora"]


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``transformers.Conv1D``: weight stored as ``(k, d)``, ``forward = x @ W + b``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _check_enable(enable_lora: Any) -> list[bool]:
    if isinstance(enable_lora, (str, bytes)) or not isinstance(enable_lora, Sequence):
        raise TypeError(f"enable_lora must be a list of bools, one per slice of the fused "
                        f"output (GPT-2's c_attn: [True, False, True] for q and v), got "
                        f"{enable_lora!r}")
    flags = list(enable_lora)
    if not flags or not all(isinstance(f, bool) for f in flags):
        raise TypeError(f"enable_lora must be a non-empty list of True/False, got {enable_lora!r}")
    if not any(flags):
        raise ValueError("enable_lora has no True entry, so no slice would be adapted; "
                         "enable at least one slice (or do not wrap the layer)")
    return flags


class MergedLoRALinear(nn.Module):
    """A fused linear layer with LoRA on the slices that ``enable_lora`` names.

    Args:
        base: the fused layer, an ``nn.Linear`` (weight ``(d, k)``) or GPT-2's ``Conv1D``
            (weight ``(k, d)``, detected automatically); ``d`` must divide by
            ``len(enable_lora)``.
        r: rank of each enabled slice's update.
        lora_alpha: α in ``s = α/r``.
        enable_lora: one bool per slice, e.g. ``[True, False, True]`` for ``[q; k; v]``.
        lora_dropout: dropout on the input of the LoRA branch only.

    Shapes: ``x (..., k) -> h (..., d)``; ``lora_A (m·r, k)``, ``lora_B (m·d_s, r)``.
    ``B = 0`` at initialisation, so the layer starts as ``base`` exactly. With an fp16/bf16
    base weight the factors are float32 (see the module docstring).
    """

    def __init__(self, base: nn.Module, r: int = 8, lora_alpha: float = 8,
                 enable_lora: Sequence[bool] = (True, False, True),
                 lora_dropout: float = 0.0) -> None:
        super().__init__()
        if _is_conv1d(base):
            self.fan_in_fan_out = True
        elif isinstance(base, nn.Linear):
            self.fan_in_fan_out = False
        else:
            raise TypeError(f"MergedLoRALinear wraps an nn.Linear or GPT-2's Conv1D, got a "
                            f"{type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) \
                or not lora_alpha > 0:
            raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}")
        if not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        flags = _check_enable(enable_lora)
        weight = base.weight
        d, k = weight.shape[::-1] if self.fan_in_fan_out else weight.shape
        if d % len(flags):
            raise ValueError(f"the fused layer has {d} outputs, which do not split into "
                             f"len(enable_lora)={len(flags)} equal slices; give one flag per "
                             f"slice (GPT-2's c_attn has 3: q, k, v)")
        self.base, self.r, self.lora_alpha = base, r, float(lora_alpha)
        self.enable_lora = flags
        self.in_features, self.out_features = k, d
        self.slice_size = d // len(flags)
        self.scaling = lora_alpha / r
        m = sum(flags)
        # Half-precision factors lose small updates to rounding: float32, as LoRALinear and PEFT.
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        factory = {"device": weight.device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(m * r, k, **factory))
        self.lora_B = nn.Parameter(torch.empty(m * self.slice_size, r, **factory))
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    @property
    def enabled_slices(self) -> list[int]:
        """Indices of the slices that carry LoRA (``[0, 2]`` for ``[True, False, True]``)."""
        return [i for i, on in enumerate(self.enable_lora) if on]

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """Each ``A_i`` as ``nn.Linear``'s default (Kaiming-uniform, a = √5); ``B = 0``."""
        for A_i in self.lora_A.view(-1, self.r, self.in_features):
            nn.init.kaiming_uniform_(A_i, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        """``s·[.., B_i A_i x, ..]`` with zeros in the disabled slices: ``(..., k) -> (..., d)``."""
        m, n = len(self.enabled_slices), len(self.enable_lora)
        ax = (x @ self.lora_A.T).unflatten(-1, (m, self.r))               # (..., m, r)
        B = self.lora_B.view(m, self.slice_size, self.r)                   # (m, d_s, r)
        per_slice = torch.einsum("...mr,mdr->...md", ax, B)                # (..., m, d_s)
        out = per_slice.new_zeros(*per_slice.shape[:-2], n, self.slice_size)
        out[..., self.enabled_slices, :] = per_slice
        return out.flatten(-2) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``h = W0 x + b + s·[B_i A_i dropout(x)]_i``; ``x (..., k) -> (..., d)``."""
        result = self.base(x)
        if self.merged:
            return result
        branch = self._branch(self.lora_dropout(x.to(self.lora_A.dtype)))
        return result + branch.to(result.dtype)  # the float32 branch, rounded once

    def delta_weight(self) -> torch.Tensor:
        """ΔW shaped like ``base.weight``: ``(d, k)``, or ``(k, d)`` for a ``Conv1D``.

        Row block ``i`` is ``s·B_i A_i`` for an enabled slice and zero otherwise. Computed in
        float32 at least (float64 stays float64), whatever the weights' dtype.
        """
        m = len(self.enabled_slices)
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        A = self.lora_A.to(dtype).view(m, self.r, self.in_features)
        B = self.lora_B.to(dtype).view(m, self.slice_size, self.r)
        delta = A.new_zeros(len(self.enable_lora), self.slice_size, self.in_features)
        delta[self.enabled_slices] = B @ A
        delta = delta.flatten(0, 1) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of one ordinary LoRA of rank ``m·r`` with the same ΔW (up to ``s``).

        ``A = [A_1; ...; A_m]`` is ``(m·r, k)``; ``B`` is ``(d, m·r)``, block ``(i, j)`` equal
        to ``B_j`` when slice ``i`` is the ``j``-th enabled one and zero otherwise, so that
        ``B @ A = ΔW / s`` in the ``(d, k)`` orientation. With PEFT's scaling set to the same
        ``s`` (``lora_alpha = α·m`` for rank ``m·r``) PEFT's layer computes this one's function.
        """
        m = len(self.enabled_slices)
        B_blocks = self.lora_B.detach().view(m, self.slice_size, self.r)
        B = self.lora_B.new_zeros(self.out_features, m * self.r)
        for j, i in enumerate(self.enabled_slices):
            rows = slice(i * self.slice_size, (i + 1) * self.slice_size)
            B[rows, j * self.r:(j + 1) * self.r] = B_blocks[j]
        return self.lora_A.detach().clone(), B

    @torch.no_grad()
    def merge(self) -> None:
        """``W ← round(W0 + ΔW)``: the sum formed in float32 (at least) and rounded once to the
        weight's dtype; a no-op if already merged."""
        if not self.merged:
            weight, delta = self.base.weight, self.delta_weight()
            weight.copy_((weight.to(delta.dtype) + delta).to(weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W ← round(W − ΔW)`` (exact up to that one rounding); a no-op if not merged."""
        if self.merged:
            weight, delta = self.base.weight, self.delta_weight()
            weight.copy_((weight.to(delta.dtype) - delta).to(weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return (f"r={self.r}, lora_alpha={self.lora_alpha:g}, enable_lora={self.enable_lora}, "
                f"slice_size={self.slice_size}, merged={self.merged}")


def inject_merged_lora(model: nn.Module, target_modules: Sequence[str] = ("c_attn",),
                       r: int = 8, lora_alpha: float = 8,
                       enable_lora: Sequence[bool] = (True, False, True),
                       lora_dropout: float = 0.0) -> nn.Module:
    """Wrap every module whose name is or ends in ``"." + t`` for ``t`` in ``target_modules``.

    All targets are checked (and their wrappers built) before the model changes; afterwards
    only ``lora_A``/``lora_B`` train. Returns ``model``.
    """
    if isinstance(target_modules, str) or not isinstance(target_modules, Sequence):
        raise TypeError(f"target_modules must be a list of module names, got {target_modules!r}")
    names = [n for n, _ in model.named_modules()
             if n and any(re.fullmatch(rf"(.*\.)?{re.escape(t)}", n) for t in target_modules)]
    if not names:
        raise ValueError(f"target_modules={list(target_modules)} matches no module of the model")
    wrappers = {}
    for name in names:
        try:
            wrappers[name] = MergedLoRALinear(model.get_submodule(name), r, lora_alpha,
                                              enable_lora, lora_dropout)
        except (TypeError, ValueError) as err:
            raise type(err)(f"target module {name!r}: {err}") from None
    for name, wrapper in wrappers.items():
        replace_module(model, name, wrapper)
    mark_only_lora_as_trainable(model)
    return model
