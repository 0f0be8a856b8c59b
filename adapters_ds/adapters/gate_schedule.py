"""Pruning by unit gates (`--adapter gates`): one gate per unit that `export --prune` removes,
closed on a schedule in the order of the task's importance estimates, so that a run ends exactly at its target.

Units. A unit is what the export cuts out as a whole: an MLP intermediate unit (its rows in the MLP's producers, its
column in the consumer) and an attention KV group (its query heads' rows, its key and value rows, the output
projection's columns; one head where every head has its own keys and values; BLOOM keeps its heads, see
`export.pruned`). The gate sits on the consumer's input (down_proj, o_proj): z_u is 1 (open) or 0 (closed), nothing
in between, so the gated model in evaluation mode *is* the pruned export at every step. A unit's cost is the number
of block parameters the export removes with it, so the share the schedule controls is the export's
`blocks_removed_fraction_unpadded` (one unit more at most: an MLP unit is a few thousand parameters, a KV group
more). An MLP's units close 64 at a time (`width_multiple`, `mlp_runs`): the least important 64 of its open units,
scored by their mean, so its kept width stays a multiple of the kernels' tile and the export's rounding (which keeps
closed units to reach one) keeps none: what the export removes is the share the schedule reached.

Schedule (gradual pruning, Zhu & Gupta 2017, arXiv 1710.01878): the share of block parameters removed is 0 for the
first `start` of the run, while the LoRA inside the gates learns the task with every unit open; then
s(t) = S · (1 − (1 − (t − t0) / (t1 − t0))³), fast while many units are redundant and slower as the model thins, until
`end`; S after it, a recovery phase in which the LoRA adapts to the final units. Before each step of the ramp the
least important open units close until the removed share reaches s(t). Every block keeps one unit of each kind.

Importance: the empirical Fisher information of each gate, the mean over micro-batches of (∂L/∂z_u)², with
∂L/∂z_u = Σ over tokens and the unit's columns of x'·∂L/∂x' (Molchanov et al. 2019, arXiv 1906.10771), taken from the
training loss's own backward (task loss plus distillation); an exponential moving average over steps keeps it
current as the model changes. Divided by the unit's cost it estimates the loss added per parameter removed. The
estimates are summed over ranks before each choice, so that every rank closes the same units.

Closing through the optimizer: a gate's state is its parameter θ (1: open; below 1: closed), so ZeRO's partitions
and fp32 master copies, engine checkpoints and the adapter file hold it as any other trained tensor. z is a step
function of θ, so θ gets no task gradient; a closed unit's θ gets a constant gradient from a loss term whose value
is 0 (c · (θ − θ.detach())), which moves it below 1 in the step it is chosen and further down after (the gates'
learning rate is `UNIT_GATE_LR`, so that even a step at the tail of a decaying schedule, rounded to bf16, leaves 1),
and an open unit's gradient is exactly 0, so without weight decay (their own optimizer group) its θ stays exactly 1.
Until the update lands, the layer remembers the choice (`Gates.closing`), so the unit is closed from the next
forward on.

Distillation (CoFi, Xia et al. 2022, arXiv 2204.00408), off by default (`distill` 0): a dense model is the
teacher, run once more per micro-batch without gradient; the loss adds `distill` · KL(teacher ‖ student) per target
token. With `teacher` (`--gate_teacher ADAPTER_DIR`) it is CoFi's fine-tuned dense model: the frozen base with a LoRA
adapter trained first, every gate open, the LoRA inside the gates left out (`gate_teacher`: the teacher's LoRA pair
sits in the gated layers, so no second copy of the base), from the first step on. Without it, it is the same model
with every gate open (the frozen base and the same LoRA: no weights beyond the student's); while no unit is closed
the two are the same model, so that teacher's forward is skipped and the term is exactly 0. Why off by default: that
self-teacher is no fine-tuned dense model but the dense base with the LoRA the *pruned* model is learning, so the term
pulls the student towards a model nobody trains for the task (`bench/prune_speed.py` measures runs with and without
it, and with `--teacher_from_lora` the fine-tuned teacher; the README reports what it found).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapters_ds.adapters.base import adapter_layers, adapter_parameters
from adapters_ds.distributed import broadcast_tensor, group_sum
from adapters_ds.errors import InputError
from adapters_ds.families import layout_of, linear_dims
from adapters_ds.pruned_model import geometry
from adapters_ds.zero import full_numel, gathered

PUSH = 1e-4  # gradient on a closed gate's θ: far above Adam's eps (1e-8), far below anything gradient clipping sees
UNIT_GATE_LR = 1.0  # θ leaves 1 by far more than a bf16 step near 1 (2^-8), even at the end of a decaying schedule
FISHER_DECAY = 0.9  # per step: the importance estimate averages over the last ~10 steps
RUN_MIN_MULTIPLES = 8  # an MLP closes `width_multiple` units at a time only where it is this many multiples wide
MIN_FISHER_STEPS = 2  # steps of estimates needed before a choice (also after a resume, which starts them afresh)


def unit_layers(model: nn.Module) -> list[Any]:
    """The adapters with unit gates (`--adapter gates`), in module order."""
    layers = [a for _, _, a in adapter_layers(model) if getattr(a, "hard", False) and a.theta_cols is not None]
    if not layers:
        raise InputError("the model has no unit gates: unit gates need the MLP down projection or the attention "
                         "output projection among the targets")  # fmt: skip
    return layers


class Fisher:
    """A unit-gate layer's importance estimate: the moving average over steps of Σ over micro-batches of
    (∂L/∂z_u)², with ∂L/∂z_u = Σ over tokens and the unit's `group` columns of x'·∂L/∂x' (x' the gated input)."""

    def __init__(self, group: int) -> None:
        self.group = group
        self.estimate: torch.Tensor | None = None  # (units,) fp32
        self.steps = 0  # steps folded in
        self.step_sum: torch.Tensor | None = None  # this step's sum over micro-batches

    def record(self, gated: torch.Tensor, grad: torch.Tensor) -> None:
        """A backward hook on x': add this micro-batch's (∂L/∂z_u)²."""
        per_column = (gated.float() * grad.float()).reshape(-1, gated.shape[-1]).sum(0)  # (in,)
        squared = per_column.view(-1, self.group).sum(1).square()  # (units,)
        self.step_sum = squared if self.step_sum is None else self.step_sum + squared

    def fold(self) -> None:
        """Fold the last step's sum into the moving average (`FISHER_DECAY` per step)."""
        if self.step_sum is None:
            return
        decayed = 0 if self.estimate is None else FISHER_DECAY * self.estimate
        self.estimate = decayed + (1 - FISHER_DECAY) * self.step_sum
        self.step_sum = None
        self.steps += 1


def scheduled_sparsity(step: int, total_steps: int, target: float, start: float, end: float) -> float:
    """s(t): the share of block parameters removed before optimizer step `step` (0-based) of `total_steps`."""
    t0, t1 = start * total_steps, end * total_steps
    if step < t0:
        return 0.0
    if step >= t1 or t1 <= t0:
        return target
    return target * (1.0 - (1.0 - (step - t0) / (t1 - t0)) ** 3)


def unit_options(model: nn.Module, name: str) -> dict[str, Any]:
    """The unit gate of the layer at module path `name`: {"gate_cols", "col_group", "unit_cost",
    "unit_kind"}, with gate_cols False where the layer's input is no prunable unit (producers, q/k/v: LoRA only)."""
    layout = layout_of(model.config.model_type)
    prefix, _, rest = name.partition(layout.blocks + ".")
    index, _, rel = rest.partition(".")
    if prefix or not index.isdigit() or rel not in (layout.mlp_out, layout.o):
        return {"gate_rows": False, "gate_cols": False}
    block = model.get_submodule(f"{layout.blocks}.{index}")
    if rel == layout.mlp_out:
        cost = _rows_cost(block, layout.mlp_in, 1) + linear_dims(rel, block.get_submodule(rel)).out_features
        return {"gate_rows": False, "gate_cols": True, "col_group": 1, "unit_cost": cost, "unit_kind": "mlp"}
    if layout.patch is None:  # the export keeps every head of this family
        return {"gate_rows": False, "gate_cols": False}
    geo = geometry(model.config, block, layout)
    o_out = linear_dims(layout.o, block.get_submodule(layout.o)).out_features
    if layout.q is not None:  # a KV group: rep query heads, one key and one value head
        cost = _rows_cost(block, (layout.q,), geo.rep * geo.head_dim)
        cost += _rows_cost(block, (layout.k, layout.v), geo.head_dim)
    else:  # fused q/k/v, one KV head per query head: 3 × head_dim rows
        cost = _rows_cost(block, (layout.qkv,), 3 * geo.head_dim)
    group = geo.rep * geo.head_dim
    return {"gate_rows": False, "gate_cols": True, "col_group": group, "unit_cost": cost + group * o_out,
            "unit_kind": "attn"}  # fmt: skip


def _rows_cost(block: nn.Module, paths: Sequence[str], rows: int) -> int:
    """Parameters in `rows` output rows of each module at `paths` (weights and biases)."""
    total = 0
    for path in paths:
        module = block.get_submodule(path)
        total += rows * (linear_dims(path, module).in_features + (getattr(module, "bias", None) is not None))
    return total


def block_parameters(model: nn.Module, exclude: set[int]) -> int:
    """Parameters of the transformer blocks, adapter tensors (`exclude`, by id) left out: the export's
    `blocks_base`."""
    blocks = model.get_submodule(layout_of(model.config.model_type).blocks)
    return sum(full_numel(p) for p in blocks.parameters() if id(p) not in exclude)


def close_on_schedule(
    model: nn.Module,
    layers: list[Any],
    fishers: list[Fisher],
    target: float,
    final: float,
    importance: str,
    seed: int,
    width_multiple: int = 1,
) -> dict[str, float]:
    """Close open units of the unit-gate `layers` (`fishers`: their importance estimates) until the share of block
    parameters removed reaches `target` (not above `final`, the run's target; least important first; `importance`
    "random": in an order drawn from `seed`), an MLP's units `width_multiple` at a time (`mlp_runs`). Call on every
    rank at the same step: the estimates are summed over ranks. Returns gates/target, gates/removed (the share the
    export would remove now) and gates/closed_units/{mlp,attn} (shares of the units)."""
    with gathered([layer.theta_cols for layer in layers]):
        closed = [layer.closed_units().cpu() for layer in layers]
    for fisher in fishers:
        fisher.fold()
    total = block_parameters(model, {id(p) for p in adapter_parameters(model).values()})
    costs = [layer.unit_cost for layer in layers]
    runs = mlp_runs(layers, width_multiple)
    removed = sum(int(shut.sum()) * cost for shut, cost in zip(closed, costs, strict=True))
    need = target * total - removed
    # a large unit (a KV group, an MLP run) may overshoot a step of the ramp, not the final share by more than the
    # smallest of them
    limit = final * total - removed + min(cost * run for cost, run in zip(costs, runs, strict=True))
    if need > 0 and all(fisher.steps >= MIN_FISHER_STEPS for fisher in fishers):
        if importance == "random":  # the same draw on every rank
            generator = torch.Generator().manual_seed(seed)
            scores = [torch.rand(len(shut), generator=generator) for shut in closed]
        else:  # Fisher per parameter removed
            flat = all_reduce_sum(torch.cat([fisher.estimate for fisher in fishers])).cpu()
            scores = [s / cost for s, cost in zip(flat.split([len(s) for s in closed]), costs, strict=True)]
        for layer, shut, new in zip(layers, closed, choose(scores, costs, closed, need, limit, runs), strict=True):
            layer.close(new)
            shut |= new
    removed = sum(int(shut.sum()) * cost for shut, cost in zip(closed, costs, strict=True))
    metrics = {"gates/target": target, "gates/removed": removed / total}
    for layer, shut in zip(layers, closed, strict=True):
        layer.any_closed = bool(shut.any())
    for kind in ("mlp", "attn"):
        shuts = [shut for layer, shut in zip(layers, closed, strict=True) if layer.unit_kind == kind]
        if shuts:
            metrics[f"gates/closed_units/{kind}"] = sum(int(s.sum()) for s in shuts) / sum(map(len, shuts))
    return metrics


def run_size(kind: str, units: int, multiple: int) -> int:
    """How many units of a layer of `units` units of `kind` ("mlp", "attn") close together: `multiple` in an MLP at
    least `RUN_MIN_MULTIPLES` multiples wide, so that its kept width stays a multiple of it (the matmul kernels'
    tile: `export.pruned`'s rounding then keeps no closed unit); 1 in a narrower MLP (the coarser choice would cost
    more than the kernels gain: test-sized models) and in attention, whose KV groups are whole heads already."""
    return multiple if kind == "mlp" and units >= RUN_MIN_MULTIPLES * multiple else 1


def mlp_runs(layers: Sequence[Any], multiple: int) -> list[int]:
    """`run_size` of each unit-gate layer."""
    return [run_size(layer.unit_kind, full_numel(layer.theta_cols), multiple) for layer in layers]


def choose(
    scores: list[torch.Tensor],
    costs: list[int],
    closed: list[torch.Tensor],
    need: float,
    limit: float,
    runs: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Close open units in increasing order of score until their costs add up to `need` parameters, passing over a
    unit that would take the sum above `limit` and keeping at least one open unit in each layer. Returns the newly
    closed units of each layer (bool). Ties go to the lower layer and unit index (a stable sort), so equal inputs
    give equal choices on every rank.

    `runs` (default 1 each): how many units of each layer close together. A layer's open units, in increasing order
    of score, are cut into runs of that many (the first run takes the remainder, so that after it the open count is
    a multiple); a run is scored by its units' mean score, costs their sum and closes as a whole, and the layer keeps
    its last run. So with runs of 64 every MLP keeps a multiple of 64 units (`close_on_schedule`).

    Vectorised (a 70B model has millions of units): a layer's last run in that order is never reached, so it is
    left out up front; every run before the one whose running sum reaches `need` is taken (those sums stay below
    `need`, so below `limit`), and only where that run would pass `limit` do the cheaper runs after it fill in."""
    chosen = [torch.zeros_like(shut) for shut in closed]
    if need <= 0:
        return chosen
    keys, owners, run_costs, members = [], [], [], {}
    for i, (score, shut, size) in enumerate(zip(scores, closed, runs or [1] * len(closed), strict=True)):
        open_units = (~shut).nonzero().flatten()
        key = score.float()[open_units]
        order = torch.argsort(key, stable=True)  # the highest score (of ties, the last) ends the last run
        run_of = (torch.arange(len(order)) + (size - len(order) % size) % size) // size
        n_runs = int(run_of[-1]) + 1 if len(order) else 0
        if n_runs < 2:
            continue
        sums = torch.zeros(n_runs, dtype=key.dtype).index_add_(0, run_of, key[order])
        units = torch.bincount(run_of, minlength=n_runs)
        keys.append((sums / units)[:-1])
        owners.append(torch.stack([torch.full((n_runs - 1,), i), torch.arange(n_runs - 1)], dim=1))
        run_costs.append(units[:-1].to(torch.float64) * costs[i])
        members[i] = (open_units[order], run_of)
    if not keys:
        return chosen
    order = torch.argsort(torch.cat(keys), stable=True)
    owner, cost = torch.cat(owners)[order], torch.cat(run_costs)[order]
    running = torch.cumsum(cost, 0)
    taken = min(int(torch.searchsorted(running, torch.tensor(float(need), dtype=torch.float64))) + 1, len(running))
    if running[taken - 1] > limit:
        taken -= 1
    removed = float(running[taken - 1]) if taken else 0.0
    picks = [owner[:taken]]
    if removed < need:  # the run reaching `need` passes `limit`: the cheaper ones after it, in order
        fits = cost[taken:] <= limit - removed
        for run, run_cost in zip(owner[taken:][fits].tolist(), cost[taken:][fits].tolist(), strict=True):
            if removed >= need:
                break
            if removed + run_cost <= limit:
                picks.append(torch.tensor([run]))
                removed += run_cost
    picked = torch.cat(picks)
    for i in picked[:, 0].unique().tolist():
        units, run_of = members[i]
        new = units[torch.isin(run_of, picked[picked[:, 0] == i, 1])]
        chosen[i][new.to(chosen[i].device)] = True
    return chosen


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, then rank 0's result to all (bit-identical choices everywhere); unchanged in one process."""
    return broadcast_tensor(group_sum(tensor))


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Σ over positions of KL(teacher ‖ student), in fp32; logits (n, vocab)."""
    student = F.log_softmax(student_logits.float(), dim=-1)
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum")


def distillation(
    model: nn.Module,
    layers: list[Any],
    inputs: dict[str, Any],
    keep: torch.Tensor,
    logits: torch.Tensor,
    teacher: contextlib.AbstractContextManager | None = None,
) -> torch.Tensor:
    """Σ over the target positions of KL(dense ‖ gated): `logits` (n_targets, vocab) are the gated model's from
    its forward of `inputs` (the positions `keep`), the dense ones come from one more forward of `model` without
    gradient, inside `teacher` (the context in which `model` is the teacher: `gate_teacher.teaching`). Without one,
    the self-teacher: every gate of `layers` open, skipped (exactly 0) while no unit is closed, the same on every
    rank."""
    if teacher is None:
        if not any(layer.any_closed for layer in layers):
            return logits.new_zeros((), dtype=torch.float32)
        teacher = opened(layers)
    with torch.no_grad(), teacher:
        teacher = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (n_targets, vocab)
    return kl_sum(logits, teacher)


@contextlib.contextmanager
def opened(layers: Sequence[Any]) -> Iterator[None]:
    """Every unit gate of `layers` open inside the block (the dense teacher)."""
    for layer in layers:
        layer.force_open = True
    try:
        yield
    finally:
        for layer in layers:
            layer.force_open = False
