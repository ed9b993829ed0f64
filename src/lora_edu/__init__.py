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
``classifier`` the real model as a sequence classifier: LoRA plus a trained head
``ledger``     where a training step's memory and FLOPs go
``stats``      paired and independent differences, intervals, the verdict a chapter glues
``sweep``      reading chapter 8's committed sweep (runs, per-seed and per-question scores)
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

**The stable API** is :data:`STABLE_API` (the design's contract and a few more names): within
the 0.x series those names keep their names, their parameters (``tests/test_stable_api.py``
checks each one's parameter names) and their behaviour from one minor version to the next, and
only a 1.0 or a later major version may change them; everything else may change between minor
versions. A course pins a version (``__version__``; see CHANGELOG.md).
"""

__version__ = "0.2.0"

#: The public API a course can rely on, by module (the contract of the book's design).
STABLE_API: dict[str, tuple[str, ...]] = {
    "lora_edu.lora": ("LoraConfig", "LoRALinear", "inject_lora", "mark_only_lora_as_trainable",
                      "merge_lora", "unmerge_lora", "count_parameters", "disable_adapters",
                      "merge_and_unload"),
    "lora_edu.adapters": ("save_adapter", "load_adapter", "save_peft_adapter",
                          "load_peft_adapter"),
    "lora_edu.repro": ("seed_all",),
    "lora_edu.linalg": ("numerical_rank", "low_rank_approx"),
    "lora_edu.intrinsic": ("subspace_similarity",),
    "lora_edu.stats": ("paired_difference", "independent_difference", "proportion_interval"),
    "lora_edu.quant": ("nf4_codebook", "quantize_nf4"),
}

__all__ = ["__version__", "STABLE_API"]
