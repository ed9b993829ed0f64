"""Tests of lora_edu.fused: LoRA on chosen slices of a fused qkv projection (loralib's
MergedLinear), cross-checked against PEFT on a tiny random GPT-2."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lora_edu.fused import MergedLoRALinear, inject_merged_lora
from lora_edu.lora import count_parameters
from lora_edu.repro import seed_all

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def randomise(layer: MergedLoRALinear) -> None:
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)


def tiny_gpt2() -> nn.Module:
    seed_all(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                  vocab_size=64, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("fused", ["linear", "conv1d"])
def test_starts_at_base_and_leaves_disabled_slices_alone(fused):
    seed_all(0)
    base = nn.Linear(8, 12) if fused == "linear" else transformers.pytorch_utils.Conv1D(12, 8)
    layer = MergedLoRALinear(base, r=2, lora_alpha=4, enable_lora=[True, False, True])
    x = torch.randn(5, 8)
    assert torch.equal(layer(x), base(x))            # B = 0: exactly the base layer
    randomise(layer)
    h, h0 = layer(x), base(x)
    assert torch.equal(h[:, 4:8], h0[:, 4:8])         # k slice untouched, bit for bit
    assert (h[:, :4] - h0[:, :4]).abs().min() > 0     # q and v slices moved
    assert (h[:, 8:] - h0[:, 8:]).abs().min() > 0


def test_forward_equals_delta_weight_and_slice_ranks():
    seed_all(1)
    base = nn.Linear(10, 9)
    layer = MergedLoRALinear(base, r=2, lora_alpha=3, enable_lora=[True, False, True])
    randomise(layer)
    x = torch.randn(4, 10, dtype=torch.float64)
    layer.double()
    delta = layer.delta_weight()
    assert delta.shape == (9, 10)
    assert torch.count_nonzero(delta[3:6]) == 0
    for rows in (slice(0, 3), slice(6, 9)):
        assert torch.linalg.matrix_rank(delta[rows]).item() == 2
    torch.testing.assert_close(layer(x), base(x) + x @ delta.T, rtol=0, atol=1e-12)


def test_gradients_and_parameter_count():
    seed_all(2)
    layer = MergedLoRALinear(nn.Linear(8, 12), r=3, enable_lora=[True, False, True])
    layer.base.requires_grad_(False)
    randomise(layer)
    layer(torch.randn(6, 8)).square().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert layer.base.weight.grad is None
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert trainable == 2 * 3 * (8 + 4)               # m·r·(k + d_s)


@pytest.mark.parametrize("fused", ["linear", "conv1d"])
def test_merge_unmerge_roundtrip(fused):
    seed_all(3)
    base = nn.Linear(8, 12) if fused == "linear" else transformers.pytorch_utils.Conv1D(12, 8)
    layer = MergedLoRALinear(base, r=2, enable_lora=[False, True, True])
    randomise(layer)
    x = torch.randn(3, 8)
    before, w0 = layer(x), layer.base.weight.detach().clone()
    layer.merge()
    layer.merge()                                     # a second merge is a no-op
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, rtol=0, atol=1e-6)
    assert not layer.merged


def test_matches_peft_on_gpt2_c_attn():
    """Same function as a PEFT LoRA of rank m·r with a block-structured B."""
    r, alpha, enable = 2, 4, [True, False, True]
    ours = inject_merged_lora(tiny_gpt2(), ["c_attn"], r=r, lora_alpha=alpha,
                              enable_lora=enable)
    layers = [m for m in ours.modules() if isinstance(m, MergedLoRALinear)]
    assert len(layers) == 2
    for layer in layers:
        randomise(layer)
    m = sum(enable)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(
            r=m * r, lora_alpha=m * alpha, target_modules=["c_attn"], fan_in_fan_out=True))
    for i, layer in enumerate(layers):
        target = theirs.base_model.model.transformer.h[i].attn.c_attn
        A, B = layer.peft_factors()
        with torch.no_grad():
            target.lora_A["default"].weight.copy_(A)
            target.lora_B["default"].weight.copy_(B)
        assert target.scaling["default"] == pytest.approx(layer.scaling)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours_logits, peft_logits = ours(ids).logits, theirs(ids).logits
        base_logits = tiny_gpt2()(ids).logits
    assert (ours_logits - base_logits).abs().max() > 1e-3   # the adapter does something
    torch.testing.assert_close(ours_logits, peft_logits, rtol=1e-5, atol=1e-5)
    trainable, _ = count_parameters(ours)
    assert trainable == 2 * m * r * (32 + 32)


def test_bad_input_is_refused_and_model_unchanged():
    with pytest.raises(ValueError, match="no True"):
        MergedLoRALinear(nn.Linear(4, 6), enable_lora=[False, False, False])
    with pytest.raises(ValueError, match="equal slices"):
        MergedLoRALinear(nn.Linear(4, 7), enable_lora=[True, False, True])
    with pytest.raises(TypeError, match="list of True/False"):
        MergedLoRALinear(nn.Linear(4, 6), enable_lora=[1, 0, 1])
    with pytest.raises(TypeError, match="nn.Linear or GPT-2's Conv1D"):
        MergedLoRALinear(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="r must be"):
        MergedLoRALinear(nn.Linear(4, 6), r=0)
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="equal slices"):   # c_attn has 96 = 3·32 outputs
        inject_merged_lora(model, ["c_attn"], enable_lora=[True] * 5)
    with pytest.raises(ValueError, match="matches no module"):
        inject_merged_lora(model, ["q_proj"])
    assert not any(isinstance(m, MergedLoRALinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused", ["linear", "conv1d"])
def test_half_precision_base_keeps_float32_factors_and_rounds_once(fused, dtype):
    """The policy LoRALinear and PEFT follow: float32 factors on an fp16/bf16 weight, the branch
    in float32 rounded once, and merge = round(W0 + ΔW) with the sum formed in float32."""
    seed_all(5)
    base = nn.Linear(16, 24) if fused == "linear" else transformers.pytorch_utils.Conv1D(24, 16)
    base = base.to(dtype)
    layer = MergedLoRALinear(base, r=4, lora_alpha=8, enable_lora=[True, False, True])
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.normal_(std=0.05)
    x = torch.randn(3, 16).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    branch = layer._branch(x.float())                     # float32, rounded once below
    assert torch.equal(out, base(x) + branch.to(dtype))
    w0 = base.weight.detach().clone()
    delta = layer.delta_weight()
    assert delta.dtype == torch.float32
    exact = w0.double() + delta.double()
    layer.merge()
    assert torch.equal(base.weight, (w0.float() + delta).to(dtype))      # one rounding
    twice = (w0 + delta.to(dtype)).double()               # the old way: round ΔW, then the sum
    assert ((base.weight.double() - exact).abs() <= (twice - exact).abs()).all()
    assert ((base.weight.double() - exact).abs() < (twice - exact).abs()).any()
    layer.unmerge()
    assert torch.equal(base.weight, ((w0.float() + delta).to(dtype).float() - delta).to(dtype))
