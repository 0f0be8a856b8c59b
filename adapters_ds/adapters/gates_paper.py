"""The paper's stochastic gates (`--adapter gates_paper`; FineGates, Svirsky, Refael, Lindenbaum, arXiv 2412.12951,
section 3): a gate per row and column of every target (`scope` "all") or of the MLP units only ("mlp").

    y = z_r ⊙ (W x' + s · B A x' + b),   x' = z_c ⊙ x        (the layer is `gates.GatedLinear`'s)

mu = tanh(theta); training z = clamp(mu + eps + 0.5, 0, 1) with eps ~ N(0, 0.1²) drawn at every forward, evaluation
z = clamp(mu + 0.5, 0, 1). theta starts in N(1, 0.1²) truncated to [0.7, 1.3], so mu + 0.5 > 1 for *every* gate and
the model starts as the base. The penalty pulls the open probability P(z > 0) = Φ((mu + 0.5) / 0.5) towards
keep = 1 - target_sparsity in every gated layer:
loss = task + lambda · mean over layers of ½ (|mean P_rows - keep| + |mean P_cols - keep|), for `penalty_steps`
(0: all).

Kept for comparison with the paper, not as the pruning recipe: met by half-open gates that scale units rather than
close them, the penalty removes far less than its target, and a removed row or column is cut out only where the
whole unit closed. The unit gates (`--adapter gates`) reach their target exactly and are what `export --prune` is
built for; choose these to reproduce the paper.

Training (`PaperGatesStrategy`): the gates in their own optimizer group at `gate_lr` (no weight decay); the penalty
as the `regularizer`, from the gates' statistics that the strategy's forward hooks record while ZeRO-3 holds the
gates gathered. TensorBoard: gates/penalty, gates/open_expected/*, gates/closed_rows/*, gates/closed_cols/*
(* = all, attn, mlp).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import nn

from adapters_ds.adapters.base import Strategy, check_range, option
from adapters_ds.adapters.gates import GatedConfig, GatedLinear, gate_layers, gate_param_groups
from adapters_ds.adapters.registry import register
from adapters_ds.errors import InputError
from adapters_ds.families import layout_of
from adapters_ds.zero import full_numel

NOISE_STD = 0.1  # sigma of the training noise eps
REG_STD = 0.5  # sigma_reg of the open probability Φ((mu + 0.5) / sigma_reg)
INIT_MEAN, INIT_STD = 1.0, 0.1
INIT_LOW, INIT_HIGH = 0.7, 1.3  # 3 sigma: tanh(0.7) = 0.60 > 0.5, so every gate starts at exactly 1


@dataclass
class PaperGatesConfig(GatedConfig):
    """The paper's gates (lambda 50, gate lr 1e-3 to 1e-2 there)."""

    method: ClassVar[str] = "gates_paper"

    sparsity_lambda: float = option(50.0, "gates_paper: weight of the sparsity penalty in the loss", flag="gate_lambda")
    gate_lr: float = option(
        1e-2,
        "gates_paper: learning rate of the gates (the paper uses 1e-3 to 1e-2; LoRA inside them uses --learning_rate)",
        flag="gate_lr",
    )
    penalty_steps: int = option(
        0, "gates_paper: steps with the sparsity penalty, then task loss only (0: all)", flag="gate_penalty_steps"
    )
    """After `penalty_steps` the task loss alone trains the gates and the LoRA (a recovery phase, as in
    prune-then-fine-tune): a closed gate gets no gradient through the clamp and stays closed."""
    scope: Literal["all", "mlp"] = option(
        "all",
        "gates_paper: gates on the rows and columns of every target (all) or on the MLP units only (mlp)",
        flag="gate_scope",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("gates_paper sparsity_lambda", self.sparsity_lambda, 0)
        check_range("gates_paper gate_lr", self.gate_lr, 0, low_inclusive=False)
        if not isinstance(self.penalty_steps, int) or isinstance(self.penalty_steps, bool) or self.penalty_steps < 0:
            raise InputError(f"gates_paper penalty_steps must be an integer >= 0, found {self.penalty_steps!r}")
        if self.scope not in ("all", "mlp"):
            raise InputError(f"gates_paper scope must be 'all' or 'mlp', found {self.scope!r}")

    def layer_options(self, model: nn.Module, name: str) -> dict[str, Any]:
        """Which sides of the layer at `name` are gated: "all" both sides of every target, "mlp" only the MLP's
        intermediate dimension (the producers' rows, the consumer's columns)."""
        if self.scope == "all":
            return {}
        layout = layout_of(model.config.model_type)
        return {
            "gate_rows": any(name.endswith("." + producer) for producer in layout.mlp_in),
            "gate_cols": name.endswith("." + layout.mlp_out),
        }


def open_probability(mu: torch.Tensor) -> torch.Tensor:
    """P(z > 0) = Φ((mu + 0.5) / sigma_reg), mu = tanh(theta) in fp32."""
    return 0.5 * (1.0 + torch.erf((mu + 0.5) / (REG_STD * math.sqrt(2.0))))


class GateStats(NamedTuple):
    """One gate vector's open probabilities (differentiable) and which of its units are closed (z = 0 in
    evaluation mode: mu <= -0.5)."""

    p: torch.Tensor  # (n,) fp32
    closed: torch.Tensor  # (n,) bool


def stats_of(theta: torch.Tensor) -> GateStats:
    mu = torch.tanh(theta.float())
    return GateStats(open_probability(mu), (mu + 0.5 <= 0).detach())


def gate_values(theta: torch.Tensor, training: bool) -> torch.Tensor:
    """z of the paper's gates in fp32: noisy in training mode, deterministic in evaluation mode."""
    mu = torch.tanh(theta.float())
    if training:
        mu = mu + torch.randn_like(mu) * NOISE_STD
    return (mu + 0.5).clamp(0.0, 1.0)


class PaperGates(GatedLinear):
    def init_theta(self, theta: nn.Parameter) -> None:
        nn.init.trunc_normal_(theta, INIT_MEAN, INIT_STD, INIT_LOW, INIT_HIGH)

    def gate(self, side: str, training: bool) -> torch.Tensor:
        return gate_values(getattr(self, f"theta_{side}"), training)


class PaperGatesStrategy(Strategy):
    """The gates at `gate_lr` in their own group; the sparsity penalty as the regularizer. `pending` holds each
    layer's gate statistics of the latest training forward until the penalty takes them."""

    config: PaperGatesConfig

    def __init__(self, config: PaperGatesConfig) -> None:
        super().__init__(config)
        self.pending: dict[GatedLinear, dict[str, GateStats]] = {}

    def prepare(self, model: nn.Module) -> None:
        for _, layer in gate_layers(model):
            layer.register_forward_hook(self._record)

    def _record(self, layer: GatedLinear, args: tuple, output: torch.Tensor) -> None:
        """The penalty's inputs, taken right after the layer's forward because that is where ZeRO-3 guarantees the
        gates are gathered (in the first step and after a trace change it releases even persistent parameters after
        use): the columns' after `layer(x, None)`, the rows' after `layer(x', out)`."""
        if not (layer.training and torch.is_grad_enabled()):
            return
        side = "cols" if args[1] is None else "rows"
        theta = getattr(layer, f"theta_{side}")
        if theta is not None:
            self.pending.setdefault(layer, {})[side] = stats_of(theta)

    def param_groups(self, model: nn.Module, learning_rate: float) -> list[dict[str, Any]]:
        return gate_param_groups(model, learning_rate, self.config.gate_lr)

    def statistics(self, layer: GatedLinear) -> tuple[GateStats | None, GateStats | None]:
        """(rows, columns) of `layer`, None for an ungated side: those of the latest training forward (each handed
        out once), else computed now."""
        sides = layer.gated_sides()
        taken = self.pending.pop(layer, {})
        if set(sides) <= taken.keys():
            return taken.get("rows"), taken.get("cols")
        for theta in layer.thetas():
            if theta.numel() != full_numel(theta):
                raise RuntimeError(
                    "the gates are ZeRO-3 partitions here: compute the penalty right after a training-mode forward"
                )
        return tuple(None if t is None else stats_of(t) for t in (layer.theta_rows, layer.theta_cols))

    def regularizer(self, model: nn.Module, step: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
        """lambda · mean over gated layers of ½ (|mean P_rows - keep| + |mean P_cols - keep|), and the scalars to
        log: the penalty, the expected open fraction and the fraction of rows / columns closed (z = 0 in evaluation
        mode), overall and per layer type (attn, mlp)."""
        layers = gate_layers(model)
        if not layers:
            raise InputError("the model has no stochastic gates (inject a PaperGatesConfig first)")
        stats = [(name, self.statistics(layer)) for name, layer in layers if layer.thetas()]
        keep = self.config.keep
        terms = [  # ½ (rows + columns) where both sides are gated, the one side's term where one is
            torch.stack([(side.p.mean() - keep).abs() for side in sides if side is not None]).mean()
            for _, sides in stats
        ]
        active = not self.config.penalty_steps or step < self.config.penalty_steps
        penalty = (self.config.sparsity_lambda if active else 0.0) * torch.stack(terms).mean()
        metrics = summarize(stats)
        metrics["gates/penalty"] = penalty.item()
        return penalty, metrics


def layer_type(name: str) -> str:
    """attn or mlp for a module inside a transformer block, other elsewhere (an LM head, if one targets it)."""
    parts = name.split(".")
    if any("attn" in p or "attention" in p for p in parts):
        return "attn"
    return "mlp" if any(p.isdigit() for p in parts) else "other"


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


register(PaperGatesConfig, PaperGates, PaperGatesStrategy)
