"""LoRA from scratch: the layer, the configuration, and putting it into a model.

LoRA (Hu et al., 2022) freezes a pretrained weight :math:`W_0 \\in \\mathbb{R}^{d\\times k}`
and learns a low-rank update :math:`\\Delta W = B A` with :math:`B \\in \\mathbb{R}^{d\\times r}`,
:math:`A \\in \\mathbb{R}^{r\\times k}` and :math:`r \\ll \\min(d, k)`:

.. math::  h = W_0 x + b + s\\, B A\\, \\mathrm{dropout}(x), \\qquad s = \\alpha / r
           \\;(\\text{or } \\alpha/\\sqrt{r} \\text{ with rsLoRA}).

Names follow Hugging Face PEFT wherever the idea is the same (``r``, ``lora_alpha``,
``lora_dropout``, ``bias``, ``target_modules``, ``use_rslora``, ``merge``, ``unmerge``), so what
a student learns here transfers. Shapes follow the paper: ``lora_A`` is r×k, ``lora_B`` is d×r.

**Variants plug in; this module does not import them.** LoRA's descendants (PiSSA's
initialisation, DoRA's layer, chapter 14) build on this module, so this module must not build on
them: dependencies point one way, ``variants → lora``. A variant registers what it adds:

* an initialisation method, ``register_init_method("pissa", pissa_init_, check=...)``:
  ``LoraConfig(init_lora_weights="pissa")`` then calls it on each new layer, and its ``check``
  refuses a bad rank in :func:`find_targets`, before :func:`inject_lora` changes anything;
* a layer class, ``register_layer_class("dora", DoRALinear)``: ``LoraConfig(use_dora=True)``
  then builds that class.

The registering happens when the variant's module is imported. So that
``LoraConfig(use_dora=True)`` works without the user importing that module first, the built-in
names are listed in :data:`BUILTIN_VARIANTS` with the *name* of the module that registers them
(a string, e.g. ``"lora_edu.variants"``). The first lookup of a built-in name that nobody has
registered yet imports that module by name (:func:`importlib.import_module`), and the module
registers itself as it loads. Nothing is imported when ``lora`` is imported, its code never
refers to a variant's class or function, and a variant of one's own needs no edit here: register
it (``register_init_method("my-init", fn)``) and use it by name. Two alternatives were weighed
and left: importing the variants from ``lora_edu/__init__.py`` (it would make
``import lora_edu`` pay for torch, which it deliberately does not) and package entry points
(they would need a reinstall to see a new variant).
"""

from __future__ import annotations

import copy
import importlib
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Union

import torch
from torch import nn

__all__ = [
    "LoraConfig", "LoRALinear", "inject_lora", "mark_only_lora_as_trainable", "merge_lora",
    "unmerge_lora", "merge_and_unload", "disable_adapters", "count_parameters", "lora_layers",
    "find_targets", "replace_module", "ModulesToSaveWrapper", "find_modules_to_save",
    "modules_to_save",
    "lora_summary_rows", "show_lora_summary",
    "register_init_method", "register_layer_class", "get_init_method", "get_layer_class",
    "init_options", "BUILTIN_VARIANTS",
]

#: Accepted values of ``LoraConfig.bias``: which biases train alongside the adapters.
BIAS_OPTIONS = ("none", "all", "lora_only")
#: Built-in variants: ``(kind, name)`` → the module that registers them when imported
#: (see the module docstring). ``kind`` is ``"init"`` (an ``init_lora_weights`` value) or
#: ``"layer"`` (a layer class; ``LoraConfig(use_dora=True)`` asks for ``"dora"``).
BUILTIN_VARIANTS: dict[tuple[str, str], str] = {
    ("init", "pissa"): "lora_edu.variants",
    ("layer", "dora"): "lora_edu.variants",
}
#: Initialisations this module implements itself (B = 0 unless ``False``).
_OWN_INITS: tuple[Any, ...] = (True, False, "gaussian")
#: Accepted values of ``init_lora_weights`` out of the box: this module's own and the built-in
#: variants' (``"pissa"``). :func:`init_options` adds any registered since.
INIT_OPTIONS: tuple[Any, ...] = _OWN_INITS + tuple(
    name for kind, name in BUILTIN_VARIANTS if kind == "init")

TargetModules = Union[Sequence[str], str]


# --------------------------------------------------------------------------- variant registry

@dataclass(frozen=True)
class InitMethod:
    """A registered ``init_lora_weights`` method.

    Attributes:
        init: ``init(layer)`` initialises a fresh :class:`LoRALinear` in place (A, B and, if
            the method needs to, the base weight).
        check: ``check(r, shape, where)`` raises ``ValueError`` if rank ``r`` cannot be used on
            a weight of ``shape`` (d, k); ``where`` names the module for the message. Called on
            every target before :func:`inject_lora` changes anything. ``None``: any rank.
    """

    init: Callable[[Any], Any]
    check: Callable[[int, tuple[int, ...], str], None] | None = None


_INIT_METHODS: dict[str, InitMethod] = {}
_LAYER_CLASSES: dict[str, type] = {}


def _same_object(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are one function or class (also across a module reload)."""
    key = lambda o: (getattr(o, "__module__", None), getattr(o, "__qualname__", None))
    return a is b or key(a) == key(b)


def _check_new_name(name: Any, taken: Any, new: Any, what: str) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"a {what} is registered under a non-empty string, got {name!r}")
    if taken is not None and not _same_object(taken, new):
        raise ValueError(f"{what} {name!r} is already registered ({taken!r}); pick another "
                         "name, or pass replace=True to override it")


def register_init_method(name: str, init: Callable[[Any], Any],
                         check: Callable[[int, tuple[int, ...], str], None] | None = None,
                         *, replace: bool = False) -> None:
    """Make ``init_lora_weights=name`` call ``init(layer)`` on each new :class:`LoRALinear`.

    ``check(r, shape, where)``, if given, refuses a rank before anything is modified (see
    :class:`InitMethod`). Registering the same function again (e.g. on a module reload) is a
    no-op; another function under a taken name needs ``replace=True``.
    """
    if name in _OWN_INITS:
        raise ValueError(f"init_lora_weights={name!r} is LoRA's own initialisation and cannot "
                         "be replaced; register the method under another name")
    if not callable(init) or (check is not None and not callable(check)):
        raise TypeError("init (and check, if given) must be callable: init(layer), "
                        "check(r, shape, where)")
    old = _INIT_METHODS.get(name)
    _check_new_name(name, None if replace or old is None else old.init, init,
                    "init_lora_weights method")
    _INIT_METHODS[name] = InitMethod(init, check)


def register_layer_class(name: str, cls: type, *, replace: bool = False) -> None:
    """Register a :class:`LoRALinear` subclass under ``name`` (``"dora"``: ``use_dora=True``).

    The class is built as ``cls(base, r, lora_alpha, lora_dropout, use_rslora=...,
    init_lora_weights=..., fan_in_fan_out=...)``, exactly like :class:`LoRALinear`.
    """
    if not (isinstance(cls, type) and issubclass(cls, LoRALinear)):
        raise TypeError(f"a LoRA layer class must subclass lora_edu.lora.LoRALinear, got "
                        f"{cls!r}")
    _check_new_name(name, None if replace else _LAYER_CLASSES.get(name), cls, "layer class")
    _LAYER_CLASSES[name] = cls


def _lookup(table: dict[str, Any], kind: str, name: str) -> Any:
    """``table[name]``, importing the built-in module that registers ``name`` if needed."""
    if name not in table and (kind, name) in BUILTIN_VARIANTS:
        importlib.import_module(BUILTIN_VARIANTS[(kind, name)])  # it registers itself
    try:
        return table[name]
    except KeyError:
        known = sorted(set(table) | {n for k, n in BUILTIN_VARIANTS if k == kind})
        raise ValueError(f"no {kind} variant named {name!r} is registered; known: {known} "
                         f"(register one with lora_edu.lora.register_{kind}_"
                         f"{'method' if kind == 'init' else 'class'})") from None


def get_init_method(name: str) -> InitMethod:
    """The registered :class:`InitMethod` for ``init_lora_weights=name`` (e.g. ``"pissa"``)."""
    return _lookup(_INIT_METHODS, "init", name)


def get_layer_class(name: str) -> type:
    """The registered layer class called ``name`` (``"dora"``: DoRA's layer)."""
    return _lookup(_LAYER_CLASSES, "layer", name)


def init_options() -> tuple[Any, ...]:
    """Every accepted ``init_lora_weights``: :data:`INIT_OPTIONS` and any registered since."""
    return INIT_OPTIONS + tuple(n for n in _INIT_METHODS if n not in INIT_OPTIONS)


# --------------------------------------------------------------------------- validation
# Shared by LoraConfig and LoRALinear so that both refuse bad input with the same words.

def _check_rank(r: Any) -> int:
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r (the LoRA rank) must be a positive int, got {type(r).__name__} {r!r}")
    if r <= 0:
        raise ValueError(f"r (the LoRA rank) must be a positive int, got {r}; "
                         "use e.g. r=8 (the rank of ΔW = B A)")
    return r


def _check_alpha(lora_alpha: Any) -> float:
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)):
        raise TypeError(f"lora_alpha must be a number, got {type(lora_alpha).__name__}")
    if not math.isfinite(lora_alpha) or lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be a finite positive number, got {lora_alpha}; "
                         "a common choice is lora_alpha = 2 * r")
    return lora_alpha


def _check_dropout(p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"lora_dropout must be a float in [0, 1), got {type(p).__name__}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"lora_dropout must lie in [0, 1), got {p}; "
                         "p = 1 would drop every input of the LoRA branch")
    return float(p)


def _check_init(init: Any) -> Any:
    options = init_options()
    if not (isinstance(init, bool) or (isinstance(init, str) and init in options)):
        raise ValueError(f"init_lora_weights must be one of {options}, got {init!r}")
    return init


def _check_bias(bias: Any) -> str:
    if bias not in BIAS_OPTIONS:
        raise ValueError(f"bias must be one of {BIAS_OPTIONS}, got {bias!r}")
    return bias


#: PEFT's shorthand for "every linear layer but the output layer".
ALL_LINEAR = "all-linear"


def _check_modules_to_save(names: Any) -> list[str] | None:
    """``None`` or a list of module names; a bare string is refused, as PEFT refuses it."""
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, Sequence) or not all(
            isinstance(n, str) and n for n in names):
        raise TypeError("modules_to_save must be None or a list of module names (e.g. "
                        f"['score'] or ['classifier']), got {names!r}")
    return list(names)


def _check_targets(target_modules: Any) -> list[str] | str:
    if target_modules == ALL_LINEAR:
        return ALL_LINEAR
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules is a string, so it is read as a regular "
                             f"expression, but {target_modules!r} does not compile: {err}"
                             ) from None
        return target_modules
    if (not isinstance(target_modules, Sequence) or not target_modules
            or not all(isinstance(t, str) and t for t in target_modules)):
        raise TypeError("target_modules must be a non-empty list of module names (e.g. "
                        f"['q', 'v']) or a regex string, got {target_modules!r}")
    return list(target_modules)


# --------------------------------------------------------------------------- configuration

@dataclass
class LoraConfig:
    """What to adapt and how; the fields mean what they mean in ``peft.LoraConfig``.

    Attributes:
        r: rank of ΔW = B A (B is d×r, A is r×k).
        lora_alpha: α in the scaling s = α/r (or α/√r when ``use_rslora``).
        lora_dropout: dropout probability on the LoRA branch's input, in [0, 1).
        bias: which biases train: ``"none"``, ``"all"`` (every bias in the model) or
            ``"lora_only"`` (biases of the adapted layers).
        target_modules: a list (a module matches if its name equals an entry or ends with
            ``"." + entry``), a string (a regex that must match the whole name), or
            ``"all-linear"``: every linear layer except the output layer (a transformers
            model's ``get_output_embeddings()``, else a top-level ``lm_head``). A deliberate
            difference from PEFT 0.21.2, whose ``"all-linear"`` leaves the output layer out
            only when the model is a transformers ``PreTrainedModel``: on a plain
            ``nn.Module`` such as :class:`lora_edu.models.GPT` PEFT adapts ``lm_head`` too.
        use_rslora: rank-stabilised scaling s = α/√r (Kalajdzievski, 2023).
        init_lora_weights: ``True``: A Kaiming-uniform as in PEFT, B = 0; ``"gaussian"``:
            A ~ N(0, 1/r²) as in PEFT's reading of the paper, B = 0; ``False``: A and B both
            random, so ΔW ≠ 0 from the start (for tests only); ``"pissa"``: A, B from the
            top-r SVD of W0, which keeps the residual (:func:`lora_edu.variants.pissa_init_`);
            or any name given to :func:`register_init_method`.
        fan_in_fan_out: the target stores its weight as (k, d), as GPT-2's ``Conv1D`` does.
        use_dora: weight-decomposed LoRA (Liu et al., 2024): targets become the layer class
            registered as ``"dora"`` (:class:`lora_edu.variants.DoRALinear`), with a
            trainable magnitude per output.
        modules_to_save: modules trained in full beside the adapters, typically a new
            classification head (``["score"]`` on a transformers ``*ForSequenceClassification``
            Llama, ``["classifier"]`` on BERT-like models). As in PEFT, each module whose name
            ends with an entry (a plain suffix match: ``"classifier"`` also matches
            ``"pre_classifier"``) is wrapped in a :class:`ModulesToSaveWrapper` that keeps the
            original, frozen, and trains a copy; LoRA never targets such a module or anything
            inside it. Where lora_edu deliberately differs from PEFT 0.21.2: an entry that
            matches no module makes :func:`inject_lora` raise ``ValueError`` (PEFT ignores
            it silently), and a module that ``target_modules`` names explicitly and that is
            also a module to save raises ``ValueError`` (PEFT raises ``TypeError``), rather
            than silently dropping its LoRA layer; ``"all-linear"`` leaves modules to save
            out, as PEFT's leaves classification heads out.

    Validated on creation; a bad value raises ``ValueError``/``TypeError`` naming the field.
    To extend, add a field and check it in :meth:`validate`.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    bias: str = "none"
    target_modules: TargetModules = field(default_factory=lambda: ["q", "v"])
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    fan_in_fan_out: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first bad field (also after edits)."""
        _check_rank(self.r)
        _check_alpha(self.lora_alpha)
        self.lora_dropout = _check_dropout(self.lora_dropout)
        _check_bias(self.bias)
        self.target_modules = _check_targets(self.target_modules)
        _check_init(self.init_lora_weights)
        self.modules_to_save = _check_modules_to_save(self.modules_to_save)
        for flag in ("use_rslora", "fan_in_fan_out", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be True or False, got {getattr(self, flag)!r}")

    @property
    def scaling(self) -> float:
        """s = α/r, or α/√r with rsLoRA."""
        return lora_scaling(self.lora_alpha, self.r, self.use_rslora)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary; ``LoraConfig(**d)`` rebuilds the config."""
        return asdict(self)


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor s in h = W0 x + s·B A x: α/r, or α/√r for rank-stabilised LoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


# --------------------------------------------------------------------------- the layer

def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``transformers.Conv1D``: a linear layer whose weight is stored as (k, d)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    ``forward(x)`` computes, for ``x`` of shape (..., k) and an output of shape (..., d):

        h = W0 x + b + s · B A dropout(x)          (s = α/r, or α/√r with rsLoRA)

    as ``base(x) + (dropout(x) @ A.T) @ B.T * s``: two thin matmuls through the rank-r
    bottleneck, never the d×k product B A (that would cost d·k memory and time per step).

    Attributes:
        base: the wrapped ``nn.Linear`` (weight d×k); frozen by :func:`inject_lora`.
        lora_A: ``nn.Parameter`` of shape (r, k).
        lora_B: ``nn.Parameter`` of shape (d, r), zero at initialisation so that h = W0 x + b.
        scaling: s.
        merged: whether s·B A is currently added into ``base.weight``.
        disabled: set by :func:`disable_adapters`; the layer then computes W0 x + b only.

    With fp16/bf16 base weights, A and B are kept in float32 (as PEFT does by default): the
    LoRA branch runs in float32 and is cast back, and merging computes ΔW in float32.
    """

    def __init__(self, base: nn.Module, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, *, use_rslora: bool = False,
                 init_lora_weights: bool | str = True, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        self._check_base(base, fan_in_fan_out)
        self.r = _check_rank(r)
        self.lora_alpha = _check_alpha(lora_alpha)
        p = _check_dropout(lora_dropout)
        _check_init(init_lora_weights)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(lora_alpha, r, use_rslora)
        self.fan_in_fan_out = fan_in_fan_out
        self.base = base
        weight = base.weight
        self.out_features, self.in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
        # Half-precision adapters lose small updates to rounding; keep them in fp32 like PEFT.
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        factory = {"device": weight.device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.lora_dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        self.reset_lora_parameters(init_lora_weights)

    @staticmethod
    def _check_base(base: nn.Module, fan_in_fan_out: bool) -> None:
        if fan_in_fan_out:
            if not _is_conv1d(base):
                raise ValueError(f"fan_in_fan_out=True means a weight stored as (in, out), like "
                                 f"GPT-2's Conv1D, but the target is a {type(base).__name__} "
                                 "(weight stored as (out, in)); set fan_in_fan_out=False")
        elif not isinstance(base, nn.Linear):
            hint = "; set fan_in_fan_out=True for GPT-2's Conv1D" if _is_conv1d(base) else ""
            raise TypeError(f"LoRALinear wraps an nn.Linear, got a {type(base).__name__}{hint}")

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        """(Re)initialise A and B; B = 0 unless ``init_lora_weights is False``.

        A name that is not LoRA's own (``"pissa"``) calls the registered method's ``init``.
        """
        if init_lora_weights not in _OWN_INITS:
            get_init_method(init_lora_weights).init(self)
            return
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)  # PEFT's choice; the paper gives no σ
        else:
            # nn.Linear's own default init, as PEFT and the reference loralib use.
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)  # ΔW = 0: training starts exactly at the base model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = W0 x + b + s·B A dropout(x); x: (..., k) → (..., d)."""
        result = self.base(x)
        if self.merged or self.disabled:
            return result
        x = self.lora_dropout(x.to(self.lora_A.dtype))
        return result + ((x @ self.lora_A.T) @ self.lora_B.T * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·B A, shaped like ``base.weight`` ((d, k), or (k, d) if fan_in_fan_out).

        Computed in float32 at least (float64 stays float64), whatever the weights' dtype.
        """
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        delta = (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """W ← W0 + s·B A, so that inference costs one matmul. A no-op if already merged.

        The sum is formed in float32 and rounded once to the weight's dtype. With
        ``safe_merge=True`` a non-finite result raises ``ValueError`` and the weight is untouched.
        """
        if self.merged:
            return  # merging twice would add ΔW twice
        weight = self.base.weight
        delta = self.delta_weight()
        merged = (weight.to(delta.dtype) + delta).to(weight.dtype)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError("safe_merge: W0 + s·B A has non-finite entries; the adapter is "
                             "broken (check A and B for inf/NaN); the base weight is unchanged")
        weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W − s·B A, undoing :meth:`merge` (exact up to rounding). A no-op if not merged."""
        if not self.merged:
            return
        weight = self.base.weight
        delta = self.delta_weight()
        weight.copy_((weight.to(delta.dtype) - delta).to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}, "
                f"merged={self.merged}")


# --------------------------------------------------------------------------- modules to save

class ModulesToSaveWrapper(nn.Module):
    """A module trained in full beside the adapters, kept as PEFT's ``ModulesToSaveWrapper``.

    LoRA adds a low-rank update to existing weights, but a new classification head has no
    pretrained weights to update: it is trained in full. PEFT keeps the original and trains a
    copy, so that switching the adapters off gives back the base model exactly, head included:

    * ``original_module``: the module as it was, frozen;
    * ``modules_to_save["default"]``: a deep copy, trainable (``"default"`` is the adapter name
      PEFT uses; lora_edu has one adapter per model);
    * ``forward`` calls the copy, or the original while ``disabled`` is set (by
      :func:`disable_adapters`).

    The parameter names are PEFT's (``score.original_module.weight``,
    ``score.modules_to_save.default.weight``), and an adapter file stores the copy's
    ``state_dict()`` under the module's own name (``base_model.model.score.weight`` in PEFT's
    layout). Attributes the wrapper lacks (``.weight``, ``.out_features``) are read from the
    module in use, as in PEFT.
    """

    ADAPTER_NAME = "default"

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"ModulesToSaveWrapper wraps an nn.Module, got {type(module).__name__}")
        if isinstance(module, (ModulesToSaveWrapper, LoRALinear)):
            raise TypeError(f"cannot wrap a {type(module).__name__}: a module to save is trained "
                            "in full, so it carries no LoRA and is wrapped once")
        self.original_module = module
        self.modules_to_save = nn.ModuleDict({self.ADAPTER_NAME: copy.deepcopy(module)})
        self.disabled = False
        self.original_module.requires_grad_(False)
        for param in self.trainable_module.parameters():
            param.requires_grad_(param.is_floating_point() or param.is_complex())

    @property
    def trainable_module(self) -> nn.Module:
        """The trained copy, ``modules_to_save["default"]``."""
        return self.modules_to_save[self.ADAPTER_NAME]

    def active_module(self) -> nn.Module:
        """The module ``forward`` calls: the original while disabled, else the trained copy."""
        return self.original_module if self.disabled else self.trainable_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise  # not built yet: forwarding would recurse
            return getattr(self.active_module(), name)


def _modules_to_save_wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            yield name, module


def modules_to_save(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` wrapped as modules to save (after :func:`inject_lora`)."""
    return [name for name, _ in _modules_to_save_wrappers(model)]


def find_modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules that ``config.modules_to_save`` makes :func:`inject_lora` wrap.

    PEFT's rule: a module is chosen when its name ends with an entry (plain ``str.endswith``,
    so ``"classifier"`` matches ``"pre_classifier"`` too). A chosen module's submodules are
    not chosen again, and nothing inside a LoRA layer is.

    Raises:
        ValueError: an entry matches no module (the message names it and lists the module
            names there are), or the model already has modules to save.
    """
    entries = config.modules_to_save or []
    if not entries:
        return []
    already = modules_to_save(model)
    if already:
        raise ValueError(f"module {already[0]!r} is already a module to save; inject_lora was "
                         "called twice (load weights with lora_edu.adapters.load_adapter instead)")
    inside = [n for n, _ in lora_layers(model)]
    names = [n for n, _ in model.named_modules() if n]
    unmatched = [e for e in entries if not any(n.endswith(e) for n in names)]
    if unmatched:
        short = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(f"modules_to_save entry {unmatched[0]!r} matches no module of the "
                         f"model; module names end with one of {short}")
    chosen: list[str] = []
    for name in names:
        if any(name.startswith(p + ".") for p in inside + chosen):
            continue
        if any(name.endswith(e) for e in entries):
            chosen.append(name)
    if not chosen:
        raise ValueError(f"modules_to_save={entries} matches only modules inside LoRA layers; "
                         "name the module itself")
    return chosen


def _is_saved(name: str, saved: Sequence[str]) -> bool:
    """Whether module ``name`` is one of ``saved`` or inside one."""
    return any(name == s or name.startswith(s + ".") for s in saved)


# --------------------------------------------------------------------------- model level

def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every ``(name, LoRALinear)`` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _output_layer_names(model: nn.Module) -> set[str]:
    """Names of the modules that produce the logits (``"all-linear"`` leaves them out; PEFT's
    does so only for a transformers ``PreTrainedModel``).

    A transformers model names its own (``get_output_embeddings``); otherwise a top-level
    ``lm_head`` is taken to be the output layer, as in :class:`lora_edu.models.GPT`.
    """
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else getattr(model, "lm_head", None)
    return {n for n, m in model.named_modules() if head is not None and m is head}


def _all_linear(model: nn.Module) -> list[str]:
    """Every ``nn.Linear`` (or GPT-2 ``Conv1D``) except the output layer, as PEFT's
    ``target_modules="all-linear"`` chooses them."""
    skip = _output_layer_names(model)
    return [n for n, m in model.named_modules()
            if n and n not in skip and (isinstance(m, nn.Linear) or _is_conv1d(m))]


def _matches(name: str, target_modules: TargetModules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules ``inject_lora`` would adapt; raises if they are not adaptable.

    Raises:
        ValueError: nothing matches (the message lists the Linear layers that exist), or a
            match already carries LoRA.
        TypeError: a match is not an ``nn.Linear`` (nor a ``Conv1D`` with ``fan_in_fan_out``).
    """
    inside_lora = {f"{n}.{c}" for n, _ in lora_layers(model) for c in ("base", "lora_dropout")}
    saved = find_modules_to_save(model, config)  # raises for a name that matches nothing
    if config.target_modules == ALL_LINEAR:
        already = [n for n, _ in lora_layers(model)]
        if already:  # the loop below would never see them: a LoRALinear is no nn.Linear
            raise ValueError(f"module {already[0]!r} already has LoRA; inject_lora was called "
                             "twice (load weights with lora_edu.adapters.load_adapter instead)")
        names = _all_linear(model)
    else:
        names = [n for n, _ in model.named_modules()
                 if n and n not in inside_lora and _matches(n, config.target_modules)]
    # LoRA never goes on a module to save or inside one: the copy is trained whole. "all-linear"
    # leaves them out (PEFT's "all-linear" skips classification heads too); a target that names
    # one explicitly is a contradiction, which PEFT 0.21.2 refuses with a TypeError.
    clash = [n for n in names if _is_saved(n, saved)]
    if clash and config.target_modules != ALL_LINEAR:
        raise ValueError(f"module {clash[0]!r} is both a LoRA target (target_modules="
                         f"{config.target_modules!r}) and a module to save (modules_to_save="
                         f"{config.modules_to_save}); a module to save is trained in full: "
                         "remove it from one of the two")
    names = [n for n in names if not _is_saved(n, saved)]
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        also = f" (modules_to_save={config.modules_to_save} are trained whole)" if saved else ""
        raise ValueError(f"target_modules={config.target_modules!r} matches no module{also}; "
                         f"the nn.Linear layers are: {linears}")
    modules = dict(model.named_modules())
    check = (None if config.init_lora_weights in _OWN_INITS
             else get_init_method(config.init_lora_weights).check)
    for name in names:
        module = modules[name]
        if isinstance(module, LoRALinear):
            raise ValueError(f"module {name!r} already has LoRA; inject_lora was called twice "
                             "(load weights with lora_edu.adapters.load_adapter instead)")
        try:
            LoRALinear._check_base(module, config.fan_in_fan_out)
        except (TypeError, ValueError) as err:
            raise type(err)(f"target module {name!r}: {err}") from None
        if check is not None:  # e.g. PiSSA's r <= min(d, k), before anything changes
            check(config.r, tuple(module.weight.shape), f"target module {name!r}")
    return names


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``model.get_submodule(name)`` is (``name`` as in ``named_modules()``).

    ``nn.Module.set_submodule`` does this from torch 2.3 on; the package supports torch 2.1.
    """
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def inject_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Replace each targeted linear layer of ``model`` by a :class:`LoRALinear`, in place.

    Everything but the LoRA weights (and the biases that ``config.bias`` names) is frozen.
    Each module named by ``config.modules_to_save`` is wrapped in a
    :class:`ModulesToSaveWrapper`: the original frozen, a trainable copy in use.
    All targets are checked before anything changes, so a bad config leaves ``model`` as it was.
    The config is kept as ``model.lora_config`` for saving.

    Returns:
        ``model`` itself.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a lora_edu.lora.LoraConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config.validate()  # a dataclass's fields can have been edited since it was created
    names = find_targets(model, config)
    saved = find_modules_to_save(model, config)
    layer_cls = get_layer_class("dora") if config.use_dora else LoRALinear
    for name in names:
        replace_module(model, name, layer_cls(
            model.get_submodule(name), config.r, config.lora_alpha, config.lora_dropout,
            use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights,
            fan_in_fan_out=config.fan_in_fan_out))
    for name in saved:
        replace_module(model, name, ModulesToSaveWrapper(model.get_submodule(name)))
    model.lora_config = config
    mark_only_lora_as_trainable(model, config.bias)
    return model


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze every parameter except ``lora_A``/``lora_B`` (and DoRA's ``magnitude``), the
    biases ``bias`` names and the trained copies of modules to save (their originals stay
    frozen whatever ``bias`` says, as in PEFT)."""
    _check_bias(bias)
    wrappers = modules_to_save(model)
    copies = tuple(f"{n}.modules_to_save." for n in wrappers)
    originals = tuple(f"{n}.original_module." for n in wrappers)
    lora_bias_names = {f"{n}.base.bias" for n, _ in lora_layers(model)}
    magnitudes = {f"{n}.magnitude" for n, layer in lora_layers(model)
                  if hasattr(layer, "magnitude")}
    for name, param in model.named_parameters():
        short = name.rsplit(".", 1)[-1]
        if name.startswith(copies) or name.startswith(originals):
            param.requires_grad_(name.startswith(copies) and param.is_floating_point())
            continue
        param.requires_grad_(
            short in ("lora_A", "lora_B") or name in magnitudes
            or (bias == "all" and short == "bias")
            or (bias == "lora_only" and name in lora_bias_names))


def merge_lora(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merge every LoRA layer (W ← W0 + s·B A); merged layers are left as they are."""
    for _, layer in lora_layers(model):
        layer.merge(safe_merge=safe_merge)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora` on every merged LoRA layer."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merge every LoRA layer and put its plain base layer back, for deployment.

    Afterwards ``model`` has its original architecture with weights W0 + s·B A, so inference
    costs exactly what the base model costs; each module to save is replaced by its trained
    copy (as PEFT's ``merge_and_unload`` does). A and B and the original modules are dropped:
    this cannot be undone. With ``safe_merge`` a non-finite result raises ``ValueError`` and
    every layer is left unmerged.
    """
    layers = list(lora_layers(model))
    done: list[LoRALinear] = []
    try:
        for _, layer in layers:
            layer.merge(safe_merge=safe_merge)
            done.append(layer)
    except ValueError:
        for layer in done:
            layer.unmerge()
        raise
    for name, layer in layers:
        replace_module(model, name, layer.base)
    for name, wrapper in list(_modules_to_save_wrappers(model)):
        replace_module(model, name, wrapper.trainable_module)
    if "lora_config" in vars(model):
        del model.lora_config
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``model`` computes the base model's outputs (s·B A switched off).

    Merged layers are unmerged on entry and merged again on exit (so W0 is restored up to
    floating-point rounding). Modules to save use their original, untrained module. Biases
    trained with ``bias="all"``/``"lora_only"`` stay as trained: only with ``bias="none"`` is
    the result exactly the pretrained model. As PEFT's ``disable_adapter`` does, the trained
    copies of modules to save stop requiring grad inside the block (nothing in use trains);
    their flags are restored on exit.
    """
    layers = [layer for _, layer in lora_layers(model)]
    wrappers = [wrapper for _, wrapper in _modules_to_save_wrappers(model)]
    was_merged = [layer.merged for layer in layers]
    copies = [p for w in wrappers for p in w.trainable_module.parameters()]
    flags = [p.requires_grad for p in copies]
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    for wrapper in wrappers:
        wrapper.disabled = True
    for p in copies:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for layer, merged in zip(layers, was_merged):
            layer.disabled = False
            if merged:
                layer.merge()
        for wrapper in wrappers:
            wrapper.disabled = False
        for p, flag in zip(copies, flags):
            p.requires_grad_(flag)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters are counted once.

    This is what PEFT's ``get_nb_trainable_parameters`` counts: a module to save counts twice
    in the total (the frozen original and the trained copy) and once in the trainable part.
    """
    params = {id(p): p for p in model.parameters()}.values()
    return (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def lora_summary_rows(model: nn.Module) -> list[tuple[Any, ...]]:
    """One row per LoRA layer: name, d×k, r, s, base parameters d·k, LoRA parameters r(d+k)."""
    return [(name, f"{layer.out_features}×{layer.in_features}", layer.r, float(layer.scaling),
             layer.out_features * layer.in_features,
             layer.r * (layer.out_features + layer.in_features))
            for name, layer in lora_layers(model)]


def show_lora_summary(model: nn.Module, title: str | None = "LoRA layers") -> Any:
    """A rich table of what was adapted, followed by the trainable / total counts."""
    from lora_edu.report import show_table

    rows = lora_summary_rows(model)
    trainable, total = count_parameters(model)
    rows.append(("whole model: all, trainable", "", "", "", total, trainable))
    return show_table(rows, ["module", "d×k", "r", "s", "W0: d·k", "LoRA: r(d+k)"],
                      title=title)
