"""The narrower losses a run logs beside the all-token loss: the answer-only loss (the response's tokens, whatever
--train_on_inputs trains on) and the digit-token loss, computed from the training forward's own per-token losses,
and a method's extra loss terms (`Strategy.batch_loss`) added to what is backpropagated."""

from __future__ import annotations

from argparse import Namespace

import datasets
import pytest
import torch
from tiny_models import make_model
from tiny_tokenizer import make_tokenizer

from adapters_ds import LoRAConfig, Strategy, freeze_base, inject_adapters
from adapters_ds.training.data import IGNORE_INDEX, collate, collate_packed, tokenize_records
from adapters_ds.training.loss import (
    answer_mask,
    digit_token_mask,
    forward_targets,
    micro_batch_loss,
    narrow_sums,
    target_counts,
    target_positions,
    token_losses,
    with_answer_targets,
)

RECORDS = [
    {"instruction": "What is 12 plus 30?", "input": "", "output": "12 + 30 = 42. The answer is 42."},
    {"instruction": "Add 3 and 7.", "input": "apples", "output": "The answer is 10."},
    {"instruction": "How many?", "input": "", "output": "Seven."},
]


def tokenized(train_on_inputs: bool) -> datasets.Dataset:
    args = Namespace(cutoff_len=64, train_on_inputs=train_on_inputs, template="alpaca")
    raw = datasets.Dataset.from_list(RECORDS)
    tokens = tokenize_records(raw, make_tokenizer(), 64, train_on_inputs, "alpaca")
    return with_answer_targets(tokens, raw, make_tokenizer(), args)


@pytest.mark.parametrize("packed", [False, True])
def test_answer_mask_marks_exactly_the_tokens_a_prompt_masked_run_trains_on(packed):
    full, answers_only = tokenized(True), tokenized(False)
    assert full["answer_targets"] == target_counts(answers_only) == answers_only["answer_targets"]
    assert all(a < t for a, t in zip(full["answer_targets"], target_counts(full), strict=True))
    examples = [full[i] for i in range(len(full))]
    batch = collate_packed(examples) if packed else collate(examples, 0)
    reference = collate_packed(list(answers_only)) if packed else collate(list(answers_only), 0)
    _, targets = target_positions(batch["labels"])
    mask = answer_mask(target_counts(full), full["answer_targets"])
    expected = reference["labels"][:, 1:][batch["labels"][:, 1:] != IGNORE_INDEX] != IGNORE_INDEX
    assert torch.equal(mask, expected) and len(mask) == len(targets)


def test_digit_token_mask_marks_the_tokens_with_a_digit():
    tokenizer = make_tokenizer()
    mask = digit_token_mask(tokenizer)
    assert len(mask) == len(tokenizer)
    for text, has_digit in (("42", True), (" 7", True), ("answer", False), (" The", False)):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert bool(mask[ids].any()) == has_digit, text
    assert mask[: len(tokenizer.all_special_ids)].sum() == 0


def test_narrow_sums_split_the_per_token_losses():
    per_token = torch.tensor([1.0, 2.0, 3.0, 4.0])
    answers = torch.tensor([False, True, True, True])
    digits = torch.tensor([True, True, False, True])
    assert narrow_sums(per_token, answers, digits).tolist() == [10.0, 4.0, 9.0, 3.0, 6.0, 2.0]
    assert narrow_sums(per_token, answers).tolist() == [10.0, 4.0, 9.0, 3.0]


def test_micro_batch_loss_adds_the_method_terms_and_reports_the_answer_loss():
    model = make_model("llama")
    inject_adapters(model, LoRAConfig(r=2))
    freeze_base(model)
    full = tokenized(True)
    batch = collate([full[i] for i in range(len(full))], 0)

    class Method(Strategy):
        def batch_loss(self, model, inputs, keep, logits, step):
            assert keep.shape == batch["labels"].shape and logits.shape[0] == int(keep.sum())
            return {"test/extra": logits.float().square().sum() * 0 + 5.0 * step}

    metrics: dict[str, float] = {}
    method = Method(LoRAConfig(r=2))
    terms = micro_batch_loss(model, batch, method, 3, target_counts(full), full["answer_targets"], metrics)
    per_token = token_losses(forward_targets(model, batch))
    mask = answer_mask(target_counts(full), full["answer_targets"])
    torch.testing.assert_close(terms.task, per_token.sum())
    torch.testing.assert_close(terms.total, per_token.sum() + 15.0)
    torch.testing.assert_close(terms.answer, torch.stack([per_token[mask].sum(), mask.sum().float()]))
    assert metrics == {"test/extra": pytest.approx(15.0 / len(per_token))}
    terms.total.backward()  # the extra term is part of the graph that trains
    assert model.model.layers[0].self_attn.q_proj.adapter.lora_A.grad is not None
