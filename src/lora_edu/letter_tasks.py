"""Two small letter tasks for the real model, generated offline, scored teacher-forced.

Chapter 12 trains one LoRA adapter per task on SmolLM2-135M-Instruct and combines them. The
tasks share one format, so that two adapters compete for the same inputs:

``reverse``  ``"Reverse: c f a k q ="`` → ``" q k a f c"`` (the letters in reverse order)
``shift``    ``"Shift: c f a k q ="``   → ``" d g b l r"`` (each letter moved one step on)

(Each answer starts with a space: the letters are tokens with their leading space.)

Letters are drawn from ``a … y`` (so that ``shift`` never wraps). Every letter with its
leading space is a single token of the SmolLM2 tokenizer, so all prompts of a task have the
same length and a batch is a plain ``(n, T)`` tensor: no padding.

**Teacher-forced scoring.** The model reads prompt and gold answer in one forward pass; at
each answer position we compare its next-token prediction with the gold token. The loss is
the mean cross-entropy over answer tokens, the accuracy the fraction predicted exactly (by
argmax). No generation loop: one forward pass per batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TASKS", "LETTERS", "TaskBatch", "make_examples", "encode_task", "task_batch",
           "answer_loss", "teacher_forced_scores"]

TASKS = ("reverse", "shift")
#: The letters prompts are drawn from (no ``z``, so ``shift`` never wraps round).
LETTERS = "abcdefghijklmnopqrstuvwxy"
_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
_PROMPT = {"reverse": "Reverse:", "shift": "Shift:"}


def _answer(task: str, letters: list[str]) -> list[str]:
    if task == "reverse":
        return letters[::-1]
    return [_ALPHABET[_ALPHABET.index(c) + 1] for c in letters]


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {TASKS}")
    return task


def _letters(prompt: str) -> str:
    """The letters of a prompt: ``"Shift: c f a =" → "cfa"``."""
    return prompt.split(":", 1)[1].rstrip("=").replace(" ", "")


def make_examples(task: str, n: int, seed: int, length: int = 5,
                  exclude: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """``n`` distinct (prompt, answer) strings of ``task``, drawn with ``random.Random``
    seeded by the task and ``seed``.

    ``exclude``: examples (e.g. an evaluation set) whose letters must not be drawn again.
    """
    _check_task(task)
    rng = random.Random(f"{task}-{seed}")
    seen = {_letters(p) for p, _ in exclude or ()}
    out = []
    while len(out) < n:
        letters = [rng.choice(LETTERS) for _ in range(length)]
        key = "".join(letters)
        if key in seen:
            continue
        seen.add(key)
        out.append((f"{_PROMPT[task]} {' '.join(letters)} =",
                    " " + " ".join(_answer(task, letters))))
    return out


@dataclass
class TaskBatch:
    """``input_ids`` (n, T); ``answer_start``: the first answer token's index (answers run
    to the end); the targets are ``input_ids[:, answer_start:]``."""

    input_ids: torch.Tensor
    answer_start: int

    def to(self, device: torch.device | str) -> TaskBatch:
        return TaskBatch(self.input_ids.to(device), self.answer_start)


def encode_task(tokenizer: Any, examples: list[tuple[str, str]]) -> TaskBatch:
    """Tokenise prompts and answers (no special tokens); all must have equal lengths."""
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in examples]
    answers = [tokenizer(a, add_special_tokens=False)["input_ids"] for _, a in examples]
    if len({len(p) for p in prompts}) != 1 or len({len(a) for a in answers}) != 1:
        raise ValueError("prompts (or answers) tokenise to different lengths; this tokenizer "
                         "does not give one token per letter")
    ids = torch.tensor([p + a for p, a in zip(prompts, answers)])
    return TaskBatch(ids, len(prompts[0]))


def task_batch(tokenizer: Any, task: str, n: int, seed: int,
               exclude: list[tuple[str, str]] | None = None) -> TaskBatch:
    """:func:`make_examples` then :func:`encode_task`."""
    return encode_task(tokenizer, make_examples(task, n, seed, exclude=exclude))


def _answer_logits(model: nn.Module, batch: TaskBatch) -> torch.Tensor:
    """Logits (n, L, V) at the positions that predict the L answer tokens.

    Runs the transformer body once and the output layer only at those positions (the
    vocabulary projection is the largest single matmul of a small model).
    """
    hidden = model.model(input_ids=batch.input_ids).last_hidden_state
    return model.lm_head(hidden[:, batch.answer_start - 1:-1])


def answer_loss(model: nn.Module, batch: TaskBatch) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens given the prompt (the training loss)."""
    logits = _answer_logits(model, batch)
    targets = batch.input_ids[:, batch.answer_start:]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


@torch.no_grad()
def teacher_forced_scores(model: nn.Module, batch: TaskBatch,
                          chunk: int = 64) -> dict[str, float]:
    """``{"loss": mean answer cross-entropy (nats/token), "accuracy": fraction of answer
    tokens the argmax predicts}``, with the gold answer fed in (teacher forcing)."""
    losses, hits, count = 0.0, 0, 0
    for i in range(0, batch.input_ids.shape[0], chunk):
        part = TaskBatch(batch.input_ids[i:i + chunk], batch.answer_start)
        logits = _answer_logits(model, part).float()
        targets = part.input_ids[:, part.answer_start:]
        losses += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                        reduction="sum"))
        hits += int((logits.argmax(-1) == targets).sum())
        count += targets.numel()
    return {"loss": losses / count, "accuracy": hits / count}
