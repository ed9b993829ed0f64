"""Tests of lora_edu.linalg: rank, truncated SVD, Eckart–Young, factorisation, counting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_edu.linalg import (
    as_matrix, default_tolerance, eckart_young_error, energy_curve, exact_rank, factorise,
    factorisation_loss,
    dense_params, init_factors, lora_paper_params, lora_params, low_rank_approx,
    numerical_rank, rank_for_energy, singular_values, truncated_svd,
)

FAST = settings(max_examples=25, deadline=None, derandomize=True)



def spectrum_matrix(d: int, k: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    """``U diag(s) Vᵀ`` with random orthonormal U (d×m), V (k×m), m = len(s)."""
    g = torch.Generator().manual_seed(seed)
    m = s.numel()
    U, _ = torch.linalg.qr(torch.randn(d, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(k, m, generator=g, dtype=torch.float64))
    return (U * s) @ V.T


@st.composite
def shape_and_rank(draw, max_dim: int = 12):
    d = draw(st.integers(1, max_dim))
    k = draw(st.integers(1, max_dim))
    r = draw(st.integers(1, min(d, k)))
    seed = draw(st.integers(0, 2**31 - 1))
    return d, k, r, seed


def gaussian(d: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------------- rank

def test_exact_rank_worked_example_changes_with_one_entry():
    W = np.array([[1, 2, 3], [2, 4, 6], [10, 20, 30]])
    assert exact_rank(W) == 1
    W[2, 2] = 70
    assert exact_rank(W) == 2


def test_exact_rank_refuses_floats():
    with pytest.raises(TypeError, match="numerical_rank"):
        exact_rank(np.eye(3))


@FAST
@given(shape_and_rank(max_dim=40))
def test_numerical_rank_of_product_is_r(case):
    d, k, r, seed = case
    B, A = gaussian(d, r, seed), gaussian(r, k, seed + 1)
    assert numerical_rank(B @ A) == r
    # in float32 the default tolerance (~1e-6·σ_1 here) is only safe for well-conditioned
    # factors: orthonormal columns and rows, singular values in [1, 2]
    s = torch.linspace(1, 2, r, dtype=torch.float64)
    assert numerical_rank(spectrum_matrix(d, k, s, seed).float()) == r


@FAST
@given(shape_and_rank(max_dim=20))
def test_numerical_rank_matches_numpy_and_torch(case):
    d, k, r, seed = case
    W = gaussian(d, r, seed) @ gaussian(r, k, seed + 1)
    assert numerical_rank(W) == np.linalg.matrix_rank(W.numpy()) == torch.linalg.matrix_rank(W)
    assert numerical_rank(W.numpy()) == r  # NumPy input is accepted too


def test_numerical_rank_tolerance_decides_noise():
    W = gaussian(64, 8, 0) @ gaussian(8, 64, 1) + 1e-6 * gaussian(64, 64, 2)
    assert numerical_rank(W) == 64            # noise far above ε·σ_max: full rank
    assert numerical_rank(W, tol=1e-3) == 8   # a tolerance above the noise recovers r
    assert numerical_rank(W, tol=0) == 64
    assert default_tolerance(W) == pytest.approx(
        float(singular_values(W)[0]) * 64 * np.finfo(np.float64).eps)


def test_rank_of_product_bounded_by_factors():
    B = gaussian(6, 4, 0)
    B[:, 3] = B[:, 0] + B[:, 1]               # rank B = 3
    A = gaussian(4, 5, 1)
    assert numerical_rank(B) == 3 and numerical_rank(A) == 4
    assert numerical_rank(B @ A) == 3


def test_row_rank_equals_column_rank():
    W = gaussian(7, 3, 0) @ gaussian(3, 9, 1)
    assert numerical_rank(W) == numerical_rank(W.T) == 3


# --------------------------------------------------------------------------- SVD, Eckart–Young

@FAST
@given(shape_and_rank())
def test_truncated_svd_error_equals_tail_energy(case):
    d, k, r, seed = case
    W = gaussian(d, k, seed)
    s = torch.linalg.svdvals(W)
    Wr = low_rank_approx(W, r)
    tail = s[r:]
    assert torch.linalg.matrix_norm(W - Wr, "fro") ** 2 == pytest.approx(
        float(tail.square().sum()), abs=1e-10)
    assert torch.linalg.matrix_norm(W - Wr, 2) == pytest.approx(
        float(tail[0]) if tail.numel() else 0.0, abs=1e-10)
    assert eckart_young_error(W, r) == pytest.approx(float(tail.square().sum().sqrt()), abs=1e-12)
    assert numerical_rank(Wr) == min(r, numerical_rank(W))


@FAST
@given(shape_and_rank())
def test_random_rank_r_candidates_never_beat_truncated_svd(case):
    d, k, r, seed = case
    W = gaussian(d, k, seed)
    best_fro, best_two = eckart_young_error(W, r), eckart_young_error(W, r, "spectral")
    g = torch.Generator().manual_seed(seed + 7)
    for _ in range(20):
        # the best matrix whose columns lie in a random r-dimensional subspace: Q Qᵀ W
        Q, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
        for C in (Q @ (Q.T @ W), torch.randn(d, r, generator=g, dtype=torch.float64)
                  @ torch.randn(r, k, generator=g, dtype=torch.float64)):
            assert float(torch.linalg.matrix_norm(W - C, "fro")) >= best_fro - 1e-10
            assert float(torch.linalg.matrix_norm(W - C, 2)) >= best_two - 1e-10


@FAST
@given(shape_and_rank())
def test_low_rank_approx_is_best_in_every_unitarily_invariant_norm(case):
    """Mirsky, as low_rank_approx's docstring states: σ_i(W − M) ≥ σ_{i+r}(W) for every i
    and every M of rank ≤ r, so every Ky Fan and Schatten norm of W − M is ≥ that of W − W_r."""
    d, k, r, seed = case
    W = gaussian(d, k, seed)
    s = torch.linalg.svdvals(W)
    tail = torch.cat([s[r:], torch.zeros(r, dtype=s.dtype)])      # σ(W − W_r), padded
    torch.testing.assert_close(torch.linalg.svdvals(W - low_rank_approx(W, r)), tail)
    g = torch.Generator().manual_seed(seed + 11)
    near = low_rank_approx(W, r) + 0.1 * torch.randn(d, k, generator=g, dtype=W.dtype)
    for M in (torch.randn(d, r, generator=g, dtype=W.dtype)
              @ torch.randn(r, k, generator=g, dtype=W.dtype),
              low_rank_approx(near, r)):                             # a close competitor
        sv = torch.linalg.svdvals(W - M)
        assert bool((sv >= tail - 1e-10).all())                      # Weyl, entry by entry
        for j in range(1, sv.numel() + 1):                           # Ky Fan j-norms
            assert float(sv[:j].sum()) >= float(tail[:j].sum()) - 1e-10
        for p in (1, 3):                                             # Schatten p-norms
            assert float(sv.pow(p).sum()) >= float(tail.pow(p).sum()) * (1 - 1e-12)


def test_best_approximation_when_rank_w_is_at_most_r_is_w_itself():
    """σ_r = σ_{r+1} = 0 (rank W < r): the tie is harmless, the minimiser is W, error 0."""
    W = spectrum_matrix(7, 6, torch.tensor([3.0, 1.0], dtype=torch.float64), 5)   # rank 2
    for r in (2, 3, 4):
        torch.testing.assert_close(low_rank_approx(W, r), W)
        assert eckart_young_error(W, r) == pytest.approx(0.0, abs=1e-12)


def test_truncated_svd_factors_shapes_and_orthonormality():
    W = gaussian(9, 6, 3)
    U, S, Vh = truncated_svd(W, 4)
    assert U.shape == (9, 4) and S.shape == (4,) and Vh.shape == (4, 6)
    torch.testing.assert_close(U.T @ U, torch.eye(4, dtype=W.dtype))
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(4, dtype=W.dtype))
    assert bool((S[:-1] >= S[1:]).all())
    torch.testing.assert_close(low_rank_approx(W, 6), W)  # full rank reproduces W


def test_energy_curve_and_rank_for_energy():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    W = spectrum_matrix(6, 5, s, 0)
    curve = energy_curve(W)
    torch.testing.assert_close(curve[:3], torch.tensor([9 / 14, 13 / 14, 1.0], dtype=W.dtype))
    assert rank_for_energy(W, 0.6) == 1
    assert rank_for_energy(W, 0.9) == 2
    assert rank_for_energy(W, 1.0) == 3


# --------------------------------------------------------------------------- factorisation

@settings(max_examples=8, deadline=None, derandomize=True)
@given(shape_and_rank(max_dim=10), st.sampled_from(["gd", "adam"]))
def test_factorisation_reaches_eckart_young_floor(case, optimizer):
    d, k, r, seed = case
    m = min(d, k)
    g = torch.Generator().manual_seed(seed)
    # well conditioned: top r singular values in [1, 2], the rest in [0, 0.3], a clear gap
    s = torch.cat([1 + torch.rand(r, generator=g), 0.3 * torch.rand(m - r, generator=g)])
    W = spectrum_matrix(d, k, s.double().sort(descending=True).values, seed)
    lr = 0.2 if optimizer == "gd" else 0.01
    fit = factorise(W, r, steps=1500, lr=lr, optimizer=optimizer, seed=seed)
    half_norm = 0.5 * float(W.square().sum())
    assert fit.floor == pytest.approx(0.5 * eckart_young_error(W, r) ** 2)
    assert fit.losses[-1] <= 1.01 * fit.floor + 1e-6 * half_norm
    assert fit.B.shape == (d, r) and fit.A.shape == (r, k) and len(fit.losses) == 1501


def test_zero_initialisation_never_moves_but_lora_initialisation_learns():
    W = gaussian(8, 6, 0)
    stuck = factorise(W, 2, steps=50, init="zero")
    assert stuck.losses[0] == stuck.losses[-1] == pytest.approx(0.5 * float(W.square().sum()))
    assert not stuck.B.any() and not stuck.A.any()
    lora = factorise(W, 2, steps=300, lr=0.05, init="lora")
    assert lora.losses[0] == pytest.approx(0.5 * float(W.square().sum()))  # BA = 0 at start
    assert lora.losses[-1] < 0.5 * lora.losses[0]


def test_init_factors_follow_lora_convention():
    B, A = init_factors(7, 5, 3, "lora", seed=4, dtype=torch.float64)
    assert B.shape == (7, 3) and A.shape == (3, 5) and A.dtype == torch.float64
    assert not B.any() and A.abs().max() <= 1 / 5 ** 0.5 and A.abs().min() > 0
    B, A = init_factors(7, 5, 3, "small", scale=1e-3, seed=4)
    assert 0 < float(B.abs().max()) < 1e-2 and 0 < float(A.abs().max()) < 1e-2
    with pytest.raises(ValueError, match="init must be"):
        init_factors(7, 5, 3, "kaiming")  # type: ignore[arg-type]


def test_factorise_leaves_w_untouched():
    W = gaussian(6, 5, 0)
    before = W.clone()
    factorise(W, 2, steps=20)
    assert torch.equal(W, before) and not W.requires_grad


def test_factorise_is_seeded_and_leaves_global_rng_alone():
    W = gaussian(5, 4, 1)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = factorise(W, 2, steps=5, seed=3), factorise(W, 2, steps=5, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a.A, b.A) and a.losses == b.losses


def test_factorise_from_a_given_start_matches_the_equivalent_init():
    W = gaussian(6, 5, 2)
    B0, A0 = init_factors(6, 5, 2, "lora", seed=7, dtype=torch.float64)
    kept = (B0.clone(), A0.clone())
    a = factorise(W, 2, steps=15, lr=0.05, seed=7)
    b = factorise(W, 2, steps=15, lr=0.05, start=(B0, A0))
    assert a.losses == b.losses and torch.equal(a.B, b.B)
    assert torch.equal(B0, kept[0]) and torch.equal(A0, kept[1])  # start not modified
    # a start with a zero product but both factors non-zero: C(A0) ⊆ N(B0)
    B1 = gaussian(6, 2, 3)
    B1[:, 1] = 0.0
    A1 = torch.zeros(2, 5, dtype=torch.float64)
    A1[1] = 1.0
    assert not (B1 @ A1).any()
    fit = factorise(W, 2, steps=200, lr=0.05, start=(B1, A1))
    assert fit.losses[-1] < 0.5 * fit.losses[0]
    with pytest.raises(ValueError, match="shapes"):
        factorise(W, 2, start=(B1.T, A1))
    with pytest.raises(TypeError, match="pair of tensors"):
        factorise(W, 2, start=B1)  # type: ignore[arg-type]


def test_factorise_lr_lambda_scales_the_step():
    W = gaussian(5, 4, 4)
    frozen = factorise(W, 2, steps=10, lr=0.1, lr_lambda=lambda t: 0.0)
    moving = factorise(W, 2, steps=10, lr=0.1, lr_lambda=lambda t: 1.0)
    plain = factorise(W, 2, steps=10, lr=0.1)
    assert len(set(frozen.losses)) == 1            # a zero multiplier never moves
    assert moving.losses == plain.losses
    with pytest.raises(TypeError, match="lr_lambda"):
        factorise(W, 2, lr_lambda=0.5)  # type: ignore[arg-type]


def test_factorise_snapshots_are_the_factors_at_those_steps():
    W = gaussian(5, 4, 5)
    fit = factorise(W, 2, steps=12, lr=0.05, snapshots=[0, 5, 12])
    assert sorted(fit.snapshots) == [0, 5, 12]
    B5, A5 = fit.snapshots[5]
    assert float(factorisation_loss(B5, A5, W)) == pytest.approx(fit.losses[5], rel=1e-12)
    B12, A12 = fit.snapshots[12]
    assert torch.equal(B12, fit.B) and torch.equal(A12, fit.A)
    assert not fit.snapshots[0][0].any()               # LoRA's start: B = 0
    with pytest.raises(ValueError, match="snapshots"):
        factorise(W, 2, steps=3, snapshots=[4])


def test_one_gradient_step_changes_the_gram_excess_by_exactly_lr_squared_terms():
    """Chapter 3: C = AAᵀ − BᵀB moves by lr²(∇_A∇_Aᵀ − ∇_Bᵀ∇_B) per plain GD step, exactly."""
    W = gaussian(7, 5, 6)
    lr = 0.05
    fit = factorise(W, 2, steps=3, lr=lr, init="small", init_scale=0.5, seed=1,
                    snapshots=[0, 1, 2, 3])
    for t in range(3):
        (B, A), (B1, A1) = fit.snapshots[t], fit.snapshots[t + 1]
        E = B @ A - W
        grad_B, grad_A = E @ A.T, B.T @ E
        change = (A1 @ A1.T - B1.T @ B1) - (A @ A.T - B.T @ B)
        predicted = lr ** 2 * (grad_A @ grad_A.T - grad_B.T @ grad_B)
        assert torch.allclose(change, predicted, atol=1e-13)
        assert float(predicted.abs().max()) > 1e-6      # not trivially zero


def test_factorise_adamw_is_adam_with_decoupled_weight_decay():
    W = gaussian(6, 5, 7)
    adam = factorise(W, 2, steps=1, lr=0.01, optimizer="adam", init="small", seed=2)
    adamw = factorise(W, 2, steps=1, lr=0.01, optimizer="adamw", init="small", seed=2)
    B0, A0 = init_factors(6, 5, 2, "small", seed=2, dtype=torch.float64)
    # AdamW first shrinks the weights by (1 − lr·0.01), then takes Adam's step
    assert torch.allclose(adamw.B, adam.B - 0.01 * 0.01 * B0, atol=1e-15)
    assert torch.allclose(adamw.A, adam.A - 0.01 * 0.01 * A0, atol=1e-15)


# --------------------------------------------------------------------------- counting

def test_parameter_counts():
    assert dense_params(4096, 4096) == 16_777_216
    assert lora_params(4096, 4096, 8) == 8 * 8192
    assert lora_params(10, 3, 2) == 26
    # GPT-3 175B, r = 4 on W_q and W_v in 96 layers: L̂ = 192 matrices of 12288×12288
    assert lora_paper_params(192, 12288, 4) == 2 * 192 * 12288 * 4 == 18_874_368


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("r", [-1, 6])
def test_rank_out_of_range_names_r_and_range(r):
    W = gaussian(5, 7, 0)
    with pytest.raises(ValueError, match=r"r must satisfy 0 <= r <= min\(d, k\) = 5"):
        low_rank_approx(W, r)
    with pytest.raises(ValueError, match=r"r must satisfy 1 <= r <= min\(d, k\) = 5"):
        factorise(W, r)


def test_rank_zero_is_the_zero_matrix_but_not_a_factor_pair():
    W = gaussian(5, 7, 0)
    U, S, Vh = truncated_svd(W, 0)
    assert (U.shape, S.shape, Vh.shape) == ((5, 0), (0,), (0, 7))
    assert torch.equal(low_rank_approx(W, 0), torch.zeros_like(W))
    assert eckart_young_error(W, 0) == pytest.approx(float(torch.linalg.matrix_norm(W)))
    assert eckart_young_error(W, 0, "spectral") == pytest.approx(float(torch.linalg.svdvals(W)[0]))
    with pytest.raises(ValueError, match="factor pair needs at least one column"):
        factorise(W, 0)


@pytest.mark.parametrize("r", [2.0, True, "2"])
def test_rank_of_wrong_type(r):
    with pytest.raises(TypeError, match="r must be an int"):
        truncated_svd(gaussian(3, 3, 0), r)


@pytest.mark.parametrize("W, error, message", [
    (torch.ones(3), ValueError, "2-D"),
    (torch.ones(2, 3, 4), ValueError, "2-D"),
    (torch.ones(0, 3), ValueError, "at least one row"),
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), ValueError, "NaN or Inf"),
    (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), ValueError, "NaN or Inf"),
    (torch.ones(3, 3, dtype=torch.int64), TypeError, "floating dtype"),
    (np.ones((3, 3), dtype=np.int32), TypeError, "floating-point"),
    ([[1.0, 2.0]], TypeError, "torch.Tensor or numpy.ndarray"),
])
def test_bad_matrices_are_refused(W, error, message):
    for fn in (numerical_rank, singular_values, lambda M: low_rank_approx(M, 1),
               lambda M: factorise(M, 1, steps=1)):
        with pytest.raises(error, match=message):
            fn(W)


@pytest.mark.parametrize("kwargs, error", [
    ({"steps": 0}, ValueError), ({"lr": -1.0}, ValueError), ({"lr": float("nan")}, ValueError),
    ({"optimizer": "sgd"}, ValueError), ({"init": "he"}, ValueError), ({"steps": 1.5}, TypeError),
])
def test_factorise_bad_hyperparameters(kwargs, error):
    with pytest.raises(error):
        factorise(gaussian(4, 4, 0), 2, **kwargs)


def test_bad_tolerance_and_fraction():
    W = gaussian(3, 3, 0)
    with pytest.raises(ValueError, match="tol"):
        numerical_rank(W, tol=-1.0)
    with pytest.raises(ValueError, match="fraction"):
        rank_for_energy(W, 1.5)
    with pytest.raises(ValueError, match="norm"):
        eckart_young_error(W, 1, norm="nuclear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="r must satisfy"):
        lora_params(4, 3, 4)


def test_as_matrix_keeps_numpy_float64_without_copy():
    a = np.ones((2, 3))
    t = as_matrix(a)
    assert t.dtype == torch.float64 and t.data_ptr() == a.__array_interface__["data"][0]
