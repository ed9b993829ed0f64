"""Serving LoRA: many adapters on one base in one batch, swapping adapters, and the
bottleneck adapter that LoRA is compared with.

**Many adapters, one batch.** A server that hosts one base model and many LoRA adapters
(S-LoRA, Punica) receives a batch in which request i names adapter a_i. The base product is
shared, W0 x_i; only the low-rank branch differs. Gathering each request's factors into
stacks Â = A[a] (batch×r×k) and B̂ = B[a] (batch×d×r) computes every branch with two batched
matrix products:

    h_i = W0 x_i + b + s_{a_i} · B_{a_i} (A_{a_i} x_i)        for all i at once (``torch.bmm``)

:class:`MultiLoRALinear` does this, and also the obvious alternative (a Python loop over the
adapters present, one sub-batch each) for comparison.

**Swapping.** :class:`AdapterSwitcher` switches a layer between adapters by writing
round(W0 + ΔW) from a full-precision master copy of W0, so that no rounding error piles up
over many swaps (merge/unmerge in bf16 or fp16 does pile it up; chapter 11 measures it).

**Bottleneck adapters** (Houlsby et al., 2019): ``h + W_up σ(W_down h)`` inserted after a
sublayer. Unlike LoRA they cannot be merged into W0 (σ is non-linear), so they add sequential
work at inference; :func:`add_bottleneck_adapters` puts them into the small GPT.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from lora_edu.lora import replace_module

__all__ = ["MultiLoRALinear", "AdapterIds", "set_adapter_ids", "inject_multi_lora",
           "BottleneckAdapter", "add_bottleneck_adapters", "AdapterSwitcher",
           "interleaved_timings", "random_adapters", "multi_lora_gpt"]

#: How a batch names its adapters: one name (or index) per request.
AdapterIds = Union[Sequence[str], Sequence[int], torch.Tensor]


class MultiLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (W0 ∈ ℝ^{d×k}) serving ``n`` LoRA adapters at once.

    Adapters are stored stacked: ``lora_A`` (n, r, k), ``lora_B`` (n, d, r) and ``scaling``
    (n,), where r is the largest rank; a smaller adapter is padded with zero rows of A and
    zero columns of B, which adds exact zeros and changes nothing.

    ``forward(x)`` takes x of shape (batch, T, k) (or (batch, k)) and the ids set by
    :meth:`set_ids` (one per request), and returns (batch, T, d):

        h_i = W0 x_i + b + s_{a_i} · (x_i A_{a_i}ᵀ) B_{a_i}ᵀ

    computed with gathered factors and ``torch.bmm`` (``mode="batched"``) or one adapter at a
    time over its sub-batch (``mode="loop"``). Both give the same numbers up to the order of
    floating-point sums.
    """

    MODES = ("batched", "loop")

    def __init__(self, base: nn.Linear,
                 adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """``adapters``: name → (A (r×k), B (d×r), s). The base is frozen."""
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        if not adapters:
            raise ValueError("adapters is empty; pass at least one name → (A, B, scaling)")
        d, k = base.weight.shape
        r_max = max(_check_factors(name, A, B, d, k) for name, (A, B, _) in adapters.items())
        n = len(adapters)
        dtype = torch.promote_types(base.weight.dtype, torch.float32)
        stack_A = base.weight.new_zeros(n, r_max, k, dtype=dtype)
        stack_B = base.weight.new_zeros(n, d, r_max, dtype=dtype)
        for i, (A, B, _) in enumerate(adapters.values()):
            stack_A[i, :A.shape[0]] = A.detach().to(stack_A)
            stack_B[i, :, :B.shape[1]] = B.detach().to(stack_B)
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(stack_A, requires_grad=False)
        self.lora_B = nn.Parameter(stack_B, requires_grad=False)
        self.register_buffer("scaling", torch.tensor([float(s) for _, _, s in adapters.values()],
                                                     dtype=dtype, device=base.weight.device))
        self.names: tuple[str, ...] = tuple(adapters)
        self.mode = "batched"
        self._ids: torch.Tensor | None = None

    @classmethod
    def from_lora_layers(cls, layers: Mapping[str, nn.Module]) -> MultiLoRALinear:
        """Stack trained :class:`~lora_edu.lora.LoRALinear` layers that share one base weight."""
        first = next(iter(layers.values()))
        for name, layer in layers.items():
            if layer.merged:
                raise ValueError(f"adapter {name!r} is merged into its base; unmerge it first")
            if not torch.equal(layer.base.weight, first.base.weight):
                raise ValueError(f"adapter {name!r} was trained on another base weight; "
                                 "all adapters must share W0")
        return cls(first.base, {n: (lay.lora_A, lay.lora_B, lay.scaling)
                                for n, lay in layers.items()})

    def resolve_ids(self, ids: AdapterIds) -> torch.Tensor:
        """Adapter names or indices → a (batch,) long tensor of indices; unknown ids raise."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"adapter ids as a tensor must be 1-D integers, got "
                                f"{ids.dtype} of shape {tuple(ids.shape)}")
            out = ids.long()
        else:
            index = {name: i for i, name in enumerate(self.names)}
            if not all(isinstance(a, (str, int)) and not isinstance(a, bool) for a in ids):
                raise TypeError("adapter ids must be names (str) or indices (int), one per "
                                f"request, got {list(ids)[:5]}")
            bad = [a for a in ids if isinstance(a, str) and a not in index]
            if bad:
                raise ValueError(f"unknown adapter id(s) {sorted(set(bad))[:5]}; this layer "
                                 f"serves {len(self.names)} adapters, e.g. {list(self.names[:5])}"
                                 "; load the adapter first or fix the request")
            out = torch.tensor([index[a] if isinstance(a, str) else a for a in ids],
                               dtype=torch.long)
        bad_idx = out[(out < 0) | (out >= len(self.names))]
        if bad_idx.numel():
            raise ValueError(f"adapter index {int(bad_idx[0])} is out of range: this layer "
                             f"serves adapters 0..{len(self.names) - 1}")
        return out.to(self.lora_A.device)

    def set_ids(self, ids: AdapterIds | None) -> None:
        """Which adapter each request of the next batches uses (``None``: base model only)."""
        self._ids = None if ids is None else self.resolve_ids(ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = W0 x + b + s_a·B_a A_a x per request; x: (batch, [T,] k) → (batch, [T,] d)."""
        result = self.base(x)
        if self._ids is None:
            return result
        if x.shape[0] != self._ids.shape[0]:
            raise ValueError(f"the batch has {x.shape[0]} requests but {self._ids.shape[0]} "
                             "adapter ids were set; call set_adapter_ids with one id per request")
        xs = x.to(self.lora_A.dtype)
        flat = xs.reshape(xs.shape[0], -1, xs.shape[-1])          # (batch, T, k)
        delta = self._batched(flat) if self.mode == "batched" else self._looped(flat)
        return result + delta.reshape(*result.shape).to(result.dtype)

    def _batched(self, x: torch.Tensor) -> torch.Tensor:
        ids = self._ids
        # Gathering copies only the small factors (batch·r·(d+k) numbers), never a d×k matrix.
        low = torch.bmm(x, self.lora_A[ids].transpose(1, 2))       # (batch, T, r)
        return torch.bmm(low, self.lora_B[ids].transpose(1, 2)) * self.scaling[ids, None, None]

    def _looped(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(*x.shape[:-1], self.lora_B.shape[1])
        for a in torch.unique(self._ids).tolist():
            rows = (self._ids == a).nonzero().squeeze(1)
            out[rows] = (x[rows] @ self.lora_A[a].T) @ self.lora_B[a].T * self.scaling[a]
        return out

    def extra_repr(self) -> str:
        n, r, k = self.lora_A.shape
        return f"adapters={n}, r={r}, d={self.lora_B.shape[1]}, k={k}, mode={self.mode}"


def _check_factors(name: str, A: torch.Tensor, B: torch.Tensor, d: int, k: int) -> int:
    r = A.shape[0]
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != k or B.shape != (d, r):
        raise ValueError(f"adapter {name!r}: expected A of shape (r, {k}) and B of shape "
                         f"({d}, r), got {tuple(A.shape)} and {tuple(B.shape)}")
    return r


def _multi_layers(model: nn.Module) -> list[MultiLoRALinear]:
    return [m for m in model.modules() if isinstance(m, MultiLoRALinear)]


def set_adapter_ids(model: nn.Module, ids: AdapterIds | None, mode: str | None = None) -> None:
    """Set the per-request adapter ids (and optionally the mode) of every multi-adapter layer.

    All layers validate the ids before any of them changes, so an unknown id leaves the model
    exactly as it was.
    """
    layers = _multi_layers(model)
    if not layers:
        raise ValueError("model has no MultiLoRALinear layer; build one with inject_multi_lora")
    if mode is not None and mode not in MultiLoRALinear.MODES:
        raise ValueError(f"mode must be one of {MultiLoRALinear.MODES}, got {mode!r}")
    resolved = [None if ids is None else layer.resolve_ids(ids) for layer in layers]
    for layer, idx in zip(layers, resolved):
        layer._ids = idx
        layer.mode = mode or layer.mode


def inject_multi_lora(model: nn.Module, adapters: Mapping[str, Mapping[str, tuple]]) -> nn.Module:
    """Replace named ``nn.Linear`` layers by :class:`MultiLoRALinear`, in place.

    ``adapters`` maps a module name (as in ``model.named_modules()``) to that layer's
    adapters: adapter name → (A, B, s). Every layer must list the same adapter names in the
    same order (one adapter = one set of factors per layer). Checked before anything changes.
    """
    names = [tuple(a) for a in adapters.values()]
    if any(n != names[0] for n in names):
        raise ValueError("adapters: every layer must list the same adapter names in the "
                         f"same order (one adapter = factors for each layer), got {names}")
    modules = dict(model.named_modules())
    missing = [m for m in adapters if not isinstance(modules.get(m), nn.Linear)]
    if missing:
        raise ValueError(f"adapters names module(s) {missing[:5]} that are not nn.Linear "
                         "layers of the model; use names from model.named_modules()")
    built = {m: MultiLoRALinear(modules[m], a) for m, a in adapters.items()}
    for m, layer in built.items():
        replace_module(model, m, layer)
    return model


# --------------------------------------------------------------------------- bottleneck adapter

class BottleneckAdapter(nn.Module):
    """Houlsby et al. (2019)'s adapter: h + W_up σ(W_down h), a residual bottleneck.

    ``W_down`` is (m×d), ``W_up`` (d×m) with m ≪ d; input and output (..., d). ``W_up`` starts
    at zero so that the adapter starts as the identity (as LoRA's B = 0 does). It runs *after*
    the layer it adapts, and σ makes it impossible to fold into that layer's weights.
    """

    def __init__(self, d_model: int, bottleneck: int) -> None:
        super().__init__()
        for name, v in (("d_model", d_model), ("bottleneck", bottleneck)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.down = nn.Linear(d_model, bottleneck)
        self.up = nn.Linear(bottleneck, d_model)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.gelu(self.down(h)))


def add_bottleneck_adapters(model: nn.Module, bottleneck: int,
                            targets: Sequence[str] = ("o", "fc2")) -> nn.Module:
    """Put a :class:`BottleneckAdapter` after each Linear whose name ends with a target, in place.

    The defaults place one after the attention output projection and one after the MLP, as
    Houlsby et al. do in every transformer block (their "AdapterH").
    """
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.rpartition(".")[2] in targets]
    if not found:
        raise ValueError(f"no nn.Linear named {list(targets)} in the model")
    for name, layer in found:
        adapter = BottleneckAdapter(layer.out_features, bottleneck).to(layer.weight.device)
        replace_module(model, name, nn.Sequential(layer, adapter))
    return model


# --------------------------------------------------------------------------- switching

class AdapterSwitcher:
    """Switch one linear layer between merged adapters without accumulating rounding error.

    Keeps W0 in float32 (a *master copy*, as mixed-precision training does) and writes
    ``round(W0 + ΔW_name)`` into the layer's weight on each :meth:`switch`, so that the
    weight after any sequence of switches depends only on the last one. The price: one
    float32 copy of W0 (4 bytes per parameter) per adapted layer, kept on the host or device.
    """

    def __init__(self, layer: nn.Linear, deltas: Mapping[str, torch.Tensor]) -> None:
        """``deltas``: adapter name → ΔW = s·B A, shaped like ``layer.weight``."""
        for name, delta in deltas.items():
            if delta.shape != layer.weight.shape:
                raise ValueError(f"ΔW of {name!r} has shape {tuple(delta.shape)}, the layer's "
                                 f"weight {tuple(layer.weight.shape)}")
        self.layer = layer
        self.master = layer.weight.detach().to(torch.float32).clone()
        self.deltas = {n: d.detach().to(torch.float32) for n, d in deltas.items()}
        self.active: str | None = None

    @torch.no_grad()
    def switch(self, name: str | None) -> None:
        """Make the layer compute with W0 + ΔW_name (``None``: the base W0)."""
        if name is not None and name not in self.deltas:
            raise ValueError(f"unknown adapter {name!r}; have {sorted(self.deltas)}")
        target = self.master if name is None else self.master + self.deltas[name]
        self.layer.weight.copy_(target.to(self.layer.weight.dtype))
        self.active = name


# --------------------------------------------------------------------------- measuring

def interleaved_timings(fns: Mapping[str, Callable[[], object]], repeats: int = 10,
                        warmup: int = 2, clock: str = "wall") -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin so that machine noise (other
    processes, clock changes) hits every candidate alike rather than whichever ran last.

    Each round calls every function once, in a rotated order; on CUDA each call is
    synchronised. ``clock="wall"`` measures elapsed time (``time.perf_counter``).
    ``clock="thread"`` measures the CPU time of the calling thread (``time.thread_time``)
    with PyTorch limited to one thread for the duration: on a CPU shared with other
    processes this counts the work of the computation itself and not the time spent waiting
    for a core. Returns name → ``repeats`` timings (the ``warmup`` rounds are dropped).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if clock not in ("wall", "thread"):
        raise ValueError(f"clock must be 'wall' or 'thread', got {clock!r}")
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    now = time.perf_counter if clock == "wall" else time.thread_time
    threads = torch.get_num_threads()
    if clock == "thread":
        torch.set_num_threads(1)  # other threads' work would not show in this thread's clock
    try:
        for rnd in range(warmup + repeats):
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                sync()
                t0 = now()
                fns[name]()
                sync()
                if rnd >= warmup:
                    times[name].append(now() - t0)
    finally:
        torch.set_num_threads(threads)
    return times


def random_adapters(d: int, k: int, n: int, r: int, generator: torch.Generator,
                    scaling: float = 2.0) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``n`` random adapters ``task0 …`` for a d×k layer (A ~ N(0, 1/k), B ~ N(0, 0.01²))."""
    return {f"task{i}": (torch.randn(r, k, generator=generator) / k ** 0.5,
                         0.01 * torch.randn(d, r, generator=generator), scaling)
            for i in range(n)}


def multi_lora_gpt(model: nn.Module, n_adapters: int, r: int = 8,
                   targets: Sequence[str] = ("q", "v"), seed: int = 0) -> nn.Module:
    """Put ``n_adapters`` random LoRA adapters on the named Linears of ``model``, in place."""
    gen = torch.Generator().manual_seed(seed)
    chosen = {name: random_adapters(m.out_features, m.in_features, n_adapters, r, gen)
              for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name.rpartition(".")[2] in targets}
    inject_multi_lora(model, chosen)
    return model.to(next(model.parameters()).device)
