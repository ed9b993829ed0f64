"""Smoke test of an installed lora_edu wheel (run by `make wheel-check` outside the repository).

Imports the stable API, checks the version and the shipped assets, and runs LoRA end to end on
the packaged checkpoint: inject with a trained head (modules_to_save), train one step, save in
PEFT's layout, load into a fresh model, and compare the outputs.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path

import torch

import lora_edu

here = Path(lora_edu.__file__).resolve()
assert "site-packages" in here.parts, f"lora_edu imported from {here}, not from the wheel"
for module, names in lora_edu.STABLE_API.items():
    for name in names:
        getattr(importlib.import_module(module), name)

from lora_edu.adapters import load_peft_adapter, save_peft_adapter  # noqa: E402
from lora_edu.lora import LoraConfig, count_parameters, inject_lora  # noqa: E402
from lora_edu.models import load_pretrained  # noqa: E402
from lora_edu.repro import seed_all  # noqa: E402

seed_all(0)
model, _ = load_pretrained("gpt-cpu")                  # the checkpoint ships in the wheel
config = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], modules_to_save=["lm_head"])
model = inject_lora(model, config)
ids = torch.randint(0, model.config.vocab_size, (2, 16))
loss = model(ids).float().logsumexp(-1).mean()
loss.backward()
torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
with tempfile.TemporaryDirectory() as tmp:
    save_peft_adapter(model, tmp)
    fresh, _ = load_pretrained("gpt-cpu")
    loaded = load_peft_adapter(fresh, tmp)
    torch.testing.assert_close(loaded.eval()(ids), model.eval()(ids))
print(f"lora_edu {lora_edu.__version__} from the wheel ({here.parent}): stable API imports, "
      f"{count_parameters(model)[0]:,} trainable parameters, PEFT-layout round trip ok "
      f"(python {sys.version.split()[0]}, torch {torch.__version__})")
