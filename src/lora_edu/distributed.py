"""LoRA on several processes: DDP and FSDP2 from ``torch.distributed``.

Two ways to spread a LoRA fine-tuning over N processes (GPUs, or CPU processes with gloo):

* **DDP** (``DistributedDataParallel``) keeps a full replica of the model on every rank and,
  after each backward pass, all-reduces (averages) the gradients of the *trainable*
  parameters. With LoRA those are only the A and B factors, so the traffic per step is
  :func:`allreduce_bytes` = Σ over trainable parameters of ``numel × element_size``, a small
  fraction of full fine-tuning's.
* **FSDP2** (``torch.distributed.fsdp.fully_shard``) splits every parameter along dim 0 across
  the N ranks (each keeps 1/N), all-gathers a block's weights just before the block runs and
  frees them after, and reduce-scatters the gradients. With LoRA the frozen base W0 is what
  sharding saves memory on; :func:`shard_lora_model` applies it per transformer block, with
  FSDP2's default ``reshard_after_forward``: the blocks are freed after forward and gathered
  again for backward, the root (embeddings, final norm, output layer) is kept from forward to
  backward.

:func:`lora_state_dict` gathers the adapter (every ``lora_A`` (r×k), ``lora_B`` (d×r) and the
trainable biases) as full CPU tensors under the names :mod:`lora_edu.adapters` saves, from a
plain, a DDP-wrapped or a sharded model; :func:`save_peft_adapter_sharded` writes it in
PEFT's layout. :func:`check_adapter_state` refuses what a save without gathering would write
(``torch.Size([0])`` or 1-D tensors from an FSDP1 or ZeRO-3 shard, one rank's rows of an FSDP2
``DTensor``). :func:`lora_wrap_policy` is the FSDP1 wrapping that gives the LoRA factors their
own units. :func:`training_bytes` and :func:`step_traffic` are the paper formulas for memory
and communication at any scale, checked in chapter 10 against a measured run.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lora_edu.adapters import (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, _adapter_names,
                               _named_tensors, _peft_config, _saved_config, _to_peft_key)
from lora_edu.lora import lora_layers

__all__ = ["shard_lora_model", "lora_state_dict", "allreduce_bytes", "find_blocks",
           "AllreduceCounter", "FSDPTrafficCounter", "rank_bytes", "save_peft_adapter_sharded",
           "single_process_group", "training_bytes", "step_traffic", "BYTES_PER_PARAM",
           "check_adapter_state", "lora_wrap_policy", "is_fsdp1"]

#: Where the transformer blocks live, tried in order: lora_edu's GPT, transformers' Llama
#: (and Mistral, Qwen, ...), GPT-2, a bare stack.
BLOCK_PATHS = ("blocks", "model.layers", "transformer.h", "layers")


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (or the model itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def is_fsdp1(model: nn.Module) -> bool:
    """True if ``model`` is or contains an FSDP1 ``FullyShardedDataParallel`` wrapper."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def _require_process_group(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what} needs an initialised process group and none is: start the script with "
            "`torchrun --nproc-per-node N script.py` and call "
            "torch.distributed.init_process_group('gloo') (CPU) or ('nccl') (GPUs) first; in "
            "a notebook, `with lora_edu.distributed.single_process_group():` makes a 1-rank one")


def _require_lora(model: nn.Module) -> None:
    if not list(lora_layers(model)):
        raise ValueError("the model has no LoRA layers: add them with "
                         "lora_edu.lora.inject_lora(model, LoraConfig(...)) before sharding "
                         "(without LoRA every weight trains: use fully_shard directly)")


def find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """``(path, blocks)``: the transformer blocks, the units FSDP2 shards one by one.

    ``model.blocks`` for :class:`lora_edu.models.GPT`, ``model.model.layers`` for a
    transformers ``LlamaForCausalLM`` (see :data:`BLOCK_PATHS`).

    Raises:
        ValueError: no non-empty ``nn.ModuleList`` at any of those paths.
    """
    model = _unwrap(model)
    for path in BLOCK_PATHS:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return path, list(blocks)
    raise ValueError(f"cannot find the transformer blocks of this {type(model).__name__}: "
                     f"looked for an nn.ModuleList at {list(BLOCK_PATHS)}; shard it yourself "
                     "with torch.distributed.fsdp.fully_shard(block) per block, then the root")


def _groups(model: nn.Module, blocks: list[nn.Module], path: str
            ) -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
    """FSDP's parameter groups: each block's parameters, then the root's remaining ones."""
    groups, inside = [], set()
    for i, block in enumerate(blocks):
        named = [(f"{path}.{i}.{n}", p) for n, p in block.named_parameters()]
        inside.update(id(p) for _, p in named)
        groups.append((f"{path}.{i}", named))
    rest = [(n, p) for n, p in model.named_parameters() if id(p) not in inside]
    groups.append(("the root (parameters outside the blocks)", rest))
    return groups


def _check_uniform_dtypes(groups: list[tuple[str, list[tuple[str, nn.Parameter]]]]) -> None:
    """FSDP2 flattens a group's trainable parameters into one buffer, so they share a dtype."""
    for group, named in groups:
        by_dtype: dict[torch.dtype, list[str]] = {}
        for name, p in named:
            if p.requires_grad:
                by_dtype.setdefault(p.dtype, []).append(name)
        if len(by_dtype) > 1:
            listing = "; ".join(f"{str(dt).removeprefix('torch.')}: {', '.join(names[:4])}"
                                + (f" and {len(names) - 4} more" if len(names) > 4 else "")
                                for dt, names in by_dtype.items())
            raise ValueError(
                f"FSDP2 needs one dtype for the trainable parameters of each sharded unit, but "
                f"{group} mixes them ({listing}). Fix: cast the trainable parameters to one "
                "dtype before sharding (`for p in model.parameters(): if p.requires_grad: "
                "p.data = p.data.float()`); LoRA's A and B are float32 already, so the odd "
                "one out is usually a trainable bf16 bias (use bias='none', or cast it). To "
                "compute in bf16 anyway, pass mp_policy=MixedPrecisionPolicy("
                "param_dtype=torch.bfloat16)")


def shard_lora_model(model: nn.Module, mesh: Any = None, *, mp_policy: Any = None,
                     reshard_after_forward: bool | None = None) -> nn.Module:
    """FSDP2: ``fully_shard`` each transformer block, then the root; returns ``model``.

    Each parameter becomes a ``DTensor`` of which this rank keeps rows ``rank·⌈d/N⌉`` onward
    (1/N of dim 0); frozen W0 are sharded like the rest, LoRA's A and B too. Before anything
    changes, the model is checked (so a refused model is left as it was).

    Args:
        model: a model with LoRA layers (:func:`lora_edu.lora.inject_lora`), e.g.
            :class:`lora_edu.models.GPT` (blocks ``model.blocks``) or a transformers
            ``LlamaForCausalLM`` (blocks ``model.model.layers``).
        mesh: a 1-D ``DeviceMesh``; ``None``: one over the default process group, on the
            device type of the model's parameters (a CPU mesh for a CPU model, as gloo needs
            even on a machine that has GPUs).
        mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (e.g. bf16 compute with
            float32 sharded parameters), or ``None`` for none.
        reshard_after_forward: passed to every ``fully_shard`` call. ``None`` (FSDP2's
            default): ``True`` for the blocks (their gathered weights are freed after forward
            and gathered again for backward) and ``False`` for the root (its weights, needed
            first in backward, stay gathered from forward to backward). ``True`` reshards the
            root too (every unit gathered twice per step); ``False`` keeps every unit gathered
            from its forward to its backward (one gather per step, FSDP1's ``SHARD_GRAD_OP``).
            :func:`step_traffic` gives the bytes of each.

    Raises:
        RuntimeError: no process group is initialised.
        ValueError: the model has no LoRA layers, is already sharded, its blocks cannot be
            found, or one unit's trainable parameters mix dtypes (the parameters are named).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if model is not _unwrap(model):
        raise ValueError("model is wrapped in DistributedDataParallel: shard the plain model "
                         "(FSDP2 replaces DDP; do not combine them)")
    _require_process_group("shard_lora_model")
    if _is_sharded(model):
        raise ValueError("model is already sharded (fully_shard was applied); shard it once")
    _require_lora(model)
    path, blocks = find_blocks(model)
    _check_uniform_dtypes(_groups(model, blocks, path))
    if mesh is None:
        device_type = next(model.parameters()).device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    if reshard_after_forward is not None and not isinstance(reshard_after_forward, bool):
        raise TypeError(f"reshard_after_forward must be True, False or None (FSDP2's default), "
                        f"got {reshard_after_forward!r}")
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward,
              "mp_policy": mp_policy if mp_policy is not None else MixedPrecisionPolicy()}
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter as full (unsharded) CPU tensors, keyed as :func:`lora_edu.adapters.save_adapter`
    keys them (``blocks.0.attn.q.lora_A`` (r×k), ``blocks.0.attn.q.lora_B`` (d×r), the
    biases ``LoraConfig.bias`` made trainable, and each module to save's whole
    ``state_dict()``, buffers included).

    Works on a plain model, a DDP-wrapped one and one sharded by :func:`shard_lora_model`.
    On a sharded model each ``DTensor`` is all-gathered (``full_tensor()``), which is a
    collective: **every rank must call this**, and every rank gets the same full tensors.
    Only the adapter travels: ``get_model_state_dict(model, options=StateDictOptions(
    full_state_dict=True))`` would gather the frozen base too.

    Raises:
        ValueError: the model has no LoRA layers (or no ``lora_config``), is wrapped in FSDP1
            (its parameters are views of this rank's flat shard), or a gathered tensor does
            not have its layer's shape (:func:`check_adapter_state`).
    """
    from torch.distributed.tensor import DTensor

    model = _unwrap(model)
    if is_fsdp1(model):
        raise ValueError(
            "model is wrapped in FSDP1 (FullyShardedDataParallel): outside forward its LoRA "
            "parameters are views of this rank's part of a flat buffer, 1-D or torch.Size([0]) "
            "(what a save without gathering writes). Shard with FSDP2 instead "
            "(shard_lora_model), or gather with FSDP1's own full state dict: "
            "`with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT): model.state_dict()`")
    _require_lora(model)
    config = _saved_config(model)
    names = _adapter_names(model, config, [n for n, _ in lora_layers(model)])
    # parameters and buffers: a module to save (a head with BatchNorm, say) is saved with its
    # buffers, as save_adapter and PEFT save it; FSDP2 shards parameters only, so a buffer is
    # whole on every rank and needs no gathering
    tensors = _named_tensors(model)
    state = {}
    for key in names:  # same order on every rank: the collectives line up
        tensor = tensors[key].detach()
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        state[key] = tensor.to("cpu").contiguous().clone()
    check_adapter_state(model, state)
    return state


def _expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{key: full shape}`` of the adapter, from each layer's declared sizes (``r``,
    ``in_features``, ``out_features``), which sharding never changes (its ``weight.shape`` can:
    FSDP1 replaces it by a flat view)."""
    config = _saved_config(model)
    layers = list(lora_layers(model))
    expected = dict(_adapter_names(model, config, [n for n, _ in layers]))
    for name, layer in layers:
        expected[f"{name}.lora_A"] = (layer.r, layer.in_features)
        expected[f"{name}.lora_B"] = (layer.out_features, layer.r)
    return expected


def check_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Refuse an adapter state that is not the full adapter of ``model``.

    Every ``lora_A`` must be (r×k) and every ``lora_B`` (d×r), as the layer declares them, and
    a plain tensor (not a ``DTensor``). What saving without gathering produces fails here, with
    the cause named:

    * ``torch.Size([0])``: this rank holds none of the tensor (FSDP1 with
      ``use_orig_params=True`` outside forward, a DeepSpeed ZeRO-3 partition: the "size
      mismatch ... torch.Size([0])" loads of PEFT issue #1710);
    * no tensors at all: the 40-byte adapter files of PEFT issue #2892 / TRL issue #4416
      (transformers' ZeRO-3 save fallback, fixed in transformers PR #41416, v5.0.0), refused
      as missing tensors;
    * a 1-D tensor: this rank's slice of FSDP1's flat buffer;
    * a 2-D tensor with too few rows: one rank's rows of an FSDP2 ``DTensor`` (``to_local()``;
      accelerate PR #4206 fixed an adapter-only FSDP2 save that kept rank 0's slice);
    * a ``DTensor``: not gathered (``full_tensor()``), whatever its shape says.

    PEFT's ``save_pretrained`` (0.21.2, PR #3251) warns on ``[0]`` and 1-D tensors; a file with
    no tensors and 2-D slices pass it.

    Raises:
        ValueError: a missing, extra or mis-shaped tensor (up to three named, with the fix).
    """
    from torch.distributed.tensor import DTensor

    model = _unwrap(model)
    if is_fsdp1(model):
        raise ValueError("model is wrapped in FSDP1; check the state against the model as it "
                         "was before wrapping (the same layers, unsharded)")
    _require_lora(model)
    expected = _expected_shapes(model)
    problems = []
    for key in sorted(set(expected) - set(state)):
        problems.append(f"{key} is missing")
    for key in sorted(set(state) - set(expected)):
        problems.append(f"{key} is not part of this model's adapter")
    for key in sorted(set(expected) & set(state)):
        tensor, want = state[key], expected[key]
        got = tuple(tensor.shape)
        if isinstance(tensor, DTensor):
            problems.append(f"{key} is a DTensor (each rank holds part of it): gather it with "
                            "full_tensor(), as lora_state_dict does")
        elif tensor.numel() == 0:
            problems.append(f"{key} is torch.Size([0]), expected {want}: this rank holds none "
                            "of it (an FSDP1 flat-parameter view outside forward, or a ZeRO-3 "
                            "partition)")
        elif tensor.dim() != len(want):
            problems.append(f"{key} has shape {got}, expected {want}: a flat slice of FSDP1's "
                            "buffer, not the tensor")
        elif got != want:
            problems.append(f"{key} has shape {got}, expected {want}: one rank's rows of a "
                            "sharded tensor (an FSDP2 DTensor's to_local())")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(
            "this is not the full adapter: " + "; ".join(problems[:3]) + more + ". Gather "
            "before saving: lora_state_dict(model) on every rank of an FSDP2 or DDP model "
            "(save_peft_adapter_sharded does both), FSDP1's FULL_STATE_DICT, or "
            "deepspeed.zero.GatheredParameters under ZeRO-3")


def lora_wrap_policy(model: nn.Module) -> Any:
    """An FSDP1 ``auto_wrap_policy`` that puts each LoRA layer's A and B in a unit of their
    own, so that no flat buffer mixes frozen and trainable parameters.

    The units: every transformer block (:func:`find_blocks`), every LoRA layer (whose own
    parameters are only ``lora_A`` and ``lora_B``) and the frozen ``base`` inside it. The same
    idea as ``peft.utils.other.fsdp_auto_wrap_policy`` (a unit for every leaf module whose
    weight trains: PEFT's ``lora_A`` and ``lora_B`` are ``nn.Linear`` leaves) and Answer.AI's
    ``get_wrapping_policy`` in fsdp_qlora's ``train.py``. FSDP2 needs none of this.
    """
    from functools import partial

    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    _require_lora(_unwrap(model))
    _, blocks = find_blocks(model)
    layers = [layer for _, layer in lora_layers(_unwrap(model))]
    units = {id(m) for m in (*blocks, *layers, *(layer.base for layer in layers))}
    return partial(lambda_auto_wrap_policy, lambda_fn=lambda module: id(module) in units)


def allreduce_bytes(model: nn.Module) -> int:
    """Bytes of gradient DDP all-reduces per step for ``model``: Σ numel·element_size over
    the distinct parameters with ``requires_grad`` (DDP buckets exactly those; frozen W0 never
    travel). For LoRA that is Σ r(d+k)·4 over the adapted layers (float32 A and B).

    A sharded model's ``DTensor`` parameters count with their full (global) size.
    """
    params = {id(p): p for p in _unwrap(model).parameters() if p.requires_grad}.values()
    return sum(p.numel() * p.element_size() for p in params)


class AllreduceCounter:
    """A DDP communication hook that counts the bytes it all-reduces, then all-reduces.

    ``counter = AllreduceCounter.register(ddp_model)``; after steps, ``counter.bytes`` is the
    total size of the gradient buckets DDP handed to the hook, ``counter.buckets`` their
    number. The all-reduce itself is PyTorch's ``default_hooks.allreduce_hook`` (an average
    over ranks), so training is exactly what it would be without the hook.
    """

    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group
        self.bytes = 0
        self.buckets = 0

    @classmethod
    def register(cls, ddp_model: nn.Module, process_group: Any = None) -> AllreduceCounter:
        counter = cls(process_group)
        ddp_model.register_comm_hook(counter, cls.hook)
        return counter

    @staticmethod
    def hook(state, bucket):  # unannotated: DDP checks annotations against its own types
        """Count ``bucket``'s flat gradient buffer, then average it over ranks."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        buffer = bucket.buffer()
        state.bytes += buffer.numel() * buffer.element_size()
        state.buckets += 1
        return default_hooks.allreduce_hook(state.process_group, bucket)


class FSDPTrafficCounter:
    """FSDP2's counterpart of :class:`AllreduceCounter`: counts what each collective moves.

    ``counter = FSDPTrafficCounter.register(sharded_model)`` installs, on every FSDP unit,
    an all-gather and a reduce-scatter (``FSDPModule.set_custom_all_gather`` /
    ``set_custom_reduce_scatter``) that call PyTorch's default ones and add up the size of
    the *full* tensors: ``gathered`` (bytes of weights all-gathered, each unit once per
    gather) and ``reduce_scattered`` (bytes of gradient reduce-scattered). A ring sends
    (N−1)/N of each per rank.
    """

    def __init__(self) -> None:
        self.gathered = 0
        self.reduce_scattered = 0
        self.all_gathers = 0
        self.reduce_scatters = 0

    @classmethod
    def register(cls, model: nn.Module) -> FSDPTrafficCounter:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import (
            DefaultAllGather, DefaultReduceScatter)

        counter = cls()

        class CountingAllGather(DefaultAllGather):
            def __call__(self, output_tensor, input_tensor, group, async_op=False):
                counter.gathered += output_tensor.numel() * output_tensor.element_size()
                counter.all_gathers += 1
                return super().__call__(output_tensor, input_tensor, group, async_op)

        class CountingReduceScatter(DefaultReduceScatter):
            def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
                counter.reduce_scattered += input_tensor.numel() * input_tensor.element_size()
                counter.reduce_scatters += 1
                return super().__call__(output_tensor, input_tensor, group, op, async_op)

        units = [m for m in _unwrap(model).modules() if isinstance(m, FSDPModule)]
        if not units:
            raise ValueError("model is not sharded: call shard_lora_model(model) first")
        for unit in units:
            unit.set_custom_all_gather(CountingAllGather())
            unit.set_custom_reduce_scatter(CountingReduceScatter())
        return counter


def rank_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None
               ) -> dict[str, int]:
    """What this rank holds: bytes of parameters, gradients and optimizer state.

    For a sharded model only the local shard counts (``DTensor.to_local()``). Optimizer state
    is the per-parameter tensors shaped like their parameter (AdamW's m and v), without the
    scalar step counters.
    """
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    model = _unwrap(model)
    params = list({id(p): p for p in model.parameters()}.values())
    out = {"params": sum(local(p).numel() * p.element_size() for p in params),
           "grads": sum(local(p.grad).numel() * p.grad.element_size()
                        for p in params if p.grad is not None),
           "optimizer": 0}
    if optimizer is not None:
        for p, state in optimizer.state.items():
            for value in state.values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    out["optimizer"] += local(value).numel() * value.element_size()
    return out


def save_peft_adapter_sharded(model: nn.Module, directory: str | os.PathLike,
                              rank: int = 0) -> Path | None:
    """Save the adapter of a (possibly sharded) model in PEFT's layout, from one rank.

    Every rank must call it (it gathers with :func:`lora_state_dict`); rank ``rank`` writes
    ``adapter_model.safetensors`` + ``adapter_config.json``, which
    ``peft.PeftModel.from_pretrained(base, directory)`` loads, and returns the directory;
    the other ranks return ``None``. (Calling :func:`lora_edu.adapters.save_peft_adapter` on
    a sharded model instead would store this rank's shards, not the adapter.)
    """
    from safetensors.torch import save_file

    model = _unwrap(model)
    state = lora_state_dict(model)  # gathered and checked (check_adapter_state)
    if dist.is_initialized() and dist.get_rank() != rank:
        return None
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({_to_peft_key(k): v for k, v in state.items()}, str(out / PEFT_WEIGHTS_NAME),
              metadata={"format": "pt"})
    config = _peft_config(_saved_config(model))
    (out / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out


@contextmanager
def single_process_group(backend: str = "gloo") -> Iterator[None]:
    """A 1-rank process group for the length of a ``with`` block (notebooks, tests).

    Rendezvous through a temporary file, so no port is needed; destroyed on exit.
    """
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised; use it (or call "
                           "torch.distributed.destroy_process_group() first)")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(backend, init_method=f"file://{tmp}/rendezvous",
                                rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


# --------------------------------------------------------------------------- on paper

@dataclass(frozen=True)
class BytesPerParam:
    """Bytes one parameter costs in each role (the ZeRO paper's accounting)."""

    weight: float     # stored weight
    grad: float       # its gradient (0 if frozen)
    optimizer: float  # optimizer state (AdamW: m and v, plus an fp32 master copy if any)


#: Mixed-precision AdamW as in ZeRO (Rajbhandari et al., 2020): bf16 weights and gradients,
#: fp32 master weights, m and v: 2 + 2 + 12 = 16 bytes per trainable parameter. LoRA's
#: factors are float32 with float32 gradients, m and v: 4 + 4 + 8 = 16 as well. Frozen
#: bases: bf16 (2 bytes) or NF4 with double quantisation (4 bits + 0.127 bits of constants,
#: Dettmers et al., 2023).
BYTES_PER_PARAM = {
    "full": BytesPerParam(2, 2, 12),
    "lora": BytesPerParam(4, 4, 8),
    "frozen_bf16": BytesPerParam(2, 0, 0),
    "frozen_nf4": BytesPerParam((4 + 0.127) / 8, 0, 0),
    "fp32_full": BytesPerParam(4, 4, 8),      # the measured toy: everything float32
    "fp32_frozen": BytesPerParam(4, 0, 0),
}


def training_bytes(n_base: int, n_trainable: int, method: str, strategy: str, world: int,
                   precision: str = "bf16", n_unquantized: int = 0) -> dict[str, float]:
    """Per-rank bytes of weights, gradients and optimizer state (activations excluded).

    Args:
        n_base: parameters of the pretrained model (P).
        n_trainable: LoRA parameters (T); ignored for ``method="full"``.
        method: ``"full"`` (all P train), ``"lora"`` (P frozen in bf16 + T) or ``"qlora"``
            (P frozen in NF4 + T, except ``n_unquantized`` of them).
        strategy: ``"ddp"`` (every rank holds everything) or ``"fsdp"`` (each rank 1/N of it:
            ZeRO-3 / FSDP FULL_SHARD).
        world: N, the number of ranks.
        precision: ``"bf16"`` (the accounting above) or ``"fp32"`` (everything float32, as in
            the measured toy run).
        n_unquantized: for ``"qlora"``, the base parameters that stay bf16: QLoRA quantises
            the ``nn.Linear`` layers of the blocks only, so the embeddings, the norms and the
            output layer (transformers keeps ``lm_head`` unquantised) are 16-bit.

    Returns:
        ``{"weights", "grads", "optimizer", "total"}`` in bytes, on one rank.
        FSDP's transient full copy of the block being computed is not included.
    """
    if method not in ("full", "lora", "qlora") or strategy not in ("ddp", "fsdp"):
        raise ValueError(f"method must be 'full', 'lora' or 'qlora' and strategy 'ddp' or "
                         f"'fsdp', got {method!r}, {strategy!r}")
    if precision not in ("bf16", "fp32") or (precision == "fp32" and method == "qlora"):
        raise ValueError(f"precision must be 'bf16' or 'fp32' (not with qlora), got {precision!r}")
    if world < 1:
        raise ValueError(f"world (the number of ranks) must be >= 1, got {world}")
    if not 0 <= n_unquantized <= n_base or (n_unquantized and method != "qlora"):
        raise ValueError(f"n_unquantized (base parameters QLoRA leaves in bf16) must lie in "
                         f"[0, n_base] and is only for method='qlora', got {n_unquantized}")
    full = BYTES_PER_PARAM["fp32_full" if precision == "fp32" else "full"]
    if method == "full":
        parts = [(n_base, full)]
    elif method == "qlora":
        parts = [(n_base - n_unquantized, BYTES_PER_PARAM["frozen_nf4"]),
                 (n_unquantized, BYTES_PER_PARAM["frozen_bf16"]),
                 (n_trainable, BYTES_PER_PARAM["lora"])]
    else:
        parts = [(n_base, BYTES_PER_PARAM["fp32_frozen" if precision == "fp32" else
                                          "frozen_bf16"]),
                 (n_trainable, BYTES_PER_PARAM["lora"])]
    share = 1 / world if strategy == "fsdp" else 1
    out = {"weights": sum(n * b.weight for n, b in parts) * share,
           "grads": sum(n * b.grad for n, b in parts) * share,
           "optimizer": sum(n * b.optimizer for n, b in parts) * share}
    out["total"] = out["weights"] + out["grads"] + out["optimizer"]
    return out


def step_traffic(n_base: int, n_trainable: int, method: str, strategy: str, world: int,
                 precision: str = "bf16", n_root: int = 0,
                 reshard_after_forward: bool | None = None, n_unquantized: int = 0) -> float:
    """Bytes one rank sends per optimizer step (ring collectives; no overlap assumed).

    DDP all-reduces the gradient bytes G: ``2(N−1)/N · G``. FSDP reduce-scatters G and
    all-gathers the weights: a unit resharded after forward is gathered twice (forward and
    backward), one kept gathered once. With W the weight bytes and W_root those of the root
    unit (the ``n_root`` parameters outside the blocks: embeddings, final norm, output layer):

    * ``reshard_after_forward=None`` (FSDP2's default, :func:`shard_lora_model`'s): blocks
      twice, root once, ``(N−1)/N · (2W − W_root + G)``. This is also FSDP1's
      ``FULL_SHARD``, which never frees the root's parameters after forward
      (``_post_forward_reshard`` in ``torch/distributed/fsdp/_runtime_utils.py``);
    * ``True`` (every unit resharded, the root too; no FSDP1 strategy does this):
      ``(N−1)/N · (2W + G)``;
    * ``False`` (none resharded, FSDP1's ``SHARD_GRAD_OP``): ``(N−1)/N · (W + G)``.

    With LoRA, G is only the adapter's (4 bytes each) but under FSDP W is the whole frozen
    base: sharding buys memory with traffic. ``n_unquantized`` as in :func:`training_bytes`.
    """
    if reshard_after_forward not in (None, True, False):
        raise ValueError(f"reshard_after_forward must be None, True or False, got "
                         f"{reshard_after_forward!r}")
    if not 0 <= n_root <= n_base:
        raise ValueError(f"n_root (parameters of the root unit) must lie in [0, n_base], got "
                         f"{n_root}")
    if world == 1:
        return 0.0
    b = training_bytes(n_base, n_trainable, method, "ddp", 1, precision, n_unquantized)
    full = BYTES_PER_PARAM["fp32_full" if precision == "fp32" else "full"]
    grads = n_base * full.grad if method == "full" else n_trainable * 4
    weights = b["weights"]  # gathered in storage dtype (NF4 for QLoRA, as Answer.AI's recipe)
    # the root's weights: embeddings, norms and output layer, 16-bit even under QLoRA
    per_root = (full.weight if method == "full" else
                BYTES_PER_PARAM["fp32_frozen" if precision == "fp32" else "frozen_bf16"].weight)
    root = n_root * per_root
    factor = (world - 1) / world
    if strategy == "ddp":
        return 2 * factor * grads
    gathered = {None: 2 * weights - root, True: 2 * weights, False: weights}[reshard_after_forward]
    return factor * (gathered + grads)
