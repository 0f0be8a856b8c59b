"""What every adapter method shares: the config base class and the adapter layer base class.

An adapter is attached to one frozen `nn.Linear` (or GPT-2's transposed `Conv1D`) as a child module named
`adapter`, and applied by a forward hook: `out = base(x) + adapter(x, out)`. The base module itself is left
untouched, so its parameter names (`...q_proj.weight`) stay exactly those of a plain checkpoint and a base
checkpoint loads with the adapter tensors as the only extra keys. LoRA reads x, Series reads out, Parallel
reads x: one hook covers all three.

A method is one module: a config subclass (its fields are the method's hyperparameters and, through `option`, its
command-line options), a layer subclass, and one `registry.register(Config, Layer)` call.

Two opt-in extensions serve methods that are not an addition (stochastic gates, y = z_r ⊙ (W (z_c ⊙ x) + b)):
an adapter with `transforms_input` also gets a forward pre-hook that replaces the base layer's input by
`adapter(x, None)`, and one with `replaces_output` returns the layer's new output instead of an addition. Both
go through the adapter's `__call__`, so ZeRO-3's module hooks fetch its parameters for either use.

Methods that act on the whole model rather than on linear layers (prompt tuning, P-tuning, prefix tuning) set the
config's `model_level`: one adapter is attached to the model itself (module path "", so its tensors are named
`adapter.<name>`), built from `layer_dims` (the model's geometry), and it registers its own hooks (`Adapter.hooks`:
pre-hooks that rewrite the model's inputs). Everything else (`adapter_parameters`, `freeze_base`, the adapter files,
ZeRO-3 persistence) treats it like any other adapter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from adapters_ds.errors import InputError
from adapters_ds.families import Role, default_targets, linear_dims
from adapters_ds.hardware import DTYPES

ADAPTER_ATTR = "adapter"
DTypeName = Literal["auto", "float32", "bfloat16", "float16"]


def option(default: Any, help: str, flag: str | None = None) -> Any:
    """A config field that is also a command-line option of the training command: `--<flag>` (default
    `--<method>_<field>`). The flag names are a contract (SLURM templates, docs and users depend on them); methods
    that share a hyperparameter (Series and Parallel: `--bottleneck_size`) share the flag."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass
class AdapterConfig:
    """Fields every method has. Subclasses add their hyperparameters and set `method`."""

    method: ClassVar[str]
    target_roles: ClassVar[tuple[Role, ...]] = ()
    """Roles of the modules adapted by default (`families.ROLES`: q, k, v, o, mlp_gate, mlp_up, mlp_down)."""
    default_learning_rate: ClassVar[float] = 3e-4
    """The learning rate the training command uses unless --learning_rate is given: each method states its source
    (the paper's, or the reference framework's) beside its value. 3e-4: LLM-Adapters' math runs (arXiv 2304.01933,
    LoRA, Series and Parallel alike), within the range of Hu et al. 2021 (LoRA, 2e-4 to 5e-4)."""
    adapts_experts: ClassVar[bool] = False
    """True: the method can adapt a mixture of experts' fused 3-D parameters, so a mixture-of-experts family's MLP
    roles default to its experts module (`families.default_targets`)."""
    model_level: ClassVar[bool] = False
    """True: the method attaches one adapter to the model itself (module path "", e.g. prompt and prefix tuning,
    which change the model's inputs or every attention layer) instead of one per target module; `target_modules`
    does not apply and the layer is built from `layer_dims(name, model)`."""

    target_modules: tuple[str, ...] | None = None
    """Module names to adapt: a name matches a module whose dotted path equals it or ends with `.name`
    (Hugging Face PEFT's rule). None takes the model family's modules of `target_roles`."""
    dtype: DTypeName = "auto"
    """Adapter parameter dtype; "auto" follows the adapted base weight (bf16 base → bf16 adapter)."""

    def __post_init__(self) -> None:
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = tuple(t.strip() for t in self.target_modules.split(",") if t.strip())
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise InputError(
                    f"target_modules must be a non-empty list of module names, found {self.target_modules!r}"
                )
        _check_choice("dtype", self.dtype, ("auto", *DTYPES))

    def param_groups(self, model: nn.Module, learning_rate: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups of the trainable parameters; a method with parameters that want their
        own learning rate (e.g. stochastic gates) overrides this."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def layer_dims(self, name: str, module: nn.Module) -> Any:
        """The shape facts the adapter layer at `name` is built from: by default `families.linear_dims`, which
        refuses anything but a linear layer; a model-level method reads the model's geometry instead."""
        return linear_dims(name, module)

    def layer_options(self, model: nn.Module, name: str) -> dict[str, Any]:
        """Keyword arguments for the adapter layer at module path `name`, beyond the config (e.g. which sides of
        a layer stochastic gates cover); none by default."""
        return {}

    def regularizer(self, model: nn.Module, step: int = 0) -> tuple[torch.Tensor, dict[str, float]] | None:
        """An extra loss term of the method at optimizer step `step` (0-based; added to every micro-batch's loss)
        and scalars to log, or None."""
        return None

    def step_begin(self, model: nn.Module, step: int, total_steps: int) -> dict[str, float]:
        """Called on every rank before the first forward of optimizer step `step` (0-based) of `total_steps`, where
        no forward or backward is in flight: a method that changes its adapters on a schedule (stochastic gates
        closing units) does it here. Returns scalars to log; nothing by default."""
        return {}

    def batch_loss(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], keep: torch.Tensor, logits: torch.Tensor, step: int
    ) -> dict[str, torch.Tensor] | None:
        """Extra loss terms of a training micro-batch, from its forward: `inputs` are the model inputs (no labels),
        `keep` the (batch, seq) mask of the positions that predict a target and `logits` the model's (n_targets,
        vocab) logits there. Returns {tag: sum over the target positions} (fp32 scalars), which the trainer adds to
        the task loss's sum before normalising both alike and logs per target token under `tag`; None by default.
        A method may run more forwards of `model` (e.g. a teacher for distillation); every rank must run the same
        number (ZeRO-3 gathers collectively)."""
        return None

    def default_targets(self, model_type: str) -> tuple[str, ...]:
        """Module names adapted when `target_modules` is None; an InputError for a family without them."""
        return default_targets(model_type, self.roles(), self.method, experts=self.adapts_experts)

    def roles(self) -> tuple[Role, ...]:
        """The roles adapted by default; a method whose placement depends on its options overrides this."""
        return self.target_roles

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        """The fields that are command-line options (declared with `option`)."""
        return [f for f in dataclasses.fields(cls) if "help" in f.metadata]

    @classmethod
    def flag(cls, f: dataclasses.Field) -> str:
        return f.metadata.get("flag") or f"{cls.method}_{f.name}"

    def to_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        if fields["target_modules"] is not None:
            fields["target_modules"] = list(fields["target_modules"])
        return {"method": self.method, **fields}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AdapterConfig:
        """Build from a dict, refusing unknown keys (a typo must not silently fall back to a default)."""
        values = {k: v for k, v in values.items() if k != "method"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown {cls.method} option(s) {unknown}; expected some of {sorted(known)}")
        return cls(**values)


def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise InputError(f"{name} must be one of {list(choices)}, found {value!r}")


def check_range(name: str, value: float, low: float, high: float | None = None, *, low_inclusive: bool = True) -> None:
    """Validate a numeric hyperparameter; `bool` is refused although Python counts it as an int."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value >= low if low_inclusive else value > low) and (high is None or value < high)
    if not ok:
        bound = f"{'>=' if low_inclusive else '>'} {low}" + ("" if high is None else f" and < {high}")
        raise InputError(f"{name} must be a number {bound}, found {value!r}")


def reference_weight(base: nn.Module) -> torch.Tensor:
    """The weight an adapter of `base` takes its dtype and device from: the layer's own, or for a module without one
    (a whole model, for model-level methods) its first parameter (the input embedding)."""
    weight = getattr(base, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else next(base.parameters())


def resolve_dtype(name: DTypeName, base: nn.Module) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    dtype = reference_weight(base).dtype
    if not dtype.is_floating_point:  # integer codes (a layer transformers loaded through bitsandbytes): its compute
        dtype = getattr(base, "compute_dtype", None) or torch.get_default_dtype()
    return dtype


class Adapter(nn.Module):
    """Base class of adapter layers. `forward(x, out)` returns what is added to the base output."""

    mergeable: ClassVar[bool] = False
    transforms_input: ClassVar[bool] = False
    """True: called as `adapter(x, None)` before the base layer too, returning the input the base layer sees."""
    replaces_output: ClassVar[bool] = False
    """True: `forward(x, out)` returns the layer's new output rather than an addition to it."""
    reads_base: bool = False
    """True (per instance): called as `adapter(x, out, base=<the adapted module>)`, for an output that depends on
    the frozen weight's values (DoRA's weight norm). The forward hook runs before ZeRO-3 releases the base module's
    parameters (the adapter's hook is registered first, at injection, and DeepSpeed's after it, at initialize), so
    the full weight is there without another gather."""

    def __init__(self) -> None:
        super().__init__()
        self.merged = False  # only mergeable adapters ever set this

    def trainable_names(self) -> tuple[str, ...]:
        """Names of this layer's trainable parameters, declared explicitly (checked by `freeze_base`)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def on_attach(self, base: nn.Module) -> None:
        """Called by `attach` before the adapter joins `base`: a method whose initial state depends on the frozen
        weight's values (DoRA's magnitude) reads them here, through `zero.gathered` (every rank attaches the same
        modules in the same order, as a ZeRO-3 gather requires). Nothing by default."""

    def hooks(self, base: nn.Module) -> list[Any]:
        """Register the hooks through which the adapter acts on `base`; returns their handles (anything with a
        `remove()`), which `detach` removes. By default the forward hook that adds `adapter(x, out)` to the output,
        and with `transforms_input` the pre-hook that replaces the input. Model-level adapters (prompt methods)
        register their own: pre-hooks that rewrite the model's inputs."""
        handles = [base.register_forward_hook(_apply_adapter)]
        if self.transforms_input:
            handles.append(base.register_forward_pre_hook(_transform_input))
        return handles

    def merge(self, base: nn.Module) -> None:
        raise InputError(f"{type(self).__name__} adapters are not mergeable (their update is not linear)")

    def unmerge(self, base: nn.Module) -> None:
        raise InputError(f"{type(self).__name__} adapters are not mergeable (their update is not linear)")


def _apply_adapter(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook of an adapted base layer: add the adapter's contribution to the base output."""
    adapter = getattr(module, ADAPTER_ATTR, None)
    if adapter is None or adapter.merged:
        return None  # None keeps the output as it is
    result = adapter(args[0], output, base=module) if adapter.reads_base else adapter(args[0], output)
    result = result.to(output.dtype)
    return result if adapter.replaces_output else output + result


def _transform_input(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of a base layer whose adapter changes its input (`transforms_input`)."""
    adapter = getattr(module, ADAPTER_ATTR, None)
    if adapter is None or adapter.merged:
        return None
    return (adapter(args[0], None).to(args[0].dtype), *args[1:])


def attach(base: nn.Module, adapter: Adapter) -> None:
    if isinstance(getattr(base, ADAPTER_ATTR, None), Adapter):
        raise InputError(f"{type(base).__name__} already has an adapter; remove it before adding another")
    adapter.on_attach(base)  # before any change to `base`, so a failure leaves it as it was
    adapter.train(base.training)  # a new module is in training mode; one attached to an eval-mode model must not be
    base.add_module(ADAPTER_ATTR, adapter)
    adapter._handles = adapter.hooks(base)


def detach(base: nn.Module) -> Adapter:
    adapter = getattr(base, ADAPTER_ATTR)
    for handle in adapter._handles:
        handle.remove()
    delattr(base, ADAPTER_ATTR)
    return adapter


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, Adapter]]:
    """(path of the adapted module, the module, its adapter) for every adapter in the model."""
    for name, module in model.named_modules():
        adapter = getattr(module, ADAPTER_ATTR, None)
        if isinstance(adapter, Adapter):
            yield name, module, adapter


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every adapter parameter by its full name in `model.state_dict()`: what an adapter file holds."""
    params = {}
    for name, _, adapter in adapter_layers(model):
        prefix = f"{name}.{ADAPTER_ATTR}." if name else f"{ADAPTER_ATTR}."
        # a name may be a dotted path into the adapter's own submodules (an encoder's "mlp.0.weight")
        params.update({prefix + n: adapter.get_parameter(n) for n in adapter.trainable_names()})
    return params
