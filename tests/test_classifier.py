"""The offline category task of lora_edu.classifier: splits, labels, determinism, bad input."""

from __future__ import annotations

import pytest
from torch import nn

from lora_edu.classifier import (CATEGORIES, NOUNS, TEMPLATES, category_examples, nouns_of,
                                 templates_of)


def test_nouns_and_templates_are_disjoint_between_splits():
    splits = ("train", "validation", "test")
    nouns = {s: {n for n, _ in nouns_of(s)} for s in splits}
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            assert not nouns[a] & nouns[b]
            assert not set(templates_of(a)) & set(templates_of(b))
    assert sum(len(v) for v in nouns.values()) == sum(len(v) for v in NOUNS.values())
    assert len({n for v in NOUNS.values() for n in v}) == sum(len(v) for v in NOUNS.values())


def test_every_category_is_in_every_split_equally():
    for split in ("train", "validation", "test"):
        labels = [y for _, y in nouns_of(split)]
        assert {labels.count(c) for c in range(len(CATEGORIES))} == {len(labels) // 4}


def test_examples_name_their_noun_and_are_deterministic():
    test = category_examples("test", seed=3)
    assert test == category_examples("test", seed=3)
    assert len(test) == len(nouns_of("test"))
    for (sentence, label), (noun, noun_label) in zip(test, nouns_of("test")):
        assert noun in sentence and label == noun_label
        assert " a a" not in sentence and " a o" not in sentence  # "an owl", "an apple"
    train = category_examples("train", per_noun=None)
    assert len(train) == len(nouns_of("train")) * len(TEMPLATES["train"])


@pytest.mark.parametrize("split, per_noun", [("dev", 1), ("test", 0), ("test", 3)])
def test_bad_arguments_are_refused(split, per_noun):
    with pytest.raises(ValueError):
        category_examples(split, per_noun=per_noun)


def test_the_article_follows_the_sound():
    from lora_edu.classifier import article
    assert [article(n) for n in ("owl", "erhu", "zebra", "ukulele", "unicycle", "euphonium")] \
        == ["an owl", "an erhu", "a zebra", "a ukulele", "a unicycle", "a euphonium"]
    sentences = " ".join(s for split in ("train", "validation", "test")
                         for s, _ in category_examples(split, per_noun=None))
    for wrong in ("an ukulele", "an unicycle", "an euphonium", "An ukulele", "a owl"):
        assert wrong not in sentences


def test_the_test_split_has_twice_the_validation_nouns():
    assert len(nouns_of("test")) == 2 * len(nouns_of("validation")) == len(nouns_of("train"))


def test_an_unknown_method_is_refused():
    from lora_edu.classifier import run
    with pytest.raises(ValueError, match="method"):
        run(None, None, 1e-3, 0, recipe={"method": "full"})


# modules_to_save where lora_edu deliberately differs from PEFT 0.21.2 (documented on LoraConfig)

class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.v, self.score = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.score(self.q(x) + self.v(x))


def test_a_module_both_targeted_and_saved_is_refused_and_the_model_left_alone():
    from lora_edu.lora import LoraConfig, inject_lora, lora_layers
    model = _Tiny()
    with pytest.raises(ValueError, match="both a LoRA target"):
        inject_lora(model, LoraConfig(r=2, target_modules=["q", "score"],
                                      modules_to_save=["score"]))
    assert isinstance(model.score, nn.Linear) and not list(lora_layers(model))


def test_an_entry_matching_nothing_is_refused():
    from lora_edu.lora import LoraConfig, inject_lora
    with pytest.raises(ValueError, match="classifier"):
        inject_lora(_Tiny(), LoraConfig(r=2, target_modules=["q"],
                                        modules_to_save=["classifier"]))


def test_disabled_adapters_freeze_the_copies_as_peft_does():
    from lora_edu.lora import LoraConfig, disable_adapters, inject_lora
    model = inject_lora(_Tiny(), LoraConfig(r=2, target_modules=["q"], modules_to_save=["score"]))
    copy_ = model.score.trainable_module.weight
    assert copy_.requires_grad
    with disable_adapters(model):
        assert not copy_.requires_grad
    assert copy_.requires_grad
