"""Model families: everything the package knows about one `transformers` architecture, in one record per family.

A `Family` (keyed by `config.model_type`) holds the module layout (where a block keeps its attention and MLP
projections), whether packed rows keep examples apart (`training.packing`), whether DeepSpeed's AutoTP sharding is
supported (`evaluation.tensor_parallel`), whether prefix tuning can put its keys in front of the attention's
(`adapters.prefix`), and the quirks those parts must know (ALiBi, positions counted from the attention mask). Every
part asks the record (`family_of`, `find_family`); no other module keeps a list of model types, so a new family is
one `register_family` call, in the package or in a plugin module (`ADAPTERS_DS_METHODS` imports it in every command).

Adapter methods pick their default targets by *role* (`ROLES`: q, k, v, o, mlp_gate, mlp_up, mlp_down), so a new
method names roles, not modules; the pruning export and the pruned-model loader read the prunable dimensions from
the same layouts. Module paths are relative to one block.

Also here: the shape facts of an adaptable linear layer (`linear_dims`), read from module attributes so that they
work on ZeRO-3 partitions, whose weights have no shape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from torch import nn
from transformers.pytorch_utils import Conv1D

from adapters_ds.errors import InputError

Role = Literal["q", "k", "v", "o", "mlp_gate", "mlp_up", "mlp_down"]
ROLES: tuple[Role, ...] = ("q", "k", "v", "o", "mlp_gate", "mlp_up", "mlp_down")
ATTENTION_ROLES: tuple[Role, ...] = ("q", "k", "v", "o")
MLP_ROLES: tuple[Role, ...] = ("mlp_gate", "mlp_up", "mlp_down")


def _set_attrs(**names: str) -> Callable[[nn.Module, int, int, int], None]:
    """A patch that sets attention-module attributes from (heads, kv_heads, head_dim) after a resize."""

    def patch(attention: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
        values = {"heads": heads, "groups": heads // kv_heads, "width": heads * head_dim}
        for attr, what in names.items():
            setattr(attention, attr, values[what])

    return patch


@dataclass(frozen=True)
class Layout:
    """Where a family keeps the prunable dimensions of a block (module paths relative to the block)."""

    blocks: str  # the ModuleList of blocks, relative to the model
    attention: str
    o: str  # attention output projection: its columns are the heads
    mlp_in: tuple[str, ...]  # MLP producers, the gate projection first: their rows are the intermediate units
    mlp_out: str | None  # MLP consumer: its columns are the intermediate units (None: a mixture of experts)
    q: str | None = None  # separate projections ...
    k: str | None = None
    v: str | None = None
    qkv: str | None = None  # ... or one fused projection
    qkv_order: Literal["per_head", "qkv"] = "per_head"  # [q k v] per head (NeoX, BLOOM) or [Q | K | V] (GPT-2)
    gqa: bool = False  # num_key_value_heads < num_attention_heads possible
    patch: Callable[[nn.Module, int, int, int], None] | None = None  # None: heads are never removed
    config_intermediate: str | None = None  # config field of the MLP width (None: not configurable)
    config_heads: bool = False  # num_attention_heads / num_key_value_heads / head_dim in the config
    why_heads_kept: str = ""
    # A mixture-of-experts MLP: the module holding every expert as fused 3-D parameters (`gate_up_proj`
    # (experts, 2 · I, hidden), `down_proj` (experts, hidden, I)) and its router (a linear layer, frozen by default).
    experts: str | None = None
    router: str | None = None
    fused_gate_up: bool = False  # the one MLP producer holds [gate | up] rows (Phi-3's gate_up_proj)


_LLAMA = Layout(
    blocks="model.layers",
    attention="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    gqa=True,
    patch=_set_attrs(num_key_value_groups="groups"),
    config_intermediate="intermediate_size",
    config_heads=True,
)

_PHI3 = Layout(
    blocks="model.layers",
    attention="self_attn",
    qkv="self_attn.qkv_proj",  # [Q | K | V], K and V with the key/value heads
    qkv_order="qkv",
    o="self_attn.o_proj",
    mlp_in=("mlp.gate_up_proj",),  # [gate | up] in one matrix: the gate role has no module of its own
    mlp_out="mlp.down_proj",
    gqa=True,
    fused_gate_up=True,
)
_MOE = Layout(
    blocks="model.layers",
    attention="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    mlp_in=(),
    mlp_out=None,
    gqa=True,
    experts="mlp.experts",
    router="mlp.gate",
)
_FUSED_PRUNING = "its gate and up projections are one fused matrix, which the pruning export does not split"
_MOE_PRUNING = "its MLP is a mixture of experts (fused 3-D expert parameters), which unit gates do not prune"
_SOFTCAP = "its attention logits are soft-capped, which transformers' sdpa attention (the prefix kernel) omits"

# BLOOM's ALiBi, written once: each head's attention bias is a slope from the head's index and the head count,
# computed in BLOOM's own attention code (not transformers' attention interface) from the attention mask.
_ALIBI = "its ALiBi attention bias (a slope per head, from the head's index and the head count) is BLOOM's own code"
UNTESTED_TP = "DeepSpeed's AutoTP sharding of this family is not tested here"
# What AutoTP's per-rank shards of q_proj/k_proj (or of a fused qkv_proj) break, checked against the unsharded model.
_WHOLE_QK_NORM = (
    "its q_norm/k_norm normalise the whole q and k projections across all heads, while AutoTP gives each rank a "
    "slice of the heads"
)
_QKV_SLICED_BY_CONFIG = (
    "its attention splits the fused qkv_proj output at offsets from the config's head counts, which AutoTP's "
    "per-rank shard of qkv_proj does not have"
)


@dataclass(frozen=True)
class Family:
    """One model family: what every part of the package must know about it. A reason string means "not supported,
    because ..."; None means supported (and tested)."""

    model_type: str  # `config.model_type`
    layout: Layout
    packing: str | None = None  # why packed rows would mix examples (then it trains on padded batches)
    tensor_parallel: str | None = UNTESTED_TP  # why `--tensor_parallel N > 1` is refused (None: AutoTP tested)
    prefix: str | None = None  # why prefix tuning cannot be applied
    positions_from_mask: bool = False  # default position ids count the unpadded tokens (OPT), not 0, 1, ...
    pruning: str | None = None  # why unit gates and the pruning export cannot work on it


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Make `family` known to every part of the package (the default targets, packing, tensor-parallel evaluation,
    prefix tuning, pruning, gates). Registering the same record again is a no-op; a different record for a known
    model type is an error."""
    known = _FAMILIES.get(family.model_type)
    if known is not None and known != family:
        raise ValueError(f"model family {family.model_type!r} is already registered with another record")
    _FAMILIES[family.model_type] = family
    return family


def families() -> dict[str, Family]:
    """The registered families by model type (a copy)."""
    return dict(_FAMILIES)


def find_family(model_type: str | None) -> Family | None:
    return _FAMILIES.get(model_type) if model_type is not None else None


# How to go on with a model type that has no record: the end of every such error.
_WITHOUT_RECORD = (
    "LoRA, series and parallel adapters work on any model with --target_modules (module names, or an experts "
    "module's parameter such as experts.down_proj); prompt and P-tuning need no record; for anything else register "
    "a record (adapters_ds.families.register_family, e.g. in a module named by ADAPTERS_DS_METHODS)"
)


def family_of(model_type: str, needed_for: str) -> Family:
    """The record of `model_type`; for an unknown one an error saying what `needed_for` needs and how to go on."""
    if model_type not in _FAMILIES:
        raise InputError(
            f"{needed_for} needs a known model family; {model_type!r} has no record (known: {sorted(_FAMILIES)}); "
            + _WITHOUT_RECORD
        )
    return _FAMILIES[model_type]


def _llama_like(model_type: str, tensor_parallel: str | None = UNTESTED_TP) -> Family:
    return Family(model_type, _LLAMA, tensor_parallel=tensor_parallel)


for _family in (
    _llama_like("llama", tensor_parallel=None),
    _llama_like("mistral", tensor_parallel=None),
    _llama_like("qwen2", tensor_parallel=None),
    _llama_like("qwen3", tensor_parallel=None),
    _llama_like("olmo2", tensor_parallel=_WHOLE_QK_NORM),
    _llama_like("granite", tensor_parallel=None),
    Family("gemma2", _LLAMA, prefix=_SOFTCAP, tensor_parallel=None),
    Family("gemma3_text", _LLAMA, tensor_parallel=None),
    Family("phi3", _PHI3, pruning=_FUSED_PRUNING, tensor_parallel=_QKV_SLICED_BY_CONFIG),
    # AutoTP shards a mixture of experts' attention; the fused 3-D expert parameters stay whole on every rank
    Family("mixtral", _MOE, pruning=_MOE_PRUNING, tensor_parallel=None),
    Family("qwen3_moe", _MOE, pruning=_MOE_PRUNING, tensor_parallel=None),
    Family("olmoe", _MOE, pruning=_MOE_PRUNING, tensor_parallel=_WHOLE_QK_NORM),
    Family(
        "gpt_neox",
        Layout(
            blocks="gpt_neox.layers",
            attention="attention",
            qkv="attention.query_key_value",
            qkv_order="per_head",
            o="attention.dense",
            mlp_in=("mlp.dense_h_to_4h",),
            mlp_out="mlp.dense_4h_to_h",
            patch=_set_attrs(),  # its forward infers the head count from the projection width
            config_intermediate="intermediate_size",
        ),
        tensor_parallel=None,
    ),
    Family(
        "bloom",
        Layout(
            blocks="transformer.h",
            attention="self_attention",
            qkv="self_attention.query_key_value",
            o="self_attention.dense",
            mlp_in=("mlp.dense_h_to_4h",),
            mlp_out="mlp.dense_4h_to_h",
            why_heads_kept=f"{_ALIBI}: removing a head would change the others' slopes",
        ),
        packing=f"{_ALIBI}, built from the padding mask, so packed examples would see each other",
        tensor_parallel=f"{_ALIBI}, and DeepSpeed's AutoTP leaves it unsharded under transformers 5 (its fix patches "
        "a method transformers 5 no longer calls), so each rank's attention gets every head's bias",
        prefix=f"{_ALIBI}, outside transformers' attention interface",
    ),
    Family(
        "gptj",
        Layout(
            blocks="transformer.h",
            attention="attn",
            q="attn.q_proj",
            k="attn.k_proj",
            v="attn.v_proj",
            o="attn.out_proj",
            mlp_in=("mlp.fc_in",),
            mlp_out="mlp.fc_out",
            patch=_set_attrs(num_attention_heads="heads"),
            config_intermediate="n_inner",
        ),
        tensor_parallel=None,
    ),
    Family(
        "opt",
        Layout(
            blocks="model.decoder.layers",
            attention="self_attn",
            q="self_attn.q_proj",
            k="self_attn.k_proj",
            v="self_attn.v_proj",
            o="self_attn.out_proj",
            mlp_in=("fc1",),
            mlp_out="fc2",
            patch=_set_attrs(num_heads="heads"),
            config_intermediate="ffn_dim",
        ),
        packing="its learned positions are counted from the attention mask, which a packed row does not restart",
        tensor_parallel=None,
        positions_from_mask=True,
    ),
    Family(
        "gpt2",
        Layout(
            blocks="transformer.h",
            attention="attn",
            qkv="attn.c_attn",
            qkv_order="qkv",
            o="attn.c_proj",
            mlp_in=("mlp.c_fc",),
            mlp_out="mlp.c_proj",
            patch=_set_attrs(num_heads="heads", split_size="width"),
            config_intermediate="n_inner",
        ),
        tensor_parallel="DeepSpeed's AutoTP does not shard GPT-2 (its Conv1D layers; AutoTP lists the family as "
        "unsupported)",
    ),
):
    register_family(_family)


def layout_of(model_type: str) -> Layout:
    """The layout pruning (unit gates, the pruning export, the pruned-model loader) works from."""
    family = family_of(model_type, "gates and pruning")
    if family.pruning is not None:
        raise InputError(f"gates and pruning cannot be applied to {model_type} models: {family.pruning}")
    return family.layout


def role_paths(layout: Layout, role: Role) -> tuple[str, ...]:
    """The block-relative module paths that play `role` (fused q/k/v projections play all three)."""
    if role in ("q", "k", "v"):
        separate = getattr(layout, role)
        return (separate,) if separate is not None else (layout.qkv,)
    if role == "o":
        return (layout.o,)
    if role == "mlp_gate":
        return layout.mlp_in[:-1]
    if role == "mlp_up":
        return layout.mlp_in[-1:]
    return (layout.mlp_out,) if layout.mlp_out is not None else ()


def default_targets(model_type: str, roles: Iterable[Role], method: str, experts: bool = False) -> tuple[str, ...]:
    """Target module names for `roles` in this family, in role order without repeats.

    Each name is the shortest suffix of the module path that no other module of the block shares (`q_proj`, but
    `mlp.c_proj` for GPT-2, whose attention output is `attn.c_proj`): what the target matching rule needs. In a
    mixture-of-experts family the MLP roles are played by the experts module, which only a method that adapts
    fused expert parameters (`experts`) can take; for any other method the MLP roles are an error.
    """
    family = find_family(model_type)
    if family is None:
        raise InputError(
            f"adapter method {method!r} has no default target modules for model type {model_type!r}, which has no "
            f"record (known: {sorted(_FAMILIES)}); " + _WITHOUT_RECORD
        )
    layout, roles = family.layout, tuple(roles)
    if layout.experts is not None and any(r in MLP_ROLES for r in roles) and not experts:
        raise InputError(
            f"adapter method {method!r} cannot adapt the MLP of {model_type} models: it is a mixture of experts "
            "(fused 3-D expert parameters, no linear layer); give --target_modules with attention modules (e.g. "
            "o_proj)"
        )
    every = [p for r in ROLES for p in role_paths(layout, r)]
    paths = [p for r in roles for p in role_paths(layout, r)]
    if layout.experts is not None and any(r in MLP_ROLES for r in roles):
        paths.append(layout.experts)
        every.append(layout.experts)
    names = [_short_name(p, every) for p in paths]
    if not names:
        raise InputError(
            f"adapter method {method!r} has no default target modules for model type {model_type!r}; "
            "give --target_modules explicitly"
        )
    return tuple(dict.fromkeys(names))


def fused_up_rows(model_type: str, module_path: str) -> bool:
    """Whether the module at `module_path` is a fused [gate | up] projection, whose second half of output rows is
    the up projection (an adapter that adds to the up role's output writes there only)."""
    family = find_family(model_type)
    if family is None or not family.layout.fused_gate_up:
        return False
    fused = family.layout.mlp_in[-1]
    return module_path == fused or module_path.endswith("." + fused)


def _short_name(path: str, every: list[str]) -> str:
    parts = path.split(".")
    for k in range(1, len(parts) + 1):
        name = ".".join(parts[-k:])
        if not any(other != path and (other == name or other.endswith("." + name)) for other in every):
            return name
    return path


@dataclass(frozen=True)
class LinearDims:
    """Shape facts of an adaptable base layer, read without touching (possibly partitioned) weights."""

    in_features: int
    out_features: int
    transposed: bool  # GPT-2's Conv1D stores its weight as (in, out)


def linear_dims(name: str, module: nn.Module) -> LinearDims:
    if isinstance(module, nn.Linear):
        return LinearDims(module.in_features, module.out_features, transposed=False)
    if isinstance(module, Conv1D):
        return LinearDims(module.nx, module.nf, transposed=True)
    raise InputError(f"module {name!r} is a {type(module).__name__}; expected nn.Linear or Conv1D")
