"""Unit gates (`--adapter gates`, `adapters/gate_schedule.py`): one 0/1 gate per
unit the export removes, a schedule that reaches the target share of block parameters, closing through the
optimizer, Fisher importance, distillation from the dense model; a short run with default settings on every family
ends on target with gates in {0, 1} and an export whose logits are the gated model's."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, HEADS, INTER, LAYERS, H, make_model, sample_batch
from training.test_persistence import SHAPES
from transformers import AutoModelForCausalLM

from adapters.test_gates import BLOCKS, GQA, MLP, O_PROJ, expected_removed
from adapters_ds import adapter_layers, adapter_parameters, freeze_base, inject_adapters, load_adapter
from adapters_ds.adapters import gate_schedule as schedule
from adapters_ds.adapters.gate_schedule import unit_layers
from adapters_ds.adapters.gates import Gates, GatesConfig
from adapters_ds.adapters.registry import strategy_for
from adapters_ds.adapters.storage import save_adapter
from adapters_ds.errors import InputError
from adapters_ds.export.pruned import prune_model
from adapters_ds.training.loss import forward_targets, token_losses
from adapters_ds.zero import full_numel

R = 2
KV_GROUPS = 2  # the tiny GQA models: 4 query heads in 2 KV groups


def unit_gated(family: str, dtype=torch.float32, **kw):
    """(model, its prepared training strategy); the config is `strategy.config`."""
    model = make_model(family, dtype)
    config = GatesConfig(**kw)
    inject_adapters(model, config)
    freeze_base(model)
    strategy = strategy_for(config)
    strategy.prepare(model)
    return model, strategy


def layers_by_name(model) -> dict[str, Gates]:
    return {name: adapter for name, _, adapter in adapter_layers(model)}


def labelled(batch: dict) -> dict:
    return {**batch, "labels": batch["input_ids"].clone()}


def train(model, strategy, steps: int, batch: dict, lr: float = 1e-2, total: int | None = None) -> dict:
    """The trainer's calls in its order (step_begin, forward, batch_loss, regularizer, backward, step) with AdamW on
    `param_groups`; returns the last step's scalars."""
    optimizer = torch.optim.AdamW(strategy.param_groups(model, lr))
    model.train()
    metrics = {}
    for step in range(steps):
        metrics = strategy.step_begin(model, step, total or steps)
        forward = forward_targets(model, batch)
        summed = token_losses(forward).sum()
        extra = strategy.batch_loss(model, forward.inputs, forward.keep, forward.logits, step) or {}
        penalty, _ = strategy.regularizer(model, step)
        ((summed + sum(extra.values())) / len(forward.targets) + penalty).backward()
        optimizer.step()
        optimizer.zero_grad()
    return metrics


def logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


# ------------------------------------------------------------------------------------------------ the gates


@pytest.mark.parametrize("family", FAMILIES)
def test_one_gate_per_unit_the_export_removes_and_the_base_at_init(family):
    model, _ = unit_gated(family, lora_r=R)
    producers, consumer = MLP[family]
    m = 4 * H if family == "bloom" else INTER
    kv_groups = KV_GROUPS if family in GQA else HEADS
    gated = {}
    for name, adapter in layers_by_name(model).items():
        assert adapter.theta_rows is None, name  # no row gates at all
        if adapter.theta_cols is not None:
            gated[name] = adapter.theta_cols
    expected = {f"{BLOCKS[family]}.{i}.{consumer}": m for i in range(LAYERS)}
    if family != "bloom":  # BLOOM keeps its heads (ALiBi): no attention gates
        expected |= {f"{BLOCKS[family]}.{i}.{O_PROJ[family]}": kv_groups for i in range(LAYERS)}
    assert {name: len(theta) for name, theta in gated.items()} == expected
    assert all(torch.equal(theta, torch.ones_like(theta)) for theta in gated.values())
    assert torch.equal(logits(model.eval(), sample_batch()), logits(make_model(family), sample_batch()))


@pytest.mark.parametrize("family", FAMILIES)
def test_unit_costs_are_the_parameters_the_export_removes(family):
    """Close 10 MLP units and one KV group (one head without GQA) of block 0 by hand: the costs the schedule counts
    add up to what the export removes, which `test_gates.expected_removed` writes from the architectures."""
    model, _ = unit_gated(family, lora_r=R)
    block = BLOCKS[family]
    mlp = layers_by_name(model)[f"{block}.0.{MLP[family][1]}"]
    mlp.close(torch.arange(mlp.theta_cols.numel()) < 10)
    counted = 10 * mlp.unit_cost
    if family != "bloom":
        attn = layers_by_name(model)[f"{block}.0.{O_PROJ[family]}"]
        attn.close(torch.arange(attn.theta_cols.numel()) == 1)
        counted += attn.unit_cost
    removed = expected_removed(model, family, {"units0": 10, "groups0": int(family != "bloom"), "heads1": 0})
    assert counted == removed
    batch = sample_batch(batch=3, seq=10)
    expected_logits = logits(model.eval(), batch)
    record = prune_model(model)
    assert record["parameters"]["removed"] == removed
    torch.testing.assert_close(logits(model, batch), expected_logits, atol=1e-4, rtol=0)


def test_closed_units_are_exact_zeros_and_open_ones_exact_ones():
    model, _ = unit_gated("llama", lora_r=R)
    down = layers_by_name(model)["model.layers.0.mlp.down_proj"]
    o_proj = layers_by_name(model)["model.layers.1.self_attn.o_proj"]
    down.close(torch.arange(INTER) % 3 == 0)
    o_proj.close(torch.tensor([True, False]))
    for mode in (True, False):
        model.train(mode)
        z_cols = down.eval_gates()[1]
        assert set(z_cols.tolist()) == {0.0, 1.0} and z_cols.sum() == INTER - len(range(0, INTER, 3))
        assert o_proj.eval_gates()[1].tolist() == [0.0] * (H // 2) + [1.0] * (H // 2)  # a KV group: 2 heads
        seen: dict[str, torch.Tensor] = {}
        handle = model.model.layers[0].mlp.down_proj.register_forward_hook(
            lambda m, a, o, seen=seen: seen.update(x=a[0])
        )
        with torch.set_grad_enabled(mode):
            model(**sample_batch())
        handle.remove()
        assert torch.all(seen["x"][..., ::3] == 0) and torch.all(seen["x"][..., 1::3] != 0)  # no noise: exact


# ------------------------------------------------------------------------------------------------ the schedule


def test_scheduled_sparsity_is_zero_then_a_cubic_ramp_then_the_target():
    values = [schedule.scheduled_sparsity(t, 100, 0.4, 0.1, 0.6) for t in range(101)]
    assert values[:10] == [0.0] * 10 and values[60:] == [0.4] * 41
    assert values[35] == pytest.approx(0.4 * (1 - 0.5**3))
    assert all(a < b for a, b in zip(values[10:60], values[11:61], strict=True))  # rising to the end of the ramp
    assert values[11] - values[10] > values[59] - values[58]  # fast first, slow last
    assert schedule.scheduled_sparsity(0, 10, 0.3, 0.0, 0.0) == 0.3  # an empty ramp: the target from the start


def test_choose_takes_the_lowest_scores_keeps_a_unit_per_layer_and_respects_the_limit():
    scores = [torch.tensor([0.5, 0.1, 0.3]), torch.tensor([0.2, 0.05])]
    closed = [torch.tensor([False, False, False]), torch.tensor([False, False])]
    costs = [1, 10]
    chosen = schedule.choose(scores, costs, closed, need=12, limit=100)
    # by score: layer 1 unit 1 (0.05, cost 10), layer 0 unit 1 (0.1), layer 1 unit 0 (0.2: its layer's last), ...
    assert [c.tolist() for c in chosen] == [[False, True, True], [False, True]]
    # the cost-10 units would pass the limit; layer 0 keeps one unit, so the need is not met
    assert [c.tolist() for c in schedule.choose(scores, costs, closed, 5, limit=6)] == [
        [False, True, True],
        [False] * 2,
    ]
    tied = [torch.zeros(3), torch.zeros(2)]
    assert [c.tolist() for c in schedule.choose(tied, [1, 1], closed, 2, 9)] == [[True, True, False], [False] * 2]


def test_choose_closes_runs_whose_first_takes_the_remainder():
    """Runs of 2 in a layer of 5 open units: by score, unit 1 alone (the remainder: 4 open after it), then units 3
    and 2 (mean 0.25), and units 0 and 4 stay (its last run)."""
    scores = [torch.tensor([0.5, 0.1, 0.3, 0.2, 0.9]), torch.tensor([0.2, 0.05])]
    closed = [torch.zeros(5, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)]
    chosen = schedule.choose(scores, [1, 1], closed, need=3, limit=100, runs=[2, 1])
    assert [c.tolist() for c in chosen] == [[False, True, True, True, False], [False, True]]
    # the 2-unit run would pass the limit and nothing cheaper follows it: the need is not met
    chosen = schedule.choose(scores, [1, 1], closed, need=3, limit=3, runs=[2, 1])
    assert [c.tolist() for c in chosen] == [[False, True, False, False, False], [False, True]]
    # runs of 1 are the unit-by-unit choice
    assert [c.tolist() for c in schedule.choose(scores, [1, 1], closed, 3, 100, runs=[1, 1])] == [
        [False, True, False, True, False],
        [False, True],
    ]


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_share_is_reachable_within_one_unit_on_real_shapes(name):
    """On published sizes (meta device): the units cover the blocks' matrices, the largest unit is far below the
    2-point tolerance, and the choice lands on 20, 30 and 40 % of the block parameters within the smallest unit."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(SHAPES[name]())
    inject_adapters(model, GatesConfig())
    freeze_base(model)
    layers = unit_layers(model)
    total = schedule.block_parameters(model, {id(p) for p in adapter_parameters(model).values()})
    costs = [layer.unit_cost for layer in layers]
    closed = [torch.zeros(full_numel(layer.theta_cols), dtype=torch.bool) for layer in layers]
    covered = sum(len(shut) * cost for shut, cost in zip(closed, costs, strict=True)) / total
    assert (0.6 if name.startswith("bloom") else 0.97) < covered <= 1  # BLOOM keeps its heads: the MLP alone
    assert max(costs) / total < 0.005
    generator = torch.Generator().manual_seed(0)
    scores = [torch.rand(len(shut), generator=generator) / cost for shut, cost in zip(closed, costs, strict=True)]
    for share in (0.2, 0.3, 0.4):
        chosen = schedule.choose(scores, costs, closed, share * total, share * total + min(costs))
        removed = sum(int(new.sum()) * cost for new, cost in zip(chosen, costs, strict=True)) / total
        assert share <= removed <= share + min(costs) / total, (share, removed)
        assert {kind for layer, new in zip(layers, chosen, strict=True) if new.any() for kind in [layer.unit_kind]} == (
            {"mlp"} if name.startswith("bloom") else {"mlp", "attn"}
        )
    # the schedule's default: an MLP's units 64 at a time; every MLP it touches keeps a multiple of 64 units
    runs = schedule.mlp_runs(layers, 64)
    assert {run for layer, run in zip(layers, runs, strict=True) if layer.unit_kind == "mlp"} == {64}
    smallest = min(cost * run for cost, run in zip(costs, runs, strict=True))
    assert smallest / total < 0.005
    for share in (0.2, 0.3, 0.4):
        chosen = schedule.choose(scores, costs, closed, share * total, share * total + smallest, runs)
        removed = sum(int(new.sum()) * cost for new, cost in zip(chosen, costs, strict=True)) / total
        assert share <= removed <= share + smallest / total, (share, removed)
        kept = [
            len(new) - int(new.sum()) for layer, new in zip(layers, chosen, strict=True) if layer.unit_kind == "mlp"
        ]
        assert all(width % 64 == 0 for width in kept), kept


def test_fisher_estimate_is_the_squared_gradient_of_each_gate():
    """Σ over micro-batches of (∂L/∂z_u)², checked against autograd on an explicit gate multiplier."""
    model, strategy = unit_gated("llama", lora_r=R)
    model.train()
    down = model.model.layers[1].mlp.down_proj
    o_proj = model.model.layers[1].self_attn.o_proj
    reference = {}
    for module, units, group in ((down, INTER, 1), (o_proj, KV_GROUPS, H // KV_GROUPS)):
        z = torch.ones(units, requires_grad=True)
        module.register_forward_pre_hook(lambda m, args, z=z, g=group: (args[0] * z.repeat_interleave(g),))
        reference[module] = (z, [])
    for seed in (1, 2):
        loss = model(**labelled(sample_batch(seed=seed))).loss
        loss.backward()
        for z, grads in reference.values():
            grads.append(z.grad.clone())
            z.grad = None
    for module, (_, grads) in reference.items():
        expected = sum(g.square() for g in grads)
        fisher = strategy.fishers[module.adapter]
        torch.testing.assert_close(fisher.step_sum, expected, rtol=1e-4, atol=1e-12)
        fisher.fold()
        torch.testing.assert_close(fisher.estimate, (1 - schedule.FISHER_DECAY) * expected, rtol=1e-4, atol=0)


def test_the_least_important_units_close_first():
    """Units whose input is always 0 carry no information (Fisher 0): the schedule closes them before any other."""
    model, strategy = unit_gated("llama", lora_r=0, distill=0.0)
    dead = torch.arange(INTER) < 12
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[dead] = 0  # act(gate) * 0: these units output exactly 0
    batch = labelled(sample_batch(batch=4, seq=12))
    metrics = train(model, strategy, steps=3, batch=batch, total=3)  # ramp from step 0.3 to 1.8: the target at step 2
    assert metrics["gates/removed"] == pytest.approx(0.3, abs=0.02)
    for layer in model.model.layers:
        assert layer.mlp.down_proj.adapter.closed_units()[dead].all()  # the dead ones went first


# ------------------------------------------------------------------------------------------------ closing, distillation


def test_closing_goes_through_the_optimizer_in_one_bf16_step_even_at_the_tail_of_the_schedule():
    """A unit is closed from the forward after its choice, and its θ (a bf16 parameter, no fp32 master here) leaves 1
    in that step's update even at 1 % of the learning rate; open units keep θ exactly 1, however long the run."""
    model, strategy = unit_gated("llama", torch.bfloat16, lora_r=R, distill=0.0)
    down = layers_by_name(model)["model.layers.0.mlp.down_proj"]
    optimizer = torch.optim.AdamW(strategy.param_groups(model, 1e-3))
    for group in optimizer.param_groups:
        group["lr"] *= 0.01  # the last steps of a linear decay
    batch = labelled(sample_batch())
    model.train()
    for step in range(3):
        strategy.step_begin(model, 0, 10**6)  # before the ramp: no choice of its own
        if step == 1:
            down.close(torch.arange(INTER) < 5)
            assert down.eval_gates()[1][:5].eq(0).all() and down.eval_gates()[1][5:].eq(1).all()  # closed at once
        model(**batch).loss.add(strategy.regularizer(model, step)[0]).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 1:
            assert bool((down.theta_cols[:5] < 1).all())
        assert torch.equal(down.theta_cols[5:], torch.ones(INTER - 5, dtype=torch.bfloat16))
    down.closing = None  # what a reload sees: θ alone
    assert torch.equal(down.closed_units(), torch.arange(INTER) < 5)


def test_distillation_is_zero_at_step_zero_and_its_teacher_is_the_dense_model():
    model, strategy = unit_gated("llama", lora_r=R, distill=1.0)
    batch = labelled(sample_batch(batch=3, seq=10))
    forward = forward_targets(model.train(), batch)
    with torch.no_grad(), schedule.opened(unit_layers(model)):
        dense = forward_targets(model, batch).logits
    assert torch.equal(forward.logits, dense)
    assert schedule.kl_sum(forward.logits, dense).item() == 0.0  # student == teacher
    strategy.step_begin(model, 0, 10)
    assert strategy.batch_loss(model, forward.inputs, forward.keep, forward.logits, 0)["gates/distill"].item() == 0.0

    for adapter in unit_layers(model):
        with torch.no_grad():
            adapter.lora_B.normal_()
        adapter.close(torch.arange(adapter.theta_cols.numel()) % 2 == 0)
    reference = make_model("llama")  # the teacher: the base with the same LoRA, every unit open
    inject_adapters(reference, GatesConfig(lora_r=R))
    reference.load_state_dict(model.state_dict())
    forward = forward_targets(model, batch)
    distill = strategy.batch_loss(model, forward.inputs, forward.keep, forward.logits, 1)["gates/distill"]
    teacher = forward_targets(reference.eval(), batch).logits
    assert distill.item() > 0
    torch.testing.assert_close(distill, schedule.kl_sum(forward.logits, teacher), rtol=1e-5, atol=1e-6)
    distill.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora" in n)
    assert all(g is None or not g.any() for n, g in grads.items() if "theta" in n)  # gates move on the schedule only


# ------------------------------------------------------------------------------------------------ a short run


@pytest.mark.parametrize("family", FAMILIES)
def test_short_run_with_default_settings_reaches_the_target_and_exports_the_gated_model(family, tmp_path):
    model, strategy = unit_gated(family)  # every setting a default: target 0.3, LoRA r 32, no distillation
    batch = labelled(sample_batch(batch=4, seq=12))
    metrics = train(model, strategy, steps=20, batch=batch)
    metrics_end = strategy.step_begin(model, 20, 20)
    assert metrics_end["gates/target"] == 0.3 and metrics["gates/removed"] == metrics_end["gates/removed"]
    for adapter in unit_layers(model):  # every choice has landed in θ: 1 open, below 1 closed, nothing else
        assert torch.equal(adapter.closed_units(), adapter.theta_cols < 1)
        assert set(adapter.eval_gates()[1].unique().tolist()) <= {0.0, 1.0}
    model.eval()
    expected = logits(model, batch)
    save_adapter(model, strategy.config, tmp_path)
    reloaded = make_model(family)
    load_adapter(reloaded, tmp_path)
    torch.testing.assert_close(logits(reloaded.eval(), batch), expected, atol=0, rtol=0)
    record = prune_model(reloaded)
    removed = record["parameters"]["blocks_removed_fraction"]
    assert removed == pytest.approx(metrics_end["gates/removed"], abs=1e-9)  # what the schedule counts is removed
    assert abs(removed - 0.3) <= 0.02
    torch.testing.assert_close(logits(reloaded, batch), expected, atol=1e-4, rtol=0)


def test_mlp_units_close_in_runs_so_the_export_pads_nothing(tmp_path):
    """`width_multiple` 4 on the tiny llama (MLP width 48): every MLP keeps a multiple of 4 units, the run ends on
    target (within its smallest run), and the export rounding to 4 keeps no closed unit (what the schedule counts
    is removed)."""
    model, strategy = unit_gated("llama", lora_r=R, width_multiple=4)
    train(model, strategy, steps=12, batch=labelled(sample_batch(batch=4, seq=12)))
    metrics = strategy.step_begin(model, 12, 12)
    layers = unit_layers(model)
    widths = [int((~a.closed_units()).sum()) for a in layers if a.unit_kind == "mlp"]
    assert all(width % 4 == 0 for width in widths) and min(widths) < INTER, widths
    total = schedule.block_parameters(model, {id(p) for p in adapter_parameters(model).values()})
    smallest = min(a.unit_cost * run for a, run in zip(layers, schedule.mlp_runs(layers, 4), strict=True))
    assert 0.3 <= metrics["gates/removed"] <= 0.3 + smallest / total
    save_adapter(model, strategy.config, tmp_path)
    reloaded = make_model("llama")
    load_adapter(reloaded, tmp_path)
    parameters = prune_model(reloaded.eval(), width_multiple=4)["parameters"]
    assert parameters["width_padding_units"] == 0
    assert parameters["blocks_removed_fraction"] == pytest.approx(metrics["gates/removed"], abs=1e-9)
    with pytest.raises(InputError, match="width_multiple"):
        GatesConfig(width_multiple=0)


def test_random_importance_is_the_same_draw_for_the_same_step():
    closed = []
    for _ in range(2):
        model, strategy = unit_gated("llama", lora_r=0, distill=0.0, importance="random")
        train(model, strategy, steps=4, batch=labelled(sample_batch()), total=4)
        closed.append([a.closed_units() for a in unit_layers(model)])
    assert all(torch.equal(a, b) for a, b in zip(*closed, strict=True)) and any(c.any() for c in closed[0])
