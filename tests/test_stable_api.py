"""The stable API: exactly the names of lora_edu.STABLE_API, which are the design's contract.

A course pins lora_edu's version and relies on these names, their parameters and their
behaviour, kept through the 0.x minor versions (see CHANGELOG.md).
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

import lora_edu

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT.parent / "shared" / "DESIGN.md"   # beside the checkout, where CI puts it too


def test_version_is_semantic_and_in_the_changelog():
    assert re.fullmatch(r"\d+\.\d+\.\d+", lora_edu.__version__)
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## {lora_edu.__version__}" in changelog, "CHANGELOG.md has no entry for it"


def test_every_stable_name_imports_and_is_public():
    for module_name, names in lora_edu.STABLE_API.items():
        module = importlib.import_module(module_name)
        for name in names:
            assert hasattr(module, name), f"{module_name}.{name} is gone"
            assert name in getattr(module, "__all__", [name]), f"{module_name}.{name} not public"


def test_the_contract_imports_exactly_these_names():
    """The design's contract and the package's additions (disable_adapters, merge_and_unload):
    nothing more, nothing less."""
    from lora_edu.adapters import (load_adapter, load_peft_adapter, save_adapter,  # noqa: F401
                                   save_peft_adapter)
    from lora_edu.intrinsic import subspace_similarity  # noqa: F401
    from lora_edu.linalg import low_rank_approx, numerical_rank  # noqa: F401
    from lora_edu.lora import (LoraConfig, LoRALinear, count_parameters,  # noqa: F401
                               disable_adapters, inject_lora, mark_only_lora_as_trainable,
                               merge_and_unload, merge_lora, unmerge_lora)
    from lora_edu.quant import nf4_codebook, quantize_nf4  # noqa: F401
    from lora_edu.repro import seed_all  # noqa: F401
    from lora_edu.stats import (independent_difference, paired_difference,  # noqa: F401
                                proportion_interval)
    imported = {name for name in locals()}
    listed = {name for names in lora_edu.STABLE_API.values() for name in names}
    assert imported == listed


def test_the_config_keeps_its_fields_and_defaults():
    from lora_edu.lora import LoraConfig
    params = inspect.signature(LoraConfig).parameters
    expected = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "bias": "none",
                "use_rslora": False, "modules_to_save": None}
    for name, default in expected.items():
        assert params[name].default == default, name
    assert "target_modules" in params


@pytest.mark.skipif(not DESIGN.exists(), reason="../shared/DESIGN.md is not beside the checkout")
def test_stable_api_matches_the_design_contract():
    text = DESIGN.read_text(encoding="utf-8")
    contract = text.split("## Public API contract", 1)[1].split("\n## ", 1)[0]
    found: dict[str, set[str]] = {}
    for module, names in re.findall(r"from (lora_edu\.\w+) import \(?([\w, \n]+?)\)?\n",
                                    contract):
        found.setdefault(module, set()).update(n.strip() for n in names.split(",") if n.strip())
    # every name of the design's contract is stable; the package may promise more
    assert all(names <= set(lora_edu.STABLE_API.get(m, ())) for m, names in found.items()), found


#: Each stable callable's parameters, in order, as of 0.2.0. A later 0.x may add parameters
#: after these (with defaults); renaming, removing or reordering one breaks a course's code.
SIGNATURES = {
    "lora_edu.lora.LoraConfig": ("r", "lora_alpha", "lora_dropout", "bias", "target_modules",
                                 "use_rslora", "init_lora_weights", "fan_in_fan_out",
                                 "use_dora", "modules_to_save"),
    "lora_edu.lora.LoRALinear": ("base", "r", "lora_alpha", "lora_dropout", "use_rslora",
                                 "init_lora_weights", "fan_in_fan_out"),
    "lora_edu.lora.inject_lora": ("model", "config"),
    "lora_edu.lora.mark_only_lora_as_trainable": ("model", "bias"),
    "lora_edu.lora.merge_lora": ("model", "safe_merge"),
    "lora_edu.lora.unmerge_lora": ("model",),
    "lora_edu.lora.count_parameters": ("model",),
    "lora_edu.lora.disable_adapters": ("model",),
    "lora_edu.lora.merge_and_unload": ("model", "safe_merge"),
    "lora_edu.adapters.save_adapter": ("model", "directory"),
    "lora_edu.adapters.load_adapter": ("model", "directory"),
    "lora_edu.adapters.save_peft_adapter": ("model", "directory"),
    "lora_edu.adapters.load_peft_adapter": ("model", "directory"),
    "lora_edu.repro.seed_all": ("seed", "seed_torch", "set_torch_deterministic"),
    "lora_edu.linalg.numerical_rank": ("W", "tol"),
    "lora_edu.linalg.low_rank_approx": ("W", "r"),
    "lora_edu.intrinsic.subspace_similarity": ("A1", "A2", "i", "j"),
    "lora_edu.stats.paired_difference": ("a", "b", "lower_is_better", "confidence", "method",
                                         "n_resamples", "seed"),
    "lora_edu.stats.independent_difference": ("a", "b", "lower_is_better", "confidence"),
    "lora_edu.stats.proportion_interval": ("k", "n", "confidence"),
    "lora_edu.quant.nf4_codebook": (),
    "lora_edu.quant.quantize_nf4": ("W", "block_size", "double_quant",
                                    "double_quant_block_size", "pad"),
}


def test_every_stable_name_has_its_recorded_signature():
    listed = {f"{m}.{n}" for m, names in lora_edu.STABLE_API.items() for n in names}
    assert listed == set(SIGNATURES), "record the parameters of a new stable name here"
    for qualified, expected in SIGNATURES.items():
        module, name = qualified.rsplit(".", 1)
        params = tuple(inspect.signature(getattr(importlib.import_module(module), name))
                       .parameters)
        assert params[:len(expected)] == expected, (qualified, params)
        added = inspect.signature(getattr(importlib.import_module(module), name)).parameters
        assert all(added[p].default is not inspect.Parameter.empty
                   for p in params[len(expected):]), f"{qualified}: a new parameter needs a default"
