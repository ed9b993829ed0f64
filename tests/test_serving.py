"""lora_edu.serving: many adapters in one batch, adapter switching, bottleneck adapters."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lora_edu.lora import LoRALinear
from lora_edu.repro import seed_all
from lora_edu.serving import (AdapterSwitcher, BottleneckAdapter, MultiLoRALinear,
                              add_bottleneck_adapters, inject_multi_lora, set_adapter_ids)


def integer_layers(n: int = 5, d: int = 12, k: int = 16) -> dict[str, LoRALinear]:
    """LoRA layers on one base with small integer weights and power-of-two scalings: every
    product and sum is then exact in float32, so batched and per-request results must be
    bit-for-bit equal whatever order the kernels sum in."""
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(k, d)
    with torch.no_grad():
        base.weight.copy_(torch.randint(-3, 4, (d, k), generator=gen))
        base.bias.copy_(torch.randint(-3, 4, (d,), generator=gen))
    layers = {}
    for i in range(n):
        layer = LoRALinear(copy.deepcopy(base), r=1 + i, lora_alpha=2.0 ** (i - 1) * (1 + i))
        with torch.no_grad():  # ranks differ on purpose: padding must not change a thing
            layer.lora_A.copy_(torch.randint(-2, 3, layer.lora_A.shape, generator=gen))
            layer.lora_B.copy_(torch.randint(-2, 3, layer.lora_B.shape, generator=gen))
        layers[f"task{i}"] = layer
    return layers


def per_request(layers: dict[str, LoRALinear], x: torch.Tensor, ids: list[str]) -> torch.Tensor:
    return torch.stack([layers[a](x[i]) for i, a in enumerate(ids)])


IDS = ["task3", "task0", "task3", "task4", "task1", "task2", "task0", "task4"]


@pytest.mark.parametrize("mode", ["batched", "loop"])
def test_multi_adapter_equals_per_request_exactly(mode: str) -> None:
    layers = integer_layers()
    multi = MultiLoRALinear.from_lora_layers(layers)
    x = torch.randint(-3, 4, (len(IDS), 6, 16)).float()
    multi.set_ids(IDS)
    multi.mode = mode
    assert torch.equal(multi(x), per_request(layers, x, IDS))


def test_multi_adapter_random_values_close_and_indices_accepted() -> None:
    seed_all(0)
    base = nn.Linear(16, 12)
    layers = {f"a{i}": LoRALinear(copy.deepcopy(base), r=4, init_lora_weights=False)
              for i in range(3)}
    multi = MultiLoRALinear.from_lora_layers(layers)
    x = torch.randn(4, 16)  # (batch, k) without a sequence axis works too
    multi.set_ids(torch.tensor([2, 0, 1, 2]))
    torch.testing.assert_close(multi(x), per_request(layers, x, ["a2", "a0", "a1", "a2"]))
    multi.set_ids(None)
    assert torch.equal(multi(x), base(x))


def test_unknown_adapter_id_is_refused_and_nothing_changes() -> None:
    model = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 16))
    layers = integer_layers()
    adapters = {n: (lay.lora_A, lay.lora_B, lay.scaling) for n, lay in layers.items()}
    model[0] = MultiLoRALinear(model[0], adapters)
    model[1] = MultiLoRALinear(model[1], {n: (torch.ones(2, 12), torch.ones(16, 2), 1.0)
                                          for n in layers})
    set_adapter_ids(model, IDS[:2])
    before = [m._ids.clone() for m in model]
    with pytest.raises(ValueError, match=r"unknown adapter id\(s\) \['nope'\].*task0"):
        set_adapter_ids(model, ["task0", "nope"])
    assert all(torch.equal(m._ids, b) for m, b in zip(model, before))
    with pytest.raises(ValueError, match="out of range"):
        set_adapter_ids(model, [0, 5])
    with pytest.raises(TypeError, match="names .str. or indices"):
        set_adapter_ids(model, [0.5])  # type: ignore[list-item]
    assert all(torch.equal(m._ids, b) for m, b in zip(model, before))


def test_batch_size_must_match_ids() -> None:
    multi = MultiLoRALinear.from_lora_layers(integer_layers())
    multi.set_ids(IDS[:3])
    with pytest.raises(ValueError, match="one id per request"):
        multi(torch.zeros(4, 2, 16))


def test_bad_factor_shapes_and_merged_layers_are_refused() -> None:
    with pytest.raises(ValueError, match="expected A of shape"):
        MultiLoRALinear(nn.Linear(16, 12), {"x": (torch.zeros(2, 15), torch.zeros(12, 2), 1.0)})
    layers = integer_layers(2)
    layers["task1"].merge()
    with pytest.raises(ValueError, match="merged"):
        MultiLoRALinear.from_lora_layers(layers)


def test_inject_multi_lora_into_a_model_matches_dense() -> None:
    seed_all(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    ref = copy.deepcopy(model)
    A, B = torch.randn(2, 8), torch.randn(8, 2)
    inject_multi_lora(model, {"0": {"t": (A, B, 0.5)}})
    set_adapter_ids(model, ["t", "t"])
    x = torch.randn(2, 8)
    with torch.no_grad():
        ref[0].weight += 0.5 * B @ A
    torch.testing.assert_close(model(x), ref(x))
    with pytest.raises(ValueError, match="not nn.Linear"):
        inject_multi_lora(model, {"1": {"t": (A, B, 0.5)}})


def test_bottleneck_adapter_starts_as_identity_and_is_inserted() -> None:
    from lora_edu.models import GPT, gpt_config

    seed_all(0)
    gpt = GPT(gpt_config("tiny")).eval()
    idx = torch.randint(0, 256, (2, 8))
    out = gpt(idx)
    add_bottleneck_adapters(gpt, bottleneck=4)
    assert sum(isinstance(m, BottleneckAdapter) for m in gpt.modules()) == 2 * 2
    torch.testing.assert_close(gpt(idx), out)
    with pytest.raises(ValueError, match="bottleneck must be a positive int"):
        BottleneckAdapter(8, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_unmerge_drifts_but_switcher_does_not(dtype: torch.dtype) -> None:
    seed_all(0)
    layer = nn.Linear(64, 64).to(dtype)
    w0 = layer.weight.detach().clone()
    deltas = {"a": 0.01 * torch.randn(64, 64), "b": 0.01 * torch.randn(64, 64)}
    with torch.no_grad():  # naive: W += ΔW_a; W -= ΔW_a; W += ΔW_b; ... all rounded to dtype
        for _ in range(20):
            for d in deltas.values():
                layer.weight.copy_((layer.weight.float() + d).to(dtype))
                layer.weight.copy_((layer.weight.float() - d).to(dtype))
    assert not torch.equal(layer.weight, w0)  # rounding piled up
    with torch.no_grad():
        layer.weight.copy_(w0)
    switcher = AdapterSwitcher(layer, deltas)
    for _ in range(20):
        switcher.switch("a")
        switcher.switch("b")
    assert torch.equal(layer.weight, (w0.float() + deltas["b"]).to(dtype))
    switcher.switch(None)
    assert torch.equal(layer.weight, w0)
    with pytest.raises(ValueError, match="unknown adapter 'c'"):
        switcher.switch("c")
    assert torch.equal(layer.weight, w0)


def test_interleaved_timings_counts_rounds_and_restores_threads() -> None:
    from lora_edu.serving import interleaved_timings

    calls = {"a": 0, "b": 0}

    def bump(name: str):
        return lambda: calls.__setitem__(name, calls[name] + 1)

    threads = torch.get_num_threads()
    times = interleaved_timings({"a": bump("a"), "b": bump("b")}, repeats=4, warmup=1,
                                clock="thread")
    assert calls == {"a": 5, "b": 5} and all(len(t) == 4 for t in times.values())
    assert all(v >= 0 for t in times.values() for v in t)
    assert torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="clock must be"):
        interleaved_timings({"a": bump("a")}, clock="cpu")


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), r=st.integers(1, 5), batch=st.integers(1, 9),
       tokens=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_property_batched_equals_loop_and_dense_formula(n: int, r: int, batch: int,
                                                        tokens: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(7, 5)
    adapters = {f"a{i}": (torch.randn(r, 7, generator=gen), torch.randn(5, r, generator=gen),
                          float(i + 1)) for i in range(n)}
    multi = MultiLoRALinear(base, adapters)
    ids = torch.randint(0, n, (batch,), generator=gen)
    x = torch.randn(batch, tokens, 7, generator=gen)
    multi.set_ids(ids)
    with torch.no_grad():
        batched = multi(x)
        multi.mode = "loop"
        looped = multi(x)
        dense = torch.stack([x[i] @ (base.weight + s * B @ A).T + base.bias
                             for i, (A, B, s) in
                             ((i, adapters[f"a{int(a)}"]) for i, a in enumerate(ids))])
    torch.testing.assert_close(batched, looped, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batched, dense, atol=1e-4, rtol=1e-4)
