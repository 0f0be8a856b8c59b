"""The chunked loss (`token_losses` of a `forward_targets(..., logits=False)`) against the full-logits one: equal
per-token losses and gradients in fp32, over chunk boundaries and ignored labels."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, make_model

from adapters_ds.adapters.inject import freeze_base, inject_adapters
from adapters_ds.adapters.lora import LoRAConfig
from adapters_ds.training.data import IGNORE_INDEX
from adapters_ds.training.loss import chunkable_head, forward_targets, token_losses


def batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 14), generator=gen)
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX  # a masked prompt
    labels[2, 9:] = IGNORE_INDEX  # padding
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("chunk_tokens", [1, 4, 10_000])
def test_chunked_loss_equals_the_full_logits_loss_and_its_gradients(chunk_tokens):
    model = make_model("llama")
    inject_adapters(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    freeze_base(model)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B = 0 would give A no gradient
            torch.nn.init.normal_(param, std=0.1)
    results = []
    for logits in (True, False):
        model.zero_grad()
        forward = forward_targets(model, batch(), logits=logits)
        assert (forward.logits is None) == (not logits)
        per_token = token_losses(forward, chunk_elements=chunk_tokens * VOCAB)
        scale = torch.linspace(0.5, 2.0, len(per_token))  # unequal weights: every token's gradient counts
        (per_token * scale).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((per_token.detach(), grads))
    (full, full_grads), (chunked, chunked_grads) = results
    assert len(full) == 9 + 13 + 8 and chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    assert full_grads.keys() == chunked_grads.keys()
    for name, grad in full_grads.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_a_head_with_an_adapter_or_a_logit_transform_keeps_the_full_loss():
    model = make_model("llama").requires_grad_(False)
    assert chunkable_head(model) is model.lm_head
    model.lm_head.weight.requires_grad_(True)  # a trained head: its gradient is not computed by the chunks
    assert chunkable_head(model) is None
    model.requires_grad_(False)
    model.config.final_logit_softcapping = 30.0  # Gemma's: applied after the head
    assert chunkable_head(model) is None
    model = make_model("llama").requires_grad_(False)
    inject_adapters(model, LoRAConfig(r=2, target_modules=["lm_head"]))
    assert chunkable_head(model) is None
    forward = forward_targets(model, batch(), logits=False)
    assert forward.logits is not None and forward.logits.shape == (len(forward.targets), VOCAB)
