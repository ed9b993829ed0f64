"""QLoRA from scratch: NF4, blockwise quantisation, double quantisation, LoRA on a 4-bit base.

QLoRA (Dettmers et al., 2023) fine-tunes a model whose frozen weights
:math:`W_0 \\in \\mathbb{R}^{d\\times k}` are stored in 4 bits, with LoRA factors
:math:`B \\in \\mathbb{R}^{d\\times r}`, :math:`A \\in \\mathbb{R}^{r\\times k}` kept in 16/32 bits:

.. math::  h = \\mathrm{dequant}(W_0^{\\mathrm{NF4}})\\, x + b + \\tfrac{\\alpha}{r} B A x .

The pieces, in the order the chapter builds them:

* a **codebook** of at most 16 values in [-1, 1] (4 bits give 16 bit patterns):
  :func:`nf4_codebook` (16 distinct values), and the baselines :func:`int4_codebook`
  (15 symmetric levels) and :func:`fp4_codebook` (OCP E2M1: 16 patterns, 15 values, as
  +0 and -0 coincide);
* **blockwise absmax quantisation**: the flattened tensor is cut into blocks of
  ``block_size`` values; each block is divided by its absolute maximum ``c`` (kept in fp32)
  and every value is replaced by the index of the nearest code, so
  :math:`\\hat w = c \\cdot \\mathrm{code}[i]` (:func:`quantize_blockwise`, :func:`quantize_nf4`);
* **packing**: two 4-bit indices per byte (:func:`pack_4bit`, :func:`unpack_4bit`);
* **double quantisation**: the fp32 constants ``c`` are themselves quantised to 8-bit floats
  in blocks of 256 (:func:`double_quantize`), cutting their cost from 32/64 = 0.5 to about
  0.127 bits per parameter;
* :class:`Linear4bit`, a frozen linear layer stored that way and dequantised on the fly, and
  :class:`LoRALinear4bit`, :class:`lora_edu.lora.LoRALinear` on top of it;
  :func:`inject_lora_4bit` puts both into a model;
* **LoftQ** initialisation (Li et al., 2024): :func:`loftq_init` alternates quantisation and a
  rank-r SVD of the residual so that ``Q + s·B A`` starts close to ``W0``
  (``inject_lora_4bit(..., loftq_iters=T)`` uses it);
* **merging a QLoRA adapter** for deployment: :func:`merge_qlora_layer` and
  :func:`merge_qlora` add ``s·B A`` to the dequantised ``Ŵ0`` (kept in 16 bit), to the original
  ``W0``, or to ``Ŵ0`` and quantise the sum again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_edu.linalg import truncated_svd
from lora_edu.lora import (LoraConfig, LoRALinear, find_targets, lora_scaling,
                           mark_only_lora_as_trainable, replace_module)
from lora_edu.models import count_bytes

__all__ = [
    "NF4_OFFSET", "nf4_codebook", "int4_codebook", "fp4_codebook", "max_half_gap",
    "pack_4bit", "unpack_4bit", "DoubleQuantizedAbsmax", "double_quantize", "QuantizedTensor",
    "quantize_blockwise", "quantize_nf4", "Linear4bit", "LoRALinear4bit", "inject_lora_4bit",
    "storage_bits", "LoftQInit", "loftq_init", "QLORA_MERGES", "merge_qlora_layer",
    "merge_qlora",
]

#: The probability of the outermost NF4 quantile, as in bitsandbytes' ``create_normal_map``.
#: Φ⁻¹(1) is infinite, so the quantiles must stop short of 1. To the seven digits given this
#: equals 1 − ½(1/30 + 1/32), the mean of the centres of the last of 15 and of 16
#: equal-probability bins.
NF4_OFFSET = 0.9677083

#: The 8-bit float used for the second quantisation (E4M3; its largest finite value is 448).
_FP8 = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(_FP8).max


# --------------------------------------------------------------------------- codebooks

def nf4_codebook() -> Tensor:
    """The 16 NormalFloat-4 values, ascending, in float32: 7 negative, an exact 0, 8 positive.

    Built as in QLoRA (Dettmers et al., 2023, Sec. 3) and bitsandbytes: quantiles
    :math:`\\Phi^{-1}(p)` of N(0, 1) at 8 probabilities evenly spaced from ``NF4_OFFSET``
    towards 0.5 for the positive half, 7 for the negative half, plus 0; then divided by the
    largest so the values span [-1, 1]. The asymmetry (8 vs 7) buys an exact zero, so zero
    weights and padding stay exactly zero.
    """
    def half(n: int) -> Tensor:  # n quantiles in (0.5, NF4_OFFSET], the last point 0.5 dropped
        p = torch.linspace(NF4_OFFSET, 0.5, n + 1, dtype=torch.float64)[:-1]
        return torch.special.ndtri(p)

    values = torch.cat([half(8), -half(7), torch.zeros(1, dtype=torch.float64)])
    values = values.sort().values
    return (values / values.max()).to(torch.float32)


def int4_codebook() -> Tensor:
    """Symmetric 4-bit integers as a codebook: ``{-7, ..., 7} / 7`` (15 values, ascending).

    This is absmax int4 quantisation, ``round(7 w / c) / 7 · c``: evenly spaced levels. Only 15
    of the 16 bit patterns are used (-8 is left out) so that the grid is symmetric and
    contains 0.
    """
    return torch.arange(-7, 8, dtype=torch.float32) / 7


def fp4_codebook() -> Tensor:
    """FP4 as the OCP Microscaling (MX) specification defines it, E2M1, scaled into [-1, 1].

    E2M1 has 1 sign, 2 exponent and 1 mantissa bit (exponent bias 1). Its 8 magnitudes are
    0, 0.5 (subnormal), 1, 1.5, 2, 3, 4, 6, divided here by 6; with the sign bit that makes
    16 bit patterns but only 15 distinct values (+0 and −0 coincide). Returns the 16 values
    ascending (0 twice). This is *not* bitsandbytes' ``fp4`` quant type, whose table has the
    magnitudes 0, 0.0625, 2, 3, 4, 6, 8, 12 divided by 12: the same values except the smallest
    non-zero one (0.0625/12 instead of 0.5/6).
    """
    magnitudes = []
    for exponent in range(4):
        for mantissa in range(2):
            if exponent == 0:  # subnormal: no implicit leading 1
                magnitudes.append(0.5 * mantissa)
            else:
                magnitudes.append(2.0 ** (exponent - 1) * (1 + 0.5 * mantissa))
    pos = torch.tensor(magnitudes, dtype=torch.float32) / max(magnitudes)
    return torch.cat([-pos, pos]).sort().values


def max_half_gap(codebook: Tensor) -> float:
    """Half the largest gap between neighbouring codes: the worst rounding error on [-1, 1].

    A value ``x`` in [min, max] of the codebook is at most this far from its nearest code, so
    after absmax scaling ``|w − ŵ| <= c · max_half_gap`` for every weight of a block.
    """
    codebook = _check_codebook(codebook)
    return float((codebook[1:] - codebook[:-1]).max() / 2)


def _check_codebook(codebook: Any) -> Tensor:
    if not isinstance(codebook, Tensor) or codebook.dim() != 1 or not codebook.is_floating_point():
        raise TypeError("codebook must be a 1-D floating-point tensor (e.g. nf4_codebook()), "
                        f"got {type(codebook).__name__}")
    if not 2 <= codebook.numel() <= 16:
        raise ValueError(f"codebook must hold 2 to 16 values to fit in 4 bits, got "
                         f"{codebook.numel()}")
    codebook = codebook.detach().float().cpu()
    if (codebook[1:] < codebook[:-1]).any() or codebook.abs().max() != 1:
        raise ValueError("codebook must be sorted ascending with max |value| = 1 (absmax "
                         "scaling maps every block into [-1, 1]); sort it and divide by its "
                         "largest magnitude")
    return codebook


# --------------------------------------------------------------------------- packing

def pack_4bit(codes: Tensor) -> Tensor:
    """Pack 4-bit indices two per byte: ``codes`` (n,) uint8 in [0, 15], n even → (n/2,) uint8.

    Element ``2i`` goes to the high nibble of byte ``i`` and element ``2i+1`` to the low nibble
    (the order bitsandbytes uses).
    """
    if not isinstance(codes, Tensor) or codes.dtype != torch.uint8 or codes.dim() != 1:
        raise TypeError("codes must be a 1-D uint8 tensor of 4-bit indices, got "
                        f"{getattr(codes, 'dtype', type(codes).__name__)}")
    if codes.numel() % 2:
        raise ValueError(f"codes must have an even length to pack two per byte, got "
                         f"{codes.numel()}; pad with one more index")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"codes must lie in [0, 15] to fit in 4 bits, got max {int(codes.max())}")
    return (codes[0::2] << 4) | codes[1::2]


def unpack_4bit(packed: Tensor) -> Tensor:
    """The inverse of :func:`pack_4bit`: (m,) uint8 → (2m,) uint8 indices in [0, 15]."""
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError("packed must be a 1-D uint8 tensor (from pack_4bit), got "
                        f"{getattr(packed, 'dtype', type(packed).__name__)}")
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).flatten()


# --------------------------------------------------------------------------- double quantisation

@dataclass(frozen=True)
class DoubleQuantizedAbsmax:
    """The absmax constants ``c`` (n,) stored as 8-bit floats, blockwise (QLoRA Sec. 3).

    ``c ≈ codes · scales[block] + offset``: ``offset`` (fp32 scalar) is the mean of ``c``,
    removed first so that the values are centred on 0 and a symmetric 8-bit float fits them;
    ``scales`` (fp32, one per block of ``block_size``) maps each block's absmax onto the
    largest E4M3 value, 448. ``codes`` holds the E4M3 bit patterns as uint8, padded with
    zeros to a whole number of blocks.
    """

    codes: Tensor
    scales: Tensor
    offset: Tensor
    numel: int
    block_size: int

    def dequantize(self) -> Tensor:
        """The constants ``ĉ`` (numel,) in float32."""
        blocks = self.codes.view(_FP8).float().view(-1, self.block_size)
        return (blocks * self.scales[:, None] + self.offset).flatten()[: self.numel]

    def tensors(self) -> list[Tensor]:
        return [self.codes, self.scales, self.offset]


def double_quantize(absmax: Tensor, block_size: int = 256) -> DoubleQuantizedAbsmax:
    """Quantise the first-level constants ``absmax`` (n,) fp32 to E4M3, blockwise.

    Blocks of ``block_size`` constants, each with its own fp32 scale (see
    :class:`DoubleQuantizedAbsmax`).
    """
    if not isinstance(absmax, Tensor) or absmax.dim() != 1 or not absmax.is_floating_point():
        raise TypeError("absmax must be a 1-D floating-point tensor of quantisation constants")
    _check_block_size(block_size, "double_quant_block_size")
    c = absmax.detach().float()
    offset = c.mean()
    centred = F.pad(c - offset, (0, (-c.numel()) % block_size)).view(-1, block_size)
    scales = centred.abs().amax(dim=1) / _FP8_MAX
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # a constant block: code 0
    codes = (centred / scales[:, None]).to(_FP8).view(torch.uint8).flatten()
    return DoubleQuantizedAbsmax(codes, scales, offset, c.numel(), block_size)


# --------------------------------------------------------------------------- the quantised tensor

@dataclass(frozen=True)
class QuantizedTensor:
    """A tensor ``W`` stored as packed 4-bit indices plus one constant per block.

    Attributes:
        packed: (n_padded/2,) uint8, two indices per byte (:func:`pack_4bit`); ``n_padded`` is
            ``W.numel()`` rounded up to a whole number of blocks.
        absmax: (n_blocks,) fp32 constants ``c``, or their :class:`DoubleQuantizedAbsmax`.
        codebook: (≤16,) fp32 values in [-1, 1].
        shape, dtype: those of the original ``W``.
        block_size: values per block.
    """

    packed: Tensor
    absmax: Tensor | DoubleQuantizedAbsmax
    codebook: Tensor
    shape: torch.Size
    dtype: torch.dtype
    block_size: int

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def constants(self) -> Tensor:
        """The per-block constants as used for dequantising, (n_blocks,) fp32."""
        if isinstance(self.absmax, DoubleQuantizedAbsmax):
            return self.absmax.dequantize()
        return self.absmax

    def codes(self) -> Tensor:
        """The unpacked indices, (n_padded,) uint8."""
        return unpack_4bit(self.packed)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """``ŵ = c[block] · codebook[index]``, shaped like ``W``, in ``dtype`` (default ``W``'s)."""
        values = self.codebook.to(self.packed.device)[self.codes().long()]
        values = values.view(-1, self.block_size) * self.constants()[:, None]
        return values.flatten()[: self.numel].view(self.shape).to(dtype or self.dtype)

    def tensors(self) -> list[Tensor]:
        """Every tensor this representation stores (the codebook is shared, so not counted)."""
        absmax = self.absmax.tensors() if isinstance(self.absmax, DoubleQuantizedAbsmax) \
            else [self.absmax]
        return [self.packed, *absmax]

    def bits_per_parameter(self) -> float:
        """Stored bits (indices + constants, from the actual tensors) per element of ``W``."""
        return storage_bits(self.tensors()) / self.numel

    def constant_bits_per_parameter(self) -> float:
        """The constants' share of :meth:`bits_per_parameter` (paper: 0.5, or 0.127 with DQ)."""
        return storage_bits(self.tensors()[1:]) / self.numel


def storage_bits(tensors: Any) -> int:
    """Bits held by an iterable of tensors: 8 × :func:`lora_edu.models.count_bytes`."""
    return 8 * count_bytes(tensors)


def _check_block_size(block_size: Any, name: str) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"{name} must be an int, got {type(block_size).__name__}")
    if block_size < 2 or block_size % 2:
        raise ValueError(f"{name} must be an even int >= 2 (two 4-bit codes share a byte), got "
                         f"{block_size}; QLoRA uses 64 for weights and 256 for constants")
    return block_size


def _check_weight(W: Any) -> None:
    if not isinstance(W, Tensor):
        raise TypeError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if not W.is_floating_point():
        raise TypeError(f"W must be a floating-point tensor (float32, float16 or bfloat16) to be "
                        f"quantised, got {W.dtype}; it may already be quantised, or convert it "
                        f"with W.float()")
    if W.numel() == 0:
        raise ValueError("W is empty; there is nothing to quantise")
    if not torch.isfinite(W).all():
        raise ValueError("W contains inf or NaN; a block's absmax would be non-finite and the "
                         "whole block lost. Fix the weights before quantising")


def quantize_blockwise(W: Tensor, codebook: Tensor, block_size: int = 64, *,
                       double_quant: bool = False, double_quant_block_size: int = 256,
                       pad: bool = True) -> QuantizedTensor:
    """Blockwise absmax quantisation of ``W`` (any shape) onto a ≤16-value ``codebook``.

    The flattened ``W`` is cut into blocks of ``block_size``; block ``j`` is scaled by its
    absmax ``c_j = max |w|`` into [-1, 1], and each value becomes the index of the nearest code.

    Args:
        W: a floating-point tensor of any shape.
        codebook: ascending values with max magnitude 1 (:func:`nf4_codebook` etc.).
        block_size: values per block (even).
        double_quant: also quantise the constants (:func:`double_quantize`).
        double_quant_block_size: the second quantisation's block size.
        pad: if ``W.numel()`` is not a multiple of ``block_size``, pad the last block with zeros
            (which does not change its absmax and is dropped on dequantisation); with
            ``pad=False`` such a ``W`` is refused.

    Raises:
        TypeError: ``W`` is not a floating-point tensor; a bad ``codebook`` or ``block_size``.
        ValueError: ``W`` is empty or non-finite; ``block_size`` odd; it does not divide
            ``W.numel()`` and ``pad=False``.
    """
    _check_weight(W)
    codebook = _check_codebook(codebook).to(W.device)
    _check_block_size(block_size, "block_size")
    if double_quant:
        _check_block_size(double_quant_block_size, "double_quant_block_size")
    remainder = (-W.numel()) % block_size
    if remainder and not pad:
        raise ValueError(f"block_size={block_size} does not divide W.numel()={W.numel()}; pass "
                         f"pad=True to pad the last block with {remainder} zeros, or choose a "
                         f"block size that divides it")
    blocks = F.pad(W.detach().flatten().float(), (0, remainder)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    # An all-zero block has c = 0; dividing by 1 instead maps it onto the exact code 0.
    normalised = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    codes = _nearest_code(normalised.flatten(), codebook)
    constants: Tensor | DoubleQuantizedAbsmax = absmax
    if double_quant:
        constants = double_quantize(absmax, double_quant_block_size)
    return QuantizedTensor(pack_4bit(codes), constants, codebook, W.shape, W.dtype, block_size)


def _nearest_code(x: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest code for each ``x``: binary search among the midpoints."""
    midpoints = (codebook[1:] + codebook[:-1]) / 2
    return torch.bucketize(x, midpoints).to(torch.uint8)


def quantize_nf4(W: Tensor, block_size: int = 64, *, double_quant: bool = False,
                 double_quant_block_size: int = 256, pad: bool = True) -> QuantizedTensor:
    """NF4 quantisation as in QLoRA: :func:`quantize_blockwise` with :func:`nf4_codebook`.

    ``quantize_nf4(W).dequantize()`` is a tensor like ``W`` (same shape and dtype) with every
    element within ``c · max_half_gap(nf4_codebook())`` of the original, ``c`` its block's absmax.
    """
    return quantize_blockwise(W, nf4_codebook(), block_size, double_quant=double_quant,
                              double_quant_block_size=double_quant_block_size, pad=pad)


# --------------------------------------------------------------------------- layers

class Linear4bit(nn.Module):
    """A frozen linear layer ``h = Ŵ0 x + b`` whose weight lives in 4 bits.

    ``Ŵ0`` (d×k) is rebuilt from its NF4 codes in ``compute_dtype`` at every forward pass,
    and again in the backward pass, and dropped after each use: between the two, only the
    packed codes and constants stay in memory (as bitsandbytes does). The bias (if
    any) stays in full precision, as in bitsandbytes.

    The quantised storage is kept as buffers (so ``.to(device)`` and ``state_dict`` carry it).
    The codes are uint8, which ``model.to(dtype)`` leaves alone, but it would cast the fp32
    constants too: change the compute precision with ``compute_dtype`` instead.
    """

    def __init__(self, weight: QuantizedTensor, bias: Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not isinstance(weight, QuantizedTensor) or len(weight.shape) != 2:
            raise TypeError("weight must be a QuantizedTensor of a 2-D (d×k) matrix, e.g. "
                            "quantize_nf4(linear.weight); use Linear4bit.from_linear(linear)")
        _check_compute_dtype(compute_dtype)
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.block_size = weight.block_size
        self.weight_dtype = weight.dtype
        self.register_buffer("packed", weight.packed)
        self.register_buffer("codebook", weight.codebook)
        self.double_quant = isinstance(weight.absmax, DoubleQuantizedAbsmax)
        if isinstance(weight.absmax, DoubleQuantizedAbsmax):
            self.dq_block_size = weight.absmax.block_size
            self.n_blocks = weight.absmax.numel
            self.register_buffer("absmax_codes", weight.absmax.codes)
            self.register_buffer("absmax_scales", weight.absmax.scales)
            self.register_buffer("absmax_offset", weight.absmax.offset)
        else:
            self.register_buffer("absmax", weight.absmax)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) \
            if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, *, double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.float32,
                    codebook: Tensor | None = None) -> Linear4bit:
        """Quantise an ``nn.Linear``'s weight (NF4 unless ``codebook`` is given).

        ``linear`` itself is left untouched.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        q = quantize_blockwise(linear.weight, nf4_codebook() if codebook is None else codebook,
                               block_size, double_quant=double_quant)
        return cls(q, linear.bias, compute_dtype)

    @property
    def quantized_weight(self) -> QuantizedTensor:
        """The stored weight as a :class:`QuantizedTensor` (views of the buffers, no copy)."""
        absmax: Tensor | DoubleQuantizedAbsmax = (
            DoubleQuantizedAbsmax(self.absmax_codes, self.absmax_scales, self.absmax_offset,
                                  self.n_blocks, self.dq_block_size)
            if self.double_quant else self.absmax)
        return QuantizedTensor(self.packed, absmax, self.codebook,
                               torch.Size((self.out_features, self.in_features)),
                               self.weight_dtype, self.block_size)

    @property
    def weight(self) -> Tensor:
        """``Ŵ0`` (d×k) dequantised in ``compute_dtype``; a fresh tensor on every access."""
        return self.quantized_weight.dequantize(self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        """``Ŵ0 x + b`` for ``x`` (..., k) → (..., d), computed in ``compute_dtype``."""
        out = _DequantizeMatmul.apply(x.to(self.compute_dtype), self)
        return out if self.bias is None else out + self.bias.to(self.compute_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block_size={self.block_size}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}")


class _DequantizeMatmul(torch.autograd.Function):
    """``y = x Ŵ0ᵀ`` that keeps only the 4-bit storage between forward and backward.

    Plain ``F.linear(x, layer.weight)`` would make autograd save the dequantised d×k matrix
    for the backward pass, so every layer's full-precision weight would sit in memory until
    the step ends. Here the backward dequantises again: ``∂L/∂x = (∂L/∂y) Ŵ0``. ``Ŵ0`` is
    frozen, so no gradient for it is formed (nor is ``x`` saved, which only that would need).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: Linear4bit) -> Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return F.linear(x, layer.weight)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:
        weight = ctx.layer.weight
        # Under autocast grad_out may be bf16/fp16 while Ŵ0 is not: match, then give x's dtype.
        return (grad_out.to(weight.dtype) @ weight).to(ctx.x_dtype), None


def _check_compute_dtype(dtype: Any) -> None:
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"compute_dtype must be torch.float32, torch.bfloat16 or torch.float16, "
                         f"got {dtype!r}")


class LoRALinear4bit(LoRALinear):
    """:class:`lora_edu.lora.LoRALinear` on a :class:`Linear4bit` base: the QLoRA layer.

    ``h = Ŵ0 x + b + s · B A dropout(x)`` with ``Ŵ0`` (d×k) dequantised from NF4 at each step,
    ``A`` (r×k) and ``B`` (d×r) trainable, initialised and scaled exactly as in ``LoRALinear``
    (A random, B = 0, s = α/r or α/√r). Gradients flow to A and B through the dequantised
    weight; ``Ŵ0`` itself receives none. A and B are fp32 when ``compute_dtype`` is 16-bit.

    Merging in place is refused: ``Ŵ0 + s B A`` is not representable in NF4 without
    requantising, which adds a new rounding error; :func:`merge_qlora_layer` builds a merged
    layer (into the dequantised ``Ŵ0`` in 16 bit, into the original ``W0``, or re-quantised),
    and :meth:`merged_linear` a full-precision one.
    """

    def __init__(self, base: Linear4bit, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, *, use_rslora: bool = False,
                 init_lora_weights: bool | str = True) -> None:
        super().__init__(base, r, lora_alpha, lora_dropout, use_rslora=use_rslora,
                         init_lora_weights=init_lora_weights)

    @staticmethod
    def _check_base(base: nn.Module, fan_in_fan_out: bool) -> None:
        if not isinstance(base, Linear4bit):
            raise TypeError(f"LoRALinear4bit wraps a Linear4bit, got {type(base).__name__}; "
                            "build one with Linear4bit.from_linear(linear)")
        if fan_in_fan_out:
            raise ValueError("fan_in_fan_out is not supported for a 4-bit base; transpose the "
                             "weight into an nn.Linear first")

    def merge(self, safe_merge: bool = False) -> None:
        raise NotImplementedError("a 4-bit base cannot absorb s·B A without requantising (a "
                                  "new rounding error); use merge_qlora(model) or "
                                  "merge_qlora_layer(layer) for a merged copy (Ŵ0 + s·B A in "
                                  "16 bit by default), or merged_linear() for fp32")

    @torch.no_grad()
    def merged_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A new ``nn.Linear`` with weight ``Ŵ0 + s·B A`` (d×k) in ``dtype``, for deployment."""
        base = self.base
        layer = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                          device=self.lora_A.device, dtype=dtype)
        layer.weight.copy_(base.quantized_weight.dequantize(torch.float32) + self.delta_weight())
        if base.bias is not None:
            layer.bias.copy_(base.bias)
        return layer


def inject_lora_4bit(model: nn.Module, config: LoraConfig, block_size: int = 64, *,
                     double_quant: bool = True,
                     compute_dtype: torch.dtype = torch.float32,
                     loftq_iters: int = 0,
                     quantize_modules: list[str] | str | None = None) -> nn.Module:
    """QLoRA in place: each targeted ``nn.Linear`` becomes a :class:`LoRALinear4bit`.

    Targets are matched as :func:`lora_edu.lora.inject_lora` matches them; QLoRA puts LoRA on
    every linear layer of the transformer blocks (e.g. ``target_modules=["q", "k", "v", "o",
    "fc1", "fc2"]``). Every target is quantised before any is replaced, so an error leaves
    ``model`` unchanged. Afterwards only LoRA weights (and biases per ``config.bias``) train.

    Args:
        loftq_iters: 0 (default) for QLoRA's standard start, ``Ŵ0 = Q(W0)`` with ``A`` random
            and ``B = 0``; ``T >= 1`` for LoftQ's: ``Ŵ0``, ``A`` and ``B`` from
            :func:`loftq_init` with ``T`` alternations, so that ``Ŵ0 + s·B A ≈ W0``.
        quantize_modules: further modules to store in 4 bit *without* an adapter (plain
            frozen :class:`Linear4bit`), matched like ``target_modules``; ``None``: only the
            LoRA targets are quantised. QLoRA quantises every linear layer of the blocks
            wherever the adapters go, e.g. ``target_modules=["q", "v"]`` with
            ``quantize_modules=["q", "k", "v", "o", "fc1", "fc2"]``.

    Returns:
        ``model`` itself.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a lora_edu.lora.LoraConfig, got {type(config).__name__}")
    if config.fan_in_fan_out:
        raise ValueError("fan_in_fan_out=True is not supported by inject_lora_4bit; the targets "
                         "must be nn.Linear layers")
    _check_compute_dtype(compute_dtype)
    if isinstance(loftq_iters, bool) or not isinstance(loftq_iters, int) or loftq_iters < 0:
        raise ValueError(f"loftq_iters must be an int >= 0 (0: QLoRA's standard start, T >= 1: "
                         f"LoftQ with T alternations), got {loftq_iters!r}")
    names = find_targets(model, config)
    replacements: dict[str, nn.Module] = {}
    if quantize_modules is not None:
        try:
            extra = find_targets(model, replace(config, target_modules=quantize_modules))
        except (TypeError, ValueError) as err:
            raise type(err)(f"quantize_modules: {err}") from None
        for name in extra:
            if name not in names:
                replacements[name] = Linear4bit.from_linear(
                    model.get_submodule(name), block_size, double_quant=double_quant,
                    compute_dtype=compute_dtype)
    for name in names:
        linear = model.get_submodule(name)
        if not loftq_iters:
            base = Linear4bit.from_linear(linear, block_size, double_quant=double_quant,
                                          compute_dtype=compute_dtype)
            replacements[name] = LoRALinear4bit(
                base, config.r, config.lora_alpha, config.lora_dropout,
                use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights)
            continue
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} must be an nn.Linear for LoftQ, got {type(linear).__name__}")
        scaling = lora_scaling(config.lora_alpha, config.r, config.use_rslora)
        init = loftq_init(linear.weight, config.r, loftq_iters, scaling=scaling,
                          block_size=block_size, double_quant=double_quant)
        layer = LoRALinear4bit(Linear4bit(init.quantized, linear.bias, compute_dtype),
                               config.r, config.lora_alpha, config.lora_dropout,
                               use_rslora=config.use_rslora)
        with torch.no_grad():
            layer.lora_A.copy_(init.lora_A)
            layer.lora_B.copy_(init.lora_B)
        replacements[name] = layer
    for name, layer in replacements.items():
        replace_module(model, name, layer)
    model.lora_config = config
    mark_only_lora_as_trainable(model, config.bias)
    return model


# --------------------------------------------------------------------------- LoftQ

@dataclass(frozen=True)
class LoftQInit:
    """What :func:`loftq_init` returns.

    Attributes:
        quantized: the 4-bit base ``Q`` (a :class:`QuantizedTensor` shaped like ``W``, d×k).
        lora_A: (r×k) fp32, ``√Σ_r V_rᵀ / √s``.
        lora_B: (d×r) fp32, ``U_r √Σ_r / √s``; so ``s·B A`` is the rank-r SVD of ``W − Q``.
        errors: ``‖W − (Q_t + s·B_t A_t)‖_F`` after each alternation ``t = 1..T``.
        quantization_error: ``‖W − Q(W)‖_F``, QLoRA's standard start (``B = 0``), for scale.
    """

    quantized: QuantizedTensor
    lora_A: Tensor
    lora_B: Tensor
    errors: list[float]
    quantization_error: float


@torch.no_grad()
def loftq_init(W: Tensor, r: int, num_iters: int = 1, *, scaling: float = 1.0,
               block_size: int = 64, double_quant: bool = False,
               double_quant_block_size: int = 256,
               codebook: Tensor | None = None) -> LoftQInit:
    r"""LoftQ's initialisation (Li et al., 2024, Algorithm 1) of a 4-bit base and its adapter.

    QLoRA starts from ``Q = Q(W)`` and ``B = 0``, so the model it trains begins off by the
    whole quantisation error ``W − Q``. LoftQ chooses ``Q`` and a rank-r ``L = s·B A`` to make
    ``‖W − (Q + L)‖_F`` small, by alternating, from ``L_0 = 0``, for ``t = 1..T``:

    .. math::  Q_t = \mathrm{NF4}(W - L_{t-1}), \qquad
               L_t = \mathrm{SVD}_r(W - Q_t) = U_r \Sigma_r V_r^\top

    (the best rank-r approximation of the residual, :func:`lora_edu.linalg.truncated_svd`).
    The singular values are split evenly between the factors, ``B = U_r √Σ_r / √s`` and
    ``A = √Σ_r V_rᵀ / √s``, so that the layer's ``s·B A`` equals ``L_T`` for the scaling ``s``
    it will use (PEFT's ``loftq_init`` returns the factors for ``s = 1``). With ``T = 1``,
    ``Q`` is plain ``Q(W)`` and only the adapter differs from QLoRA's start.

    Args:
        W: (d×k) floating-point weight; not modified.
        r: the adapter's rank, ``1 <= r <= min(d, k)``.
        num_iters: ``T >= 1`` alternations.
        scaling: the LoRA scaling ``s`` (α/r, or α/√r with rsLoRA) the factors are meant for.
        block_size, double_quant, double_quant_block_size, codebook: as in
            :func:`quantize_blockwise` (default codebook NF4).

    Returns:
        A :class:`LoftQInit`: ``Q_T`` (dtype that of ``W``), ``A`` (r×k), ``B`` (d×r) in fp32,
        the error after each alternation and the plain quantisation error.

    Raises:
        TypeError: ``W`` is not a 2-D floating-point tensor; ``r`` or ``num_iters`` not ints.
        ValueError: ``r`` outside ``[1, min(d, k)]``; ``num_iters < 1``; ``scaling`` not a
            positive finite number; ``W`` empty or non-finite.
    """
    if not isinstance(W, Tensor) or W.dim() != 2:
        raise TypeError("W must be a 2-D (d×k) torch.Tensor, e.g. linear.weight; got "
                        f"{type(W).__name__} with shape {tuple(getattr(W, 'shape', ()))}")
    _check_weight(W)
    r = _check_rank(r, W)
    if isinstance(num_iters, bool) or not isinstance(num_iters, int):
        raise TypeError(f"num_iters must be an int, got {type(num_iters).__name__}")
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1 (one quantisation and one SVD at least), got "
                         f"{num_iters}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) \
            or not math.isfinite(scaling) or scaling <= 0:
        raise ValueError(f"scaling must be a positive finite number (the layer's α/r), got "
                         f"{scaling!r}")
    codebook = nf4_codebook() if codebook is None else codebook
    target = W.detach().float()

    def quantize(M: Tensor) -> QuantizedTensor:
        return quantize_blockwise(M, codebook, block_size, double_quant=double_quant,
                                  double_quant_block_size=double_quant_block_size)

    plain = float(torch.linalg.matrix_norm(target - quantize(target).dequantize()))
    low_rank = torch.zeros_like(target)
    errors: list[float] = []
    for _ in range(num_iters):
        q = quantize(target - low_rank)
        residual = target - q.dequantize(torch.float32)
        U, S, Vh = truncated_svd(residual, r)
        low_rank = (U * S) @ Vh
        errors.append(float(torch.linalg.matrix_norm(residual - low_rank)))
    root = (S / scaling).sqrt()
    return LoftQInit(replace(q, dtype=W.dtype), (root[:, None] * Vh).contiguous(),
                     (U * root).contiguous(), errors, plain)


def _check_rank(r: Any, W: Tensor) -> int:
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int, got {type(r).__name__}")
    if not 1 <= r <= min(W.shape):
        raise ValueError(f"r must satisfy 1 <= r <= min(d, k) = {min(W.shape)} for a "
                         f"{W.shape[0]}×{W.shape[1]} weight, got r={r}")
    return r


# --------------------------------------------------------------------------- merging

#: Where :func:`merge_qlora_layer` can put ``s·B A``.
QLORA_MERGES = ("dequantized", "original", "requantized")


@torch.no_grad()
def merge_qlora_layer(layer: LoRALinear4bit, into: str = "dequantized", *,
                      original_weight: Tensor | None = None,
                      dtype: torch.dtype | None = None) -> nn.Module:
    """A new layer with a QLoRA adapter merged in; ``layer`` is left untouched.

    The adapter was trained against the 4-bit base ``Ŵ0 = dequant(Q(W0))``; the sum is always
    formed in fp32 and then stored as ``into`` says:

    * ``"dequantized"``: ``nn.Linear`` with ``W = Ŵ0 + s·B A`` in ``dtype`` (default
      ``torch.bfloat16``: the 16-bit model the adapter was trained with, up to rounding);
    * ``"original"``: ``nn.Linear`` with ``W = W0 + s·B A``, ``W0 = original_weight`` (d×k, the
      unquantised weight), in ``dtype`` (default ``original_weight``'s);
    * ``"requantized"``: :class:`Linear4bit` holding ``Q(Ŵ0 + s·B A)`` with the base's codebook,
      block size, double quantisation and compute dtype (``dtype`` must be ``None``): 4-bit
      storage again, at the price of a second rounding.

    The bias (never quantised) is copied as it is.

    Raises:
        TypeError: ``layer`` is not a :class:`LoRALinear4bit`; ``original_weight`` not a tensor.
        ValueError: unknown ``into``; ``original_weight`` missing, of the wrong shape or given
            where it is not used; a ``dtype`` that is not floating point, or given with
            ``"requantized"``.
    """
    if not isinstance(layer, LoRALinear4bit):
        raise TypeError(f"layer must be a LoRALinear4bit (a QLoRA layer), got "
                        f"{type(layer).__name__}; a full-precision LoRALinear merges with "
                        f".merge()")
    _check_merge_args(into, dtype, layer.base.compute_dtype)
    if into == "original":
        if original_weight is None:
            raise ValueError("into='original' needs original_weight, the unquantised W0 "
                             f"({layer.out_features}×{layer.in_features})")
        if not isinstance(original_weight, Tensor) or not original_weight.is_floating_point():
            raise TypeError("original_weight must be a floating-point tensor (the unquantised "
                            f"W0), got {type(original_weight).__name__}")
        if original_weight.shape != (layer.out_features, layer.in_features):
            raise ValueError(f"original_weight has shape {tuple(original_weight.shape)}, the "
                             f"layer's W0 is {layer.out_features}×{layer.in_features}")
    elif original_weight is not None:
        raise ValueError(f"original_weight is only used with into='original', not {into!r}")
    base: Linear4bit = layer.base
    delta = layer.delta_weight().float()
    if into == "requantized":
        stored = base.quantized_weight
        dq = stored.absmax.block_size if isinstance(stored.absmax, DoubleQuantizedAbsmax) \
            else 256
        merged = stored.dequantize(torch.float32).to(delta.device) + delta
        q = quantize_blockwise(merged, stored.codebook, stored.block_size,
                               double_quant=base.double_quant, double_quant_block_size=dq)
        return Linear4bit(replace(q, dtype=stored.dtype), base.bias, base.compute_dtype)
    if into == "original":
        W0 = original_weight.detach().to(delta.device, torch.float32)
        dtype = dtype or original_weight.dtype
    else:
        W0 = base.quantized_weight.dequantize(torch.float32).to(delta.device)
        dtype = dtype or torch.bfloat16
    linear = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None,
                       device=delta.device, dtype=dtype)
    linear.weight.copy_(W0 + delta)
    if base.bias is not None:
        linear.bias.copy_(base.bias)
    return linear.requires_grad_(False)


def _check_merge_args(into: Any, dtype: Any, compute_dtype: torch.dtype) -> None:
    if into not in QLORA_MERGES:
        raise ValueError(f"into must be one of {QLORA_MERGES}, got {into!r}")
    if dtype is None:
        return
    if into == "requantized":
        raise ValueError("dtype is not used with into='requantized' (the result is 4-bit, "
                         f"computed in the base's compute_dtype {compute_dtype}); pass None")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, e.g. torch.bfloat16, "
                         f"got {dtype!r}")


def merge_qlora(model: nn.Module, into: str = "dequantized", *,
                original: nn.Module | dict[str, Tensor] | None = None,
                dtype: torch.dtype | None = None) -> nn.Module:
    """Merge every :class:`LoRALinear4bit` of ``model`` in place, as :func:`merge_qlora_layer`.

    Each QLoRA layer is replaced by its merged layer (``nn.Linear`` or, with
    ``into="requantized"``, :class:`Linear4bit`); the adapters are gone afterwards.

    Args:
        into: ``"dequantized"``, ``"original"`` or ``"requantized"`` (see
            :func:`merge_qlora_layer`).
        original: for ``into="original"``, where the unquantised ``W0`` come from: the
            full-precision model (an ``nn.Module`` with an ``nn.Linear`` under each QLoRA
            layer's name) or a mapping ``name -> W0`` (d×k).
        dtype: the merged weights' dtype (see :func:`merge_qlora_layer`).

    Every merged layer is built before any is put in place, so an error leaves ``model``
    unchanged.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: ``model`` has no QLoRA layer; bad ``into`` or ``dtype``; ``original``
            missing a layer (also the errors of :func:`merge_qlora_layer`).
        TypeError: ``original`` is neither a module nor a mapping.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear4bit)]
    if not layers:
        raise ValueError("model has no LoRALinear4bit layer to merge; put QLoRA in with "
                         "inject_lora_4bit first (full-precision LoRA: lora.merge_and_unload)")
    if original is not None and into != "original":
        raise ValueError(f"original is only used with into='original', not {into!r}")
    if into == "original" and original is None:
        raise ValueError("into='original' needs original=, the unquantised model (or a "
                         "mapping from layer name to W0)")
    if original is not None and not isinstance(original, (nn.Module, dict)):
        raise TypeError(f"original must be an nn.Module or a dict name -> W0, got "
                        f"{type(original).__name__}")
    merged = {}
    for name, layer in layers:
        weight = None
        if isinstance(original, nn.Module):
            try:
                source = original.get_submodule(name)
            except AttributeError:
                raise ValueError(f"original has no module {name!r}; pass the unquantised "
                                 f"model the QLoRA model was built from") from None
            if not isinstance(source, nn.Linear):
                raise ValueError(f"original's {name!r} is a {type(source).__name__}, not the "
                                 f"nn.Linear holding W0")
            weight = source.weight
        elif isinstance(original, dict):
            if name not in original:
                raise ValueError(f"original has no weight for {name!r}; it holds "
                                 f"{sorted(original)[:4]}...")
            weight = original[name]
        merged[name] = merge_qlora_layer(layer, into, original_weight=weight, dtype=dtype)
    for name, layer in merged.items():
        replace_module(model, name, layer)
    if "lora_config" in vars(model):
        del model.lora_config
    return model
