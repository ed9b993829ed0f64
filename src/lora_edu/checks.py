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

=================================  ==============================================  =======
checker                            the student writes                              chapter
=================================  ==============================================  =======
:func:`check_rank`                 ``fn(W) -> int``                                1
:func:`check_low_rank_approx`      ``fn(W, r) -> W_r``                             2
:func:`check_factor_gradients`     ``fn(B, A, W) -> (dL/dB, dL/dA)``               3
:func:`check_lora_forward`         ``fn(x, W0, b, A, B, alpha, r) -> h``           6
:func:`check_merge_unmerge`        ``merge(W0, A, B, alpha, r) -> W`` (+ inverse)  11
:func:`check_subspace_similarity`  ``fn(A1, A2, i, j) -> φ``                       9
:func:`check_multi_lora_forward`   ``fn(x, W0, b, As, Bs, scalings, ids) -> h``    11
:func:`check_nf4_quantize`         ``fn(W, block_size) -> Ŵ``                      13
:func:`check_pissa_init`           ``fn(W, r, scaling) -> (A, B, W_res)``          14
:func:`check_dora_forward`         ``fn(x, W0, b, A, B, m, alpha, r) -> h``        14
:func:`check_wilson_interval`      ``fn(k, n) -> (low, high)``                     15
=================================  ==============================================  =======
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lora_edu.intrinsic import subspace_similarity
from lora_edu.linalg import low_rank_approx, numerical_rank
from lora_edu.quant import nf4_codebook, quantize_nf4
from lora_edu.serving import MultiLoRALinear
from lora_edu.variants import DoRALinear, pissa_factors

__all__ = ["CheckResult", "check_rank", "check_low_rank_approx", "check_lora_forward",
           "check_merge_unmerge", "check_nf4_quantize", "check_subspace_similarity",
           "check_dora_forward", "check_pissa_init", "check_multi_lora_forward",
           "check_factor_gradients", "check_wilson_interval"]


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
        """One line per ~88 characters (a phone's width), the mark first."""
        mark = "✓" if self.passed else "✗"
        return textwrap.fill(f"{mark} {self.name}: {self.message}", width=88,
                             subsequent_indent="  ", break_long_words=False,
                             break_on_hyphens=False)

    def _repr_markdown_(self) -> str:  # how Jupyter shows it
        return f"**{'✓' if self.passed else '✗'} {self.name}**: {self.message}"


def _reporter(name: str, cases: int, raise_on_failure: bool, verbose: bool,
              *functions: object) -> Callable[[str | None], CheckResult]:
    """The function a checker ends with: ``finish(None)`` on success, ``finish(why)`` on failure.

    Refuses, before any case runs, a student's "function" that cannot be called (a common slip
    in a notebook: passing ``my_fn()``'s result instead of ``my_fn``).
    """
    for fn in functions:
        if fn is not None and not callable(fn):
            raise TypeError(f"check {name!r}: pass your function itself (e.g. my_fn, not "
                            f"my_fn(...)); got a {type(fn).__name__}")
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
    finish = _reporter("rank", len(cases), raise_on_failure, verbose,
                       student_rank)
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
    finish = _reporter("best rank-r approximation", len(cases), raise_on_failure, verbose,
                       student_fn)
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
    finish = _reporter("LoRA forward pass", len(configs), raise_on_failure, verbose,
                       student_forward)
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
    finish = _reporter("merge / unmerge", len(configs), raise_on_failure, verbose,
                       student_merge, student_unmerge)
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
    absolute maximum, rounded to the nearest of the 16 NF4 values, and multiplied back. Each
    case has one block of large weights (a global absmax would crush the rest) and one block
    of zeros (as after pruning or padding), which must come back as zeros, not NaN.
    """
    gen = torch.Generator().manual_seed(4)
    finish = _reporter("NF4 quantisation", len(block_sizes), raise_on_failure, verbose,
                       student_fn)
    code = nf4_codebook()
    for block in block_sizes:
        W = torch.randn(8, 4 * block, generator=gen)
        W[0, :block] *= 20  # one block with a large scale: a global absmax would crush the rest
        W[1, :block] = 0    # one block of zeros: its absmax is 0
        label = (f"an {W.shape[0]}×{W.shape[1]} matrix with block_size={block} (one block "
                 "of zeros)")
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
        absmax = W.reshape(-1, block).abs().amax(1, keepdim=True)
        if _close(got.float(), global_q.reshape(W.shape)):
            why = ("you used one absmax for the whole tensor; NF4 is blockwise: each block of "
                   f"{block} values gets its own absmax, so one outlier does not crush the rest")
        elif not torch.isfinite(got).all():
            why = ("your result has NaN or inf: a block of zeros has absmax 0, and 0/0 is NaN. "
                   "Divide such a block by 1 instead (torch.where(c > 0, c, 1)): its values are "
                   "0, and 0 is an NF4 code, so they come back exactly")
        else:
            safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
            off_grid = ~torch.isclose((got.float().reshape(-1, block) / safe)[..., None],
                                      code, atol=1e-4).any(-1)
            if off_grid.any():
                why = ("some values are not on the NF4 grid (block absmax × one of the 16 NF4 "
                       "codes): check the codebook and the nearest-code rounding")
            else:
                why = ("the values are on the NF4 grid but some are not the nearest code: "
                       "round each normalised value to the closest of the 16 codes")
        return finish(f"on {label}: {why}")
    return finish(None)


def _first_match(got: Tensor, candidates: dict[str, Tensor], **tol: float) -> str | None:
    """The message of the first wrong-answer candidate that ``got`` equals, if any."""
    return next((why for why, wrong in candidates.items() if _close(got, wrong, **tol)), None)


# --------------------------------------------------------------------------- subspace φ

def _phi(V1: Tensor, V2: Tensor, i: int, j: int, norm: float | None = None,
         square: bool = True) -> float:
    """‖V1[:, :i]ᵀ V2[:, :j]‖_F² / norm (default min(i, j)), for column bases V1, V2."""
    overlap = torch.linalg.matrix_norm(V1[:, :i].T @ V2[:, :j])
    return float((overlap ** 2 if square else overlap) / (min(i, j) if norm is None else norm))


def check_subspace_similarity(student_phi: Callable[[Tensor, Tensor, int, int], float], *,
                              raise_on_failure: bool = False,
                              verbose: bool = True) -> CheckResult:
    """Check ``student_phi(A1, A2, i, j) -> φ``, the LoRA paper's subspace similarity (eq. 4).

    ``A1`` is r1×k and ``A2`` r2×k (float64). With ``V1ᵢ`` the top-``i`` **right** singular
    vectors of A1 (k×i) and ``V2ⱼ`` the top-``j`` of A2, φ = ‖V1ᵢᵀ V2ⱼ‖_F² / min(i, j) ∈ [0, 1].
    The reference is :func:`lora_edu.intrinsic.subspace_similarity`. The cases have i ≠ j
    (to tell min from max), equal ranks r1 = r2 (so that the left singular vectors, r×r, can be
    used by mistake and caught), and a pair with the same row space (φ = 1).
    """
    gen = torch.Generator().manual_seed(5)
    k = 16

    def rand(r: int) -> Tensor:
        return torch.randn(r, k, generator=gen, dtype=torch.float64)

    A_shared = rand(3)
    cases = [(rand(4), rand(4), 2, 3), (rand(6), rand(3), 4, 1),
             (A_shared, torch.randn(3, 3, generator=gen, dtype=torch.float64) @ A_shared, 2, 3),
             (rand(3), rand(5), 1, 5)]
    finish = _reporter("subspace similarity φ", len(cases), raise_on_failure, verbose,
                       student_phi)
    for A1, A2, i, j in cases:
        label = (f"A1 {A1.shape[0]}×{k}, A2 {A2.shape[0]}×{k}, i={i}, j={j}"
                 + (" (the same row space: φ = 1)" if A1 is A_shared else ""))
        got, error = _call(student_phi, A1.clone(), A2.clone(), i, j)
        if error:
            return finish(f"with {label}: {error}")
        try:
            value = float(got)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return finish(f"with {label}: return one number, got {type(got).__name__}")
        expected = subspace_similarity(A1, A2, i, j)
        if abs(value - expected) <= 1e-6:
            continue
        U1, _, Vh1 = torch.linalg.svd(A1, full_matrices=False)
        U2, _, Vh2 = torch.linalg.svd(A2, full_matrices=False)
        V1, V2 = Vh1.T, Vh2.T
        Vf1, Vf2 = torch.linalg.svd(A1).Vh, torch.linalg.svd(A2).Vh  # k×k, rows = vectors
        candidates = {
            "you divided by max(i, j) (or by the larger of i, j); φ divides by min(i, j), "
            "the most the squared overlap can be": _phi(V1, V2, i, j, norm=max(i, j)),
            "you did not normalise: divide ‖V1ᵢᵀ V2ⱼ‖_F² by min(i, j) so that φ ∈ [0, 1]":
                _phi(V1, V2, i, j, norm=1.0),
            "you did not square the Frobenius norm: φ = ‖V1ᵢᵀ V2ⱼ‖_F² / min(i, j)":
                _phi(V1, V2, i, j, square=False),
            "you took the columns of Vh: torch.linalg.svd returns Vᵀ, so the right singular "
            "vectors are its rows (V = Vh.T, then V[:, :i])": _phi(Vf1, Vf2, i, j),
            "you took the *smallest* singular directions; torch.linalg.svd sorts them in "
            "descending order, so the top i are the first i rows of Vh":
                _phi(V1.flip(1), V2.flip(1), i, j),
            "you orthonormalised the rows of A (QR) instead of taking its top singular "
            "vectors; the first i rows of A are not its i most important directions":
                _phi(torch.linalg.qr(A1.T).Q, torch.linalg.qr(A2.T).Q, i, j),
        }
        if A1.shape[0] == A2.shape[0]:
            candidates["you used the left singular vectors U (r×r): they only describe a basis "
                       "of the r-dim bottleneck, which each run picks arbitrarily; φ compares "
                       "the right singular vectors, which live in the input space R^k"] = \
                _phi(U1, U2, i, j)
            candidates["you took the columns of Vh (r×k): torch.linalg.svd returns Vᵀ, so the "
                       "right singular vectors are its rows (V = Vh.T, then V[:, :i])"] = \
                _phi(Vh1, Vh2, i, j)
        why = next((m for m, wrong in candidates.items() if abs(value - wrong) <= 1e-6), None)
        if why is None:
            why = f"you returned {value:.6g}, expected {expected:.6g}"
            if not 0 <= value <= 1 + 1e-9:
                why += " (φ always lies in [0, 1])"
        return finish(f"with {label}: {why}")
    return finish(None)


# --------------------------------------------------------------------------- DoRA

def _dora_reference(x: Tensor, W0: Tensor, b: Tensor, A: Tensor, B: Tensor, m: Tensor,
                    alpha: float, r: int, G: Tensor, detach_norm: bool
                    ) -> tuple[Tensor, dict[str, Tensor]]:
    """DoRALinear's output and the gradients of ⟨h, G⟩ with respect to A, B and m."""
    d, k = W0.shape
    base = nn.Linear(k, d, dtype=W0.dtype)
    with torch.no_grad():
        base.weight.copy_(W0)
        base.bias.copy_(b)
    layer = DoRALinear(base, r=r, lora_alpha=alpha)
    layer.requires_grad_(False)
    with torch.no_grad():
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
        layer.magnitude.copy_(m)
    params = {"A": layer.lora_A, "B": layer.lora_B, "m": layer.magnitude}
    for p in params.values():
        p.requires_grad_(True)
    layer.detach_norm = detach_norm
    h = layer(x)
    grads = torch.autograd.grad((h * G).sum(), list(params.values()))
    return h.detach(), dict(zip(params, grads))


def check_dora_forward(student_forward: Callable[..., Tensor], *, detach_norm: bool = True,
                       raise_on_failure: bool = False, verbose: bool = True) -> CheckResult:
    """Check ``student_forward(x, W0, b, A, B, m, alpha, r) -> h``, a DoRA layer, and its gradients.

    Shapes: ``x`` (n, k), ``W0`` (d, k), ``b`` (d,), ``A`` (r, k), ``B`` (d, r), ``m`` (d,).
    With V = W0 + (α/r)·B A and n = the row norms of V (one per output, shape (d,)),

        h = diag(m / n) V x + b        (Liu et al., 2024; :class:`lora_edu.variants.DoRALinear`)

    The checker also back-propagates a fixed random ⟨h, G⟩ into A, B and m (passed with
    ``requires_grad=True``) and compares the gradients with the reference: with
    ``detach_norm=True`` (the default; the paper's §4.3 and PEFT) n is a constant in the
    backward pass, ``n.detach()``, while m and the direction V keep their gradients; with
    ``detach_norm=False`` the exact gradient through n is expected.
    """
    gen = torch.Generator().manual_seed(6)
    # (d, k, r, α, init): the square case first, so that a norm over the wrong axis runs
    configs = [(6, 6, 2, 4.0, False), (5, 8, 3, 6.0, False), (7, 4, 1, 3.0, False),
               (5, 8, 2, 4.0, True)]
    finish = _reporter("DoRA forward and gradients", len(configs), raise_on_failure, verbose,
                       student_forward)
    for d, k, r, alpha, init in configs:
        f64 = {"generator": gen, "dtype": torch.float64}
        x, W0, b = torch.randn(4, k, **f64), torch.randn(d, k, **f64), torch.randn(d, **f64)
        A = torch.randn(r, k, **f64)
        B = torch.zeros(d, r, dtype=torch.float64) if init else torch.randn(d, r, **f64)
        s = alpha / r
        V = W0 + s * B @ A
        n_row = torch.linalg.vector_norm(V, dim=1)
        m = n_row.clone() if init else n_row * (0.5 + torch.rand(d, **f64))
        G = torch.randn(4, d, **f64)
        label = (f"d={d}, k={k}, r={r}, α={alpha:g}"
                 + (", at initialisation (B = 0, m = ‖W0‖ per row)" if init else ""))
        leaves = [t.clone().requires_grad_(True) for t in (A, B, m)]
        got, error = _call_for_tensor("the output", student_forward, x.clone(), W0.clone(),
                                      b.clone(), leaves[0], leaves[1], leaves[2], alpha, r)
        if error:
            if d != k and any(w in error for w in ("size", "shape", "match")):
                error += (" (is your norm over the right axis? n has one entry per output "
                          "row of V: torch.linalg.vector_norm(V, dim=1), shape (d,))")
            return finish(f"with {label}: {error}")
        assert isinstance(got, Tensor)
        expected, ref_grads = _dora_reference(x, W0, b, A, B, m, alpha, r, G, detach_norm)
        if got.shape != expected.shape:
            return finish(f"with {label}: the output has shape {tuple(got.shape)}, expected "
                          f"(n, d) = {tuple(expected.shape)}")
        if not _close(got.detach(), expected):
            V1 = W0 + B @ A
            candidates = {
                "the LoRA update is not scaled: V = W0 + (α/r) B A, then normalise":
                    x @ ((m / torch.linalg.vector_norm(V1, dim=1))[:, None] * V1).T + b,
                "you normalised by the norm of W0 alone; DoRA normalises the adapted weight "
                "V = W0 + (α/r) B A": x @ ((m / torch.linalg.vector_norm(W0, dim=1))[:, None]
                                            * V).T + b,
                "you multiplied by m without dividing by the norm: W' = m · V / ‖V‖ per row":
                    x @ (m[:, None] * V).T + b,
                "you divided by the norm of the whole matrix (‖V‖_F); DoRA takes one norm per "
                "output row, n_i = ‖V_{i,:}‖": x @ (m[:, None] * V / torch.linalg.matrix_norm(V)).T
                + b,
                "the magnitude m is ignored: this is plain LoRA's output, W0 x + (α/r) B A x + b":
                    x @ V.T + b,
                "the bias is scaled too: DoRA rescales the weight only, h = diag(m/n) V x + b":
                    (x @ V.T + b) * (m / n_row),
                "the bias is missing: h = diag(m/n) V x + b":
                    x @ ((m / n_row)[:, None] * V).T,
            }
            if d == k:
                n_col = torch.linalg.vector_norm(V, dim=0)
                axis = ("the norm is over the wrong axis: you took column norms (one per input, "
                        "dim=0); with W0 stored as (d, k) = (out, in) DoRA takes one norm per "
                        "output row, torch.linalg.vector_norm(V, dim=1), as PEFT does (the paper "
                        "stores W as (in, out) with m ∈ R^{1×k}, so its column norm ‖·‖_c is "
                        "a norm per output: our row norm)")
                candidates[axis] = x @ ((m / n_col)[:, None] * V).T + b
                candidates[axis + "; and m scales the columns"] = x @ (V * (m / n_col)).T + b
            why = _first_match(got.detach(), candidates) or \
                f"max |difference| = {(got.detach() - expected).abs().max().item():.3g}"
            if init and why.startswith("max"):
                why = ("at initialisation (B = 0, m = the row norms of W0) the output must equal "
                       "W0 x + b exactly; " + why)
            return finish(f"with {label}: {why}")
        if not got.requires_grad:
            return finish(f"with {label}: the output carries no gradient; build it from A, B "
                          "and m with torch operations (no .detach(), .data, numpy or "
                          "torch.no_grad()) so that training can update them")
        grads = torch.autograd.grad((got * G.to(got.dtype)).sum(), leaves, allow_unused=True)
        _, other = _dora_reference(x, W0, b, A, B, m, alpha, r, G, not detach_norm)
        for name, grad in zip("ABm", grads):
            want = ref_grads[name]
            if grad is not None and _close(grad, want, rtol=1e-5, atol=1e-8):
                continue
            zero = grad is None or not bool(grad.abs().max() > 0)
            if name == "m" and zero:
                why = ("m gets no gradient: you detached the magnitude (or used m.data). Only "
                       "the norm n is treated as a constant; m is what DoRA learns")
            elif zero and bool(want.abs().max() > 0):
                why = (f"{name} gets no gradient: you detached the whole direction V / n; "
                       "detach only the norm, (W0 + sBA) / n.detach()")
            elif grad is not None and _close(grad, other[name], rtol=1e-5, atol=1e-8):
                why = (f"the gradient of {name} is the exact one, through the norm n; the paper "
                       "(§4.3) and PEFT treat n as a constant, n.detach(), to save memory (pass "
                       "detach_norm=False to this checker if you meant the exact gradient)"
                       if detach_norm else
                       f"the gradient of {name} treats the norm as a constant (n.detach()); "
                       "with detach_norm=False the exact gradient through n is expected")
            else:
                gap = "no gradient" if grad is None else \
                    f"max |difference| = {(grad - want).abs().max().item():.3g}"
                why = f"the gradient with respect to {name} differs from the reference: {gap}"
            return finish(f"with {label}: the output is right but {why}")
    return finish(None)


# --------------------------------------------------------------------------- PiSSA

def check_pissa_init(student_fn: Callable[[Tensor, int, float], tuple[Tensor, Tensor, Tensor]],
                     *, raise_on_failure: bool = False, verbose: bool = True) -> CheckResult:
    """Check ``student_fn(W, r, scaling) -> (A, B, W_res)``, PiSSA's initialisation.

    With the SVD W = U Σ Vᵀ (W is d×k) and its top r triplets, PiSSA (Meng et al., 2024) sets

        A = (Σ_r/s)^½ V_rᵀ  (r×k),   B = U_r (Σ_r/s)^½  (d×r),   W_res = W − s·B A  (d×k),

    so that s·B A = U_r Σ_r V_rᵀ (the best rank-r part of W) and W_res + s·B A = W: the layer's
    output is unchanged at the start. The reference is :func:`lora_edu.variants.pissa_factors`.
    Singular vectors are defined up to sign, so the checker compares sign-free quantities: the
    product s·B A, the residual, and the split A Aᵀ = BᵀB = diag(Σ_r/s). ``W`` must not be
    modified in place.
    """
    gen = torch.Generator().manual_seed(7)
    # (d, k, r, s): the square case first, so that swapped U and V still run (and are caught)
    configs = [(8, 8, 2, 2.0), (6, 10, 3, 0.5), (12, 5, 2, 4.0)]
    finish = _reporter("PiSSA initialisation", len(configs), raise_on_failure, verbose,
                       student_fn)
    tol = {"rtol": 1e-5, "atol": 1e-6}
    for d, k, r, s in configs:
        W = torch.randn(d, k, generator=gen, dtype=torch.float64)
        label = f"W of shape {d}×{k}, r={r}, s={s:g}"
        W_given = W.clone()
        got, error = _call(student_fn, W_given, r, s)
        if error:
            return finish(f"on {label}: {error}")
        if not (isinstance(got, (tuple, list)) and len(got) == 3
                and all(isinstance(t, Tensor) for t in got)):
            return finish(f"on {label}: return three tensors (A, B, W_res), got "
                          f"{type(got).__name__}")
        A, B, W_res = (t.detach().to(torch.float64) for t in got)
        if not torch.equal(W_given, W):
            return finish(f"on {label}: your function changed W in place; return W_res as a "
                          "new tensor (pissa_init_ writes it into the layer afterwards)")
        _, _, ref_res = pissa_factors(W, r, s)
        if A.shape != (r, k) or B.shape != (d, r):
            why = (f"A has shape {tuple(A.shape)} and B {tuple(B.shape)}; expected A (r×k) = "
                   f"({r}, {k}) and B (d×r) = ({d}, {r})")
            if A.shape == (r, d) or B.shape == (k, r):
                why += (": you swapped the singular vectors. A reads the input (k), so it takes "
                        "the right singular vectors, the first r rows of Vh; B writes the "
                        "output (d), so it takes the first r columns of U")
            return finish(f"on {label}: {why}")
        if W_res.shape != W.shape:
            return finish(f"on {label}: W_res has shape {tuple(W_res.shape)}, expected W's "
                          f"{tuple(W.shape)}")
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        top = (U[:, :r] * S[:r]) @ Vh[:r]
        product = s * B @ A
        if not _close(product, top, **tol):
            candidates = {
                "you did not divide Σ by the scaling s: the layer multiplies B A by s, so "
                "A = (Σ_r/s)^½ V_rᵀ and B = U_r (Σ_r/s)^½ make s·B A = U_r Σ_r V_rᵀ":
                    s * top,
                "you did not take the square root: A = Σ Vᵀ and B = U Σ multiply to U Σ² Vᵀ; "
                "each factor gets (Σ_r/s)^½": (U[:, :r] * S[:r] ** 2) @ Vh[:r] / s,
                "you took the r *smallest* singular triplets (that is MiLoRA); "
                "torch.linalg.svd sorts them in descending order, PiSSA takes the first r":
                    (U[:, -r:] * S[-r:]) @ Vh[-r:],
            }
            if d == k:
                candidates["you swapped the singular vectors: s·B A came out as (U_r Σ_r V_rᵀ)ᵀ. "
                           "A reads the input, so it takes the right singular vectors (rows of "
                           "Vh); B takes the left ones (columns of U)"] = top.T
            why = _first_match(product, candidates, **tol) or (
                "s·B A should be the best rank-r part of W, U_r Σ_r V_rᵀ; max |difference| = "
                f"{(product - top).abs().max().item():.3g}")
            return finish(f"on {label}: {why}")
        if not _close(W_res, ref_res, **tol):
            candidates = {
                "W_res is W itself: subtract the principal part, W_res = W − s·B A, or the "
                "layer computes W + s·B A (the principal part twice) at the start": W,
                "you subtracted B A without the scaling: W_res = W − s·B A": W - B @ A,
                "you returned the principal part as the residual: W_res = W − s·B A is what "
                "is left after it": top,
            }
            why = _first_match(W_res, candidates, **tol) or (
                "W_res should be W − s·B A; max |difference| = "
                f"{(W_res - ref_res).abs().max().item():.3g}")
            return finish(f"on {label}: {why}")
        gram_A, gram_B, want = A @ A.T, B.T @ B, torch.diag(S[:r] / s)
        if not (_close(gram_A, want, **tol) and _close(gram_B, want, **tol)):
            eye = torch.eye(r, dtype=torch.float64)
            if _close(gram_B, eye, **tol):
                where = "all of Σ_r/s went into A (B = U_r has orthonormal columns)"
            elif _close(gram_A, eye, **tol):
                where = "all of Σ_r/s went into B (A = V_rᵀ has orthonormal rows)"
            else:
                where = "A Aᵀ and BᵀB should both be diag(Σ_r/s)"
            return finish(f"on {label}: s·B A is right but Σ is not split evenly: {where}. "
                          "PiSSA gives each factor the square root, A = (Σ_r/s)^½ V_rᵀ and "
                          "B = U_r (Σ_r/s)^½, so that both start at the same scale (BᵀB = A Aᵀ: "
                          "balanced factors, chapter 3)")
    return finish(None)


# --------------------------------------------------------------------------- multi-LoRA

def _multi_lora_reference(x: Tensor, W0: Tensor, b: Tensor, As: Sequence[Tensor],
                          Bs: Sequence[Tensor], scalings: Sequence[float], ids: Tensor) -> Tensor:
    d, k = W0.shape
    base = nn.Linear(k, d, dtype=W0.dtype)
    with torch.no_grad():
        base.weight.copy_(W0)
        base.bias.copy_(b)
    layer = MultiLoRALinear(base, {f"adapter{j}": (A, B, s)
                                   for j, (A, B, s) in enumerate(zip(As, Bs, scalings))})
    layer.set_ids(ids)
    with torch.no_grad():
        return layer(x)


def check_multi_lora_forward(student_forward: Callable[..., Tensor], *,
                             raise_on_failure: bool = False, verbose: bool = True) -> CheckResult:
    """Check ``student_forward(x, W0, b, As, Bs, scalings, ids) -> h``: many adapters, one batch.

    ``x`` (n, k) holds n requests, ``ids`` (n,) (long) names each request's adapter,
    ``As[j]`` (r_j, k), ``Bs[j]`` (d, r_j) and ``scalings[j]`` (a float) are adapter j's, with
    ranks that may differ. Row i of the result (n, d) is

        h_i = W0 x_i + b + s_{a_i} · B_{a_i} A_{a_i} x_i,   a_i = ids[i]

    (the reference is :class:`lora_edu.serving.MultiLoRALinear`). The base product is shared
    by every request and computed once; only the low-rank branch is per request. The ids are
    unsorted, adapters have different ranks and scalings, and one adapter is absent.
    """
    gen = torch.Generator().manual_seed(8)
    # (d, k, ranks, scalings, ids)
    configs = [(6, 5, (2, 4, 1), (2.0, 0.5, 4.0), (2, 0, 1, 0, 2, 1, 1, 0)),
               (4, 7, (3, 3, 2, 1), (1.0, 8.0, 0.25, 2.0), (3, 3, 1, 0, 1)),
               (5, 5, (1, 2), (3.0, 0.5), (1, 0, 1))]
    finish = _reporter("multi-LoRA batched forward", len(configs), raise_on_failure, verbose,
                       student_forward)
    for d, k, ranks, scalings, id_list in configs:
        f64 = {"generator": gen, "dtype": torch.float64}
        n = len(id_list)
        x, W0, b = torch.randn(n, k, **f64), torch.randn(d, k, **f64), torch.randn(d, **f64)
        As = [torch.randn(r, k, **f64) for r in ranks]
        Bs = [torch.randn(d, r, **f64) for r in ranks]
        ids = torch.tensor(id_list)
        label = (f"{len(ranks)} adapters of ranks {list(ranks)}, scalings {list(scalings)}, "
                 f"ids {list(id_list)}")
        got, error = _call_for_tensor("the output", student_forward, x.clone(), W0.clone(),
                                      b.clone(), [A.clone() for A in As],
                                      [B.clone() for B in Bs], list(scalings), ids.clone())
        if error:
            return finish(f"with {label}: {error}")
        assert isinstance(got, Tensor)
        expected = _multi_lora_reference(x, W0, b, As, Bs, scalings, ids)
        if got.shape != expected.shape:
            return finish(f"with {label}: the output has shape {tuple(got.shape)}, expected "
                          f"(n, d) = {tuple(expected.shape)}, one row per request")
        if _close(got, expected):
            continue
        base = x @ W0.T + b
        per = torch.stack([x @ (Bs[j] @ As[j]).T for j in range(len(ranks))])  # (n_a, n, d)
        rows = torch.arange(n)
        unscaled = per[ids, rows]                                           # (n, d)
        s = torch.tensor(scalings, dtype=torch.float64)
        order = torch.argsort(ids, stable=True)
        a0 = int(ids[0])
        one_adapter = ("every row used one adapter (adapter {a}), whatever its id: gather the "
                       "factors of each row's own adapter, A[ids[i]] and B[ids[i]]")
        candidates = {}
        for a in dict.fromkeys((a0, 0)):
            candidates[one_adapter.format(a=a)] = base + scalings[a] * per[a]
            candidates[one_adapter.format(a=a) + " (the scalings were gathered per row; the "
                       "factors were not)"] = base + s[ids][:, None] * per[a]
        candidates.update({
            "every row got the sum of all the adapters; row i takes only adapter ids[i]":
                base + (s[:, None, None] * per).sum(0),
            "the LoRA branch is not scaled: multiply row i by its adapter's s_{ids[i]}":
                base + unscaled,
            f"every row was scaled by s of request 0's adapter ({scalings[a0]:g}); each row "
            "takes its own adapter's scaling, scalings[ids[i]]": base + scalings[a0] * unscaled,
            f"every row was scaled by adapter 0's s ({scalings[0]:g}); each row takes its own "
            "adapter's scaling, scalings[ids[i]]": base + scalings[0] * unscaled,
            "the scaling is applied twice (s² instead of s)":
                base + (s[ids] ** 2)[:, None] * unscaled,
            "the scalings follow the sorted order of the ids while the rows do not: index "
            "them with the same ids as the factors": base + s[ids[order]][:, None] * unscaled,
            "the rows come back in the order sorted by adapter: put them back in request "
            "order with the inverse permutation": expected[order],
            "the base output W0 x + b is added twice (is it in your per-adapter loop "
            "too?): compute it once for the whole batch": 2 * base + (expected - base),
            "W0 x is added twice: compute the base product once for the whole batch":
                expected + x @ W0.T,
            "the bias is missing: h_i = W0 x_i + b + s B A x_i": expected - b,
            "the bias is added twice": expected + b,
        })
        candidates["the low-rank rows come back in the order sorted by adapter: put them back "
                   "in request order with the inverse permutation"] = \
            base + (expected - base)[order]
        why = _first_match(got, candidates) or \
            f"max |difference| = {(got - expected).abs().max().item():.3g}"
        return finish(f"with {label}: {why}")
    return finish(None)


# --------------------------------------------------------------------------- factor gradients

def check_factor_gradients(student_grads: Callable[[Tensor, Tensor, Tensor],
                                                   tuple[Tensor, Tensor]], *,
                           raise_on_failure: bool = False, verbose: bool = True) -> CheckResult:
    """Check ``student_grads(B, A, W) -> (dB, dA)``, the gradients of L = ½‖B A − W‖²_F.

    ``B`` is (d, r), ``A`` (r, k), ``W`` (d, k); with E = B A − W the answer is
    dL/dB = E Aᵀ (d, r) and dL/dA = Bᵀ E (r, k). The reference is autograd's.
    """
    gen = torch.Generator().manual_seed(3)
    shapes = [(5, 2, 7), (4, 3, 4), (6, 1, 3)]
    finish = _reporter("gradients of ½‖BA − W‖²", len(shapes), raise_on_failure, verbose,
                       student_grads)
    for d, r, k in shapes:
        B = torch.randn(d, r, generator=gen, dtype=torch.float64, requires_grad=True)
        A = torch.randn(r, k, generator=gen, dtype=torch.float64, requires_grad=True)
        W = torch.randn(d, k, generator=gen, dtype=torch.float64)
        (0.5 * (B @ A - W).square().sum()).backward()
        dB, dA = B.grad, A.grad
        label = f"d={d}, r={r}, k={k}"
        value, error = _call(student_grads, B.detach().clone(), A.detach().clone(), W.clone())
        if error is None and (not isinstance(value, (tuple, list)) or len(value) != 2):
            error = "return a pair (dB, dA)"
        if error:
            return finish(f"with {label}: {error}")
        try:
            got_B, got_A = (torch.as_tensor(v).detach().to(torch.float64) for v in value)
        except Exception:
            return finish(f"with {label}: dB and dA should be tensors")
        if _close(got_B, dB) and _close(got_A, dA):
            continue
        mistakes = {
            "the sign is flipped: E = B A − W, not W − B A": (-dB, -dA),
            "a factor 2: the loss has a ½, so its gradient has none": (2 * dB, 2 * dA),
            "dB and dA are swapped: return (dL/dB, dL/dA)": (dA, dB),
        }
        why = next((m for m, (wb, wa) in mistakes.items()
                    if got_B.shape == wb.shape and got_A.shape == wa.shape
                    and _close(got_B, wb) and _close(got_A, wa)), None)
        if why is None:
            for what, got, want in (("dB", got_B, dB), ("dA", got_A, dA)):
                if got.shape != want.shape:
                    why = (f"{what} has shape {tuple(got.shape)}, expected "
                           f"{tuple(want.shape)}: a gradient has the shape of its factor")
                    break
                if not _close(got, want):
                    why = (f"{what} is off by max |difference| = "
                           f"{(got - want).abs().max().item():.3g}; with E = B A − W, "
                           f"dL/dB = E Aᵀ and dL/dA = Bᵀ E")
                    break
        return finish(f"with {label}: {why}")
    return finish(None)


# --------------------------------------------------------------------------- Wilson interval

def check_wilson_interval(student_interval: Callable[[int, int], tuple[float, float]], *,
                          raise_on_failure: bool = False, verbose: bool = True) -> CheckResult:
    """Check ``student_interval(k, n) -> (low, high)``, the 95 % Wilson score interval of a
    proportion k/n (the reference is :func:`lora_edu.stats.proportion_interval`).

    With p = k/n and z = 1.95996…: centre (p + z²/2n) / (1 + z²/n), half-width
    z √(p(1−p)/n + z²/4n²) / (1 + z²/n). Bounds within 5·10⁻⁵ of the reference pass, so z
    rounded to 1.96 (as chapter 15's exercise writes it; it moves a bound by at most about
    10⁻⁵ on these cases) passes too, while Wald's interval or a 90 % one does not.
    """
    from statistics import NormalDist

    from lora_edu.stats import proportion_interval

    cases = [(45, 48), (12, 48), (48, 48), (0, 20), (7, 10), (500, 1000)]
    finish = _reporter("Wilson interval", len(cases), raise_on_failure, verbose,
                       student_interval)
    z = NormalDist().inv_cdf(0.975)
    for k, n in cases:
        ref = proportion_interval(k, n)
        value, error = _call(student_interval, k, n)
        if error is None:
            try:
                low, high = (float(v) for v in value)  # type: ignore[union-attr]
            except Exception:
                error = f"return a pair (low, high) of numbers, got {value!r}"
        if error:
            return finish(f"with k={k}, n={n}: {error}")
        if abs(low - ref.low) < 5e-5 and abs(high - ref.high) < 5e-5:
            continue
        p = k / n
        wald = z * (p * (1 - p) / n) ** 0.5
        z90 = NormalDist().inv_cdf(0.95)
        centre90 = (p + z90 ** 2 / (2 * n)) / (1 + z90 ** 2 / n)
        half90 = z90 * (p * (1 - p) / n + z90 ** 2 / (4 * n * n)) ** 0.5 / (1 + z90 ** 2 / n)
        mistakes = {
            "that is the Wald interval p ± z√(p(1−p)/n); Wilson's is centred at "
            "(p + z²/2n)/(1 + z²/n) and never leaves [0, 1]": (p - wald, p + wald),
            "that is a 90 % interval (z = 1.645); use z = 1.960 for 95 %":
                (centre90 - half90, centre90 + half90),
            "low and high are swapped": (ref.high, ref.low),
        }
        why = next((m for m, (a, b) in mistakes.items()
                    if abs(low - a) < 5e-5 and abs(high - b) < 5e-5),
                   f"expected ({ref.low:.7f}, {ref.high:.7f}) within 5e-5, got "
                   f"({low:.7f}, {high:.7f})")
        return finish(f"with k={k}, n={n}: {why}")
    return finish(None)
