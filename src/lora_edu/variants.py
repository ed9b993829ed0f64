"""LoRA's descendants: rsLoRA, PiSSA, DoRA and LoRA+, each a small change to one piece of LoRA.

All four keep the paper's pieces, a frozen :math:`W_0 \\in \\mathbb{R}^{d\\times k}` and a
low-rank update :math:`s\\,BA` with :math:`B \\in \\mathbb{R}^{d\\times r}`,
:math:`A \\in \\mathbb{R}^{r\\times k}`, and change one of them:

========  ===================  ================================================================
variant   what changes         here
========  ===================  ================================================================
rsLoRA    the scaling s        s = α/√r instead of α/r (:func:`rslora_scaling`;
                               ``LoraConfig(use_rslora=True)``) (Kalajdzievski, 2023)
PiSSA     the initialisation   B A = the top-r singular triplets of W0, W0 keeps the residual
                               (:func:`pissa_init_`) (Meng et al., 2024)
DoRA      the forward pass     W = m · (W0 + sBA) / ‖W0 + sBA‖, a learned magnitude per output
                               (:class:`DoRALinear`) (Liu et al., 2024)
LoRA+     the optimizer        B (and every 1-D trainable parameter) learns ``ratio`` times
                               faster than A (:func:`loraplus_param_groups`) (Hayou et al., 2024)
========  ===================  ================================================================

Definitions follow Hugging Face PEFT so that tests can compare with it number for number.

This module builds on :mod:`lora_edu.lora` and never the other way round: it *registers*
PiSSA as the initialisation ``"pissa"`` (with its rank check) and DoRA as the layer class
``"dora"`` when it is imported (the last lines of this file), and ``lora`` finds them through
its registry, importing this module by name the first time ``LoraConfig(use_dora=True)`` or
``init_lora_weights="pissa"`` is used (see :mod:`lora_edu.lora`'s docstring).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_edu.linalg import truncated_svd
from lora_edu.lora import (LoRALinear, lora_layers, lora_scaling, register_init_method,
                           register_layer_class)

__all__ = ["rslora_scaling", "pissa_factors", "check_pissa_rank", "pissa_init_", "DoRALinear",
           "loraplus_param_groups", "make_loraplus_optimizer"]


# --------------------------------------------------------------------------- rsLoRA

def rslora_scaling(lora_alpha: float, r: int) -> float:
    """Rank-stabilised scaling s = α/√r (Kalajdzievski, 2023).

    With s = α/r the update s·B A shrinks like 1/√r as r grows (B's entries each move about
    one learning rate per step, and a sum of r such terms grows like √r, not r), so large
    ranks learn slowly; α/√r keeps its size independent of r.
    """
    return lora_scaling(lora_alpha, r, use_rslora=True)


# --------------------------------------------------------------------------- PiSSA

def check_pissa_rank(r: int, shape: tuple[int, ...], name: str = "layer") -> None:
    """Refuse a PiSSA rank larger than the matrix has singular values (min(d, k))."""
    limit = min(shape)
    if r > limit:
        raise ValueError(f"PiSSA needs r <= min(d, k) = {limit} for {name} of shape "
                         f"{tuple(shape)}, got r={r}: a {shape[0]}×{shape[1]} matrix has only "
                         f"{limit} singular values; lower r or leave this layer out of "
                         "target_modules")


def pissa_factors(weight: torch.Tensor, r: int, scaling: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA's split of W (d×k) into a principal part s·B A and a residual.

    With the SVD W = U Σ Vᵀ and its top r triplets U_r, Σ_r, V_r:

        B = U_r (Σ_r/s)^½   (d×r),   A = (Σ_r/s)^½ V_rᵀ   (r×k),   W_res = W − s·B A,

    so s·B A = U_r Σ_r V_rᵀ is the best rank-r approximation of W (chapter 2) and
    W_res + s·B A = W. Dividing Σ by s (as PEFT does) makes the product exact for any α.
    The SVD runs in float32 (float64 stays float64); results have the SVD's dtype.

    Returns:
        ``(A, B, residual)`` of shapes (r, k), (d, r), (d, k).
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError(f"weight must be a 2-D float tensor, got {weight.dtype} of shape "
                        f"{tuple(weight.shape)}")
    check_pissa_rank(r, tuple(weight.shape), "weight")
    w = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    U, S, Vh = truncated_svd(w, r)  # chapter 2's top-r singular triplets
    root = torch.sqrt(S / scaling)
    A = root[:, None] * Vh
    B = U * root[None, :]
    return A, B, w - scaling * (B @ A)


@torch.no_grad()
def pissa_init_(layer: LoRALinear) -> LoRALinear:
    """Initialise ``layer`` by PiSSA, in place: A, B from W0's top-r SVD, W0 ← the residual.

    The layer's output is unchanged (up to rounding): W_res x + s·B A x = W0 x. What changes
    is where training starts: the trainable factors hold W0's principal directions, the frozen
    base keeps only the minor ones. Because ``base.weight`` now stores W_res, not W0, merging
    gives W_res + s·B A (= the fine-tuned W, as expected) but *unmerging* gives W_res, and an
    adapter saved from a PiSSA layer only makes sense on top of the same residual (or after
    converting it to a plain LoRA: ΔW = s·B A − s·B₀A₀, see chapter 14).

    Raises:
        ValueError: r > min(d, k), or the layer is merged. Nothing is modified then.
    """
    if not isinstance(layer, LoRALinear):
        raise TypeError(f"pissa_init_ expects a LoRALinear, got {type(layer).__name__}")
    if layer.merged:
        raise ValueError("pissa_init_ on a merged layer would split W0 + s·B A, not W0; "
                         "call layer.unmerge() first")
    weight = layer.base.weight
    w = weight.T if layer.fan_in_fan_out else weight
    check_pissa_rank(layer.r, tuple(w.shape), "the base weight")
    A, B, residual = pissa_factors(w, layer.r, layer.scaling)
    layer.lora_A.copy_(A.to(layer.lora_A.dtype))
    layer.lora_B.copy_(B.to(layer.lora_B.dtype))
    weight.copy_((residual.T if layer.fan_in_fan_out else residual).to(weight.dtype))
    if isinstance(layer, DoRALinear):
        layer.reset_magnitude()
    return layer


# --------------------------------------------------------------------------- DoRA

class DoRALinear(LoRALinear):
    """Weight-decomposed LoRA (Liu et al., 2024): a learned magnitude and a LoRA direction.

    The adapted weight W0 + s·B A (d×k) is split into the norm of each output row and its
    direction, and the norm is replaced by a trainable vector m ∈ ℝᵈ:

        W' = diag(m / n) (W0 + s·B A),   n_i = ‖(W0 + s·B A)_{i,:}‖₂,   h = W' x + b.

    At initialisation m = n, so h = W0 x + b exactly as with LoRA. As in the paper (§4.3) and
    PEFT, n is treated as a constant in the backward pass (``detach``): the gradient reaches
    A, B through the direction and m through the magnitude, at a fraction of the memory. Set
    ``detach_norm = False`` to back-propagate through n as well (the paper's ablation; not a
    PEFT option).

    Forward, for x of shape (..., k), with dropout p applied to x (PEFT's formula)::

        h = W0 x + b + (m/n − 1) ⊙ W0 x̃ + (m/n) ⊙ s·B A x̃,   x̃ = dropout(x)

    which equals diag(m/n)(W0 + s·B A) x + b when there is no dropout.

    Attributes (besides :class:`LoRALinear`'s):
        magnitude: ``nn.Parameter`` of shape (d,), trainable.
        detach_norm: whether n is a constant in the backward pass (default ``True``, as PEFT).
    """

    detach_norm: bool = True

    def __init__(self, base: nn.Module, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, **kwargs: Any) -> None:
        super().__init__(base, r, lora_alpha, lora_dropout, **kwargs)
        self.magnitude = nn.Parameter(torch.empty(self.out_features, dtype=self.lora_A.dtype,
                                                  device=self.lora_A.device))
        self.reset_magnitude()
        self._merged_norm: torch.Tensor | None = None

    def _w0(self) -> torch.Tensor:
        """W0 as (d, k) in the adapters' dtype."""
        weight = self.base.weight
        return (weight.T if self.fan_in_fan_out else weight).to(self.lora_A.dtype)

    def weight_norm(self) -> torch.Tensor:
        """n = the row norms of W0 + s·B A, shape (d,). Valid only while unmerged."""
        delta = self.lora_B @ self.lora_A * self.scaling
        return torch.linalg.vector_norm(self._w0() + delta, dim=1)

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """m ← n, which makes the layer compute W0 x + s·B A x + b (LoRA's output)."""
        if getattr(self, "magnitude", None) is not None:
            self.magnitude.copy_(self.weight_norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = W0 x + b + (m/n − 1) ⊙ W0 x̃ + (m/n) ⊙ s·B A x̃; x: (..., k) → (..., d)."""
        result = self.base(x)
        if self.merged or self.disabled:
            return result
        x_lora = self.lora_dropout(x.to(self.lora_A.dtype))
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_out = result.to(x_lora.dtype)
            if self.base.bias is not None:
                base_out = base_out - self.base.bias.to(x_lora.dtype)
        else:  # the dropped-out x must reach W0 too, or the (m/n − 1) term would use another x
            base_out = F.linear(x_lora, self._w0())
        norm = self.weight_norm()
        scale = self.magnitude / (norm.detach() if self.detach_norm else norm)
        lora_out = (x_lora @ self.lora_A.T) @ self.lora_B.T * self.scaling
        return result + ((scale - 1) * base_out + scale * lora_out).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """W' − W0 = diag(m/n)(W0 + s·B A) − W0, shaped like ``base.weight``; needs W0 unmerged."""
        w0 = self._w0()
        with torch.no_grad():
            n = self.weight_norm()
        merged = (self.magnitude / n)[:, None] * (w0 + self.lora_B @ self.lora_A * self.scaling)
        delta = merged - w0
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """W ← diag(m/n)(W0 + s·B A); n is kept so that :meth:`unmerge` can invert it."""
        if self.merged:
            return
        norm = self.weight_norm()
        weight = self.base.weight
        new = (self.magnitude / norm)[:, None] * (self._w0() + self.lora_B @ self.lora_A
                                                   * self.scaling)
        new = new.T if self.fan_in_fan_out else new
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError("safe_merge: the DoRA-merged weight has non-finite entries "
                             "(check m, A and B); the base weight is unchanged")
        weight.copy_(new.to(weight.dtype))
        self._merged_norm = norm
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W'·n/m − s·B A, the inverse of :meth:`merge` (exact up to rounding)."""
        if not self.merged:
            return
        weight = self.base.weight
        w = (weight.T if self.fan_in_fan_out else weight).to(self.lora_A.dtype)
        w0 = w * (self._merged_norm / self.magnitude)[:, None] - self.lora_B @ self.lora_A \
            * self.scaling
        weight.copy_((w0.T if self.fan_in_fan_out else w0).to(weight.dtype))
        self._merged_norm = None
        self.merged = False


# --------------------------------------------------------------------------- LoRA+

def _no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get no weight decay, by the rule PEFT (through
    ``transformers.trainer_pt_utils.get_parameter_names``) uses: a name that contains
    ``"bias"``, or a parameter inside an ``nn.LayerNorm``."""
    in_norm = {f"{m}.{n}" if m else n for m, module in model.named_modules()
               if isinstance(module, nn.LayerNorm) for n, _ in module.named_parameters()}
    return {n for n, _ in model.named_parameters() if "bias" in n or n in in_norm}


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0,
                          weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+ (Hayou et al., 2024), as PEFT builds them.

    Hayou et al. show that, for wide layers, equal learning rates for A (r×k) and B (d×r,
    starting at zero) are inefficient: B should move ``ratio`` = η_B/η_A times faster.
    ``peft.optimizers.create_loraplus_optimizer`` (PEFT 0.21) puts every trainable parameter
    in one of these groups, and so does this function (same members, rates and decays):

    ===================  ===========================================  ==========  ============
    group                which trainable parameters                   lr          weight decay
    ===================  ===========================================  ==========  ============
    ``groupA``           the rest: ``lora_A`` and other ≥ 2-D ones    lr          weight_decay
    ``groupB``           ``lora_B`` and every 1-D parameter (DoRA's   lr · ratio  weight_decay
                         magnitude) that takes weight decay
    ``groupB_no_decay``  the same kinds that take none: biases        lr · ratio  0
                         (names with ``"bias"``) and the weights of
                         ``nn.LayerNorm`` layers
    ===================  ===========================================  ==========  ============

    PEFT has a fourth group for LoRA on embedding layers, which lora_edu does not adapt, and
    passes empty groups to the optimizer; here empty groups are left out (they change
    nothing). Frozen parameters are left out. Each group carries its ``"name"``.

    Use: ``torch.optim.AdamW(loraplus_param_groups(model, 2e-4, 16))``.

    Raises:
        ValueError: ``lr``/``ratio`` not finite and positive, ``weight_decay`` negative or not
            finite, or a model without LoRA layers.
    """
    for name, value in (("lr", lr), ("ratio", ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite positive number, got {value!r}; "
                             "LoRA+ suggests ratio = 16")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) \
            or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    b_params = {id(layer.lora_B) for _, layer in lora_layers(model)}
    if not b_params:
        raise ValueError("model has no LoRA layer, so LoRA+ has no B to speed up; call "
                         "inject_lora(model, cfg) first")
    no_decay = _no_decay_names(model)
    members: dict[str, list[nn.Parameter]] = {"groupA": [], "groupB": [], "groupB_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in b_params or p.ndim == 1:
            members["groupB_no_decay" if name in no_decay else "groupB"].append(p)
        else:
            members["groupA"].append(p)
    settings = {"groupA": (lr, weight_decay), "groupB": (lr * ratio, weight_decay),
                "groupB_no_decay": (lr * ratio, 0.0)}
    return [{"params": ps, "lr": settings[k][0], "weight_decay": settings[k][1], "name": k}
            for k, ps in members.items() if ps]


def make_loraplus_optimizer(model: nn.Module, lr: float, ratio: float = 16.0,
                            weight_decay: float = 0.0, **adamw_kwargs: Any) -> torch.optim.AdamW:
    """AdamW over :func:`loraplus_param_groups`: what ``create_loraplus_optimizer(model,
    torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio, loraplus_weight_decay=weight_decay)``
    builds in PEFT."""
    return torch.optim.AdamW(loraplus_param_groups(model, lr, ratio, weight_decay), lr=lr,
                             **adamw_kwargs)


# --------------------------------------------------------------------------- registration
# What lora_edu.lora finds by name: LoraConfig(init_lora_weights="pissa"),
# LoraConfig(use_dora=True).

register_init_method("pissa", pissa_init_, check=check_pissa_rank)
register_layer_class("dora", DoRALinear)
