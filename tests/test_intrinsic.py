"""Tests of lora_edu.intrinsic: projections, subspace training, ΔW analyses, φ, amplification."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lora_edu.intrinsic import (
    HadamardProjection, SparseProjection, SubspaceModel, amplification, amplification_factor,
    delta_weights, fwht, make_projection, projection_matrix, projection_norm,
    random_similarity, similarity_grid, subspace_similarity, truncate_updates,
)
from lora_edu.linalg import low_rank_approx, numerical_rank

FAST = settings(max_examples=25, deadline=None)


def gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def orthogonal(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(gaussian(n, n, seed=seed))[0]


# --------------------------------------------------------------------------- projections

def test_fwht_is_the_hadamard_matrix():
    H2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    H = H2
    for _ in range(3):
        H = torch.kron(H2, H)  # Sylvester's construction: H_16 = H_2 ⊗ H_2 ⊗ H_2 ⊗ H_2
    x = gaussian(3, 16, seed=1)
    assert torch.allclose(fwht(x), x @ H.T)


@pytest.mark.parametrize("kind", ["sparse", "hadamard"])
@pytest.mark.parametrize("D,d", [(1, 1), (37, 5), (300, 300), (1000, 64), (4096, 17)])
def test_every_column_has_unit_norm(kind, D, d):
    P = projection_matrix(make_projection(kind, D, d, seed=D + d)).double()
    assert P.shape == (D, d)
    assert torch.allclose(P.norm(dim=0), torch.ones(d, dtype=torch.float64), atol=1e-5)


def test_sparse_projection_has_s_distinct_rows_per_column():
    proj = SparseProjection(50, 40, s=20, seed=3)  # s²/D large: collisions must be redrawn
    P = projection_matrix(proj)
    assert ((P != 0).sum(dim=0) == 20).all()
    assert torch.allclose(P.abs()[P != 0], torch.full((40 * 20,), 1 / math.sqrt(20)))
    assert proj.rows.shape == (40, 20) and proj.s == 20


def test_default_sparsity_is_sqrt_D():
    assert SparseProjection(10_000, 3).s == 100


@pytest.mark.parametrize("D", [64, 256])
def test_hadamard_projection_is_orthogonal_when_D_is_a_power_of_two(D):
    P = projection_matrix(HadamardProjection(D, D, seed=0)).double()
    assert torch.allclose(P.T @ P, torch.eye(D, dtype=torch.float64), atol=1e-5)


def test_columns_nearly_orthogonal_for_large_D():
    for kind in ("sparse", "hadamard"):
        P = projection_matrix(make_projection(kind, 5000, 20, seed=1)).double()
        off = P.T @ P - torch.eye(20, dtype=torch.float64)
        assert off.abs().max() < 0.1, kind  # ~1/sqrt(D) for random unit vectors


@pytest.mark.parametrize("kind", ["sparse", "hadamard"])
def test_projection_is_linear_and_its_gradient_is_the_transpose(kind):
    proj = make_projection(kind, 300, 12, seed=5)
    P = projection_matrix(proj)
    z = torch.randn(12, requires_grad=True)
    g = torch.randn(300)
    assert torch.allclose(proj(z), P @ z, atol=1e-5)
    (proj(z) @ g).backward()
    assert torch.allclose(z.grad, P.T @ g, atol=1e-4)


def test_projection_is_fixed_by_its_seed():
    a, b = SparseProjection(500, 10, seed=7), SparseProjection(500, 10, seed=7)
    assert torch.equal(projection_matrix(a), projection_matrix(b))
    c = SparseProjection(500, 10, seed=8)
    assert not torch.equal(projection_matrix(a), projection_matrix(c))


# --------------------------------------------------------------------------- subspace training

def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 8), nn.Tanh(), nn.Linear(8, 8, bias=False))  # 64 + 64


def test_subspace_model_starts_at_theta0_and_trains_only_z():
    net = tiny_net()
    x = torch.randn(5, 7)
    sub = SubspaceModel(net, d=10, projection="sparse")
    assert sub.D == 128 and sub.d == 10
    assert torch.equal(sub(x), net(x))
    assert [n for n, p in sub.named_parameters() if p.requires_grad] == ["z"]


@pytest.mark.parametrize("steps", [1, 3])
def test_subspace_sgd_with_d_equal_D_reproduces_ordinary_sgd(steps):
    """With D = 128 = L, P is orthogonal, so z ← z − η Pᵀ g gives θ ← θ − η P Pᵀ g = θ − η g."""
    x, y = torch.randn(16, 7), torch.randn(16, 8)
    plain = tiny_net()
    sub = SubspaceModel(tiny_net(), d=128, projection="hadamard", seed=2)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1)
    opt_sub = torch.optim.SGD([sub.z], lr=0.1)
    for _ in range(steps):
        for model, opt in ((plain, opt_plain), (sub, opt_sub)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    theta_plain = torch.cat([p.detach().flatten() for p in plain.parameters()])
    assert not torch.allclose(theta_plain, sub.theta0)  # training did move
    assert torch.allclose(sub.theta().detach(), theta_plain, atol=1e-5)


def test_subspace_sgd_with_small_d_does_not_reproduce_ordinary_sgd():
    # The comparison above can fail: a 5-dim subspace cannot follow the full gradient.
    x, y = torch.randn(16, 7), torch.randn(16, 8)
    plain, sub = tiny_net(), SubspaceModel(tiny_net(), d=5, projection="hadamard")
    for model, params in ((plain, list(plain.parameters())), (sub, [sub.z])):
        nn.functional.mse_loss(model(x), y).backward()
        torch.optim.SGD(params, lr=0.1).step()
    theta_plain = torch.cat([p.detach().flatten() for p in plain.parameters()])
    assert not torch.allclose(sub.theta().detach(), theta_plain, atol=1e-3)


def test_export_writes_theta_into_a_copy():
    net = tiny_net()
    before = [p.clone() for p in net.parameters()]
    sub = SubspaceModel(net, d=4)
    with torch.no_grad():
        sub.z.fill_(0.5)
    out = sub.export()
    assert torch.allclose(torch.cat([p.flatten() for p in out.parameters()]), sub.theta())
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # original intact


# --------------------------------------------------------------------------- ΔW

def test_delta_weights_and_truncation():
    base, tuned = tiny_net(0), tiny_net(0)
    with torch.no_grad():
        tuned[2].weight.add_(gaussian(8, 8, seed=3).float())
    deltas = delta_weights(base, tuned)
    assert set(deltas) == {"0", "2"}
    assert deltas["0"].abs().max() == 0
    cut = truncate_updates(base, tuned, r=2)
    dW = delta_weights(base, cut)["2"]
    assert numerical_rank(dW, tol=1e-4) == 2
    assert torch.allclose(dW, low_rank_approx(deltas["2"], 2), atol=1e-5)
    full = truncate_updates(base, tuned, r=8)
    assert torch.allclose(full[2].weight, tuned[2].weight)


# --------------------------------------------------------------------------- φ

@st.composite
def two_adapters(draw):
    k = draw(st.integers(2, 40))
    r1, r2 = draw(st.integers(1, k)), draw(st.integers(1, k))
    seed = draw(st.integers(0, 2**31 - 1))
    return gaussian(r1, k, seed=seed), gaussian(r2, k, seed=seed + 1)


@FAST
@given(two_adapters())
def test_phi_lies_in_0_1_and_grid_matches(pair):
    A1, A2 = pair
    grid = similarity_grid(A1, A2)
    assert grid.shape == (min(A1.shape), min(A2.shape))
    assert (grid >= -1e-12).all() and (grid <= 1 + 1e-12).all()
    i, j = grid.shape
    assert subspace_similarity(A1, A2, i, j) == pytest.approx(float(grid[-1, -1]))
    assert subspace_similarity(A1, A2, 1, j) == pytest.approx(float(grid[0, -1]))


def test_phi_is_one_for_the_same_subspace_and_zero_for_orthogonal_ones():
    A = gaussian(8, 64, seed=1)
    assert subspace_similarity(A, A, 8, 8) == pytest.approx(1.0)
    # M A has the same row space as A for invertible M: φ sees subspaces, not matrices.
    assert subspace_similarity(A, gaussian(8, 8, seed=2) @ A, 8, 8) == pytest.approx(1.0)
    Q = orthogonal(64, seed=3)
    assert subspace_similarity(Q[:8], Q[8:24], 8, 16) == pytest.approx(0.0, abs=1e-12)
    # a subspace inside a bigger one: φ normalises by min(i, j)
    assert subspace_similarity(Q[:4], Q[:32], 4, 32) == pytest.approx(1.0)


def test_phi_uses_the_top_singular_vectors():
    Q = orthogonal(32, seed=4)
    A1 = torch.diag(torch.tensor([5.0, 1.0], dtype=torch.float64)) @ Q[:2]  # top direction Q[0]
    A2 = torch.diag(torch.tensor([1.0, 5.0], dtype=torch.float64)) @ Q[:2]  # top direction Q[1]
    assert subspace_similarity(A1, A2, 1, 1) == pytest.approx(0.0, abs=1e-12)
    assert subspace_similarity(A1, A2, 2, 2) == pytest.approx(1.0)


@pytest.mark.parametrize("i,j,k", [(1, 1, 16), (8, 64, 128), (4, 4, 32), (16, 2, 50)])
def test_phi_of_random_subspaces_matches_its_expectation(i, j, k):
    values = [subspace_similarity(gaussian(i, k, seed=s), gaussian(j, k, seed=10_000 + s), i, j)
              for s in range(200)]
    mean, sd = torch.tensor(values).mean().item(), torch.tensor(values).std().item()
    assert random_similarity(i, j, k) == max(i, j) / k
    assert mean == pytest.approx(max(i, j) / k, abs=4 * sd / math.sqrt(200) + 1e-3)


# --------------------------------------------------------------------------- amplification

def test_amplification_by_hand():
    """W = diag(4, 3, 2, 1); ΔW = 6 e4 e4ᵀ + 3 e3 e3ᵀ.

    r = 1: ΔW's top direction is e4, Uᵀ W Vᵀ = W[3, 3] = 1, factor ‖ΔW‖_F/1 = √45.
    r = 2: directions e4, e3, Uᵀ W Vᵀ = diag(1, 2), norm √5, factor √45/√5 = 3.
    W's own top directions: r = 1 gives 4, r = 2 gives √(16 + 9) = 5.
    Rotating W and ΔW by the same orthogonal matrices changes none of it.
    """
    W = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    dW = torch.zeros(4, 4, dtype=torch.float64)
    dW[3, 3], dW[2, 2] = 6.0, 3.0
    Q1, Q2 = orthogonal(4, 1), orthogonal(4, 2)
    for w, dw in ((W, dW), (Q1 @ W @ Q2.T, Q1 @ dW @ Q2.T)):
        one, two = amplification(dw, w, 1), amplification(dw, w, 2)
        assert one.proj_delta == pytest.approx(1.0)
        assert one.factor == pytest.approx(math.sqrt(45))
        assert two.proj_delta == pytest.approx(math.sqrt(5))
        assert two.factor == pytest.approx(3.0)
        assert amplification_factor(dw, w, 2) == pytest.approx(3.0)
        assert (one.proj_weight, two.proj_weight) == (pytest.approx(4.0), pytest.approx(5.0))
        assert one.weight_norm == pytest.approx(math.sqrt(30))


def test_projection_norm_of_a_random_direction_is_small():
    W = gaussian(200, 200, seed=1) / math.sqrt(200)  # ‖W‖_F ≈ √200, ‖W‖_F² per entry 1/200
    report = amplification(gaussian(200, 200, seed=2), W, 4, seed=3)
    assert report.proj_random < report.proj_weight
    assert report.proj_random == pytest.approx(math.sqrt(16 / 200), rel=0.6)  # E = r·r/(200)


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("i,j,match", [(0, 1, "i must satisfy 1 <= i <= 4"),
                                        (5, 1, "i must satisfy 1 <= i <= 4"),
                                        (1, 7, "j must satisfy 1 <= j <= 6"),
                                        (1, -1, "j must satisfy")])
def test_phi_refuses_i_or_j_out_of_range(i, j, match):
    with pytest.raises(ValueError, match=match):
        subspace_similarity(gaussian(4, 10), gaussian(6, 10), i, j)


def test_phi_refuses_bad_types_and_shapes():
    with pytest.raises(ValueError, match="same number of columns k"):
        subspace_similarity(gaussian(4, 10), gaussian(4, 12), 1, 1)
    with pytest.raises(ValueError, match="same number of columns k"):
        similarity_grid(gaussian(4, 10), gaussian(4, 12))
    with pytest.raises(TypeError, match="i must be an int"):
        subspace_similarity(gaussian(4, 10), gaussian(4, 10), 1.0, 1)
    with pytest.raises(ValueError, match="2-D"):
        subspace_similarity(gaussian(10), gaussian(4, 10), 1, 1)
    with pytest.raises(ValueError, match="i must satisfy"):
        random_similarity(9, 1, 8)


@pytest.mark.parametrize("d", [0, -3])
def test_subspace_refuses_nonpositive_d_and_leaves_model_alone(d):
    net = tiny_net()
    with pytest.raises(ValueError, match="d must satisfy 1 <= d"):
        SubspaceModel(net, d=d)
    assert all(p.requires_grad for p in net.parameters())
    with pytest.raises(ValueError, match="d must satisfy 1 <= d <= 10"):
        SparseProjection(10, d)


def test_subspace_refuses_d_above_D_and_bad_kinds():
    with pytest.raises(ValueError, match="D=128"):
        SubspaceModel(tiny_net(), d=129)
    with pytest.raises(TypeError, match="d must be an int"):
        SubspaceModel(tiny_net(), d=2.5)
    with pytest.raises(ValueError, match="projection must be one of"):
        SubspaceModel(tiny_net(), d=3, projection="dense")
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        SparseProjection(10, 4)(torch.zeros(5))
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.zeros(12))


def test_amplification_and_truncation_refuse_bad_input():
    W = gaussian(6, 5)
    with pytest.raises(ValueError, match="same shape"):
        amplification(gaussian(5, 6), W, 1)
    with pytest.raises(ValueError, match="r must satisfy 1 <= r <= 5"):
        amplification(gaussian(6, 5), W, 6)
    with pytest.raises(ValueError, match="zero matrix"):
        amplification(torch.zeros(6, 5, dtype=torch.float64), W, 1)
    with pytest.raises(ValueError, match="U must be 6×r"):
        projection_norm(W, gaussian(5, 2), gaussian(2, 5))
    with pytest.raises(ValueError, match="r must satisfy 1 <= r"):
        truncate_updates(tiny_net(), tiny_net(), 0)
    with pytest.raises(ValueError, match="same nn.Linear layers"):
        delta_weights(tiny_net(), nn.Sequential(nn.Linear(7, 8)))


@pytest.mark.parametrize("d", [4, 64, 1024])
def test_adam_first_step_moves_theta_by_lr_sqrt_d(d):
    """Adam's first step moves each z_j by lr (m̂/√v̂ = ±1), so ‖Δθ‖ = lr·√d when P has
    orthonormal columns (D a power of two); SGD's step is the projected gradient step."""
    torch.manual_seed(0)
    # D = 63·32 + 32 = 2048; float64 so that θ − θ0 is not lost to rounding
    model = nn.Sequential(nn.Linear(63, 32), nn.Tanh()).double()
    x, target = torch.randn(8, 63, dtype=torch.float64), torch.randn(8, 32, dtype=torch.float64)
    lr = 1e-3
    norms = {}
    for name in ("adam", "sgd"):
        sub = SubspaceModel(model, d, projection="hadamard", seed=1)
        assert sub.D == 2048
        opt = (torch.optim.Adam if name == "adam" else torch.optim.SGD)([sub.z], lr=lr)
        (sub(x) - target).square().mean().backward()
        grad_z = sub.z.grad.clone()
        opt.step()
        norms[name] = (sub.theta() - sub.theta0).norm().item(), grad_z.norm().item()
    assert norms["adam"][0] == pytest.approx(lr * math.sqrt(d), rel=1e-3)
    assert norms["sgd"][0] == pytest.approx(lr * norms["sgd"][1], rel=1e-4)


# --------------------------------------------------------------------------- scale-free amplification

def test_lowrank_svd_matches_the_dense_svd_of_BA():
    from lora_edu.intrinsic import lowrank_svd

    B, A = gaussian(40, 5, seed=1), gaussian(5, 30, seed=2)
    U, S, Vh = lowrank_svd(B, A)
    assert U.shape == (40, 5) and S.shape == (5,) and Vh.shape == (5, 30)
    torch.testing.assert_close(S, torch.linalg.svdvals(B @ A)[:5])
    torch.testing.assert_close((U * S) @ Vh, B @ A)
    torch.testing.assert_close(U.T @ U, torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="inner dimension"):
        lowrank_svd(B, A.T)


def test_amplification_ratio_is_one_for_random_directions_and_scale_free():
    from lora_edu.intrinsic import amplification_ratio

    W = gaussian(60, 50, seed=3) + 5 * gaussian(60, 1, seed=4) @ gaussian(1, 50, seed=5)
    ratios = []
    for seed in range(200):
        U = torch.linalg.qr(gaussian(60, 4, seed=10 + seed))[0]
        V = torch.linalg.qr(gaussian(50, 4, seed=1000 + seed))[0].T
        ratios.append(amplification_ratio(W, U, V))
    rms = math.sqrt(sum(x * x for x in ratios) / len(ratios))
    assert 0.9 < rms < 1.1  # chance level is 1 by construction (root-mean-square)
    Ur, _, Vr = torch.linalg.svd(W)
    top = amplification_ratio(W, Ur[:, :4], Vr[:4])
    assert top > 3  # W's own top directions hold far more of W than chance
    assert amplification_ratio(7.0 * W, Ur[:, :4], Vr[:4]) == pytest.approx(top)
    with pytest.raises(ValueError, match="orthonormal"):
        amplification_ratio(W, gaussian(60, 4, seed=6), Vr[:4])
    with pytest.raises(ValueError, match="zero matrix"):
        amplification_ratio(torch.zeros(60, 50), Ur[:, :4], Vr[:4])


# ----------------------------------------------------------------- storage, SAID, chapter 4


def test_projections_store_what_their_docstrings_say():
    """Sparse: 2·d·s numbers (row indices and values); Hadamard: D + 2d (rows, columns, signs)."""
    sparse, hadamard = SparseProjection(5000, 40, seed=0), HadamardProjection(5000, 40, seed=0)
    assert sum(b.numel() for b in sparse.buffers()) == 2 * 40 * sparse.s
    assert sum(b.numel() for b in hadamard.buffers()) == 5000 + 2 * 40


def test_said_starts_at_theta0_counts_its_scales_and_scales_each_tensor():
    net = tiny_net()  # two parameter tensors with a bias: 7·8 + 8 + 8·8 = 128, m = 3
    x = torch.randn(5, 7)
    sub = SubspaceModel(net, d=10, projection="hadamard", seed=4, said=True)
    assert (sub.d, sub.z.numel(), sub.lam.numel()) == (10, 7, 3)
    assert torch.equal(sub(x), net(x))
    assert [n for n, p in sub.named_parameters() if p.requires_grad] == ["z", "lam"]
    with torch.no_grad():
        sub.z.copy_(torch.randn(7))
        sub.lam.copy_(torch.tensor([2.0, -1.0, 0.5]))
    step = projection_matrix(sub.projection) @ sub.z.detach()
    expected = sub.theta0 + torch.cat([lam * piece for lam, piece in
                                       zip([2.0, -1.0, 0.5], step.split([56, 8, 64]))])
    assert torch.allclose(sub.theta().detach(), expected, atol=1e-6)


def test_said_first_gradient_in_z_is_did_s_and_its_scales_then_learn():
    """λ = 1 at the start: SAID with d = k + m and DID with d = k share P and the z-gradient;
    ∂L/∂λ is zero at z = 0 and not after a step."""
    x, y = torch.randn(16, 7), torch.randn(16, 8)
    did = SubspaceModel(tiny_net(), d=9, projection="hadamard", seed=3)
    said = SubspaceModel(tiny_net(), d=12, projection="hadamard", seed=3, said=True)
    for sub in (did, said):
        nn.functional.mse_loss(sub(x), y).backward()
    assert torch.allclose(did.z.grad, said.z.grad)
    assert said.lam.grad.abs().max() == 0
    torch.optim.SGD([said.z, said.lam], lr=0.1).step()
    said.zero_grad()
    nn.functional.mse_loss(said(x), y).backward()
    assert said.lam.grad.abs().min() > 0


def test_said_refuses_too_small_d_and_bad_flags():
    with pytest.raises(ValueError, match="SAID trains 3 scales"):
        SubspaceModel(tiny_net(), d=3, said=True)
    with pytest.raises(TypeError, match="said must be True or False"):
        SubspaceModel(tiny_net(), d=5, said=1)


def test_d90_is_the_first_d_at_the_bar():
    from lora_edu.intrinsic import d90

    assert d90([8, 16, 32], [0.5, 0.7, 0.6], bar=0.6) == 16
    assert d90([8, 16, 32], [0.5, 0.55, 0.59], bar=0.6) is None
    with pytest.raises(ValueError, match="ascending"):
        d90([16, 8], [0.1, 0.2], bar=0.6)


def small_experiment(**kw):
    from lora_edu.intrinsic import TransferExperiment

    return TransferExperiment(n_a=64, n_b=32, width=8, steps=3, n_val=16, n_test=16, **kw)


def test_transfer_experiment_runs_every_method_and_counts_what_it_trains():
    from lora_edu.intrinsic import METHODS

    ex = small_experiment()
    assert ex.D == 16 * 8 + 8 + 8 * 8 + 8 + 8 * 4 + 4
    head = 8 * 4 + 4
    assert ex.trainable("full") == ex.D and ex.trainable("head") == head
    assert ex.trainable("lora", 2) == head + 2 * (16 + 8) + 2 * (8 + 8)
    assert ex.trainable("did", 40) == ex.trainable("said", 40) == 40
    for method in METHODS:
        out = ex.run(method, 2 if method == "lora" else 40, 1e-2, seed=0)
        assert set(out) == {"val", "test"} and all(0 <= v <= 1 for v in out.values())
    assert ex.run("did", 40, 1e-2, seed=1) == ex.run("did", 40, 1e-2, seed=1)  # repeatable
    assert ex.run("full", 0, 1e-2, seed=0, start="scratch")["val"] >= 0


def test_transfer_experiment_pairs_runs_by_seed():
    """Seed s gives every method on a start the same new head; the body is the pretrained one."""
    ex = small_experiment()
    a, b = ex.start("pretrained", 3), ex.start("pretrained", 3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = ex.start("pretrained", 4)
    assert torch.equal(a[0].weight, c[0].weight) and not torch.equal(a[-1].weight, c[-1].weight)
    assert torch.equal(a[0].weight, ex.pretrained()[0].weight)
    own = small_experiment(task_b_teacher=5)
    assert torch.equal(own.task_a.X, ex.task_a.X) and not torch.equal(own.task_b.y, ex.task_b.y)


def test_transfer_experiment_refuses_bad_input():
    ex = small_experiment()
    with pytest.raises(ValueError, match="method must be one of"):
        ex.run("adapter", 1, 1e-2, seed=0)
    with pytest.raises(ValueError, match="kind must be 'pretrained' or 'scratch'"):
        ex.start("random", 0)
    with pytest.raises(ValueError, match="projection must be"):
        small_experiment(projection="dense")
    with pytest.raises(ValueError, match="n_class must satisfy"):
        small_experiment(n_class=1)


def test_transfer_experiment_variant_shares_the_pretrained_network():
    ex = small_experiment()
    base = ex.pretrained()
    own, sparse = ex.variant(task_b_teacher=5), ex.variant(projection="sparse")
    assert own.pretrained() is base and sparse.pretrained() is base
    assert torch.equal(own.task_b.y, small_experiment(task_b_teacher=5).task_b.y)
    assert sparse.projection == "sparse" and ex.projection == "hadamard"
    assert torch.equal(sparse.task_b.X, ex.task_b.X)
    assert own.run("did", 40, 1e-2, 0) == small_experiment(task_b_teacher=5).run("did", 40,
                                                                                  1e-2, 0)
    with pytest.raises(ValueError, match="projection must be"):
        ex.variant(projection="dense")


def test_intrinsic_sweep_reports_the_runner_up_rate():
    """Chapter 4's committed sweep checks every verdict at the runner-up learning rate: each
    configuration carries the report seeds at its best and at its second-best rate (by mean
    validation accuracy, ties to the smaller rate), and the one-rate control at both common
    rates; all from a clean commit."""
    path = Path(__file__).resolve().parents[1] / "benchmarks/results/intrinsic_dimension-cpu.json"
    sweep = json.loads(path.read_text())
    assert not sweep["git_commit"].endswith("+dirty")
    seeds = sweep["settings"]["report_seeds"]
    for c in sweep["configs"]:
        means = {s["lr"]: float(np.mean(s["val"])) for s in c["selection"]}
        ranked = sorted(means, key=lambda lr: (-means[lr], lr))
        assert (c["best_lr"], c["runner_up_lr"]) == (ranked[0], ranked[1])
        for key, lr in (("report", c["best_lr"]), ("runner_up", c["runner_up_lr"])):
            assert c[key]["lr"] == lr and c[key]["seeds"] == seeds
            assert len(c[key]["test"]) == len(seeds)
    one = sweep["single_lr"]
    means = {float(lr): v for lr, v in one["mean_val"].items()}
    ranked = sorted(means, key=lambda lr: (-means[lr], lr))
    assert (one["lr"], one["runner_up_lr"]) == (ranked[0], ranked[1])
    for key, lr in (("report", one["lr"]), ("runner_up", one["runner_up_lr"])):
        assert set(one[key]) == {str(d) for d in sweep["settings"]["dims"]}
        assert all(r["lr"] == lr and r["seeds"] == seeds for r in one[key].values())
