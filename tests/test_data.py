"""Corpora: offline, deterministic, split by document without overlap; tokenizer; batches."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_edu.data import (CORPORA, Corpus, decode, encode, eval_batches, load_corpus,
                           random_batches)


@settings(max_examples=50, deadline=None)
@given(text=st.text())
def test_bytes_round_trip(text: str) -> None:
    ids = encode(text)
    assert ids.dtype == torch.long and (ids.numel() == 0 or int(ids.max()) < 256)
    assert decode(ids) == text


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_corpora_are_deterministic_and_split_without_overlap(name: str) -> None:
    corpus = load_corpus(name)
    again = Corpus.from_documents(name, CORPORA[name][1](), CORPORA[name][2])
    assert corpus.sha256 == again.sha256
    assert torch.equal(corpus.train, again.train) and torch.equal(corpus.val, again.val)
    assert not set(corpus.train_docs) & set(corpus.val_docs)
    documents = CORPORA[name][1]()
    assert set(corpus.train_docs) | set(corpus.val_docs) == {k for k, v in documents.items() if v}
    # Every byte is in exactly one split (plus the blank lines joining documents).
    joins = 2 * (len(corpus.train_docs) - 1 + len(corpus.val_docs) - 1)
    assert corpus.train.numel() + corpus.val.numel() == sum(map(len, documents.values())) + joins
    assert 0.03 < corpus.val.numel() / (corpus.train.numel() + corpus.val.numel()) < 0.3


def test_corpus_sizes_are_worth_training_on() -> None:
    assert load_corpus("python-stdlib").train.numel() > 1_000_000
    assert load_corpus("python-docs").train.numel() > 100_000


@settings(max_examples=20, deadline=None)
@given(names=st.sets(st.text(min_size=1, max_size=8), min_size=30, max_size=60),
       extra=st.text(min_size=9, max_size=12))
def test_adding_a_document_moves_no_other(names: set[str], extra: str) -> None:
    docs = {n: n.encode() + b"!" for n in names}
    try:
        before = Corpus.from_documents("c", docs, 20)
    except ValueError:  # every name hashed to one side: nothing to compare
        return
    after = Corpus.from_documents("c", {**docs, extra: b"new"}, 20)
    assert set(before.val_docs) <= set(after.val_docs)
    assert set(before.train_docs) <= set(after.train_docs)


def test_bad_corpora_are_refused() -> None:
    with pytest.raises(ValueError, match="corpus 'empty' is empty"):
        Corpus.from_documents("empty", {})
    with pytest.raises(ValueError, match="is empty"):
        Corpus.from_documents("blank", {"a": b"", "b": b""})
    with pytest.raises(ValueError, match="too few to split"):
        Corpus.from_documents("one", {"only": b"text"})
    with pytest.raises(ValueError, match="unknown corpus 'wikipedia'"):
        load_corpus("wikipedia")
    with pytest.raises(ValueError, match="val_percent"):
        Corpus.from_documents("x", {"a": b"1", "b": b"2"}, val_percent=0)


def test_random_batches_are_shifted_windows_and_seeded() -> None:
    tokens = torch.arange(1000) % 256
    x, y = next(random_batches(tokens, 4, 16, torch.Generator().manual_seed(0)))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal((x + 1) % 256, y)  # the next token of an arange is +1
    x2, _ = next(random_batches(tokens, 4, 16, torch.Generator().manual_seed(0)))
    assert torch.equal(x, x2)


def test_eval_batches_are_fixed_and_cover_the_split() -> None:
    tokens = torch.arange(500) % 256
    batches = eval_batches(tokens, 16, 10, 4)
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert torch.equal(batches[0][0][0], tokens[:16])
    assert int(batches[-1][1][-1, -1]) == int(tokens[-1])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, eval_batches(tokens, 16, 10, 4)))


def test_too_short_token_streams_are_refused() -> None:
    with pytest.raises(ValueError, match="at least block_size \\+ 1 = 17 tokens"):
        next(random_batches(torch.arange(16), 2, 16, torch.Generator()))
    with pytest.raises(ValueError, match="must be 1-D"):
        eval_batches(torch.zeros(2, 40, dtype=torch.long), 16, 2, 2)
