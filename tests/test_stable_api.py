"""The stable API: exactly the names of lora_edu.STABLE_API, which are the design's contract.

A course pins lora_edu's version and relies on these names, their arguments and their
behaviour; changing one of them is a major version's change (see CHANGELOG.md).
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
    """The import lines of the design's contract, verbatim: nothing more, nothing less."""
    from lora_edu.adapters import (load_adapter, load_peft_adapter, save_adapter,  # noqa: F401
                                   save_peft_adapter)
    from lora_edu.intrinsic import subspace_similarity  # noqa: F401
    from lora_edu.linalg import low_rank_approx, numerical_rank  # noqa: F401
    from lora_edu.lora import (LoraConfig, LoRALinear, count_parameters,  # noqa: F401
                               inject_lora, mark_only_lora_as_trainable, merge_lora,
                               unmerge_lora)
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
    assert found == {m: set(n) for m, n in lora_edu.STABLE_API.items()}
