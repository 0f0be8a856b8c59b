"""Stochastic gates (FineGates; Svirsky, Refael, Lindenbaum, arXiv 2412.12951, section 3): adapt a frozen linear
layer and learn which of its rows and columns can be removed.

    y = z_r ⊙ (W x' + s · B A x' + b),   x' = z_c ⊙ x        (the LoRA term only with lora_r > 0)

z_r (out features) and z_c (in features) are gates in [0, 1]. Two ways to set them (`scope`):

- "units" (the default): one gate per unit that `export --prune` removes (an MLP unit, an attention KV group), on
  the consumer's input, exactly 0 or 1, closed by a schedule that reaches `target_sparsity` (the share of block
  parameters removed) in the order of the task's importance estimates, the LoRA inside the gates recovering the
  task (optionally distilled from the dense model): the recipe is `gate_schedule`'s.
- "all" / "mlp" (the paper's gates): a gate per row and column of every target ("mlp": of the MLP units only),
  mu = tanh(theta); training z = clamp(mu + eps + 0.5, 0, 1) with eps ~ N(0, 0.1²) drawn at every forward,
  evaluation z = clamp(mu + 0.5, 0, 1). theta starts in N(1, 0.1²) truncated to [0.7, 1.3], so mu + 0.5 > 1 for
  *every* gate and the model starts as the base. The penalty pulls the open probability P(z > 0) =
  Φ((mu + 0.5) / 0.5) towards keep = 1 - target_sparsity in every gated layer:
  loss = task + lambda · mean over layers of ½ (|mean P_rows - keep| + |mean P_cols - keep|), for `penalty_steps`
  (0: all). Met by half-open gates that scale units rather than close them, it removes far less than its target
  (kept for comparison with the paper).

The gated input x' is what both W and the LoRA term read, and z_r multiplies their sum and the bias: a closed row
or column stays removable with LoRA inside the gates (the reference code applies LoRA outside them). No bias is
added where the base has none (the reference code adds a random one, which perturbs the frozen model).

Attachment: the column gates change the base layer's *input*, which the additive forward hook cannot express, so
the adapter sets `transforms_input` (a forward pre-hook calls `adapter(x, None)` → z_c ⊙ x) and
`replaces_output` (the forward hook calls `adapter(x', out)` → z_r ⊙ (out + LoRA)); see `adapters/base.py`.

Training: the gates get their own optimizer group (`param_groups`, no weight decay); the trainer calls `step_begin`
before each step (the schedule's choices), `batch_loss` after each forward (distillation) and adds `regularizer` to
every micro-batch's loss. TensorBoard: gates/target, gates/removed, gates/closed_units/{mlp,attn}, gates/distill
(units); gates/penalty, gates/open_expected/*, gates/closed_rows/*, gates/closed_cols/* (* = all, attn, mlp; paper).
Under ZeRO-3 the gates stay replicated, but DeepSpeed still releases them after use in its first (tracing) step, so
each training-mode forward records the loss terms' inputs while the gates are gathered.

`adapters_ds.export.pruned` turns a trained gates adapter into a physically smaller plain `transformers` model.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import nn

from adapters_ds.adapters import gate_schedule as schedule
from adapters_ds.adapters.base import Adapter, AdapterConfig, adapter_layers, check_range, option
from adapters_ds.adapters.lora import add_lora_parameters, lora_delta, lora_update
from adapters_ds.adapters.registry import register
from adapters_ds.errors import InputError
from adapters_ds.families import LinearDims, layout_of
from adapters_ds.zero import full_numel

NOISE_STD = 0.1  # sigma of the training noise eps
REG_STD = 0.5  # sigma_reg of the open probability Φ((mu + 0.5) / sigma_reg)
INIT_MEAN, INIT_STD = 1.0, 0.1
INIT_LOW, INIT_HIGH = 0.7, 1.3  # 3 sigma: tanh(0.7) = 0.60 > 0.5, so every gate starts at exactly 1
Scope = Literal["units", "all", "mlp"]


@dataclass
class GatesConfig(AdapterConfig):
    """Stochastic-gates hyperparameters. The defaults are the unit-gates recipe (`gate_schedule`); lambda, the
    penalty steps and the gate noise belong to the paper's gates (scope all / mlp, lambda 50 there)."""

    method: ClassVar[str] = "gates"

    target_roles = ("q", "k", "v", "o", "mlp_gate", "mlp_up", "mlp_down")

    target_sparsity: float = option(
        0.3,
        "stochastic gates: share of the block parameters removed at the end (scope units; scope all/mlp: of each "
        "layer's rows/columns to close)",
        flag="gate_target_sparsity",
    )
    sparsity_lambda: float = option(
        50.0, "stochastic gates: weight of the sparsity penalty in the loss (scope all/mlp)", flag="gate_lambda"
    )
    gate_lr: float = option(
        1e-2,
        "stochastic gates: learning rate of the gates (the paper uses 1e-3 to 1e-2; LoRA inside them uses "
        "--learning_rate; scope units: unused, the schedule closes the units)",
        flag="gate_lr",
    )
    lora_r: int = option(32, "stochastic gates: rank of LoRA inside the gates (0: gates only)", flag="gate_lora_r")
    lora_alpha: float | None = option(
        None, "stochastic gates: the LoRA term is scaled by alpha / r (default 2 · r)", flag="gate_lora_alpha"
    )
    penalty_steps: int = option(
        0,
        "stochastic gates: steps with the sparsity penalty, then task loss only (0: all; scope all/mlp)",
        flag="gate_penalty_steps",
    )
    """After `penalty_steps` the task loss alone trains the gates and the LoRA (a recovery phase, as in
    prune-then-fine-tune): a closed gate gets no gradient through the clamp and stays closed."""
    scope: Scope = option(
        "units",
        "stochastic gates: one 0/1 gate per MLP unit and KV group, closed on a schedule (units); the paper's gates "
        "on the rows and columns of every target (all) or of the MLP units only (mlp)",
        flag="gate_scope",
    )
    ramp: str = option(
        "0.1,0.6",
        "stochastic gates (scope units): fractions of the run where the removed share starts to rise and where it "
        "reaches the target; the rest of the run recovers",
        flag="gate_ramp",
    )
    distill: float = option(
        0.0,
        "stochastic gates (scope units): weight of KL(dense ‖ gated) per target token, the dense model being the "
        "same model with every gate open (0, the default: no distillation, no second forward; on the embedded model "
        "it cost 20 points of accuracy at a removed share of 0.3, see gate_schedule)",
        flag="gate_distill",
    )
    importance: Literal["fisher", "random"] = option(
        "fisher",
        "stochastic gates (scope units): which units close first: the least important by the gates' Fisher "
        "information (fisher), or random ones (random: a floor for comparison)",
        flag="gate_importance",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("gates target_sparsity", self.target_sparsity, 0, 1)
        check_range("gates sparsity_lambda", self.sparsity_lambda, 0)
        check_range("gates gate_lr", self.gate_lr, 0, low_inclusive=False)
        if not isinstance(self.lora_r, int) or isinstance(self.lora_r, bool) or self.lora_r < 0:
            raise InputError(f"gates lora_r must be an integer >= 0, found {self.lora_r!r}")
        if self.lora_alpha is not None:
            check_range("gates lora_alpha", self.lora_alpha, 0, low_inclusive=False)
        if not isinstance(self.penalty_steps, int) or isinstance(self.penalty_steps, bool) or self.penalty_steps < 0:
            raise InputError(f"gates penalty_steps must be an integer >= 0, found {self.penalty_steps!r}")
        if self.scope not in ("units", "all", "mlp"):
            raise InputError(f"gates scope must be 'units', 'all' or 'mlp', found {self.scope!r}")
        if isinstance(self.ramp, (list, tuple)):
            self.ramp = ",".join(str(v) for v in self.ramp)
        try:
            start, end = (float(v) for v in str(self.ramp).split(","))
        except ValueError:
            start = end = -1.0
        if not 0 <= start <= end <= 1:
            raise InputError(f"gates ramp must be 'start,end' with 0 <= start <= end <= 1, found {self.ramp!r}")
        check_range("gates distill", self.distill, 0)
        if self.importance not in ("fisher", "random"):
            raise InputError(f"gates importance must be 'fisher' or 'random', found {self.importance!r}")

    @property
    def keep(self) -> float:
        return 1.0 - self.target_sparsity

    @property
    def ramp_fractions(self) -> tuple[float, float]:
        start, end = (float(v) for v in self.ramp.split(","))
        return start, end

    def layer_options(self, model: nn.Module, name: str) -> dict[str, Any]:
        """Which sides of the layer at `name` are gated: scope "units" the unit gates (`gate_schedule.unit_options`),
        "mlp" only the MLP's intermediate dimension, "all" both sides of every target."""
        if self.scope == "units":
            return schedule.unit_options(model, name)
        if self.scope == "all":
            return {}
        layout = layout_of(model.config.model_type)
        return {
            "gate_rows": any(name.endswith("." + producer) for producer in layout.mlp_in),
            "gate_cols": name.endswith("." + layout.mlp_out),
        }

    def param_groups(self, model: nn.Module, learning_rate: float) -> list[dict[str, Any]]:
        """Every trainable parameter but the gates in a group at the run's learning rate (first, so the logged rate is
        the run's), the gates in their own without weight decay (decay would pull theta to 0, a half-open gate; a unit
        gate's open state must stay exactly 1), at `gate_lr`, or for unit gates at `gate_schedule.UNIT_GATE_LR`."""
        gates = [theta for _, adapter in gate_layers(model) for theta in adapter.thetas()]
        if not gates:
            raise InputError("the model has no stochastic gates (inject a GatesConfig first)")
        gate_ids = {id(p) for p in gates}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
        return [{"params": others, "lr": learning_rate}] * bool(others) + [
            {
                "params": gates,
                "lr": schedule.UNIT_GATE_LR if self.scope == "units" else self.gate_lr,
                "weight_decay": 0.0,
            }
        ]

    def step_begin(self, model: nn.Module, step: int, total_steps: int) -> dict[str, float]:
        """Scope "units": close the units the schedule asks for before step `step` (`gate_schedule.close_on_schedule`:
        every rank must call it at every step); returns gates/target, gates/removed, gates/closed_units/*."""
        if self.scope != "units":
            return {}
        start, end = self.ramp_fractions
        target = schedule.scheduled_sparsity(step, total_steps, self.target_sparsity, start, end)
        return schedule.close_on_schedule(
            model, schedule.unit_layers(model), target, self.target_sparsity, self.importance, seed=step
        )

    def batch_loss(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], keep: torch.Tensor, logits: torch.Tensor, step: int
    ) -> dict[str, torch.Tensor] | None:
        """Scope "units": {"gates/distill": `distill` · KL(dense ‖ gated) summed over the target positions}
        (`gate_schedule.distillation`)."""
        if self.scope != "units" or not self.distill:
            return None
        kl = schedule.distillation(model, schedule.unit_layers(model), inputs, keep, logits)
        return {"gates/distill": self.distill * kl}

    def regularizer(self, model: nn.Module, step: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        """Scope "units": the term that moves closed gates' θ down (value 0, see `gate_schedule`), no scalars.
        Scopes all / mlp: lambda · mean over gated layers of ½ (|mean P_rows - keep| + |mean P_cols - keep|), and the
        scalars to log: the penalty, the expected open fraction and the fraction of rows / columns closed (z = 0 in
        evaluation mode), overall and per layer type (attn, mlp)."""
        layers = gate_layers(model)
        if not layers:
            raise InputError("the model has no stochastic gates (inject a GatesConfig first)")
        if self.scope == "units":
            pushes = [layer._pending.pop("push") for layer in schedule.unit_layers(model) if "push" in layer._pending]
            return (torch.stack(pushes).sum() if pushes else torch.zeros(())), {}
        stats = [(name, adapter.statistics()) for name, adapter in layers if adapter.thetas()]
        terms = [  # ½ (rows + columns) where both sides are gated, the one side's term where one is
            torch.stack([(side.p.mean() - self.keep).abs() for side in sides if side is not None]).mean()
            for _, sides in stats
        ]
        active = not self.penalty_steps or step < self.penalty_steps
        penalty = (self.sparsity_lambda if active else 0.0) * torch.stack(terms).mean()
        metrics = summarize(stats)
        metrics["gates/penalty"] = penalty.item()
        return penalty, metrics


def open_probability(mu: torch.Tensor) -> torch.Tensor:
    """P(z > 0) = Φ((mu + 0.5) / sigma_reg), mu = tanh(theta) in fp32."""
    return 0.5 * (1.0 + torch.erf((mu + 0.5) / (REG_STD * math.sqrt(2.0))))


class GateStats(NamedTuple):
    """One gate vector's open probabilities (differentiable) and which of its units are closed (z = 0 in
    evaluation mode: mu <= -0.5)."""

    p: torch.Tensor  # (n,) fp32
    closed: torch.Tensor  # (n,) bool


def _stats(mu: torch.Tensor) -> GateStats:
    return GateStats(open_probability(mu), (mu + 0.5 <= 0).detach())


def gate_values(theta: torch.Tensor, training: bool) -> torch.Tensor:
    """z of the paper's gates in fp32: noisy in training mode, deterministic in evaluation mode."""
    mu = torch.tanh(theta.float())
    if training:
        mu = mu + torch.randn_like(mu) * NOISE_STD
    return (mu + 0.5).clamp(0.0, 1.0)


class Gates(Adapter):
    transforms_input: ClassVar[bool] = True
    replaces_output: ClassVar[bool] = True

    def __init__(
        self,
        config: GatesConfig,
        dims: LinearDims,
        dtype: torch.dtype,
        device: torch.device,
        gate_rows: bool = True,
        gate_cols: bool = True,
        col_group: int = 1,
        unit_cost: int = 0,
        unit_kind: str = "",
    ) -> None:
        super().__init__()
        self.transposed = dims.transposed
        self.dims = dims
        self.hard = config.scope == "units"  # unit gates: exactly 0 or 1, one per `col_group` columns
        if dims.in_features % col_group:
            raise InputError(f"{col_group} columns per gate do not divide the layer's {dims.in_features} inputs")
        self.col_group, self.unit_cost, self.unit_kind = col_group, unit_cost, unit_kind
        for side, size, gated in (
            ("rows", dims.out_features, gate_rows and not self.hard),
            ("cols", dims.in_features // col_group, gate_cols),
        ):
            theta = None  # an ungated side is z = 1: no parameter, no multiply
            if gated:
                theta = nn.Parameter(torch.empty(size, dtype=dtype, device=device))
                if self.hard:
                    nn.init.ones_(theta)  # open: exactly 1 (see gate_schedule, "closing through the optimizer")
                else:
                    nn.init.trunc_normal_(theta, INIT_MEAN, INIT_STD, INIT_LOW, INIT_HIGH)
            self.register_parameter(f"theta_{side}", theta)
        self._pending: dict[str, Any] = {}  # from the latest training forward, until the loss terms take it
        self.force_open = False  # unit gates: all open (the dense teacher)
        self.closing: torch.Tensor | None = None  # unit gates chosen to close, until their θ has dropped below 1
        self.any_closed = False  # unit gates: whether any is closed, as of `step_begin` or the latest `close`
        self.fisher = schedule.Fisher(col_group)  # unit gates: the importance estimate (statistics, not saved)
        self.lora_r = config.lora_r
        if self.lora_r:
            self.scaling = (config.lora_alpha if config.lora_alpha is not None else 2.0 * self.lora_r) / self.lora_r
            add_lora_parameters(self, self.lora_r, dims, dtype, device)

    def gated_sides(self) -> list[str]:
        """ "rows" and / or "cols": the sides of this layer that have gates."""
        return [side for side in ("rows", "cols") if getattr(self, f"theta_{side}") is not None]

    def thetas(self) -> list[nn.Parameter]:
        """The gate parameters this layer has (rows first)."""
        return [getattr(self, f"theta_{side}") for side in self.gated_sides()]

    def trainable_names(self) -> tuple[str, ...]:
        names = tuple(f"theta_{side}" for side in self.gated_sides())
        return (*names, "lora_A", "lora_B") if self.lora_r else names

    def forward(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        if out is None:  # before the base layer: x' = z_c ⊙ x, (..., in)
            if self.theta_cols is None:
                return x
            gated = x * self._gate("cols").to(x.dtype)
            if self.hard and self.training and torch.is_grad_enabled():
                if not gated.requires_grad:  # nothing trainable upstream (no LoRA): the estimate needs this gradient
                    gated = gated.detach().requires_grad_(True)
                gated.register_hook(partial(self.fisher.record, gated.detach()))
            return gated
        if self.lora_r:  # x is already x' here: (..., in) → (..., r) → (..., out)
            out = out + lora_update(x, self.lora_A, self.lora_B, self.scaling).to(out.dtype)
        return out if self.theta_rows is None else out * self._gate("rows").to(out.dtype)

    def _gate(self, side: str) -> torch.Tensor:
        theta = getattr(self, f"theta_{side}")
        if self.hard:
            if self.force_open:
                return torch.ones(self.dims.in_features, device=theta.device)
            shut = self.closed_units()
            if self.training and torch.is_grad_enabled():  # d(push)/dθ = PUSH on closed units, exactly 0 on open
                self._pending["push"] = schedule.PUSH * (shut * (theta.float() - theta.detach().float())).sum()
            return (~shut).float().repeat_interleave(self.col_group)
        if self.training and torch.is_grad_enabled():
            # The penalty's inputs, taken here because this is where ZeRO-3 guarantees the gates are gathered
            # (in the first step and after a trace change it releases even persistent parameters after use).
            self._pending[side] = _stats(torch.tanh(theta.float()))
        return gate_values(theta, self.training)

    def closed_units(self) -> torch.Tensor:
        """Unit gates: which units are closed (bool, (units,)): θ below 1, or chosen and not yet moved."""
        shut = self.theta_cols.detach() < 1
        return shut if self.closing is None else shut | self.closing.to(shut.device)

    def close(self, units: torch.Tensor) -> None:
        """Unit gates: close `units` (bool) from the next forward on; the optimizer moves their θ below 1."""
        self.closing = units.clone() if self.closing is None else self.closing | units.to(self.closing.device)
        self.any_closed = self.any_closed or bool(units.any())

    def statistics(self) -> tuple[GateStats | None, GateStats | None]:
        """(rows, columns) of the paper's gates, None for an ungated side: those of the latest training forward
        (each handed out once), else computed now."""
        sides = self.gated_sides()
        if set(sides) <= self._pending.keys():
            taken = {side: self._pending.pop(side) for side in sides}
            return taken.get("rows"), taken.get("cols")
        self._pending.clear()
        for theta in self.thetas():
            if theta.numel() != full_numel(theta):
                raise RuntimeError(
                    "the gates are ZeRO-3 partitions here: compute the penalty right after a training-mode forward"
                )
        rows, cols = (None if t is None else _stats(torch.tanh(t.float())) for t in (self.theta_rows, self.theta_cols))
        return rows, cols

    @torch.no_grad()
    def eval_gates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_r, z_c) of evaluation mode, fp32, one value per row and column (ones on an ungated side)."""
        device = next((p.device for p in self.parameters()), None)
        rows = torch.ones(self.dims.out_features, device=device)
        if self.theta_rows is not None:
            rows = gate_values(self.theta_rows, False)
        cols = torch.ones(self.dims.in_features, device=device)
        if self.hard and self.theta_cols is not None:
            cols = (~self.closed_units()).float().repeat_interleave(self.col_group)
        elif self.theta_cols is not None:
            cols = gate_values(self.theta_cols, False)
        return rows, cols

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor | None:
        """s · B A in fp32, laid out (out, in) whatever the base layout; None without LoRA."""
        return lora_delta(self.lora_A, self.lora_B, self.scaling) if self.lora_r else None

    def merge(self, base: nn.Module) -> None:
        raise InputError(
            "stochastic gates are not merged into the base; `export --prune` folds them into a smaller model"
        )

    unmerge = merge


def layer_type(name: str) -> str:
    """attn or mlp for a module inside a transformer block, other elsewhere (an LM head, if one targets it)."""
    parts = name.split(".")
    if any("attn" in p or "attention" in p for p in parts):
        return "attn"
    return "mlp" if any(p.isdigit() for p in parts) else "other"


def gate_layers(model: nn.Module) -> list[tuple[str, Gates]]:
    return [(name, adapter) for name, _, adapter in adapter_layers(model) if isinstance(adapter, Gates)]


@torch.no_grad()
def summarize(stats: list[tuple[str, tuple[GateStats | None, GateStats | None]]]) -> dict[str, float]:
    """Expected open fraction and closed row / column fractions, overall ("all") and per layer type."""
    sums: dict[str, torch.Tensor] = {}  # kind → (sum of P, closed rows, closed columns), on the gates' device
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # kind → (rows, columns)
    for name, (rows, cols) in stats:
        p_sum = sum(side.p.sum() for side in (rows, cols) if side is not None)
        closed = [p_sum.new_zeros(()) if side is None else side.closed.sum().float() for side in (rows, cols)]
        values = torch.stack([p_sum, *closed])
        for kind in ("all", layer_type(name)):
            sums[kind] = sums[kind] + values if kind in sums else values
            counts[kind][0] += rows.p.numel() if rows is not None else 0
            counts[kind][1] += cols.p.numel() if cols is not None else 0
    kinds = list(sums)
    totals = torch.stack([sums[k] for k in kinds]).tolist()  # one device → host copy
    metrics = {}
    for kind, (p_sum, closed_rows, closed_cols) in zip(kinds, totals, strict=True):
        n_rows, n_cols = counts[kind]
        metrics[f"gates/open_expected/{kind}"] = p_sum / (n_rows + n_cols)
        if n_rows:  # scope "mlp": the consumer has only columns, the producers only rows
            metrics[f"gates/closed_rows/{kind}"] = closed_rows / n_rows
        if n_cols:
            metrics[f"gates/closed_cols/{kind}"] = closed_cols / n_cols
    return metrics


register(GatesConfig, Gates)
