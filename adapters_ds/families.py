"""Default target modules per model family (`config.model_type`) and adapter placement.

Names follow LLM-Adapters' math settings: LoRA on the attention q/k/v and the MLP up/down projections,
Series after the MLP output (+ the attention output for Houlsby), Parallel on the MLP's two projections.
Stochastic gates go on every attention and MLP linear of each block (never the embeddings or the LM head).
A name matches every module whose dotted path ends with it (`mlp.c_proj` tells GPT-2's MLP projection
apart from `attn.c_proj`). `--target_modules` overrides the table.
"""

from __future__ import annotations

from adapters_ds.errors import InputError

_LLAMA = {
    "lora": ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"),
    "series_pfeiffer": ("down_proj",),
    "series_houlsby": ("o_proj", "down_proj"),
    "parallel": ("up_proj", "down_proj"),
    "gates": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
_NEOX = {  # GPT-NeoX and BLOOM share the Megatron names
    "lora": ("query_key_value", "dense_h_to_4h", "dense_4h_to_h"),
    "series_pfeiffer": ("dense_4h_to_h",),
    "series_houlsby": ("attention.dense", "dense_4h_to_h"),
    "parallel": ("dense_h_to_4h", "dense_4h_to_h"),
    "gates": ("query_key_value", "attention.dense", "dense_h_to_4h", "dense_4h_to_h"),
}

DEFAULT_TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt_neox": _NEOX,
    "bloom": {
        **_NEOX,
        "series_houlsby": ("self_attention.dense", "dense_4h_to_h"),
        "gates": ("query_key_value", "self_attention.dense", "dense_h_to_4h", "dense_4h_to_h"),
    },
    "gptj": {
        "lora": ("q_proj", "k_proj", "v_proj", "fc_in", "fc_out"),
        "series_pfeiffer": ("fc_out",),
        "series_houlsby": ("attn.out_proj", "fc_out"),
        "parallel": ("fc_in", "fc_out"),
        "gates": ("q_proj", "k_proj", "v_proj", "attn.out_proj", "fc_in", "fc_out"),
    },
    "opt": {
        "lora": ("q_proj", "k_proj", "v_proj", "fc1", "fc2"),
        "series_pfeiffer": ("fc2",),
        "series_houlsby": ("self_attn.out_proj", "fc2"),
        "parallel": ("fc1", "fc2"),
        "gates": ("q_proj", "k_proj", "v_proj", "self_attn.out_proj", "fc1", "fc2"),
    },
    "gpt2": {  # Conv1D layers
        "lora": ("c_attn", "mlp.c_fc", "mlp.c_proj"),
        "series_pfeiffer": ("mlp.c_proj",),
        "series_houlsby": ("attn.c_proj", "mlp.c_proj"),
        "parallel": ("mlp.c_fc", "mlp.c_proj"),
        "gates": ("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    },
}


def default_targets(model_type: str, key: str) -> tuple[str, ...]:
    family = DEFAULT_TARGETS.get(model_type)
    if family is None:
        raise InputError(
            f"no default target modules for model type {model_type!r} (known: {sorted(DEFAULT_TARGETS)}); "
            "give --target_modules explicitly"
        )
    return family[key]
