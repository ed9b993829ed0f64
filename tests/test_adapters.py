"""Tests of lora_edu.adapters: round trips in both layouts; refusals leave the model as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save_file
from torch import nn

from lora_edu.adapters import (CONFIG_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, WEIGHTS_NAME,
                               _from_peft_key, _to_peft_key, load_adapter, load_peft_adapter,
                               save_adapter, save_peft_adapter)
from lora_edu.lora import LoraConfig, disable_adapters, inject_lora, lora_layers, merge_lora
from lora_edu.repro import seed_all


class Block(nn.Module):
    def __init__(self, dim: int = 12) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.q(x) * self.k(x) + self.v(x))


def base_model() -> nn.Module:
    seed_all(0)  # the same "pretrained" weights every time
    return nn.Sequential(Block(), Block())


def trained(config: LoraConfig) -> nn.Module:
    """A model whose trainable parameters moved away from their initial values."""
    model = inject_lora(base_model(), config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def snapshot(model: nn.Module) -> tuple[str, dict[str, torch.Tensor], dict[str, bool]]:
    return (str(model), {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_unchanged(model: nn.Module, snap: tuple) -> None:
    text, tensors, grads = snap
    assert str(model) == text
    now = model.state_dict()
    assert now.keys() == tensors.keys()
    assert all(torch.equal(now[k], tensors[k]) for k in tensors)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def load_file(path: str) -> dict[str, torch.Tensor]:
    """Read into memory (not memory-mapped) so the file can be overwritten afterwards."""
    return load(Path(path).read_bytes())


X = torch.randn(5, 12, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("bias, dora", [("none", False), ("lora_only", False), ("all", False),
                                        ("none", True)])
@pytest.mark.parametrize("fmt", ["lora_edu", "peft"])
def test_round_trip_into_a_bare_model(tmp_path: Path, bias: str, dora: bool, fmt: str) -> None:
    model = trained(LoraConfig(r=3, lora_alpha=6, bias=bias, target_modules=["q", "v"],
                               use_dora=dora))
    save, load = (save_adapter, load_adapter) if fmt == "lora_edu" else (save_peft_adapter,
                                                                         load_peft_adapter)
    save(model, tmp_path)
    fresh = load(base_model(), tmp_path)
    assert torch.equal(fresh(X), model(X))
    assert [n for n, _ in lora_layers(fresh)] == ["0.q", "0.v", "1.q", "1.v"]
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


def test_files_are_safetensors_and_json(tmp_path: Path) -> None:
    model = trained(LoraConfig(r=2, target_modules=["q"]))
    save_adapter(model, tmp_path / "own")
    save_peft_adapter(model, tmp_path / "peft")
    names = sorted(p.name for p in (tmp_path / "own").iterdir())
    assert names == sorted([WEIGHTS_NAME, CONFIG_NAME])
    own = load_file(str(tmp_path / "own" / WEIGHTS_NAME))
    assert set(own) == {"0.q.lora_A", "0.q.lora_B", "1.q.lora_A", "1.q.lora_B"}
    peft_keys = set(load_file(str(tmp_path / "peft" / PEFT_WEIGHTS_NAME)))
    assert peft_keys == {f"base_model.model.{i}.q.lora_{ab}.weight" for i in "01" for ab in "AB"}
    cfg = json.loads((tmp_path / "peft" / PEFT_CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["target_modules"] == ["q"]


def test_load_into_an_injected_model(tmp_path: Path) -> None:
    config = LoraConfig(r=3, lora_alpha=6)
    model = trained(config)
    save_adapter(model, tmp_path)
    target = inject_lora(base_model(), config)
    assert not torch.equal(target(X), model(X))
    load_adapter(target, tmp_path)
    assert torch.equal(target(X), model(X))


def test_rslora_round_trip(tmp_path: Path) -> None:
    model = trained(LoraConfig(r=4, lora_alpha=8, use_rslora=True))
    save_peft_adapter(model, tmp_path)
    fresh = load_peft_adapter(base_model(), tmp_path)
    assert all(layer.scaling == 4.0 for _, layer in lora_layers(fresh))
    assert torch.equal(fresh(X), model(X))


# --------------------------------------------------------------------------- refusals

@pytest.fixture
def saved(tmp_path: Path) -> Path:
    save_adapter(trained(LoraConfig(r=3, lora_alpha=6)), tmp_path)
    return tmp_path


def test_wrong_rank_for_an_injected_model(saved: Path) -> None:
    model = inject_lora(base_model(), LoraConfig(r=5, lora_alpha=6))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="r=3.*r=5"):
        load_adapter(model, saved)
    assert_unchanged(model, snap)


def test_tensor_rank_differs_from_config(saved: Path) -> None:
    tensors = load_file(str(saved / WEIGHTS_NAME))
    tensors["0.q.lora_A"] = torch.zeros(2, 12)
    save_file(tensors, str(saved / WEIGHTS_NAME))
    model = base_model()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"0\.q\.lora_A has shape \(2, 12\).*rank-2"):
        load_adapter(model, saved)
    assert_unchanged(model, snap)


def test_wrong_shape_for_this_model(saved: Path) -> None:
    model = nn.Sequential(Block(dim=16), Block(dim=16))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="expected"):
        load_adapter(model, saved)
    assert_unchanged(model, snap)


def test_missing_and_extra_keys(saved: Path) -> None:
    tensors = load_file(str(saved / WEIGHTS_NAME))
    tensors["2.q.lora_A"] = tensors.pop("1.v.lora_B")
    save_file(tensors, str(saved / WEIGHTS_NAME))
    model = base_model()
    snap = snapshot(model)
    expected = r"missing keys \['1\.v\.lora_B'\].*unexpected keys \['2\.q"
    with pytest.raises(ValueError, match=expected):
        load_adapter(model, saved)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("content", [b"not a safetensors file", b"\x00" * 64, b""])
def test_not_a_safetensors_file(saved: Path, content: bytes) -> None:
    (saved / WEIGHTS_NAME).write_bytes(content)
    model = base_model()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_adapter(model, saved)
    assert_unchanged(model, snap)


def test_pickle_is_refused(saved: Path) -> None:
    torch.save(load_file(str(saved / WEIGHTS_NAME)), saved / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="safetensors"):
        load_adapter(base_model(), saved)


def test_bad_config_files(saved: Path) -> None:
    model = base_model()
    snap = snapshot(model)
    (saved / CONFIG_NAME).write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(model, saved)
    (saved / CONFIG_NAME).write_text(json.dumps({"format": "lora_edu-adapter/1",
                                                 "config": {"r": 0}}))
    with pytest.raises(ValueError, match="r "):
        load_adapter(model, saved)
    (saved / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="load_peft_adapter"):
        load_adapter(model, saved)
    with pytest.raises(FileNotFoundError):
        load_adapter(model, saved / "nowhere")
    assert_unchanged(model, snap)


def test_targets_that_do_not_exist(saved: Path) -> None:
    model = nn.Sequential(nn.Linear(12, 12))
    with pytest.raises(ValueError, match="matches no module"):
        load_adapter(model, saved)
    assert not list(lora_layers(model))


def test_merged_model_is_refused(saved: Path) -> None:
    model = merge_lora(inject_lora(base_model(), LoraConfig(r=3, lora_alpha=6)))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="unmerge_lora"):
        load_adapter(model, saved)
    assert_unchanged(model, snap)


def test_save_without_lora() -> None:
    with pytest.raises(ValueError, match="inject_lora"):
        save_adapter(base_model(), "/tmp/unused")


@pytest.mark.parametrize("field, value", [("lora_bias", True), ("rank_pattern", {"q": 4}),
                                          ("init_lora_weights", "olora"),
                                          ("peft_type", "IA3")])
def test_peft_options_we_do_not_implement(tmp_path: Path, field: str, value: object) -> None:
    save_peft_adapter(trained(LoraConfig(r=2)), tmp_path)
    cfg = json.loads((tmp_path / PEFT_CONFIG_NAME).read_text())
    cfg[field] = value
    (tmp_path / PEFT_CONFIG_NAME).write_text(json.dumps(cfg))
    model = base_model()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=field):
        load_peft_adapter(model, tmp_path)
    assert_unchanged(model, snap)


_segment = st.from_regex(r"[a-z_][a-z0-9_]{0,6}|[0-9]{1,2}", fullmatch=True).filter(
    lambda s: s not in ("base", "base_layer", "lora_A", "lora_B", "magnitude", "bias"))


@settings(max_examples=50, deadline=None)
@given(path=st.lists(_segment, min_size=1, max_size=4),
       leaf=st.sampled_from(["lora_A", "lora_B", "magnitude", "base.bias", "bias"]))
def test_property_peft_key_mapping_round_trips(path: list[str], leaf: str) -> None:
    key = ".".join([*path, leaf])
    peft_key = _to_peft_key(key)
    assert peft_key.startswith("base_model.model.")
    assert ".base." not in peft_key
    assert _from_peft_key(peft_key) == key


# --------------------------------------------------------------------------- modules_to_save

class Classifier(nn.Module):
    """Two blocks and a head with a buffer (BatchNorm's running statistics are saved too)."""

    def __init__(self, dim: int = 12) -> None:
        super().__init__()
        self.body = nn.Sequential(Block(dim), Block(dim))
        self.head = nn.Sequential(nn.BatchNorm1d(dim), nn.Linear(dim, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def classifier() -> nn.Module:
    seed_all(0)
    return Classifier().eval()


def trained_classifier() -> nn.Module:
    model = inject_lora(classifier(), LoraConfig(r=2, target_modules=["q", "v"],
                                                 modules_to_save=["head"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        model.head.modules_to_save["default"][0].running_mean.add_(0.5)  # a trained buffer
    return model


@pytest.mark.parametrize("fmt", ["lora_edu", "peft"])
def test_modules_to_save_round_trip(tmp_path: Path, fmt: str) -> None:
    model = trained_classifier()
    save, load_ = (save_adapter, load_adapter) if fmt == "lora_edu" else (save_peft_adapter,
                                                                          load_peft_adapter)
    save(model, tmp_path)
    loaded = load_(classifier(), tmp_path)
    torch.testing.assert_close(loaded(X), model(X))
    assert loaded.lora_config.modules_to_save == ["head"]
    with disable_adapters(loaded):
        torch.testing.assert_close(loaded(X), classifier()(X))


def test_peft_file_names_the_head_as_peft_does(tmp_path: Path) -> None:
    save_peft_adapter(trained_classifier(), tmp_path)
    keys = set(load_file(str(tmp_path / PEFT_WEIGHTS_NAME)))
    head = {k for k in keys if ".head." in k}
    assert head == {"base_model.model.head.0.weight", "base_model.model.head.0.bias",
                    "base_model.model.head.0.running_mean", "base_model.model.head.0.running_var",
                    "base_model.model.head.0.num_batches_tracked",
                    "base_model.model.head.1.weight", "base_model.model.head.1.bias"}
    assert json.loads((tmp_path / PEFT_CONFIG_NAME).read_text())["modules_to_save"] == ["head"]


def test_a_file_without_the_head_is_refused_and_the_model_untouched(tmp_path: Path) -> None:
    save_peft_adapter(trained_classifier(), tmp_path)
    tensors = load_file(str(tmp_path / PEFT_WEIGHTS_NAME))
    del tensors["base_model.model.head.1.weight"]
    save_file(tensors, str(tmp_path / PEFT_WEIGHTS_NAME))
    model = classifier()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="head.modules_to_save.default.1.weight"):
        load_peft_adapter(model, tmp_path)
    assert_unchanged(model, snap)


def test_peft_entries_that_match_nothing_are_dropped_on_load(tmp_path: Path) -> None:
    """PEFT writes ["classifier", "score"] for every sequence classifier; one never exists."""
    save_peft_adapter(trained_classifier(), tmp_path)
    cfg = json.loads((tmp_path / PEFT_CONFIG_NAME).read_text())
    cfg["modules_to_save"] = ["classifier", "head"]
    (tmp_path / PEFT_CONFIG_NAME).write_text(json.dumps(cfg))
    assert load_peft_adapter(classifier(), tmp_path).lora_config.modules_to_save == ["head"]


def test_loading_into_a_model_with_other_modules_to_save_is_refused(tmp_path: Path) -> None:
    save_adapter(trained_classifier(), tmp_path)
    model = inject_lora(classifier(), LoraConfig(r=2, target_modules=["q", "v"]))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="modules_to_save"):
        load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("module", ["head", "body.0.norm", "head.1"])
def test_property_saved_module_keys_round_trip(module: str) -> None:
    key = f"{module}.modules_to_save.default.weight"
    assert _to_peft_key(key) == f"base_model.model.{module}.weight"
    assert _from_peft_key(_to_peft_key(key), [module]) == key
