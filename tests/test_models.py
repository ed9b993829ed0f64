"""The small GPT: shapes, the causal mask, attention against a hand-written reference,
sampling, checkpoints (including the one shipped in the package) and bad input."""

from __future__ import annotations

import hashlib
import json
import math
from importlib import resources

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_edu.models import (GPT, PRESETS, GPTConfig, count_bytes, generate, gpt_config,
                             load_checkpoint, load_pretrained, save_checkpoint)



@pytest.fixture
def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(gpt_config("tiny")).eval()


def test_logits_shape_and_layer_names(tiny: GPT) -> None:
    idx = torch.randint(0, 256, (3, 17))
    assert tiny(idx).shape == (3, 17, 256)
    linear_names = {n.rsplit(".", 1)[-1] for n, m in tiny.named_modules()
                    if isinstance(m, torch.nn.Linear)}
    assert linear_names == {"q", "k", "v", "o", "fc1", "fc2", "lm_head"}
    d, f = tiny.config.d_model, tiny.config.d_ff
    block = tiny.blocks[0]
    assert block.attn.q.weight.shape == (d, d)  # W_q ∈ R^{d×k} with d = k = d_model
    assert block.mlp.fc1.weight.shape == (f, d) and block.mlp.fc2.weight.shape == (d, f)


@settings(max_examples=15, deadline=None)
@given(t=st.integers(0, 30), seed=st.integers(0, 2**16))
def test_no_position_sees_the_future(t: int, seed: int) -> None:
    torch.manual_seed(seed)
    model = GPT(gpt_config("tiny")).eval()
    idx = torch.randint(0, 256, (2, 32))
    changed = idx.clone()
    changed[:, t + 1:] = torch.randint(0, 256, changed[:, t + 1:].shape)
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=1e-5)


def test_attention_matches_explicit_masked_softmax(tiny: GPT) -> None:
    attn = tiny.blocks[0].attn
    x = torch.randn(2, 9, tiny.config.d_model)
    b, t, d = x.shape
    h = attn.n_head

    def heads(z: torch.Tensor) -> torch.Tensor:
        return z.view(b, t, h, d // h).transpose(1, 2)

    q, k, v = heads(attn.q(x)), heads(attn.k(x)), heads(attn.v(x))
    scores = q @ k.transpose(-2, -1) / math.sqrt(d // h)
    future = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    weights = F.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    expected = attn.o((weights @ v).transpose(1, 2).reshape(b, t, d))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


def test_presets_and_bad_configs() -> None:
    assert gpt_config("cpu") == PRESETS["cpu"]
    assert gpt_config("cpu", n_layer=2).n_layer == 2
    with pytest.raises(ValueError, match="unknown preset 'huge'.*cpu"):
        gpt_config("huge")
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="n_layer must be a positive int"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="unknown GPTConfig field"):
        GPTConfig.from_dict({"n_layers": 2})
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT({"n_layer": 2})  # type: ignore[arg-type]


def test_sequence_longer_than_context_is_refused(tiny: GPT) -> None:
    block = tiny.config.block_size
    with pytest.raises(ValueError, match=f"exceeds the model's context block_size={block}"):
        tiny(torch.zeros(1, block + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor of shape"):
        tiny(torch.zeros(4, 3))


def test_generate_is_reproducible_and_crops_to_context(tiny: GPT) -> None:
    prompt = torch.randint(0, 256, (2, 30))
    a = generate(tiny, prompt, 10, top_k=5, generator=torch.Generator().manual_seed(1))
    b = generate(tiny, prompt, 10, top_k=5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 40) and torch.equal(a, b) and torch.equal(a[:, :30], prompt)
    with pytest.raises(ValueError, match="temperature"):
        generate(tiny, prompt, 1, temperature=0.0)
    with pytest.raises(ValueError, match="top_k must be None"):
        generate(tiny, prompt, 1, top_k=0)


def test_count_bytes_equals_storage_bytes(tiny: GPT) -> None:
    params = list(tiny.parameters())
    assert count_bytes(params) == sum(p.untyped_storage().nbytes() for p in params)
    assert count_bytes([None, torch.zeros(3, dtype=torch.float16)]) == 6


def test_checkpoint_round_trip_and_config_mismatch(tiny: GPT, tmp_path) -> None:
    save_checkpoint(tiny, tmp_path / "m", {"note": "test"})
    loaded, meta = load_checkpoint(tmp_path / "m", config=tiny.config)
    assert meta == {"note": "test"}
    idx = torch.randint(0, 256, (1, 8))
    assert torch.equal(loaded.eval()(idx), tiny(idx))
    other = gpt_config("tiny", n_layer=3)
    with pytest.raises(ValueError, match=r"different config.*'n_layer': \(3, 2\)"):
        load_checkpoint(tmp_path / "m", config=other)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_checkpoint(tmp_path / "missing")


def test_checkpoint_whose_tensors_do_not_fit_is_refused(tiny: GPT, tmp_path) -> None:
    save_checkpoint(tiny, tmp_path / "m")
    record = json.loads((tmp_path / "m.json").read_text())
    record["config"]["d_ff"] = 64  # the JSON now lies about the tensors' shapes
    (tmp_path / "m.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="(?s)do not fit the config recorded.*size mismatch"):
        load_checkpoint(tmp_path / "m")


def test_packaged_checkpoint_loads_and_matches_its_record() -> None:
    model, meta = load_pretrained("gpt-cpu", config=gpt_config("cpu"))
    assert model.config == gpt_config("cpu")
    assets = resources.files("lora_edu") / "assets"
    weights = (assets / "gpt-cpu.safetensors").read_bytes()
    assert len(weights) < 5_000_000
    assert hashlib.sha256(weights).hexdigest() == meta["weights_sha256"]
    assert meta["recipe"]["steps"] == meta["history"]["train_steps"][-1]
    # Pretraining worked: the recorded source-domain loss is far below log(256) ≈ 5.55.
    assert meta["history"]["eval_loss"]["source"][-1] < 0.5 * math.log(256)
    with pytest.raises(ValueError, match="different config"):
        load_pretrained("gpt-cpu", config=gpt_config("tiny"))
    with pytest.raises(ValueError, match="unknown packaged checkpoint"):
        load_pretrained("gpt-xl")
