"""The paper's stochastic gates (FineGates, `--adapter gates_paper`) and what every gates method shares: identity at
init, the gate formula, deterministic evaluation, the penalty and its metrics; the pruning export (logits equal to
the gated model's, parameter counts exactly what the gates say, loading per-layer and uniform folders); and a real
2-rank ZeRO-3 training run of unit gates that closes gates."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file
from tiny_models import FAMILIES, HEADS, INTER, KV, LAYERS, H, make_model, sample_batch
from tiny_tokenizer import make_tokenizer
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from adapters_ds import InputError, adapter_layers, adapter_parameters, config_from_dict, freeze_base, inject_adapters
from adapters_ds.adapters.base import attach, detach
from adapters_ds.adapters.gates import GatesConfig
from adapters_ds.adapters.gates_paper import PaperGates, PaperGatesConfig, gate_values
from adapters_ds.adapters.registry import strategy_for
from adapters_ds.adapters.storage import save_adapter
from adapters_ds.export.pruned import SHAPES_NAME, prune_model
from adapters_ds.families import linear_dims
from adapters_ds.training.args import adapter_config, parse_train_args

R = 2
HD = H // HEADS
CLOSED, OPEN = -3.0, 3.0  # tanh(-3) + 0.5 < 0: z = 0; tanh(3) + 0.5 > 1: z = 1


def gated(family: str, lora_r: int = 0, dtype=torch.float32, scope: str = "all", **kw):
    """The paper's gates (scope "all") unless told otherwise; the unit gates have their own helper, `unit_gated`."""
    model = make_model(family, dtype)
    config = PaperGatesConfig(lora_r=lora_r, scope=scope, **kw)
    inject_adapters(model, config)
    freeze_base(model)
    return model, config


def logits(model, batch=None):
    with torch.no_grad():
        return model(**(batch or sample_batch())).logits


def gates_of(model) -> dict[str, PaperGates]:
    return {name: adapter for name, _, adapter in adapter_layers(model)}


def partially_open(model, seed: int = 5, lora_scale: float = 0.1) -> None:
    """Gates between 0.2 and 1 (not just 0 or 1) and a non-zero LoRA B, so folding is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in gates_of(model).values():
            for theta in adapter.thetas():
                theta.copy_(torch.empty(theta.shape).uniform_(-0.4, 0.6, generator=gen))
            if adapter.lora_r:
                adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=gen) * lora_scale)


# ------------------------------------------------------------------------------------------------ the layer


@pytest.mark.parametrize("lora_r", [0, R])
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init(family, lora_r):
    base = logits(make_model(family))
    model, _ = gated(family, lora_r)
    assert torch.equal(logits(model), base)
    for adapter in gates_of(model).values():
        assert torch.equal(adapter.eval_gates()[0], torch.ones_like(adapter.eval_gates()[0]))
        assert torch.equal(adapter.eval_gates()[1], torch.ones_like(adapter.eval_gates()[1]))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_identity_at_init_bf16(family):
    base = logits(make_model(family, torch.bfloat16))
    model, _ = gated(family, R, torch.bfloat16)
    assert {p.dtype for p in adapter_parameters(model).values()} == {torch.bfloat16}
    assert torch.equal(logits(model), base)


def test_init_is_exactly_open_for_every_gate_of_a_large_layer():
    """The truncated init keeps mu + 0.5 > 1 for all gates (an untruncated N(1, 0.1²) does not, at 10^6 draws)."""
    config = PaperGatesConfig(scope="all")
    layer = PaperGates(config, linear_dims("big", nn.Linear(1000, 1000)), torch.float32, torch.device("cpu"))
    for _ in range(3):
        layer.__init__(config, linear_dims("big", nn.Linear(1000, 1000)), torch.float32, torch.device("cpu"))
        assert bool((gate_values(layer.theta_rows, training=False) == 1).all())
    assert float(torch.randn(10**6).mul(0.1).add(1).min()) < math.atanh(0.5)  # why the truncation is needed


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_gate_formula_with_lora_inside_the_gates(kind):
    """y = z_r ⊙ ((W x' + s B A x') + b), x' = z_c ⊙ x: LoRA reads the gated input and is gated on its rows."""
    torch.manual_seed(0)
    d_in, d_out = 6, 5
    base = nn.Linear(d_in, d_out) if kind == "linear" else Conv1D(d_out, d_in)
    nn.init.normal_(base.bias)
    config = PaperGatesConfig(lora_r=R, lora_alpha=3.0, scope="all")
    adapter = PaperGates(config, linear_dims("x", base), torch.float32, torch.device("cpu"))
    attach(base, adapter)
    with torch.no_grad():
        adapter.theta_rows.copy_(torch.tensor([CLOSED, -0.3, 0.1, 0.4, OPEN]))
        adapter.theta_cols.copy_(torch.tensor([0.2, CLOSED, -0.2, OPEN, 0.0, 0.3]))
        adapter.lora_B.normal_()
    adapter.eval()
    x = torch.randn(3, 4, d_in)
    z_r = (torch.tanh(adapter.theta_rows) + 0.5).clamp(0, 1)
    z_c = (torch.tanh(adapter.theta_cols) + 0.5).clamp(0, 1)
    x_gated = z_c * x
    weight = base.weight.T if kind == "conv1d" else base.weight  # (out, in)
    lora = x_gated @ adapter.lora_A.T @ adapter.lora_B.T * (3.0 / R)
    expected = z_r * (x_gated @ weight.T + lora + base.bias)
    with torch.no_grad():
        torch.testing.assert_close(base(x), expected, atol=1e-6, rtol=0)
    assert torch.all(base(x)[..., 0] == 0)  # a closed row is exactly 0, bias and LoRA included
    detach(base)
    torch.testing.assert_close(base(x), x @ weight.T + base.bias)  # detaching restores the plain layer


def test_no_bias_is_added_where_the_base_has_none():
    base = nn.Linear(4, 3, bias=False)
    config = PaperGatesConfig(lora_r=R, scope="all")
    adapter = PaperGates(config, linear_dims("x", base), torch.float32, torch.device("cpu"))
    attach(base, adapter)
    assert sorted(n for n, _ in adapter.named_parameters()) == ["lora_A", "lora_B", "theta_cols", "theta_rows"]
    for mode in (True, False):
        adapter.train(mode)
        assert torch.equal(base(torch.zeros(2, 4)), torch.zeros(2, 3))


def test_evaluation_is_deterministic_and_training_noise_is_resampled():
    model, _ = gated("llama", R)
    partially_open(model)
    model.eval()
    first, second = logits(model), logits(model)
    assert torch.equal(first, second)
    model.train()
    noisy = [logits(model) for _ in range(2)]
    assert not torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[0], first)
    model.eval()
    assert torch.equal(logits(model), first)  # train() / eval() never change anything but the mode


def _block_shapes(family: str) -> list[tuple[int, int]]:
    """(in, out) of every gated linear of one block, from the architectures."""
    m = 4 * H if family == "bloom" else INTER
    if family in ("llama", "mistral", "qwen2"):
        return [(H, H), (H, KV), (H, KV), (H, H), (H, m), (H, m), (m, H)]
    if family in ("gptj", "opt"):
        return [(H, H)] * 4 + [(H, m), (m, H)]
    return [(H, 3 * H), (H, H), (H, m), (m, H)]


@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_parameters_are_one_gate_per_row_and_column(family):
    base_total = sum(p.numel() for p in make_model(family).parameters())
    for lora_r in (0, R):
        model, _ = gated(family, lora_r)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        expected = LAYERS * sum((d_in + d_out) * (1 + lora_r) for d_in, d_out in _block_shapes(family))
        assert sum(p.numel() for p in trainable.values()) == expected
        assert sum(p.numel() for p in model.parameters()) == base_total + expected
        assert set(trainable) == set(adapter_parameters(model))
        assert not any("embed" in n or "wte" in n or "lm_head" in n for n in gates_of(model))


# ------------------------------------------------------------------------------------------------ loss and metrics


def test_penalty_value_metrics_and_gradient():
    model, config = gated("llama", R, target_sparsity=0.4, sparsity_lambda=7.0)
    theta = 0.3
    with torch.no_grad():
        for name, adapter in gates_of(model).items():
            adapter.theta_rows.fill_(theta)
            adapter.theta_cols.fill_(theta)
            if "self_attn" in name:  # close 2 rows of every attention projection
                adapter.theta_rows[:2] = CLOSED
    penalty, metrics = strategy_for(config).regularizer(model)
    p_open = 0.5 * (1 + math.erf((math.tanh(theta) + 0.5) / (0.5 * math.sqrt(2))))
    p_closed = 0.5 * (1 + math.erf((math.tanh(CLOSED) + 0.5) / (0.5 * math.sqrt(2))))
    terms = []
    for name, adapter in gates_of(model).items():
        n = adapter.theta_rows.numel()
        rows = (p_open * (n - 2) + 2 * p_closed) / n if "self_attn" in name else p_open
        terms.append(0.5 * (abs(rows - 0.6) + abs(p_open - 0.6)))
    assert penalty.item() == pytest.approx(7.0 * sum(terms) / len(terms), rel=1e-5)
    assert metrics["gates/penalty"] == pytest.approx(penalty.item())
    attn_rows = LAYERS * (H + KV + KV + H)
    assert metrics["gates/closed_rows/attn"] == pytest.approx(LAYERS * 4 * 2 / attn_rows)
    assert metrics["gates/closed_rows/mlp"] == 0 and metrics["gates/closed_cols/all"] == 0
    assert 0 < metrics["gates/closed_rows/all"] < metrics["gates/closed_rows/attn"]
    assert metrics["gates/open_expected/mlp"] == pytest.approx(p_open, rel=1e-6)
    assert set(metrics) == {f"gates/{k}/{t}" for k in ("open_expected", "closed_rows", "closed_cols")
                            for t in ("all", "attn", "mlp")} | {"gates/penalty"}  # fmt: skip
    penalty.backward()
    for name, param in adapter_parameters(model).items():
        assert (param.grad is not None) == ("theta" in name), name
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_penalty_stops_after_penalty_steps_but_the_metrics_go_on():
    model, config = gated("llama", R, penalty_steps=3, sparsity_lambda=9.0)
    partially_open(model)
    strategy = strategy_for(config)
    during, metrics_during = strategy.regularizer(model, step=2)
    after, metrics_after = strategy.regularizer(model, step=3)
    assert during.item() > 0 and after.item() == 0 and metrics_after["gates/penalty"] == 0
    assert {k: v for k, v in metrics_during.items() if k != "gates/penalty"} == {
        k: v for k, v in metrics_after.items() if k != "gates/penalty"
    }
    after.backward()
    assert all(p.grad is None or not p.grad.any() for p in adapter_parameters(model).values())
    forever = strategy_for(PaperGatesConfig(sparsity_lambda=9.0))  # penalty_steps 0: every step
    assert forever.regularizer(model, step=10**6)[0].item() == pytest.approx(during.item(), rel=1e-6)


def test_penalty_inputs_come_from_the_training_forward_once():
    """Under ZeRO-3 the gates are gathered only inside forwards, so a training forward records what the penalty
    needs (in the strategy, through its forward hooks: the layers hold no such state); the regularizer takes it
    (once) and gives the same value as computing it from theta directly."""
    model, config = gated("llama", R)
    partially_open(model)
    strategy = strategy_for(config)
    strategy.prepare(model)
    model.train()
    model(**sample_batch())
    assert [set(strategy.pending[a]) for a in gates_of(model).values()] == [{"rows", "cols"}] * len(gates_of(model))
    from_forward, metrics_forward = strategy.regularizer(model)
    assert not strategy.pending
    direct, metrics_direct = strategy.regularizer(model)
    assert from_forward.item() == pytest.approx(direct.item(), rel=1e-6) and metrics_forward == metrics_direct
    model.eval()
    model(**sample_batch())
    assert not strategy.pending  # evaluation records nothing


def test_param_groups_give_the_gates_their_own_learning_rate():
    model, config = gated("llama", R, gate_lr=0.05)
    groups = strategy_for(config).param_groups(model, learning_rate=3e-4)
    gates = {id(a.theta_rows) for a in gates_of(model).values()} | {id(a.theta_cols) for a in gates_of(model).values()}
    assert groups[1]["lr"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert {id(p) for p in groups[1]["params"]} == gates
    assert groups[0]["lr"] == 3e-4 and len(groups[0]["params"]) == 2 * len(gates_of(model))  # lora A and B: first,
    # so the logged learning rate is the run's
    model, config = gated("llama")
    assert len(strategy_for(config).param_groups(model, 3e-4)) == 1


def test_training_with_high_lambda_closes_gates_and_leaves_the_base_alone():
    model, config = gated("llama", R, target_sparsity=0.6, sparsity_lambda=100.0, gate_lr=0.5)
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    strategy = strategy_for(config)
    strategy.prepare(model)
    optimizer = torch.optim.AdamW(strategy.param_groups(model, 1e-3))
    batch = sample_batch()
    for _ in range(6):
        loss = model(**batch, labels=batch["input_ids"]).loss
        penalty, metrics = strategy.regularizer(model)
        (loss + penalty).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert metrics["gates/closed_rows/all"] > 0.3 and metrics["gates/closed_cols/all"] > 0.3
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"method": "gates", "target_sparsity": 1.0}, "target_sparsity must be a number >= 0 and < 1"),
        ({"method": "gates_paper", "sparsity_lambda": -1}, "sparsity_lambda must be a number >= 0"),
        ({"method": "gates_paper", "gate_lr": 0}, "gate_lr must be a number > 0"),
        ({"method": "gates_paper", "target_sparsity": -0.1}, "target_sparsity must be a number >= 0 and < 1"),
        ({"method": "gates", "lora_r": -1}, "lora_r must be an integer >= 0"),
        ({"method": "gates", "lora_alpha": 0}, "lora_alpha must be a number > 0"),
        ({"method": "gates", "lambda": 5}, r"unknown gates option\(s\) \['lambda'\]"),
        ({"method": "gates_paper", "scope": "heads"}, "scope must be 'all' or 'mlp'"),
        ({"method": "gates_paper", "penalty_steps": -1}, "penalty_steps must be an integer >= 0"),
        ({"method": "gates", "scope": "all"}, r"unknown gates option\(s\) \['scope'\]"),  # the paper's: gates_paper
        ({"method": "gates", "gate_lr": 0.1}, r"unknown gates option\(s\) \['gate_lr'\]"),
        ({"method": "gates_paper", "ramp": "0.1,0.5"}, r"unknown gates_paper option\(s\) \['ramp'\]"),
        ({"method": "gates", "ramp": "0.6,0.1"}, r"ramp must be 'start,end' with 0 <= start <= end <= 1"),
        ({"method": "gates", "ramp": "half"}, "ramp must be 'start,end'"),
        ({"method": "gates", "distill": -1}, "distill must be a number >= 0"),
        ({"method": "gates", "importance": "magnitude"}, "importance must be 'fisher' or 'random'"),
    ],
)
def test_config_validation(values, message):
    with pytest.raises(InputError, match=message):
        config_from_dict(values)


def test_command_line_options_reach_the_config():
    args = parse_train_args(["--ds_config", "x.json", "--base_model", "m", "--adapter", "gates",
                             "--gate_target_sparsity", "0.5", "--gate_lora_r", "4", "--gate_ramp", "0.2,0.7",
                             "--gate_distill", "0.5", "--gate_importance", "random"])  # fmt: skip
    config = adapter_config(args)
    assert config == GatesConfig(target_sparsity=0.5, lora_r=4, ramp="0.2,0.7", distill=0.5, importance="random")
    assert config.ramp_fractions == (0.2, 0.7)
    defaults = adapter_config(parse_train_args(["--ds_config", "x.json", "--adapter", "gates"]))
    assert defaults == GatesConfig() and (defaults.lora_r, defaults.distill) == (32, 0.0)
    assert config_from_dict(config.to_dict()) == config
    args = parse_train_args(["--ds_config", "x.json", "--adapter", "gates_paper", "--gate_target_sparsity", "0.5",
                             "--gate_lambda", "80", "--gate_lr", "0.02", "--gate_lora_r", "4", "--gate_scope", "mlp",
                             "--gate_penalty_steps", "30"])  # fmt: skip
    paper = adapter_config(args)
    assert paper == PaperGatesConfig(
        target_sparsity=0.5, sparsity_lambda=80.0, gate_lr=0.02, lora_r=4, scope="mlp", penalty_steps=30
    )
    assert config_from_dict(paper.to_dict()) == paper


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--adapter", "gates", "--gate_lambda", "5"], "--gate_lambda does not apply to --adapter gates"),
        (["--adapter", "gates_paper", "--gate_ramp", "0.1,0.2"], "--gate_ramp does not apply to --adapter gates_paper"),
        (["--adapter", "lora", "--bottleneck_size", "8"], "--bottleneck_size does not apply to --adapter lora"),
        (["--gate_scope", "all"], "--gate_scope does not apply to --adapter lora"),
    ],
)
def test_an_option_of_another_method_is_an_error(argv, message):
    with pytest.raises(InputError, match=message):
        parse_train_args(["--ds_config", "x.json", *argv])


@pytest.mark.parametrize("method", ["gates", "gates_paper"])
def test_the_lora_scale_without_lora_inside_the_gates_is_an_error(method):
    args = parse_train_args(
        ["--ds_config", "x.json", "--adapter", method, "--gate_lora_r", "0", "--gate_lora_alpha", "8"]
    )
    with pytest.raises(InputError, match="--gate_lora_alpha does not apply with --gate_lora_r 0"):
        adapter_config(args)


def test_gates_refuse_merge():
    from adapters_ds import merge_adapters

    model, _ = gated("llama")
    with pytest.raises(InputError, match="export --prune"):
        merge_adapters(model)


# ------------------------------------------------------------------------------------------------ pruning export

# Per family: rows of the value projection belonging to head h (module, indices), the output projection and the
# MLP producers / consumer, written from the architectures (not read from adapters_ds.export.pruned).
V_HEAD = {
    "llama": lambda h: ("self_attn.v_proj", range(h * HD, (h + 1) * HD)),  # h: a KV head
    "gpt_neox": lambda h: ("attention.query_key_value", range(h * 3 * HD + 2 * HD, (h + 1) * 3 * HD)),
    "bloom": lambda h: ("self_attention.query_key_value", range(h * 3 * HD + 2 * HD, (h + 1) * 3 * HD)),
    "gptj": lambda h: ("attn.v_proj", range(h * HD, (h + 1) * HD)),
    "opt": lambda h: ("self_attn.v_proj", range(h * HD, (h + 1) * HD)),
    "gpt2": lambda h: ("attn.c_attn", range(2 * H + h * HD, 2 * H + (h + 1) * HD)),
}
V_HEAD["mistral"] = V_HEAD["qwen2"] = V_HEAD["llama"]
BLOCKS = {"llama": "model.layers", "gpt_neox": "gpt_neox.layers", "bloom": "transformer.h", "gptj": "transformer.h",
          "opt": "model.decoder.layers", "gpt2": "transformer.h"}  # fmt: skip
Q_PROJ = {"llama": "self_attn.q_proj", "gpt_neox": "attention.query_key_value",
          "bloom": "self_attention.query_key_value", "gptj": "attn.q_proj", "opt": "self_attn.q_proj",
          "gpt2": "attn.c_attn"}  # fmt: skip
O_PROJ = {"llama": "self_attn.o_proj", "gpt_neox": "attention.dense", "bloom": "self_attention.dense",
          "gptj": "attn.out_proj", "opt": "self_attn.out_proj", "gpt2": "attn.c_proj"}  # fmt: skip
MLP = {"llama": (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
       "gpt_neox": (("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h"),
       "bloom": (("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h"), "gptj": (("mlp.fc_in",), "mlp.fc_out"),
       "opt": (("fc1",), "fc2"), "gpt2": (("mlp.c_fc",), "mlp.c_proj")}  # fmt: skip
for _table in (BLOCKS, Q_PROJ, O_PROJ, MLP):
    _table["mistral"] = _table["qwen2"] = _table["llama"]
GQA = {"llama", "mistral", "qwen2"}


def close_units(model, family: str) -> dict[str, int]:
    """Close by hand: layer 0 loses a whole KV group through its value rows (one head without GQA) and 10 MLP
    units (producer rows 0-5, consumer columns 4-9; LLaMA also up_proj rows 20-22); layer 1 loses the output
    columns of heads 0 and 2 (one per KV group: no group can go, but each group keeps one query head) and some
    query rows and hidden-side columns that are folded, not removed. Returns what should be removed."""
    gates = gates_of(model)
    block = BLOCKS[family]

    def close(layer: int, name: str, side: str, indices) -> None:
        theta = getattr(gates[f"{block}.{layer}.{name}"], f"theta_{side}")
        with torch.no_grad():
            theta[list(indices)] = CLOSED

    v_proj, v_rows = V_HEAD[family](1)
    close(0, v_proj, "rows", v_rows)
    producers, consumer = MLP[family]
    close(0, producers[0], "rows", range(0, 6))
    close(0, consumer, "cols", range(4, 10))
    units = 10
    if family in GQA:
        close(0, "mlp.up_proj", "rows", range(20, 23))
        units = 13
    close(1, O_PROJ[family], "cols", [*range(0, HD), *range(2 * HD, 3 * HD)])
    close(1, producers[0], "cols", [1, 2])  # hidden side: folded only
    close(1, consumer, "rows", [0, 5])  # hidden side: folded only
    if family in GQA:
        close(1, "self_attn.q_proj", "rows", range(HD, HD + 3))  # part of a live head: folded only
        close(1, "self_attn.q_proj", "rows", range(3 * HD, 4 * HD))  # a whole query: uniform attention, not 0
    heads_pruned = family != "bloom"
    return {
        "units0": units,
        "groups0": 1 if heads_pruned else 0,  # llama: KV group 1 (heads 2, 3); others: head 1
        "heads1": 2 if heads_pruned else 0,
    }


def expected_removed(model, family: str, closed: dict[str, int]) -> int:
    """Parameters the closed units account for, from the module sizes and bias flags of the base model."""
    block0 = model.get_submodule(f"{BLOCKS[family]}.0")
    producers, consumer = MLP[family]
    per_unit = sum(H + (block0.get_submodule(p).bias is not None) for p in producers) + H
    q_bias = block0.get_submodule(Q_PROJ[family]).bias is not None
    per_q_head = HD * H + HD * q_bias + HD * H  # query rows and output columns
    per_kv = 2 * (HD * H + HD * q_bias)  # key and value rows
    removed = closed["units0"] * per_unit
    if family in GQA:  # layer 0: a KV group of 2 query heads; layer 1: query heads only, both groups stay
        removed += closed["groups0"] * (2 * per_q_head + per_kv) + closed["heads1"] * per_q_head
    else:  # one KV head per query head
        removed += (closed["groups0"] + closed["heads1"]) * (per_q_head + per_kv)
    return removed


def hand_pruned(family: str, lora_r: int = R):
    model, config = gated(family, lora_r)
    partially_open(model)
    closed = close_units(model, family)
    return model.eval(), config, closed


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_logits_equal_gated_and_count_drops_exactly(family):
    model, _, closed = hand_pruned(family)
    batch = sample_batch(batch=3, seq=16)
    expected_logits = logits(model, batch)
    base_total = sum(p.numel() for p in make_model(family).parameters())
    removed = expected_removed(model, family, closed)
    record = prune_model(model)
    assert not list(adapter_layers(model)) and not any(".adapter." in n for n in model.state_dict())
    torch.testing.assert_close(logits(model, batch), expected_logits, atol=1e-4, rtol=0)
    assert sum(p.numel() for p in model.parameters()) == base_total - removed
    assert record["parameters"]["removed"] == removed and record["parameters"]["base"] == base_total
    layer0, layer1 = record["layers"]
    m = 4 * H if family == "bloom" else INTER
    assert layer0["intermediate"] == m - closed["units0"] and layer1["intermediate"] == m
    if family in GQA:
        assert (layer0["heads"], layer0["kv_heads"]) == (2, 1) and (layer1["heads"], layer1["kv_heads"]) == (2, 2)
        assert model.model.layers[1].self_attn.num_key_value_groups == 1
    elif family == "bloom":  # ALiBi: heads are kept
        assert layer0["heads"] == layer1["heads"] == HEADS and record["heads_kept_because"]
    else:
        assert (layer0["heads"], layer1["heads"]) == (HEADS - 1, HEADS - 2)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_generation_with_cache_matches_the_gated_model(family):
    model, _, _ = hand_pruned(family)
    prompt = sample_batch(batch=2, seq=6)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    gated_ids = model.generate(**prompt, **kwargs)
    prune_model(model)
    assert torch.equal(model.generate(**prompt, **kwargs), gated_ids)


def _export(tmp_path, family: str, *extra: str):
    from adapters_ds.cli.export import main as export_main

    model, config, closed = hand_pruned(family)
    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "pruned"
    make_model(family).save_pretrained(base_dir)
    make_tokenizer().save_pretrained(base_dir)  # the export copies it: the folder is a complete model
    save_adapter(model, config, adapter_dir)
    export_main(["--base_model", str(base_dir), "--adapter_dir", str(adapter_dir), "--output_dir", str(out),
                 "--prune", *extra])  # fmt: skip
    return model, out, closed


def test_per_layer_export_with_tied_embeddings_loads_tied(tmp_path):
    from adapters_ds.modeling import load_base_model

    model = make_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    inject_adapters(model, PaperGatesConfig(scope="all"))
    close_units(model, "llama")
    expected = logits(model.eval())
    record = prune_model(model)
    assert not record["loads_with_transformers"]
    model.save_pretrained(tmp_path)
    (tmp_path / SHAPES_NAME).write_text(json.dumps(record))
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = load_base_model(str(tmp_path), dtype="checkpoint")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(logits(loaded), expected, atol=1e-4, rtol=0)


def test_per_layer_export_loads_through_adapters_ds_and_the_evaluation_harness(tmp_path, capsys):
    from adapters_ds.evaluation.harness import load_model
    from adapters_ds.modeling import load_base_model

    model, out, _ = _export(tmp_path, "llama")
    assert "removed" in capsys.readouterr().out
    record = json.loads((out / SHAPES_NAME).read_text())
    assert not record["loads_with_transformers"] and [s["heads"] for s in record["layers"]] == [2, 2]
    expected = logits(model)
    loaded = load_base_model(str(out), dtype="checkpoint")
    assert type(loaded).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(loaded), expected, atol=1e-4, rtol=0)
    evaluated, _, method = load_model(str(out), None, torch.float32, torch.device("cpu"))
    assert method == "none"
    torch.testing.assert_close(logits(evaluated), expected, atol=1e-4, rtol=0)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # never silently re-initialised
        AutoModelForCausalLM.from_pretrained(out)


def test_export_dtype_float32_keeps_a_bf16_base_s_gated_outputs(tmp_path):
    from adapters_ds import load_adapter
    from adapters_ds.export.pruned import export_pruned
    from adapters_ds.modeling import load_base_model

    model, config, _ = hand_pruned("llama")
    make_model("llama", torch.bfloat16).save_pretrained(tmp_path / "base")  # the same weights, in bf16
    save_adapter(model.to(torch.bfloat16), config, tmp_path / "adapter")
    reference = load_base_model(str(tmp_path / "base"), dtype=torch.float32)
    load_adapter(reference, tmp_path / "adapter")
    expected = logits(reference.eval())
    export_pruned(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "fp32"), dtype="float32")
    pruned = load_base_model(str(tmp_path / "fp32"), dtype="checkpoint")
    assert pruned.dtype == torch.float32
    torch.testing.assert_close(logits(pruned), expected, atol=1e-4, rtol=0)
    export_pruned(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "auto"))
    assert load_base_model(str(tmp_path / "auto"), dtype="checkpoint").dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_uniform_export_loads_with_plain_transformers(tmp_path, family):
    model, out, closed = _export(tmp_path, family, "--uniform_shapes")
    record = json.loads((out / SHAPES_NAME).read_text())
    assert record["loads_with_transformers"]
    plain = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(plain), logits(model), atol=1e-4, rtol=0)
    config = json.loads((out / "config.json").read_text())
    if family == "llama":  # layer 0 keeps 1 group of 2 heads, layer 1 2 groups of 1: uniform is 2 groups of 2
        assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, HD)
        assert config["intermediate_size"] == INTER  # layer 1 keeps every unit
    else:
        assert config["n_head"] == HEADS and config["n_inner"] == INTER


def test_uniform_shapes_shrink_the_config_when_every_layer_agrees(tmp_path):
    model, config = gated("llama")
    with torch.no_grad():
        for layer in range(LAYERS):
            gates_of(model)[f"model.layers.{layer}.mlp.down_proj"].theta_cols[:8] = CLOSED
            gates_of(model)[f"model.layers.{layer}.self_attn.v_proj"].theta_rows[:HD] = CLOSED  # KV group 0
    model.eval()
    expected = logits(model)
    record = prune_model(model)
    assert record["loads_with_transformers"]
    assert (model.config.intermediate_size, model.config.num_attention_heads, model.config.num_key_value_heads) == (
        INTER - 8,
        2,
        1,
    )
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path)), expected, atol=1e-4, rtol=0)


def test_export_refuses_other_adapters_and_uniform_bloom(tmp_path):
    from adapters_ds import LoRAConfig
    from adapters_ds.cli.export import main as export_main

    model = make_model("llama")
    inject_adapters(model, LoRAConfig(r=R))
    make_model("llama").save_pretrained(tmp_path / "base")
    save_adapter(model, LoRAConfig(r=R), tmp_path / "lora")
    with pytest.raises(SystemExit) as exc:
        export_main(["--base_model", str(tmp_path / "base"), "--adapter_dir", str(tmp_path / "lora"),
                     "--output_dir", str(tmp_path / "o"), "--prune"])  # fmt: skip
    assert exc.value.code == 2 and not (tmp_path / "o").exists()
    bloom, _, _ = hand_pruned("bloom")
    with pytest.raises(InputError, match="uniform shapes need the MLP width"):
        prune_model(bloom, uniform=True)


# ------------------------------------------------------------------------------------------------ scope "mlp"


def _mlp_names(family: str) -> tuple[tuple[str, ...], str]:
    producers, consumer = MLP.get(family, MLP["llama"])
    return producers, consumer


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_scope_gates_exactly_the_intermediate_units(family):
    model, _ = gated(family, R, scope="mlp")
    producers, consumer = _mlp_names(family)
    m = 4 * H if family == "bloom" else INTER
    for name, adapter in gates_of(model).items():
        is_producer = any(name.endswith("." + p) for p in producers)
        assert (adapter.theta_rows is not None) == is_producer, name
        assert (adapter.theta_cols is not None) == name.endswith("." + consumer), name
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = LAYERS * sum((d_in + d_out) * R for d_in, d_out in _block_shapes(family))
    assert trainable == LAYERS * m * (len(producers) + 1) + lora
    assert logits(model.eval()).equal(logits(make_model(family).eval()))  # still the base at init


def test_mlp_scope_penalty_metrics_and_adapter_file(tmp_path):
    from adapters_ds.adapters.storage import load_adapter

    model, config = gated("llama", R, scope="mlp", target_sparsity=0.4, sparsity_lambda=7.0)
    partially_open(model)
    with torch.no_grad():
        gates_of(model)["model.layers.0.mlp.down_proj"].theta_cols[:3] = CLOSED
    strategy = strategy_for(config)
    penalty, metrics = strategy.regularizer(model)
    terms = [
        (stats.p.mean() - 0.6).abs().item()
        for adapter in gates_of(model).values()
        for stats in strategy.statistics(adapter)
        if stats is not None
    ]
    assert len(terms) == LAYERS * 3  # gate_proj rows, up_proj rows, down_proj columns: one term each
    assert penalty.item() == pytest.approx(7.0 * sum(terms) / len(terms), rel=1e-5)
    assert metrics["gates/closed_cols/mlp"] == pytest.approx(3 / (LAYERS * INTER))
    assert set(metrics) == {"gates/penalty", "gates/open_expected/all", "gates/open_expected/mlp"} | {
        f"gates/closed_{side}/{kind}" for side in ("rows", "cols") for kind in ("all", "mlp")
    }
    save_adapter(model, config, tmp_path)
    names = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert not any("self_attn" in n and "theta" in n for n in names) and any("self_attn" in n for n in names)
    fresh = make_model("llama")
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh.eval()), logits(model.eval()), atol=0, rtol=0)


def test_mlp_scope_export_removes_the_closed_units_and_keeps_the_logits():
    model, _ = gated("llama", R, scope="mlp")
    partially_open(model)
    with torch.no_grad():
        gates_of(model)["model.layers.0.mlp.gate_proj"].theta_rows[:2] = CLOSED
        gates_of(model)["model.layers.0.mlp.up_proj"].theta_rows[2:5] = CLOSED
        gates_of(model)["model.layers.1.mlp.down_proj"].theta_cols[1:5] = CLOSED  # overlaps nothing above
    model.eval()
    expected = logits(model)
    record = prune_model(model)
    torch.testing.assert_close(logits(model), expected, atol=1e-4, rtol=0)
    assert [s["intermediate"] for s in record["layers"]] == [INTER - 5, INTER - 4]
    assert [(s["heads"], s["kv_heads"]) for s in record["layers"]] == [(HEADS, KV // HD)] * LAYERS
    assert record["parameters"]["removed"] == 3 * H * (5 + 4)


# ------------------------------------------------------------------------------------------------ real training


@pytest.mark.slow
def test_zero3_two_rank_training_with_default_settings_prunes_to_the_target(tmp_path):
    """2 ranks, ZeRO-3, every gates option at its default (unit gates): the schedule closes units up to the target
    share, TensorBoard holds its scalars beside the answer-only losses, the gates stay replicated, and the export
    removes exactly the share the run logged, with the gated model's logits."""
    from launch import run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from adapters_ds import load_adapter
    from adapters_ds.export.pruned import export_pruned
    from adapters_ds.hardware import native_bf16
    from adapters_ds.modeling import load_base_model

    base = tmp_path / "base"
    make_model("llama").save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    records = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a + b}"}
               for a in range(1, 7) for b in range(1, 7)]  # fmt: skip
    (tmp_path / "data.json").write_text(json.dumps(records))
    out = tmp_path / "run"
    result = run(["--ds_config", str(REPO / "ds_configs" / "zero3.json"), "--base_model", str(base),
                  "--data_path", str(tmp_path / "data.json"), "--output_dir", str(out), "--adapter", "gates",
                  "--max_steps", "8", "--logging_steps", "4", "--micro_batch_size", "2", "--batch_size", "4",
                  "--cutoff_len", "64", "--save_steps", "0", "--val_set_size", "8", "--eval_steps", "8"])  # fmt: skip
    # the log line shows the schedule beside the answer-only loss: the target and the share the export would remove
    assert re.search(r"step 8/8 \| loss .* answer loss .* gates/target 0\.3 \| gates/removed 0\.[23]\d*",
                     result.stdout + result.stderr)  # fmt: skip
    events = EventAccumulator(str(out / "tensorboard" / "train"))
    events.Reload()
    last = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    expected = {"gates/target", "gates/removed", "gates/closed_units/mlp", "gates/closed_units/attn",
                "train/loss", "train/answer_loss", "eval/loss", "eval/answer_loss", "eval/digit_loss"}  # fmt: skip
    assert expected <= set(last)
    assert last["gates/target"] == pytest.approx(0.3) and abs(last["gates/removed"] - 0.3) <= 0.02
    assert "gates/distill" not in last and last["eval/digit_loss"] > 0  # distillation is off by default
    assert [e.value for e in events.Scalars("gates/target")][0] < 0.3  # logged at steps 4 and 8: the ramp rises
    reports = json.loads((out / "zero3_partition.json").read_text())
    assert all(r["adapter_local_numel"] == r["adapter_numel"] for r in reports)  # gates replicated

    dtype = torch.bfloat16 if native_bf16() else torch.float32
    model = make_model("llama", dtype)
    load_adapter(model, out / "adapter")
    model.eval()
    expected_logits = logits(model).float()
    record = export_pruned(str(base), str(out / "adapter"), str(tmp_path / "pruned"))
    # every unit the run closed is closed in the saved adapter (θ < 1): the export removes the logged share, less
    # the closed units it keeps to round the MLP widths (at the default multiple, 64 > 48: every unit)
    assert record["parameters"]["blocks_removed_fraction_unpadded"] == pytest.approx(last["gates/removed"], abs=1e-6)
    pruned = load_base_model(str(tmp_path / "pruned"), dtype="checkpoint")
    atol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(logits(pruned).float(), expected_logits, atol=atol, rtol=0)
