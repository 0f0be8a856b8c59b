"""LoRA on a mixture of experts' fused parameters: one low-rank pair per expert and per fused matrix.

transformers keeps a mixture-of-experts MLP (Mixtral, Qwen3-MoE, OLMoE, ...) as one module whose experts are
3-D parameters, `gate_up_proj` (experts, 2 · I, hidden) and `down_proj` (experts, hidden, I), which no linear-layer
adapter can reach. Expert e's matrices get their own update, as Hugging Face PEFT's `target_parameters` does:

    W_e' = W_e + s · B_e A_e,    A: (experts, r, in) Kaiming-uniform per expert,  B: (experts, out, r) zeros

so the model is the base at step 0. The update acts inside the experts' computation (before the gate's
non-linearity), so the adapter runs the experts itself: it registers `LORA_EXPERTS` under transformers' experts
interface (as `training.packing` registers attention) and switches the model's `_experts_implementation` to it while
attached. Each routed token sees W_e x + s · B_e A_e dropout(x) for its experts, the routing weights and gate
activation exactly as transformers' own loop computes them; an experts module without an adapter (or merged) runs
transformers' eager loop.

ZeRO-3: the experts module's forward is called on every rank whatever the routing, so its fused parameters are
gathered collectively on every rank, and each pair of adapter tensors is one parameter for all experts, so every
rank's backward produces its gradient (zeros for the experts its tokens did not reach): a batch that routes no token
to some expert on one rank neither hangs nor changes the gradient.

The router (`mlp.gate`, a transformers `*TopKRouter`: a bare (experts, hidden) weight, not a linear layer) stays
frozen unless named in `--target_modules`; then `lora.RouterLoRA` adapts its weight.

PEFT's names (`export --peft`): `target_parameters` with lora_A.weight (experts · r, in) and lora_B.weight
(out, r · experts), the parameters of one module nested (the first-registered one innermost, under `base_layer`).
DoRA is refused here, as PEFT has no DoRA for parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from adapters_ds.adapters.base import ADAPTER_ATTR, Adapter
from adapters_ds.errors import InputError
from adapters_ds.zero import full_shape, gathered

LORA_EXPERTS = "adapters_ds_lora_experts"
FUSED = ("gate_up_proj", "down_proj")  # transformers' names, in their registration order


@dataclass(frozen=True)
class ExpertDims:
    """The fused expert matrices of one experts module: {name: (out, in)} and the number of experts."""

    experts: int
    shapes: tuple[tuple[str, int, int], ...]  # (parameter name, out, in)


def is_experts(module: nn.Module) -> bool:
    """A transformers experts module with fused 3-D expert parameters."""
    return all(isinstance(getattr(module, n, None), nn.Parameter) and len(full_shape(getattr(module, n))) == 3
               for n in FUSED)  # fmt: skip


def is_router(module: nn.Module) -> bool:
    """A transformers top-k router: one (experts, hidden) `weight` parameter, no linear layer, choosing `top_k`
    experts per token from `F.linear(hidden, weight)`."""
    own = dict(module.named_parameters(recurse=False))
    return hasattr(module, "top_k") and set(own) == {"weight"} and len(full_shape(own["weight"])) == 2


def expert_dims(name: str, module: nn.Module, use_dora: bool, targets: tuple[str, ...] | None = None) -> ExpertDims:
    """The fused matrices to adapt: those `targets` name as parameters (`experts.down_proj`), or both where a target
    names the module itself (or there are no explicit targets)."""
    if use_dora:
        model_type = getattr(getattr(module, "config", None), "model_type", "this")
        raise InputError(
            f"lora with DoRA cannot adapt the expert parameters of {model_type} models ({name!r}; neither can PEFT): "
            "drop --use_dora or name only linear layers in --target_modules"
        )
    layout = (getattr(module, "is_concatenated", True), getattr(module, "has_gate", True),
              getattr(module, "is_transposed", False), getattr(module, "has_bias", False))  # fmt: skip
    if layout != (True, True, False, False):
        raise InputError(
            f"experts module {name!r} ({type(module).__name__}) stores its experts in a layout LoRA does not adapt "
            "(expected gate and up concatenated, (experts, out, in) weights, no biases)"
        )
    named = [n for n in FUSED if targets and any(_matches(f"{name}.{n}", t) for t in targets)]
    chosen = named if named and not any(_matches(name, t) for t in targets) else FUSED
    shapes = tuple((n, *full_shape(getattr(module, n))[1:]) for n in chosen)
    return ExpertDims(experts=full_shape(module.gate_up_proj)[0], shapes=shapes)


def _matches(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


class _Restore:
    def __init__(self, config: Any, implementation: str | None) -> None:
        self.config, self.implementation = config, implementation

    def remove(self) -> None:
        self.config._experts_implementation = self.implementation


class ExpertLoRA(Adapter):
    """LoRA pairs `<param>_lora_A` (experts, r, in) and `<param>_lora_B` (experts, out, r) for each fused matrix."""

    mergeable = True
    tensor_parallel: ClassVar[str] = "merged into the expert weights before sharding"

    def __init__(self, config: Any, dims: ExpertDims, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.scaling, self.dims = config.scaling, dims
        self.transposed, self.use_dora = False, False  # what PEFT export asks of every LoRA layer
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        for name, out, inp in dims.shapes:
            a = torch.empty(dims.experts, config.r, inp, dtype=dtype, device=device)
            for e in range(dims.experts):  # each expert's A as nn.Linear initialises one (LoRA's rule)
                nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
            self.register_parameter(f"{name}_lora_A", nn.Parameter(a))
            self.register_parameter(
                f"{name}_lora_B", nn.Parameter(torch.zeros(dims.experts, out, config.r, dtype=dtype, device=device))
            )

    def trainable_names(self) -> tuple[str, ...]:
        return tuple(f"{n}_lora_{s}" for n, _, _ in self.dims.shapes for s in "AB")

    def peft_tensors(self, path: str) -> dict[str, torch.Tensor]:
        return peft_expert_tensors(f"base_model.model.{path}", self)[0]

    def input_side(self) -> list[nn.Parameter]:
        return [getattr(self, f"{n}_lora_A") for n, _, _ in self.dims.shapes]

    def output_side(self) -> list[nn.Parameter]:
        return [getattr(self, f"{n}_lora_B") for n, _, _ in self.dims.shapes]

    def forward(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[override]
        """{param: (A, B)} as new tensors (ZeRO-3 may release the parameters' storage once this call returns)."""
        return {n: (getattr(self, f"{n}_lora_A") * 1, getattr(self, f"{n}_lora_B") * 1) for n, _, _ in self.dims.shapes}

    def hooks(self, base: nn.Module) -> list[Any]:
        restore = _Restore(base.config, base.config._experts_implementation)
        base.config._experts_implementation = LORA_EXPERTS
        return [restore]

    def delta(self, name: str) -> torch.Tensor:
        """s · B_e A_e for every expert in fp32, (experts, out, in)."""
        a, b = getattr(self, f"{name}_lora_A").float(), getattr(self, f"{name}_lora_B").float()
        return torch.bmm(b, a) * self.scaling

    def merge(self, base: nn.Module) -> None:
        if not self.merged:
            self._fold(base, 1.0)
            self.merged = True

    def unmerge(self, base: nn.Module) -> None:
        if self.merged:
            self._fold(base, -1.0)
            self.merged = False

    @torch.no_grad()
    def _fold(self, base: nn.Module, sign: float) -> None:
        weights = [getattr(base, n) for n, _, _ in self.dims.shapes]
        with gathered([*weights, *self.parameters()], modify=True):
            for (name, _, _), weight in zip(self.dims.shapes, weights, strict=True):
                weight.copy_((weight.float() + sign * self.delta(name)).to(weight.dtype))


def _update(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """s · B A x for one expert: (n, in) → (n, r) → (n, out), PEFT's operation order."""
    return F.linear(F.linear(x.to(a.dtype), a), b).to(x.dtype) * scaling


def lora_experts_forward(
    module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' eager experts loop with each expert's LoRA update: (tokens, hidden) in and out."""
    adapter = getattr(module, ADAPTER_ATTR, None)
    if not isinstance(adapter, ExpertLoRA) or adapter.merged:
        return type(module).forward.__wrapped__(module, hidden_states, top_k_index, top_k_weights)
    pairs = adapter()  # through __call__: ZeRO-3's hooks see the adapter's parameters used
    scaling, experts = adapter.scaling, adapter.dims.experts

    def update(param: str, e: int, x: torch.Tensor) -> torch.Tensor | float:
        if param not in pairs:
            return 0.0
        a, b = pairs[param]
        return _update(adapter.dropout(x), a[e], b[e], scaling)

    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=experts).permute(2, 1, 0)  # (experts, top_k, tokens)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
    for e in hit:
        top_k_pos, token_idx = torch.where(mask[e])
        x = hidden_states[token_idx]  # (n, hidden)
        gate_up = F.linear(x, module.gate_up_proj[e]) + update("gate_up_proj", e, x)  # (n, 2 · I)
        h = module._apply_gate(gate_up)  # (n, I)
        out = F.linear(h, module.down_proj[e]) + update("down_proj", e, h)  # (n, hidden)
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


ALL_EXPERTS_FUNCTIONS.register(LORA_EXPERTS, lora_experts_forward)


def peft_expert_tensors(prefix: str, adapter: ExpertLoRA) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The adapter's tensors under PEFT's `target_parameters` names, and the parameter paths PEFT must target."""
    tensors, targets = {}, []
    count = len(adapter.dims.shapes)
    for i, (name, out, _) in enumerate(adapter.dims.shapes):
        where = prefix + ".base_layer" * (count - 1 - i)  # PEFT nests a module's parameters, the first innermost
        a, b = getattr(adapter, f"{name}_lora_A").detach(), getattr(adapter, f"{name}_lora_B").detach()
        tensors[f"{where}.lora_A.weight"] = a.reshape(-1, a.shape[-1]).cpu().contiguous()  # (experts · r, in)
        tensors[f"{where}.lora_B.weight"] = b.permute(1, 2, 0).reshape(out, -1).cpu().contiguous()  # (out, r · E)
        targets.append(name)
    return tensors, targets
