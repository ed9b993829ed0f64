"""Supervised fine-tuning of a transformers causal LM on question → answer examples.

The loss is the usual one for instruction tuning: next-token cross-entropy on the **answer
tokens only** (the question's tokens get the label ``-100``, which ``cross_entropy`` ignores),

.. math::  \\mathcal{L} = -\\frac{1}{|\\mathcal{A}|}\\sum_{t \\in \\mathcal{A}}
           \\log p_\\theta(y_t \\mid y_{<t}),

with :math:`\\mathcal{A}` the answer positions of the batch. What trains is what has
``requires_grad``: every weight for full fine-tuning, only ``lora_A``/``lora_B`` after
``inject_lora`` (or PEFT's ``get_peft_model``). Scoring is **exact match** of the greedy
answer, the metric a reader can check by eye, and forgetting is the loss (nats per byte) on
general English prose that training never saw (Python's own documentation topics).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_edu.progress import progress
from lora_edu.tasks import Example, prompt_text
from lora_edu.train import check_schedule, lr_factor

__all__ = ["SFTConfig", "SFTHistory", "encode_examples", "collate", "answer_loss", "METHODS",
           "prepare_method", "run_method", "task_data", "train_sft", "exact_match",
           "match_rate", "generate_answers", "prose_loss", "prose_texts"]

IGNORE = -100


@dataclass(frozen=True)
class SFTConfig:
    """Hyper-parameters of :func:`train_sft` (AdamW, linear warm-up then cosine decay)."""

    steps: int = 60
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 6
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0
    desc: str = "fine-tune"
    show_progress: bool = True

    def __post_init__(self) -> None:
        check_schedule(self)


@dataclass
class SFTHistory:
    """Per-step training loss and the median step time of a run."""

    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)

    @property
    def median_step_seconds(self) -> float:
        return statistics.median(self.step_seconds)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "median_step_seconds": self.median_step_seconds}


def encode_examples(tokenizer: Any, examples: Sequence[Example]) -> list[dict[str, list[int]]]:
    """Token ids and labels of each example: ``prompt_text(question) + " " + answer + eos``.

    Labels copy the ids on the answer (and eos) and are ``-100`` on the prompt.
    """
    encoded = []
    for ex in examples:
        prompt = tokenizer(prompt_text(ex.question))["input_ids"]
        answer = tokenizer(" " + ex.answer)["input_ids"] + [tokenizer.eos_token_id]
        encoded.append({"input_ids": prompt + answer,
                        "labels": [IGNORE] * len(prompt) + answer})
    return encoded


def collate(items: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask`` and ``labels``, each ``(b, T)``."""
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        ids[i, :n] = torch.tensor(it["input_ids"])
        labels[i, :n] = torch.tensor(it["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of ``batch`` (labels shifted by one); the
    batch is moved to the model's device."""
    batch = {k: v.to(_device(model)) for k, v in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                           batch["labels"][:, 1:].flatten(), ignore_index=IGNORE)


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def answer_loss(model: nn.Module, tokenizer: Any, examples: Sequence[Example],
                batch_size: int = 32) -> float:
    """Teacher-forced mean loss (nats per answer token) of ``examples``: one forward pass per
    batch, so it is much cheaper than generating."""
    was_training = model.training
    model.eval()
    encoded = encode_examples(tokenizer, examples)
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        batch = collate(encoded[i:i + batch_size], _pad_id(tokenizer))
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        total += _loss(model, batch).item() * n
        count += n
    model.train(was_training)
    return total / count


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameter with requires_grad=True, so there is nothing "
                         "to train; for LoRA call inject_lora(model, cfg) first, for full "
                         "fine-tuning call model.requires_grad_(True)")
    return params


def train_sft(model: nn.Module, tokenizer: Any, examples: Sequence[Example],
              config: SFTConfig = SFTConfig(),
              on_step: Callable[[int, nn.Module], None] | None = None) -> SFTHistory:
    """Train the parameters of ``model`` with ``requires_grad`` on ``examples``.

    Each step draws ``config.batch_size`` examples without replacement (a new permutation
    each epoch) from a generator seeded by ``config.seed``, so a run is reproducible.
    ``on_step(step, model)``, if given, runs after every optimizer step (outside the timing),
    e.g. to take snapshots of the weights.
    """
    params = _trainable(model)
    if len(examples) < config.batch_size:
        raise ValueError(f"{len(examples)} examples are fewer than batch_size="
                         f"{config.batch_size}; pass more examples or a smaller batch")
    encoded = encode_examples(tokenizer, examples)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, config.steps, config.warmup_steps, config.min_lr_ratio))
    generator = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    history = SFTHistory()
    model.train()
    steps = range(config.steps)
    for _ in (progress(steps, desc=config.desc) if config.show_progress else steps):
        if len(order) < config.batch_size:
            order += torch.randperm(len(encoded), generator=generator).tolist()
        picked, order = order[:config.batch_size], order[config.batch_size:]
        batch = collate([encoded[i] for i in picked], _pad_id(tokenizer))
        start = time.perf_counter()
        loss = _loss(model, batch)
        loss.backward()
        if config.grad_clip is not None:
            nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        history.losses.append(loss.item())
        history.step_seconds.append(time.perf_counter() - start)
        if on_step is not None:
            with torch.no_grad():
                on_step(len(history.losses), model)
    model.eval()
    return history


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer: Any, questions: Sequence[str],
                     max_new_tokens: int = 32, batch_size: int = 32) -> list[str]:
    """Greedy answers to ``questions`` (left-padded batches), stripped, up to the first eos
    or newline."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues at the right edge of every row
    answers: list[str] = []
    try:
        for i in range(0, len(questions), batch_size):
            prompts = [prompt_text(q) for q in questions[i:i + batch_size]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True).to(_device(model))
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=_pad_id(tokenizer))
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                           skip_special_tokens=True)
            answers += [t.strip().split("\n")[0].strip() for t in texts]
    finally:
        tokenizer.padding_side = side
    return answers


def match_rate(answers: Sequence[str], examples: Sequence[Example]) -> float:
    """Fraction of ``answers`` that equal their example's reference answer exactly."""
    return sum(a == ex.answer for a, ex in zip(answers, examples)) / len(examples)


def exact_match(model: nn.Module, tokenizer: Any, examples: Sequence[Example],
                batch_size: int = 32) -> float:
    """Fraction of ``examples`` whose greedy answer equals the reference exactly."""
    return match_rate(generate_answers(model, tokenizer, [ex.question for ex in examples],
                                       batch_size=batch_size), examples)


def prose_texts(n: int = 24, chars: int = 600) -> list[str]:
    """``n`` passages of ``chars`` characters of English prose from Python's own
    documentation topics (``pydoc_data``, in every Python installation), in a fixed order."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    stride = max(chars, (len(text) - chars) // n)
    return [text[i * stride:i * stride + chars] for i in range(n)]


@torch.no_grad()
def prose_loss(model: nn.Module, tokenizer: Any, texts: Sequence[str]) -> float:
    """Nats per byte of ``texts`` under ``model``: a tokenizer-free measure of general
    language ability, so forgetting shows as a rise. The first token of each text is given."""
    total, n_bytes = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"].to(_device(model))
        logits = model(input_ids=ids).logits
        total += F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum").item()
        n_bytes += len(tokenizer.decode(ids[0, 1:]).encode("utf-8"))
    return total / n_bytes


# --------------------------------------------------------------------------- the methods

#: The methods chapter 8 compares: name -> (rank, target modules), ``None`` for full
#: fine-tuning. LoRA uses α = 2r, so the scaling s = α/r = 2 is the same at every rank.
METHODS: dict[str, tuple[int, Any] | None] = {
    "full": None,
    "lora_qv_r1": (1, ["q_proj", "v_proj"]),
    "lora_qv_r8": (8, ["q_proj", "v_proj"]),
    "lora_qv_r64": (64, ["q_proj", "v_proj"]),
    "lora_all_r8": (8, "all-linear"),
}


def prepare_method(base: nn.Module, method: str, seed: int = 0,
                   implementation: str = "lora_edu") -> nn.Module:
    """A trainable copy of ``base`` for ``method`` (a key of :data:`METHODS`).

    ``implementation="peft"`` builds the same LoRA with PEFT's ``get_peft_model`` instead of
    :func:`lora_edu.lora.inject_lora`: both draw A from the same Kaiming-uniform distribution
    and start B at 0, so their runs should agree within the spread across seeds.
    """
    import copy

    from lora_edu.lora import LoraConfig, inject_lora
    from lora_edu.repro import seed_all

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    if implementation not in ("lora_edu", "peft"):
        raise ValueError(f"implementation must be 'lora_edu' or 'peft', got {implementation!r}")
    model = copy.deepcopy(base)
    spec = METHODS[method]
    seed_all(seed)
    if spec is None:
        if implementation == "peft":
            raise ValueError("full fine-tuning has no PEFT version; use implementation='lora_edu'")
        return model.requires_grad_(True)
    r, targets = spec
    if implementation == "peft":
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r,
                                                          target_modules=targets))
    return inject_lora(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))


def run_method(base: nn.Module, tokenizer: Any, method: str, lr: float, seed: int,
               data: dict[str, Any], steps: int = 60, batch_size: int = 8,
               implementation: str = "lora_edu", keep_model: bool = False,
               on_step: Callable[[int, nn.Module], None] | None = None) -> dict[str, Any]:
    """Fine-tune a copy of ``base`` with ``method`` and score it.

    Args:
        data: ``{"train", "validation", "test": lists of Example, "prose": list of str}``.

    Returns:
        A JSON-ready record: the settings, trainable parameters, per-step losses, median step
        time, validation and test answer loss, test exact match, the greedy test answers
        and prose loss (nats/byte);
        with ``keep_model`` also ``"model"`` (not JSON-ready).
    """
    model = prepare_method(base, method, seed, implementation)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    history = train_sft(model, tokenizer, data["train"], SFTConfig(
        steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 10),
        seed=seed, show_progress=False), on_step=on_step)
    answers = generate_answers(model, tokenizer, [ex.question for ex in data["test"]])
    record = {"method": method, "implementation": implementation, "lr": lr, "seed": seed,
              "steps": steps, "batch_size": batch_size, "trainable": trainable,
              "losses": history.losses, "median_step_seconds": history.median_step_seconds,
              "val_loss": answer_loss(model, tokenizer, data["validation"]),
              "test_loss": answer_loss(model, tokenizer, data["test"]),
              "test_exact_match": match_rate(answers, data["test"]), "test_answers": answers,
              "prose_loss": prose_loss(model, tokenizer, data["prose"])}
    if keep_model:
        record["model"] = model
    return record


def task_data(n_train: int = 2000, n_eval: int = 64, n_prose: int = 16,
              show_work: bool = True) -> dict[str, Any]:
    """The fixed data of chapter 8: date-arithmetic splits and general prose passages
    (``show_work=False``: the same questions with bare result dates as answers)."""
    from lora_edu.tasks import date_arithmetic

    return {"train": date_arithmetic(n_train, "train", show_work=show_work),
            "validation": date_arithmetic(n_eval, "validation", show_work=show_work),
            "test": date_arithmetic(n_eval, "test", show_work=show_work),
            "prose": prose_texts(n_prose)}
