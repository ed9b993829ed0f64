"""The training loop: schedule, LoRA trains only LoRA, memory accounting is exact, errors."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from lora_edu.lora import LoraConfig, inject_lora, lora_layers
from lora_edu.models import GPT, gpt_config
from lora_edu.train import (PRETRAIN_RECIPES, TrainConfig, autocast_dtype, lr_factor,
                            optimizer_state_bytes, pretrain, train)

# Streams with structure a tiny model learns in a few dozen steps: a "source" to
# pretrain on and a "target" to adapt to.
TOKENS = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 60))
TARGET = torch.tensor(list(b"pack my box with five dozen liquor jugs! " * 60))
FAST = TrainConfig(steps=30, batch_size=8, lr=1e-2, warmup_steps=3, eval_every=30,
                   eval_windows=8, desc="test")



def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(gpt_config("tiny"))


@pytest.fixture(scope="module")
def base_state() -> dict[str, torch.Tensor]:
    model = tiny_model()
    train(model, TOKENS, None, replace(FAST, measure_memory=False))
    return model.state_dict()


def pretrained(state: dict[str, torch.Tensor]) -> GPT:
    model = tiny_model()
    model.load_state_dict(state)
    return model


def storage_bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    f = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:10]))        # rising during warm-up
    assert all(a >= b for a, b in zip(f[10:], f[11:]))        # then never rising
    assert f[-1] == pytest.approx(0.1) and f[55] == pytest.approx(0.55, abs=0.02)


def test_lora_training_reduces_the_loss_and_changes_only_lora_weights(base_state) -> None:
    model = inject_lora(pretrained(base_state), LoraConfig(r=4, lora_alpha=8,
                                                           target_modules=["q", "v", "fc1"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    hist = train(model, TARGET, {"target": TARGET}, FAST)
    loss = hist.eval_loss["target"]
    assert loss[-1] < loss[0] - 0.5, loss
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"
    assert all(not torch.equal(model.get_parameter(n), b) for n, b in lora_b.items())
    n_lora = sum(layer.lora_A.numel() + layer.lora_B.numel() for _, layer in lora_layers(model))
    assert hist.trainable_params == n_lora < hist.total_params


def test_full_fine_tuning_changes_every_weight_and_is_reproducible() -> None:
    model, again = tiny_model(), tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    h1, h2 = train(model, TOKENS, None, FAST), train(again, TOKENS, None, FAST)
    assert h1.train_loss == h2.train_loss  # same seed, same batches, same numbers
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters()
               if n != "pos_emb.weight")  # positions beyond the window may stay untouched
    assert h1.train_loss[-1] < h1.train_loss[0]


def test_memory_accounting_equals_the_tensors_bytes() -> None:
    model = inject_lora(tiny_model(), LoraConfig(r=2, target_modules=["q", "v"]))
    hist = train(model, TOKENS, None, FAST)
    mem = hist.memory
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert mem.param_bytes == storage_bytes(model.parameters())
    assert mem.trainable_param_bytes == storage_bytes(trainable)
    assert mem.grad_bytes == mem.trainable_param_bytes  # one fp32 gradient per trainable fp32
    # AdamW keeps exp_avg and exp_avg_sq like each parameter, plus a 4-byte scalar step.
    assert mem.optimizer_state_bytes == 2 * mem.trainable_param_bytes + 4 * len(trainable)
    assert mem.peak_bytes is not None and mem.peak_bytes > mem.param_bytes
    assert "MemTracker" in mem.peak_source and mem.activation_bytes > 0


def test_optimizer_state_bytes_reads_the_optimizer() -> None:
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    assert optimizer_state_bytes(opt) == 0  # AdamW creates its state lazily
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    state = [t for s in opt.state.values() for t in s.values()]
    assert optimizer_state_bytes(opt) == storage_bytes(state)


def test_precision_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert autocast_dtype(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert autocast_dtype(torch.device("cuda")) is torch.float16  # a T4: no fast bf16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert autocast_dtype(torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype(torch.device("cuda"), amp=False) is None


def test_pretrain_recipe_runs_end_to_end() -> None:
    model, hist = pretrain("tiny")
    assert set(hist.eval_loss) == {"source", "target"}
    assert hist.eval_steps[-1] == PRETRAIN_RECIPES["tiny"].steps
    assert hist.final_eval("source") < hist.eval_loss["source"][0] < 1.1 * math.log(256)
    with pytest.raises(ValueError, match="unknown preset"):
        pretrain("xl")


def test_bad_input_is_refused() -> None:
    frozen = tiny_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True.*inject_lora"):
        train(frozen, TOKENS, None, FAST)
    with pytest.raises(ValueError, match="warmup_steps must lie in"):
        TrainConfig(steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        TrainConfig(batch_size=0)
    with pytest.raises(TypeError, match="TrainConfig"):
        train(tiny_model(), TOKENS, None, {"steps": 3})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least block_size"):
        train(tiny_model(), TOKENS[:10], None, FAST)
