"""One training loop for pretraining, full fine-tuning and LoRA, with its measurements.

What is trained is decided by the model, not by the loop: :func:`train` optimises exactly
the parameters with ``requires_grad=True``. Pretraining and full fine-tuning leave every
parameter trainable; after ``inject_lora`` only the LoRA factors :math:`A` and :math:`B` are.

The recipe is the usual one for small GPTs: AdamW, a linear warm-up then a cosine decay of
the learning rate, gradient-norm clipping, and on CUDA mixed precision (bf16 where the GPU
supports it, else fp16 with loss scaling). The loop measures what the LoRA paper's "why
LoRA" list is about:

* **memory**: exact bytes of parameters, gradients and optimizer state, summed from the
  tensors themselves, and the peak: ``torch.cuda.max_memory_allocated`` on CUDA, PyTorch's
  ``MemTracker`` (which sees every tensor allocation) on the CPU;
* **speed**: median step time and tokens per second;
* **quality and forgetting**: validation loss on every corpus passed in ``eval_tokens``
  (the target domain, and the source domain to see what was forgotten).
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_edu.data import eval_batches, random_batches
from lora_edu.models import count_bytes
from lora_edu.progress import progress
from lora_edu.repro import DEFAULT_SEED

__all__ = ["TrainConfig", "MemoryReport", "History", "lr_factor", "lm_loss", "evaluate",
           "optimizer_state_bytes", "autocast_dtype", "train", "PRETRAIN_RECIPES", "pretrain",
           "finetune", "cpu_step_peak"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train`.

    Attributes:
        steps: optimizer steps.
        batch_size: sequences per step; each is ``block_size`` tokens (the model's context).
        lr: peak learning rate, reached at the end of the warm-up.
        weight_decay: AdamW's decoupled weight decay.
        warmup_steps: steps of linear warm-up from ``lr / warmup_steps`` to ``lr``.
        min_lr_ratio: the cosine decay ends at ``min_lr_ratio * lr``.
        grad_clip: maximal global gradient norm; ``None`` disables clipping.
        eval_every: evaluate every this many steps (and before the first and after the last).
        eval_windows: windows per evaluation corpus (the same windows at every evaluation).
        seed: seeds the batch order and dropout.
        amp: mixed precision on CUDA (ignored on the CPU, where training is fp32).
        measure_memory: measure the peak memory of one step (on the CPU it costs one slower step).
        desc: label of the progress bar.
        show_progress: show a progress bar (off for the many short runs of a sweep, which
            get one bar for the whole sweep instead).
    """

    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    eval_every: int = 50
    eval_windows: int = 64
    seed: int = DEFAULT_SEED
    amp: bool = True
    measure_memory: bool = True
    desc: str = "train"
    show_progress: bool = True

    def __post_init__(self) -> None:
        check_schedule(self, ("steps", "batch_size", "eval_every", "eval_windows"))


def check_schedule(config: Any, positive_ints: tuple[str, ...] = ("steps", "batch_size")) -> None:
    """Validate the optimizer-schedule fields shared by :class:`TrainConfig` and
    :class:`lora_edu.sft.SFTConfig`: ``positive_ints``, ``warmup_steps`` in ``[0, steps)``,
    ``lr > 0``, ``min_lr_ratio`` in ``[0, 1]``, ``grad_clip > 0`` or ``None``.

    Raises:
        ValueError: naming the class and the field.
    """
    owner = type(config).__name__
    for name in positive_ints:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")
    if not 0 <= config.warmup_steps < config.steps:
        raise ValueError(f"{owner}.warmup_steps must lie in [0, steps={config.steps}), "
                         f"got {config.warmup_steps}")
    if not config.lr > 0:
        raise ValueError(f"{owner}.lr must be > 0, got {config.lr}")
    if not 0 <= config.min_lr_ratio <= 1:
        raise ValueError(f"{owner}.min_lr_ratio must lie in [0, 1], got {config.min_lr_ratio}")
    if config.grad_clip is not None and not config.grad_clip > 0:
        raise ValueError(f"{owner}.grad_clip must be > 0 or None, got {config.grad_clip}")


@dataclass
class MemoryReport:
    """Bytes of one training step.

    ``param_bytes`` covers every parameter (frozen or not); ``grad_bytes`` and
    ``optimizer_state_bytes`` exist only for trainable ones, which is where LoRA saves.
    ``peak_bytes`` is measured (see ``peak_source``); on the CPU ``activation_bytes`` is
    MemTracker's activation share at the peak.
    """

    param_bytes: int
    trainable_param_bytes: int
    grad_bytes: int
    optimizer_state_bytes: int
    peak_bytes: int | None = None
    activation_bytes: int | None = None
    peak_source: str = "not measured"

    @property
    def state_bytes(self) -> int:
        """Parameters + gradients + optimizer state: the memory that does not scale with batch."""
        return self.param_bytes + self.grad_bytes + self.optimizer_state_bytes


@dataclass
class History:
    """What :func:`train` returns: curves, sizes, timings and memory of one run."""

    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: dict[str, list[float]] = field(default_factory=dict)
    trainable_params: int = 0
    total_params: int = 0
    step_time_s: float = float("nan")
    tokens_per_s: float = float("nan")
    wall_time_s: float = float("nan")
    device: str = "cpu"
    precision: str = "fp32"
    memory: MemoryReport | None = None

    def final_eval(self, name: str) -> float:
        """The last validation loss on corpus ``name`` (nats per token)."""
        if name not in self.eval_loss:
            raise KeyError(f"no evaluation named {name!r}; have {sorted(self.eval_loss)}")
        return self.eval_loss[name][-1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_factor(step: int, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): warm-up, then cosine.

    ``(step + 1) / warmup_steps`` during the warm-up; afterwards
    ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * p)) / 2`` with ``p`` going from
    0 to 1 over the remaining steps.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    p = (step - warmup_steps) / max(1, steps - warmup_steps - 1)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0)))


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats per token) of ``model(x)`` against targets ``y``.

    ``x`` and ``y`` are ``(batch, T)``; the logits ``(batch, T, vocab)`` are upcast to fp32
    so that the loss is accurate under mixed precision.
    """
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def autocast_dtype(device: torch.device, amp: bool = True) -> torch.dtype | None:
    """The mixed-precision dtype for ``device``: bf16 on GPUs that have it (compute capability
    8.0+), fp16 on older ones such as the T4, ``None`` (plain fp32) on the CPU or without amp."""
    if not amp or device.type != "cuda":
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device | None = None, dtype: torch.dtype | None = None) -> float:
    """Mean loss over fixed ``batches`` (from :func:`lora_edu.data.eval_batches`), in eval mode.

    Every batch is weighted by its number of tokens, so the result is the mean over tokens.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        with _autocast(device, dtype):
            loss = lm_loss(model, x.to(device), y.to(device))
        total += loss.item() * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / count


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Exact bytes of every tensor in ``optimizer.state`` (AdamW: ``exp_avg``,
    ``exp_avg_sq`` and a scalar ``step`` per parameter)."""
    return count_bytes(v for state in optimizer.state.values() for v in state.values()
                       if isinstance(v, torch.Tensor))


class _NoHook:
    """Stands in for a hook handle MemTracker would install (see :func:`cpu_step_peak`)."""

    def remove(self) -> None:
        pass


def cpu_step_peak(step: Callable[[], None], model: nn.Module, *existing: Any) -> dict[str, int]:
    """Peak bytes of every CPU tensor alive while ``step()`` runs, by PyTorch's MemTracker.

    ``model`` and ``existing`` (optimizers, tensors) were allocated before the step and are
    counted too, so the peak is the step's whole footprint, not only what it added. Returns
    ``{"peak": bytes, "activations": bytes, "by_category": {category: bytes}}`` (MemTracker's
    categories at the peak: Parameter, Gradient, Optstate, Activation, Temp, ...), or ``{}``
    where MemTracker is unavailable.
    """
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:  # a build without torch.distributed: no CPU peak, the rest still works
        return {}
    tracker = MemTracker()
    try:
        # MemTracker puts a gradient hook on every parameter it meets, which PyTorch refuses
        # on frozen ones (LoRA's base weights); marking them as already hooked skips them.
        for p in model.parameters():
            if not p.requires_grad:
                tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
        tracker.track_external(model, *existing)
        with tracker:
            step()
        snapshot = tracker.get_tracker_snapshot("peak").get(torch.device("cpu"), {})
    except (AttributeError, RuntimeError) as err:  # MemTracker is private API and may change
        warnings.warn(f"CPU peak memory not measured: MemTracker failed ({err})", stacklevel=3)
        return {}
    by_category = {k.value: int(v) for k, v in snapshot.items() if hasattr(k, "value")}
    return {"peak": int(snapshot.get("Total", 0)),
            "activations": by_category.get("Activation", 0), "by_category": by_category}


def _measure_cpu_peak(model: nn.Module, config: TrainConfig,
                      tokens: torch.Tensor) -> dict[str, int]:
    """Peak bytes of one CPU training step, measured on a copy of ``model``.

    A copy, because MemTracker's bookkeeping slows the tracked tensors down for the rest of
    a run. The copy takes one untracked step first so that AdamW's state exists, then one
    tracked step with a batch of the same shape as training uses.
    """
    clone = copy.deepcopy(model).train()
    params = [p for p in clone.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    batch = next(random_batches(tokens, config.batch_size, clone.config.block_size,
                                torch.Generator().manual_seed(config.seed)))

    def step() -> None:
        lm_loss(clone, *batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    return cpu_step_peak(step, clone, optimizer, *batch)


def _check_trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameter with requires_grad=True, so there is nothing "
                         "to train; for LoRA call inject_lora(model, cfg) first, for full "
                         "fine-tuning call model.requires_grad_(True)")
    return params


def train(model: nn.Module, train_tokens: torch.Tensor,
          eval_tokens: Mapping[str, torch.Tensor] | None = None,
          config: TrainConfig = TrainConfig(), device: torch.device | str | None = None) -> History:
    """Train the parameters of ``model`` that have ``requires_grad`` on ``train_tokens``.

    Args:
        model: maps token ids ``(batch, T)`` to logits ``(batch, T, vocab)`` and has a
            ``config.block_size`` (a :class:`lora_edu.models.GPT`, with or without LoRA).
        train_tokens: ``(n,)`` token ids of the training split.
        eval_tokens: corpus name -> ``(n,)`` validation token ids; each is evaluated
            before training, every ``config.eval_every`` steps and at the end.
        config: the hyper-parameters.
        device: where to train (default: where the model is). The model is moved there.

    Returns:
        The run's :class:`History`. The model is left trained, in eval mode.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    params = _check_trainable(model)
    device = torch.device(device) if device is not None else params[0].device
    model.to(device)
    block = model.config.block_size
    batches = random_batches(train_tokens, config.batch_size, block,
                             torch.Generator().manual_seed(config.seed))
    evals = {name: eval_batches(toks, block, config.eval_windows, config.batch_size)
             for name, toks in (eval_tokens or {}).items()}
    dtype = autocast_dtype(device, config.amp)
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95),
                                  weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_factor, steps=config.steps, warmup_steps=config.warmup_steps,
        min_lr_ratio=config.min_lr_ratio))
    # fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not (no-op then).
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    hist = History(trainable_params=sum(p.numel() for p in params),
                   total_params=sum(p.numel() for p in model.parameters()),
                   device=str(device), precision=str(dtype).removeprefix("torch.")
                   if dtype else "fp32")

    def run_evals(step: int) -> None:
        hist.eval_steps.append(step)
        for name, b in evals.items():
            hist.eval_loss.setdefault(name, []).append(evaluate(model, b, device, dtype))

    grad_bytes, step_times = 0, []
    peak = _measure_cpu_peak(model, config, train_tokens) \
        if config.measure_memory and device.type == "cpu" else {}
    torch.manual_seed(config.seed)  # dropout masks (model and LoRA) become reproducible
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    run_evals(0)
    model.train()
    bar = progress(range(config.steps), desc=config.desc, unit="step") \
        if config.show_progress else None
    for step in bar if bar is not None else range(config.steps):
        x, y = (t.to(device, non_blocking=True) for t in next(batches))
        t0 = time.perf_counter()
        loss_value, step_grad_bytes = _step(model, params, optimizer, scaler, x, y, dtype,
                                            config.grad_clip)
        if step > 0:  # the first step pays for lazy set-up (AdamW's state, kernels)
            step_times.append(time.perf_counter() - t0)
        grad_bytes = max(grad_bytes, step_grad_bytes)
        hist.train_steps.append(step + 1)
        hist.train_loss.append(loss_value)
        hist.lr.append(schedule.get_last_lr()[0])
        schedule.step()
        if bar is not None:
            bar.set_postfix(loss=round(loss_value, 4))
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            run_evals(step + 1)
            model.train()
    hist.wall_time_s = time.perf_counter() - start
    model.eval()
    if step_times:
        hist.step_time_s = statistics.median(step_times)
        hist.tokens_per_s = config.batch_size * block / hist.step_time_s
    hist.memory = _memory_report(model, params, grad_bytes, optimizer, device, peak)
    return hist


def _step(model: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
          scaler: torch.amp.GradScaler, x: torch.Tensor, y: torch.Tensor,
          dtype: torch.dtype | None, grad_clip: float | None) -> tuple[float, int]:
    """One optimizer step on the batch ``(x, y)``; returns the loss and the gradients' bytes."""
    with _autocast(x.device, dtype):
        loss = lm_loss(model, x, y)
    scaler.scale(loss).backward()
    grad_bytes = count_bytes(p.grad for p in params)  # measured while the gradients exist
    scaler.unscale_(optimizer)  # clipping must see the true gradients, not scaled ones
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), grad_bytes  # .item() waits for the GPU: the step time is complete


def _memory_report(model: nn.Module, params: list[nn.Parameter], grad_bytes: int,
                   optimizer: torch.optim.Optimizer, device: torch.device,
                   peak: dict[str, int]) -> MemoryReport:
    report = MemoryReport(param_bytes=count_bytes(model.parameters()),
                          trainable_param_bytes=count_bytes(params), grad_bytes=grad_bytes,
                          optimizer_state_bytes=optimizer_state_bytes(optimizer))
    if device.type == "cuda":
        report.peak_bytes = torch.cuda.max_memory_allocated(device)
        report.peak_source = "torch.cuda.max_memory_allocated"
    elif "peak" in peak:
        report.peak_bytes, report.activation_bytes = peak["peak"], peak["activations"]
        report.peak_source = "MemTracker (every CPU tensor allocation of one step)"
    return report


#: How each preset is pretrained on the source corpus: ``scripts/pretrain_checkpoint.py``
#: runs the ``cpu`` recipe to make the packaged checkpoint; on a GPU chapter 8 runs the
#: ``gpu`` recipe itself. ``tiny`` is for tests.
PRETRAIN_RECIPES: dict[str, TrainConfig] = {
    "tiny": TrainConfig(steps=20, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=10,
                        eval_windows=16, desc="pretrain (tiny)"),
    "cpu": TrainConfig(steps=1200, batch_size=16, lr=3e-3, warmup_steps=60, eval_every=100,
                       eval_windows=128, desc="pretrain (cpu preset)"),
    "gpu": TrainConfig(steps=1500, batch_size=32, lr=1.5e-3, warmup_steps=100, eval_every=250,
                       eval_windows=128, desc="pretrain (gpu preset)"),
}


def pretrain(preset: str, device: torch.device | str = "cpu",
             config: TrainConfig | None = None) -> tuple[nn.Module, History]:
    """Pretrain a fresh GPT of ``preset`` on the source corpus (Python's standard library).

    The model is initialised from ``seed_all(config.seed)`` so that a run is reproducible.
    Returns ``(model, history)``; the history evaluates on both domains (``"source"`` is
    the standard library's held-out modules, ``"target"`` the held-out documentation topics).
    """
    from lora_edu.data import load_corpus
    from lora_edu.models import GPT, gpt_config
    from lora_edu.repro import seed_all

    if preset not in PRETRAIN_RECIPES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRETRAIN_RECIPES)}")
    config = config or PRETRAIN_RECIPES[preset]
    seed_all(config.seed)
    model = GPT(gpt_config(preset))
    source, target = load_corpus("python-stdlib"), load_corpus("python-docs")
    hist = train(model, source.train, {"source": source.val, "target": target.val},
                 config, device)
    return model, hist


def finetune(base: nn.Module, train_tokens: torch.Tensor,
             eval_tokens: Mapping[str, torch.Tensor] | None = None,
             config: TrainConfig = TrainConfig(), lora: Any = None,
             device: torch.device | str | None = None) -> tuple[nn.Module, History]:
    """Adapt a copy of ``base``: full fine-tuning if ``lora`` is ``None``, else LoRA.

    ``lora`` is a :class:`lora_edu.lora.LoraConfig`; ``inject_lora`` then freezes :math:`W_0`
    and trains only :math:`A` (random) and :math:`B` (zero), so training starts exactly at the
    base model.
    ``base`` itself is never modified, so one pretrained model serves every run of a sweep.
    The seed ``config.seed`` fixes LoRA's random :math:`A` as well as the batches.

    Returns:
        ``(model, history)`` with the adapted copy.
    """
    from lora_edu.lora import LoraConfig, inject_lora
    from lora_edu.repro import seed_all

    if lora is not None and not isinstance(lora, LoraConfig):
        raise TypeError(f"lora must be a LoraConfig or None (full fine-tuning), got "
                        f"{type(lora).__name__}")
    model = copy.deepcopy(base)
    seed_all(config.seed)
    if lora is None:
        model.requires_grad_(True)
    else:
        inject_lora(model, lora)
    return model, train(model, train_tokens, eval_tokens, config, device)
