"""lora_edu against Hugging Face PEFT: same weights in, same numbers out.

PEFT is the reference implementation most readers will use; these tests pin lora_edu to it for
the forward pass, gradients, dropout, merging, rsLoRA, both adapter layouts, GPT-2's
``Conv1D`` (``fan_in_fan_out``), and ``modules_to_save`` on a Llama sequence classifier.
Every model is built from a config: nothing is downloaded.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_edu.adapters import load_peft_adapter, save_peft_adapter
from lora_edu.lora import (LoraConfig, count_parameters, disable_adapters, inject_lora,
                           lora_layers, merge_and_unload, merge_lora)
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


# --------------------------------------------------------------------------- modules_to_save
# A transformers sequence classifier (Llama with a new `score` head), built from a config: LoRA
# on q, v plus the trained head, the classic first fine-tuning lab.

def llama_classifier() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, num_labels=3, pad_token_id=0)
    seed_all(0)
    return transformers.LlamaForSequenceClassification(cfg).eval()


IDS = torch.randint(1, 64, (4, 6), generator=torch.Generator().manual_seed(9))


def head_cfg() -> dict:
    """Fresh lists each time: PEFT extends a SEQ_CLS config's modules_to_save in place."""
    return dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=["score"])


def trained(model: nn.Module, seed: int = 1) -> nn.Module:
    """Move every trainable tensor (LoRA factors and the head's copy) as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def our_name(peft_name: str) -> str:
    """PEFT's in-memory name → lora_edu's: ``…q_proj.lora_A.default.weight`` → ``…q_proj.lora_A``;
    a module to save has the same names in both (``score.modules_to_save.default.weight``)."""
    name = peft_name.removeprefix("base_model.model.")
    return re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1", name)


def classifier_pair() -> tuple[nn.Module, nn.Module]:
    """(lora_edu, PEFT) classifiers with the same trained LoRA factors and head."""
    ours = trained(inject_lora(llama_classifier(), LoraConfig(**head_cfg())))
    theirs = peft.get_peft_model(llama_classifier(), peft.LoraConfig(**head_cfg()))
    ours_params = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:  # lora_A.default.weight → lora_A; the head's names are equal
                p.copy_(ours_params[our_name(name)])
    return ours, theirs


def test_modules_to_save_logits_counts_and_gradients_match_peft() -> None:
    ours, theirs = classifier_pair()
    torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=1e-5, atol=1e-6)
    assert count_parameters(ours) == theirs.get_nb_trainable_parameters()
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(
        our_name(n) for n, p in theirs.named_parameters() if p.requires_grad)
    ours(IDS).logits.square().sum().backward()
    theirs(IDS).logits.square().sum().backward()
    torch.testing.assert_close(ours.score.modules_to_save["default"].weight.grad,
                               theirs.base_model.model.score.modules_to_save["default"].weight.grad)


def test_modules_to_save_disabled_adapters_give_the_base_model_head_included() -> None:
    ours, theirs = classifier_pair()
    base = llama_classifier()(IDS).logits
    assert not torch.allclose(ours(IDS).logits, base, atol=1e-3)  # the adapter does something
    with disable_adapters(ours):
        torch.testing.assert_close(ours(IDS).logits, base, rtol=0, atol=0)
    with theirs.disable_adapter():
        torch.testing.assert_close(theirs(IDS).logits, base, rtol=0, atol=0)
    torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=1e-5, atol=1e-6)


def test_all_linear_with_modules_to_save_counts_like_peft() -> None:
    """"all-linear" on a classifier: the head is a module to save, so it carries no LoRA."""
    cfg = dict(r=2, target_modules="all-linear", modules_to_save=["score"])
    ours = inject_lora(llama_classifier(), LoraConfig(**cfg))
    theirs = peft.get_peft_model(llama_classifier(), peft.LoraConfig(**cfg))
    assert count_parameters(ours) == theirs.get_nb_trainable_parameters()
    assert "score" not in {n for n, _ in lora_layers(ours)}


def test_modules_to_save_adapter_from_lora_edu_loads_in_peft(tmp_path: Path) -> None:
    ours, _ = classifier_pair()
    save_peft_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(llama_classifier(), str(tmp_path))
    torch.testing.assert_close(loaded(IDS).logits, ours(IDS).logits, rtol=1e-5, atol=1e-6)
    with loaded.disable_adapter():
        torch.testing.assert_close(loaded(IDS).logits, llama_classifier()(IDS).logits)


@pytest.mark.parametrize("task_type", [None, "SEQ_CLS"])
def test_modules_to_save_adapter_from_peft_loads_here(tmp_path: Path, task_type) -> None:
    """PEFT's SEQ_CLS task adds ["classifier", "score"] to the config; Llama has only `score`."""
    theirs = trained(peft.get_peft_model(llama_classifier(), peft.LoraConfig(
        task_type=task_type, **head_cfg())))
    theirs.save_pretrained(str(tmp_path))
    ours = load_peft_adapter(llama_classifier(), tmp_path)
    torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=1e-5, atol=1e-6)
    assert count_parameters(ours) == theirs.get_nb_trainable_parameters()
    with disable_adapters(ours):
        torch.testing.assert_close(ours(IDS).logits, llama_classifier()(IDS).logits)


def test_merge_and_unload_keeps_the_trained_head_like_peft() -> None:
    ours, theirs = classifier_pair()
    expected = theirs.merge_and_unload()(IDS).logits
    merged = merge_and_unload(ours)
    assert isinstance(merged.score, nn.Linear)
    torch.testing.assert_close(merged(IDS).logits, expected, rtol=1e-5, atol=1e-6)
