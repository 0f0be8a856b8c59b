"""The throughput paths of training give the loss and gradients of the plain path: logits only at target positions
(`adapters_ds.training.loss`) and packed micro-batches (`adapters_ds.training.data.collate_packed`)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, make_model

from adapters_ds import LoRAConfig, freeze_base, inject_adapters
from adapters_ds.adapters.base import adapter_parameters
from adapters_ds.training.data import IGNORE_INDEX, collate, collate_packed, count_tokens
from adapters_ds.training.loss import causal_lm_loss_sum, loss_sum, target_positions
from adapters_ds.training.packing import PACKED_SDPA, enable_packing, supports_packing


def features(lengths: list[int], masked_prompt: int = 0, seed: int = 0) -> list[dict[str, list[int]]]:
    """Examples of these lengths; the first `masked_prompt` labels of each are ignored (--no_train_on_inputs)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * masked_prompt + ids[masked_prompt:]})
    return out


def lora_model(family: str) -> torch.nn.Module:
    model = make_model(family)
    inject_adapters(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    freeze_base(model)
    for p in adapter_parameters(model).values():  # a non-zero update, so the adapters take part in the loss
        torch.nn.init.normal_(p, std=0.02)
    return model


def loss_and_grads(model: torch.nn.Module, compute) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    loss = compute()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in adapter_parameters(model).values()]


def test_target_positions_pair_each_position_with_the_next_label():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8], [IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX]])
    keep, targets = target_positions(labels)
    assert keep.tolist() == [[False, True, True, False], [True, False, False, False]]
    assert targets.tolist() == [7, 8, 5]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("masked_prompt", [0, 3])
def test_selective_logits_loss_equals_full_logits_loss(family, masked_prompt):
    model = lora_model(family)
    batch = collate(features([9, 14, 5], masked_prompt), pad_token_id=0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    full, full_grads = loss_and_grads(model, lambda: loss_sum(model(**inputs).logits, batch["labels"]))
    selective, grads = loss_and_grads(model, lambda: causal_lm_loss_sum(model, batch))
    torch.testing.assert_close(selective, full, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_packed_batch_layout():
    batch = collate_packed(features([3, 2], masked_prompt=1))
    assert count_tokens(batch).item() == count_tokens(collate(features([3, 2]), 0)).item() == 5
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["input_ids"].shape == batch["labels"].shape == (1, 5)
    labels = batch["labels"][0].tolist()
    assert labels[0] == labels[3] == IGNORE_INDEX  # never a target: nothing predicts a sequence's first token
    assert "attention_mask" not in batch  # transformers derives the block-diagonal mask from position_ids


@pytest.mark.parametrize("family", [f for f in FAMILIES if supports_packing(make_model(f))])
@pytest.mark.parametrize("masked_prompt", [0, 3])
@pytest.mark.parametrize("per_example_attention", [False, True])
def test_packed_loss_equals_padded_loss(family, masked_prompt, per_example_attention):
    """Both ways of keeping packed examples apart: transformers' block-diagonal mask, and `packed_sdpa`."""
    model = lora_model(family)
    examples = features([9, 14, 5, 11], masked_prompt)
    padded, padded_grads = loss_and_grads(model, lambda: causal_lm_loss_sum(model, collate(examples, 0)))
    if per_example_attention:
        assert enable_packing(model)
        assert model.config._attn_implementation == PACKED_SDPA
    packed, grads = loss_and_grads(model, lambda: causal_lm_loss_sum(model, collate_packed(examples)))
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, padded_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", [f for f in FAMILIES if not supports_packing(make_model(f))])
def test_families_left_out_of_packing_do_mix_packed_examples(family):
    """The families trained on padded batches really need it: packed, their examples would see each other."""
    model = lora_model(family)
    examples = features([9, 14, 5, 11])
    with torch.no_grad():
        padded = causal_lm_loss_sum(model, collate(examples, 0))
        packed = causal_lm_loss_sum(model, collate_packed(examples))
    assert not torch.allclose(packed, padded, rtol=1e-5, atol=1e-5)
