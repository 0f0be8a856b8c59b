"""Packed micro-batches: the examples of a micro-batch back to back in one row (`data.collate_packed`), so no
compute is spent on padding, with attention computed per example.

transformers keeps packed examples apart by itself: from `position_ids` that restart at 0 it builds a block-diagonal
causal mask. With sdpa that mask is dense, so attention then costs (row length)² instead of Σ (example length)², and
an explicit mask keeps the kernel from skipping the masked half. `packed_sdpa` is registered under transformers'
attention interface; everything else about the model is unchanged. Given the row's boundaries from the host
(`attention.packed_inputs`, as the trainer passes them) it runs a variable-length kernel or sdpa once per example
without reading anything back from the device (`attention.varlen_sdpa`); without them it finds the examples from
`position_ids` itself (one read-back per layer). `--attn_implementation` chooses among it, the flash-attn package's
kernel and transformers' eager attention (`enable_packing`, `attention.py`)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from adapters_ds.errors import InputError
from adapters_ds.families import find_family
from adapters_ds.training.attention import (
    PACKED_SDPA,
    AttnChoice,
    deferred_mask,
    is_packed_call,
    materialize,
    per_example_sdpa,
    resolve_attn_implementation,
    varlen_sdpa,
    without_varlen,
)


def supports_packing(model: Any) -> bool:
    """Whether `collate_packed` batches give `model` the same loss as padded batches: its family record says so
    (`families.Family.packing`, checked against a padded batch for each in tests/training/test_throughput_units.py);
    a model of no known family trains on padded batches."""
    family = find_family(getattr(model.config, "model_type", None))
    return family is not None and family.packing is None


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, run per example on a packed row (one row whose `position_ids` restart at 0),
    within the layer's sliding window where it has one.

    Anything else (several rows, a cache, a non-causal module, no position_ids) goes to plain sdpa with the mask
    transformers built, so the function is safe wherever sdpa is.
    """
    if is_packed_call(query, key, module, kwargs):  # boundaries from the host: no read-back, no mask
        return varlen_sdpa(module, query, key, value, **kwargs), None
    kwargs = without_varlen(kwargs)
    attention_mask = materialize(attention_mask)  # what transformers would have built for sdpa
    position_ids = kwargs.pop("position_ids", None)
    q_len = query.shape[2]  # (batch, heads, seq, head_dim)
    if position_ids is None or query.shape[0] != 1 or key.shape[2] != q_len or not getattr(module, "is_causal", True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    starts = (position_ids.reshape(-1) == 0).nonzero().flatten().tolist()
    sliding_window = kwargs.pop("sliding_window", None)  # Mistral's, Gemma's local layers: applied per example
    return per_example_sdpa(module, query, key, value, [*starts, q_len], sliding_window, **kwargs), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa)
AttentionMaskInterface.register(PACKED_SDPA, deferred_mask)  # built only where a call has no boundaries


def enable_packing(model: Any, attn_implementation: AttnChoice = "auto") -> bool:
    """Prepare `model` for packed micro-batches with the attention `--attn_implementation` names (see
    `attention.py`); False where packing would mix examples: the model then trains on padded batches with
    transformers' implementation of that name (unchanged for "auto").

    A model whose attention logits are soft-capped (`config.attn_logit_softcapping`, Gemma 2) packs only where the
    kernel applies the cap: sdpa omits it, so "auto" takes the flash kernel where it runs (it caps) and else
    transformers' eager attention (it caps, and finds the examples from `position_ids`); "sdpa" is an error."""
    packed = supports_packing(model)
    if packed and getattr(model.config, "attn_logit_softcapping", None) is not None:
        if attn_implementation == "auto":
            resolved = resolve_attn_implementation("auto", model.dtype, packed)
            attn_implementation = "flash_attention_2" if resolved != PACKED_SDPA else "eager"
        elif attn_implementation == "sdpa":
            raise InputError(
                f"--attn_implementation sdpa cannot train {model.config.model_type} models: their attention logits "
                "are soft-capped, which sdpa omits; use eager, flash_attention_2 or auto"
            )
    if packed or attn_implementation != "auto":
        model.set_attn_implementation(resolve_attn_implementation(attn_implementation, model.dtype, packed))
    return packed
