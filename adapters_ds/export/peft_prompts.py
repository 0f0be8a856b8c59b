"""`export --peft` for the virtual-token methods: prefix, prompt and ptuning adapters in Hugging Face PEFT's
PREFIX_TUNING, PROMPT_TUNING and P_TUNING formats; `peft.PeftModel.from_pretrained(base, out)` gives the same logits
as our adapted model (for prompt methods PEFT's logits, like ours, include the virtual positions).

PEFT keeps one tensor for all three, `prompt_embeddings`: the virtual tokens' embeddings (num_virtual_tokens,
hidden) for prompt tuning and P-tuning (the prompt encoder's output: PEFT needs no encoder at inference), and the
layers' keys and values side by side (num_virtual_tokens, layers · 2 · kv_heads · head_dim) for prefix tuning (the
`--prefix_projection` MLP's output: PEFT's `prefix_projection` stays false). Each adapter layer computes it in
fp32 (`peft_embeddings`). `task_type` must be CAUSAL_LM: without it PEFT builds a model that ignores the prompt.

Only the adapter files and the base model's config are read: the layer is rebuilt from the config's geometry (a
model skeleton on the meta device, no weights), so exporting the adapter of a 70B model needs no 70B of memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from adapters_ds.adapters.base import ADAPTER_ATTR, AdapterConfig
from adapters_ds.adapters.registry import get_method
from adapters_ds.adapters.storage import WEIGHTS_NAME, read_adapter_config, read_adapter_tensors
from adapters_ds.errors import InputError
from adapters_ds.fileio import atomic_dir, write_json
from adapters_ds.modeling import check_causal_lm, load_model_config

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_TYPES = {"prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING", "ptuning": "P_TUNING"}


def is_virtual_token_adapter(adapter_dir: str | Path) -> bool:
    """Whether the adapter in `adapter_dir` is one of the methods this module exports."""
    config, _ = read_adapter_config(adapter_dir)
    return config.method in PEFT_TYPES


def peft_prompt_config(config: AdapterConfig, base_name: str) -> dict:
    peft = {
        "peft_type": PEFT_TYPES[config.method],
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": config.num_virtual_tokens,
        "base_model_name_or_path": base_name,
        "inference_mode": True,
    }
    if config.method == "prefix":
        peft["prefix_projection"] = False  # the projection is folded into prompt_embeddings
    return peft


def prompt_embeddings(base_model: str, adapter_dir: str | Path) -> tuple[AdapterConfig, torch.Tensor]:
    """(the adapter's config, PEFT's `prompt_embeddings` in fp32) of a virtual-token adapter trained on
    `base_model`."""
    config, meta = read_adapter_config(adapter_dir)
    if config.method not in PEFT_TYPES:
        raise InputError(f"{str(adapter_dir)!r} holds a {config.method} adapter; expected one of {sorted(PEFT_TYPES)}")
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
    layer = get_method(config.method).layer(config, config.layer_dims("", skeleton), torch.float32, torch.device("cpu"))
    prefix = f"{ADAPTER_ATTR}."
    state = {name.removeprefix(prefix): tensor for name, tensor in tensors.items()}
    try:
        layer.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(
            f"adapter weights in {str(adapter_dir)!r} do not fit {base_model!r} (trained on another base?): "
            f"{str(exc).splitlines()[0]}"
        ) from None
    return config, layer.peft_embeddings()


def export_peft_prompts(base_model: str, adapter_dir: str, output_dir: str) -> None:
    config, embeddings = prompt_embeddings(base_model, adapter_dir)
    with atomic_dir(output_dir) as tmp:
        save_file({"prompt_embeddings": embeddings.contiguous()}, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        write_json(tmp / PEFT_CONFIG_NAME, peft_prompt_config(config, base_model))
