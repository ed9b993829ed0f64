"""Supervised fine-tuning on question → answer examples (lora_edu.sft), on a tiny random Llama
with the real model's tokenizer."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lora_edu.pretrained import check_cache
from lora_edu.sft import (
    IGNORE,
    SFTConfig,
    collate,
    encode_examples,
    exact_match,
    train_sft,
)
from lora_edu.tasks import date_arithmetic, prompt_text


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(check_cache())


def tiny_llama(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1, tie_word_embeddings=True))


def test_only_the_answer_is_supervised(tokenizer):
    ex = date_arithmetic(1)[0]
    item = encode_examples(tokenizer, [ex])[0]
    n_prompt = len(tokenizer(prompt_text(ex.question))["input_ids"])
    assert item["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert item["labels"][n_prompt:] == item["input_ids"][n_prompt:]
    assert item["labels"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(item["input_ids"][n_prompt:-1]).strip() == ex.answer


def test_collate_pads_right_and_masks(tokenizer):
    items = encode_examples(tokenizer, date_arithmetic(3))
    batch = collate(items, tokenizer.eos_token_id)
    lengths = [len(it["input_ids"]) for it in items]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def test_training_lowers_the_loss_and_is_reproducible(tokenizer):
    examples = date_arithmetic(16)
    losses = []
    for _ in range(2):
        model = tiny_llama(len(tokenizer))
        history = train_sft(model, tokenizer, examples, SFTConfig(
            steps=12, batch_size=4, lr=1e-2, warmup_steps=1, show_progress=False))
        losses.append(history.losses)
    assert losses[0] == losses[1]  # same seed, same batches, same numbers
    assert losses[0][-1] < losses[0][0]
    assert 0.0 <= exact_match(model, tokenizer, examples[:4]) <= 1.0


def test_bad_input_is_refused(tokenizer):
    with pytest.raises(ValueError, match="SFTConfig.steps"):
        SFTConfig(steps=0)
    with pytest.raises(ValueError, match="SFTConfig.grad_clip"):
        SFTConfig(grad_clip=0)
    frozen = tiny_llama(len(tokenizer)).requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        train_sft(frozen, tokenizer, date_arithmetic(8), SFTConfig(steps=2, batch_size=4,
                                                                   warmup_steps=0))
    with pytest.raises(ValueError, match="fewer than batch_size"):
        train_sft(tiny_llama(len(tokenizer)), tokenizer, date_arithmetic(2),
                  SFTConfig(steps=2, batch_size=4, warmup_steps=0))


def test_teacher_forced_exact_match_equals_greedy_generation(tokenizer):
    """exact[i] is True exactly when greedy decoding writes the reference answer: checked on
    a tiny model that has memorised some questions (so both outcomes occur)."""
    from lora_edu.sft import generate_answers, score_examples, summarise_scores

    seen = date_arithmetic(4)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    train_sft(model, tokenizer, seen, SFTConfig(steps=120, batch_size=4, lr=1e-2,
                                                warmup_steps=1, show_progress=False))
    examples = seen + date_arithmetic(4, "test")
    scores = score_examples(model, tokenizer, examples)
    generated = generate_answers(model, tokenizer, [e.question for e in examples])
    assert scores["exact"] == [g == e.answer for g, e in zip(generated, examples)]
    assert any(scores["exact"]) and not all(scores["exact"])
    for exact, start, result in zip(scores["exact"], scores["start_ok"], scores["result_ok"]):
        assert not exact or (start and result)
    summary = summarise_scores(scores)
    assert summary["exact_match"] == sum(scores["exact"]) / len(examples)
    assert all(n > 0 for n in scores["n_result"])
    # result_greedy: greedy decoding writes the answer's prefix up to the end of the result
    from lora_edu.tasks import answer_spans

    first = [e for e in date_arithmetic(4, result_first=True)]
    bare = date_arithmetic(4, show_work=False)
    for group in (examples, first, bare):
        sc = score_examples(model, tokenizer, group)
        gen = generate_answers(model, tokenizer, [e.question for e in group])
        want = [g.startswith(e.answer[:answer_spans(e.answer)["result"][1]])
                for g, e in zip(gen, group)]
        assert sc["result_greedy"] == want
        assert all(g or not x for g, x in zip(sc["result_greedy"], sc["exact"]))
    assert any(scores["result_greedy"])


def test_score_spans_the_start_date_and_the_result(tokenizer):
    """The tokens scored as 'start' decode to the start date, 'result' to the result."""
    from lora_edu.sft import _encode_scored

    for ex in date_arithmetic(5) + date_arithmetic(3, show_work=False):
        item = _encode_scored(tokenizer, ex)
        picked = {name: tokenizer.decode([t for t, m in zip(item["input_ids"], item[name])
                                          if m]).strip() for name in ("start", "result")}
        assert picked["result"] == ex.answer.split(" = ")[-1]
        assert picked["start"] == (ex.answer.split(" + ")[0] if " = " in ex.answer else "")


def test_stratified_sets_and_question_kinds():
    import datetime

    from lora_edu.tasks import KINDS, TEST_STRATA, kind_of, question_kind

    d = datetime.date
    assert question_kind(d(2021, 3, 4), 3) == "within_month"
    assert question_kind(d(2021, 2, 27), 2) == "month_end"      # 2021 is not a leap year
    assert question_kind(d(2020, 2, 27), 2) == "leap_day"       # passes 29 February 2020
    assert question_kind(d(2020, 2, 25), 4) == "leap_day"       # lands on it
    assert question_kind(d(2021, 12, 30), 5) == "year_end"
    test = date_arithmetic(split="test", strata=TEST_STRATA)
    assert [kind_of(e) for e in test] == [k for k in KINDS for _ in range(TEST_STRATA[k])]
    assert len({e.question for e in test}) == len(test)           # no question twice
    train = date_arithmetic(2000, "train")
    month_day = lambda e: e.answer.split(" + ")[0][5:]
    assert not {month_day(e) for e in train} & {month_day(e) for e in test}
    assert "1 day after" in next(e.question for e in train if e.question.split()[3] == "1")
    with pytest.raises(ValueError, match="not both"):
        date_arithmetic(5, strata={"within_month": 2})
    with pytest.raises(ValueError, match="unknown kinds"):
        date_arithmetic(split="test", strata={"weekend": 2})


def test_train_step_long_batch_has_the_asked_length(tokenizer):
    """benchmarks/train_step.long_batch: exactly `length` real tokens (no padding), at lengths
    above and below one example's, from a padded batch of the chapter's task."""
    from conftest import import_benchmark

    long_batch = import_benchmark("train_step").long_batch
    batch = collate(encode_examples(tokenizer, date_arithmetic(8)), tokenizer.eos_token_id)
    real = batch["attention_mask"][0].bool()
    row = batch["input_ids"][0][real]
    assert row.numel() < batch["input_ids"].shape[1] or batch["attention_mask"].all()
    for length in (7, 512, 2048):
        lb = long_batch(batch, length)
        assert lb["input_ids"].shape == (1, length) and lb["attention_mask"].all()
        assert torch.equal(lb["input_ids"][0, :min(length, row.numel())],
                           row[:min(length, row.numel())])
        assert not (lb["input_ids"][0, row.numel():2 * row.numel()] == tokenizer.eos_token_id
                    ).all() or length <= row.numel()
    with pytest.raises(ValueError, match="positive int"):
        long_batch(batch, 0)


_FREED = """
import gc, os, sys
import torch
sys.path.insert(0, sys.argv[1])
import train_step


def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


assert train_step.keep_large_blocks_on_mmap()
kept = []   # small tensors that outlive each round pin the heap, as a model's do
for _ in range(3):  # later rounds run after a large free, as in the script
    tensors = []
    for _ in range(64):   # 64 x 4 MiB
        tensors.append(torch.ones(1024, 1024))
        kept.append(torch.ones(16 * 1024))
    held = resident()
    del tensors
    gc.collect()
    print(held - resident())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_train_step_gives_freed_tensors_back():
    """benchmarks/train_step.keep_large_blocks_on_mmap: after it, freeing a model's worth of
    few-MiB tensors lowers the resident memory (glibc's adaptive threshold would keep them on
    the heap after the first large free, and the script grew ~1 GB per model copy). Measured
    in a fresh process, as the script runs: the heap of a long test session, shaped by every
    test before this one, is not the script's."""
    import subprocess

    from conftest import BENCH

    out = subprocess.run([sys.executable, "-c", _FREED, str(BENCH)], capture_output=True,
                         text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    freed = [int(line) for line in out.stdout.split()]
    assert len(freed) == 3
    assert all(f > 200 * 2**20 for f in freed), freed   # without the fix: 0 in rounds 2, 3
