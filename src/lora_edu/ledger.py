"""Where a training step's memory and FLOPs go: the ledgers of chapter 8.

**Memory.** One optimizer step holds, at its peak,

* the **weights** (every parameter, frozen or not),
* the **gradients** and the **optimizer state** (AdamW: two moments per trainable weight), which
  exist only for trainable parameters — the part LoRA removes;
* the **saved activations**: what autograd keeps from the forward pass for the backward pass,
  counted here exactly with :func:`torch.autograd.graph.saved_tensors_hooks`. A frozen
  ``nn.Linear`` (``y = x Wᵀ``) needs ``W`` to pass the gradient on to ``x`` but not ``x``
  itself, because ``x`` only serves ``∂L/∂W``, which nobody asks for: its input is not saved.
  So freezing layers shrinks activations too;
* **temporaries** of the kernels, the loss and the optimizer.

These parts are not all alive at once: activations are freed as the backward pass consumes
them, while the optimizer's temporaries appear only after it. The measured peak is therefore
reported with what was alive *at* the peak (MemTracker's categories), next to the totals.

**FLOPs.** Per token a forward pass costs about ``2N`` (a multiply and an add per weight), the
backward pass ``2N`` for the gradients with respect to activations plus ``2N`` for those with
respect to weights. Full fine-tuning therefore costs about ``6N`` per token; LoRA skips the
frozen weights' gradients and costs about ``4N + 6 N_lora`` (Kaplan et al., 2020).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lora_edu.models import count_bytes
from lora_edu.train import cpu_step_peak, optimizer_state_bytes

__all__ = ["MemoryLedger", "saved_activation_bytes", "measure_step_memory", "flops_per_token",
           "predict_training_bytes"]


@dataclass
class MemoryLedger:
    """Bytes of one training step.

    ``weights``, ``gradients`` and ``optimizer_state`` are the tensors' own bytes;
    ``saved_activations`` is everything autograd saved in the forward pass; ``peak`` the
    measured peak and ``at_peak`` what was alive then, by category (they sum to ``peak``).
    """

    weights: int
    gradients: int
    optimizer_state: int
    saved_activations: int
    peak: int | None = None
    at_peak: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def saved_activation_bytes(loss_fn: Callable[[], torch.Tensor], model: nn.Module) -> int:
    """Bytes autograd saves for backward while ``loss_fn()`` runs, parameters excluded.

    Each distinct storage is counted once (views of one tensor share it), so the figure is
    what the graph really keeps alive, not the number of times a tensor was saved.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    del loss  # the graph (and what it saved) goes with it
    return sum(seen.values())


def measure_step_memory(model: nn.Module, loss_fn: Callable[[], torch.Tensor],
                        lr: float = 1e-4, measure_peak: bool = True) -> MemoryLedger:
    """The memory ledger of one AdamW step of ``model`` on ``loss_fn()``.

    Takes one untracked step first, so that AdamW's moments exist, as in every step after the
    first. On the CPU the peak is PyTorch's MemTracker (every tensor allocation); on CUDA
    ``max_memory_allocated``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has nothing trainable: inject LoRA or call "
                         "model.requires_grad_(True) first")
    optimizer = torch.optim.AdamW(params, lr=lr)
    grads = {"bytes": 0}

    def step() -> None:
        loss_fn().backward()
        grads["bytes"] = count_bytes(p.grad for p in params)  # while the gradients exist
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    peak, at_peak = None, {}
    if measure_peak:
        device = params[0].device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            step()
            peak = torch.cuda.max_memory_allocated(device)
        else:
            measured = cpu_step_peak(step, model, optimizer)
            peak, at_peak = measured.get("peak"), measured.get("by_category", {})
    return MemoryLedger(weights=count_bytes(model.parameters()),
                        gradients=grads["bytes"],
                        optimizer_state=optimizer_state_bytes(optimizer),
                        saved_activations=saved_activation_bytes(loss_fn, model), peak=peak,
                        at_peak=at_peak)


def flops_per_token(n_params: int, n_trainable: int, full: bool) -> int:
    """Predicted training FLOPs per token: ``6N`` for full fine-tuning, ``4N + 6 N_lora`` for
    LoRA (``n_trainable`` = ``N_lora``); embeddings counted like any weight."""
    if full:
        return 6 * n_params
    return 4 * n_params + 6 * n_trainable


def predict_training_bytes(n_params: int, n_trainable: int, weight_bytes: float = 2,
                           grad_bytes: float = 2, state_bytes: float = 8,
                           master_bytes: float = 0) -> dict[str, float]:
    """Bytes of weights, gradients and optimizer state for a model of ``n_params`` of which
    ``n_trainable`` train (activations excluded: they depend on batch and sequence).

    Defaults: 16-bit weights and gradients, fp32 AdamW moments (8 bytes per trainable
    weight); ``master_bytes=4`` adds an fp32 master copy of the trainable weights, as
    mixed-precision full fine-tuning keeps.
    """
    return {"weights": n_params * weight_bytes,
            "gradients": n_trainable * grad_bytes,
            "optimizer_state": n_trainable * (state_bytes + master_bytes)}
