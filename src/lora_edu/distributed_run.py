"""One LoRA step under DDP and under FSDP2, checked against one process; results as JSON.

Run it with torchrun (every rank runs this file; rank 0 writes the results)::

    # 2 CPU processes with gloo (what chapter 10 runs)
    torchrun --standalone --nproc-per-node 2 -m lora_edu.distributed_run --out run.json
    # one node with 8 GPUs
    torchrun --standalone --nproc-per-node 8 -m lora_edu.distributed_run --backend nccl \\
        --out run.json
    # the book's real model (SmolLM2-135M) instead of the toy GPT
    torchrun --standalone --nproc-per-node 2 -m lora_edu.distributed_run --model smollm2 ...

What each rank does, in order (the same seed everywhere, so every rank builds the same model):

1. **reference** (rank 0): a plain copy trains one step on the *combined* batch of all ranks.
2. **DDP, LoRA**: each rank takes its slice of that batch; a communication hook counts the
   gradient bytes all-reduced; gradients, loss and the AdamW step are compared with 1.
3. **DDP, full fine-tuning**: the same model without LoRA, for the bytes it all-reduces.
4. **FSDP2, LoRA** (:func:`lora_edu.distributed.shard_lora_model`, FSDP2's default
   ``reshard_after_forward``): gradients and the step again; per-rank bytes of parameters,
   gradients and AdamW state; the bytes each collective moved, and again for
   ``reshard_after_forward=True`` and ``False``; the adapter gathered with
   :func:`~lora_edu.distributed.lora_state_dict`, saved in PEFT's layout, loaded into a fresh
   unsharded model, merged, and its logits compared with the sharded model's.
5. **Saving without gathering**: what each rank would save from FSDP1 (``use_orig_params=True``)
   and from FSDP2 (``to_local()``), and :func:`~lora_edu.distributed.check_adapter_state`
   refusing it.
6. **FSDP2, full fine-tuning**: per-rank bytes, for comparison.

The JSON holds every measured figure, the largest differences from the reference, the
predictions of :func:`~lora_edu.distributed.allreduce_bytes` and the timings. Files written
next to it (``<out stem>_files/``): the PEFT adapter, the sharded and the unsharded
``lora_state_dict`` as safetensors (tests compare them).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lora_edu.distributed import (AllreduceCounter, FSDPTrafficCounter, allreduce_bytes,
                                  check_adapter_state, find_blocks, lora_state_dict,
                                  rank_bytes, save_peft_adapter_sharded, shard_lora_model)
from lora_edu.lora import LoraConfig, count_parameters, inject_lora, lora_layers, merge_and_unload

MODELS = ("gpt", "gpt-tiny", "llama-tiny", "smollm2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lora_edu.distributed_run",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file for the results (rank 0 writes it)")
    p.add_argument("--backend", default="gloo", choices=("gloo", "nccl"),
                   help="gloo: CPU processes; nccl: one GPU per process")
    p.add_argument("--model", default="gpt", choices=MODELS,
                   help="gpt: the book's toy GPT (pretrained, packaged); gpt-tiny and "
                        "llama-tiny: random tiny models for tests; smollm2: the real model")
    p.add_argument("--batch", type=int, default=4, help="sequences per rank")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-full", action="store_true",
                   help="skip the full fine-tuning runs (for large models)")
    p.add_argument("--init-method", default="env://",
                   help="process-group rendezvous (torchrun sets env://)")
    p.add_argument("--rank", type=int, default=None, help="only without torchrun")
    p.add_argument("--world-size", type=int, default=None, help="only without torchrun")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- models and data

def build_base(name: str, seed: int) -> tuple[nn.Module, list[str], int]:
    """(model in fp32 eval mode, LoRA targets, vocabulary size); identical on every rank."""
    torch.manual_seed(seed)
    if name == "gpt":
        from lora_edu.models import load_pretrained
        model, _ = load_pretrained("gpt-cpu")
        return model, ["q", "v"], model.config.vocab_size
    if name == "gpt-tiny":
        from lora_edu.models import GPT, gpt_config
        model = GPT(gpt_config("tiny"))
        return model, ["q", "v"], model.config.vocab_size
    if name == "llama-tiny":
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64, tie_word_embeddings=False)
        return LlamaForCausalLM(cfg).eval(), ["q_proj", "v_proj"], cfg.vocab_size
    from lora_edu.pretrained import load_smollm2
    model, _ = load_smollm2()
    return model, ["q_proj", "v_proj"], model.config.vocab_size


def with_lora(model: nn.Module, targets: list[str], r: int, seed: int) -> nn.Module:
    """Inject LoRA; B gets small random values (as after some training) so that A's
    gradient is not zero (with B = 0 it would be: ∂L/∂A = s·Bᵀ(∂L/∂h)xᵀ)."""
    inject_lora(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.02)
    return model


def global_batch(name: str, vocab: int, n: int, seq: int, seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of shape (n, seq): real text for the GPT, random ids otherwise."""
    gen = torch.Generator().manual_seed(seed + 2)
    if name == "gpt":
        from lora_edu.data import load_corpus, random_batches
        tokens = load_corpus("python-docs").train
        return next(random_batches(tokens, n, seq, gen))
    ids = torch.randint(0, vocab, (n, seq + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats per token)."""
    out = model(x)
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return (out.logits if hasattr(out, "logits") else out).float()


# --------------------------------------------------------------------------- helpers

def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective), or the tensor itself; on CPU."""
    from torch.distributed.tensor import DTensor
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def max_diff(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor] | None) -> float | None:
    """max ``|ours − ref|`` over every tensor (rank 0 only: ref is None elsewhere)."""
    if ref is None:
        return None
    assert ours.keys() == ref.keys(), (sorted(ours)[:3], sorted(ref)[:3])
    return max((ours[k] - ref[k]).abs().max().item() for k in ref)


def global_mean(value: torch.Tensor, device: torch.device) -> float:
    """The mean over ranks of a scalar (each rank's loss on its slice)."""
    t = value.detach().reshape(1).to(device, torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).item()


def traffic_of_one_step(lora_model: nn.Module, mesh: Any, x: torch.Tensor, y: torch.Tensor,
                        reshard_after_forward: bool | None) -> dict[str, int]:
    """Bytes each FSDP2 collective moves in one forward and backward of a sharded copy."""
    m = shard_lora_model(copy.deepcopy(lora_model), mesh=mesh,
                         reshard_after_forward=reshard_after_forward)
    traffic = FSDPTrafficCounter.register(m)
    loss_fn(m, x, y).backward()
    return {"gathered": traffic.gathered, "all_gathers": traffic.all_gathers,
            "reduce_scattered": traffic.reduce_scattered,
            "reduce_scatters": traffic.reduce_scatters}


def refusal(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """:func:`check_adapter_state`'s message for ``state`` (None if it accepts it)."""
    try:
        check_adapter_state(model, state)
    except ValueError as err:
        return str(err)
    return None


def shape_census(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, Any]:
    """How many LoRA tensors of ``state`` are empty, 1-D, another shape, or whole."""
    want = {n: tuple(p.shape) for n, p in model.named_parameters()}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    return {"empty": sum(v.numel() == 0 for v in state.values()),
            "one_d": sum(v.dim() == 1 and v.numel() > 0 for v in state.values()),
            "partial_2d": sum(v.dim() == 2 and shapes[k] != want[k] for k, v in state.items()),
            "whole": sum(shapes[k] == want[k] for k in state),
            "examples": {k: list(shapes[k]) for k in sorted(state)[:4]}}


def saving_without_gathering(lora_model: nn.Module, sharded: nn.Module, x: torch.Tensor
                             ) -> dict[str, Any]:
    """What each rank would write if it saved its LoRA parameters as they are: from FSDP1
    with ``use_orig_params=True`` (views of its part of a flat buffer) and from FSDP2
    (``to_local()``: its rows); and the package's refusals."""
    import warnings

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

    world = dist.get_world_size()
    names = [n for n, p in lora_model.named_parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f1 = FSDP1(copy.deepcopy(lora_model), use_orig_params=True,
                   device_id=x.device if x.device.type == "cuda" else torch.device("cpu"))
        with torch.no_grad():
            f1(x)  # outside forward, the original parameters are views of this rank's shard
    prefix = "_fsdp_wrapped_module."
    fsdp1_state = {n.replace(prefix, ""): p.detach().cpu().clone()
                   for n, p in f1.named_parameters() if n.replace(prefix, "") in names}
    try:
        lora_state_dict(f1)
        fsdp1_refused = None
    except ValueError as err:
        fsdp1_refused = str(err)
    fsdp2_state = {n: p.detach().to_local().cpu().clone()
                   for n, p in sharded.named_parameters() if n in names}
    out: dict[str, Any] = {}
    for label, state in (("fsdp1", fsdp1_state), ("fsdp2", fsdp2_state)):
        census: list[Any] = [None] * world
        dist.all_gather_object(census, shape_census(state, lora_model))
        out[label] = {"per_rank": census, "refused": refusal(lora_model, state)}
    out["fsdp1"]["lora_state_dict_refused"] = fsdp1_refused
    del f1
    return out


def full_shard_all(model: nn.Module, mesh: Any) -> nn.Module:
    """fully_shard per block then root, for a model without LoRA (full fine-tuning)."""
    from torch.distributed.fsdp import fully_shard
    _, blocks = find_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# --------------------------------------------------------------------------- the run

def run(args: argparse.Namespace) -> dict[str, Any] | None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, world = dist.get_rank(), dist.get_world_size()
    gpu = args.backend == "nccl"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if gpu else \
        torch.device("cpu")
    # gloo needs a CPU mesh even where GPUs exist (pytorch#132471): say so explicitly.
    mesh = init_device_mesh(device.type, (world,))
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        dist.barrier()
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    base, targets, vocab = build_base(args.model, args.seed)
    base = base.to(device)
    lora_model = with_lora(copy.deepcopy(base), targets, args.r, args.seed)
    x, y = global_batch(args.model, vocab, world * args.batch, args.seq, args.seed)
    x, y = x.to(device), y.to(device)
    mine = slice(rank * args.batch, (rank + 1) * args.batch)
    xl, yl = x[mine], y[mine]
    n_trainable, n_total = count_parameters(lora_model)
    res: dict[str, Any] = {
        "world_size": world, "backend": args.backend, "device": str(device),
        "model": args.model, "torch": torch.__version__, "batch_per_rank": args.batch,
        "seq": args.seq, "r": args.r, "lr": args.lr, "lora_targets": targets,
        "params_total": n_total, "params_trainable_lora": n_trainable,
        "lora_layers": len(list(lora_layers(lora_model))),
    }
    lap("build")

    # 1. the reference: one process, the combined batch ----------------------------
    ref = {}
    if rank == 0:
        m = copy.deepcopy(lora_model)
        opt = torch.optim.AdamW(trainable(m).values(), lr=args.lr)
        loss = loss_fn(m, x, y)
        loss.backward()
        ref["loss"] = loss.item()
        ref["grads"] = {n: p.grad.detach().cpu().clone() for n, p in trainable(m).items()}
        opt.step()
        ref["params"] = {n: p.detach().cpu().clone() for n, p in trainable(m).items()}
        res["one_rank_lora_bytes"] = rank_bytes(m, opt)
        # What rank 0 alone would compute on its slice: how far off it is without the
        # all-reduce (so the 'max diff' checks below can fail).
        alone = copy.deepcopy(lora_model)
        loss_fn(alone, xl, yl).backward()
        res["slice_only_grad_max_diff"] = max_diff(
            {n: p.grad.detach().cpu() for n, p in trainable(alone).items()}, ref["grads"])
        del alone
        res["reference_loss"] = ref["loss"]
        del m, opt
    lap("reference")

    # 2. DDP with LoRA --------------------------------------------------------------
    m = copy.deepcopy(lora_model)
    ddp = DDP(m, device_ids=[device.index] if gpu else None)
    counter = AllreduceCounter.register(ddp)
    opt = torch.optim.AdamW(trainable(m).values(), lr=args.lr)
    loss = loss_fn(ddp, xl, yl)  # through DDP's forward, or its reducer never fires
    loss.backward()
    grads = {n: p.grad.detach().cpu() for n, p in trainable(m).items()}
    opt.step()
    res["ddp_lora"] = {
        "loss_mean_over_ranks": global_mean(loss, device),
        "hook_bytes": counter.bytes, "hook_buckets": counter.buckets,
        "allreduce_bytes": allreduce_bytes(ddp),
        "grad_max_diff": max_diff(grads, ref.get("grads")),
        "param_max_diff_after_step": max_diff(
            {n: p.detach().cpu() for n, p in trainable(m).items()}, ref.get("params")),
        "frozen_params_without_grad": all(p.grad is None for p in m.parameters()
                                          if not p.requires_grad),
    }
    unsharded_state = lora_state_dict(ddp)  # after the step: what FSDP's should equal
    del ddp, m, opt, counter
    lap("ddp_lora")

    # 3. DDP, full fine-tuning ------------------------------------------------------
    if not args.skip_full:
        m = copy.deepcopy(base).train()
        for p in m.parameters():
            p.requires_grad_(True)
        if rank == 0:
            one = copy.deepcopy(m)
            one_opt = torch.optim.AdamW(one.parameters(), lr=args.lr)
            loss_fn(one, x, y).backward()
            one_opt.step()
            res["one_rank_full_bytes"] = rank_bytes(one, one_opt)
            del one, one_opt
        ddp = DDP(m, device_ids=[device.index] if gpu else None)
        counter = AllreduceCounter.register(ddp)
        loss_fn(ddp, xl, yl).backward()
        res["ddp_full"] = {"hook_bytes": counter.bytes, "hook_buckets": counter.buckets,
                           "allreduce_bytes": allreduce_bytes(ddp),
                           "params_trainable": count_parameters(m)[0]}
        del ddp, m, counter
        lap("ddp_full")

    # 4. FSDP2 with LoRA -------------------------------------------------------------
    m = shard_lora_model(copy.deepcopy(lora_model), mesh=mesh)
    traffic = FSDPTrafficCounter.register(m)
    opt = torch.optim.AdamW(trainable(m).values(), lr=args.lr)
    loss = loss_fn(m, xl, yl)
    loss.backward()
    step_traffic = {"gathered": traffic.gathered, "all_gathers": traffic.all_gathers,
                    "reduce_scattered": traffic.reduce_scattered,
                    "reduce_scatters": traffic.reduce_scatters}
    _, blocks = find_blocks(m)
    block_ids = {id(p) for b in blocks for p in b.parameters()}
    step_traffic["block_weight_bytes"] = sum(p.numel() * p.element_size()
                                             for p in m.parameters() if id(p) in block_ids)
    step_traffic["root_weight_bytes"] = sum(p.numel() * p.element_size()
                                            for p in m.parameters() if id(p) not in block_ids)
    grads = {n: full(p.grad) for n, p in trainable(m).items()}
    opt.step()
    after = {n: full(p) for n, p in trainable(m).items()}
    sharded_state = lora_state_dict(m)
    saving = saving_without_gathering(lora_model, m, xl)
    # What saving the parameters as they are would store: this rank's rows only.
    first_b = next(n for n in sharded_state if n.endswith("lora_B"))
    shard = dict(m.named_parameters())[first_b]
    per_rank = rank_bytes(m, opt)
    all_ranks: list[Any] = [None] * world
    dist.all_gather_object(all_ranks, per_rank)
    files = Path(args.out).with_name(Path(args.out).stem + "_files")
    adapter_dir = save_peft_adapter_sharded(m, files / "peft_adapter")
    res["fsdp_lora"] = {
        "loss_mean_over_ranks": global_mean(loss, device),
        "grad_max_diff": max_diff(grads, ref.get("grads")),
        "param_max_diff_after_step": max_diff(after, ref.get("params")),
        "params_are_dtensors": all(type(p).__name__ == "DTensor" for p in m.parameters()),
        "frozen_params_without_grad": all(p.grad is None for p in m.parameters()
                                          if not p.requires_grad),
        "per_rank_bytes": all_ranks,
        "traffic": step_traffic,
        "saving_without_gathering": saving,
        "state_dict_max_diff_vs_unsharded": max_diff(sharded_state, unsharded_state),
        "state_dict_keys": len(sharded_state),
        "example_key": first_b, "example_local_shape": list(shard.to_local().shape),
        "example_full_shape": list(shard.shape),
        "state_dict_first_keys": sorted(sharded_state)[:4],
    }
    # Merging after gathering: rank 0 rebuilds the unsharded model from the base it already
    # has (W0 never needs gathering), loads the gathered adapter and merges.
    x_eval = x[: args.batch]
    with torch.no_grad():
        sharded_logits = logits_of(m, x_eval).cpu()  # collective: every rank runs it
    if rank == 0:
        from safetensors.torch import save_file
        files.mkdir(parents=True, exist_ok=True)
        save_file(sharded_state, str(files / "lora_state_sharded.safetensors"))
        save_file(unsharded_state, str(files / "lora_state_unsharded.safetensors"))
        fresh = with_lora(copy.deepcopy(base), targets, args.r, args.seed)
        missing, unexpected = fresh.load_state_dict(
            {k: v.to(device) for k, v in sharded_state.items()}, strict=False)
        assert not unexpected and not any("lora" in k for k in missing)
        merged = merge_and_unload(fresh)
        with torch.no_grad():
            merged_logits = logits_of(merged, x_eval).cpu()
        res["fsdp_lora"]["merged_logits_max_diff"] = \
            (merged_logits - sharded_logits).abs().max().item()
        res["fsdp_lora"]["merged_has_lora"] = bool(list(lora_layers(merged)))
        res["peft_adapter_dir"] = str(adapter_dir)
        res["files"] = str(files)
    del m, opt
    lap("fsdp_lora")

    # the same step's traffic when every unit, or none, is resharded after forward
    res["fsdp_lora"]["traffic_by_reshard"] = {
        "default": {k: step_traffic[k] for k in ("gathered", "all_gathers", "reduce_scattered",
                                                 "reduce_scatters")},
        **{str(flag).lower(): traffic_of_one_step(lora_model, mesh, xl, yl, flag)
           for flag in (True, False)}}
    lap("fsdp_lora_reshard")

    # 6. FSDP2, full fine-tuning -----------------------------------------------------
    if not args.skip_full:
        m = copy.deepcopy(base).train()
        for p in m.parameters():
            p.requires_grad_(True)
        full_shard_all(m, mesh)
        opt = torch.optim.AdamW(m.parameters(), lr=args.lr)
        loss_fn(m, xl, yl).backward()
        opt.step()
        all_ranks = [None] * world
        dist.all_gather_object(all_ranks, rank_bytes(m, opt))
        res["fsdp_full"] = {"per_rank_bytes": all_ranks}
        del m, opt
        lap("fsdp_full")

    res["timings_s"] = timings
    return res if rank == 0 else None


def write_results(res: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    return out


def _spawned(rank: int, world: int, init_method: str, argvs: list[list[str]]) -> None:
    """One process of :func:`spawn`: join the group, run each argument list, leave."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        for argv in argvs:
            args = parse_args(argv)
            start = time.perf_counter()
            res = run(args)
            if res is not None:
                res["wall_s"] = round(time.perf_counter() - start, 2)
                write_results(res, args.out)
    finally:
        dist.destroy_process_group()


def spawn(argvs: list[list[str]], world: int = 2) -> None:
    """Run :func:`run` for each argument list in ``world`` CPU processes (gloo), without
    torchrun: ``torch.multiprocessing.spawn`` starts them, a temporary file is the
    rendezvous (no port to pick), and the results go to each ``--out`` file, never
    through a queue."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_spawned, args=(world, f"file://{tmp}/rendezvous", argvs), nprocs=world,
                 join=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # the book builds on two shared cores
    kwargs: dict[str, Any] = {}
    if args.rank is not None:
        kwargs = {"rank": args.rank, "world_size": args.world_size}
    if args.backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        kwargs["device_id"] = torch.device("cuda", local)
    start = time.perf_counter()
    dist.init_process_group(args.backend, init_method=args.init_method, **kwargs)
    try:
        res = run(args)
        if res is not None:
            res["wall_s"] = round(time.perf_counter() - start, 2)
            out = write_results(res, args.out)
            print(f"rank 0: wrote {out} in {res['wall_s']} s")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
