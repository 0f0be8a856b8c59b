"""Unit gates (`--adapter gates`), after FineGates' stochastic gates (Svirsky, Refael, Lindenbaum, arXiv 2412.12951,
section 3): adapt a frozen linear layer with LoRA inside gates and prune it to a target share of its parameters.

    y = z_r ⊙ (W x' + s · B A x' + b),   x' = z_c ⊙ x        (the LoRA term only with lora_r > 0)

z_r (out features) and z_c (in features) are gates in [0, 1]; this module holds what every gated layer shares
(`GatedLinear`: the LoRA inside the gates, the fold into the base weights, tensor-parallel evaluation) and the unit
gates: one gate per unit that `export --prune` removes (an MLP unit, an attention KV group), on the consumer's input,
exactly 0 or 1, closed by a schedule that reaches `target_sparsity` (the share of block parameters removed) in the
order of the task's importance estimates, the LoRA inside the gates recovering the task (optionally distilled from
a dense teacher: a fine-tuned LoRA adapter, `gate_teacher`, or the same model with every gate open): the recipe is
`gate_schedule`'s. The paper's own gates (a noisy gate per row and column and a sparsity penalty) are a method of
their own, `gates_paper`.

The gated input x' is what both W and the LoRA term read, and z_r multiplies their sum and the bias: a closed row
or column stays removable with LoRA inside the gates (the reference code applies LoRA outside them). No bias is
added where the base has none (the reference code adds a random one, which perturbs the frozen model).

Attachment: the column gates change the base layer's *input*, which the additive forward hook cannot express, so
the adapter sets `transforms_input` (a forward pre-hook calls `adapter(x, None)` → z_c ⊙ x) and
`replaces_output` (the forward hook calls `adapter(x', out)` → z_r ⊙ (out + LoRA)); see `adapters/base.py`.

Training (`GatesStrategy`): `prepare` loads the `--gate_teacher` adapter into the gated layers (`gate_teacher`); the
gates get their own optimizer group (no weight decay); `step_begin` makes the schedule's choices, `batch_loss` the
distillation term, `regularizer` the term that moves closed gates' θ. What a forward leaves for the loss terms (that
term's inputs, the importance estimates) is recorded by the strategy's own forward hooks on the gate layers,
registered before `deepspeed.initialize`, so they run while ZeRO-3 still holds the gates gathered (in its first,
tracing step it releases even persistent parameters after use). TensorBoard: gates/target, gates/removed,
gates/closed_units/{mlp,attn}, gates/distill.

`adapters_ds.export.pruned` turns a trained gates adapter into a physically smaller plain `transformers` model. The
schedule closes an MLP's units 64 at a time (`--gate_width_multiple`), so each kept width is a multiple of 64 for the
matmul kernels; the export's rounding (`--prune_width_multiple`) covers adapters trained unit by unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from adapters_ds.adapters import gate_schedule as schedule
from adapters_ds.adapters import gate_teacher
from adapters_ds.adapters.base import Adapter, AdapterConfig, Strategy, adapter_layers, check_range, option
from adapters_ds.adapters.lora import add_lora_parameters, lora_delta, lora_update
from adapters_ds.adapters.registry import register
from adapters_ds.errors import InputError
from adapters_ds.families import LinearDims
from adapters_ds.zero import gathered


@dataclass
class GatedConfig(AdapterConfig):
    """What every gates method has: the target share and the LoRA inside the gates (not a method itself)."""

    target_roles = ("q", "k", "v", "o", "mlp_gate", "mlp_up", "mlp_down")

    target_sparsity: float = option(
        0.3,
        "stochastic gates: share of the block parameters removed at the end (gates_paper: of each layer's "
        "rows/columns to close)",
        flag="gate_target_sparsity",
    )
    lora_r: int = option(32, "stochastic gates: rank of LoRA inside the gates (0: gates only)", flag="gate_lora_r")
    lora_alpha: float | None = option(
        None, "stochastic gates: the LoRA term is scaled by alpha / r (default 2 · r)", flag="gate_lora_alpha"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(f"{self.method} target_sparsity", self.target_sparsity, 0, 1)
        if not isinstance(self.lora_r, int) or isinstance(self.lora_r, bool) or self.lora_r < 0:
            raise InputError(f"{self.method} lora_r must be an integer >= 0, found {self.lora_r!r}")
        if self.lora_alpha is not None:
            check_range(f"{self.method} lora_alpha", self.lora_alpha, 0, low_inclusive=False)
            if self.lora_r == 0:  # it would be silently ignored
                raise InputError("--gate_lora_alpha does not apply with --gate_lora_r 0 (no LoRA inside the gates)")

    @property
    def keep(self) -> float:
        return 1.0 - self.target_sparsity


@dataclass
class GatesConfig(GatedConfig):
    """Unit gates: the schedule's settings (`gate_schedule`)."""

    method: ClassVar[str] = "gates"

    ramp: str = option(
        "0.1,0.6",
        "unit gates: fractions of the run where the removed share starts to rise and where it reaches the target; "
        "the rest of the run recovers",
        flag="gate_ramp",
    )
    distill: float = option(
        0.0,
        "unit gates: weight of KL(dense ‖ gated) per target token, the dense model being --gate_teacher's, or without "
        "it the same model with every gate open (0, the default: no distillation, no second forward; see "
        "gate_schedule for why)",
        flag="gate_distill",
    )
    teacher: str | None = option(
        None,
        "unit gates: a LoRA adapter folder (trained first with --adapter lora on the same base) whose model is the "
        "distillation's dense teacher: the frozen base with that LoRA, every gate open, the LoRA inside the gates not "
        "applied; needs --gate_distill > 0 or --gate_warm_start (see gate_teacher)",
        flag="gate_teacher",
    )
    warm_start: bool = option(
        False,
        "unit gates: the LoRA inside the gates starts as --gate_teacher's LoRA (the dense fine-tuned model), so "
        "pruning starts from the model it is to match rather than from the base (see gate_teacher.warm_start)",
        flag="gate_warm_start",
    )
    width_multiple: int = option(
        64,
        "unit gates: an MLP's units close this many at a time, so that its kept width stays a multiple of it (the "
        "matmul kernels' tile; the export then pads nothing); 1: unit by unit (gate_schedule.mlp_runs)",
        flag="gate_width_multiple",
    )
    importance: Literal["fisher", "random"] = option(
        "fisher",
        "unit gates: which units close first: the least important by the gates' Fisher information (fisher), or "
        "random ones (random: a floor for comparison)",
        flag="gate_importance",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.ramp, (list, tuple)):
            self.ramp = ",".join(str(v) for v in self.ramp)
        try:
            start, end = (float(v) for v in str(self.ramp).split(","))
        except ValueError:
            start = end = -1.0
        if not 0 <= start <= end <= 1:
            raise InputError(f"gates ramp must be 'start,end' with 0 <= start <= end <= 1, found {self.ramp!r}")
        check_range("gates distill", self.distill, 0)
        if self.teacher is not None:  # no I/O here: the folder is read by the training strategy (`gate_teacher`)
            if not isinstance(self.teacher, str) or not self.teacher:
                raise InputError(f"gates teacher must be an adapter folder, found {self.teacher!r}")
            if not self.distill and not self.warm_start:  # a weight the curve depends on is given, never implied
                raise InputError(
                    f"gates teacher (--gate_teacher {self.teacher}) is used by distillation (give its weight, distill "
                    "(--gate_distill) > 0, e.g. 1) or by the warm start (--gate_warm_start): give one"
                )
        if self.warm_start:
            if self.teacher is None:
                raise InputError("gates warm_start (--gate_warm_start) starts from --gate_teacher's LoRA: give one")
            if not self.lora_r:
                raise InputError(
                    "gates warm_start (--gate_warm_start) needs the LoRA inside the gates (--gate_lora_r > 0)"
                )
        if not isinstance(self.width_multiple, int) or isinstance(self.width_multiple, bool) or self.width_multiple < 1:
            raise InputError(
                f"gates width_multiple must be an integer >= 1 (1: unit by unit), found {self.width_multiple!r}"
            )
        if self.importance not in ("fisher", "random"):
            raise InputError(f"gates importance must be 'fisher' or 'random', found {self.importance!r}")

    @property
    def ramp_fractions(self) -> tuple[float, float]:
        start, end = (float(v) for v in self.ramp.split(","))
        return start, end

    def layer_options(self, model: nn.Module, name: str) -> dict[str, Any]:
        """The unit gate of the layer at `name` (`gate_schedule.unit_options`)."""
        return schedule.unit_options(model, name)


class GatedLinear(Adapter):
    """A linear layer's gates and the LoRA inside them. Subclasses say what a gate's value is (`gate`) and how θ
    starts (`init_theta`)."""

    transforms_input: ClassVar[bool] = True
    replaces_output: ClassVar[bool] = True
    tensor_parallel: ClassVar[str] = "folded into the base weights before sharding"
    prunable: ClassVar[bool] = True
    hard: ClassVar[bool] = False
    """True: every gate is exactly 0 or 1 (unit gates)."""

    def __init__(
        self,
        config: GatedConfig,
        dims: LinearDims,
        dtype: torch.dtype,
        device: torch.device,
        gate_rows: bool = True,
        gate_cols: bool = True,
        col_group: int = 1,
    ) -> None:
        super().__init__()
        self.transposed = dims.transposed
        self.dims = dims
        if dims.in_features % col_group:
            raise InputError(f"{col_group} columns per gate do not divide the layer's {dims.in_features} inputs")
        self.col_group = col_group
        for side, size, gated in (
            ("rows", dims.out_features, gate_rows),
            ("cols", dims.in_features // col_group, gate_cols),
        ):
            theta = None  # an ungated side is z = 1: no parameter, no multiply
            if gated:
                theta = nn.Parameter(torch.empty(size, dtype=dtype, device=device))
                self.init_theta(theta)
            self.register_parameter(f"theta_{side}", theta)
        self.lora_r = config.lora_r
        if self.lora_r:
            self.scaling = (config.lora_alpha if config.lora_alpha is not None else 2.0 * self.lora_r) / self.lora_r
            add_lora_parameters(self, self.lora_r, dims, dtype, device)

    def init_theta(self, theta: nn.Parameter) -> None:
        raise NotImplementedError

    def gate(self, side: str, training: bool) -> torch.Tensor:
        """z of `side` ("rows" / "cols", a gated side), fp32, one value per row / input column."""
        raise NotImplementedError

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
        training = self.training  # paper gates: noise in training mode, with or without gradients
        if out is None:  # before the base layer: x' = z_c ⊙ x, (..., in)
            return x if self.theta_cols is None else x * self.gate("cols", training).to(x.dtype)
        if self.lora_r:  # x is already x' here: (..., in) → (..., r) → (..., out)
            out = out + lora_update(x, self.lora_A, self.lora_B, self.scaling).to(out.dtype)
        return out if self.theta_rows is None else out * self.gate("rows", training).to(out.dtype)

    @torch.no_grad()
    def eval_gates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_r, z_c) of evaluation mode, fp32, one value per row and column (ones on an ungated side)."""
        device = next((p.device for p in self.parameters()), None)
        rows = torch.ones(self.dims.out_features, device=device)
        cols = torch.ones(self.dims.in_features, device=device)
        if self.theta_rows is not None:
            rows = self.gate("rows", False)
        if self.theta_cols is not None:
            cols = self.gate("cols", False)
        return rows, cols

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor | None:
        """s · B A in fp32, laid out (out, in) whatever the base layout; None without LoRA."""
        return lora_delta(self.lora_A, self.lora_B, self.scaling) if self.lora_r else None

    @torch.no_grad()
    def fold(self, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """In evaluation mode a gate is a fixed scale of one output row or one input column, so
        z_r ⊙ (W (z_c ⊙ x) + s·BA (z_c ⊙ x) + b) = W' x + b' with W' = diag(z_r) (W + s·BA) diag(z_c), b' = z_r ⊙ b,
        computed in fp32 (or the weights' own wider dtype), cast back; on ZeRO-3 partitions too (every rank calls it,
        rank 0's result is kept). Returns (z_r, z_c) on the CPU: zeros are what `export --prune` removes."""
        rows, cols = self.eval_gates()  # (out,), (in,) fp32
        params = [base.weight] if base.bias is None else [base.weight, base.bias]
        with gathered(params, modify=True):
            weight = base.weight.T if self.transposed else base.weight  # (out, in) view: writes reach the weight
            math = torch.promote_types(weight.dtype, torch.float32)
            z_r, z_c = rows.to(weight.device, math), cols.to(weight.device, math)
            folded = weight.to(math)
            if self.lora_r:  # s · B A, (out, in), as precise as the forward computes it
                folded += self.scaling * (self.lora_B.to(weight.device, math) @ self.lora_A.to(weight.device, math))
            weight.copy_((z_r[:, None] * folded * z_c[None, :]).to(weight.dtype))
            if base.bias is not None:
                base.bias.copy_((z_r * base.bias.to(math)).to(base.bias.dtype))
        return rows.cpu(), cols.cpu()

    def before_sharding(self, base: nn.Module) -> str:
        self.fold(base)
        return "folded"

    def merge(self, base: nn.Module) -> None:
        raise InputError(
            "stochastic gates are not merged into the base; `export --prune` folds them into a smaller model"
        )

    unmerge = merge


class Gates(GatedLinear):
    """Unit gates: θ = 1 is open, below 1 closed (see `gate_schedule`, "closing through the optimizer")."""

    hard: ClassVar[bool] = True

    def __init__(
        self,
        config: GatesConfig,
        dims: LinearDims,
        dtype: torch.dtype,
        device: torch.device,
        gate_rows: bool = False,
        gate_cols: bool = True,
        col_group: int = 1,
        unit_cost: int = 0,
        unit_kind: str = "",
    ) -> None:
        super().__init__(config, dims, dtype, device, False, gate_cols, col_group)
        self.unit_cost, self.unit_kind = unit_cost, unit_kind
        self.force_open = False  # all open (the dense teacher, inside `gate_schedule.opened`)
        # the dense fine-tuned teacher (`gate_teacher`): its LoRA pair, frozen, not saved, whole on every rank
        # (buffers: ZeRO-3 partitions parameters only); `teaching` switches the forward to it
        self.register_buffer("teacher_A", None, persistent=False)  # (r_t, in)
        self.register_buffer("teacher_B", None, persistent=False)  # (out, r_t)
        self.teacher_scaling = 0.0
        self.teaching = False
        # units chosen to close, until their θ has dropped below 1 (a buffer: moves with the module, not saved)
        self.register_buffer("closing", None, persistent=False)
        self.any_closed = False  # whether any unit is closed, as of `step_begin` or the latest `close`

    def init_theta(self, theta: nn.Parameter) -> None:
        nn.init.ones_(theta)  # open: exactly 1

    def forward(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        if not self.teaching:
            return super().forward(x, out)
        # the teacher: every gate open, the LoRA inside the gates left out, W x + b + s_t · B_t A_t x where the teacher
        # adapts this layer, in `lora.LoRA`'s evaluation order (so equal to the LoRA model's logits bit for bit)
        if out is None or self.teacher_A is None:
            return x if out is None else out
        return out + lora_update(x, self.teacher_A, self.teacher_B, self.teacher_scaling).to(out.dtype)

    def gate(self, side: str, training: bool) -> torch.Tensor:
        if self.force_open:
            return torch.ones(self.dims.in_features, device=self.theta_cols.device)
        return (~self.closed_units()).float().repeat_interleave(self.col_group)

    def closed_units(self) -> torch.Tensor:
        """Which units are closed (bool, (units,)): θ below 1, or chosen and not yet moved."""
        shut = self.theta_cols.detach() < 1
        return shut if self.closing is None else shut | self.closing.to(shut.device)

    def close(self, units: torch.Tensor) -> None:
        """Close `units` (bool) from the next forward on; the optimizer moves their θ below 1."""
        self.closing = units.clone() if self.closing is None else self.closing | units.to(self.closing.device)
        self.any_closed = self.any_closed or bool(units.any())


def gate_layers(model: nn.Module) -> list[tuple[str, GatedLinear]]:
    return [(name, adapter) for name, _, adapter in adapter_layers(model) if isinstance(adapter, GatedLinear)]


def gate_param_groups(model: nn.Module, learning_rate: float, gate_lr: float) -> list[dict[str, Any]]:
    """Every trainable parameter but the gates in a group at the run's learning rate (first, so the logged rate is the
    run's), the gates in their own at `gate_lr` without weight decay (decay would pull θ to 0, a half-open paper
    gate; a unit gate's open state must stay exactly 1)."""
    gates = [theta for _, adapter in gate_layers(model) for theta in adapter.thetas()]
    if not gates:
        raise InputError("the model has no stochastic gates (inject a gates config first)")
    gate_ids = {id(p) for p in gates}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
    return [{"params": others, "lr": learning_rate}] * bool(others) + [
        {"params": gates, "lr": gate_lr, "weight_decay": 0.0}
    ]


class GatesStrategy(Strategy):
    """How unit gates train: the schedule closes units before each step (`step_begin`), the gates' own group at
    `gate_schedule.UNIT_GATE_LR`, the θ-moving term (`regularizer`) and the distillation term (`batch_loss`). Holds
    the importance estimates (`fishers`, by layer) and each layer's pending θ term of the latest training forward."""

    config: GatesConfig

    def __init__(self, config: GatesConfig) -> None:
        super().__init__(config)
        self.fishers: dict[Gates, schedule.Fisher] = {}
        self.pending: dict[Gates, torch.Tensor] = {}
        self.taught: list[Gates] = []  # the gated layers that compute the `--gate_teacher` model, as of `prepare`

    def prepare(self, model: nn.Module) -> None:
        """The recording hooks on the unit-gate layers, and the teacher's LoRA (`--gate_teacher`) into the gated
        layers it adapts (`gate_teacher.load_teacher`: refused by name unless it is a LoRA of this base's gated
        layers), copied into the gates' own LoRA with `--gate_warm_start` (before `deepspeed.initialize`, so ZeRO's
        copies start from it; a resume then loads the trained values over it)."""
        if self.config.teacher is not None:
            layers = self.teachable(model)
            gate_teacher.load_teacher(model, self.config.teacher, layers)
            self.taught = list(layers.values())
            if self.config.warm_start:
                gate_teacher.warm_start(self.taught)
        for layer in schedule.unit_layers(model):
            self.fishers[layer] = schedule.Fisher(layer.col_group)
            layer.register_forward_hook(self._record)

    def _record(self, layer: Gates, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """After `layer(x, None)` in a training forward: its θ term (d/dθ = PUSH on closed units, exactly 0 on open
        ones) and a backward hook on x' for the Fisher estimate (which needs x' to require grad: without LoRA
        nothing upstream does, so x' becomes a leaf that does)."""
        teacher = layer.force_open or layer.teaching  # a teacher's forward: no θ term, no estimate
        if args[1] is not None or teacher or not (layer.training and torch.is_grad_enabled()):
            return None
        theta = layer.theta_cols
        shut = layer.closed_units()
        self.pending[layer] = schedule.PUSH * (shut * (theta.float() - theta.detach().float())).sum()
        if not output.requires_grad:
            output = output.detach().requires_grad_(True)
        output.register_hook(partial(self.fishers[layer].record, output.detach()))
        return output

    def param_groups(self, model: nn.Module, learning_rate: float) -> list[dict[str, Any]]:
        return gate_param_groups(model, learning_rate, schedule.UNIT_GATE_LR)

    def step_begin(self, model: nn.Module, step: int, total_steps: int) -> dict[str, float]:
        """Close the units the schedule asks for before step `step` (`gate_schedule.close_on_schedule`: every rank
        must call it at every step); returns gates/target, gates/removed, gates/closed_units/*."""
        start, end = self.config.ramp_fractions
        target = schedule.scheduled_sparsity(step, total_steps, self.config.target_sparsity, start, end)
        layers = schedule.unit_layers(model)
        return schedule.close_on_schedule(
            model, layers, [self.fishers[layer] for layer in layers], target, self.config.target_sparsity,
            self.config.importance, seed=step, width_multiple=self.config.width_multiple,
        )  # fmt: skip

    def batch_loss(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], keep: torch.Tensor, logits: torch.Tensor, step: int
    ) -> dict[str, torch.Tensor] | None:
        """{"gates/distill": `distill` · KL(dense ‖ gated) summed over the target positions}
        (`gate_schedule.distillation`; the dense model is `--gate_teacher`'s where one is given); None without
        distillation."""
        if not self.config.distill:
            return None
        teacher = gate_teacher.teaching(self.taught) if self.config.teacher is not None else None
        kl = schedule.distillation(model, schedule.unit_layers(model), inputs, keep, logits, teacher)
        return {"gates/distill": self.config.distill * kl}

    @staticmethod
    def teachable(model: nn.Module) -> dict[str, Gates]:
        """Every unit-gates layer by the path of the module it adapts: where a teacher's LoRA may go."""
        return {name: adapter for name, adapter in gate_layers(model) if isinstance(adapter, Gates)}

    def regularizer(self, model: nn.Module, step: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        """The term that moves closed gates' θ down (value 0, see `gate_schedule`) from the latest training forward,
        no scalars."""
        pushes = [self.pending.pop(layer) for layer in schedule.unit_layers(model) if layer in self.pending]
        return (torch.stack(pushes).sum() if pushes else torch.zeros(())), {}


register(GatesConfig, Gates, GatesStrategy)
