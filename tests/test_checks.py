"""lora_edu.checks: correct implementations pass; each typical mistake is named."""

from __future__ import annotations

import pytest
import torch

from lora_edu.checks import (check_low_rank_approx, check_lora_forward, check_merge_unmerge,
                             check_nf4_quantize, check_rank)
from lora_edu.quant import nf4_codebook


def _quiet(check, *args):
    return check(*args, verbose=False)


# ----------------------------------------------------------------- rank

def test_rank_correct_passes():
    result = _quiet(check_rank, lambda W: int(torch.linalg.matrix_rank(W)))
    assert result and result.cases == 5 and "all 5 cases" in result.message


def test_rank_counting_every_singular_value_is_explained():
    result = _quiet(check_rank, lambda W: int((torch.linalg.svdvals(W) != 0).sum()))
    assert not result
    assert "tolerance" in result.message and "30×20" in result.message


def test_rank_that_raises_is_reported():
    result = _quiet(check_rank, lambda W: 1 / 0)
    assert not result and "ZeroDivisionError" in result.message


def test_raise_on_failure_raises_assertion_error():
    with pytest.raises(AssertionError, match="rank"):
        check_rank(lambda W: 0, raise_on_failure=True, verbose=False)


def test_verbose_prints_a_tick(capsys):
    check_rank(lambda W: int(torch.linalg.matrix_rank(W)))
    assert capsys.readouterr().out.startswith("✓ rank")


# ----------------------------------------------------------------- best rank-r

def _svd_approx(W, r, *, smallest=False, unscaled=False, keep=None):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    idx = slice(-r, None) if smallest else slice(0, keep or r)
    return U[:, idx] @ Vh[idx] if unscaled else (U[:, idx] * S[idx]) @ Vh[idx]


def test_low_rank_correct_passes():
    assert _quiet(check_low_rank_approx, _svd_approx)


@pytest.mark.parametrize("wrong, phrase", [
    (lambda W, r: _svd_approx(W, r, smallest=True), "smallest"),
    (lambda W, r: _svd_approx(W, r, unscaled=True), "Eckart–Young optimum"),
    (lambda W, r: _svd_approx(W, r, keep=r + 1), "rank"),
    (lambda W, r: torch.linalg.svd(W, full_matrices=False)[0][:, :r], "shape"),
])
def test_low_rank_mistakes_are_named(wrong, phrase):
    result = _quiet(check_low_rank_approx, wrong)
    assert not result and phrase in result.message


# ----------------------------------------------------------------- LoRA forward

def _forward(x, W0, b, A, B, alpha, r):
    return x @ W0.T + b + (alpha / r) * (x @ A.T) @ B.T


def test_lora_forward_correct_passes():
    assert _quiet(check_lora_forward, _forward)


@pytest.mark.parametrize("wrong, phrase", [
    (lambda x, W0, b, A, B, a, r: x @ W0.T + b + (a / r) * (x @ A.T) @ B.T + 1e-3 * (x @ A.T).sum(),
     "is B zero?"),
    (lambda x, W0, b, A, B, a, r: x @ W0.T + b + (x @ A.T) @ B.T, "not scaled"),
    (lambda x, W0, b, A, B, a, r: x @ W0.T + b + (r / a) * (x @ A.T) @ B.T, "inverted"),
    (lambda x, W0, b, A, B, a, r: x @ W0.T + b + (a / r ** 0.5) * (x @ A.T) @ B.T, "rsLoRA"),
    (lambda x, W0, b, A, B, a, r: x @ W0.T + (a / r) * (x @ A.T) @ B.T, "bias is missing"),
    (lambda x, W0, b, A, B, a, r: b + (a / r) * (x @ A.T) @ B.T, "frozen path"),
    (lambda x, W0, b, A, B, a, r: x @ W0.T + b + (a / r) * x @ (B @ A).T @ torch.ones(1), "raised"),
])
def test_lora_forward_mistakes_are_named(wrong, phrase):
    result = _quiet(check_lora_forward, wrong)
    assert not result and phrase in result.message, result.message


# ----------------------------------------------------------------- merge / unmerge

def test_merge_unmerge_correct_passes():
    merge = lambda W0, A, B, a, r: W0 + (a / r) * B @ A  # noqa: E731
    unmerge = lambda W, A, B, a, r: W - (a / r) * B @ A  # noqa: E731
    assert _quiet(check_merge_unmerge, merge, unmerge)


def test_merge_without_scaling_is_named():
    result = _quiet(check_merge_unmerge, lambda W0, A, B, a, r: W0 + B @ A)
    assert not result and "not scaled" in result.message


def test_unmerge_that_does_not_undo_is_named():
    merge = lambda W0, A, B, a, r: W0 + (a / r) * B @ A  # noqa: E731
    result = _quiet(check_merge_unmerge, merge, lambda W, A, B, a, r: W - B @ A)
    assert not result and "unmerge must subtract exactly" in result.message


# ----------------------------------------------------------------- NF4

def _nf4(W, block, global_scale=False):
    code = nf4_codebook()
    blocks = W.reshape(-1, block)
    scale = blocks.abs().amax() if global_scale else blocks.abs().amax(1, keepdim=True)
    idx = ((blocks / scale)[..., None] - code).abs().argmin(-1)
    return (code[idx] * scale).reshape(W.shape)


def test_nf4_correct_passes():
    assert _quiet(check_nf4_quantize, _nf4)


def test_nf4_global_absmax_is_named():
    result = _quiet(check_nf4_quantize, lambda W, b: _nf4(W, b, global_scale=True))
    assert not result and "blockwise" in result.message


def test_nf4_wrong_codebook_is_named():
    def int4_like(W, block):
        blocks = W.reshape(-1, block)
        scale = blocks.abs().amax(1, keepdim=True)
        return (torch.round(blocks / scale * 7) / 7 * scale).reshape(W.shape)
    result = _quiet(check_nf4_quantize, int4_like)
    assert not result and "NF4 grid" in result.message
