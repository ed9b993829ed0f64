"""The offline category task of lora_edu.classifier: splits, labels, determinism, bad input."""

from __future__ import annotations

import pytest

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
