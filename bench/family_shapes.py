"""LoRA (r 32, each family's default targets) on the published shapes of today's models, and what ZeRO-3 keeps
whole: built on the meta device (no memory, no download), so the numbers are the code's.

python bench/family_shapes.py        # prints one JSON object: {model: {...}}

Per model: the family, the base parameter count, the trainable LoRA parameters (`LoRAConfig(r=32)`, default
targets: q, k, v, up, down mapped to the family's layout, the experts' fused matrices for a mixture of experts), the
adapter tensors (all kept whole on every rank) and the share of the base ZeRO-3 keeps whole on every rank under the
automatic persistence threshold (norm vectors; every matrix partitioned). Shapes are those of each model's
published config.json.
"""

from __future__ import annotations

import json

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from adapters_ds import LoRAConfig, count_parameters, freeze_base, inject_adapters
from adapters_ds.training.persistence import plan_persistence

_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
_QWEN3 = dict(vocab_size=151936, head_dim=128, tie_word_embeddings=False)
_QWEN3_MOE = dict(**_QWEN3, num_experts=128, num_experts_per_tok=8)
SHAPES: dict[str, tuple[str, dict]] = {
    "Llama-3.1-8B": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   max_position_embeddings=131072, rope_parameters=_LLAMA3_ROPE)),
    "Llama-3.1-70B": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                    num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                    max_position_embeddings=131072, rope_parameters=_LLAMA3_ROPE)),
    "Qwen3-8B": ("qwen3", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, **_QWEN3)),
    "Qwen3-32B": ("qwen3", dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                                num_attention_heads=64, num_key_value_heads=8, **_QWEN3)),
    "Qwen3-30B-A3B": ("qwen3_moe", dict(hidden_size=2048, moe_intermediate_size=768, num_hidden_layers=48,
                                        num_attention_heads=32, num_key_value_heads=4, **_QWEN3_MOE)),
    "Qwen3-235B-A22B": ("qwen3_moe", dict(hidden_size=4096, moe_intermediate_size=1536, num_hidden_layers=94,
                                          num_attention_heads=64, num_key_value_heads=4, **_QWEN3_MOE)),
    "Mixtral-8x7B": ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                                     num_experts_per_tok=2, vocab_size=32000)),
    "Mixtral-8x22B": ("mixtral", dict(hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
                                      num_attention_heads=48, num_key_value_heads=8, num_local_experts=8,
                                      num_experts_per_tok=2, vocab_size=32768)),
    "Gemma-3-27B": ("gemma3_text", dict(hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
                                        num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                                        vocab_size=262208)),
    "Phi-4": ("phi3", dict(hidden_size=5120, intermediate_size=17920, num_hidden_layers=40, num_attention_heads=40,
                           num_key_value_heads=10, vocab_size=100352, pad_token_id=100349)),
    "OLMo-2-13B": ("olmo2", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                 num_attention_heads=40, num_key_value_heads=40, vocab_size=100352)),
}  # fmt: skip


def measure(name: str, r: int = 32) -> dict:
    model_type, shape = SHAPES[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **shape))
    config = LoRAConfig(r=r, alpha=2 * r)
    inject_adapters(model, config)
    freeze_base(model)
    trainable, total = count_parameters(model)
    plan = plan_persistence(model)
    return {
        "family": model_type,
        "base": total - trainable,
        "lora_targets": list(config.default_targets(model_type)),
        "lora_trainable": trainable,
        "lora_trainable_pct": 100 * trainable / total,
        "adapter_tensors_whole": len(plan.adapters),
        "base_replicated_share_pct": 100 * plan.base_replicated_share,
    }


def main() -> None:
    print(json.dumps({name: measure(name) for name in SHAPES}, indent=1))


if __name__ == "__main__":
    main()
