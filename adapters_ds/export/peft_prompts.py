"""A model-level adapter (prefix, prompt, P-tuning) rebuilt for export from the adapter files and the base model's
config alone: the layer is built from the config's geometry (a model skeleton on the meta device, no weights), so
exporting the adapter of a 70B model needs no 70B of memory. `export.peft` writes it in PEFT's format.

PEFT keeps one tensor for the virtual-token methods, `prompt_embeddings`: the virtual tokens' embeddings
(num_virtual_tokens, hidden) for prompt tuning and P-tuning (the prompt encoder's output: PEFT needs no encoder at
inference), and the layers' keys and values side by side (num_virtual_tokens, layers · 2 · kv_heads · head_dim) for
prefix tuning (the `--prefix_projection` MLP's output: PEFT's `prefix_projection` stays false). Each adapter layer
computes it in fp32 (`peft_embeddings`); for prompt methods PEFT's logits, like ours, include the virtual positions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from adapters_ds.adapters.base import ADAPTER_ATTR, Adapter, AdapterConfig
from adapters_ds.adapters.registry import get_method
from adapters_ds.adapters.storage import read_adapter_config, read_adapter_tensors
from adapters_ds.errors import InputError
from adapters_ds.modeling import check_causal_lm, load_model_config


def model_level_layer(base_model: str, adapter_dir: str | Path) -> tuple[AdapterConfig, Adapter]:
    """(the adapter's config, its layer in fp32 on the CPU with the saved weights) of a model-level adapter trained
    on `base_model`."""
    config, meta = read_adapter_config(adapter_dir)
    if not config.model_level:
        raise InputError(f"{str(adapter_dir)!r} holds a {config.method} adapter, which adapts chosen modules")
    tensors = read_adapter_tensors(adapter_dir)
    model_config = load_model_config(base_model)
    check_causal_lm(base_model, config=model_config)
    trained_on = (meta["base_model"] or {}).get("model_type")
    if trained_on != model_config.model_type:
        raise InputError(
            f"adapter {str(adapter_dir)!r} was trained on a {trained_on!r} model; {base_model!r} is "
            f"{model_config.model_type!r}"
        )
    with torch.device("meta"):  # the geometry only: no weights are allocated or read
        skeleton = AutoModelForCausalLM.from_config(model_config)
    layer = get_method(config.method).make(config, config.layer_dims("", skeleton), torch.float32, torch.device("cpu"))
    prefix = f"{ADAPTER_ATTR}."
    state = {name.removeprefix(prefix): tensor for name, tensor in tensors.items()}
    try:
        layer.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(
            f"adapter weights in {str(adapter_dir)!r} do not fit {base_model!r} (trained on another base?): "
            f"{str(exc).splitlines()[0]}"
        ) from None
    return config, layer


def prompt_embeddings(base_model: str, adapter_dir: str | Path) -> tuple[AdapterConfig, torch.Tensor]:
    """(the adapter's config, PEFT's `prompt_embeddings` in fp32) of a virtual-token adapter trained on
    `base_model`."""
    config, layer = model_level_layer(base_model, adapter_dir)
    return config, layer.peft_embeddings()
