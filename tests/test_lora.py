"""Tests of lora_edu.lora: the layer's mathematics, the model-level helpers, and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lora_edu.lora import (LoraConfig, LoRALinear, count_parameters, disable_adapters, find_targets,
                           inject_lora, lora_layers, mark_only_lora_as_trainable,
                           merge_and_unload, merge_lora, show_lora_summary, unmerge_lora)
from lora_edu.repro import seed_all


class Attention(nn.Module):
    """A toy block whose Linear layers are named like the paper's W_q, W_k, W_v, W_o."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.norm(self.q(x) * self.k(x) + self.v(x)))


def tiny_model(dim: int = 16) -> nn.Module:
    seed_all(0)
    return nn.Sequential(Attention(dim), Attention(dim))


def set_random_lora(model: nn.Module) -> None:
    """Non-zero B so that ΔW ≠ 0 (a trained adapter, as far as the tests care)."""
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.1)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- the layer

def test_zero_B_gives_the_base_output_exactly() -> None:
    base = nn.Linear(12, 7)
    layer = LoRALinear(base, r=4, lora_alpha=8)
    x = torch.randn(5, 12)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.count_nonzero(layer.lora_A) > 0
    assert torch.equal(layer(x), base(x))


def test_shapes_follow_the_paper() -> None:
    layer = LoRALinear(nn.Linear(12, 7), r=3)        # W0 is d×k = 7×12
    assert layer.lora_A.shape == (3, 12)             # A: r×k
    assert layer.lora_B.shape == (7, 3)              # B: d×r
    assert layer.delta_weight().shape == layer.base.weight.shape


def test_kaiming_init_matches_nn_linear_bound() -> None:
    seed_all(1)
    k = 400
    layer = LoRALinear(nn.Linear(k, 8), r=64)
    bound = 1 / math.sqrt(k)  # kaiming_uniform(a=√5) is U(-1/√k, 1/√k)
    a = layer.lora_A
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.98 * bound
    assert a.var().item() == pytest.approx(bound**2 / 3, rel=0.05)


def test_gaussian_init_has_std_one_over_r() -> None:
    seed_all(2)
    layer = LoRALinear(nn.Linear(500, 8), r=50, init_lora_weights="gaussian")
    assert layer.lora_A.mean().item() == pytest.approx(0.0, abs=3e-3)
    assert layer.lora_A.std().item() == pytest.approx(1 / 50, rel=0.03)
    assert torch.count_nonzero(layer.lora_B) == 0


def test_init_false_makes_both_random() -> None:
    layer = LoRALinear(nn.Linear(8, 8), r=2, init_lora_weights=False)
    assert torch.count_nonzero(layer.lora_B) > 0
    x = torch.randn(3, 8)
    assert not torch.allclose(layer(x), layer.base(x))


@pytest.mark.parametrize("use_rslora, expected", [(False, 16 / 4), (True, 16 / 2)])
def test_scaling_alpha_over_r_and_rslora(use_rslora: bool, expected: float) -> None:
    layer = LoRALinear(nn.Linear(6, 6), r=4, lora_alpha=16, use_rslora=use_rslora)
    assert layer.scaling == expected
    assert LoraConfig(r=4, lora_alpha=16, use_rslora=use_rslora).scaling == expected


def test_forward_matches_hand_formula_with_fixed_weights() -> None:
    base = nn.Linear(3, 2)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
        base.bias.copy_(torch.tensor([0.5, -0.5]))
    layer = LoRALinear(base, r=1, lora_alpha=3)       # s = 3
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 0.0, -1.0]]))
        layer.lora_B.copy_(torch.tensor([[2.0], [1.0]]))
    x = torch.tensor([1.0, 1.0, 2.0])
    # W0 x + b = [9.5, 20.5]; A x = -1; s·B A x = 3·[-2, -1] = [-6, -3]
    assert torch.equal(layer(x), torch.tensor([3.5, 17.5]))


def test_gradcheck_float64() -> None:
    layer = LoRALinear(nn.Linear(5, 4).double(), r=2, lora_alpha=4, init_lora_weights=False)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp, a, b: torch.func.functional_call(
        layer, {"lora_A": a, "lora_B": b}, (inp,)), (x, layer.lora_A, layer.lora_B))


def test_merge_unmerge_roundtrip_fp32() -> None:
    layer = LoRALinear(nn.Linear(32, 24), r=4, lora_alpha=8, init_lora_weights=False)
    w0 = layer.base.weight.detach().clone()
    x = torch.randn(6, 32)
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.base.weight, w0 + layer.delta_weight(), rtol=1e-6, atol=0)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-6)
    layer.merge()  # a second merge must not add ΔW again
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base.weight, w0, rtol=1e-6, atol=1e-7)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-6)


# merge rounds W0 + ΔW to the half dtype (error ≤ u·|W0 + ΔW|, u the unit roundoff: 2^-8 for
# bf16, 2^-11 for fp16) and unmerge rounds again (≤ u·|W0|), so after a round trip
# |W − W0| ≤ u·(|W0 + ΔW| + |W0|) entry by entry. Measured with this seed: at most 0.89 (bf16)
# and 0.92 (fp16) of that bound; i.e. up to 1 ulp of drift, which is why disable_adapters on a
# merged model matches the base only to half-precision rounding.
@pytest.mark.parametrize("dtype, u", [(torch.bfloat16, 2**-8), (torch.float16, 2**-11)])
def test_merge_roundtrip_half_precision(dtype: torch.dtype, u: float) -> None:
    seed_all(3)
    layer = LoRALinear(nn.Linear(64, 48).to(dtype), r=4, lora_alpha=8, init_lora_weights=False)
    assert layer.lora_A.dtype == torch.float32           # the adapter stays in fp32
    w0 = layer.base.weight.detach().float().clone()
    delta = layer.delta_weight()
    assert delta.dtype == torch.float32
    x = torch.randn(8, 64, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    layer.merge()
    merged_err = (layer.base.weight.float() - (w0 + delta)).abs()
    assert (merged_err <= u * (w0 + delta).abs() + 2**-24).all()
    layer.unmerge()
    drift = (layer.base.weight.float() - w0).abs()
    assert (drift <= u * ((w0 + delta).abs() + w0.abs()) + 2**-24).all()
    assert drift.max() > 0  # the bound is not vacuous: rounding does happen
    layer.merge()
    # merged vs unmerged output: two half-precision evaluations of the same h
    torch.testing.assert_close(layer(x).float(), y.float(), rtol=0.05, atol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_forward_and_merge(dtype: torch.dtype) -> None:
    layer = LoRALinear(nn.Linear(64, 32).to("cuda", dtype), r=4, init_lora_weights=False)
    assert layer.lora_A.device.type == "cuda"
    x = torch.randn(8, 64, device="cuda", dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and y.device.type == "cuda"
    layer.merge()
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(layer(x).float(), y.float(), rtol=tol, atol=tol)


def test_safe_merge_refuses_non_finite_and_leaves_weight() -> None:
    layer = LoRALinear(nn.Linear(4, 4), r=2, init_lora_weights=False)
    with torch.no_grad():
        layer.lora_B[0, 0] = float("inf")
    w0 = layer.base.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base.weight, w0) and not layer.merged


def test_dropout_stochastic_in_train_identity_in_eval() -> None:
    layer = LoRALinear(nn.Linear(16, 16), r=4, lora_dropout=0.5, init_lora_weights=False)
    x = torch.randn(8, 16)
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    expected = layer.base(x) + (x @ layer.lora_A.T) @ layer.lora_B.T * layer.scaling
    torch.testing.assert_close(layer(x), expected)


def test_dropout_only_on_lora_branch() -> None:
    layer = LoRALinear(nn.Linear(16, 16), r=4, lora_dropout=0.9).train()  # B = 0
    x = torch.randn(8, 16)
    assert torch.equal(layer(x), layer.base(x))


def test_fan_in_fan_out_with_conv1d() -> None:
    class Conv1D(nn.Module):  # transformers' GPT-2 layer: y = x W + b with W of shape (k, d)
        def __init__(self, nf: int, nx: int) -> None:
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.randn(nx, nf))
            self.bias = nn.Parameter(torch.randn(nf))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight + self.bias

    conv = Conv1D(nf=6, nx=10)
    with pytest.raises(TypeError, match="fan_in_fan_out=True"):
        LoRALinear(conv, r=2)
    layer = LoRALinear(conv, r=2, fan_in_fan_out=True, init_lora_weights=False)
    assert layer.lora_A.shape == (2, 10) and layer.lora_B.shape == (6, 2)
    assert layer.delta_weight().shape == (10, 6)
    x = torch.randn(4, 10)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y)
    with pytest.raises(ValueError, match="fan_in_fan_out=False"):
        LoRALinear(nn.Linear(3, 3), r=1, fan_in_fan_out=True)


# --------------------------------------------------------------------------- model level

def test_inject_targets_q_v_and_freezes() -> None:
    model = tiny_model()
    x = torch.randn(4, 16)
    y0 = model(x)
    inject_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"]))
    assert [n for n, _ in lora_layers(model)] == ["0.q", "0.v", "1.q", "1.v"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.{m}.lora_{ab}" for i in "01" for m in "qv" for ab in "AB"}
    assert torch.equal(model(x), y0)
    t, total = count_parameters(model)
    assert t == 4 * 2 * (16 + 16)
    assert total == sum(p.numel() for p in model.parameters())


def test_regex_targets_whole_name() -> None:
    model = inject_lora(tiny_model(), LoraConfig(target_modules=r"1\.(q|k)"))
    assert [n for n, _ in lora_layers(model)] == ["1.q", "1.k"]


@pytest.mark.parametrize("bias, expected", [
    ("none", set()),
    ("lora_only", {"0.q.base.bias", "1.q.base.bias"}),
    ("all", {"0.q.base.bias", "1.q.base.bias", "0.k.bias", "1.k.bias", "0.v.bias", "1.v.bias",
             "0.o.bias", "1.o.bias", "0.norm.bias", "1.norm.bias"}),
])
def test_bias_options(bias: str, expected: set[str]) -> None:
    model = inject_lora(tiny_model(), LoraConfig(r=2, target_modules=["q"], bias=bias))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == expected


def test_optimizer_step_changes_only_lora() -> None:
    model = inject_lora(tiny_model(), LoraConfig(r=2, lora_alpha=4))
    set_random_lora(model)
    before = state(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randn(8, 16)).square().mean().backward()
    opt.step()
    after = state(model)
    for name in before:
        if "lora_" in name:
            assert not torch.equal(before[name], after[name]), name
        else:
            assert torch.equal(before[name], after[name]), name
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_gradients_reach_only_A_and_B_even_without_optimizer() -> None:
    model = inject_lora(tiny_model(), LoraConfig(r=2))
    model(torch.randn(2, 16)).sum().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == {n for n, _ in model.named_parameters() if "lora_" in n}


def test_merge_lora_model_and_disable_adapters() -> None:
    model = tiny_model()
    x = torch.randn(4, 16)
    y_base = model(x)
    inject_lora(model, LoraConfig(r=2, lora_alpha=4))
    set_random_lora(model)
    y = model(x)
    assert not torch.allclose(y, y_base)
    with disable_adapters(model):
        assert torch.equal(model(x), y_base)
    merge_lora(model)
    merge_lora(model)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    with disable_adapters(model):
        torch.testing.assert_close(model(x), y_base, rtol=1e-5, atol=1e-6)
    assert all(layer.merged for _, layer in lora_layers(model))
    unmerge_lora(model)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_gives_a_plain_model() -> None:
    model = inject_lora(tiny_model(), LoraConfig(r=2, lora_alpha=4))
    set_random_lora(model)
    x = torch.randn(4, 16)
    y = model(x)
    merge_and_unload(model)
    assert not list(lora_layers(model))
    assert type(model[0].q) is nn.Linear and "lora_config" not in vars(model)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_safe_merge_is_all_or_nothing() -> None:
    model = inject_lora(tiny_model(), LoraConfig(r=2))
    set_random_lora(model)
    with torch.no_grad():
        model[1].v.lora_B[0, 0] = float("nan")
    before = state(model)
    with pytest.raises(ValueError, match="non-finite"):
        merge_and_unload(model, safe_merge=True)
    assert all(not layer.merged for _, layer in lora_layers(model))
    after = state(model)
    for name in before:  # unmerge restores W0 up to rounding only
        torch.testing.assert_close(after[name], before[name], rtol=1e-6, atol=1e-6, equal_nan=True)


def test_disable_adapters_restores_on_exception() -> None:
    model = inject_lora(tiny_model(), LoraConfig(r=2))
    with pytest.raises(RuntimeError), disable_adapters(model):
        raise RuntimeError("boom")
    assert not any(layer.disabled for _, layer in lora_layers(model))


def test_mark_only_lora_as_trainable_after_unfreezing() -> None:
    model = inject_lora(tiny_model(), LoraConfig(r=2))
    for p in model.parameters():
        p.requires_grad_(True)
    mark_only_lora_as_trainable(model)
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


def test_summary_table_runs(capsys: pytest.CaptureFixture[str]) -> None:
    show_lora_summary(inject_lora(tiny_model(), LoraConfig(r=2)))
    out = capsys.readouterr().out
    assert "0.q" in out and "1.v" in out


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, exc, words", [
    ({"r": 0}, ValueError, "r "), ({"r": -2}, ValueError, "positive"),
    ({"r": 2.0}, TypeError, "int"), ({"lora_dropout": 1.0}, ValueError, r"\[0, 1\)"),
    ({"lora_dropout": -0.1}, ValueError, "lora_dropout"), ({"bias": "some"}, ValueError, "bias"),
    ({"lora_alpha": 0}, ValueError, "lora_alpha"), ({"target_modules": []}, TypeError, "target"),
    ({"target_modules": "("}, ValueError, "regular expression"),
    ({"init_lora_weights": "uniform"}, ValueError, "init_lora_weights"),
    ({"use_rslora": "yes"}, TypeError, "use_rslora"),
])
def test_config_validation(kwargs: dict, exc: type, words: str) -> None:
    with pytest.raises(exc, match=words):
        LoraConfig(**kwargs)


def test_config_edited_after_creation_is_checked_by_inject() -> None:
    config = LoraConfig(r=2)
    config.bias = "most"
    model = tiny_model()
    with pytest.raises(ValueError, match="bias"):
        inject_lora(model, config)
    assert not list(lora_layers(model))


def test_layer_validation() -> None:
    with pytest.raises(ValueError, match="r "):
        LoRALinear(nn.Linear(3, 3), r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoRALinear(nn.Linear(3, 3), lora_dropout=-0.5)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv2d(3, 3, 1))


def test_no_match_lists_linear_layers_and_leaves_model() -> None:
    model = tiny_model()
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"matches no module.*0\.q.*1\.o"):
        inject_lora(model, LoraConfig(target_modules=["query"]))
    assert str(model) == str(before)
    assert all(p.requires_grad for p in model.parameters())


def test_non_linear_target_is_refused_before_any_change() -> None:
    model = tiny_model()
    with pytest.raises(TypeError, match="'0.norm'.*LayerNorm"):
        inject_lora(model, LoraConfig(target_modules=["q", "norm"]))
    assert not list(lora_layers(model))
    assert all(p.requires_grad for p in model.parameters())


def test_inject_twice_is_refused() -> None:
    model = inject_lora(tiny_model(), LoraConfig(r=2))
    with pytest.raises(ValueError, match="called twice"):
        inject_lora(model, LoraConfig(r=2))
    with pytest.raises(TypeError, match="LoraConfig"):
        inject_lora(tiny_model(), {"r": 2})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- properties

@settings(max_examples=25, deadline=None)
@given(d=st.integers(1, 24), k=st.integers(1, 24), r=st.integers(1, 8),
       alpha=st.floats(0.5, 32), rs=st.booleans(), batch=st.integers(1, 5))
def test_property_forward_equals_dense_formula(d: int, k: int, r: int, alpha: float, rs: bool,
                                               batch: int) -> None:
    torch.manual_seed(d * 1000 + k * 10 + r)
    layer = LoRALinear(nn.Linear(k, d).double(), r=r, lora_alpha=alpha, use_rslora=rs,
                       init_lora_weights=False)
    x = torch.randn(batch, k, dtype=torch.float64)
    s = alpha / math.sqrt(r) if rs else alpha / r
    W = layer.base.weight + s * layer.lora_B @ layer.lora_A
    expected = x @ W.T + layer.base.bias
    torch.testing.assert_close(layer(x), expected)
    assert torch.linalg.matrix_rank(layer.delta_weight()) <= min(r, d, k)
    layer.merge()
    torch.testing.assert_close(layer(x), expected)


def test_all_linear_matches_peft_on_gpt_and_llama():
    """``"all-linear"`` adapts every linear layer but the output layer, the set PEFT picks for a
    transformers model. (On a plain nn.Module PEFT cannot tell which layer is the output and
    adapts ``lm_head`` too; ours still leaves it out.)"""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_edu.models import GPT, gpt_config

    tiny_llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    for model in (GPT(gpt_config("tiny")), tiny_llama):
        ours = find_targets(model, LoraConfig(r=2, target_modules="all-linear"))
        wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
            r=2, target_modules="all-linear"))
        theirs = [n.removeprefix("base_model.model.") for n, m in wrapped.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)]
        assert ours == [n for n in theirs if n != "lm_head"] and ours
        assert "lm_head" not in ours


def test_all_linear_refuses_a_second_injection():
    from lora_edu.models import GPT, gpt_config

    model = inject_lora(GPT(gpt_config("tiny")), LoraConfig(r=2, target_modules="all-linear"))
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, LoraConfig(r=2, target_modules="all-linear"))


# --------------------------------------------------------------------------- variant registry

def test_lora_module_never_imports_variants() -> None:
    """Dependencies point one way: variants build on lora, lora only looks them up by name."""
    import ast
    import inspect

    import lora_edu.lora as lora_mod

    tree = ast.parse(inspect.getsource(lora_mod))
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names]
    imported += [f"{node.module}.{alias.name}" for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) for alias in node.names]
    assert imported and not [m for m in imported if "variants" in m], imported


@pytest.mark.parametrize("option, built", [
    ("use_dora=True", "type(model.q).__name__ == 'DoRALinear'"),
    ("init_lora_weights='pissa'", "torch.allclose(model(x), before, atol=1e-5)"),
])
def test_variant_options_work_without_importing_variants_first(option: str, built: str) -> None:
    """In a fresh interpreter, LoraConfig(...) finds the variant through the registry."""
    import os
    import subprocess
    import sys

    code = f"""
import sys, torch
from torch import nn
from lora_edu.lora import LoraConfig, inject_lora
assert "lora_edu.variants" not in sys.modules, "importing lora must not import variants"
torch.manual_seed(0)
model = nn.Sequential()
model.q = nn.Linear(6, 5)
x = torch.randn(3, 6)
before = model(x)
model = inject_lora(model, LoraConfig(r=2, target_modules=["q"], {option}))
assert "lora_edu.variants" in sys.modules
assert {built}
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch):
    """lora_edu.lora with its registries copied, so a test's registrations do not leak."""
    import lora_edu.lora as lora_mod

    lora_mod.get_layer_class("dora")  # the built-ins are registered before the copy
    monkeypatch.setattr(lora_mod, "_INIT_METHODS", dict(lora_mod._INIT_METHODS))
    monkeypatch.setattr(lora_mod, "_LAYER_CLASSES", dict(lora_mod._LAYER_CLASSES))
    return lora_mod


def test_registered_init_method_is_called_and_its_check_refuses_before_any_change(
        registry) -> None:
    calls = []

    def ones_init(layer: LoRALinear) -> None:
        calls.append(layer)
        with torch.no_grad():
            layer.lora_A.fill_(1.0)
            layer.lora_B.fill_(0.0)

    def at_most_2(r: int, shape: tuple[int, ...], where: str) -> None:
        if r > 2:
            raise ValueError(f"ones-init needs r <= 2 for {where}, got r={r}")

    registry.register_init_method("ones", ones_init, check=at_most_2)
    assert "ones" in registry.init_options()
    model = inject_lora(tiny_model(), LoraConfig(r=2, init_lora_weights="ones"))
    assert len(calls) == 4 and all(torch.all(layer.lora_A == 1) for layer in calls)
    untouched = tiny_model()
    with pytest.raises(ValueError, match="ones-init needs r <= 2 for target module '0.q'"):
        inject_lora(untouched, LoraConfig(r=3, init_lora_weights="ones"))
    assert not list(lora_layers(untouched))


def test_registered_layer_class_is_built(registry) -> None:
    class Scaled(LoRALinear):
        pass

    registry.register_layer_class("dora", Scaled, replace=True)
    model = inject_lora(tiny_model(), LoraConfig(r=2, use_dora=True))
    assert all(type(layer) is Scaled for _, layer in lora_layers(model))


def test_registry_refuses_bad_registrations(registry) -> None:
    with pytest.raises(ValueError, match="LoRA's own initialisation"):
        registry.register_init_method("gaussian", lambda layer: None)
    with pytest.raises(ValueError, match="'pissa' is already registered.*replace=True"):
        registry.register_init_method("pissa", lambda layer: None)
    with pytest.raises(TypeError, match="subclass lora_edu.lora.LoRALinear"):
        registry.register_layer_class("plain", nn.Linear)
    with pytest.raises(TypeError, match="callable"):
        registry.register_init_method("x", "not a function")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no layer variant named 'vera'"):
        registry.get_layer_class("vera")
    # The built-in error message is unchanged by the registry.
    with pytest.raises(ValueError, match=r"must be one of \(True, False, 'gaussian', 'pissa'\)"):
        LoraConfig(init_lora_weights="svd")


# --------------------------------------------------------------------------- modules_to_save

class WithHead(nn.Module):
    """Two attention blocks, a `pre_classifier` and a `classifier` (DistilBERT's names)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(Attention(dim), Attention(dim))
        self.pre_classifier = nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.pre_classifier(self.body(x))))


def with_head() -> nn.Module:
    seed_all(0)
    return WithHead()


HEAD = LoraConfig(r=2, target_modules=["q", "v"], modules_to_save=["classifier"])


def test_modules_to_save_keeps_the_original_and_trains_a_copy() -> None:
    model = inject_lora(with_head(), HEAD)
    wrapper = model.classifier
    assert wrapper.trainable_module is not wrapper.original_module
    assert all(p.requires_grad for p in wrapper.trainable_module.parameters())
    assert not any(p.requires_grad for p in wrapper.original_module.parameters())
    assert wrapper.weight is wrapper.trainable_module.weight        # attributes forwarded
    x = torch.randn(4, 16)
    before = with_head()(x)
    with torch.no_grad():
        wrapper.trainable_module.weight.add_(1.0)
    assert not torch.allclose(model(x), before)
    with disable_adapters(model):
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
        assert wrapper(torch.zeros(1, 16)).shape == (1, 3)
    assert not wrapper.disabled


def test_modules_to_save_match_by_suffix_as_peft_does() -> None:
    """PEFT's rule is str.endswith: "classifier" also takes DistilBERT's "pre_classifier"."""
    from lora_edu.lora import modules_to_save
    model = inject_lora(with_head(), HEAD)
    assert modules_to_save(model) == ["pre_classifier", "classifier"]
    trainable, total = count_parameters(model)
    lora = sum(layer.lora_A.numel() + layer.lora_B.numel() for _, layer in lora_layers(model))
    heads = sum(p.numel() for m in (with_head().pre_classifier, with_head().classifier)
                for p in m.parameters())
    assert trainable == lora + heads
    assert total == sum(p.numel() for p in with_head().parameters()) + lora + heads


def test_lora_never_targets_a_module_to_save() -> None:
    model = inject_lora(with_head(), LoraConfig(r=2, target_modules="all-linear",
                                                modules_to_save=["classifier"]))
    names = {n for n, _ in lora_layers(model)}
    assert not any("classifier" in n for n in names) and "body.0.q" in names


@pytest.mark.parametrize("entries", [["score"], ["classifier", "head"]])
def test_a_name_matching_no_module_raises_and_leaves_the_model_untouched(entries) -> None:
    model = with_head()
    before, text = state(model), str(model)
    missing = [e for e in entries if e != "classifier"][0]
    with pytest.raises(ValueError, match=f"'{missing}' matches no module"):
        inject_lora(model, LoraConfig(target_modules=["q", "v"], modules_to_save=entries))
    assert str(model) == text and "lora_config" not in vars(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("bad", ["classifier", [""], [3], ("ok", None)])
def test_modules_to_save_must_be_a_list_of_names(bad) -> None:
    with pytest.raises(TypeError, match="modules_to_save"):
        LoraConfig(modules_to_save=bad)


def test_modules_to_save_with_bias_all_keeps_the_original_frozen() -> None:
    model = inject_lora(with_head(), LoraConfig(r=2, bias="all", target_modules=["q", "v"],
                                                modules_to_save=["classifier"]))
    assert not model.classifier.original_module.bias.requires_grad
    assert model.classifier.trainable_module.bias.requires_grad
    assert model.body[0].k.bias.requires_grad


def test_merge_and_unload_puts_the_trained_copy_in_place() -> None:
    model = inject_lora(with_head(), HEAD)
    set_random_lora(model)
    x = torch.randn(4, 16)
    expected = model(x)
    copy_ = model.classifier.trainable_module
    merge_and_unload(model)
    assert model.classifier is copy_
    assert not list(lora_layers(model))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_inject_twice_with_modules_to_save_is_refused() -> None:
    model = inject_lora(with_head(), HEAD)
    with pytest.raises(ValueError, match="twice"):
        inject_lora(model, LoraConfig(target_modules=["k"], modules_to_save=["classifier"]))
