"""lora_edu against Hugging Face PEFT: same weights in, same numbers out.

PEFT is the reference implementation most readers will use; these tests pin lora_edu to it for
the forward pass, gradients, dropout, merging, rsLoRA, both adapter layouts, and GPT-2's
``Conv1D`` (``fan_in_fan_out``). Every model is built from a config: nothing is downloaded.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_edu.adapters import load_peft_adapter, save_peft_adapter
from lora_edu.lora import LoraConfig, inject_lora, lora_layers, merge_lora
from lora_edu.repro import seed_all

peft = pytest.importorskip("peft")


class Block(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.q(x)) * self.k(x) + self.v(x))


def base_model() -> nn.Module:
    seed_all(0)
    return nn.Sequential(Block(), Block())


X = torch.randn(4, 7, 16, generator=torch.Generator().manual_seed(5))


def pair(r: int = 4, alpha: float = 8, rslora: bool = False, dropout: float = 0.0,
         targets: list[str] | str | None = None) -> tuple[nn.Module, nn.Module]:
    """(lora_edu model, PEFT model) on the same base, with the same random non-zero A and B."""
    targets = ["q", "v"] if targets is None else targets
    ours = inject_lora(base_model(), LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora,
                                                lora_dropout=dropout, target_modules=targets))
    theirs = peft.get_peft_model(base_model(), peft.LoraConfig(
        r=r, lora_alpha=alpha, use_rslora=rslora, lora_dropout=dropout, target_modules=targets))
    gen = torch.Generator().manual_seed(7)
    peft_modules = dict(theirs.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            layer.lora_A.normal_(generator=gen)
            layer.lora_B.normal_(std=0.1, generator=gen)
            peft_modules[name].lora_A["default"].weight.copy_(layer.lora_A)
            peft_modules[name].lora_B["default"].weight.copy_(layer.lora_B)
    return ours, theirs


@pytest.mark.parametrize("r, alpha, rslora", [(4, 8, False), (4, 8, True), (3, 7.5, False),
                                              (8, 2, True)])
def test_forward_and_scaling(r: int, alpha: float, rslora: bool) -> None:
    ours, theirs = pair(r, alpha, rslora)
    peft_q = theirs.base_model.model[0].q
    assert next(layer for _, layer in lora_layers(ours)).scaling == peft_q.scaling["default"]
    torch.testing.assert_close(ours(X), theirs(X), rtol=1e-6, atol=1e-6)


def test_gradients_match() -> None:
    ours, theirs = pair()
    ours(X).square().mean().backward()
    theirs(X).square().mean().backward()
    peft_modules = dict(theirs.base_model.model.named_modules())
    for name, layer in lora_layers(ours):
        theirs_layer = peft_modules[name]
        torch.testing.assert_close(layer.lora_A.grad, theirs_layer.lora_A["default"].weight.grad)
        torch.testing.assert_close(layer.lora_B.grad, theirs_layer.lora_B["default"].weight.grad)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n.replace("base_model.model.", "").replace(".default.weight", "")
         for n, p in theirs.named_parameters() if p.requires_grad}


def test_dropout_draws_the_same_mask() -> None:
    ours, theirs = pair(dropout=0.3)
    ours.train(), theirs.train()
    torch.manual_seed(11)
    y_ours = ours(X)
    torch.manual_seed(11)
    y_theirs = theirs(X)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-6, atol=1e-6)


def test_merge_matches_merge_and_unload() -> None:
    ours, theirs = pair(r=4, alpha=16, rslora=True)
    merged_peft = theirs.merge_and_unload()
    merge_lora(ours)
    for name, layer in lora_layers(ours):
        torch.testing.assert_close(layer.base.weight, merged_peft.get_submodule(name).weight,
                                   rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours(X), merged_peft(X), rtol=1e-5, atol=1e-6)


def test_regex_targets_pick_the_same_modules() -> None:
    ours, theirs = pair(targets=r"1\.(k|o)")
    assert [n for n, _ in lora_layers(ours)] == ["1.k", "1.o"]
    torch.testing.assert_close(ours(X), theirs(X), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_our_adapter_loads_in_peft(tmp_path: Path, bias: str) -> None:
    model = inject_lora(base_model(), LoraConfig(r=4, lora_alpha=8, bias=bias,
                                                 init_lora_weights=False, use_rslora=True))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    save_peft_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(base_model(), str(tmp_path))
    torch.testing.assert_close(loaded(X), model(X), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_peft_adapter_loads_here(tmp_path: Path, bias: str) -> None:
    theirs = peft.get_peft_model(base_model(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q", "v"], bias=bias, init_lora_weights=False))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.05)
    theirs.save_pretrained(str(tmp_path))
    ours = load_peft_adapter(base_model(), tmp_path)
    torch.testing.assert_close(ours(X), theirs(X), rtol=1e-6, atol=1e-6)


def test_gpt2_conv1d_fan_in_fan_out(tmp_path: Path) -> None:
    """GPT-2 stores c_attn as a Conv1D with weight (k, d): PEFT's fan_in_fan_out case."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16)
    seed_all(0)
    gpt = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                        init_lora_weights=False)
    ours = inject_lora(copy.deepcopy(gpt), config)
    save_peft_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(gpt), str(tmp_path))
    expected = ours(ids).logits
    torch.testing.assert_close(theirs(ids).logits, expected, rtol=1e-5, atol=1e-5)
    merge_lora(ours)
    torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("direction", ["ours_to_peft", "peft_to_ours"])
def test_dora_adapters_cross_over(tmp_path: Path, direction: str) -> None:
    """DoRA's magnitude travels as PEFT's ``lora_magnitude_vector``; outputs must agree."""
    if direction == "ours_to_peft":
        src = inject_lora(base_model(), LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                   init_lora_weights=False))
    else:
        src = peft.get_peft_model(base_model(), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q", "v"], use_dora=True,
            init_lora_weights=False))
    with torch.no_grad():
        for name, p in src.named_parameters():
            if p.requires_grad and "magnitude" in name:
                p.mul_(1.1)  # a trained magnitude: no longer the row norms
    if direction == "ours_to_peft":
        save_peft_adapter(src, tmp_path)
        dst = peft.PeftModel.from_pretrained(base_model(), str(tmp_path))
    else:
        src.save_pretrained(str(tmp_path))
        dst = load_peft_adapter(base_model(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(dst(X), src(X), rtol=1e-5, atol=1e-5)


def test_pissa_adapter_from_peft_is_reinitialised_on_the_base(tmp_path: Path) -> None:
    """PiSSA rewrites W0 as W0 − s·B0 A0; loading must redo that before the trained A, B."""
    theirs = peft.get_peft_model(base_model(), peft.LoraConfig(
        r=4, lora_alpha=4, target_modules=["q", "v"], init_lora_weights="pissa"))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.01)
    theirs.save_pretrained(str(tmp_path))
    ours = load_peft_adapter(base_model(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(X), theirs(X), rtol=1e-4, atol=1e-5)
