"""lora_edu.distributed: LoRA under DDP and FSDP2, in 2 real gloo processes on the CPU.

One spawn of 2 processes runs :mod:`lora_edu.distributed_run` on the tiny GPT and on a tiny
random ``LlamaForCausalLM`` (no hub); the processes write JSON and safetensors files, and the
assertions here read them: DDP's and FSDP2's gradients and AdamW step equal one process on the
combined batch (to 1e-6, while rank 0's own slice alone is off by more), the DDP hook's byte
count equals ``allreduce_bytes``, the sharded ``lora_state_dict`` equals the unsharded one, and
the adapter saved from the sharded model loads in PEFT and computes what ours does.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_edu.adapters import WEIGHTS_NAME, save_adapter
from lora_edu.distributed import (allreduce_bytes, lora_state_dict, shard_lora_model,
                                  single_process_group, step_traffic, training_bytes)
from lora_edu.distributed_run import build_base, logits_of, spawn, with_lora
from lora_edu.lora import LoraConfig, inject_lora
from lora_edu.models import GPT, gpt_config

MODELS = ("gpt-tiny", "llama-tiny")
TOL = 1e-6


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("dist")
    spawn([["--out", str(out / f"{m}.json"), "--model", m, "--batch", "2", "--seq", "16",
            "--r", "4"] for m in MODELS], world=2)
    return {m: json.loads((out / f"{m}.json").read_text()) for m in MODELS}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("engine", ["ddp_lora", "fsdp_lora"])
def test_gradients_and_step_equal_one_process(runs: dict, model: str, engine: str) -> None:
    res = runs[model]
    assert res["world_size"] == 2
    assert res["slice_only_grad_max_diff"] > 100 * TOL  # the check below can fail
    assert res[engine]["grad_max_diff"] <= TOL
    assert res[engine]["param_max_diff_after_step"] <= TOL
    assert abs(res[engine]["loss_mean_over_ranks"] - res["reference_loss"]) <= 1e-5
    assert res[engine]["frozen_params_without_grad"]


@pytest.mark.parametrize("model", MODELS)
def test_hook_bytes_equal_allreduce_bytes(runs: dict, model: str) -> None:
    res = runs[model]
    for engine in ("ddp_lora", "ddp_full"):
        assert res[engine]["hook_bytes"] == res[engine]["allreduce_bytes"] > 0
    assert res["ddp_lora"]["allreduce_bytes"] == 4 * res["params_trainable_lora"]
    assert res["ddp_full"]["allreduce_bytes"] == 4 * res["ddp_full"]["params_trainable"]


@pytest.mark.parametrize("model", MODELS)
def test_fsdp_shards_everything_in_halves(runs: dict, model: str) -> None:
    res = runs[model]
    assert res["fsdp_lora"]["params_are_dtensors"]
    for sharded, one in (("fsdp_lora", "one_rank_lora_bytes"),
                         ("fsdp_full", "one_rank_full_bytes")):
        ranks = res[sharded]["per_rank_bytes"]
        for key in ("params", "grads", "optimizer"):
            assert sum(r[key] for r in ranks) == res[one][key]
            assert max(r[key] for r in ranks) < res[one][key]
    # The formulas of the chapter's "on paper" section, in float32 as measured.
    n_lora = res["params_trainable_lora"]
    n_base = res["params_total"] - n_lora
    for method, sharded in (("lora", "fsdp_lora"), ("full", "fsdp_full")):
        paper = training_bytes(n_base, n_lora, method, "fsdp", 2, precision="fp32")
        measured = res[sharded]["per_rank_bytes"][0]
        assert paper["weights"] == measured["params"]
        assert paper["grads"] == measured["grads"]
        assert paper["optimizer"] == measured["optimizer"]
    assert step_traffic(n_base, n_lora, "lora", "ddp", 2, "fp32") == \
        res["ddp_lora"]["hook_bytes"]  # 2(N-1)/N = 1 at N = 2
    # FSDP2's default: the blocks gathered twice (forward, backward), the root once (it is not
    # resharded after forward); LoRA grads scattered once
    traffic = res["fsdp_lora"]["traffic"]
    weights = res["one_rank_lora_bytes"]["params"]
    root = traffic["root_weight_bytes"]
    assert traffic["block_weight_bytes"] + root == weights and root > 0
    assert traffic["gathered"] == 2 * weights - root
    assert traffic["reduce_scattered"] == res["ddp_lora"]["allreduce_bytes"]
    n_root = root // 4  # float32
    by = res["fsdp_lora"]["traffic_by_reshard"]
    assert by["default"]["gathered"] == traffic["gathered"]
    assert by["true"]["gathered"] == 2 * weights and by["false"]["gathered"] == weights
    for key, flag in (("default", None), ("true", True), ("false", False)):
        assert step_traffic(n_base, n_lora, "lora", "fsdp", 2, "fp32", n_root=n_root,
                            reshard_after_forward=flag) == \
            (by[key]["gathered"] + by[key]["reduce_scattered"]) / 2


@pytest.mark.parametrize("model", MODELS)
def test_saving_without_gathering_is_refused(runs: dict, model: str) -> None:
    saving = runs[model]["fsdp_lora"]["saving_without_gathering"]
    fsdp1 = saving["fsdp1"]
    n = 2 * runs[model]["lora_layers"]
    for census in fsdp1["per_rank"]:  # FSDP1's views: empty or 1-D, never the tensor
        assert census["whole"] == census["partial_2d"] == 0
        assert census["empty"] + census["one_d"] == n and census["empty"] > 0
    assert "torch.Size([0])" in fsdp1["refused"] or "flat slice" in fsdp1["refused"]
    assert "FSDP1" in fsdp1["lora_state_dict_refused"]
    for census in saving["fsdp2"]["per_rank"]:  # FSDP2's to_local(): this rank's rows
        assert census["partial_2d"] == n and census["whole"] == 0
    assert "one rank's rows" in saving["fsdp2"]["refused"]


@pytest.mark.parametrize("model", MODELS)
def test_sharded_state_dict_equals_unsharded(runs: dict, model: str) -> None:
    res = runs[model]
    files = Path(res["files"])
    sharded = load_file(str(files / "lora_state_sharded.safetensors"))
    unsharded = load_file(str(files / "lora_state_unsharded.safetensors"))
    assert sharded.keys() == unsharded.keys() and len(sharded) == 2 * res["lora_layers"]
    for key in sharded:
        assert torch.equal(sharded[key], unsharded[key]), key
    assert res["fsdp_lora"]["merged_logits_max_diff"] <= 1e-4
    assert not res["fsdp_lora"]["merged_has_lora"]


def test_adapter_saved_from_sharded_model_loads_in_peft(runs: dict) -> None:
    peft = pytest.importorskip("peft")
    res = runs["llama-tiny"]
    state = load_file(str(Path(res["files"]) / "lora_state_sharded.safetensors"))
    base, targets, vocab = build_base("llama-tiny", 0)
    ours = with_lora(copy.deepcopy(base), targets, res["r"], 0)
    ours.load_state_dict(state, strict=False)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), res["peft_adapter_dir"])
    x = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = logits_of(base, x)
        mine, peft_out = logits_of(ours, x), logits_of(theirs, x)
    assert (mine - plain).abs().max() > 1e-4  # the adapter does change the output
    torch.testing.assert_close(peft_out, mine, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- one process


def lora_gpt(**config: object) -> GPT:
    torch.manual_seed(0)
    return inject_lora(GPT(gpt_config("tiny")), LoraConfig(r=4, target_modules=["q", "v"],
                                                           **config))


def test_lora_state_dict_has_save_adapter_keys(tmp_path: Path) -> None:
    for bias in ("none", "lora_only", "all"):
        model = lora_gpt(bias=bias)
        save_adapter(model, tmp_path / bias)
        saved = load_file(str(tmp_path / bias / WEIGHTS_NAME))
        state = lora_state_dict(model)
        assert state.keys() == saved.keys()
        assert all(torch.equal(state[k], saved[k]) and state[k].device.type == "cpu"
                   for k in saved)


def test_allreduce_bytes_counts_trainable_parameters() -> None:
    model = lora_gpt()
    assert allreduce_bytes(model) == 4 * sum(p.numel() for p in model.parameters()
                                             if p.requires_grad)
    assert allreduce_bytes(GPT(gpt_config("tiny"))) == 4 * sum(
        p.numel() for p in GPT(gpt_config("tiny")).parameters())


def test_shard_needs_a_process_group() -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard_lora_model(lora_gpt())


def test_shard_refuses_a_model_without_lora() -> None:
    with single_process_group(), pytest.raises(ValueError, match="no LoRA layers"):
        shard_lora_model(GPT(gpt_config("tiny")))
    with pytest.raises(ValueError, match="no LoRA"):
        lora_state_dict(GPT(gpt_config("tiny")))


def test_shard_refuses_mixed_trainable_dtypes_and_changes_nothing() -> None:
    from torch.distributed.fsdp import FSDPModule

    torch.manual_seed(0)
    model = inject_lora(GPT(gpt_config("tiny")).to(torch.bfloat16),
                        LoraConfig(r=4, target_modules=["q", "v"], bias="lora_only"))
    with single_process_group():
        with pytest.raises(ValueError, match=r"blocks\.0 mixes.*blocks\.0\.attn\.q\.base\.bias"
                                             r".*p\.data = p\.data\.float\(\)"):
            shard_lora_model(model)
        assert not any(isinstance(m, FSDPModule) for m in model.modules())
        for p in model.parameters():  # the fix from the message
            if p.requires_grad:
                p.data = p.data.float()
        shard_lora_model(model)  # a frozen bf16 base with fp32 trainables is fine
        assert isinstance(model, FSDPModule)
        with pytest.raises(ValueError, match="already sharded"):
            shard_lora_model(model)


def test_check_adapter_state_names_each_failure() -> None:
    from lora_edu.distributed import check_adapter_state

    model = lora_gpt()
    good = lora_state_dict(model)
    check_adapter_state(model, good)  # the gathered adapter passes
    key = "blocks.0.attn.q.lora_B"
    for bad, message in ((torch.empty(0), r"torch\.Size\(\[0\]\)"),
                         (good[key].flatten()[:10], "flat slice"),
                         (good[key][: good[key].shape[0] // 2], "one rank's rows")):
        with pytest.raises(ValueError, match=message + ".*Gather before saving"):
            check_adapter_state(model, {**good, key: bad})
    with pytest.raises(ValueError, match="is missing"):
        check_adapter_state(model, {k: v for k, v in good.items() if k != key})
    with pytest.raises(ValueError, match="not part of"):
        check_adapter_state(model, {**good, "blocks.9.lora_A": good[key]})


def test_fsdp1_needs_lora_in_its_own_units() -> None:
    import warnings

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

    from lora_edu.distributed import is_fsdp1, lora_wrap_policy

    with single_process_group(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="uniform"):
            FSDP1(lora_gpt(), use_orig_params=False, device_id=torch.device("cpu"))
        model = lora_gpt()
        wrapped = FSDP1(model, auto_wrap_policy=lora_wrap_policy(model),
                        use_orig_params=False, device_id=torch.device("cpu"))
        assert is_fsdp1(wrapped)
        units = [m for m in wrapped.modules() if isinstance(m, FSDP1)]
        blocks = len(model.blocks)
        assert len(units) == 1 + blocks + 2 * 2 * blocks  # root, blocks, LoRA layers, bases
        wrapped(torch.randint(0, 64, (2, 8))).sum().backward()
        with pytest.raises(ValueError, match="FSDP1"):
            lora_state_dict(wrapped)


def test_shard_uses_fsdp2_default_resharding() -> None:
    with single_process_group():
        model = shard_lora_model(lora_gpt())
        model(torch.randint(0, 64, (2, 8)))
        root = model._get_fsdp_state()._fsdp_param_group
        block = model.blocks[0]._get_fsdp_state()._fsdp_param_group
        assert root.post_forward_mesh_info is None  # root: not resharded after forward
        assert block.post_forward_mesh_info is not None
        with pytest.raises(TypeError, match="reshard_after_forward"):
            shard_lora_model(lora_gpt(), reshard_after_forward=2)


def test_paper_formulas() -> None:
    p, t = 7_000_000_000, 40_000_000
    full = training_bytes(p, t, "full", "ddp", 8)
    assert full["total"] == 16 * p
    assert training_bytes(p, t, "full", "fsdp", 8)["total"] == 2 * p
    assert training_bytes(p, t, "lora", "ddp", 1)["total"] == 2 * p + 16 * t
    assert training_bytes(p, t, "qlora", "fsdp", 2)["weights"] < training_bytes(
        p, t, "lora", "fsdp", 2)["weights"] / 3
    assert step_traffic(p, t, "lora", "ddp", 1) == 0
    assert step_traffic(p, t, "lora", "fsdp", 8) > step_traffic(p, t, "lora", "ddp", 8)
    with pytest.raises(ValueError, match="method"):
        training_bytes(p, t, "dora", "ddp", 2)
    # QLoRA keeps the embeddings, norms and output layer in bf16
    u = 500_000_000
    q = training_bytes(p, t, "qlora", "ddp", 1, n_unquantized=u)["weights"]
    assert q == (p - u) * (4 + 0.127) / 8 + 2 * u + 4 * t
    with pytest.raises(ValueError, match="n_unquantized"):
        training_bytes(p, t, "lora", "ddp", 1, n_unquantized=u)
    # FSDP traffic: root kept (default), every unit resharded, none resharded
    w, g, f = 2 * p + 4 * t, 4 * t, 7 / 8
    assert step_traffic(p, t, "lora", "fsdp", 8, reshard_after_forward=True) == f * (2 * w + g)
    assert step_traffic(p, t, "lora", "fsdp", 8, reshard_after_forward=False) == f * (w + g)
    assert step_traffic(p, t, "lora", "fsdp", 8, n_root=u) == f * (2 * w - 2 * u + g)


def test_lora_state_dict_keeps_buffers_of_modules_to_save(tmp_path: Path) -> None:
    """A module to save is saved whole, buffers included (BatchNorm's running statistics)."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("q", nn.Linear(8, 8))
    model.add_module("head", nn.BatchNorm1d(8))
    model = inject_lora(model, LoraConfig(r=2, target_modules=["q"], modules_to_save=["head"]))
    model.train()
    model(torch.randn(16, 8))  # moves the running statistics off their initial values
    save_adapter(model, tmp_path)
    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    state = lora_state_dict(model)
    assert state.keys() == saved.keys()
    assert any(k.endswith("running_mean") for k in state)
    assert all(torch.equal(state[k], saved[k]) for k in saved)
