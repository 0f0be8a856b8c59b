"""Models with per-layer shapes: the blocks of a `transformers` model resized to recorded sizes.

`export --prune` (adapters_ds.export.pruned) writes a smaller model with `pruned_shapes.json` beside its weights:
per layer the number of heads, KV heads, head size and MLP width. Where every layer has the same shapes and the
family's config can state them, the folder loads with plain `AutoModelForCausalLM.from_pretrained`; otherwise
`load_pruned_model` (reached through `adapters_ds.modeling.load_base_model`) builds the plain `transformers` class
and resizes each block's modules before loading the weights. The resizing (`shrink_block`) is shared with the
export, which also copies the kept rows and columns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel
from transformers.initialization import no_init_weights
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.pytorch_utils import Conv1D

from adapters_ds.errors import InputError
from adapters_ds.families import Layout, layout_of, linear_dims
from adapters_ds.fileio import read_json

SHAPES_NAME = "pruned_shapes.json"
FORMAT = "adapters_ds_pruned"
FORMAT_VERSION = 1


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


def rows_of_heads(heads: list[int], head_dim: int, stride: int | None = None) -> torch.Tensor:
    """Indices of `head_dim` rows per head, head h starting at h * stride."""
    stride = head_dim if stride is None else stride
    return torch.cat([torch.arange(h * stride, h * stride + head_dim) for h in heads])


def weight_out_in(module: nn.Module) -> torch.Tensor:
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
    heads_rows = rows_of_heads(heads, hd)
    sets[layout.o] = (None, heads_rows)
    if layout.q is not None:
        kv_rows = rows_of_heads(kv, hd)
        sets[layout.q] = (heads_rows, None)
        sets[layout.k] = (kv_rows, None)
        sets[layout.v] = (kv_rows, None)
    elif layout.qkv_order == "per_head":
        sets[layout.qkv] = (rows_of_heads(heads, 3 * hd, stride=3 * hd), None)
    else:
        width = geo.heads * hd
        sets[layout.qkv] = (torch.cat([heads_rows, heads_rows + width, heads_rows + 2 * width]), None)
    return sets


@torch.no_grad()
def shrink_block(block: nn.Module, layout: Layout, geo: Geometry, target: BlockPlan | dict, copy: bool) -> None:
    """Replace the block's prunable modules by smaller ones; with `copy`, holding the kept rows and columns."""
    for name, (rows, cols) in _index_sets(layout, geo, target).items():
        module = block.get_submodule(name)
        weight = weight_out_in(module)
        out_features = weight.shape[0] if rows is None else len(rows)
        in_features = weight.shape[1] if cols is None else len(cols)
        if (out_features, in_features) == tuple(weight.shape):
            continue
        new = _new_linear(module, out_features, in_features)
        if copy:
            kept = weight if rows is None else weight[rows]
            kept = kept if cols is None else kept[:, cols]
            weight_out_in(new).copy_(kept)
            if module.bias is not None:
                new.bias.copy_(module.bias if rows is None else module.bias[rows])
        parent, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, child, new)
    if layout.patch is not None:
        n_heads = len(target.heads) if isinstance(target, BlockPlan) else target["heads"]
        n_kv = len(target.kv_heads) if isinstance(target, BlockPlan) else target["kv_heads"]
        layout.patch(block.get_submodule(layout.attention), n_heads, n_kv, geo.head_dim)


def forward_flops(model: PreTrainedModel, batch: int, seq: int) -> int:
    """Multiply-adds × 2 of a forward of `batch` × `seq` tokens through the blocks' linear layers and the LM head
    (2 per weight per token) and attention's scores and weighted values (2 × 2 × seq per query channel per token,
    the full square: a causal kernel may skip up to half of it); norms, activations and the embedding lookup are
    left out. Read from the modules, so it counts a pruned model's per-layer shapes. `bench/prune_speed.py` divides
    the dense model's by the pruned one's: the speed-up that the removed FLOPs allow."""
    layout = layout_of(model.config.model_type)
    blocks = model.get_submodule(layout.blocks)
    weights = sum(m.weight.numel() for m in blocks.modules() if isinstance(m, (nn.Linear, Conv1D)))
    head = model.get_output_embeddings()
    weights += head.weight.numel() if head is not None else 0
    query_channels = sum(linear_dims(layout.o, block.get_submodule(layout.o)).in_features for block in blocks)
    return batch * seq * (2 * weights + 4 * seq * query_channels)


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
            shrink_block(block, layout, geo, shape, copy=False)
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
