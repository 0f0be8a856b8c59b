"""Under ZeRO-3 every adapter tensor stays whole and the frozen base is partitioned, for every method on real model
shapes (built on the meta device: no memory, real sizes); what stays whole of the base is counted and bounded."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_model
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
)

from adapters_ds import GatesConfig, InputError, LoRAConfig, ParallelConfig, SeriesConfig, freeze_base, inject_adapters
from adapters_ds.adapters.inject import remove_adapters
from adapters_ds.training.persistence import check_share, plan_persistence
from adapters_ds.zero import full_shape

# Published sizes of each model (hidden, MLP width, heads / KV heads, layers, vocabulary).
SHAPES = {
    "llama-2-7b": lambda: LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                      num_key_value_heads=32, num_hidden_layers=32, vocab_size=32000),
    "llama-3-8b": lambda: LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                      num_key_value_heads=8, num_hidden_layers=32, vocab_size=128256),
    "llama-3-70b": lambda: LlamaConfig(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                                       num_key_value_heads=8, num_hidden_layers=80, vocab_size=128256),
    "mistral-7b": lambda: MistralConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                        num_key_value_heads=8, num_hidden_layers=32, vocab_size=32000),
    "qwen2-1.5b": lambda: Qwen2Config(hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
                                      num_key_value_heads=2, num_hidden_layers=28, vocab_size=151936,
                                      tie_word_embeddings=True),
    "qwen2-7b": lambda: Qwen2Config(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                                    num_key_value_heads=4, num_hidden_layers=28, vocab_size=152064),
    "qwen2-72b": lambda: Qwen2Config(hidden_size=8192, intermediate_size=29568, num_attention_heads=64,
                                     num_key_value_heads=8, num_hidden_layers=80, vocab_size=152064),
    "smollm2-135m": lambda: LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                        num_key_value_heads=3, num_hidden_layers=30, vocab_size=49152,
                                        tie_word_embeddings=True),
    "gpt-j-6b": lambda: GPTJConfig(n_embd=4096, n_head=16, n_layer=28, rotary_dim=64, vocab_size=50400),
    "bloom-7b1": lambda: BloomConfig(hidden_size=4096, n_head=32, n_layer=30, vocab_size=250880),
    "gpt-neox-20b": lambda: GPTNeoXConfig(hidden_size=6144, intermediate_size=24576, num_attention_heads=64,
                                          num_hidden_layers=44, vocab_size=50432),
    "opt-13b": lambda: OPTConfig(hidden_size=5120, ffn_dim=20480, num_attention_heads=40, num_hidden_layers=40,
                                 vocab_size=50272, word_embed_proj_dim=5120),
    "gpt2": lambda: GPT2Config(n_embd=768, n_head=12, n_layer=12, vocab_size=50257),
}  # fmt: skip
# The reference project's settings.
METHODS = {
    "lora-r32": lambda: LoRAConfig(r=32, alpha=64),
    "series-256-pfeiffer": lambda: SeriesConfig(bottleneck_size=256, preset="pfeiffer"),
    "series-256-houlsby": lambda: SeriesConfig(bottleneck_size=256, preset="houlsby"),
    "parallel-256": lambda: ParallelConfig(bottleneck_size=256),
    "gates": lambda: GatesConfig(),
}


def replicated_shares(name: str) -> dict[str, float]:
    """{method: replicated share of the base} for the model `name`, every plan checked on the way."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(SHAPES[name]())
    shares = {}
    for method, config in METHODS.items():
        inject_adapters(model, config())
        freeze_base(model)
        plan = plan_persistence(model)
        adapter_ids = {id(p) for p in plan.adapters.values()}
        assert plan.adapters and adapter_ids <= {id(p) for p in plan.keep}  # every adapter tensor stays whole
        assert all(len(full_shape(p)) < 2 for p in plan.frozen_kept.values())  # no frozen matrix stays whole
        assert plan.base_replicated_share <= 0.05, (method, plan.summary())  # ≥ 95 % of the base partitioned
        check_share(plan, 0.05)
        shares[method] = plan.base_replicated_share
        remove_adapters(model)
    return shares


@pytest.mark.parametrize("name", SHAPES)
def test_every_method_keeps_its_adapters_whole_and_partitions_the_base(name):
    shares = replicated_shares(name)
    assert set(shares) == set(METHODS)


def test_adapters_larger_than_frozen_matrices_stay_whole_without_replicating_them():
    model = make_model("llama")  # k/v projections 16 × 32 = 512 elements
    inject_adapters(model, ParallelConfig(bottleneck_size=16))  # up: 48 × 16 = 768 elements, larger
    freeze_base(model)
    plan = plan_persistence(model)
    assert max(p.numel() for p in plan.adapters.values()) == 768
    assert plan.threshold == 32  # the largest frozen vector (a norm of the hidden size)
    norms = [n for n in dict(model.named_parameters()) if "norm" in n]
    assert sorted(plan.frozen_kept) == sorted(norms)


def test_an_explicit_threshold_that_keeps_too_much_of_the_base_is_refused():
    model = make_model("llama")
    inject_adapters(model, LoRAConfig(r=4))
    freeze_base(model)
    plan = plan_persistence(model, 512)  # keeps k_proj and v_proj (512 each) of both layers whole
    assert plan.base_replicated_numel == 4 * 512 + sum(p.numel() for p in plan.frozen_kept.values() if p.dim() == 1)
    with pytest.raises(InputError, match=r"ZeRO-3 would keep [\d,]+ of the base's [\d,]+ elements \([\d.]+ %\) whole "
                                         r"on every rank, above --max_replicated_base_share 0.01"):  # fmt: skip
        check_share(plan, 0.01)
    check_share(plan, 1.0)  # a raised limit lets it run


@pytest.mark.parametrize("value", ["many", -1, 1.5, True])
def test_a_bad_threshold_is_a_clear_error(value):
    model = make_model("llama")
    inject_adapters(model, LoRAConfig(r=4))
    freeze_base(model)
    with pytest.raises(InputError, match="stage3_param_persistence_threshold must be"):
        plan_persistence(model, value)
