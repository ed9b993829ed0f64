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
``quant``      NF4 and double quantisation, the 4-bit LoRA layer
``plots``      figure helpers shared by the chapters

Modules are imported on demand (``from lora_edu.lora import LoRALinear``) so that
``import lora_edu`` stays cheap.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
