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

Per family (`Family.layout`): LLaMA, Mistral, Qwen2 (separate q/k/v, GQA); GPT-J and OPT (separate q/k/v, one KV
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

Kernel-friendly widths. `width_multiple` m (`export --prune_width_multiple`, default `WIDTH_MULTIPLE` = 64; 1: off)
rounds each block's kept MLP width up to a multiple of m (at most the full width), keeping a few more dead units:
the first closed ones, their consumer columns zeroed (they contribute exactly 0 already; zeroing makes it so
whatever the activation), so the export stays exact. Matmul kernels tile the width: on a 2-core AVX-512 CPU an
fp32 LLaMA MLP at width 1075 took 1.17× the time of width 1088 (1.15× at the 7B width 7706 against 7744), for
1 % more FLOPs; bf16 gained less (-5 % to +11 %). KV groups are few and left as they are. The record's parameters
say what the rounding kept (`width_padding_units`, `width_padding_parameters`) and what the export would remove
without it (`blocks_removed_fraction_unpadded`: the closed units' share, the gates' gates/removed, unless
`uniform` padded too), beside what it removes (`blocks_removed_fraction`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from adapters_ds.adapters.base import adapter_layers
from adapters_ds.adapters.inject import remove_adapters
from adapters_ds.adapters.registry import METHODS, get_method
from adapters_ds.adapters.storage import load_adapter, read_adapter_config, read_adapter_tensors
from adapters_ds.errors import InputError
from adapters_ds.families import Layout, layout_of, linear_dims
from adapters_ds.fileio import atomic_dir, write_json
from adapters_ds.hardware import CHECKPOINT
from adapters_ds.modeling import has_tokenizer, load_base_model, load_tokenizer
from adapters_ds.pruned_model import (
    FORMAT,
    FORMAT_VERSION,
    SHAPES_NAME,
    BlockPlan,
    Geometry,
    geometry,
    shrink_block,
    weight_out_in,
)
from adapters_ds.quantization import QuantSpec, round_trip

WIDTH_MULTIPLE = 64  # kept MLP widths are rounded up to a multiple of it (see the module docstring)


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


def round_widths(plans: list[BlockPlan], geo: Geometry, multiple: int) -> list[BlockPlan]:
    """Each block's kept MLP units rounded up to a multiple of `multiple` (at most the full width) with the first
    units the plan leaves out (dead: they contribute exactly 0)."""
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
        raise InputError(f"the kept-width multiple must be an integer >= 1 (1: no rounding), found {multiple!r}")
    out = []
    for plan in plans:
        width = min(-(-len(plan.intermediate) // multiple) * multiple, geo.intermediate)
        out.append(BlockPlan(plan.groups, _fill(plan.intermediate, range(geo.intermediate), width)))
    return out


def shape_of(plan: BlockPlan, geo: Geometry) -> dict[str, int]:
    return {
        "heads": len(plan.heads),
        "kv_heads": len(plan.kv_heads),
        "head_dim": geo.head_dim,
        "intermediate": len(plan.intermediate),
    }


@torch.no_grad()
def fold_gates(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fold every adapter into its base layer (`Adapter.fold`: for gates W' = z_r (W + sBA) z_c, b' = z_r b, in
    fp32) and remove the adapters; returns the evaluation-mode scales {module path: (z_rows, z_cols)}."""
    layers = list(adapter_layers(model))
    if not layers:
        raise InputError("the model has no adapters: pruning needs a stochastic-gates adapter")
    others = sorted({type(a).__name__ for _, _, a in layers if not a.prunable})
    if others:
        raise InputError(f"pruning needs a stochastic-gates adapter; this model holds {others} adapters")
    gates = {name: adapter.fold(base) for name, base, adapter in layers}
    remove_adapters(model)
    return gates


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def prune_model(model: PreTrainedModel, uniform: bool = False, width_multiple: int = 1) -> dict[str, Any]:
    """Fold the gates into `model` and cut out the removable units, in place, each block's MLP width rounded up to a
    multiple of `width_multiple` with dead units (1: no rounding; `export_pruned` defaults to `WIDTH_MULTIPLE`).
    Returns the shapes record (what `pruned_shapes.json` holds, less the file provenance); updates `model.config`
    where it can state them."""
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
    rounded = round_widths(plans, geo, width_multiple)
    padding = [sorted(set(r.intermediate) - set(p.intermediate)) for p, r in zip(plans, rounded, strict=True)]
    unit_cost = _mlp_unit_cost(blocks[0], layout)
    for block, plan, pad in zip(blocks, rounded, padding, strict=True):
        if pad:  # dead units: their output is 0 already, a zero column makes it so whatever the activation
            with torch.no_grad():
                weight_out_in(block.get_submodule(layout.mlp_out))[:, pad] = 0
        shrink_block(block, layout, geo, plan, copy=True)
    plans = rounded
    padded_units = sum(map(len, padding))
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
            "width_multiple": width_multiple,
            "width_padding_units": padded_units,
            "width_padding_parameters": padded_units * unit_cost,
            "blocks_removed_fraction_unpadded": (base_block_params - pruned_blocks + padded_units * unit_cost)
            / base_block_params,
        },
    }


def _mlp_unit_cost(block: nn.Module, layout: Layout) -> int:
    """Parameters one MLP unit holds: a row (and bias) of each producer, a column of the consumer."""
    rows = 0
    for name in layout.mlp_in:
        module = block.get_submodule(name)
        rows += linear_dims(name, module).in_features + (getattr(module, "bias", None) is not None)
    return rows + linear_dims(layout.mlp_out, block.get_submodule(layout.mlp_out)).out_features


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


def export_pruned(
    base_model: str,
    adapter_dir: str,
    output_dir: str,
    uniform: bool = False,
    dtype: str = CHECKPOINT,
    quantization: QuantSpec | None = None,
    width_multiple: int = WIDTH_MULTIPLE,
) -> dict[str, Any]:
    """Base model + gates adapter → a smaller model folder (see the module docstring). Returns the shapes record.

    `dtype` is that of the written weights: "checkpoint" keeps the base checkpoint's (the folded gates and LoRA are
    rounded to it, as a LoRA merge is); "float32" keeps the gated model's outputs exactly; "auto" is the project's
    rule (`hardware.resolve_dtype`). With `quantization` (the run's `--quantization`) the gates fold into the
    dequantized weights they were trained against. `width_multiple`: each block's kept MLP width is rounded up to a
    multiple of it with dead units (1: no rounding); the record's `target_sparsity` is the adapter's."""
    config, _ = read_adapter_config(adapter_dir)  # a wrong or corrupt adapter fails before the (slow) model load
    if not get_method(config.method).layer.prunable:
        prunable = sorted(name for name, method in METHODS.items() if method.layer.prunable)
        raise InputError(
            f"--prune needs an adapter of a pruning method ({', '.join(prunable)}); {adapter_dir!r} holds a "
            f"{config.method} adapter"
        )
    read_adapter_tensors(adapter_dir)
    model = round_trip(load_base_model(base_model, dtype=dtype), quantization)
    load_adapter(model, adapter_dir)
    record = prune_model(model.eval(), uniform=uniform, width_multiple=width_multiple)
    record.update(base_model=base_model, adapter_dir=str(adapter_dir))
    record["parameters"]["target_sparsity"] = getattr(config, "target_sparsity", None)
    with atomic_dir(output_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        write_json(tmp / SHAPES_NAME, record)
        if has_tokenizer(base_model):
            load_tokenizer(base_model).save_pretrained(tmp)
    return record
