"""Supervised fine-tuning of a transformers causal LM on question → answer examples.

The loss is the usual one for instruction tuning: next-token cross-entropy on the **answer
tokens only** (the question's tokens get the label ``-100``, which ``cross_entropy`` ignores),

.. math::  \\mathcal{L} = -\\frac{1}{|\\mathcal{A}|}\\sum_{t \\in \\mathcal{A}}
           \\log p_\\theta(y_t \\mid y_{<t}),

with :math:`\\mathcal{A}` the answer positions of the batch. What trains is what has
``requires_grad``: every weight for full fine-tuning, only ``lora_A``/``lora_B`` after
``inject_lora`` (or PEFT's ``get_peft_model``). Scoring is **exact match** of the greedy
answer, computed without generating (:func:`score_examples`): greedy decoding produces the
reference answer exactly when, under teacher forcing, every answer token and the end token
are the argmax, so one batched forward pass scores a thousand questions. The same pass gives
each skill of a worked answer (the start date, the result given the start) and the log loss
on the result tokens. Forgetting is measured twice: the loss (nats per byte) on general
English prose that training never saw (Python's own documentation topics), and the loss of
the base model's own chat replies (:func:`chat_loss`), which rises as the tuned model drifts
from what the instruct model would have said.
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

__all__ = [
    "ALPHA_FIXED",
    "CHAT_PROMPTS",
    "METHODS",
    "SFTConfig",
    "SFTHistory",
    "answer_loss",
    "chat_loss",
    "chat_references",
    "collate",
    "encode_examples",
    "exact_match",
    "generate_answers",
    "init_seed",
    "match_rate",
    "method_spec",
    "prepare_method",
    "prose_examples",
    "prose_loss",
    "prose_texts",
    "run_method",
    "score_examples",
    "summarise_scores",
    "task_data",
    "token_losses",
    "train_sft",
]

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


def _spans(answer: str) -> dict[str, tuple[int, int]]:
    """Character spans, in ``" " + answer``, of the answer's start date and result."""
    from lora_edu.tasks import answer_spans

    return {k: (lo + 1, hi + 1) for k, (lo, hi) in answer_spans(answer).items()}


def _encode_scored(tokenizer: Any, ex: Example) -> dict[str, Any]:
    """:func:`encode_examples`' ids and labels, plus which answer tokens are the start date
    and which the result (from the tokenizer's character offsets)."""
    prompt = tokenizer(prompt_text(ex.question))["input_ids"]
    enc = tokenizer(" " + ex.answer, return_offsets_mapping=True)
    answer = enc["input_ids"] + [tokenizer.eos_token_id]
    spans = _spans(ex.answer)
    part = {name: [a < hi and b > lo for a, b in enc["offset_mapping"]] + [False]
            for name, (lo, hi) in spans.items()}
    pad = [False] * len(prompt)
    return {"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer,
            "start": pad + part["start"], "result": pad + part["result"]}


@torch.no_grad()
def score_examples(model: nn.Module, tokenizer: Any, examples: Sequence[Example],
                   batch_size: int = 32) -> dict[str, list]:
    """Per-question scores from one teacher-forced forward pass per batch.

    For question i, with ``a`` its answer tokens (and the end token) and ``p_θ`` the model:

    * ``exact[i]`` — every token of ``a`` is the argmax given the tokens before it: greedy
      decoding would write the reference answer and stop;
    * ``start_ok[i]`` / ``result_ok[i]`` — the same over the start date's tokens / the
      result's tokens only (the result given a correct start: the sum, on its own);
    * ``answer_nll[i]`` / ``result_nll[i]`` — ``−Σ log p_θ`` over all answer tokens / over
      the result's tokens (nats per question), with ``n_answer`` / ``n_result`` tokens;
    * ``result_greedy[i]`` — every answer token *up to and including the result's last* is
      the argmax: greedy decoding follows the reference to the end of the result, so it
      writes the right result with nothing given (unlike ``result_ok``, which is teacher
      forced on whatever precedes the result). It compares answer forms that put the result
      in different places (working first, result first, result alone).
    """
    was_training = model.training
    model.eval()
    out: dict[str, list] = {k: [] for k in ("exact", "start_ok", "result_ok", "answer_nll",
                                            "result_nll", "n_answer", "n_result",
                                            "result_greedy")}
    encoded = [_encode_scored(tokenizer, ex) for ex in examples]
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i:i + batch_size]
        batch = collate(chunk, _pad_id(tokenizer))
        width = batch["input_ids"].shape[1]
        masks = {name: torch.tensor([it[name] + [False] * (width - len(it[name]))
                                     for it in chunk])[:, 1:] for name in ("start", "result")}
        ids = batch["input_ids"].to(_device(model))
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(ids.device))
        logits = logits.logits[:, :-1].float()
        target = batch["labels"][:, 1:].to(ids.device)
        answer = (target != IGNORE)
        hit = (logits.argmax(-1) == target).cpu()
        nll = F.cross_entropy(logits.transpose(1, 2), target.clamp(min=0),
                              reduction="none").cpu()
        answer = answer.cpu()
        for name, mask in (("exact", answer), ("start_ok", masks["start"]),
                           ("result_ok", masks["result"])):
            out[name] += (hit | ~mask).all(dim=1).tolist()
        # the answer's tokens up to the result's last one (positions after it are excluded)
        pos = torch.arange(answer.shape[1])
        last = torch.where(masks["result"], pos, -1).amax(dim=1, keepdim=True)
        upto = answer & (pos <= last)
        out["result_greedy"] += ((hit | ~upto).all(dim=1) & (last[:, 0] >= 0)).tolist()
        out["answer_nll"] += (nll * answer).sum(dim=1).tolist()
        out["result_nll"] += (nll * masks["result"]).sum(dim=1).tolist()
        out["n_answer"] += answer.sum(dim=1).tolist()
        out["n_result"] += masks["result"].sum(dim=1).tolist()
    model.train(was_training)
    return out


@torch.no_grad()
def token_losses(model: nn.Module, tokenizer: Any,
                 examples: Sequence[Example]) -> list[list[tuple[int, str, float]]]:
    """For each example, its answer tokens as ``(token id, role, loss in nats)``, teacher
    forced; the role is ``"start"`` (the start date), ``"result"`` or ``"other"`` (the
    format, the offset, the end token). One batch: for a handful of examples."""
    was_training = model.training
    model.eval()
    items = [_encode_scored(tokenizer, ex) for ex in examples]
    batch = collate(items, _pad_id(tokenizer))
    ids = batch["input_ids"].to(_device(model))
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(ids.device))
    nll = F.cross_entropy(logits.logits[:, :-1].float().transpose(1, 2),
                          batch["labels"][:, 1:].to(ids.device).clamp(min=0),
                          reduction="none").cpu()
    model.train(was_training)
    out = []
    for i, it in enumerate(items):
        out.append([(it["input_ids"][t], "start" if it["start"][t] else
                     "result" if it["result"][t] else "other", float(nll[i, t - 1]))
                    for t in range(1, len(it["input_ids"])) if it["labels"][t] != IGNORE])
    return out


def summarise_scores(scores: dict[str, list]) -> dict[str, float]:
    """Rates and mean losses of :func:`score_examples`' per-question scores: exact match,
    start and result accuracy, loss per answer token, and result loss per question."""
    n = len(scores["exact"])
    extra = ({"result_greedy_accuracy": sum(scores["result_greedy"]) / n}
             if "result_greedy" in scores else {})
    return {**extra, "exact_match": sum(scores["exact"]) / n,
            "start_accuracy": sum(scores["start_ok"]) / n,
            "result_accuracy": sum(scores["result_ok"]) / n,
            "loss": sum(scores["answer_nll"]) / sum(scores["n_answer"]),
            "result_nll": sum(scores["result_nll"]) / n}


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
              on_step: Callable[[int, nn.Module], None] | None = None,
              stop_after: int | None = None) -> SFTHistory:
    """Train the parameters of ``model`` with ``requires_grad`` on ``examples``.

    Each step draws ``config.batch_size`` examples without replacement (a new permutation
    each epoch) from a generator seeded by ``config.seed``, so a run is reproducible.
    ``on_step(step, model)``, if given, runs after every optimizer step (outside the timing),
    e.g. to take snapshots of the weights. ``stop_after=n`` trains only the first ``n`` steps
    of the schedule (the same steps, batches and learning rates as the full run's first
    ``n``): a cheap, exact re-run of the beginning of a longer run.
    """
    if stop_after is not None and not (isinstance(stop_after, int) and
                                       1 <= stop_after <= config.steps):
        raise ValueError(f"stop_after must be an int in 1..{config.steps} (the run's steps), "
                         f"got {stop_after!r}")
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
    steps = range(config.steps if stop_after is None else stop_after)
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
#: The same q,v LoRA with α fixed at 16 instead of 2r (s = 16/r): at r = 8 it is
#: ``lora_qv_r8``; at r = 1 and 64 it shows how the best learning rate moves with rank
#: under each convention. name -> (rank, target modules, α).
ALPHA_FIXED: dict[str, tuple[int, Any, float]] = {
    "lora_qv_r1_alpha16": (1, ["q_proj", "v_proj"], 16.0),
    "lora_qv_r64_alpha16": (64, ["q_proj", "v_proj"], 16.0),
}


def method_spec(method: str) -> tuple[int, Any, float] | None:
    """``(r, target_modules, lora_alpha)`` of a method of :data:`METHODS` or
    :data:`ALPHA_FIXED`, ``None`` for full fine-tuning."""
    if method in METHODS:
        spec = METHODS[method]
        return None if spec is None else (spec[0], spec[1], 2.0 * spec[0])
    if method in ALPHA_FIXED:
        return ALPHA_FIXED[method]
    raise ValueError(f"unknown method {method!r}; choose one of "
                     f"{sorted(METHODS) + sorted(ALPHA_FIXED)}")


def init_seed(method: str, seed: int) -> int:
    """The seed of a method's initial weights in run ``seed``: different for every method,
    so that two ranks of one seed do not share the first rows of their initial A (they
    would, if both drew A from one generator state), and reproducible."""
    import zlib

    return zlib.crc32(f"{method}/{seed}".encode()) % 2**31


def prepare_method(base: nn.Module, method: str, seed: int = 0,
                   implementation: str = "lora_edu") -> nn.Module:
    """A trainable copy of ``base`` for ``method`` (a key of :data:`METHODS` or
    :data:`ALPHA_FIXED`), its LoRA weights drawn after ``seed_all(seed)``.

    ``implementation="peft"`` builds the same LoRA with PEFT's ``get_peft_model`` instead of
    :func:`lora_edu.lora.inject_lora`: both draw A from the same Kaiming-uniform distribution
    and start B at 0, so their runs should agree within the spread across seeds.
    """
    import copy

    from lora_edu.lora import LoraConfig, inject_lora
    from lora_edu.repro import seed_all

    spec = method_spec(method)
    if implementation not in ("lora_edu", "peft"):
        raise ValueError(f"implementation must be 'lora_edu' or 'peft', got {implementation!r}")
    if spec is None and implementation == "peft":
        raise ValueError("full fine-tuning has no PEFT version; use implementation='lora_edu'")
    model = copy.deepcopy(base)
    seed_all(seed)
    if spec is None:
        return model.requires_grad_(True)
    r, targets, alpha = spec
    if implementation == "peft":
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha,
                                                          target_modules=targets))
    return inject_lora(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))


def run_method(base: nn.Module, tokenizer: Any, method: str, lr: float, seed: int,
               data: dict[str, Any], steps: int = 60, batch_size: int = 8,
               implementation: str = "lora_edu", keep_model: bool = False,
               on_step: Callable[[int, nn.Module], None] | None = None,
               evaluate: Sequence[str] = ("validation", "test"),
               keep_items: Sequence[str] = ("test",),
               forgetting: bool = True, stop_after: int | None = None) -> dict[str, Any]:
    """Fine-tune a copy of ``base`` with ``method`` and score it.

    The batch order is drawn from ``seed``; the initial LoRA weights from
    :func:`init_seed` ``(method, seed)``. Runs of two methods with one seed therefore see the
    same batches (a paired design) but never share an initial A.

    Args:
        data: ``{"train", "validation", "test": lists of Example, "prose": list of str,
            "chat": list of (prompt, reference reply)}`` (see :func:`task_data`).
        evaluate: the splits scored with :func:`score_examples`.
        keep_items: the splits whose per-question scores are kept in the record.
        forgetting: also measure prose and chat loss (``data["chat"]`` needed for chat).
        stop_after: train only the first steps of the run (see :func:`train_sft`).

    Returns:
        A JSON-ready record: the settings, trainable parameters, per-step losses, median step
        time, ``<split>`` summaries (:func:`summarise_scores`), ``<split>_items`` per-question
        scores for ``keep_items``, prose loss (nats/byte) and chat loss (nats/token);
        with ``keep_model`` also ``"model"`` (not JSON-ready).
    """
    model = prepare_method(base, method, init_seed(method, seed), implementation)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    history = train_sft(model, tokenizer, data["train"], SFTConfig(
        steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 10),
        seed=seed, show_progress=False), on_step=on_step, stop_after=stop_after)
    record: dict[str, Any] = {"method": method, "implementation": implementation, "lr": lr,
                              "seed": seed, "init_seed": init_seed(method, seed),
                              "steps": steps, "batch_size": batch_size,
                              "trainable": trainable, "losses": history.losses,
                              "median_step_seconds": history.median_step_seconds}
    for split in evaluate:
        scores = score_examples(model, tokenizer, data[split])
        record[split] = summarise_scores(scores)
        if split in keep_items:
            record[f"{split}_items"] = scores
    if forgetting:
        record["prose_loss"] = prose_loss(model, tokenizer, data["prose"])
        if data.get("chat"):
            record["chat_loss"] = chat_loss(model, tokenizer, data["chat"])
    if keep_model:
        record["model"] = model
    return record


def task_data(n_train: int = 2000, n_prose: int = 16, show_work: bool = True,
              chat: list[tuple[str, str]] | None = None,
              result_first: bool = False) -> dict[str, Any]:
    """The fixed data of chapter 8: the training draw (natural mix of kinds), the stratified
    validation and test sets (:data:`lora_edu.tasks.VALIDATION_STRATA`,
    :data:`~lora_edu.tasks.TEST_STRATA`), prose passages, and ``chat`` (pairs from
    :func:`chat_references`, if given). ``show_work=False``: bare result dates as answers;
    ``result_first=True``: the worked answer with its result first (``"R = S + k"``)."""
    from lora_edu.tasks import TEST_STRATA, VALIDATION_STRATA, date_arithmetic

    form = {"show_work": show_work, "result_first": result_first}
    return {"train": date_arithmetic(n_train, "train", **form),
            "validation": date_arithmetic(split="validation", strata=VALIDATION_STRATA, **form),
            "test": date_arithmetic(split="test", strata=TEST_STRATA, **form),
            "prose": prose_texts(n_prose), "chat": chat or []}


# ------------------------------------------------------------------------- forgetting, twice

def prose_examples(n: int, prompt_chars: int = 80, answer_chars: int = 100,
                   avoid: int = 16) -> list[Example]:
    """``n`` prose-continuation examples from Python's documentation topics ("Continue the
    text: <80 characters>" → the next 100 characters), none overlapping the first ``avoid``
    evaluation passages of :func:`prose_texts`. Trained with the task's own recipe, they
    give chapter 5's null: an update of the same size and schedule that learns no task."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    held_out = prose_texts(avoid)
    taken = [(text.index(p), text.index(p) + len(p)) for p in held_out]
    width = prompt_chars + answer_chars
    examples, pos = [], 0
    while len(examples) < n:
        if pos + width > len(text):
            raise ValueError(f"the documentation text holds fewer than {n} examples")
        if all(pos + width <= lo or pos >= hi for lo, hi in taken):
            chunk = " ".join(text[pos:pos + width].split())
            examples.append(Example(f"Continue the text: {chunk[:prompt_chars]}",
                                    chunk[prompt_chars:].strip()))
        pos += width + 37  # a stride that is not a multiple of the width: varied starts
    return examples


#: General requests an instruct model answers in its own words: the base model's greedy
#: replies to them are what :func:`chat_loss` scores (forgetting of the instruct behaviour).
CHAT_PROMPTS = (
    "Give me three tips for staying focused while studying.",
    "What is the capital of France?",
    "Explain what photosynthesis is in one sentence.",
    "Write a short poem about the sea.",
    "How do I boil an egg?",
    "What is the difference between weather and climate?",
    "Suggest a name for a friendly robot.",
    "Why is the sky blue?",
    "List three fruits that are rich in vitamin C.",
    "What does a librarian do?",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is a healthy breakfast?",
    "Describe a cat to someone who has never seen one.",
    "What should I pack for a weekend camping trip?",
    "Explain what a computer program is to a child.",
    "What is the tallest mountain in the world?",
    "Give me a tip for writing a good email.",
    "What are the primary colours?",
    "How can I save water at home?",
    "What is the boiling point of water at sea level?",
    "Name three musical instruments.",
    "Why do we need sleep?",
    "What is a good way to start learning to draw?",
)


def _chat_prompt(tokenizer: Any, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def chat_references(model: nn.Module, tokenizer: Any,
                    prompts: Sequence[str] = CHAT_PROMPTS,
                    max_new_tokens: int = 48) -> list[tuple[str, str]]:
    """``(prompt, reply)`` pairs: the model's own greedy replies under its chat template
    (computed once, from the base model)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer([_chat_prompt(tokenizer, p) for p in prompts], return_tensors="pt",
                        padding=True, add_special_tokens=False).to(_device(model))
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=_pad_id(tokenizer))
        replies = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                         skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [(p, r.strip()) for p, r in zip(prompts, replies)]


@torch.no_grad()
def chat_loss(model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]],
              batch_size: int = 24) -> float:
    """Nats per token of the reference replies under ``model`` (teacher-forced, the prompt
    in the chat template given, batched): forgetting of the instruct behaviour is the rise
    over the base model's value."""
    items = []
    for prompt, reply in pairs:
        head = tokenizer(_chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        tail = tokenizer(reply, add_special_tokens=False)["input_ids"]
        items.append({"input_ids": head + tail, "labels": [IGNORE] * len(head) + tail})
    total, count = 0.0, 0
    for i in range(0, len(items), batch_size):
        batch = collate(items[i:i + batch_size], _pad_id(tokenizer))
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        total += _loss(model, batch).item() * n
        count += n
    return total / count
