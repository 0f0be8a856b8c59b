"""Trainable-parameter counts of the reference adapter settings on LLaMA-7B shapes (meta device: no memory).

python bench/param_counts.py        # prints one JSON object

Every setting is counted by injecting the adapter into LLaMA-7B's shapes, so the numbers are the code's, not a
formula's. Registered methods without a setting here (plugins, newer methods) are counted at their default options.
"""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from adapters_ds import (
    METHODS,
    GatesConfig,
    InputError,
    LoRAConfig,
    ParallelConfig,
    SeriesConfig,
    count_parameters,
    freeze_base,
    inject_adapters,
)
from adapters_ds.adapters.base import AdapterConfig

SETTINGS: dict[str, AdapterConfig] = {
    "lora_r32_qkv_up_down": LoRAConfig(r=32, alpha=64),
    # rsLoRA only rescales and LoRA+ only changes learning rates: both count as plain LoRA
    "lora_r32_rslora": LoRAConfig(r=32, alpha=64, use_rslora=True),
    "dora_r32_qkv_up_down": LoRAConfig(r=32, alpha=64, use_dora=True),  # + one magnitude per output row
    "series_256_pfeiffer": SeriesConfig(bottleneck_size=256, preset="pfeiffer"),
    "series_256_houlsby": SeriesConfig(bottleneck_size=256, preset="houlsby"),
    "parallel_256_up_down": ParallelConfig(bottleneck_size=256),
    # the default unit gates: LoRA r 32 inside all seven linears + one gate per MLP unit and per KV group
    "gates_units_lora_r32": GatesConfig(),
    "gates_units_lora_r8": GatesConfig(lora_r=8),
}

LLAMA_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
)


def count(adapter: AdapterConfig) -> dict[str, float]:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_7B))
    inject_adapters(model, adapter)
    freeze_base(model)
    trainable, total = count_parameters(model)
    return {"trainable": trainable, "base": total - trainable, "trainable_pct": 100 * trainable / total}


def main() -> None:
    result: dict[str, dict] = {name: count(adapter) for name, adapter in SETTINGS.items()}
    counted = {type(adapter).method for adapter in SETTINGS.values()}
    for name, method in sorted(METHODS.items()):
        if name not in counted:
            try:
                result[f"{name}_defaults"] = count(method.config())
            except InputError as exc:  # e.g. a method that needs an option without a default
                result[f"{name}_defaults"] = {"error": str(exc)}
    print(json.dumps({"model": "LLaMA-7B shapes", "settings": result}, indent=2))


if __name__ == "__main__":
    main()
