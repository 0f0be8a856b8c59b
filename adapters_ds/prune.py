"""Export a stochastic-gates adapter as a physically smaller model (FineGates, arXiv 2412.12951, section 3).

Folding. A gated layer y = z_r ⊙ ((W + s·BA)(z_c ⊙ x) + b) in evaluation mode *is* the plain layer
W' = diag(z_r) (W + s·BA) diag(z_c), b' = z_r ⊙ b (computed in fp32, cast back to the base dtype). Every gated
layer is folded first, so the outputs are the gated model's evaluation-mode outputs whatever is removed after.

Removal. A unit with z = 0 is cut out where the dimension is private to one block, with the index sets aligned
across producer and consumer so both sides shrink:
- MLP intermediate: unit j stays iff its row is open in every producer (gate_proj and up_proj, fc1, fc_in, c_fc,
  dense_h_to_4h) and its column open in the consumer (down_proj, fc2, fc_out, c_proj, dense_4h_to_h). A closed
  producer row makes the unit act(0) = 0 (SiLU, GELU, ReLU; times up_proj for LLaMA) and a closed consumer
  column ignores it, so either suffices.
- Attention heads: head h is dead iff all its columns of the output projection are closed, or all rows of its
  value head are (v = 0, so its output is 0). Closed query or key rows do *not* kill a head (its softmax turns
  uniform, its output the mean of the values): they are folded, not removed. Grouped-query attention: a KV group
  goes when all its query heads are dead, and every kept group keeps the same number of query heads (the most
  alive in any group, the rest filled with dead heads of the group, which contribute exactly 0), because
  transformers repeats each KV head a fixed number of times.
- The hidden (residual) dimension is shared by every block, the embeddings and the norms: closed columns of
  q/k/v/gate/up and closed rows of o/down are folded to zeros, not removed.
At least one head and one MLP unit stay in each block (all-dead blocks keep one that contributes 0), so no
module has a zero-sized dimension.

Per family (`LAYOUTS`): LLaMA, Mistral, Qwen2 (separate q/k/v, GQA); GPT-J and OPT (separate q/k/v, one KV
head per query head); GPT-NeoX (fused query_key_value laid out per head as [q k v]: whole heads are contiguous
rows); GPT-2 (fused c_attn laid out [Q | K | V]: a head's rows are gathered from the three blocks). BLOOM keeps
all its heads: ALiBi gives head i a slope that depends on i and the head count, so removing a head would change
the others' biases. Its MLP is pruned.

Output folder: `config.json`, `model.safetensors` (the tokenizer too where the base has one) and
`pruned_shapes.json` with the per-layer shapes (heads, KV heads, head size, MLP width), the kept indices and the
parameter counts. Where every layer has the same shapes and the family's config can state them (MLP width for
all families but BLOOM; heads only for the LLaMA-like configs, which have `head_dim`), `config.json` holds the
smaller sizes and plain `AutoModelForCausalLM.from_pretrained` loads the folder. Otherwise `config.json` keeps
the base sizes and `load_pruned_model` (reached through `adapters_ds.modeling.load_base_model`) builds the
plain `transformers` class and resizes each layer's modules to the recorded shapes before loading the weights.
`uniform=True` (`export --prune --uniform_shapes`) pads every layer to the largest kept sizes (with dead units,
outputs unchanged) so that plain `from_pretrained` works, at some cost in speed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from adapters_ds.errors import InputError
from adapters_ds.fileio import atomic_dir, read_json, write_json
from adapters_ds.gates import Gates, GatesConfig
from adapters_ds.inject import adapter_layers, remove_adapters
from adapters_ds.layer import linear_dims

SHAPES_NAME = "pruned_shapes.json"
FORMAT = "adapters_ds_pruned"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------------ family layouts


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
    mlp_in: tuple[str, ...]  # MLP producers: their rows are the intermediate units
    mlp_out: str  # MLP consumer: its columns are the intermediate units
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

LAYOUTS: dict[str, Layout] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt_neox": Layout(
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
    "bloom": Layout(
        blocks="transformer.h",
        attention="self_attention",
        qkv="self_attention.query_key_value",
        o="self_attention.dense",
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h",
        why_heads_kept="ALiBi slopes depend on each head's index and the head count",
    ),
    "gptj": Layout(
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
    "opt": Layout(
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
    "gpt2": Layout(
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
}


def layout_of(model_type: str) -> Layout:
    if model_type not in LAYOUTS:
        raise InputError(f"pruning export supports model types {sorted(LAYOUTS)}; this model is {model_type!r}")
    return LAYOUTS[model_type]


# ------------------------------------------------------------------------------------------------ shapes and plans


@dataclass(frozen=True)
class Geometry:
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def rep(self) -> int:
        return self.heads // self.kv_heads


def geometry(config: Any, block: nn.Module, layout: Layout) -> Geometry:
    """The base model's block geometry (read from the config and the module attributes, never the weights)."""
    heads = config.num_attention_heads
    kv_heads = (getattr(config, "num_key_value_heads", None) or heads) if layout.gqa else heads
    o_dims = linear_dims(layout.o, block.get_submodule(layout.o))
    inter = linear_dims(layout.mlp_out, block.get_submodule(layout.mlp_out)).in_features
    return Geometry(heads, kv_heads, o_dims.in_features // heads, inter)


@dataclass
class BlockPlan:
    """What one block keeps: query heads per kept KV group (original indices) and MLP units."""

    groups: list[tuple[int, list[int]]]  # (kv group, its kept query heads), ascending
    intermediate: list[int]  # kept MLP units, ascending

    @property
    def heads(self) -> list[int]:
        return [h for _, hs in self.groups for h in hs]

    @property
    def kv_heads(self) -> list[int]:
        return [g for g, _ in self.groups]


def _rows_of_heads(heads: list[int], head_dim: int, stride: int | None = None) -> torch.Tensor:
    """Indices of `head_dim` rows per head, head h starting at h * stride."""
    stride = head_dim if stride is None else stride
    return torch.cat([torch.arange(h * stride, h * stride + head_dim) for h in heads])


def plan_block(layout: Layout, geo: Geometry, z_rows: Callable, z_cols: Callable) -> BlockPlan:
    """Kept units of one block from its evaluation-mode gates; `z_rows(rel)` / `z_cols(rel)` give a module's
    gate vector, or None where the module is not gated (all open)."""
    alive = torch.ones(geo.intermediate, dtype=torch.bool)
    for name in layout.mlp_in:
        if (z := z_rows(name)) is not None:
            alive &= z > 0
    if (z := z_cols(layout.mlp_out)) is not None:
        alive &= z > 0
    units = alive.nonzero().flatten().tolist() or [0]  # a fully dead MLP keeps one unit: its output is 0

    dead = torch.zeros(geo.heads, dtype=torch.bool)
    if layout.patch is not None:
        if (z := z_cols(layout.o)) is not None:
            dead |= (z.view(geo.heads, geo.head_dim) == 0).all(dim=1)
        z_v = None
        if layout.v is not None and (z := z_rows(layout.v)) is not None:
            z_v = z.view(geo.kv_heads, geo.head_dim).repeat_interleave(geo.rep, dim=0)
        elif layout.qkv is not None and (z := z_rows(layout.qkv)) is not None:
            if layout.qkv_order == "per_head":
                z_v = z.view(geo.heads, 3, geo.head_dim)[:, 2]
            else:
                z_v = z.view(3, geo.heads, geo.head_dim)[2]
        if z_v is not None:
            dead |= (z_v == 0).all(dim=1)
    groups = []
    for g in range(geo.kv_heads):
        members = list(range(g * geo.rep, (g + 1) * geo.rep))
        living = [h for h in members if not dead[h]]
        if living:
            groups.append((g, living))
    rep = max((len(hs) for _, hs in groups), default=1)
    if not groups:
        groups = [(0, [0])]  # a fully dead attention keeps one head: its output is 0
    groups = [(g, _fill(hs, range(g * geo.rep, (g + 1) * geo.rep), rep)) for g, hs in groups]
    return BlockPlan(groups, units)


def _fill(kept: list[int], candidates: range | list[int], size: int) -> list[int]:
    """`kept` plus the first other candidates, up to `size`, ascending."""
    have = set(kept)
    extra = [c for c in dict.fromkeys(candidates) if c not in have][: size - len(kept)]
    return sorted([*kept, *extra])


def make_uniform(plans: list[BlockPlan], geo: Geometry, layout: Layout) -> list[BlockPlan]:
    """Pad every block to the largest kept sizes with dead units (every unit a plan leaves out is dead, and a
    dead unit contributes exactly 0)."""
    if layout.config_intermediate is None:
        raise InputError(
            "uniform shapes need the MLP width in the model config, which this family's config does not have; "
            "export without --uniform_shapes (the folder then loads through adapters_ds)"
        )
    width = max(len(p.intermediate) for p in plans)
    out = []
    for plan in plans:
        units = _fill(plan.intermediate, range(geo.intermediate), width)
        if layout.config_heads:
            n_groups = max(len(p.groups) for p in plans)
            rep = max(len(hs) for p in plans for _, hs in p.groups)
            kept = dict(plan.groups)
            for g in _fill(list(kept), range(geo.kv_heads), n_groups):
                kept[g] = _fill(kept.get(g, []), range(g * geo.rep, (g + 1) * geo.rep), rep)
            groups = sorted(kept.items())
        else:  # the config cannot state fewer heads: keep them all
            groups = [(g, list(range(g * geo.rep, (g + 1) * geo.rep))) for g in range(geo.kv_heads)]
        out.append(BlockPlan(groups, units))
    return out


def shape_of(plan: BlockPlan, geo: Geometry) -> dict[str, int]:
    return {
        "heads": len(plan.heads),
        "kv_heads": len(plan.kv_heads),
        "head_dim": geo.head_dim,
        "intermediate": len(plan.intermediate),
    }


# ------------------------------------------------------------------------------------------------ module surgery


def _weight_out_in(module: nn.Module) -> torch.Tensor:
    return module.weight.T if isinstance(module, Conv1D) else module.weight  # (out, in)


def _new_linear(module: nn.Module, out_features: int, in_features: int) -> nn.Module:
    """An empty module of `module`'s kind, dtype and device with the given sizes."""
    dtype, device = module.weight.dtype, module.weight.device
    if isinstance(module, Conv1D):
        new = Conv1D(out_features, in_features)
        return new.to(dtype=dtype, device=device)
    return nn.Linear(in_features, out_features, bias=module.bias is not None, dtype=dtype, device=device)


def _index_sets(layout: Layout, geo: Geometry, shape_or_plan: BlockPlan | dict) -> dict[str, tuple]:
    """(rows, cols) to keep per module path, as index tensors (None: all), for a plan or (when loading) only
    the sizes: then the first indices, which is all a resize needs."""
    if isinstance(shape_or_plan, BlockPlan):
        heads, kv, units = shape_or_plan.heads, shape_or_plan.kv_heads, shape_or_plan.intermediate
    else:
        heads = list(range(shape_or_plan["heads"]))
        kv = list(range(shape_or_plan["kv_heads"]))
        units = list(range(shape_or_plan["intermediate"]))
    hd = geo.head_dim
    units_t = torch.tensor(units)
    sets: dict[str, tuple] = {name: (units_t, None) for name in layout.mlp_in}
    sets[layout.mlp_out] = (None, units_t)
    if layout.patch is None:
        return sets
    heads_rows = _rows_of_heads(heads, hd)
    sets[layout.o] = (None, heads_rows)
    if layout.q is not None:
        kv_rows = _rows_of_heads(kv, hd)
        sets[layout.q] = (heads_rows, None)
        sets[layout.k] = (kv_rows, None)
        sets[layout.v] = (kv_rows, None)
    elif layout.qkv_order == "per_head":
        sets[layout.qkv] = (_rows_of_heads(heads, 3 * hd, stride=3 * hd), None)
    else:
        width = geo.heads * hd
        sets[layout.qkv] = (torch.cat([heads_rows, heads_rows + width, heads_rows + 2 * width]), None)
    return sets


@torch.no_grad()
def _shrink_block(block: nn.Module, layout: Layout, geo: Geometry, target: BlockPlan | dict, copy: bool) -> None:
    """Replace the block's prunable modules by smaller ones; with `copy`, holding the kept rows and columns."""
    for name, (rows, cols) in _index_sets(layout, geo, target).items():
        module = block.get_submodule(name)
        weight = _weight_out_in(module)
        out_features = weight.shape[0] if rows is None else len(rows)
        in_features = weight.shape[1] if cols is None else len(cols)
        if (out_features, in_features) == tuple(weight.shape):
            continue
        new = _new_linear(module, out_features, in_features)
        if copy:
            kept = weight if rows is None else weight[rows]
            kept = kept if cols is None else kept[:, cols]
            _weight_out_in(new).copy_(kept)
            if module.bias is not None:
                new.bias.copy_(module.bias if rows is None else module.bias[rows])
        parent, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, child, new)
    if layout.patch is not None:
        n_heads = len(target.heads) if isinstance(target, BlockPlan) else target["heads"]
        n_kv = len(target.kv_heads) if isinstance(target, BlockPlan) else target["kv_heads"]
        layout.patch(block.get_submodule(layout.attention), n_heads, n_kv, geo.head_dim)


@torch.no_grad()
def fold_gates(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fold every gates adapter into its base layer (W' = z_r (W + sBA) z_c, b' = z_r b, in fp32) and remove
    the adapters; returns the evaluation-mode gates {module path: (z_rows, z_cols)}."""
    layers = list(adapter_layers(model))
    if not layers:
        raise InputError("the model has no adapters: pruning needs a stochastic-gates adapter")
    others = sorted({type(a).__name__ for _, _, a in layers if not isinstance(a, Gates)})
    if others:
        raise InputError(f"pruning needs a stochastic-gates adapter; this model holds {others} adapters")
    gates = {}
    for name, base, adapter in layers:
        z_rows, z_cols = adapter.eval_gates()
        weight = _weight_out_in(base)
        folded = weight.float()
        if (delta := adapter.delta_weight()) is not None:
            folded = folded + delta
        weight.copy_((folded * z_rows[:, None] * z_cols[None, :]).to(weight.dtype))
        if base.bias is not None:
            base.bias.copy_((base.bias.float() * z_rows).to(base.bias.dtype))
        gates[name] = (z_rows.cpu(), z_cols.cpu())
    remove_adapters(model)
    return gates


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def prune_model(model: PreTrainedModel, uniform: bool = False) -> dict[str, Any]:
    """Fold the gates into `model` and cut out the removable units, in place. Returns the shapes record
    (what `pruned_shapes.json` holds, less the file provenance); updates `model.config` where it can state them."""
    layout = layout_of(model.config.model_type)
    blocks = model.get_submodule(layout.blocks)
    geo = geometry(model.config, blocks[0], layout)
    gates = fold_gates(model)
    base_params, base_block_params = _numel(model), _numel(blocks)  # the adapters are gone: the base's own

    def lookup(i: int, side: int) -> Callable:
        return lambda rel: gates.get(f"{layout.blocks}.{i}.{rel}", (None, None))[side]

    plans = [plan_block(layout, geo, lookup(i, 0), lookup(i, 1)) for i in range(len(blocks))]
    if uniform:
        plans = make_uniform(plans, geo, layout)
    for block, plan in zip(blocks, plans, strict=True):
        _shrink_block(block, layout, geo, plan, copy=True)
    shapes = [shape_of(plan, geo) for plan in plans]
    loads_plain = _write_config_sizes(model.config, layout, geo, shapes)
    pruned, pruned_blocks = _numel(model), _numel(blocks)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_type": model.config.model_type,
        "architecture": type(model).__name__,
        "loads_with_transformers": loads_plain,
        "heads_pruned": layout.patch is not None,
        "heads_kept_because": layout.why_heads_kept or None,
        "layers": shapes,
        "kept": [{"heads": p.heads, "kv_heads": p.kv_heads, "intermediate": p.intermediate} for p in plans],
        "parameters": {
            "base": base_params,
            "pruned": pruned,
            "removed": base_params - pruned,
            "removed_fraction": (base_params - pruned) / base_params,
            "blocks_base": base_block_params,
            "blocks_pruned": pruned_blocks,
            "blocks_removed_fraction": (base_block_params - pruned_blocks) / base_block_params,
        },
    }


def _write_config_sizes(config: Any, layout: Layout, geo: Geometry, shapes: list[dict[str, int]]) -> bool:
    """Write uniform smaller sizes into the config where it can state them; True if plain transformers loads
    the result. Per-layer shapes leave the base sizes in the config."""
    base = {"heads": geo.heads, "kv_heads": geo.kv_heads, "head_dim": geo.head_dim, "intermediate": geo.intermediate}
    if any(s != shapes[0] for s in shapes):
        return all(s == base for s in shapes)
    shape = shapes[0]
    heads_changed = (shape["heads"], shape["kv_heads"]) != (geo.heads, geo.kv_heads)
    mlp_changed = shape["intermediate"] != geo.intermediate
    if (heads_changed and not layout.config_heads) or (mlp_changed and layout.config_intermediate is None):
        return False
    if mlp_changed:
        setattr(config, layout.config_intermediate, shape["intermediate"])
    if heads_changed:
        config.num_attention_heads = shape["heads"]
        config.num_key_value_heads = shape["kv_heads"]
        config.head_dim = geo.head_dim  # no longer hidden_size // num_attention_heads
    return True


# ------------------------------------------------------------------------------------------------ files


def export_pruned(
    base_model: str, adapter_dir: str, output_dir: str, uniform: bool = False, dtype: str = "auto"
) -> dict[str, Any]:
    """Base model + gates adapter → a smaller model folder (see the module docstring). Returns the shapes record.

    `dtype` is that of the written weights: "auto" keeps the base checkpoint's (the folded gates and LoRA are
    rounded to it, as a LoRA merge is); "float32" keeps the gated model's outputs exactly."""
    from adapters_ds.modeling import has_tokenizer, load_base_model, load_tokenizer
    from adapters_ds.storage import load_adapter, read_adapter_config, read_adapter_tensors

    config, _ = read_adapter_config(adapter_dir)  # a wrong or corrupt adapter fails before the (slow) model load
    if not isinstance(config, GatesConfig):
        raise InputError(f"--prune needs a stochastic-gates adapter; {adapter_dir!r} holds a {config.method} adapter")
    read_adapter_tensors(adapter_dir)
    model = load_base_model(base_model, dtype=dtype)
    load_adapter(model, adapter_dir)
    record = prune_model(model.eval(), uniform=uniform)
    record.update(base_model=base_model, adapter_dir=str(adapter_dir))
    with atomic_dir(output_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        write_json(tmp / SHAPES_NAME, record)
        if has_tokenizer(base_model):
            load_tokenizer(base_model).save_pretrained(tmp)
    return record


def read_shapes(path: str | Path) -> dict[str, Any]:
    record = read_json(Path(path) / SHAPES_NAME, "pruned shapes")
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise InputError(f"{str(path)!r}: {SHAPES_NAME} is not an adapters_ds pruned-model record")
    if record.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"{str(path)!r}: pruned format version {record.get('format_version')}, expected {FORMAT_VERSION}"
        )
    return record


def needs_pruned_loader(path: str | Path) -> bool:
    """True for a pruned folder whose per-layer shapes plain `from_pretrained` cannot build."""
    return (Path(path) / SHAPES_NAME).is_file() and not read_shapes(path)["loads_with_transformers"]


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        if not (path / name).is_file():
            raise InputError(f"pruned model weights not found: {str(path / name)!r}")
        state.update(load_file(str(path / name)))
    return state


def load_pruned_model(path: str | Path, dtype: torch.dtype | str = "auto") -> PreTrainedModel:
    """The plain `transformers` model class of a pruned folder, each layer resized to its recorded shapes."""
    from transformers.initialization import no_init_weights
    from transformers.integrations import is_deepspeed_zero3_enabled

    path = Path(path)
    record = read_shapes(path)
    if is_deepspeed_zero3_enabled():
        raise InputError(f"{str(path)!r} has per-layer shapes, which cannot be loaded ZeRO-3-partitioned; use ZeRO-2")
    config = AutoConfig.from_pretrained(path)
    layout = layout_of(config.model_type)
    torch_dtype = dtype
    if dtype == "auto":  # the checkpoint's own dtype, as from_pretrained's "auto"
        torch_dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(torch_dtype, str):
        torch_dtype = getattr(torch, torch_dtype)
    with no_init_weights():  # every weight is loaded below
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        blocks = model.get_submodule(layout.blocks)
        if len(blocks) != len(record["layers"]):
            raise InputError(f"{str(path)!r}: {len(record['layers'])} recorded layer shapes for {len(blocks)} layers")
        geo = geometry(config, blocks[0], layout)
        for block, shape in zip(blocks, record["layers"], strict=True):
            _shrink_block(block, layout, geo, shape, copy=False)
    state = _state_dict(path)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches
        first = str(exc).strip().splitlines()
        raise InputError(f"{str(path)!r}: weights do not fit the recorded shapes: {' '.join(first[1:3])}") from None
    model.tie_weights()  # no_init_weights skipped init_weights, which ties (e.g. the LM head to the embeddings)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    untied = [k for k in result.missing_keys if k not in params or id(params[k]) not in loaded]
    if untied or result.unexpected_keys:
        raise InputError(
            f"{str(path)!r}: weights do not fit the recorded shapes (missing {untied[:3]}, "
            f"unexpected {result.unexpected_keys[:3]})"
        )
    if (path / "generation_config.json").is_file():  # from_pretrained reads it too; from_config does not
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()
