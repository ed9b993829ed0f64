"""Checkers for students' own implementations of the book's key pieces.

Each ``check_*`` function calls the student's function on several cases, compares it with the
package's reference implementation, and returns a :class:`CheckResult` whose message explains
the *first* mismatch in plain words. Where a wrong answer matches a common mistake (a missing
scaling, a transposed factor, a global instead of a blockwise scale, ...) the message names the
mistake; otherwise it says which case failed and by how much.

Usage in a notebook::

    from lora_edu.checks import check_lora_forward

    def my_forward(x, W0, b, A, B, alpha, r):
        return x @ W0.T + b + (alpha / r) * (x @ A.T) @ B.T

    check_lora_forward(my_forward)        # prints ✓ or an explanation; returns a CheckResult

Every checker accepts ``raise_on_failure=True`` to raise ``AssertionError`` instead, for use
in autograders.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lora_edu.linalg import low_rank_approx, numerical_rank
from lora_edu.quant import nf4_codebook, quantize_nf4

__all__ = ["CheckResult", "check_rank", "check_low_rank_approx", "check_lora_forward",
           "check_merge_unmerge", "check_nf4_quantize"]


@dataclass
class CheckResult:
    """The outcome of a check: ``bool(result)`` is ``passed``; ``message`` explains it."""

    name: str
    passed: bool
    message: str
    cases: int = 0
    details: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        mark = "✓" if self.passed else "✗"
        return f"{mark} {self.name}: {self.message}"

    def _repr_markdown_(self) -> str:  # how Jupyter shows it
        return f"**{'✓' if self.passed else '✗'} {self.name}**: {self.message}"


def _reporter(name: str, cases: int, raise_on_failure: bool,
              verbose: bool) -> Callable[[str | None], CheckResult]:
    """The function a checker ends with: ``finish(None)`` on success, ``finish(why)`` on failure."""
    def finish(failure: str | None) -> CheckResult:
        if failure is None:
            result = CheckResult(name, True, f"all {cases} cases agree with the reference", cases)
        else:
            result = CheckResult(name, False, failure, cases)
        if verbose:
            print(result)
        if raise_on_failure and not result.passed:
            raise AssertionError(str(result))
        return result
    return finish


def _call(fn: Callable, *args) -> tuple[object, str | None]:
    try:
        return fn(*args), None
    except Exception as exc:  # the student's code raised: that is the explanation
        return None, f"your function raised {type(exc).__name__}: {exc}"


def _close(a: Tensor, b: Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    return a.shape == b.shape and torch.allclose(a.to(b.dtype), b, rtol=rtol, atol=atol)


def _call_for_tensor(what: str, fn: Callable, *args) -> tuple[Tensor | None, str | None]:
    """Call the student's function and take its result as a tensor, or say why that failed."""
    value, error = _call(fn, *args)
    if error is not None or isinstance(value, Tensor):
        return value, error  # type: ignore[return-value]
    try:
        return torch.as_tensor(value), None
    except Exception:
        return None, f"{what} should be a tensor, got {type(value).__name__}"


# --------------------------------------------------------------------------- rank

def _rank_cases(gen: torch.Generator) -> list[tuple[str, Tensor]]:
    def product(d: int, r: int, k: int) -> Tensor:
        return (torch.randn(d, r, generator=gen, dtype=torch.float64)
                @ torch.randn(r, k, generator=gen, dtype=torch.float64))
    return [
        ("a random 6×6 matrix (full rank)", torch.randn(6, 6, generator=gen, dtype=torch.float64)),
        ("a 30×20 product of 30×5 and 5×20 (rank 5)", product(30, 5, 20)),
        ("a 4×9 wide matrix of rank 2", product(4, 2, 9)),
        ("the 5×3 zero matrix (rank 0)", torch.zeros(5, 3, dtype=torch.float64)),
        ("a rank-3 40×40 matrix plus rounding-size noise (1e-13)",
         product(40, 3, 40) + 1e-13 * torch.randn(40, 40, generator=gen, dtype=torch.float64)),
    ]


def check_rank(student_rank: Callable[[Tensor], int], *, raise_on_failure: bool = False,
               verbose: bool = True) -> CheckResult:
    """Check ``student_rank(W) -> int`` (the numerical rank of a float64 matrix)."""
    gen = torch.Generator().manual_seed(0)
    cases = _rank_cases(gen)
    finish = _reporter("rank", len(cases), raise_on_failure, verbose)
    for description, W in cases:
        got, error = _call(student_rank, W.clone())
        expected = numerical_rank(W)
        if error:
            return finish(f"on {description}: {error}")
        if int(got) != expected:  # type: ignore[call-overload]
            hint = ""
            if int(got) == min(W.shape) and expected < min(W.shape):  # type: ignore[call-overload]
                hint = (" You counted every singular value: in floating point the 'zero' ones are"
                        " tiny but not 0, so count only those above a tolerance such as"
                        " σ_max · max(d, k) · machine epsilon.")
            elif expected == 0:
                hint = " The zero matrix has no nonzero singular value."
            return finish(f"on {description} you returned {got}, expected {expected}."
                           + hint)
    return finish(None)


# --------------------------------------------------------------------------- best rank-r

def check_low_rank_approx(student_fn: Callable[[Tensor, int], Tensor], *,
                          raise_on_failure: bool = False, verbose: bool = True) -> CheckResult:
    """Check ``student_fn(W, r) -> W_r``, the best rank-r approximation of W."""
    gen = torch.Generator().manual_seed(1)
    cases = [(torch.randn(12, 8, generator=gen, dtype=torch.float64), r) for r in (1, 3, 8)]
    cases.append((torch.randn(5, 20, generator=gen, dtype=torch.float64), 2))
    finish = _reporter("best rank-r approximation", len(cases), raise_on_failure, verbose)
    for W, r in cases:
        got, error = _call_for_tensor("the result", student_fn, W.clone(), r)
        label = f"a {W.shape[0]}×{W.shape[1]} matrix with r={r}"
        if error:
            return finish(f"on {label}: {error}")
        assert isinstance(got, Tensor)
        if got.shape != W.shape:
            return finish(f"on {label} your result has shape {tuple(got.shape)}; the "
                           f"approximation has W's shape {tuple(W.shape)} (return U_r Σ_r V_rᵀ, "
                           "not the factors)")
        best = low_rank_approx(W, r)
        if _close(got, best, rtol=1e-6, atol=1e-8):
            continue
        got_rank = numerical_rank(got.to(torch.float64))
        if got_rank > r:
            why = (f"your result has rank {got_rank} > r = {r}: keep only the top r singular "
                   "values and vectors")
        else:
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            smallest = (U[:, -r:] * S[-r:]) @ Vh[-r:]
            err = torch.linalg.matrix_norm(W - got.to(W.dtype)).item()
            floor = torch.linalg.matrix_norm(W - best).item()
            if _close(got, smallest, rtol=1e-6, atol=1e-8):
                why = ("you kept the r *smallest* singular values; torch.linalg.svd returns them "
                       "in descending order, so keep the first r")
            else:
                why = (f"‖W − yours‖_F = {err:.4g} but the Eckart–Young optimum is {floor:.4g}: "
                       "scale U's columns by the singular values (U[:, :r] * S[:r]) @ Vh[:r]")
        return finish(f"on {label}: {why}")
    return finish(None)


# --------------------------------------------------------------------------- LoRA forward

def _lora_reference(x: Tensor, W0: Tensor, b: Tensor, A: Tensor, B: Tensor, alpha: float,
                    r: int) -> Tensor:
    return x @ W0.T + b + (alpha / r) * (x @ A.T) @ B.T


def check_lora_forward(student_forward: Callable[..., Tensor], *, raise_on_failure: bool = False,
                       verbose: bool = True) -> CheckResult:
    """Check ``student_forward(x, W0, b, A, B, alpha, r) -> h`` for a batch ``x`` of shape (n, k).

    Shapes follow the paper: ``W0`` (d, k), ``b`` (d,), ``A`` (r, k), ``B`` (d, r); the result
    is ``h = x W0ᵀ + b + (α/r) · x Aᵀ Bᵀ`` of shape (n, d).
    """
    gen = torch.Generator().manual_seed(2)
    d, k, n = 6, 10, 4
    configs = [(2, 2.0, True), (2, 8.0, False), (4, 16.0, False), (1, 3.0, False)]
    finish = _reporter("LoRA forward pass", len(configs), raise_on_failure, verbose)
    for r, alpha, b_zero in configs:
        x = torch.randn(n, k, generator=gen, dtype=torch.float64)
        W0 = torch.randn(d, k, generator=gen, dtype=torch.float64)
        b = torch.randn(d, generator=gen, dtype=torch.float64)
        A = torch.randn(r, k, generator=gen, dtype=torch.float64)
        B = torch.zeros(d, r, dtype=torch.float64) if b_zero else \
            torch.randn(d, r, generator=gen, dtype=torch.float64)
        args = (x, W0, b, A, B, alpha, r)
        got, error = _call_for_tensor("the output", student_forward,
                                      *(a.clone() if isinstance(a, Tensor) else a for a in args))
        label = f"r={r}, α={alpha:g}" + (", B = 0 (initialisation)" if b_zero else "")
        if error:
            return finish(f"with {label}: {error}")
        assert isinstance(got, Tensor)
        expected = _lora_reference(*args)
        if _close(got, expected):
            continue
        base = x @ W0.T + b
        delta = (x @ A.T) @ B.T
        mistakes = {
            "the LoRA branch is not scaled: multiply it by α/r": base + delta,
            "the scaling is inverted: it is α/r, not r/α": base + (r / alpha) * delta,
            "you scaled by α/√r (that is rsLoRA, not the paper's α/r)":
                base + (alpha / r ** 0.5) * delta,
            "the bias is missing: h = W0 x + b + (α/r) B A x": expected - b,
            "the frozen path W0 x is missing: LoRA adds to it, it does not replace it":
                b + (alpha / r) * delta,
        }
        if got.shape != expected.shape:
            why = (f"the output has shape {tuple(got.shape)}, expected {tuple(expected.shape)} = "
                   "(batch, d): apply A (r×k) to x first, then B (d×r)")
        elif b_zero and not any(_close(got, wrong) for wrong in mistakes.values()):
            why = ("your output differs from the base model at initialisation: is B zero? with "
                   "B = 0 the LoRA branch must vanish and h = W0 x + b exactly")
        else:
            why = next((m for m, wrong in mistakes.items() if _close(got, wrong)),
                       f"max |difference| = {(got - expected).abs().max().item():.3g}")
        return finish(f"with {label}: {why}")
    return finish(None)


# --------------------------------------------------------------------------- merge/unmerge

def check_merge_unmerge(student_merge: Callable[..., Tensor],
                        student_unmerge: Callable[..., Tensor] | None = None, *,
                        raise_on_failure: bool = False, verbose: bool = True) -> CheckResult:
    """Check ``merge(W0, A, B, alpha, r) -> W`` and optionally ``unmerge(W, A, B, alpha, r) -> W0``.

    ``merge`` must return ``W0 + (α/r) B A`` (shape d×k) without modifying its inputs, and
    ``unmerge`` must undo it.
    """
    gen = torch.Generator().manual_seed(3)
    configs = [(8, 5, 2, 4.0), (3, 7, 3, 3.0), (6, 6, 1, 16.0)]
    finish = _reporter("merge / unmerge", len(configs), raise_on_failure, verbose)
    for d, k, r, alpha in configs:
        W0 = torch.randn(d, k, generator=gen, dtype=torch.float64)
        A = torch.randn(r, k, generator=gen, dtype=torch.float64)
        B = torch.randn(d, r, generator=gen, dtype=torch.float64)
        W0_before = W0.clone()
        label = f"d={d}, k={k}, r={r}, α={alpha:g}"
        merged, error = _call_for_tensor("merge's result", student_merge, W0, A.clone(),
                                         B.clone(), alpha, r)
        if error:
            return finish(f"merge with {label}: {error}")
        assert isinstance(merged, Tensor)
        expected = W0_before + (alpha / r) * B @ A
        if not _close(merged, expected):
            if merged.shape != expected.shape:
                why = (f"the merged weight has shape {tuple(merged.shape)}, expected (d, k) = "
                       f"({d}, {k}): ΔW = B A")
            elif _close(merged, W0_before + B @ A):
                why = "ΔW is not scaled: W = W0 + (α/r) B A"
            else:
                gap = (merged - expected).abs().max().item()
                why = f"max |W − (W0 + (α/r) B A)| = {gap:.3g}"
            return finish(f"merge with {label}: {why}")
        if not torch.equal(W0, W0_before) and merged is not W0:
            return finish(f"merge with {label}: your merge changed W0 in place and "
                           "returned another tensor; do one or the other")
        if student_unmerge is not None:
            back, error = _call_for_tensor("unmerge's result", student_unmerge, expected.clone(),
                                           A.clone(), B.clone(), alpha, r)
            if error:
                return finish(f"unmerge with {label}: {error}")
            assert isinstance(back, Tensor)
            if not _close(back, W0_before):
                why = ("unmerge must subtract exactly what merge added, (α/r) B A"
                       if back.shape == W0_before.shape else
                       f"unmerge returned shape {tuple(back.shape)}, expected ({d}, {k})")
                return finish(f"unmerge with {label}: {why}")
    return finish(None)


# --------------------------------------------------------------------------- NF4

def check_nf4_quantize(student_fn: Callable[[Tensor, int], Tensor], *,
                       block_sizes: Sequence[int] = (64, 16), raise_on_failure: bool = False,
                       verbose: bool = True) -> CheckResult:
    """Check ``student_fn(W, block_size) -> Ŵ``: NF4 blockwise absmax quantise-then-dequantise.

    Each block of ``block_size`` consecutive values (of the flattened W) is divided by its
    absolute maximum, rounded to the nearest of the 16 NF4 values, and multiplied back.
    """
    gen = torch.Generator().manual_seed(4)
    finish = _reporter("NF4 quantisation", len(block_sizes), raise_on_failure, verbose)
    code = nf4_codebook()
    for block in block_sizes:
        W = torch.randn(8, 4 * block, generator=gen)
        W[0, :block] *= 20  # one block with a large scale: a global absmax would crush the rest
        label = f"an {W.shape[0]}×{W.shape[1]} matrix with block_size={block}"
        got, error = _call_for_tensor("the result", student_fn, W.clone(), block)
        if error:
            return finish(f"on {label}: {error}")
        assert isinstance(got, Tensor)
        expected = quantize_nf4(W, block_size=block).dequantize()
        if got.shape != W.shape:
            return finish(f"on {label}: return the dequantised tensor, shaped like W "
                           f"{tuple(W.shape)}, not {tuple(got.shape)}")
        if _close(got.float(), expected, rtol=1e-5, atol=1e-6):
            continue
        flat = W.reshape(-1)
        absmax_global = flat.abs().max()
        global_q = code[((flat / absmax_global)[:, None] - code).abs().argmin(1)] * absmax_global
        if _close(got.float(), global_q.reshape(W.shape)):
            why = ("you used one absmax for the whole tensor; NF4 is blockwise: each block of "
                   f"{block} values gets its own absmax, so one outlier does not crush the rest")
        else:
            off_grid = ~torch.isclose((got.float().reshape(-1, block) /
                                       W.reshape(-1, block).abs().amax(1, keepdim=True))[..., None],
                                      code, atol=1e-4).any(-1)
            if off_grid.any():
                why = ("some values are not on the NF4 grid (block absmax × one of the 16 NF4 "
                       "codes): check the codebook and the nearest-code rounding")
            else:
                why = ("the values are on the NF4 grid but some are not the nearest code: "
                       "round each normalised value to the closest of the 16 codes")
        return finish(f"on {label}: {why}")
    return finish(None)
