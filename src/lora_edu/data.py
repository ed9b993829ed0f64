"""Offline corpora, a byte-level tokenizer and batching.

Two corpora ship with every CPython installation, so nothing is downloaded:

``python-stdlib`` (the *source* domain, for pretraining)
    the Python source of the standard library's top-level modules (``<stdlib>/*.py``,
    e.g. ``argparse.py``, ``textwrap.py``), one document per file. Licensed under the PSF
    licence.
``python-docs`` (the *target* domain, for adaptation)
    English prose: the reference-manual topics bundled in ``pydoc_data.topics`` (what
    ``help("assert")`` prints), one document per topic.

Both change a little between Python versions; :attr:`Corpus.sha256` fingerprints what was
read, and checkpoints record it.

Tokens are bytes: token id = byte value, ``vocab_size = 256``. No vocabulary to learn or
download, every string round-trips exactly, and the model's loss is in nats per byte.

Each document goes wholly to the training or the validation split, decided by a hash of
its name: the split is the same on every machine and run, and no text is shared between
the splits.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["VOCAB_SIZE", "encode", "decode", "Corpus", "CORPORA", "load_corpus",
           "random_batches", "eval_batches"]

#: The byte-level vocabulary: one token per byte value.
VOCAB_SIZE = 256
#: Put between documents so that the model sees where one ends.
_SEPARATOR = b"\n\n"


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a ``(len,)`` ``torch.long`` tensor of ids in ``[0, 256)``."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids: torch.Tensor) -> str:
    """The inverse of :func:`encode`; an incomplete UTF-8 sequence shows as ``�``."""
    return bytes(ids.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


def _is_validation(name: str, val_percent: int) -> bool:
    # A hash of the name, not the position in a sorted list: adding a document in a newer
    # Python does not move the others between splits.
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100 < val_percent


@dataclass(frozen=True)
class Corpus:
    """A corpus split by document into training and validation tokens.

    Attributes:
        name: the corpus's name in :data:`CORPORA`.
        train: ``(n_train,)`` ``torch.uint8`` token ids, documents joined by a blank line.
        val: ``(n_val,)`` ``torch.uint8`` token ids of the held-out documents.
        train_docs: names of the training documents, sorted.
        val_docs: names of the validation documents, sorted.
        sha256: fingerprint of all documents' names and bytes.
    """

    name: str
    train: torch.Tensor
    val: torch.Tensor
    train_docs: tuple[str, ...]
    val_docs: tuple[str, ...]
    sha256: str

    @classmethod
    def from_documents(cls, name: str, documents: Mapping[str, bytes],
                       val_percent: int = 10) -> Corpus:
        """Split ``documents`` (name -> bytes) by a hash of each name; ``val_percent`` in 1..99."""
        if not 0 < val_percent < 100:
            raise ValueError(f"val_percent must lie in 1..99, got {val_percent}")
        docs = {k: v for k, v in sorted(documents.items()) if len(v) > 0}
        if not docs:
            raise ValueError(f"corpus {name!r} is empty: no document with any text was found; "
                             f"check the source it is read from")
        val_docs = tuple(k for k in docs if _is_validation(k, val_percent))
        train_docs = tuple(k for k in docs if k not in set(val_docs))
        if not val_docs or not train_docs:
            raise ValueError(f"corpus {name!r} has {len(docs)} document(s), too few to split "
                             f"{100 - val_percent}/{val_percent} by document; add documents or "
                             f"change val_percent")
        digest = hashlib.sha256()
        for k, v in docs.items():
            digest.update(k.encode() + b"\0" + v + b"\0")

        def join(names: tuple[str, ...]) -> torch.Tensor:
            return torch.frombuffer(bytearray(_SEPARATOR.join(docs[k] for k in names)),
                                    dtype=torch.uint8)

        return cls(name, join(train_docs), join(val_docs), train_docs, val_docs,
                   digest.hexdigest())

    def summary(self) -> dict[str, object]:
        """Sizes for a table: documents and tokens (= bytes) per split."""
        return {"corpus": self.name, "train docs": len(self.train_docs),
                "val docs": len(self.val_docs), "train tokens": self.train.numel(),
                "val tokens": self.val.numel(), "sha256": self.sha256[:12]}


def _stdlib_documents() -> dict[str, bytes]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return {p.name: p.read_bytes() for p in sorted(stdlib.glob("*.py"))}


def _pydoc_documents() -> dict[str, bytes]:
    from pydoc_data.topics import topics
    return {k: v.encode("utf-8") for k, v in topics.items()}


#: Corpus name -> (description, reader of its documents, default validation percentage).
#: The prose corpus holds a few large topics, so it gets 15 % (about 10 % of its bytes).
CORPORA = {
    "python-stdlib": ("Python source of the standard library's top-level modules",
                      _stdlib_documents, 10),
    "python-docs": ("English prose: Python's reference-manual topics (pydoc_data.topics)",
                    _pydoc_documents, 15),
}


@lru_cache(maxsize=None)
def load_corpus(name: str, val_percent: int | None = None) -> Corpus:
    """Read and split a corpus of :data:`CORPORA` (cached: the tensors are shared, don't edit).

    ``val_percent`` (1..99) overrides the corpus's default share of validation documents.
    """
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {sorted(CORPORA)}")
    _, read, default_percent = CORPORA[name]
    return Corpus.from_documents(name, read(), default_percent if val_percent is None
                                 else val_percent)


def _check_length(tokens: torch.Tensor, block_size: int) -> None:
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if tokens.numel() < block_size + 1:
        raise ValueError(f"need at least block_size + 1 = {block_size + 1} tokens to make one "
                         f"(input, target) pair, got {tokens.numel()}; use a shorter block_size "
                         f"or a larger corpus")


def random_batches(tokens: torch.Tensor, batch_size: int, block_size: int,
                   generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(x, y)`` batches of random windows; both ``(batch_size, block_size)`` long.

    ``y`` is ``x`` shifted left by one token: ``y[:, t]`` is the token after ``x[:, t]``.
    Window starts come from ``generator``, so a seeded generator gives the same batches.
    """
    _check_length(tokens, block_size)
    offsets = torch.arange(block_size + 1)
    while True:
        starts = torch.randint(0, tokens.numel() - block_size, (batch_size,), generator=generator)
        window = tokens[starts[:, None] + offsets].long()
        yield window[:, :-1], window[:, 1:]


def eval_batches(tokens: torch.Tensor, block_size: int, n_windows: int,
                 batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed evaluation set: ``n_windows`` evenly spaced windows, in batches.

    The same windows on every call, so that losses of different models (base, fully
    fine-tuned, LoRA) are measured on exactly the same text.
    """
    _check_length(tokens, block_size)
    last = tokens.numel() - block_size - 1
    starts = torch.linspace(0, last, n_windows).long()
    window = tokens[starts[:, None] + torch.arange(block_size + 1)].long()
    return [(w[:, :-1], w[:, 1:]) for w in window.split(batch_size)]
