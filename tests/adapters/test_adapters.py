"""The adapter family on tiny models of every supported family: identity at init, training touches only
adapters, exact parameter counts, merge, and errors."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, LAYERS, make_model, sample_batch, target_shapes
from transformers import AutoModelForCausalLM, LlamaConfig

from adapters_ds import (
    InputError,
    LoRAConfig,
    ParallelConfig,
    SeriesConfig,
    adapter_layers,
    adapter_parameters,
    config_from_dict,
    count_parameters,
    freeze_base,
    inject_adapters,
    merge_adapters,
    parameter_report,
    remove_adapters,
    unmerge_adapters,
)

R, M = 4, 8
CASES = {
    "lora": lambda: LoRAConfig(r=R, alpha=8, dropout=0.0),
    "series_pfeiffer": lambda: SeriesConfig(bottleneck_size=M, preset="pfeiffer"),
    "series_houlsby": lambda: SeriesConfig(
        bottleneck_size=M, preset="houlsby", scaling="learned", non_linearity="gelu"
    ),
    "parallel": lambda: ParallelConfig(bottleneck_size=M, non_linearity="relu"),
}
GRID = [(family, case) for family in FAMILIES for case in CASES]


def adapted(family: str, case: str, dtype=torch.float32):
    model = make_model(family, dtype)
    config = CASES[case]()
    inject_adapters(model, config)
    freeze_base(model)
    return model, config


def randomize_adapters(model, seed: int = 3) -> None:
    """Give the zero-initialised output sides real values, so equivalence tests are not trivially 0 == 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def logits(model, batch=None):
    with torch.no_grad():
        return model(**(batch or sample_batch())).logits


@pytest.mark.parametrize("family,case", GRID)
def test_identity_at_init(family, case):
    base = logits(make_model(family))
    model, _ = adapted(family, case)
    assert torch.equal(logits(model), base)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("case", list(CASES))
def test_identity_at_init_bf16_and_adapters_follow_base_dtype(family, case):
    base = logits(make_model(family, torch.bfloat16))
    model, _ = adapted(family, case, torch.bfloat16)
    assert {p.dtype for p in adapter_parameters(model).values()} == {torch.bfloat16}
    assert torch.equal(logits(model), base)


def test_explicit_adapter_dtype_overrides_base():
    model = make_model("llama", torch.bfloat16)
    inject_adapters(model, LoRAConfig(r=R, dtype="float32"))
    assert {p.dtype for p in adapter_parameters(model).values()} == {torch.float32}
    assert logits(model).dtype == torch.bfloat16


@pytest.mark.parametrize("family,case", GRID)
def test_training_changes_adapters_only(family, case):
    model, _ = adapted(family, case)
    model.train()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter_before = {n: p.detach().clone() for n, p in adapter_parameters(model).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    batch = sample_batch()
    # Two steps: with the output side zero at init, the input side's gradient is exactly zero in step one.
    for _ in range(2):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        if name in base_before:
            assert torch.equal(p, base_before[name]), f"frozen {name} changed"
    for name, p in adapter_parameters(model).items():
        assert not torch.equal(p, adapter_before[name]), f"adapter {name} did not change"
    assert set(adapter_before) == {n for n, p in model.named_parameters() if p.requires_grad}


def expected_trainable(family: str, case: str) -> int:
    per_layer = 0
    for d_in, d_out in target_shapes(family, case.replace("lora", "lora")):
        if case == "lora":
            per_layer += R * (d_in + d_out)
        elif case.startswith("series"):
            per_layer += M * (d_out + d_out) + (1 if case == "series_houlsby" else 0)  # learned scale
        else:
            per_layer += M * (d_in + d_out)
    return LAYERS * per_layer


@pytest.mark.parametrize("family,case", GRID)
def test_trainable_parameter_counts(family, case):
    base_total = sum(p.numel() for p in make_model(family).parameters())
    model, _ = adapted(family, case)
    trainable, total = count_parameters(model)
    assert trainable == expected_trainable(family, case)
    assert total == base_total + trainable
    assert parameter_report(model) == (
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    )


def llama7b():
    config = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
    )
    with torch.device("meta"):  # shapes only: 7B parameters are never allocated
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    "config,expected",
    [
        (LoRAConfig(r=32), 32 * (3 * 32 * (4096 + 4096) + 2 * 32 * (4096 + 11008))),  # 56,098,816
        (SeriesConfig(bottleneck_size=256), 32 * 256 * (4096 + 4096)),  # 67,108,864
        (ParallelConfig(bottleneck_size=256), 32 * 2 * 256 * (4096 + 11008)),  # 247,463,936
    ],
)
def test_llama7b_counts_on_meta_device(config, expected):
    model = llama7b()
    inject_adapters(model, config)
    freeze_base(model)
    trainable, total = count_parameters(model)
    assert trainable == expected
    assert total - trainable == 6_738_415_616  # LLaMA-7B itself


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_merge_matches_unmerged_and_is_idempotent(family):
    model, _ = adapted(family, "lora")
    randomize_adapters(model)
    weights = {n: base.weight.detach().clone() for n, base, _ in adapter_layers(model)}
    unmerged = logits(model)
    merge_adapters(model)
    merged_weights = {n: base.weight.detach().clone() for n, base, _ in adapter_layers(model)}
    assert all(not torch.equal(merged_weights[n], weights[n]) for n in weights)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)
    merge_adapters(model)  # a second merge is a no-op
    assert all(torch.equal(base.weight, merged_weights[n]) for n, base, _ in adapter_layers(model))
    unmerge_adapters(model)
    unmerge_adapters(model)
    for n, base, _ in adapter_layers(model):
        torch.testing.assert_close(base.weight, weights[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)


def test_bf16_merge_is_computed_in_fp32():
    model, _ = adapted("llama", "lora", torch.bfloat16)
    randomize_adapters(model)
    name, base, lora = next(adapter_layers(model))
    expected = (base.weight.float() + (lora.lora_B.float() @ lora.lora_A.float()) * lora.scaling).bfloat16()
    merge_adapters(model)
    assert torch.equal(base.weight, expected)


def test_merge_then_remove_leaves_plain_model_with_adapted_outputs():
    model, _ = adapted("gpt2", "lora")
    randomize_adapters(model)
    expected = logits(model)
    merge_adapters(model)
    remove_adapters(model)
    assert not list(adapter_layers(model))
    assert not any(".adapter." in n for n in model.state_dict())
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["series_pfeiffer", "parallel"])
def test_bottleneck_adapters_refuse_merge(case):
    model, _ = adapted("llama", case)
    with pytest.raises(InputError, match="not mergeable"):
        merge_adapters(model)


def test_eval_and_train_never_change_weights():
    model, _ = adapted("llama", "lora")
    randomize_adapters(model)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    model.eval()
    model.train()
    logits(model)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


def test_target_that_matches_nothing_names_expected_and_found():
    model = make_model("llama")
    with pytest.raises(InputError, match=r"\['q_prj'\] matched no module.*'q_proj'"):
        inject_adapters(model, LoRAConfig(target_modules=("q_prj", "v_proj")))
    assert not list(adapter_layers(model))


def test_target_of_unsupported_type_is_refused():
    model = make_model("llama")
    with pytest.raises(InputError, match="is a LlamaAttention; expected nn.Linear or Conv1D"):
        inject_adapters(model, LoRAConfig(target_modules=("self_attn",)))
    assert not list(adapter_layers(model))


def test_unknown_family_needs_explicit_targets():
    model = make_model("llama")
    model.config.model_type = "t5"
    with pytest.raises(InputError, match="no default target modules for model type 't5'"):
        inject_adapters(model, LoRAConfig())
    assert inject_adapters(model, LoRAConfig(target_modules="q_proj,v_proj"))  # comma-separated string accepted


def test_second_adapter_on_same_module_is_refused():
    model, _ = adapted("llama", "lora")
    with pytest.raises(InputError, match="already has an adapter"):
        inject_adapters(model, ParallelConfig(target_modules=("up_proj",)))


def test_gpt2_mlp_targets_do_not_hit_attention_projection():
    model, _ = adapted("gpt2", "series_pfeiffer")
    assert [n for n, _, _ in adapter_layers(model)] == [f"transformer.h.{i}.mlp.c_proj" for i in range(LAYERS)]


@pytest.mark.parametrize(
    "values,message",
    [
        ({"method": "lora", "rank": 8}, r"unknown lora option\(s\) \['rank'\]"),
        ({"method": "lora", "r": 0}, "r must be a positive integer"),
        ({"method": "lora", "r": 2.5}, "r must be a positive integer"),
        ({"method": "lora", "alpha": 0}, "alpha must be a number > 0"),
        ({"method": "lora", "dropout": 1.0}, "dropout must be a number >= 0 and < 1"),
        ({"method": "lora", "dtype": "int8"}, "dtype must be one of"),
        ({"method": "lora", "target_modules": []}, "target_modules must be a non-empty list"),
        ({"method": "series", "preset": "adapterh"}, "preset must be 'pfeiffer' or 'houlsby'"),
        ({"method": "series", "non_linearity": "swishy"}, "non_linearity must be one of"),
        ({"method": "series", "scaling": "big"}, "scaling must be a number or 'learned'"),
        ({"method": "parallel", "bottleneck_size": -1}, "bottleneck_size must be a positive integer"),
        ({"method": "ia3"}, "unknown adapter method 'ia3'"),
        ({"r": 8}, "must be an object with a 'method' key"),
    ],
)
def test_config_validation(values, message):
    with pytest.raises(InputError, match=message):
        config_from_dict(values)


@pytest.mark.parametrize("case", list(CASES))
def test_config_dict_round_trip(case):
    config = CASES[case]()
    assert config_from_dict(config.to_dict()) == config
