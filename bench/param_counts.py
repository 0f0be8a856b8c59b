"""Trainable-parameter counts of the reference adapter settings on LLaMA-7B shapes (meta device: no memory).

python bench/param_counts.py        # prints one JSON object

Every setting is counted by injecting the adapter into LLaMA-7B's shapes, so the numbers are the code's, not a
formula's. Registered methods without a setting here (plugins, newer methods) are counted at their default options.
The README's "trainable on LLaMA-7B" column quotes these numbers (tests/bench/test_param_counts.py holds it to them).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from adapters_ds import METHODS, InputError, count_parameters, freeze_base, get_method, inject_adapters
from adapters_ds.adapters.base import AdapterConfig

# name → (method, options): options by the config's field names
SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora_r32_qkv_up_down": ("lora", {"r": 32, "alpha": 64}),
    # rsLoRA only rescales and LoRA+ only changes learning rates: both count as plain LoRA
    "lora_r32_rslora": ("lora", {"r": 32, "alpha": 64, "use_rslora": True}),
    "dora_r32_qkv_up_down": ("lora", {"r": 32, "alpha": 64, "use_dora": True}),  # + one magnitude per output row
    "series_256_pfeiffer": ("series", {"bottleneck_size": 256, "preset": "pfeiffer"}),
    "series_256_houlsby": ("series", {"bottleneck_size": 256, "preset": "houlsby"}),
    "parallel_256_up_down": ("parallel", {"bottleneck_size": 256}),
    "prefix_30_tokens": ("prefix", {"num_virtual_tokens": 30}),
    "prompt_30_tokens": ("prompt", {"num_virtual_tokens": 30}),
    "ptuning_30_tokens_mlp_128": (
        "ptuning",
        {"num_virtual_tokens": 30, "encoder_type": "mlp", "encoder_hidden_size": 128},
    ),
    # the default unit gates: LoRA r 32 inside all seven linears + one gate per MLP unit and per KV group
    "gates_units_lora_r32": ("gates", {}),
    "gates_units_lora_r8": ("gates", {"lora_r": 8}),
    "gates_units_only": ("gates", {"lora_r": 0}),  # the gates alone
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


def counts() -> dict[str, dict]:
    """Every setting of SETTINGS, then every other registered method at its defaults (`<method>_defaults`)."""
    result: dict[str, dict] = {}
    for name, (method, options) in SETTINGS.items():
        result[name] = count(get_method(method).config(**options))
    counted = {method for method, _ in SETTINGS.values()}
    for name, method in sorted(METHODS.items()):
        if name not in counted:
            try:
                result[f"{name}_defaults"] = count(method.config())
            except InputError as exc:  # e.g. a method that needs an option without a default
                result[f"{name}_defaults"] = {"error": str(exc)}
    return result


def main() -> None:
    print(json.dumps({"model": "LLaMA-7B shapes", "settings": counts()}, indent=2))


if __name__ == "__main__":
    main()
