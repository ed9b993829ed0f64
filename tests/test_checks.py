"""lora_edu.checks: correct implementations pass; each typical mistake is named."""

from __future__ import annotations

import pytest
import torch

from lora_edu.checks import (check_dora_forward, check_low_rank_approx, check_lora_forward,
                             check_merge_unmerge, check_multi_lora_forward, check_nf4_quantize,
                             check_pissa_init, check_rank, check_subspace_similarity)
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

def _nf4(W, block, global_scale=False, guard_zero=True):
    code = nf4_codebook()
    blocks = W.reshape(-1, block)
    scale = blocks.abs().amax() if global_scale else blocks.abs().amax(1, keepdim=True)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)) if guard_zero else scale
    idx = ((blocks / safe)[..., None] - code).abs().argmin(-1)
    values = code[idx] * scale
    if not guard_zero:  # 0/0: what a division without the guard gives a block of zeros
        values = torch.where(scale > 0, values, torch.full_like(values, float("nan")))
    return values.reshape(W.shape)


def test_nf4_correct_passes():
    assert _quiet(check_nf4_quantize, _nf4)


def test_nf4_global_absmax_is_named():
    result = _quiet(check_nf4_quantize, lambda W, b: _nf4(W, b, global_scale=True))
    assert not result and "blockwise" in result.message


def test_nf4_zero_block_nan_is_named():
    result = _quiet(check_nf4_quantize, lambda W, b: _nf4(W, b, guard_zero=False))
    assert not result and "NaN" in result.message and "block of zeros" in result.message


def test_nf4_not_nearest_code_is_named():
    def round_up(W, block):  # the next code up instead of the nearest
        code = nf4_codebook()
        blocks = W.reshape(-1, block)
        scale = blocks.abs().amax(1, keepdim=True)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        idx = torch.bucketize(blocks / safe, code).clamp(max=15)
        return (code[idx] * scale).reshape(W.shape)
    result = _quiet(check_nf4_quantize, round_up)
    assert not result and "not the nearest code" in result.message


def test_nf4_wrong_codebook_is_named():
    def int4_like(W, block):
        blocks = W.reshape(-1, block)
        scale = blocks.abs().amax(1, keepdim=True).clamp(min=1e-30)  # a zero block stays 0
        return (torch.round(blocks / scale * 7) / 7 * scale).reshape(W.shape)
    result = _quiet(check_nf4_quantize, int4_like)
    assert not result and "NF4 grid" in result.message


# ----------------------------------------------------------------- subspace similarity φ

def _phi(A1, A2, i, j, *, norm="min", square=True, vectors="right", smallest=False):
    U1, _, Vh1 = torch.linalg.svd(A1, full_matrices=False)
    U2, _, Vh2 = torch.linalg.svd(A2, full_matrices=False)
    V1, V2 = {"right": (Vh1.T, Vh2.T), "left": (U1, U2), "vh_columns": (Vh1, Vh2),
              "vh_full_columns": (torch.linalg.svd(A1).Vh, torch.linalg.svd(A2).Vh),
              "qr": (torch.linalg.qr(A1.T).Q, torch.linalg.qr(A2.T).Q)}[vectors]
    if smallest:
        V1, V2 = V1.flip(1), V2.flip(1)
    overlap = torch.linalg.matrix_norm(V1[:, :i].T @ V2[:, :j])
    overlap = overlap ** 2 if square else overlap
    return float(overlap / {"min": min(i, j), "max": max(i, j), "none": 1}[norm])


def test_subspace_similarity_correct_passes():
    result = _quiet(check_subspace_similarity, _phi)
    assert result and result.cases == 4


def test_subspace_similarity_float32_student_passes():
    assert _quiet(check_subspace_similarity,
                  lambda A1, A2, i, j: _phi(A1.float(), A2.float(), i, j))


@pytest.mark.parametrize("kwargs, phrase", [
    ({"norm": "max"}, "min(i, j)"),
    ({"norm": "none"}, "did not normalise"),
    ({"square": False}, "did not square"),
    ({"vectors": "left"}, "left singular vectors"),
    ({"vectors": "vh_columns"}, "columns of Vh"),
    ({"vectors": "vh_full_columns"}, "columns of Vh"),
    ({"vectors": "qr"}, "orthonormalised the rows"),
    ({"smallest": True}, "smallest"),
])
def test_subspace_similarity_mistakes_are_named(kwargs, phrase):
    def wrong(A1, A2, i, j):
        return _phi(A1, A2, i, j, **kwargs)
    result = _quiet(check_subspace_similarity, wrong)
    assert not result and phrase in result.message, result.message


def test_subspace_similarity_non_number_is_reported():
    result = _quiet(check_subspace_similarity, lambda A1, A2, i, j: "high")
    assert not result and "one number" in result.message


# ----------------------------------------------------------------- DoRA

def _dora(x, W0, b, A, B, m, alpha, r, *, scale=True, axis=1, detach="norm", norm_of="V",
          bias="outside", col_scale=False):
    V = W0 + ((alpha / r) if scale else 1.0) * B @ A
    n = torch.linalg.vector_norm(V if norm_of == "V" else W0, dim=axis)
    if detach in ("norm", "m"):
        n = n.detach()
    if detach == "m":
        m = m.detach()
    elif detach == "direction":
        V, n = V.detach(), n.detach()
    W = V * (m / n) if col_scale else (m / n)[:, None] * V
    if bias == "scaled":
        return (x @ V.T + b) * (m / n)
    return x @ W.T + b


def test_dora_correct_passes():
    assert _quiet(check_dora_forward, _dora)


def test_dora_matches_the_package_layer():
    # the checker's reference is DoRALinear; PEFT's formula (W0 x + (m/n − 1) W0 x + ...) passes
    def peft_style(x, W0, b, A, B, m, alpha, r):
        s = alpha / r
        n = torch.linalg.vector_norm(W0 + s * B @ A, dim=1).detach()
        base = x @ W0.T
        return base + b + (m / n - 1) * base + (m / n) * (s * (x @ A.T) @ B.T)
    assert _quiet(check_dora_forward, peft_style)


def test_dora_exact_gradient_passes_with_detach_norm_false():
    exact = lambda *args: _dora(*args, detach="none")  # noqa: E731
    assert check_dora_forward(exact, detach_norm=False, verbose=False)
    result = check_dora_forward(_dora, detach_norm=False, verbose=False)
    assert not result and "treats the norm as a constant" in result.message


@pytest.mark.parametrize("kwargs, phrase", [
    ({"scale": False}, "not scaled"),
    ({"axis": 0}, "wrong axis"),
    ({"axis": 0, "col_scale": True}, "wrong axis"),
    ({"norm_of": "W0"}, "norm of W0 alone"),
    ({"bias": "scaled"}, "bias is scaled"),
    ({"detach": "none"}, "the exact one, through the norm"),
    ({"detach": "m"}, "m gets no gradient"),
    ({"detach": "direction"}, "detached the whole direction"),
])
def test_dora_mistakes_are_named(kwargs, phrase):
    result = _quiet(check_dora_forward, lambda *args: _dora(*args, **kwargs))
    assert not result and phrase in result.message, result.message


def test_dora_plain_lora_and_unnormalised_are_named():
    lora = lambda x, W0, b, A, B, m, a, r: x @ (W0 + a / r * B @ A).T + b  # noqa: E731
    assert "magnitude m is ignored" in _quiet(check_dora_forward, lora).message
    unnorm = lambda x, W0, b, A, B, m, a, r: x @ (m[:, None] * (W0 + a / r * B @ A)).T + b  # noqa
    assert "without dividing by the norm" in _quiet(check_dora_forward, unnorm).message


def test_dora_output_without_graph_is_reported():
    result = _quiet(check_dora_forward, lambda *args: _dora(*args).detach())
    assert not result and "carries no gradient" in result.message


# ----------------------------------------------------------------- PiSSA

def _pissa(W, r, s, *, divide=True, root=True, split="even", vectors="right", top=True,
           residual="subtract"):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    idx = slice(0, r) if top else slice(-r, None)
    U, S, Vh = U[:, idx], S[idx], Vh[idx]
    if vectors == "swapped":
        U, Vh = Vh.T, U.T
    Sd = S / s if divide else S
    half = Sd.sqrt() if root else Sd
    if split == "A":
        A, B = Sd[:, None] * Vh, U
    elif split == "B":
        A, B = Vh, U * Sd
    else:
        A, B = half[:, None] * Vh, U * half
    W_res = {"subtract": W - s * B @ A, "none": W.clone(), "unscaled": W - B @ A,
             "principal": s * B @ A}[residual]
    return A, B, W_res


def test_pissa_correct_passes():
    result = _quiet(check_pissa_init, _pissa)
    assert result and result.cases == 3


def test_pissa_package_reference_passes():
    from lora_edu.variants import pissa_factors
    assert _quiet(check_pissa_init, pissa_factors)


def test_pissa_sign_flips_are_accepted():
    def flipped(W, r, s):
        A, B, W_res = _pissa(W, r, s)
        sign = torch.tensor([(-1.0) ** t for t in range(r)], dtype=A.dtype)
        return sign[:, None] * A, B * sign, W_res
    assert _quiet(check_pissa_init, flipped)


@pytest.mark.parametrize("kwargs, phrase", [
    ({"residual": "none"}, "W_res is W itself"),
    ({"residual": "unscaled"}, "without the scaling"),
    ({"residual": "principal"}, "principal part as the residual"),
    ({"split": "A"}, "all of Σ_r/s went into A"),
    ({"split": "B"}, "all of Σ_r/s went into B"),
    ({"vectors": "swapped"}, "swapped the singular vectors"),
    ({"divide": False}, "did not divide Σ by the scaling"),
    ({"root": False}, "did not take the square root"),
    ({"top": False}, "MiLoRA"),
])
def test_pissa_mistakes_are_named(kwargs, phrase):
    result = _quiet(check_pissa_init, lambda W, r, s: _pissa(W, r, s, **kwargs))
    assert not result and phrase in result.message, result.message


def test_pissa_in_place_change_is_reported():
    def in_place(W, r, s):
        A, B, W_res = _pissa(W, r, s)
        W.sub_(s * B @ A)
        return A, B, W
    result = _quiet(check_pissa_init, in_place)
    assert not result and "in place" in result.message


def test_pissa_swapped_on_a_wide_matrix_names_the_shapes():
    # only the non-square cases: the checker's first case is square
    def swapped_shapes(W, r, s):
        if W.shape[0] == W.shape[1]:
            return _pissa(W, r, s)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :r].T, Vh[:r].T, W - (U[:, :r] * S[:r]) @ Vh[:r]
    result = _quiet(check_pissa_init, swapped_shapes)
    assert not result and "swapped the singular vectors" in result.message


# ----------------------------------------------------------------- multi-LoRA

def _multi(x, W0, b, As, Bs, scalings, ids, *, gather="row", scale="row", base_times=1,
           unsort=True):
    n = x.shape[0]
    out = torch.empty(n, W0.shape[0], dtype=x.dtype)
    order = torch.argsort(ids, stable=True)
    for i in range(n):
        a = {"row": int(ids[i]), "first": int(ids[0]), "zero": 0}[gather]
        s = {"row": scalings[int(ids[i])], "none": 1.0, "first": scalings[0],
             "twice": scalings[int(ids[i])] ** 2,
             "sorted": scalings[int(ids[order[i]])]}[scale]
        out[i] = s * Bs[a] @ (As[a] @ x[i])
    if not unsort:
        out = out[order]
    return base_times * (x @ W0.T + b) + out


def test_multi_lora_correct_passes():
    result = _quiet(check_multi_lora_forward, _multi)
    assert result and result.cases == 3


def test_multi_lora_padded_bmm_passes():
    def padded(x, W0, b, As, Bs, scalings, ids):
        r_max = max(A.shape[0] for A in As)
        A_pad = torch.stack([torch.cat([A, A.new_zeros(r_max - A.shape[0], A.shape[1])])
                             for A in As])
        B_pad = torch.stack([torch.cat([B, B.new_zeros(B.shape[0], r_max - B.shape[1])], 1)
                             for B in Bs])
        low = torch.bmm(A_pad[ids], x[:, :, None])               # (n, r_max, 1)
        delta = torch.bmm(B_pad[ids], low).squeeze(-1)           # (n, d)
        return x @ W0.T + b + torch.tensor(scalings, dtype=x.dtype)[ids, None] * delta
    assert _quiet(check_multi_lora_forward, padded)


def test_multi_lora_sum_of_all_adapters_is_named():
    def summed(x, W0, b, As, Bs, scalings, ids):
        return x @ W0.T + b + sum(s * x @ A.T @ B.T for A, B, s in zip(As, Bs, scalings))
    result = _quiet(check_multi_lora_forward, summed)
    assert not result and "sum of all the adapters" in result.message


@pytest.mark.parametrize("kwargs, phrase", [
    ({"gather": "first"}, "every row used one adapter"),
    ({"gather": "zero"}, "every row used one adapter (adapter 0)"),
    ({"scale": "none"}, "not scaled"),
    ({"scale": "first"}, "scaled by adapter 0's s"),
    ({"scale": "twice"}, "applied twice"),
    ({"scale": "sorted"}, "sorted order of the ids"),
    ({"base_times": 2}, "added twice"),
    ({"unsort": False}, "inverse permutation"),
])
def test_multi_lora_mistakes_are_named(kwargs, phrase):
    result = _quiet(check_multi_lora_forward, lambda *args: _multi(*args, **kwargs))
    assert not result and phrase in result.message, result.message


def test_multi_lora_wrong_shape_is_reported():
    result = _quiet(check_multi_lora_forward,
                    lambda x, W0, b, As, Bs, s, ids: (x @ W0.T + b).sum(1))
    assert not result and "one row per request" in result.message


def test_printed_lines_fit_a_phone(capsys):
    check_dora_forward(lambda *args: _dora(*args, axis=0))
    out = capsys.readouterr().out
    assert out.startswith("✗ DoRA") and len(out.splitlines()) > 1
    assert max(len(line) for line in out.splitlines()) <= 88


@pytest.mark.parametrize("check", [check_rank, check_low_rank_approx, check_lora_forward,
                                   check_merge_unmerge, check_nf4_quantize,
                                   check_subspace_similarity, check_dora_forward,
                                   check_pissa_init, check_multi_lora_forward])
def test_a_result_instead_of_a_function_is_refused(check):
    with pytest.raises(TypeError, match="pass your function itself"):
        check(0.5, verbose=False)


def test_merge_unmerge_refuses_a_non_callable_unmerge():
    merge = lambda W0, A, B, a, r: W0 + (a / r) * B @ A  # noqa: E731
    with pytest.raises(TypeError, match="pass your function itself"):
        check_merge_unmerge(merge, torch.zeros(1), verbose=False)


# ----------------------------------------------------------------- factor gradients, Wilson

def _grads(B, A, W, sign=1.0, factor=1.0, swap=False):
    E = sign * (B @ A - W)
    dB, dA = factor * E @ A.T, factor * B.T @ E
    return (dA, dB) if swap else (dB, dA)


def test_factor_gradients_accepts_the_right_answer():
    from lora_edu.checks import check_factor_gradients
    assert _quiet(check_factor_gradients, _grads)


@pytest.mark.parametrize("kwargs, phrase", [({"sign": -1.0}, "sign is flipped"),
                                            ({"factor": 2.0}, "factor 2"),
                                            ({"swap": True}, "swapped")])
def test_factor_gradients_names_the_mistake(kwargs, phrase):
    from lora_edu.checks import check_factor_gradients
    result = _quiet(check_factor_gradients, lambda B, A, W: _grads(B, A, W, **kwargs))
    assert not result and phrase in result.message, result.message


def test_factor_gradients_reports_a_wrong_shape():
    from lora_edu.checks import check_factor_gradients
    result = _quiet(check_factor_gradients, lambda B, A, W: ((B @ A - W).T @ B, B.T @ (B @ A - W)))
    assert not result and "shape" in result.message, result.message


def _wilson(k, n, z=1.959963984540054, wald=False):
    p = k / n
    if wald:
        h = z * (p * (1 - p) / n) ** 0.5
        return p - h, p + h
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return centre - half, centre + half


def test_wilson_interval_accepts_the_formula():
    from lora_edu.checks import check_wilson_interval
    assert _quiet(check_wilson_interval, _wilson)


def test_wilson_interval_accepts_z_rounded_to_1_96_as_the_exercise_writes_it():
    from lora_edu.checks import check_wilson_interval
    assert _quiet(check_wilson_interval, lambda k, n: _wilson(k, n, z=1.96))
    result = _quiet(check_wilson_interval, lambda k, n: _wilson(k, n, z=1.95))
    assert not result and "e-5" in result.message  # the message shows enough digits


@pytest.mark.parametrize("fn, phrase", [(lambda k, n: _wilson(k, n, wald=True), "Wald"),
                                        (lambda k, n: _wilson(k, n, z=1.6448536269514722),
                                         "90 %"),
                                        (lambda k, n: _wilson(k, n)[::-1], "swapped"),
                                        (lambda k, n: k / n, "pair")])
def test_wilson_interval_names_the_mistake(fn, phrase):
    from lora_edu.checks import check_wilson_interval
    result = _quiet(check_wilson_interval, fn)
    assert not result and phrase in result.message, result.message
