"""lora_edu.variants: rsLoRA, PiSSA, DoRA, LoRA+ — formulas, PEFT cross-checks, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lora_edu.lora import LoRALinear
from lora_edu.repro import seed_all
from lora_edu.variants import (DoRALinear, loraplus_param_groups, make_loraplus_optimizer,
                               pissa_factors, pissa_init_, rslora_scaling)

peft = pytest.importorskip("peft")

X = torch.randn(5, 3, 12, generator=torch.Generator().manual_seed(3))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(12, 10)
        self.v = nn.Linear(10, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v(torch.tanh(self.q(x)))


def tiny() -> Tiny:
    seed_all(0)
    return Tiny()


# --------------------------------------------------------------------------- rsLoRA

@pytest.mark.parametrize("alpha, r", [(16, 4), (8, 64), (1, 256)])
def test_rslora_scaling_is_alpha_over_sqrt_r(alpha: float, r: int) -> None:
    assert rslora_scaling(alpha, r) == pytest.approx(alpha / math.sqrt(r))
    assert LoRALinear(nn.Linear(300, 300), r=r, lora_alpha=alpha, use_rslora=True).scaling \
        == pytest.approx(alpha / math.sqrt(r))


# --------------------------------------------------------------------------- PiSSA

def test_pissa_keeps_output_and_puts_top_svd_in_BA() -> None:
    seed_all(0)
    layer = LoRALinear(nn.Linear(12, 10), r=3, lora_alpha=6)
    w0 = layer.base.weight.detach().clone()
    before = layer(X)
    pissa_init_(layer)
    torch.testing.assert_close(layer(X), before, atol=1e-5, rtol=1e-5)
    U, S, Vh = torch.linalg.svd(w0)
    best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    torch.testing.assert_close(layer.delta_weight(), best, atol=1e-5, rtol=1e-5)
    # The residual holds exactly the minor singular values.
    torch.testing.assert_close(torch.linalg.svdvals(layer.base.weight)[:7], S[3:],
                               atol=1e-5, rtol=1e-5)


def test_pissa_matches_peft() -> None:
    r, alpha = 4, 8
    ours = tiny()
    layer = LoRALinear(ours.q, r=r, lora_alpha=alpha)
    pissa_init_(layer)
    theirs = peft.get_peft_model(tiny(), peft.LoraConfig(r=r, lora_alpha=alpha,
                                                         target_modules=["q"],
                                                         init_lora_weights="pissa"))
    q = theirs.base_model.model.q
    # Singular vectors are defined up to sign, so compare sign-free quantities: s·B A and W_res.
    torch.testing.assert_close(layer.delta_weight(), q.get_delta_weight("default"),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.base.weight, q.base_layer.weight, atol=1e-5, rtol=1e-5)


def test_pissa_r_too_large_refused_and_nothing_changes() -> None:
    layer = LoRALinear(nn.Linear(12, 10), r=11, lora_alpha=8)
    w, a, b = (t.detach().clone() for t in (layer.base.weight, layer.lora_A, layer.lora_B))
    with pytest.raises(ValueError, match=r"r <= min\(d, k\) = 10.*got r=11"):
        pissa_init_(layer)
    assert torch.equal(layer.base.weight, w) and torch.equal(layer.lora_A, a)
    assert torch.equal(layer.lora_B, b)


def test_pissa_full_rank_leaves_zero_residual() -> None:
    A, B, res = pissa_factors(torch.randn(6, 4), r=4, scaling=2.0)
    assert res.abs().max() < 1e-5 and A.shape == (4, 4) and B.shape == (6, 4)


def test_pissa_refuses_merged_layer_and_non_lora() -> None:
    layer = LoRALinear(nn.Linear(12, 10), r=2)
    layer.merge()
    with pytest.raises(ValueError, match="unmerge"):
        pissa_init_(layer)
    with pytest.raises(TypeError, match="LoRALinear"):
        pissa_init_(nn.Linear(3, 3))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- DoRA

def dora_pair(r: int = 4, alpha: float = 8) -> tuple[DoRALinear, nn.Module]:
    """Our DoRA layer and PEFT's, with the same non-zero A, B and magnitude."""
    ours = DoRALinear(tiny().q, r=r, lora_alpha=alpha)
    model = peft.get_peft_model(tiny(), peft.LoraConfig(r=r, lora_alpha=alpha,
                                                        target_modules=["q"], use_dora=True))
    gen = torch.Generator().manual_seed(1)
    q = model.base_model.model.q
    with torch.no_grad():
        ours.lora_A.normal_(generator=gen)
        ours.lora_B.normal_(std=0.3, generator=gen)
        ours.magnitude.uniform_(0.5, 2.0, generator=gen)
        q.lora_A["default"].weight.copy_(ours.lora_A)
        q.lora_B["default"].weight.copy_(ours.lora_B)
        q.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)
    return ours, q


def test_dora_init_is_lora_output() -> None:
    layer = DoRALinear(nn.Linear(12, 10), r=4, lora_alpha=8)
    torch.testing.assert_close(layer.magnitude, layer.base.weight.norm(dim=1))
    torch.testing.assert_close(layer(X), layer.base(X))


def test_dora_forward_matches_formula_and_peft() -> None:
    ours, theirs = dora_pair()
    w = ours.base.weight + ours.scaling * ours.lora_B @ ours.lora_A
    expected = X @ ((ours.magnitude / w.norm(dim=1))[:, None] * w).T + ours.base.bias
    torch.testing.assert_close(ours(X), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(X), theirs(X), atol=1e-5, rtol=1e-5)


def test_dora_gradients_match_peft() -> None:
    ours, theirs = dora_pair()
    (ours(X) ** 2).sum().backward()
    (theirs(X) ** 2).sum().backward()
    torch.testing.assert_close(ours.magnitude.grad,
                               theirs.lora_magnitude_vector["default"].weight.grad,
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.lora_B.grad, theirs.lora_B["default"].weight.grad,
                               atol=1e-4, rtol=1e-4)


def test_dora_merge_unmerge_roundtrip_and_matches_peft_merge() -> None:
    ours, theirs = dora_pair()
    w0, out = ours.base.weight.detach().clone(), ours(X)
    ours.merge()
    torch.testing.assert_close(ours(X), out, atol=1e-5, rtol=1e-5)
    theirs.merge()
    torch.testing.assert_close(ours.base.weight, theirs.base_layer.weight, atol=1e-5, rtol=1e-5)
    ours.unmerge()
    torch.testing.assert_close(ours.base.weight, w0, atol=1e-5, rtol=1e-5)


def test_dora_with_pissa_keeps_output() -> None:
    seed_all(0)
    layer = DoRALinear(nn.Linear(12, 10), r=3, lora_alpha=3)
    out = layer(X)
    pissa_init_(layer)
    torch.testing.assert_close(layer(X), out, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- LoRA+

def lora_model() -> nn.Module:
    model = tiny().requires_grad_(False)
    model.q = LoRALinear(model.q, r=2)
    model.v = DoRALinear(model.v, r=2)
    return model


def test_loraplus_groups_give_B_and_1d_params_ratio_times_lr() -> None:
    model = lora_model()
    groups = {g["name"]: g for g in loraplus_param_groups(model, lr=1e-3, ratio=16)}
    assert set(groups) == {"groupA", "groupB"}
    assert groups["groupB"]["lr"] == pytest.approx(16e-3) and groups["groupA"]["lr"] == 1e-3
    # DoRA's magnitude is 1-D, so it moves with B, as in PEFT.
    assert {id(p) for p in groups["groupB"]["params"]} == \
        {id(model.q.lora_B), id(model.v.lora_B), id(model.v.magnitude)}
    assert {id(p) for p in groups["groupA"]["params"]} == {id(model.q.lora_A), id(model.v.lora_A)}


class WithNorm(nn.Module):
    """Two adapted layers with biases, a LayerNorm and a linear layer that LoRA leaves alone."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(12, 10)
        self.ln = nn.LayerNorm(10)
        self.v = nn.Linear(10, 12)
        self.o = nn.Linear(12, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.v(self.ln(self.q(x))))


def with_norm(ours: bool, dora: bool) -> nn.Module:
    """The same model under lora_edu or PEFT, every bias trainable (``bias="all"``), plus the
    LayerNorm's weight and the un-adapted ``o.weight`` (as ``modules_to_save`` would)."""
    from lora_edu.lora import LoraConfig, inject_lora

    seed_all(0)
    kwargs = {"r": 2, "lora_alpha": 4, "target_modules": ["q", "v"], "bias": "all",
              "use_dora": dora}
    model = (inject_lora(WithNorm(), LoraConfig(**kwargs)) if ours
             else peft.get_peft_model(WithNorm(), peft.LoraConfig(**kwargs)))
    for name, p in model.named_parameters():
        if name.endswith(("ln.weight", "o.weight")):
            p.requires_grad_(True)
    return model


def peft_name(name: str) -> str:
    """PEFT's parameter name → lora_edu's.

    ``base_model.model.q.lora_A.default.weight`` → ``q.lora_A``,
    ``...q.lora_magnitude_vector.default.weight`` → ``q.magnitude``."""
    name = name.removeprefix("base_model.model.").replace(".default", "")
    name = name.replace("base_layer.", "base.").replace("lora_magnitude_vector.weight",
                                                        "magnitude")
    return name.replace("lora_A.weight", "lora_A").replace("lora_B.weight", "lora_B")


def group_signature(optimizer: torch.optim.Optimizer, model: nn.Module,
                    rename=lambda n: n) -> set[tuple[float, float, frozenset[str]]]:
    """Each non-empty group as (lr, weight decay, the names of its parameters)."""
    names = {id(p): rename(n) for n, p in model.named_parameters()}
    return {(round(g["lr"], 12), g["weight_decay"], frozenset(names[id(p)] for p in g["params"]))
            for g in optimizer.param_groups if g["params"]}


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_loraplus_groups_match_peft_with_biases_norms_and_dora(dora: bool) -> None:
    from peft.optimizers import create_loraplus_optimizer

    peft_model = with_norm(ours=False, dora=dora)
    theirs = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=1e-3,
                                       loraplus_lr_ratio=8, loraplus_weight_decay=0.1)
    model = with_norm(ours=True, dora=dora)
    ours = make_loraplus_optimizer(model, lr=1e-3, ratio=8, weight_decay=0.1)
    expected = group_signature(theirs, peft_model, peft_name)
    assert group_signature(ours, model) == expected
    # The same trainable parameters, each in exactly one group.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set().union(*(names for *_, names in expected)) == trainable
    # What the groups are, spelled out: B and 1-D parameters at 8 × lr, biases and the
    # LayerNorm without weight decay, DoRA's magnitude with it.
    by_name = {n: (lr, wd) for lr, wd, names in expected for n in names}
    assert by_name["q.lora_B"] == by_name["v.lora_B"] == (8e-3, 0.1)
    assert by_name["q.lora_A"] == by_name["o.weight"] == (1e-3, 0.1)
    assert by_name["q.base.bias"] == by_name["ln.weight"] == by_name["ln.bias"] == (8e-3, 0.0)
    assert by_name["o.bias"] == (8e-3, 0.0)
    if dora:
        assert by_name["q.magnitude"] == by_name["v.magnitude"] == (8e-3, 0.1)


def test_loraplus_plain_lora_matches_peft_learning_rates() -> None:
    from peft.optimizers import create_loraplus_optimizer

    model = peft.get_peft_model(tiny(), peft.LoraConfig(r=2, target_modules=["q", "v"]))
    theirs = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8)
    lr_of = {id(p): g["lr"] for g in theirs.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert lr_of[id(p)] == pytest.approx(8e-3 if "lora_B" in name else 1e-3), name
    from lora_edu.lora import LoraConfig, inject_lora

    ours = inject_lora(tiny(), LoraConfig(r=2, target_modules=["q", "v"]))
    assert group_signature(make_loraplus_optimizer(ours, lr=1e-3, ratio=8), ours) == \
        group_signature(theirs, model, peft_name)


@pytest.mark.parametrize("kwargs, words", [({"lr": 0}, "lr must be"),
                                           ({"lr": 1e-3, "ratio": -1}, "ratio must be"),
                                           ({"lr": float("nan")}, "lr must be"),
                                           ({"lr": 1e-3, "weight_decay": -0.1},
                                            "weight_decay must be")])
def test_loraplus_bad_input(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        loraplus_param_groups(lora_model(), **kwargs)


def test_loraplus_without_lora_layers_is_refused() -> None:
    with pytest.raises(ValueError, match="inject_lora"):
        loraplus_param_groups(tiny(), lr=1e-3)


# --------------------------------------------------------------------------- LoraConfig wiring

def test_config_use_dora_builds_dora_layers_with_trainable_magnitude() -> None:
    from lora_edu.lora import LoraConfig, inject_lora

    model = inject_lora(tiny(), LoraConfig(r=2, target_modules=["q", "v"], use_dora=True))
    assert isinstance(model.q, DoRALinear) and isinstance(model.v, DoRALinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{p}" for m in ("q", "v")
                         for p in ("lora_A", "lora_B", "magnitude")}
    torch.testing.assert_close(model(X), tiny()(X))


def test_config_pissa_keeps_output_and_refuses_large_r_before_any_change() -> None:
    from lora_edu.lora import LoraConfig, inject_lora

    model = inject_lora(tiny(), LoraConfig(r=4, target_modules=["q", "v"],
                                           init_lora_weights="pissa"))
    torch.testing.assert_close(model(X), tiny()(X), atol=1e-5, rtol=1e-5)
    untouched = tiny()
    state = copy.deepcopy(untouched.state_dict())
    with pytest.raises(ValueError, match=r"r <= min\(d, k\) = 10 for target module 'q'"):
        inject_lora(untouched, LoraConfig(r=11, target_modules=["v", "q"],
                                          init_lora_weights="pissa"))
    assert isinstance(untouched.q, nn.Linear) and isinstance(untouched.v, nn.Linear)
    assert all(torch.equal(v, state[k]) for k, v in untouched.state_dict().items())


def test_config_rejects_bad_variant_values() -> None:
    from lora_edu.lora import LoraConfig

    with pytest.raises(TypeError, match="use_dora must be True or False"):
        LoraConfig(use_dora="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="init_lora_weights must be one of"):
        LoraConfig(init_lora_weights="svd")


def test_dora_detach_norm_only_changes_gradients() -> None:
    """n as a constant (PEFT, the paper's §4.3) or with its gradient: same output, other grads."""
    seed_all(0)
    layer = DoRALinear(nn.Linear(12, 10), r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
    grads = {}
    for detach in (True, False):
        layer.detach_norm = detach
        layer.zero_grad()
        out = layer(X)
        (out ** 2).sum().backward()
        grads[detach] = (out.detach(), layer.lora_B.grad.clone())
    torch.testing.assert_close(grads[True][0], grads[False][0])
    assert (grads[True][1] - grads[False][1]).abs().max() > 1e-4
    # With the norm's gradient, B's gradient is the exact one of diag(m/n)(W0 + sBA) x.
    w = lambda B: layer.base.weight + layer.scaling * B @ layer.lora_A
    exact = torch.func.grad(lambda B: ((X @ ((layer.magnitude / w(B).norm(dim=1))[:, None]
                                             * w(B)).T + layer.base.bias) ** 2).sum())(
        layer.lora_B.detach())
    torch.testing.assert_close(grads[False][1], exact, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------- chapter 14's sweep helpers

def _bench(name: str):
    """A module of benchmarks/ (the chapters import them too)."""
    from conftest import import_benchmark

    return import_benchmark(name)


def test_choose_lr_extends_a_best_at_the_edge_until_it_is_inside() -> None:
    vs = _bench("variants_sweep")
    calls = []

    def val_error(lr: float, seed: int) -> float:   # smallest at 6e-3, one error per seed
        calls.append((lr, seed))
        return math.log(lr / 6e-3) ** 2 + 0.01 * seed

    choice = vs.choose_lr(val_error, [1e-3, 2e-3, 4e-3], seeds=(0, 1))
    assert choice["lr"] == pytest.approx(8e-3) and not choice["at_edge"]
    assert choice["grid"] == pytest.approx([1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2])
    assert len(calls) == 2 * len(choice["grid"])          # every rate, every selection seed


def test_choose_lr_reports_a_best_still_at_the_edge() -> None:
    vs = _bench("variants_sweep")
    choice = vs.choose_lr(lambda lr, seed: -lr, [1e-3, 2e-3], seeds=(0,), max_extend=2)
    assert choice["at_edge"] and choice["lr"] == pytest.approx(8e-3)


def test_first_adam_step_moves_every_entry_of_b_by_the_learning_rate() -> None:
    """The mechanism chapter 14 builds on: m̂/√v̂ is the gradient's sign at step 1."""
    vs = _bench("variants_sweep")
    task = vs.make_task("cpu")
    for rs in (False, True):
        model = vs.student(task, 4, vs.ALPHA, 0, use_rslora=rs)
        A0 = [layer.lora_A.detach().clone() for layer in (model.l1, model.l2)]
        opt = torch.optim.Adam(loraplus_param_groups(model, 1e-3, 1.0))
        x = torch.randn(8, task.D)
        torch.nn.functional.mse_loss(model(x), task.teacher(x)).backward()
        grads = [layer.lora_B.grad.abs().clone() for layer in (model.l1, model.l2)]
        opt.step()
        for layer, a0, g in zip((model.l1, model.l2), A0, grads):
            moved = layer.lora_B.detach().abs()
            # lr · |g| / (|g| + ε): the learning rate itself unless |g| is as small as ε
            assert torch.allclose(moved, 1e-3 * g / (g + 1e-8), rtol=1e-4, atol=1e-12)
            assert (moved > 0.99e-3).float().mean() > 0.9
            assert torch.equal(layer.lora_A.detach(), a0)   # A's gradient is 0 while B = 0


def test_dora_cost_ratio_summary_is_the_median_of_per_round_ratios() -> None:
    dc = _bench("dora_cost")
    summary = dc.ratio_summary([2.0, 3.0, 10.0], [1.0, 2.0, 4.0])   # ratios 2, 1.5, 2.5
    assert summary["median_ratio"] == 2.0 and summary["min"] == 1.5 and summary["max"] == 2.5
    assert summary["rounds"] == 3


def test_dora_cost_extra_memory_grows_with_the_batch() -> None:
    """DoRA keeps per-input tensors for the magnitude's gradient: its extra peak grows."""
    dc = _bench("dora_cost")
    table = dc.memory_by_batch(torch.device("cpu"), [4, 256])
    for impl in ("lora_edu", "PEFT"):
        small, large = (table[b]["dora_minus_lora_bytes"][impl] for b in ("4", "256"))
        assert small is not None and large is not None
        assert large - small >= 2 * (256 - 4) * 256 * 4 * 0.9   # ≥ one (batch, D) per layer
