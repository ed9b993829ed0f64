"""lora_edu: the teaching package behind the book *LoRA from first principles*.

Each module is named after the idea it teaches:

``repro``      seeding, deterministic mode, device selection
``linalg``     rank, SVD, the best low-rank approximation, factorisation by gradient descent
``intrinsic``  random-subspace training, spectra of weight updates, subspace similarity
``lora``       ``LoraConfig``, ``LoRALinear``, injecting LoRA into a model, merging, counting
``adapters``   saving and loading adapters (safetensors), PEFT-format interop
``models``     a small GPT written for reading
``data``       offline corpora and batching
``train``      one training loop with measurements
``pretrained`` the real model, SmolLM2-135M-Instruct, from the package registry
``tasks`` ``sft``  an offline task and supervised fine-tuning of the real model
``ledger``     where a training step's memory and FLOPs go
``stats``      seed bands: when a difference between methods counts
``distributed`` LoRA under DDP and FSDP2
``fused``      LoRA on fused projections (the paper's MergedLinear)
``combine``    combining adapters (task arithmetic, TIES, DARE, SVD)
``serving``    many adapters on one base in one batch
``quant``      NF4 and double quantisation, the 4-bit LoRA layer, LoftQ
``variants``   rsLoRA, PiSSA, DoRA, LoRA+
``checks``     checkers for students' implementations
``plots``      figure helpers shared by the chapters (the static-site slider)

Modules are imported on demand (``from lora_edu.lora import LoRALinear``) so that
``import lora_edu`` stays cheap.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
