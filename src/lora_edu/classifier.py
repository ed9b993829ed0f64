"""Sequence classification with LoRA and a trained head, on the real model, offline.

The classic first fine-tuning lab (a spam filter or a sentiment classifier in most courses) puts
a new classification head on a pretrained language model and trains it together with LoRA
adapters. The head is new, so it has no pretrained weight for LoRA to update: it is trained in
full, as PEFT's ``modules_to_save`` does (:class:`lora_edu.lora.ModulesToSaveWrapper`).

**The task** (:func:`category_examples`): which kind of thing a sentence is about, one of
:data:`CATEGORIES`, from sentences such as "They spent the afternoon looking at a zebra." The
sentence templates say nothing about the category; only the noun does. Nouns are split between
train, validation and test (by their position in each category's list: ``index mod 5`` is 0 or 4
for test, 1 for validation, 2 or 3 for training), and so are the templates, so every test sentence has a noun and a
template that training never saw: a correct answer needs what the pretrained model knows about
the word. Everything is generated from the lists below and a seed; nothing is downloaded.

**The model** (:func:`load_classifier`): SmolLM2-135M-Instruct from the book's cache
(:mod:`lora_edu.pretrained`) as a transformers ``LlamaForSequenceClassification``: the
pretrained body and a new ``score`` head (576 → number of classes, no bias), which reads the
hidden state of each sentence's last token.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CATEGORIES", "NOUNS", "TEMPLATES", "SPLITS", "RECIPE", "METHODS", "article",
           "category_examples", "nouns_of", "templates_of", "load_classifier", "encode",
           "predict", "evaluate", "train_classifier", "lora_head_model", "head_only_model",
           "run"]

CATEGORIES = ("animal", "food", "vehicle", "musical instrument")
#: Sixty countable nouns per category. Their position decides the split (see the module doc).
NOUNS: dict[str, tuple[str, ...]] = {
    "animal": tuple("""dog cat horse cow sheep goat pig rabbit mouse rat lion tiger bear wolf fox
        deer moose zebra giraffe elephant hippo rhino camel kangaroo koala panda monkey gorilla
        squirrel beaver otter badger hedgehog bat owl eagle hawk parrot pigeon swan duck goose
        penguin ostrich crow frog toad snake lizard turtle crocodile shark whale dolphin octopus
        crab lobster spider bee butterfly""".split()),
    "food": tuple("""apple banana orange pear peach plum cherry lemon mango pineapple strawberry
        grape melon coconut apricot sandwich burger pizza pancake waffle muffin cupcake cookie
        biscuit croissant bagel doughnut pie cake omelette sausage steak taco burrito dumpling
        noodle potato carrot tomato cucumber onion cabbage lettuce pumpkin avocado pretzel
        cracker brownie lasagna salad soup curry kebab meatball cheeseburger hotdog egg peanut
        walnut olive""".split()),
    "vehicle": tuple("""car bus truck van taxi tram train bicycle motorcycle scooter tractor
        ambulance limousine jeep minivan lorry trolleybus caravan wagon carriage sled snowmobile
        bulldozer forklift excavator airplane helicopter jet glider airship rocket spaceship boat
        ship yacht canoe kayak ferry submarine sailboat speedboat tanker tugboat raft gondola
        skateboard unicycle tricycle rickshaw moped hovercraft zeppelin convertible pickup coupe
        sedan hatchback minibus locomotive firetruck""".split()),
    "musical instrument": tuple("""piano guitar violin cello viola harp flute clarinet oboe
        bassoon trumpet trombone tuba saxophone harmonica accordion banjo mandolin ukulele sitar
        drum tambourine xylophone marimba glockenspiel harmonium cymbal gong concertina
        harpsichord synthesizer tabla bagpipe erhu piccolo bugle cornet lute lyre zither dulcimer
        kazoo ocarina didgeridoo bongo conga timpani maraca cowbell balalaika bouzouki theremin
        celesta euphonium flugelhorn sousaphone shamisen koto bandoneon melodica""".split()),
}
#: Sentence templates; ``{a}`` is the noun with its article ("a zebra", "an owl").
TEMPLATES: dict[str, tuple[str, ...]] = {
    "train": ("I saw {a} near the old bridge yesterday.",
              "My neighbour kept talking about the {n} all evening.",
              "There was {a} in the picture on the wall.",
              "She wrote a short story about {a}.",
              "The children asked me to describe {a}.",
              "He pointed at the {n} and smiled.",
              "We read an article about the {n} this morning.",
              "Nobody expected to find {a} there."),
    "validation": ("{A} appeared in my dream last night.",
                   "The teacher drew {a} on the board."),
    "test": ("They spent the afternoon looking at {a}.",
             "I could not stop thinking about the {n}."),
}
SPLITS = ("train", "validation", "test")


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def nouns_of(split: str) -> list[tuple[str, int]]:
    """``(noun, label)`` for every noun of ``split`` (index mod 5: 0 or 4 test, 1 validation,
    2 or 3 train): 96 test, 48 validation and 96 training nouns."""
    _check_split(split)
    want = {"test": (0, 4), "validation": (1,), "train": (2, 3)}[split]
    return [(noun, label) for label, category in enumerate(CATEGORIES)
            for i, noun in enumerate(NOUNS[category]) if i % 5 in want]


def templates_of(split: str) -> tuple[str, ...]:
    """The sentence templates of ``split`` (disjoint between splits)."""
    return TEMPLATES[_check_split(split)]


#: Nouns spelt with a vowel but said with a consonant sound ("a ukulele", "a euphonium").
CONSONANT_SOUND = frozenset({"ukulele", "unicycle", "euphonium", "ewe", "unicorn", "uniform"})


def article(noun: str) -> str:
    """The noun with its indefinite article: "an" before a vowel sound ("an owl", "an erhu"),
    "a" otherwise ("a zebra", and "a ukulele": :data:`CONSONANT_SOUND` lists the exceptions)."""
    vowel_sound = noun[0] in "aeiou" and noun not in CONSONANT_SOUND
    return ("an " if vowel_sound else "a ") + noun


def _sentence(template: str, noun: str) -> str:
    a = article(noun)
    return template.format(a=a, A=a[0].upper() + a[1:], n=noun)


def category_examples(split: str, seed: int = 0, per_noun: int | None = 1
                      ) -> list[tuple[str, int]]:
    """``(sentence, label)`` pairs of ``split``; ``label`` indexes :data:`CATEGORIES`.

    Args:
        split: ``"train"``, ``"validation"`` or ``"test"``.
        seed: draws the template of each sentence (``random.Random(f"{split}-{seed}")``).
        per_noun: sentences per noun, each with a different template of the split; ``None``:
            every template (the training set: 96 nouns × 8 templates). The held-out sets
            use one sentence per noun, so no noun counts twice; a Wilson interval over them
            treats the nouns of this fixed list and the templates of the split as the
            population, and does not cover other nouns, templates or phrasings.
    """
    templates = templates_of(split)
    if per_noun is not None and not 1 <= per_noun <= len(templates):
        raise ValueError(f"per_noun must lie in 1..{len(templates)} for split {split!r} "
                         f"(or None for every template), got {per_noun}")
    rng = random.Random(f"{split}-{seed}")
    out = []
    for noun, label in nouns_of(split):
        chosen = templates if per_noun is None else rng.sample(templates, per_noun)
        out += [(_sentence(t, noun), label) for t in chosen]
    return out


def load_classifier(num_labels: int = len(CATEGORIES), seed: int = 0,
                    root: str | None = None, fetch: bool | None = None
                    ) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct as a ``LlamaForSequenceClassification`` and its tokenizer.

    The body's weights come from the book's cache (``make model``); as
    :func:`lora_edu.pretrained.load_smollm2` does, a missing cache is fetched in Colab (or
    with ``LORA_EDU_FETCH=1``; ``fetch`` overrides) and raises ``ModelCacheError`` naming
    ``make model`` elsewhere. The ``score`` head (576 → ``num_labels``, no bias) is new,
    drawn by transformers' initialiser after ``torch.manual_seed(seed)``. The padding token
    is the tokenizer's, so that the model reads each sentence's last real token. Returns the
    model in eval mode.
    """
    from transformers import AutoTokenizer, LlamaForSequenceClassification
    from transformers.utils import logging as hf_logging

    from lora_edu.pretrained import model_folder

    folder = model_folder(root, fetch)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialised": that is the point
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification.from_pretrained(
            folder, num_labels=num_labels, pad_token_id=tokenizer.pad_token_id)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def encode(tokenizer: Any, texts: Sequence[str], device: torch.device | str = "cpu"
           ) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (n, T), padded to the longest sentence."""
    batch = tokenizer(list(texts), return_tensors="pt", padding=True)
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict(model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 64
            ) -> torch.Tensor:
    """The predicted label of each text (argmax of the logits), shape (n,), on the CPU."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        logits = model(**encode(tokenizer, texts[i:i + batch_size], _device(model))).logits
        out.append(logits.argmax(-1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def train_classifier(model: nn.Module, tokenizer: Any, examples: Sequence[tuple[str, int]],
                     steps: int, lr: float, batch_size: int = 16, seed: int = 0,
                     weight_decay: float = 0.0) -> list[float]:
    """Train the parameters that require grad with AdamW on cross-entropy; returns the
    loss of every step.

    Each step draws ``batch_size`` examples without replacement (a fresh permutation of the
    training set when one runs out), from a ``torch.Generator`` seeded with ``seed``.
    """
    if steps < 1 or batch_size < 1 or not examples:
        raise ValueError("train_classifier needs steps >= 1, batch_size >= 1 and examples")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no parameter requires grad: inject LoRA (with modules_to_save for "
                         "the head) before training")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    model.train()
    device = _device(model)
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(examples), generator=gen).tolist()
        picked, order = order[:batch_size], order[batch_size:]
        texts = [examples[i][0] for i in picked]
        labels = torch.tensor([examples[i][1] for i in picked], device=device)
        loss = F.cross_entropy(model(**encode(tokenizer, texts, device)).logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer: Any, examples: Sequence[tuple[str, int]],
             batch_size: int = 64) -> dict[str, Any]:
    """``{"loss": mean cross-entropy (nats), "accuracy": share right, "correct": [0/1 per
    example]}`` on ``examples``, in eval mode."""
    was_training = model.training
    model.eval()
    losses, correct = 0.0, []
    for i in range(0, len(examples), batch_size):
        part = examples[i:i + batch_size]
        logits = model(**encode(tokenizer, [t for t, _ in part], _device(model))).logits.float()
        labels = torch.tensor([y for _, y in part], device=logits.device)
        losses += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += (logits.argmax(-1) == labels).int().tolist()
    model.train(was_training)
    return {"loss": losses / len(examples), "accuracy": sum(correct) / len(examples),
            "correct": correct}


#: The chapter's configuration: LoRA on W_q, W_v at r = 8 (α = 16) and the trained head,
#: 20 AdamW steps of 16 sentences. The learning rate is chosen on the validation split by
#: ``benchmarks/classifier.py``. ``"method": "head"`` trains the head alone (a linear probe
#: of the frozen body), the baseline that says whether LoRA is needed at all.
RECIPE: dict[str, Any] = {"method": "lora", "r": 8, "lora_alpha": 16,
                          "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["score"],
                          "steps": 20, "batch_size": 16}
METHODS = ("lora", "head")


def _fresh_head(base: nn.Module, seed: int) -> nn.Module:
    """A copy of ``base`` whose head is redrawn from ``seed`` (the same draw for every
    method, so that methods compared at one seed start from the same head)."""
    from lora_edu.repro import seed_all

    model = copy.deepcopy(base)
    seed_all(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        model.score.weight.normal_(0.0, std)  # transformers' own initialisation of the head
    return model


def lora_head_model(base: nn.Module, seed: int, recipe: dict[str, Any] | None = None
                    ) -> nn.Module:
    """A copy of ``base`` with a new head drawn from ``seed`` and LoRA injected (the head as
    a module to save); ``base`` itself is not modified."""
    from lora_edu.lora import LoraConfig, inject_lora

    recipe = {**RECIPE, **(recipe or {})}
    model = _fresh_head(base, seed)
    keys = ("r", "lora_alpha", "target_modules", "modules_to_save")
    return inject_lora(model, LoraConfig(**{k: recipe[k] for k in keys}))


def head_only_model(base: nn.Module, seed: int) -> nn.Module:
    """A copy of ``base`` with a new head drawn from ``seed`` (the same draw as
    :func:`lora_head_model`'s) and every other parameter frozen: a linear probe, which trains
    576 × classes numbers on the frozen body's last-token hidden state."""
    model = _fresh_head(base, seed)
    for p in model.parameters():
        p.requires_grad_(False)
    model.score.weight.requires_grad_(True)
    return model


def run(base: nn.Module, tokenizer: Any, lr: float, seed: int,
        recipe: dict[str, Any] | None = None,
        splits: Sequence[str] = ("validation", "test")) -> dict[str, Any]:
    """One training run of :data:`RECIPE` at ``lr`` and ``seed`` (head, A and batch order);
    ``recipe={"method": "head"}`` trains the head alone (:func:`head_only_model`).

    Returns ``{"model", "losses", "before": {split: evaluate(...)}, "after": {...}}`` for
    the held-out ``splits``; "before" is the model with its new head and B = 0, which
    computes exactly what the base model with that head computes.
    """
    recipe = {**RECIPE, **(recipe or {})}
    if recipe["method"] not in METHODS:
        raise ValueError(f"recipe['method'] must be one of {METHODS}, got {recipe['method']!r}")
    model = (lora_head_model(base, seed, recipe) if recipe["method"] == "lora"
             else head_only_model(base, seed))
    held_out = {split: category_examples(split) for split in splits}
    before = {split: evaluate(model, tokenizer, ex) for split, ex in held_out.items()}
    losses = train_classifier(model, tokenizer, category_examples("train", per_noun=None),
                              steps=recipe["steps"], lr=lr, batch_size=recipe["batch_size"],
                              seed=seed)
    after = {split: evaluate(model, tokenizer, ex) for split, ex in held_out.items()}
    return {"model": model, "losses": losses, "before": before, "after": after}
