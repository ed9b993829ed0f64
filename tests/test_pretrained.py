"""The real pretrained model: its cache, and LoRA on it against PEFT.

`make test` runs `make model` first, so the cache exists; without it the real-model tests fail
with the loader's own message, which names `make model`.
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch

from lora_edu.adapters import load_peft_adapter, save_peft_adapter
from lora_edu.lora import LoraConfig, inject_lora, lora_layers, merge_lora
from lora_edu.pretrained import MANIFEST, ModelCacheError, _sha256, check_cache, load_smollm2
from lora_edu.repro import seed_all

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------- the cache

def _fake_cache(root, payload=b"weights"):
    folder = root / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(payload)
    files = {"model.safetensors": {"bytes": len(payload),
                                   "sha256": _sha256(folder / "model.safetensors")}}
    (folder / MANIFEST).write_text(json.dumps({"files": files}))
    return folder


def test_missing_cache_names_the_make_target(tmp_path):
    with pytest.raises(ModelCacheError, match="make model"):
        check_cache(tmp_path)
    with pytest.raises(ModelCacheError, match="make model"):
        load_smollm2(root=tmp_path, fetch=False)


def test_a_valid_cache_passes_the_check(tmp_path):
    folder = _fake_cache(tmp_path)
    assert check_cache(tmp_path) == folder


def test_corrupt_file_is_refused(tmp_path):
    folder = _fake_cache(tmp_path)
    (folder / "model.safetensors").write_bytes(b"weighTs")  # same size, other bytes
    with pytest.raises(ModelCacheError, match="corrupt.*make model"):
        check_cache(tmp_path)


def test_truncated_file_is_refused(tmp_path):
    folder = _fake_cache(tmp_path)
    (folder / "model.safetensors").write_bytes(b"weig")
    with pytest.raises(ModelCacheError, match="wrong size"):
        check_cache(tmp_path)


def test_unreadable_manifest_is_refused(tmp_path):
    folder = _fake_cache(tmp_path)
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(ModelCacheError, match="unreadable"):
        check_cache(tmp_path)


def test_dtype_must_be_a_torch_dtype():
    with pytest.raises(TypeError, match="torch.float32"):
        load_smollm2(dtype="float32")


# --------------------------------------------------------------------------- the real model

@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_smollm2()
    return model, tokenizer


@pytest.fixture(scope="module")
def batch(smollm2):
    _, tokenizer = smollm2
    texts = ["The capital of France is Paris.", "Low-rank adaptation freezes W0."]
    return tokenizer(texts, return_tensors="pt", padding=True)


def test_the_real_model_is_smollm2(smollm2):
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of "
                                          "France?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def _ours_and_peft(model, r=4, targets=("q_proj", "v_proj")):
    """The same adapter (random A and B) in lora_edu and in PEFT, on two copies of model."""
    seed_all(0)
    ours = inject_lora(copy.deepcopy(model), LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False))
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=list(targets)))
    modules = dict(theirs.named_modules())
    for name, layer in lora_layers(ours):
        peft_layer = modules[f"base_model.model.{name}"]
        peft_layer.lora_A["default"].weight.data.copy_(layer.lora_A)
        peft_layer.lora_B["default"].weight.data.copy_(layer.lora_B)
    return ours, theirs


def test_inject_lora_matches_peft_logits_and_gradients(smollm2, batch):
    model, _ = smollm2
    ours, theirs = _ours_and_peft(model)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out_ours = ours(input_ids=ids, attention_mask=mask, labels=ids)
    out_theirs = theirs(input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=1e-5, atol=1e-4)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    modules = dict(theirs.named_modules())
    for name, layer in lora_layers(ours):
        peft_layer = modules[f"base_model.model.{name}"]
        torch.testing.assert_close(layer.lora_A.grad, peft_layer.lora_A["default"].weight.grad,
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad,
                                   rtol=1e-4, atol=1e-6)


def test_all_linear_on_the_real_model_is_peft_s_210_layers(smollm2):
    model, _ = smollm2
    ours = inject_lora(copy.deepcopy(model), LoraConfig(r=2, target_modules="all-linear"))
    names = [n for n, _ in lora_layers(ours)]
    assert len(names) == 30 * len(LLAMA_LINEARS) == 210
    assert {n.rsplit(".", 1)[-1] for n in names} == set(LLAMA_LINEARS)


def test_peft_adapter_round_trip_on_the_real_model(smollm2, batch, tmp_path):
    model, _ = smollm2
    ours, _ = _ours_and_peft(model)
    ids = batch["input_ids"]
    save_peft_adapter(ours, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter")
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-4)
    loaded.save_pretrained(tmp_path / "from_peft")
    back = load_peft_adapter(copy.deepcopy(model), tmp_path / "from_peft")
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-4)


#: Merging adds s·BA to W0 in float32; the logits may move by rounding only.
MERGE_LOGIT_DRIFT = 1e-3


def test_merge_on_the_real_model_stays_within_the_stated_drift(smollm2, batch):
    model, _ = smollm2
    ours, _ = _ours_and_peft(model, targets=LLAMA_LINEARS)
    ids = batch["input_ids"]
    with torch.no_grad():
        before = ours(input_ids=ids).logits
        merge_lora(ours)
        after = ours(input_ids=ids).logits
    assert all(layer.merged for _, layer in lora_layers(ours))
    drift = (after - before).abs().max().item()
    assert drift < MERGE_LOGIT_DRIFT
    with torch.no_grad():
        base = model(input_ids=ids).logits
    assert (after - base).abs().max().item() > 100 * drift  # the adapter did change the model


def test_a_few_lora_steps_change_only_lora_weights(smollm2, batch):
    model, _ = smollm2
    seed_all(0)
    tuned = inject_lora(copy.deepcopy(model), LoraConfig(r=4, target_modules="all-linear"))
    before = {n: p.detach().clone() for n, p in tuned.named_parameters()}
    params = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    ids = batch["input_ids"]
    for _ in range(2):
        optimizer.zero_grad()
        tuned(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(("lora_A", "lora_B")) for n in changed)
    assert any(n.endswith("lora_A") for n in changed)  # B moved at step 1, A from step 2
