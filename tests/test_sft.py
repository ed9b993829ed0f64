"""Supervised fine-tuning on question → answer examples (lora_edu.sft), on a tiny random Llama
with the real model's tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lora_edu.pretrained import check_cache
from lora_edu.sft import IGNORE, SFTConfig, collate, encode_examples, exact_match, train_sft
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
