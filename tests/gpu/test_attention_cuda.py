"""Packed rows on CUDA: every attention implementation gives the padded batch's loss and gradients in bf16, the
variable-length kernels really run, and the packed forward and backward never synchronise with the host."""

from __future__ import annotations

import pytest
import torch
from sync_count import cuda_syncs
from training.test_throughput_units import features

from adapters_ds import LoRAConfig, freeze_base, inject_adapters
from adapters_ds.adapters.base import adapter_parameters
from adapters_ds.training import attention
from adapters_ds.training.data import collate, collate_packed
from adapters_ds.training.loss import loss_sum
from adapters_ds.training.packing import enable_packing

pytestmark = pytest.mark.gpu

LENGTHS = [37, 90, 13, 64, 51]


def model_on(device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A small LLaMA (head_dim 32, grouped-query attention) with randomised LoRA adapters; weights drawn wide, so
    that a token attending to another example's tokens changes its loss far beyond bf16's rounding."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.3)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    inject_adapters(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    freeze_base(model)
    for p in adapter_parameters(model).values():
        torch.nn.init.normal_(p, std=0.05)
    return model.to(device=device, dtype=dtype)


def token_losses_and_grads(model, batch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target token's loss (n_targets,), in example order for padded and packed batches alike, and the adapters'
    gradient of their sum (flattened)."""
    model.zero_grad()
    batch = attention.to_device(batch, device)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()  # (batch, seq - 1, vocab)
    labels = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    per_token = per_token[labels != -100]  # (n_targets,)
    per_token.sum().backward()
    return per_token.detach(), torch.cat([p.grad.float().flatten() for p in adapter_parameters(model).values()])


def implementations(device: torch.device) -> list[str]:
    found = ["sdpa", "eager"]
    if device.type == "cuda" and attention.flash_package():
        found.append("flash_attention_2")
    return found


@pytest.mark.parametrize("implementation", ["sdpa", "eager", "flash_attention_2"])
def test_packed_loss_equals_padded_loss(device, implementation, monkeypatch):
    if implementation not in implementations(device):
        pytest.skip(f"{implementation} does not run here (flash-attn package: {attention.flash_package()})")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    examples = features(LENGTHS, masked_prompt=5)
    reference, _ = token_losses_and_grads(model_on(device, torch.float32), collate(examples, 0), device)
    model = model_on(device, dtype)
    padded, padded_grads = token_losses_and_grads(model, collate(examples, 0), device)
    assert enable_packing(model, implementation)
    calls = []
    original = attention.torch_varlen_attention
    monkeypatch.setattr(attention, "torch_varlen_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    batch = collate_packed(examples)
    batch.update(attention.packed_inputs(model.config._attn_implementation, LENGTHS))
    packed, grads = token_losses_and_grads(model, batch, device)
    if model.config._attn_implementation == attention.PACKED_SDPA and device.type == "cuda":
        assert len(calls) == model.config.num_hidden_layers  # torch's varlen kernel, once per layer, no loop
    # packing adds no more error than the precision itself has (bf16 against fp32, same padded batch)
    precision = (padded - reference).abs().max().item()
    assert (packed - padded).abs().max().item() <= 2 * precision + 1e-4, (precision, (packed - padded).abs().max())
    assert (packed - reference).abs().max().item() <= 3 * precision + 1e-4
    cosine = torch.nn.functional.cosine_similarity(grads, padded_grads, dim=0)
    assert cosine > (0.999 if dtype == torch.bfloat16 else 1 - 1e-6), cosine


@pytest.mark.parametrize("implementation", ["sdpa", "flash_attention_2"])
def test_packed_forward_and_backward_never_wait_for_the_device(device, cuda_only, implementation):
    if implementation not in implementations(device):
        pytest.skip(f"{implementation} does not run here")
    model = model_on(device, torch.bfloat16)
    enable_packing(model, implementation)
    examples = features(LENGTHS)
    batch = collate_packed(examples)
    batch.update(attention.packed_inputs(model.config._attn_implementation, LENGTHS))
    batch = attention.to_device(batch, device)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    loss_sum(
        model(**inputs, use_cache=False).logits, batch["labels"]
    ).backward()  # warm-up (allocations, kernel choice)
    torch.cuda.synchronize()
    with cuda_syncs() as counts:
        loss_sum(
            model(**inputs, use_cache=False).logits, batch["labels"]
        ).backward()  # full logits: no target selection
    torch.cuda.synchronize()
    assert counts.by_source == {}, counts.by_source
