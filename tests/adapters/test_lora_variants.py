"""LoRA's variants (DoRA, rsLoRA, LoRA+) on tiny models of every family: exact parameter counts, identity at init,
the DoRA layer against a from-scratch reference (outputs and gradients), merge, LoRA+'s optimizer groups, and one
2-rank ZeRO-3 run through the real launcher."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from launch import losses, run, write_train_assets
from tiny_models import FAMILIES, LAYERS, make_model, sample_batch, target_shapes

from adapters.test_adapters import llama7b
from adapters_ds import (
    InputError,
    LoRAConfig,
    adapter_layers,
    adapter_parameters,
    config_from_dict,
    count_parameters,
    freeze_base,
    inject_adapters,
    load_adapter,
    merge_adapters,
    unmerge_adapters,
)
from adapters_ds.adapters.dropout import SharedDropout
from adapters_ds.training.args import adapter_config, parse_train_args

R, ALPHA = 4, 6  # s = 1.5, or 3 with rsLoRA: not powers of two, so rounding differences would show
VARIANTS = {
    "dora": lambda: LoRAConfig(r=R, alpha=ALPHA, dropout=0.0, use_dora=True),
    "rslora": lambda: LoRAConfig(r=R, alpha=ALPHA, dropout=0.0, use_rslora=True),
    "dora_rslora": lambda: LoRAConfig(r=R, alpha=ALPHA, dropout=0.0, use_dora=True, use_rslora=True),
}
GRID = [(family, variant) for family in FAMILIES for variant in VARIANTS]


def base_model(family: str, dtype=torch.float32):
    """A tiny model whose biases are not zero (as initialised): DoRA must leave the bias out of its rescaling."""
    model = make_model(family, dtype)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def variant_model(family: str, variant: str, dtype=torch.float32):
    model = base_model(family, dtype)
    config = VARIANTS[variant]()
    inject_adapters(model, config)
    freeze_base(model)
    return model, config


def randomize_variant(model, seed: int = 3) -> None:
    """Non-zero A and B; DoRA magnitudes moved off the initial norms by up to +30 % (kept positive, as trained)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter_parameters(model).items():
            if name.endswith("lora_magnitude"):
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=gen).to(p.dtype))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def logits(model, batch=None):
    with torch.no_grad():
        return model(**(batch or sample_batch())).logits


def weight_out_in(base) -> torch.Tensor:
    return base.weight.T if type(base).__name__ == "Conv1D" else base.weight


def dora_reference(x, weight, bias, lora_A, lora_B, magnitude, scaling):
    """DoRA from its definition (Liu et al. 2024, eq. 5): m ⊙ (W + sBA) / ‖W + sBA‖ applied to x, plus the bias;
    the norm detached (section 4.3). `weight` is (out, in)."""
    adapted = weight + scaling * (lora_B @ lora_A)  # (out, in)
    norm = torch.linalg.norm(adapted, dim=1).detach()  # (out,)
    y = F.linear(x, (magnitude / norm)[:, None] * adapted)
    return y if bias is None else y + bias


# ---- counts ---------------------------------------------------------------------------------------------------


def expected_trainable(family: str, variant: str) -> int:
    dora = variant.startswith("dora")
    return LAYERS * sum(R * (d_in + d_out) + (d_out if dora else 0) for d_in, d_out in target_shapes(family, "lora"))


@pytest.mark.parametrize("family,variant", GRID)
def test_trainable_parameter_counts(family, variant):
    base_total = sum(p.numel() for p in base_model(family).parameters())
    model, _ = variant_model(family, variant)
    trainable, total = count_parameters(model)
    assert trainable == expected_trainable(family, variant)
    assert total == base_total + trainable
    names = {n.rsplit(".", 1)[-1] for n in adapter_parameters(model)}
    assert names == ({"lora_A", "lora_B", "lora_magnitude"} if variant.startswith("dora") else {"lora_A", "lora_B"})


def test_llama7b_dora_count_on_meta_device():
    model = llama7b()  # meta device: DoRA's magnitude initialisation runs on meta tensors too
    inject_adapters(model, LoRAConfig(r=32, use_dora=True))
    freeze_base(model)
    lora = 32 * (3 * 32 * (4096 + 4096) + 2 * 32 * (4096 + 11008))  # 56,098,816
    magnitudes = 32 * (3 * 4096 + 11008 + 4096)  # one per output row of q, k, v, up, down: 876,544
    assert count_parameters(model)[0] == lora + magnitudes == 56_975_360


# ---- identity and the DoRA layer --------------------------------------------------------------------------------


@pytest.mark.parametrize("family,variant", GRID)
def test_identity_at_init_in_eval_and_training_mode(family, variant):
    base = logits(base_model(family))
    model, _ = variant_model(family, variant)
    assert torch.equal(logits(model), base)
    for _, _, adapter in adapter_layers(model):  # the adapters in training mode with active dropout (the base
        adapter.dropout = SharedDropout(0.3)  # stays in eval mode: some families' own dropout is on)
        adapter.train()
    assert torch.equal(logits(model), base)  # B = 0 still makes the update 0, and m / norm is exactly 1


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom"])
def test_dora_identity_at_init_bf16(family):
    base = logits(base_model(family, torch.bfloat16))
    model, _ = variant_model(family, "dora", torch.bfloat16)
    assert {p.dtype for p in adapter_parameters(model).values()} == {torch.bfloat16}
    assert torch.equal(logits(model), base)  # m is the norm rounded as the forward rounds it: m / norm == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_dora_magnitude_starts_at_base_weight_row_norms(family):
    model, _ = variant_model(family, "dora")
    for name, base, adapter in adapter_layers(model):
        expected = torch.linalg.norm(weight_out_in(base), dim=1)
        torch.testing.assert_close(adapter.lora_magnitude, expected, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])  # nn.Linear, GPT-2's transposed Conv1D, OPT's bias
@pytest.mark.parametrize("variant", ["dora", "dora_rslora"])
def test_dora_layer_matches_definition_outputs_and_gradients(family, variant):
    model, config = variant_model(family, variant)
    randomize_variant(model)
    gen = torch.Generator().manual_seed(5)
    for name, base, adapter in adapter_layers(model):
        weight = weight_out_in(base).detach()
        x = torch.randn(2, 3, weight.shape[1], generator=gen)
        params = [adapter.lora_A, adapter.lora_B, adapter.lora_magnitude]
        y = base(x)
        ours = torch.autograd.grad(y.square().sum(), params)
        copies = [p.detach().clone().requires_grad_(True) for p in params]
        bias = None if base.bias is None else base.bias.detach()
        y_ref = dora_reference(x, weight, bias, *copies, config.scaling)
        reference = torch.autograd.grad(y_ref.square().sum(), copies)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5, msg=name)
        for got, want, what in zip(ours, reference, ("A", "B", "magnitude"), strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"{name} grad {what}")


def test_rslora_scales_by_alpha_over_sqrt_r():
    """rsLoRA with (r, alpha) is plain LoRA with alpha' = alpha · √r (same tensors, same scale alpha / √r)."""
    rs, _ = variant_model("llama", "rslora")
    randomize_variant(rs)
    plain = base_model("llama")
    inject_adapters(plain, LoRAConfig(r=R, alpha=ALPHA * math.sqrt(R), dropout=0.0))
    with torch.no_grad():
        for name, p in adapter_parameters(plain).items():
            p.copy_(adapter_parameters(rs)[name])
    assert {a.scaling for _, _, a in adapter_layers(rs)} == {ALPHA / math.sqrt(R)} == {ALPHA / 2}
    assert torch.equal(logits(rs), logits(plain))
    assert not torch.equal(logits(rs), logits(base_model("llama")))


# ---- merge ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,variant", GRID)
def test_merge_matches_unmerged_and_unmerge_restores(family, variant):
    model, _ = variant_model(family, variant)
    randomize_variant(model)
    weights = {n: base.weight.detach().clone() for n, base, _ in adapter_layers(model)}
    unmerged = logits(model)
    merge_adapters(model)
    merged_weights = {n: base.weight.detach().clone() for n, base, _ in adapter_layers(model)}
    assert all(not torch.equal(merged_weights[n], weights[n]) for n in weights)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)
    merge_adapters(model)  # idempotent
    assert all(torch.equal(base.weight, merged_weights[n]) for n, base, _ in adapter_layers(model))
    unmerge_adapters(model)
    unmerge_adapters(model)
    for n, base, _ in adapter_layers(model):
        torch.testing.assert_close(base.weight, weights[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dora_merge_is_the_definition_computed_in_fp32(family):
    model, config = variant_model(family, "dora", torch.bfloat16)
    randomize_variant(model)
    name, base, dora = next(adapter_layers(model))
    adapted = weight_out_in(base).float() + config.scaling * (dora.lora_B.float() @ dora.lora_A.float())
    norm = torch.linalg.norm(adapted, dim=1).bfloat16().float()  # rounded to the magnitude's dtype, as in forward
    expected = ((dora.lora_magnitude.float() / norm)[:, None] * adapted).bfloat16()
    merge_adapters(model)
    assert torch.equal(weight_out_in(base), expected)


# ---- training ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,variant", GRID)
def test_training_changes_adapters_only(family, variant):
    model, config = variant_model(family, variant)
    for _, _, adapter in adapter_layers(model):
        adapter.dropout = SharedDropout(0.1)
    model.train()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter_before = {n: p.detach().clone() for n, p in adapter_parameters(model).items()}
    optimizer = torch.optim.AdamW(config.param_groups(model, 1e-2), lr=1e-2, weight_decay=0.0)
    batch = sample_batch()
    for _ in range(2):  # B = 0 at init: A's gradient is exactly zero in step one
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        if name in base_before:
            assert torch.equal(p, base_before[name]), f"frozen {name} changed"
    for name, p in adapter_parameters(model).items():
        assert not torch.equal(p, adapter_before[name]), f"adapter {name} did not change"
    assert set(adapter_before) == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("variant", ["plain", "dora"])
def test_lora_plus_groups_and_one_step(variant):
    ratio, lr = 16.0, 1e-3
    model = make_model("llama")
    config = LoRAConfig(r=R, alpha=ALPHA, dropout=0.0, use_dora=variant == "dora", lora_plus_ratio=ratio)
    inject_adapters(model, config)
    freeze_base(model)
    randomize_variant(model)  # B != 0, so A has a gradient in the first step
    groups = config.param_groups(model, lr)
    params = adapter_parameters(model)
    names = {id(p): n.rsplit(".", 1)[-1] for n, p in params.items()}
    assert [g["lr"] for g in groups] == [lr, ratio * lr]
    assert {names[id(p)] for p in groups[0]["params"]} == {"lora_A"}
    fast = {"lora_B", "lora_magnitude"} if variant == "dora" else {"lora_B"}
    assert {names[id(p)] for p in groups[1]["params"]} == fast
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted({id(p) for p in model.parameters() if p.requires_grad})  # each exactly once

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(groups, lr=lr)
    batch = sample_batch()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()
    steps: dict[str, float] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
            continue
        kind = name.rsplit(".", 1)[-1]
        steps[kind] = max(steps.get(kind, 0.0), (p - before[name]).abs().max().item())
    # Adam's first step moves each parameter by its group's lr (times g / (|g| + eps) ≈ ±1)
    assert steps["lora_A"] == pytest.approx(lr, rel=1e-3)
    for kind in fast:
        assert steps[kind] == pytest.approx(ratio * lr, rel=1e-3)


def test_lora_plus_ratio_one_is_plain_lora():
    model = make_model("llama")
    config = LoRAConfig(r=R, lora_plus_ratio=1.0)
    inject_adapters(model, config)
    freeze_base(model)
    (group,) = config.param_groups(model, 1e-3)
    assert "lr" not in group and len(group["params"]) == len(adapter_parameters(model))


# ---- configuration and command line -----------------------------------------------------------------------------


def test_command_line_options():
    args = parse_train_args(["--ds_config", "x.json", "--use_dora", "--use_rslora", "--lora_plus_ratio", "16"])
    config = adapter_config(args)
    assert (config.use_dora, config.use_rslora, config.lora_plus_ratio) == (True, True, 16.0)
    default = adapter_config(parse_train_args(["--ds_config", "x.json"]))
    assert (default.use_dora, default.use_rslora, default.lora_plus_ratio) == (False, False, 1.0)
    off = adapter_config(parse_train_args(["--ds_config", "x.json", "--use_dora", "--no_use_dora"]))
    assert off.use_dora is False


@pytest.mark.parametrize(
    "values,message",
    [
        ({"use_dora": "yes"}, "use_dora must be true or false"),
        ({"use_rslora": 1}, "use_rslora must be true or false"),
        ({"lora_plus_ratio": 0}, "lora_plus_ratio must be a number > 0"),
        ({"lora_plus_ratio": -16}, "lora_plus_ratio must be a number > 0"),
        ({"lora_plus_ratio": True}, "lora_plus_ratio must be a number > 0"),
    ],
)
def test_config_validation(values, message):
    with pytest.raises(InputError, match=message):
        config_from_dict({"method": "lora", **values})


def test_config_round_trip_and_old_configs_load():
    config = LoRAConfig(r=8, use_dora=True, use_rslora=True, lora_plus_ratio=16.0)
    assert config_from_dict(config.to_dict()) == config
    old = config_from_dict({"method": "lora", "r": 8, "alpha": 16.0, "dropout": 0.05})  # saved before the variants
    assert (old.use_dora, old.use_rslora, old.lora_plus_ratio) == (False, False, 1.0)


# ---- a real 2-rank ZeRO-3 run -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_zero3_two_ranks_dora_trains_replicated_and_equals_one_process(tmp_path):
    """DoRA reads the partitioned base weight at injection (magnitude) and in every forward (norm): 2 ranks under
    ZeRO-3 give the losses of one process without ZeRO (fp32, same global batch and data order), with rsLoRA and
    LoRA+ on, and the adapter stays whole on every rank."""
    assets = write_train_assets(tmp_path)

    def train(out, config, micro_batch, **launch):
        run([
            "--base_model", str(assets / "base"), "--data_path", str(assets / "data.json"), "--output_dir", str(out),
            "--ds_config", str(assets / config), "--cutoff_len", "48", "--micro_batch_size", str(micro_batch),
            "--batch_size", "8", "--logging_steps", "1", "--lr_scheduler", "constant", "--learning_rate", "1e-2",
            "--max_steps", "8", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0", "--seed", "7",
            "--adapter", "lora", "--use_dora", "--use_rslora", "--lora_plus_ratio", "4",
        ], **launch)  # fmt: skip
        return losses(out)

    one = train(tmp_path / "one", "nozero_fp32.json", 8, launcher="python", nproc=1)
    out = tmp_path / "two"
    two = train(out, "zero3_fp32.json", 4)
    assert two == pytest.approx(one, abs=1e-4)
    assert len(two) == 8 and sum(two[-2:]) < sum(two[:2])  # per-step losses are of different batches: pairs
    reports = json.loads((out / "zero3_partition.json").read_text())
    assert len(reports) == 2
    for rank in reports:
        assert rank["adapter_local_numel"] == rank["adapter_numel"] == expected_trainable("llama", "dora")
        assert rank["base_local_numel"] <= 0.55 * rank["base_numel"]
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (saved["use_dora"], saved["use_rslora"], saved["lora_plus_ratio"]) == (True, True, 4.0)
    fresh = make_model("llama")
    load_adapter(fresh, out / "adapter")
    for name, base, adapter in adapter_layers(fresh):  # the magnitudes trained away from the base row norms
        assert not torch.allclose(adapter.lora_magnitude, torch.linalg.norm(weight_out_in(base), dim=1)), name
