"""The memory and FLOP ledgers of chapter 8 (lora_edu.ledger), on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from lora_edu.ledger import (flops_per_token, measure_step_memory, predict_training_bytes,
                             saved_activation_bytes)
from lora_edu.lora import LoraConfig, inject_lora
from lora_edu.models import count_bytes


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def loss_of(model):
    return lambda: model(input_ids=IDS, labels=IDS).loss


def test_a_frozen_linear_saves_no_input_for_backward():
    x = torch.randn(16, 64, requires_grad=True)
    frozen, trained = nn.Linear(64, 64).requires_grad_(False), nn.Linear(64, 64)
    assert saved_activation_bytes(lambda: frozen(x).sum(), frozen) == 0
    assert saved_activation_bytes(lambda: trained(x).sum(), trained) == x.numel() * 4


def test_lora_saves_fewer_activations_than_full_fine_tuning():
    full = tiny_llama()
    lora = inject_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert saved_activation_bytes(loss_of(lora), lora) < saved_activation_bytes(loss_of(full),
                                                                                full)


def test_the_ledger_parts_are_the_tensors_bytes():
    model = inject_lora(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"))
    ledger = measure_step_memory(model, loss_of(model))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert ledger.weights == count_bytes(model.parameters())
    assert ledger.gradients == count_bytes(trainable)  # one fp32 gradient per trainable weight
    # AdamW keeps exp_avg and exp_avg_sq per trainable weight, plus a scalar step each
    assert ledger.optimizer_state == 2 * count_bytes(trainable) + 4 * len(trainable)
    assert ledger.saved_activations > 0
    if ledger.peak is not None:  # MemTracker's categories at the peak add up to the peak
        assert sum(ledger.at_peak.values()) == ledger.peak
        assert ledger.peak >= ledger.weights + ledger.optimizer_state


def test_nothing_trainable_is_refused():
    model = tiny_llama().requires_grad_(False)
    with pytest.raises(ValueError, match="nothing trainable"):
        measure_step_memory(model, loss_of(model))


def _matmul_flops(model) -> float:
    with FlopCounterMode(display=False) as counter:
        model(input_ids=IDS, labels=IDS).loss.backward()
    counts = counter.get_flop_counts()["Global"]
    return sum(v for op, v in counts.items() if str(op) in ("aten.mm", "aten.addmm"))


def test_flop_formulas_match_pytorchs_flop_counter():
    full = tiny_llama()
    n = sum(m.weight.numel() for m in full.modules() if isinstance(m, nn.Linear))  # incl. head
    assert _matmul_flops(full) == flops_per_token(n, n, full=True) * IDS.numel()
    lora = inject_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    n_lora = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    predicted = flops_per_token(n, n_lora, full=False) * IDS.numel()
    # an overcount only: the layers below the first adapter need no backward at all
    assert 0.85 * predicted < _matmul_flops(lora) <= predicted


def test_the_calculator():
    seven_b = predict_training_bytes(7e9, 7e9, master_bytes=4)
    assert seven_b == {"weights": 14e9, "gradients": 14e9, "optimizer_state": 84e9}
    lora = predict_training_bytes(7e9, 4e6)
    assert lora["weights"] == 14e9 and lora["optimizer_state"] == 32e6
