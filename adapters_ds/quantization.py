"""A frozen base quantized to 4 or 8 bits (QLoRA: Dettmers et al. 2023, arXiv 2305.14314, section 3) in a form that
ZeRO-3 partitions like any other weight.

`--quantization nf4|fp4` keeps every linear layer of the decoder as 4-bit codes with one absmax per block of 64
weights (NF4: the normal-float code of the paper, section 3; FP4: bitsandbytes' 4-bit float); `--double_quant` stores
those absmax values in 8 bits as well (the paper's double quantization), `int8` keeps one int8 per weight with one
absmax per row. The codes and their scales come from bitsandbytes; the compute (adapters, activations, the
dequantized weight of one layer at a time) runs in the run's compute dtype.

Layout, the reason this module exists: ZeRO-3 partitions a parameter as a flat run of elements of one floating dtype
and knows nothing of a quantization state beside it. So each row of a quantized weight is one run of bytes (the
row's codes, then the scales of exactly those codes) and the rows are stored as one parameter whose dtype is the
compute dtype (bitsandbytes' `bnb_4bit_quant_storage` technique): `(out_features, row_bytes / element_size)`. DeepSpeed
partitions, gathers, offloads and persists it as bytes it never interprets, a rank's shard holds the scales of the
codes in it, and the layer dequantizes the gathered bytes in its forward. Quantizing is deterministic, so every
rank (and a 1-process run) derives the same bytes from the same checkpoint.

Loading: `quantize_model` runs after the partitioned bf16 load (`modeling.load_base_model_partitioned`), one layer
at a time: that layer's weight is gathered, quantized, and its quantized replacement is created under
`deepspeed.zero.Init`, which partitions it at once. No rank holds more than one layer of either form whole.

Every `nn.Linear` of the model is quantized except the output head (it is the input embedding when tied, and its
precision matters most: QLoRA keeps it too). Layers that are not `nn.Linear` (GPT-2's Conv1D, MoE experts kept as
fused 3-D parameters) stay in the compute dtype.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from adapters_ds.errors import InputError
from adapters_ds.zero import full_shape, gathered, is_partitioned

QuantKind = Literal["nf4", "fp4", "int8"]
QUANT_KINDS: tuple[str, ...] = ("nf4", "fp4", "int8")
BLOCK = 64  # 4-bit: weights per absmax (the paper's block size)
NESTED_BLOCK = 256  # double quantization: absmax values per second-level scale (the paper's)
FP32 = 4  # bytes of an fp32 scale
# on a CPU with AVX512-BF16, importing bitsandbytes tries to fetch an optional kernel from a model hub and logs the
# failure when offline (it then uses its own code): only noise
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _bnb() -> Any:
    """bitsandbytes' functional API, imported on first use (an optional dependency: the `quant` extra)."""
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        raise InputError("--quantization needs the bitsandbytes package: pip install 'adapters_ds[quant]'") from None
    return bnb_functional


@dataclass(frozen=True)
class QuantSpec:
    """How the base's linear layers are quantized."""

    kind: QuantKind
    """nf4 / fp4: 4-bit codes, one absmax per 64 weights; int8: one int8 per weight, one absmax per row."""
    double_quant: bool = False
    """4-bit only: the absmax values stored in 8 bits (a second-level fp32 scale per 256 of them, an fp32 offset
    per row)."""

    def __post_init__(self) -> None:
        if self.kind not in QUANT_KINDS:
            raise InputError(f"--quantization must be one of {', '.join(QUANT_KINDS)}, found {self.kind!r}")
        if self.double_quant and not self.four_bit:
            raise InputError("--double_quant applies to 4-bit quantization (nf4, fp4), not to int8")

    @property
    def four_bit(self) -> bool:
        return self.kind != "int8"

    def to_dict(self) -> dict[str, Any]:
        return {"quantization": self.kind, "double_quant": self.double_quant}


def add_quantization_options(parser: Any, help_text: str) -> None:
    """A command's `--quantization` ("none" or one of `QUANT_KINDS`; `help_text` says what it does there) and
    `--double_quant`, both the training run's; `spec_from_args` turns them into a spec."""
    parser.add_argument("--quantization", choices=("none", *QUANT_KINDS), default="none", help=help_text)
    parser.add_argument("--double_quant", action="store_true", help="the training run's --double_quant")


def spec_from_args(quantization: str | None, double_quant: bool) -> QuantSpec | None:
    """The spec of `--quantization` ("none" or None: no quantization) and `--double_quant`."""
    if quantization in (None, "none"):
        if double_quant:
            raise InputError("--double_quant needs --quantization nf4 or fp4")
        return None
    return QuantSpec(quantization, double_quant)


# ------------------------------------------------------------------------------------------------ one row's bytes


def row_sections(spec: QuantSpec, in_features: int) -> dict[str, tuple[int, int]]:
    """(offset, bytes) of each section of one stored row: the row's codes first, then their scales."""
    if spec.four_bit:
        blocks = in_features // BLOCK
        sizes = {"codes": in_features // 2}
        if spec.double_quant:
            sizes |= {"absmax_codes": blocks, "absmax_scale": math.ceil(blocks / NESTED_BLOCK) * FP32}
            sizes |= {"absmax_offset": FP32}
        else:
            sizes |= {"absmax": blocks * FP32}
    else:
        sizes = {"codes": in_features, "scale": FP32}
    sections, offset = {}, 0
    for name, size in sizes.items():
        sections[name] = (offset, size)
        offset += size
    return sections


def row_bytes(spec: QuantSpec, in_features: int, dtype: torch.dtype) -> int:
    """Bytes of one stored row, padded to whole elements of the storage dtype."""
    offset, size = list(row_sections(spec, in_features).values())[-1]
    unit = max(torch.empty((), dtype=dtype).element_size(), FP32)
    return -(-(offset + size) // unit) * unit


def check_quantizable(name: str, in_features: int, spec: QuantSpec) -> None:
    if spec.four_bit and in_features % BLOCK:
        raise InputError(
            f"cannot quantize {name!r} to {spec.kind}: its {in_features} input features are not a multiple of the "
            f"{BLOCK}-weight block (use --quantization int8, or no quantization)"
        )


def _section(rows: torch.Tensor, sections: dict[str, tuple[int, int]], name: str, dtype: torch.dtype) -> torch.Tensor:
    offset, size = sections[name]
    return rows[:, offset : offset + size].contiguous().view(dtype)  # (out, size / element size)


def quantize_weight(weight: torch.Tensor, spec: QuantSpec, dtype: torch.dtype) -> torch.Tensor:
    """The stored form of a dense (out, in) weight: (out, row_bytes / element size) in `dtype`, whose bytes are the
    rows' codes and scales (see the module docstring)."""
    bnb = _bnb()
    out_features, in_features = weight.shape
    sections = row_sections(spec, in_features)
    rows = torch.zeros(out_features, row_bytes(spec, in_features, dtype), dtype=torch.uint8, device=weight.device)

    def put(name: str, values: torch.Tensor) -> None:
        offset, size = sections[name]
        rows[:, offset : offset + size] = values.contiguous().view(torch.uint8).reshape(out_features, size)

    if spec.four_bit:
        codes, state = bnb.quantize_4bit(weight.contiguous(), blocksize=BLOCK, quant_type=spec.kind)
        put("codes", codes.reshape(out_features, in_features // 2))  # blocks never cross rows: in % 64 == 0
        absmax = state.absmax.float().reshape(out_features, in_features // BLOCK)  # (out, blocks)
        if spec.double_quant:
            offset = absmax.mean(dim=1, keepdim=True)  # (out, 1)
            nested = math.ceil(absmax.shape[1] / NESTED_BLOCK) * NESTED_BLOCK
            centred = F.pad(absmax - offset, (0, nested - absmax.shape[1]))  # each row's own second-level blocks
            absmax_codes, state2 = bnb.quantize_blockwise(centred.flatten(), blocksize=NESTED_BLOCK)
            put("absmax_codes", absmax_codes.reshape(out_features, nested)[:, : absmax.shape[1]])
            put("absmax_scale", state2.absmax.float().reshape(out_features, -1))
            put("absmax_offset", offset)
        else:
            put("absmax", absmax)
    else:
        codes, scale, _ = bnb.int8_vectorwise_quant(weight.contiguous())  # (out, in) int8, (out,) absmax
        put("codes", codes)
        put("scale", scale.float().reshape(out_features, 1))
    return rows.view(dtype)


def dequantize_weight(stored: torch.Tensor, spec: QuantSpec, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense (out, in) weight in `dtype` of a stored one (`quantize_weight`)."""
    bnb = _bnb()
    rows = stored.contiguous().view(torch.uint8)  # (out, row bytes)
    out_features = rows.shape[0]
    sections = row_sections(spec, in_features)
    codes = _section(rows, sections, "codes", torch.uint8)
    if not spec.four_bit:
        scale = _section(rows, sections, "scale", torch.float32)  # (out, 1)
        return bnb.int8_vectorwise_dequant(codes.view(torch.int8), scale.flatten()).to(dtype)
    if spec.double_quant:
        absmax_codes = _section(rows, sections, "absmax_codes", torch.uint8)  # (out, blocks)
        scale = _section(rows, sections, "absmax_scale", torch.float32)  # (out, nested blocks)
        offset = _section(rows, sections, "absmax_offset", torch.float32)  # (out, 1)
        table = bnb.create_dynamic_map(signed=True).to(rows.device)  # quantize_blockwise's code
        blocks = absmax_codes.shape[1]
        absmax = table[absmax_codes.long()] * scale.repeat_interleave(NESTED_BLOCK, dim=1)[:, :blocks] + offset
    else:
        absmax = _section(rows, sections, "absmax", torch.float32)  # (out, blocks)
    state = bnb.QuantState(
        absmax=absmax.flatten(), shape=torch.Size((out_features, in_features)),
        code=bnb.get_4bit_type(spec.kind, device=rows.device), blocksize=BLOCK, quant_type=spec.kind, dtype=dtype,
    )  # fmt: skip
    return bnb.dequantize_4bit(codes.reshape(-1, 1), quant_state=state)


# ------------------------------------------------------------------------------------------------ the layer


class QuantLinear(nn.Linear):
    """A frozen `nn.Linear` whose weight is stored quantized (`quantize_weight`): `weight` holds the bytes, in the
    compute dtype, shaped (out_features, row elements); `in_features`/`out_features` are the dense layer's, so
    adapters see the shapes of the layer they adapt. The forward dequantizes the (gathered) weight and applies it."""

    def __init__(self, in_features: int, out_features: int, stored: torch.Tensor, spec: QuantSpec) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a dense weight
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.weight = nn.Parameter(stored, requires_grad=False)
        self.register_parameter("bias", None)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight; under ZeRO-3 only while the weight is gathered (in the forward, or inside
        `zero.gathered`)."""
        return dequantize_weight(self.weight, self.spec, self.in_features, dtype or self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantizedLinear.apply(x, self.weight, self.bias, self.spec, self.in_features)

    def extra_repr(self) -> str:
        double = ", double_quant" if self.spec.double_quant else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.kind}{double}"


class _DequantizedLinear(torch.autograd.Function):
    """x @ dequantize(stored).T + bias, which keeps the stored bytes (not the dense weight) for the backward and
    dequantizes again there: a dense copy of every layer held from forward to backward would cost more than the
    bf16 base that quantization saves. Under ZeRO-3 the stored parameter is saved like any weight: DeepSpeed
    gathers it again for the module's backward. The weight and bias are frozen (no gradient)."""

    @staticmethod
    def forward(ctx, x, stored, bias, spec, in_features):  # type: ignore[override]
        ctx.save_for_backward(stored)
        ctx.spec, ctx.in_features = spec, in_features
        return F.linear(x, dequantize_weight(stored, spec, in_features, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (stored,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = dequantize_weight(stored, ctx.spec, ctx.in_features, grad_out.dtype)  # (out, in)
            grad_x = grad_out @ weight  # (..., in)
        return grad_x, None, None, None, None


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A linear layer's dense weight values: dequantized for a `QuantLinear`, the weight itself otherwise."""
    return module.dequantized() if isinstance(module, QuantLinear) else module.weight


def quantized_layers(model: nn.Module) -> list[str]:
    """Paths of the layers `quantize_model` replaces: every exact `nn.Linear` but the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not head]


def quantize_model(model: nn.Module, spec: QuantSpec, zero_config: dict[str, Any] | None = None) -> list[str]:
    """Replace the model's linear layers (`quantized_layers`) by `QuantLinear`s; returns their paths. Every layer
    is checked before the first one changes, so a refusal leaves the model as it was.

    Under ZeRO-3 (the weights are partitions) pass the run's resolved DeepSpeed config as `zero_config`: each layer
    is gathered alone, quantized, and its replacement partitioned at construction (`deepspeed.zero.Init`) with that
    config's placement (offload included). Call it on every rank, in the same order (gathers are collective)."""
    names = quantized_layers(model)
    if not names:
        raise InputError(f"the {type(model).__name__} has no nn.Linear layer to quantize")
    for name in names:
        check_quantizable(name, full_shape(model.get_submodule(name).weight)[1], spec)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        dense = getattr(parent, child)
        with gathered([dense.weight]):
            dtype = dense.weight.dtype
            stored = quantize_weight(dense.weight.data, spec, dtype)
        partition = is_partitioned(dense.weight)
        if partition and zero_config is None:
            raise ValueError("a ZeRO-3-partitioned model is quantized with its zero_config")
        with _partitioned_construction(zero_config) if partition else contextlib.nullcontext():
            layer = QuantLinear(dense.in_features, dense.out_features, stored, spec)
        del stored
        layer.bias = dense.bias  # already what it should be (a ZeRO-3 partition, or a plain tensor)
        layer.train(dense.training)  # a new module is in training mode; the model may not be
        setattr(parent, child, layer)
    return names


def _partitioned_construction(zero_config: dict[str, Any]) -> contextlib.AbstractContextManager:
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=zero_config)


def dequantize_model(model: nn.Module) -> int:
    """Replace every `QuantLinear` by an `nn.Linear` holding its dequantized weight (in the stored dtype): the
    weights the adapters were trained against, for merging and exporting. Not under ZeRO-3. Returns the count."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            parent_name, _, child = name.rpartition(".")
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              dtype=module.weight.dtype, device=module.weight.device)  # fmt: skip
            with torch.no_grad():
                dense.weight.copy_(module.dequantized())
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
            dense.requires_grad_(False)
            dense.train(module.training)
            setattr(model.get_submodule(parent_name), child, dense)
            count += 1
    return count


def round_trip(model: nn.Module, spec: QuantSpec | None) -> nn.Module:
    """The model with the weights a run with `--quantization` (`spec`) trained against: quantized, then dequantized
    into plain linear layers (for exporting: a merge or a pruned model in the checkpoint's dtype). No-op for None."""
    if spec is not None:
        quantize_model(model, spec)
        dequantize_model(model)
    return model
