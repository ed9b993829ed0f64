"""Saving and loading LoRA adapters: a small directory of safetensors + JSON, never pickle.

An adapter is what training changed: every ``lora_A`` (r×k) and ``lora_B`` (d×r), the
biases that ``LoraConfig.bias`` made trainable, and the whole trained copy of each module to
save (``LoraConfig.modules_to_save``, e.g. a classification head). Two layouts are supported:

* lora_edu's own (:func:`save_adapter` / :func:`load_adapter`): ``lora_edu_adapter.safetensors``
  whose keys are the model's own parameter names (``blocks.0.attn.q.lora_A``), and
  ``lora_edu_config.json`` with the :class:`~lora_edu.lora.LoraConfig`.
* Hugging Face PEFT's (:func:`save_peft_adapter` / :func:`load_peft_adapter`):
  ``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` (and,
  for a module to save, its ``state_dict()`` under ``base_model.model.<module>.<key>``, the
  name PEFT's ``ModulesToSaveWrapper`` saves it under) and ``adapter_config.json``, which
  ``peft.PeftModel.from_pretrained(base, dir)`` reads.

Loading checks everything first (the file is safetensors, the config is valid, the keys are
exactly the expected ones, every shape and the rank match) and only then touches the model,
so a bad adapter raises and leaves the model exactly as it was. safetensors files hold raw
tensors only: unlike ``torch.load`` of a pickle, opening one cannot run code.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lora_edu.lora import (INIT_OPTIONS, LoraConfig, LoRALinear, ModulesToSaveWrapper,
                           find_modules_to_save, find_targets, inject_lora, lora_layers,
                           modules_to_save)

__all__ = ["save_adapter", "load_adapter", "save_peft_adapter", "load_peft_adapter",
           "WEIGHTS_NAME", "CONFIG_NAME", "PEFT_WEIGHTS_NAME", "PEFT_CONFIG_NAME"]

WEIGHTS_NAME = "lora_edu_adapter.safetensors"
CONFIG_NAME = "lora_edu_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
_FORMAT = "lora_edu-adapter/1"
_PEFT_PREFIX = "base_model.model."
#: Where a module to save keeps its trained copy: ``<module>.modules_to_save.default.<key>``.
_SAVED_COPY = f".modules_to_save.{ModulesToSaveWrapper.ADAPTER_NAME}."

PathLike = str | Path


# --------------------------------------------------------------------------- what an adapter is

def _saved_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """The modules to save: those already wrapped, or those inject_lora would wrap."""
    return modules_to_save(model) or find_modules_to_save(model, config)


def _adapter_names(model: nn.Module, config: LoraConfig, targets: list[str]) -> dict[str, tuple]:
    """Expected ``{parameter name after injection: shape}`` of the adapter for ``model``.

    Works before injection too (``targets`` are then the modules inject_lora would wrap), so a
    file can be checked against a bare model before the model is changed. A module to save
    contributes its whole ``state_dict()`` (buffers included, as PEFT saves it).
    """
    modules = dict(model.named_modules())
    expected: dict[str, tuple] = {}
    saved = _saved_names(model, config)
    for name in saved:
        module = modules[name]
        inner = module.trainable_module if isinstance(module, ModulesToSaveWrapper) else module
        for key, value in inner.state_dict().items():
            expected[f"{name}{_SAVED_COPY}{key}"] = tuple(value.shape)
    for name in targets:
        module = modules[name]
        base = module.base if isinstance(module, LoRALinear) else module
        d, k = base.weight.shape[::-1] if config.fan_in_fan_out else base.weight.shape
        expected[f"{name}.lora_A"] = (config.r, k)
        expected[f"{name}.lora_B"] = (d, config.r)
        if config.use_dora:  # DoRA's trained magnitude, one per output
            expected[f"{name}.magnitude"] = (d,)
        if config.bias == "lora_only" and getattr(base, "bias", None) is not None:
            expected[f"{name}.base.bias"] = tuple(base.bias.shape)
    if config.bias == "all":
        wrapped = set(targets)  # a target's bias is renamed "<target>.base.bias" by injection
        for pname, param in model.named_parameters():
            owner, _, short = pname.rpartition(".")
            if short == "bias" and not any(owner == s or owner.startswith(s + ".")
                                           for s in saved):
                expected[f"{owner}.base.bias" if owner in wrapped else pname] = tuple(param.shape)
    return expected


def _settings(source: LoraConfig | LoRALinear) -> dict[str, Any]:
    """The fields that decide what an adapter's tensors mean, from a config or a layer."""
    return {"r": source.r, "lora_alpha": float(source.lora_alpha),
            "use_rslora": source.use_rslora, "fan_in_fan_out": source.fan_in_fan_out,
            "use_dora": getattr(source, "use_dora", hasattr(source, "magnitude"))}


def _model_targets(model: nn.Module, config: LoraConfig) -> tuple[list[str], bool]:
    """(targets, already_injected); refuses a model whose LoRA layers differ from ``config``."""
    layers = dict(lora_layers(model))
    if not layers:
        return find_targets(model, config), False
    entries, wrapped = config.modules_to_save or [], modules_to_save(model)
    if (any(not any(n.endswith(e) for e in entries) for n in wrapped)
            or any(not any(n.endswith(e) for n in wrapped) for e in entries)):
        raise ValueError(f"the adapter has modules_to_save={config.modules_to_save} but the "
                         f"model's modules to save are {wrapped}; load it into a model without "
                         "LoRA (it is then injected with the adapter's config)")
    wanted = _settings(config)
    for name, layer in layers.items():
        has = _settings(layer)
        diff = [f for f in wanted if has[f] != wanted[f]]
        if diff:
            theirs = ", ".join(f"{f}={wanted[f]}" for f in diff)
            mine = ", ".join(f"{f}={has[f]}" for f in diff)
            raise ValueError(
                f"the adapter has {theirs} but LoRA layer {name!r} of the model has {mine}; "
                "load it into a model without LoRA (it is then injected with the adapter's "
                "config) or inject LoRA with the same config first")
        if layer.merged:
            raise ValueError(f"LoRA layer {name!r} is merged; call unmerge_lora(model) before "
                             "loading new adapter weights (W would keep the old ΔW otherwise)")
    return list(layers), True


# --------------------------------------------------------------------------- reading files

def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no adapter config at {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"no adapter weights at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); adapters are "
                         "saved with save_adapter / save_peft_adapter") from None


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple],
                   r: int, source: Path) -> None:
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{source} does not fit this model: missing keys {missing}, "
                         f"unexpected keys {extra}; was it saved from a model with the same "
                         "target modules?")
    for key, shape in expected.items():
        got = tuple(tensors[key].shape)
        if got != shape:
            hint = ""
            if key.endswith("lora_A") and len(got) == 2 and got[0] != r:
                hint = f" (a rank-{got[0]} A, but the config says r={r})"
            raise ValueError(f"{source}: {key} has shape {got}, expected {shape}{hint}")
        if _SAVED_COPY in key:  # a saved module's buffers may be integers (BatchNorm's count)
            continue
        if not tensors[key].is_floating_point():
            raise ValueError(f"{source}: {key} has dtype {tensors[key].dtype}, expected a float")


def _install(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor],
             source: Path) -> nn.Module:
    """Validate ``tensors`` against ``model`` completely, then inject (if needed) and copy."""
    targets, injected = _model_targets(model, config)
    _check_tensors(tensors, _adapter_names(model, config, targets), config.r, source)
    if not injected:
        inject_lora(model, config)
    params = _named_tensors(model)
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value)
    return model


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name (a module to save is saved with its buffers)."""
    return {**dict(model.named_buffers()), **dict(model.named_parameters())}


def _saved_config(model: nn.Module) -> LoraConfig:
    config = getattr(model, "lora_config", None)
    if not isinstance(config, LoraConfig) or not list(lora_layers(model)):
        raise ValueError("model has no LoRA to save: add it with lora_edu.lora.inject_lora "
                         "(which also records model.lora_config)")
    return config


def _adapter_state(model: nn.Module, config: LoraConfig) -> dict[str, torch.Tensor]:
    expected = _adapter_names(model, config, [n for n, _ in lora_layers(model)])
    params = _named_tensors(model)
    # safetensors wants contiguous CPU tensors that share no storage.
    return {key: params[key].detach().to("cpu").contiguous().clone() for key in expected}


# --------------------------------------------------------------------------- lora_edu format

def save_adapter(model: nn.Module, directory: PathLike) -> Path:
    """Write ``model``'s adapter to ``directory`` (created if needed); returns the directory.

    Files: ``lora_edu_adapter.safetensors`` (the tensors) and ``lora_edu_config.json``.
    """
    config = _saved_config(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(_adapter_state(model, config), str(out / WEIGHTS_NAME), metadata={"format": _FORMAT})
    meta = {"format": _FORMAT, "config": config.to_dict()}
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_adapter(model: nn.Module, directory: PathLike) -> nn.Module:
    """Load an adapter written by :func:`save_adapter` into ``model``; returns ``model``.

    A model without LoRA gets it injected with the saved config; a model with LoRA must have
    the same rank, α and targets. Everything is checked before the model changes.
    """
    src = Path(directory)
    meta = _read_json(src / CONFIG_NAME)
    if meta.get("format") != _FORMAT or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{src / CONFIG_NAME} is not a lora_edu adapter config (format "
                         f"{meta.get('format')!r}); for a PEFT adapter use load_peft_adapter")
    config = _config_from_dict(meta["config"], src / CONFIG_NAME)
    return _install(model, config, _read_safetensors(src / WEIGHTS_NAME), src / WEIGHTS_NAME)


def _config_from_dict(data: dict[str, Any], source: Path) -> LoraConfig:
    known = {f.name for f in fields(LoraConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{source}: unknown config fields {unknown}")
    try:
        return LoraConfig(**data)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{source}: {err}") from None


# --------------------------------------------------------------------------- PEFT format

def _to_peft_key(key: str) -> str:
    """Our name → PEFT's: ``0.q.lora_A`` → ``base_model.model.0.q.lora_A.weight``,
    ``0.q.base.bias`` → ``base_model.model.0.q.base_layer.bias``, and a module to save's
    ``score.modules_to_save.default.weight`` → ``base_model.model.score.weight`` (PEFT's
    ``ModulesToSaveWrapper`` drops the adapter name when it saves)."""
    if _SAVED_COPY in key:
        return _PEFT_PREFIX + key.replace(_SAVED_COPY, ".", 1)
    owner, _, short = key.rpartition(".")
    if short in ("lora_A", "lora_B"):
        return f"{_PEFT_PREFIX}{key}.weight"
    if short == "magnitude":
        return f"{_PEFT_PREFIX}{owner}.lora_magnitude_vector"
    if owner.endswith(".base") or owner == "base":
        owner = owner[: -len("base")] + "base_layer"
    return f"{_PEFT_PREFIX}{owner}.{short}"


def _from_peft_key(key: str, saved: list[str] | tuple[str, ...] = ()) -> str:
    """The inverse of :func:`_to_peft_key`, given the names of the modules to save; a key it
    cannot map comes back as it is, so that the key check reports it as unexpected."""
    if not key.startswith(_PEFT_PREFIX):
        return key
    name = key[len(_PEFT_PREFIX):]
    for module in saved:
        if name.startswith(module + "."):
            return module + _SAVED_COPY + name[len(module) + 1:]
    if name.endswith(".lora_magnitude_vector"):
        return name[: -len("lora_magnitude_vector")] + "magnitude"
    for ab in ("lora_A", "lora_B"):
        if name.endswith(f".{ab}.weight"):
            return name[: -len(".weight")]
    return name.replace(".base_layer.", ".base.") if ".base_layer." in name else name


def save_peft_adapter(model: nn.Module, directory: PathLike) -> Path:
    """Write ``model``'s adapter in PEFT's layout; returns the directory.

    ``peft.PeftModel.from_pretrained(base, directory)`` loads it onto the base model.
    """
    config = _saved_config(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {_to_peft_key(k): v for k, v in _adapter_state(model, config).items()}
    save_file(state, str(out / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    peft_config = _peft_config(config)
    if config.target_modules == "all-linear":
        # PEFT resolves "all-linear" itself, and on a model that is not a transformers model it
        # would also pick the output layer: name the adapted layers so that both sides agree.
        peft_config["target_modules"] = sorted({n.rsplit(".", 1)[-1] for n, _ in lora_layers(model)})
    (out / PEFT_CONFIG_NAME).write_text(json.dumps(peft_config, indent=2) + "\n")
    return out


def _peft_config(config: LoraConfig) -> dict[str, Any]:
    """The fields ``peft.LoraConfig`` needs; the others take PEFT's defaults."""
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
        "inference_mode": True, "r": config.r, "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout, "bias": config.bias,
        "target_modules": config.target_modules, "use_rslora": config.use_rslora,
        "fan_in_fan_out": config.fan_in_fan_out, "init_lora_weights": config.init_lora_weights,
        "use_dora": config.use_dora, "lora_bias": False,
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
    }


# PEFT options that change the computation in ways lora_edu does not implement: refuse them.
_PEFT_UNSUPPORTED = {"lora_bias": (False, None),
                     "rank_pattern": ({}, None), "alpha_pattern": ({}, None),
                     "layers_to_transform": (None,),
                     "exclude_modules": (None, []), "target_parameters": (None, []),
                     "layer_replication": (None,), "trainable_token_indices": (None,),
                     "use_qalora": (False, None), "use_bdlora": (None, False)}


# PEFT initialisations that leave W0 alone: the loaded A and B replace whatever they drew.
_PEFT_INITS_WITHOUT_BASE_CHANGE = (True, False, "gaussian", "orthogonal")


def _peft_init(init: Any, source: Path) -> Any:
    """The ``init_lora_weights`` to inject with when loading.

    Initialisations that rewrite W0 (PiSSA keeps W0 − B0 A0 as the frozen weight) must be
    redone on the fresh base before the trained A and B make sense, so ``"pissa"`` is kept;
    ones lora_edu cannot redo (OLoRA, LoftQ, EVA, CorDA, fast-SVD PiSSA) are refused.
    """
    if init in _PEFT_INITS_WITHOUT_BASE_CHANGE:
        return init if init in (True, False, "gaussian") else True
    if init == "pissa" and "pissa" in INIT_OPTIONS:
        return init
    raise ValueError(f"{source}: init_lora_weights={init!r} changes the base weights in a way "
                     "lora_edu cannot reproduce; convert the adapter to plain LoRA in PEFT "
                     "first (save_pretrained(..., path_initial_model_for_weight_conversion=...))")


def load_peft_adapter(model: nn.Module, directory: PathLike) -> nn.Module:
    """Load an adapter saved by PEFT's ``save_pretrained`` (or :func:`save_peft_adapter`).

    ``modules_to_save`` entries that match no module of ``model`` are dropped, as PEFT ignores
    them: PEFT itself adds ``["classifier", "score"]`` to a sequence-classification adapter's
    config, and a model has only one of the two. Every tensor in the file must still find its
    place, so nothing is silently lost.
    """
    src = Path(directory)
    data = _read_json(src / PEFT_CONFIG_NAME)
    if data.get("peft_type") != "LORA":
        raise ValueError(f"{src / PEFT_CONFIG_NAME}: peft_type is {data.get('peft_type')!r}; "
                         "only 'LORA' adapters can be loaded into lora_edu")
    bad = sorted(k for k, ok in _PEFT_UNSUPPORTED.items() if k in data and data[k] not in ok)
    if bad:
        raise ValueError(f"{src / PEFT_CONFIG_NAME} uses PEFT options lora_edu does not "
                         f"implement: {bad}; save the adapter without them")
    to_save = data.get("modules_to_save")
    if isinstance(to_save, list):
        names = [n for n, _ in model.named_modules() if n]
        to_save = [e for e in to_save if not isinstance(e, str)
                   or any(n.endswith(e) for n in names)] or None
    config = _config_from_dict({
        "modules_to_save": to_save,
        "r": data.get("r"), "lora_alpha": data.get("lora_alpha"),
        "lora_dropout": data.get("lora_dropout", 0.0), "bias": data.get("bias", "none"),
        "target_modules": data.get("target_modules"),
        "use_rslora": bool(data.get("use_rslora", False)),
        "fan_in_fan_out": bool(data.get("fan_in_fan_out", False)),
        "use_dora": bool(data.get("use_dora", False)),
        "init_lora_weights": _peft_init(data.get("init_lora_weights", True),
                                        src / PEFT_CONFIG_NAME),
    }, src / PEFT_CONFIG_NAME)
    raw = _read_safetensors(src / PEFT_WEIGHTS_NAME)
    saved = _saved_names(model, config)
    tensors = {_from_peft_key(k, saved): v for k, v in raw.items()}
    return _install(model, config, tensors, src / PEFT_WEIGHTS_NAME)
