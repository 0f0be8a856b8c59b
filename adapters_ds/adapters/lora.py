"""LoRA: a low-rank update of a frozen linear layer (Hu et al. 2021, arXiv 2106.09685, section 4.1), with three
variants as options.

    y = W x + b + s · B A dropout(x),    A: (r, in) Kaiming-uniform, B: (out, r) zeros,    s = alpha / r

- rsLoRA (`use_rslora`; Kalajdzievski 2023, arXiv 2312.03732): s = alpha / √r, which keeps the update's scale
  stable as r grows (alpha / r shrinks it, so large ranks learn no better than small ones).
- DoRA (`use_dora`; Liu et al. 2024, arXiv 2402.09353, section 4): the adapted weight is split into a trained
  magnitude m (one value per output row) and a direction,

      W' = m ⊙ (W + s·BA) / ‖W + s·BA‖     (‖·‖ per output row, over the input dimension: (out,))
      y  = (m / ‖W + s·BA‖) ⊙ (W x + s · B A dropout(x)) + b          (the bias is not rescaled)

  m starts as ‖W‖, so the layer is the base layer at step 0. As the paper suggests (section 4.3) and as PEFT does,
  the norm is a constant for backpropagation (computed without gradient), so training keeps no (out, in) tensor
  for backward. The norm is recomputed from the frozen weight at every forward, which needs the weight's values:
  under ZeRO-3 the adapter runs inside the base layer's forward hook, while its parameters are still gathered.
  Dropout acts on the low-rank path only, as in plain LoRA: W x is the base layer's own output. (PEFT and the DoRA
  authors' code compute W·dropout(x) for the rescaling term, a second product with the full weight per layer and
  step; both have the same expectation, and without dropout, as in evaluation and export, they are identical.)
- LoRA+ (`lora_plus_ratio`; Hayou et al. 2024, arXiv 2402.12354): B learns `ratio` times faster than A (their own
  optimizer groups, `param_groups`).

Training computes the same update in a cheaper order: dropout is `dropout.SharedDropout` (one mask per input tensor,
shared by q, k and v, which read the same one; its 1/q and s multiply the (..., r) intermediate rather than the
(..., out) output: `lora_update_train`). Evaluation and export keep PEFT's order (`lora_update`), so exported
adapters match PEFT's outputs bit for bit.

B = 0 makes the adapted model equal to the base at step 0 in every variant. The update is linear in W (DoRA: a
row scaling of W + s·BA), so it is merged into W (and unmerged) exactly up to rounding, in fp32; merging is always
explicit, never a side effect of eval().
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from adapters_ds.adapters.base import (
    ADAPTER_ATTR,
    Adapter,
    AdapterConfig,
    Strategy,
    adapter_layers,
    check_range,
    option,
)
from adapters_ds.adapters.dropout import SharedDropout
from adapters_ds.adapters.lora_experts import ExpertDims, ExpertLoRA, expert_dims, is_experts, is_router
from adapters_ds.adapters.registry import register
from adapters_ds.errors import InputError
from adapters_ds.families import LinearDims
from adapters_ds.quantization import QuantLinear, dense_weight
from adapters_ds.zero import full_shape, gathered


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA hyperparameters; defaults are LLM-Adapters' math setting (r 32, alpha 64, dropout 0.05)."""

    method: ClassVar[str] = "lora"
    target_roles = ("q", "k", "v", "mlp_up", "mlp_down")
    adapts_experts = True  # a mixture of experts' fused parameters: one pair per expert (`lora_experts`)

    r: int = option(32, "LoRA rank", flag="lora_r")
    alpha: float = option(
        64.0, "LoRA alpha (the update is scaled by alpha / r, or alpha / sqrt(r) with --use_rslora)", flag="lora_alpha"
    )
    dropout: float = option(0.05, "dropout on the LoRA branch (the base path never sees it)", flag="lora_dropout")
    use_dora: bool = option(
        False,
        "DoRA: train a magnitude per output row on top of LoRA's direction update (adds out_features parameters "
        "per adapted layer; still mergeable)",
        flag="use_dora",
    )
    use_rslora: bool = option(
        False, "rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r", flag="use_rslora"
    )
    lora_plus_ratio: float = option(
        1.0,
        "LoRA+: learning rate of B (and of the DoRA magnitude) = ratio x --learning_rate, A keeps --learning_rate; "
        "1 is plain LoRA; the LoRA+ authors recommend 16, with a learning rate somewhat below plain LoRA's (e.g. half)",
        flag="lora_plus_ratio",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise InputError(f"lora r must be a positive integer, found {self.r!r}")
        check_range("lora alpha", self.alpha, 0, low_inclusive=False)
        check_range("lora dropout", self.dropout, 0, 1)
        for name in ("use_dora", "use_rslora"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"lora {name} must be true or false, found {getattr(self, name)!r}")
        check_range("lora_plus_ratio", self.lora_plus_ratio, 0, low_inclusive=False)

    @property
    def scaling(self) -> float:
        """s: alpha / r, or alpha / √r with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    peft_type: ClassVar[str] = "LORA"

    def peft_config(self, layers: dict[str, Adapter]) -> dict[str, Any]:
        """PEFT's LoRA fields: our target matching rule (exact name or dotted suffix) is PEFT's, so the same modules
        are adapted; PEFT's DoRA norm and rsLoRA scale are ours, so both flags carry over as they are (LoRA+ only
        changes training). LoRA on a mixture of experts' fused parameters (`lora_experts`) or on its router's weight
        (`RouterLoRA`) goes to PEFT's `target_parameters`, with `lora_dropout` 0, which PEFT requires there (dropout
        acts in training only, so the exported model computes the same)."""
        experts: dict[str, list[str]] = {}  # target name that selected experts modules or their parameters (or a
        for path, layer in layers.items():  # router's weight): PEFT's `target_parameters`
            params = [name for name, _, _ in layer.dims.shapes] if isinstance(layer, ExpertLoRA) else []
            params = ["weight"] if isinstance(layer, RouterLoRA) else params
            for t in self.target_modules if params else ():
                if path == t or path.endswith("." + t):  # a target naming the module stands for its parameters
                    experts[t] = [f"{t}.{p}" for p in params]
                elif any(f"{path}.{p}" == t or f"{path}.{p}".endswith("." + t) for p in params):
                    experts[t] = [t]
        parameters = list(dict.fromkeys(p for ps in experts.values() for p in ps))
        extra = {"target_parameters": parameters, "lora_dropout": 0.0}
        return {
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": [t for t in self.target_modules if t not in experts],
            "fan_in_fan_out": any(layer.transposed for layer in layers.values()),  # GPT-2's Conv1D: (in, out)
            "bias": "none",
            "modules_to_save": None,
            "init_lora_weights": True,
            "use_rslora": self.use_rslora,  # s = alpha / sqrt(r)
            "use_dora": self.use_dora,
            **(extra if experts else {}),
        }

    def layer_dims(self, name: str, module: nn.Module) -> LinearDims | ExpertDims:
        """A linear layer's shapes, an experts module's fused expert matrices (`lora_experts`), or a router's
        weight (`RouterLoRA`)."""
        if is_experts(module):
            return expert_dims(name, module, self.use_dora, self.target_modules)
        if is_router(module):
            if self.use_dora:
                raise InputError(
                    f"lora with DoRA cannot adapt the router {name!r} ({type(module).__name__}, a bare weight; neither "
                    "can PEFT): drop --use_dora or leave the router out of --target_modules"
                )
            out, inp = full_shape(module.weight)
            return RouterDims(inp, out, transposed=False)
        return super().layer_dims(name, module)


class LoRAStrategy(Strategy):
    """LoRA+ (`lora_plus_ratio` != 1) puts B and the DoRA magnitude in a faster optimizer group; plain training
    otherwise."""

    config: LoRAConfig

    def param_groups(self, model: nn.Module, learning_rate: float) -> list[dict[str, Any]]:
        """With LoRA+: A at `learning_rate` (the first group, so the logged rate stays the run's), B and the DoRA
        magnitude at ratio × `learning_rate` (the magnitude, a 1-D output-side parameter, goes with B as in the
        LoRA+ authors' code and PEFT's `create_loraplus_optimizer`). Weight decay stays the run's."""
        if self.config.lora_plus_ratio == 1:
            return super().param_groups(model, learning_rate)
        layers = [adapter for _, _, adapter in adapter_layers(model) if isinstance(adapter, (LoRA, ExpertLoRA))]
        if not layers:
            raise InputError("the model has no LoRA adapters (inject a LoRAConfig first)")
        slow = [p for adapter in layers for p in adapter.input_side()]
        fast = [p for adapter in layers for p in adapter.output_side()]
        grouped = {id(p) for p in slow + fast}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in grouped]
        groups: list[dict[str, Any]] = [
            {"params": slow, "lr": learning_rate},
            {"params": fast, "lr": learning_rate * self.config.lora_plus_ratio},
        ]
        if others:
            groups.append({"params": others, "lr": learning_rate})
        return groups


def add_lora_parameters(module: nn.Module, r: int, dims: LinearDims, dtype: torch.dtype, device: torch.device) -> None:
    """Register the LoRA pair on `module`: `lora_A` (r, in) Kaiming-uniform (nn.Linear's default, as in the paper's
    code) and `lora_B` (out, r) zeros. Shared by `lora` and the LoRA inside stochastic gates, so both keep PEFT's
    parameter names and initialisation."""
    module.lora_A = nn.Parameter(torch.empty(r, dims.in_features, dtype=dtype, device=device))
    module.lora_B = nn.Parameter(torch.zeros(dims.out_features, r, dtype=dtype, device=device))
    nn.init.kaiming_uniform_(module.lora_A, a=math.sqrt(5))


def lora_update(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """s · B A x: (..., in) → (..., r) → (..., out), in PEFT's operation order so exports match bit for bit."""
    return F.linear(F.linear(x.to(lora_A.dtype), lora_A), lora_B) * scaling


def lora_update_train(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """s · B A x with s applied to the (..., r) intermediate: r / out of the multiplies of `lora_update` (and of
    their backward), equal to it up to rounding. Training's order; evaluation and export keep PEFT's."""
    return F.linear(F.linear(x.to(lora_A.dtype), lora_A) * scaling, lora_B)


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """s · B A in fp32, (out, in)."""
    return (lora_B.float() @ lora_A.float()) * scaling


class LoRA(Adapter):
    mergeable: ClassVar[bool] = True
    tensor_parallel: ClassVar[str] = "merged into the base weights before sharding"

    def __init__(self, config: LoRAConfig, dims: LinearDims, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.scaling = config.scaling
        self.transposed = dims.transposed
        add_lora_parameters(self, config.r, dims, dtype, device)
        self.dropout = SharedDropout(config.dropout)  # one mask per input tensor, shared with q/k/v's siblings
        self.use_dora = self.reads_base = config.use_dora
        if self.use_dora:
            # m, (out,): the norm of the base weight's rows, set by `on_attach` (which sees the base layer)
            self.lora_magnitude = nn.Parameter(torch.ones(dims.out_features, dtype=dtype, device=device))
            # ‖W + s·BA‖ at merge time, which unmerge needs (the merged weight's row norms are |m|, not it)
            self.register_buffer("merged_norm", None, persistent=False)

    def trainable_names(self) -> tuple[str, ...]:
        return ("lora_A", "lora_B", "lora_magnitude") if self.use_dora else ("lora_A", "lora_B")

    def peft_tensors(self, path: str) -> dict[str, torch.Tensor]:
        """PEFT's names: `base_model.model.<module>.lora_A.weight` (r, in), `.lora_B.weight` (out, r), and for DoRA
        `.lora_magnitude_vector` (out,), without a `.weight` suffix (PEFT adds it back when loading)."""
        prefix = f"base_model.model.{path}"
        tensors = {f"{prefix}.lora_A.weight": self.lora_A, f"{prefix}.lora_B.weight": self.lora_B}
        if self.use_dora:
            tensors[f"{prefix}.lora_magnitude_vector"] = self.lora_magnitude
        return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}

    def input_side(self) -> list[nn.Parameter]:
        """The parameters on the input side of the update (LoRA+'s slow group): A."""
        return [self.lora_A]

    def output_side(self) -> list[nn.Parameter]:
        """The parameters on the output side of the update (LoRA+'s fast group): B, and DoRA's magnitude."""
        return [self.lora_B, self.lora_magnitude] if self.use_dora else [self.lora_B]

    @torch.no_grad()
    def on_attach(self, base: nn.Module) -> None:
        if self.use_dora:
            with gathered([base.weight]):  # ZeRO-3: the base weight is partitioned at injection time
                self.lora_magnitude.copy_(self.weight_norm(base))

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module | None = None) -> torch.Tensor:
        if self.training:  # dropout's 1/q (1.0 without it) and s on the (..., r) intermediate: one small multiply
            dropped, keep_scale = self.dropout(x.to(self.lora_A.dtype))
            update = lora_update_train(dropped, self.lora_A, self.lora_B, self.scaling * keep_scale)
        else:
            update = lora_update(x, self.lora_A, self.lora_B, self.scaling)
        if not self.use_dora:
            return update  # (..., out)
        scale = self.lora_magnitude.float() / self.weight_norm(base).float()  # (out,), m / ‖W + s·BA‖
        frozen = out if base.bias is None else out - base.bias  # W x: the magnitude rescales it, not the bias
        # y = out + this = scale ⊙ (W x + s·BA x') + b; at step 0 scale is exactly 1 and B = 0, so this is 0
        return (scale - 1) * frozen + scale * update

    @torch.no_grad()
    def weight_norm(self, base: nn.Module) -> torch.Tensor:
        """‖W + s·BA‖ per output row, (out,): computed in fp32, rounded to the magnitude's dtype (so that m = the
        norm at initialisation gives a scale of exactly 1 also in bf16), and without gradient (DoRA's constant)."""
        weight = dense_weight(base)  # a quantized base layer's dequantized weight
        weight = weight.T if self.transposed else weight  # (out, in)
        norm = torch.linalg.vector_norm(weight.float() + lora_delta(self.lora_A, self.lora_B, self.scaling), dim=1)
        return norm.to(self.lora_magnitude.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r)·B·A in fp32, laid out like the base weight ((in, out) for Conv1D)."""
        delta = lora_delta(self.lora_A, self.lora_B, self.scaling)  # (out, in)
        return delta.T if self.transposed else delta

    def merge(self, base: nn.Module) -> None:
        if isinstance(base, QuantLinear):
            raise InputError("LoRA cannot be merged into a quantized layer: dequantize the base first")
        if not self.merged:
            self._fold(base, merge=True)
            self.merged = True

    def unmerge(self, base: nn.Module) -> None:
        if self.merged:
            self._fold(base, merge=False)
            self.merged = False

    @torch.no_grad()
    def _fold(self, base: nn.Module, merge: bool) -> None:
        # fp32 math then one cast back: a bf16 add would round the small update away
        with gathered([base.weight, *self.parameters()], modify=True):
            weight = base.weight
            if not self.use_dora:
                weight.copy_((weight.float() + (1.0 if merge else -1.0) * self.delta_weight()).to(weight.dtype))
                return
            rows = weight.T if self.transposed else weight  # (out, in) view: writes go to the weight
            delta = lora_delta(self.lora_A, self.lora_B, self.scaling)
            if merge:  # W' = (m / ‖W + s·BA‖) ⊙ (W + s·BA), the norm exactly as the forward computes it
                self.merged_norm = self.weight_norm(base).float()
                scale = self.lora_magnitude.float() / self.merged_norm
                rows.copy_((scale[:, None] * (rows.float() + delta)).to(weight.dtype))
            else:  # W = W' / scale - s·BA, with the norm from before the merge
                scale = self.lora_magnitude.float() / self.merged_norm
                rows.copy_((rows.float() / scale[:, None] - delta).to(weight.dtype))
                self.merged_norm = None


@dataclass(frozen=True)
class RouterDims(LinearDims):
    """A mixture of experts' router weight: (out, in) = (experts, hidden)."""


class RouterLoRA(LoRA):
    """LoRA on a mixture of experts' router (`lora_experts.is_router`), whose weight is a bare parameter read inside
    the router's forward, before its softmax and top-k: the router's forward runs again on W + s·B A, so routing,
    its normalisation and the router logits the auxiliary loss reads stay transformers' own. The same update as PEFT's
    `target_parameters` on `<router>.weight`, and as there without dropout (the update is a weight, not a function
    of a dropped input) or DoRA. Merging, the PEFT tensors and LoRA+'s groups are LoRA's."""

    def hooks(self, base: nn.Module) -> list[Any]:
        # first among the forward hooks: under ZeRO-3 the router's weight is still gathered (DeepSpeed's release
        # hook comes later), and transformers' output recorder (router logits for the aux loss) sees the new output
        return [base.register_forward_hook(_route_with_lora, prepend=True)]

    def forward(self) -> torch.Tensor:  # type: ignore[override]
        """s · B A in fp32, (experts, hidden)."""
        return self.delta_weight()


def _route_with_lora(router: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook of an adapted router: its output recomputed with `weight` = W + s·B A (the original output,
    from W alone, is dropped). The weight is swapped for the call only; the module's parameter is never changed."""
    adapter = getattr(router, ADAPTER_ATTR, None)
    if adapter is None or adapter.merged:
        return None
    weight = router._parameters["weight"]
    # through __call__, as ExpertLoRA: ZeRO-3's hooks see the adapter's parameters used
    router._parameters["weight"] = weight + adapter().to(weight.dtype)  # (experts, hidden)
    try:
        return type(router).forward(router, *args)
    finally:
        router._parameters["weight"] = weight


def lora_layer(config: LoRAConfig, dims: LinearDims | ExpertDims, dtype: torch.dtype, device: torch.device) -> Adapter:
    """The LoRA layer for what `LoRAConfig.layer_dims` found: a linear layer, an experts module or a router."""
    if isinstance(dims, ExpertDims):
        return ExpertLoRA(config, dims, dtype, device)
    if isinstance(dims, RouterDims):
        return RouterLoRA(config, dims, dtype, device)
    return LoRA(config, dims, dtype, device)


register(LoRAConfig, LoRA, LoRAStrategy, build=lora_layer)
