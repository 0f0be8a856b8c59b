"""Trainable-parameter counts of the reference adapter settings on LLaMA-7B shapes (meta device: no memory).

python bench/param_counts.py        # prints one JSON object
"""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from adapters_ds import LoRAConfig, ParallelConfig, SeriesConfig, count_parameters, freeze_base, inject_adapters

SETTINGS = {
    "lora_r32_qkv_up_down": LoRAConfig(r=32, alpha=64),
    "series_256_pfeiffer": SeriesConfig(bottleneck_size=256, preset="pfeiffer"),
    "parallel_256_up_down": ParallelConfig(bottleneck_size=256),
}


def main() -> None:
    config = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
    )
    result = {}
    for name, adapter in SETTINGS.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        inject_adapters(model, adapter)
        freeze_base(model)
        trainable, total = count_parameters(model)
        result[name] = {"trainable": trainable, "base": total - trainable, "trainable_pct": 100 * trainable / total}
    print(json.dumps({"model": "LLaMA-7B shapes", "settings": result}, indent=2))


if __name__ == "__main__":
    main()
