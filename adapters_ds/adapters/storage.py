"""Adapter files: `adapter_config.json` + `adapter_model.safetensors` (adapter tensors only).

The config records the method, its hyperparameters with the resolved target names, the adapted module
paths and the base model's identity, so loading into a different base fails with a clear error instead of
loading weights into the wrong places. Tensors are stored under their `model.state_dict()` names.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from adapters_ds.adapters.base import AdapterConfig, adapter_layers, adapter_parameters
from adapters_ds.adapters.inject import inject_adapters, remove_adapters, resolve_targets
from adapters_ds.adapters.registry import config_from_dict
from adapters_ds.distributed import Ranks
from adapters_ds.errors import InputError
from adapters_ds.fileio import atomic_dir, read_json, write_json
from adapters_ds.zero import gathered

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "adapters_ds"
FORMAT_VERSION = 1
_META_KEYS = ("format", "format_version", "adapted_modules", "base_model")


def base_model_identity(model: nn.Module) -> dict:
    config = model.config
    return {
        "name_or_path": getattr(config, "_name_or_path", "") or "",
        "model_type": config.model_type,
        "architecture": type(model).__name__,
    }


def resolved_config(model: nn.Module, config: AdapterConfig) -> AdapterConfig:
    """`config` with the family's default targets written out, so a saved adapter never depends on the table
    (a model-level method has no targets)."""
    if config.model_level:
        return config
    targets = tuple(dict.fromkeys(resolve_targets(model, config).values()))
    return type(config).from_dict({**config.to_dict(), "target_modules": targets})


def save_adapter(model: nn.Module, config: AdapterConfig, path: str | Path) -> None:
    """Write the adapter files to `path` (replaced as a whole). Call on every rank: ZeRO-3 gathers collectively;
    only the trainable adapter tensors are gathered, never the base. Rank 0 writes."""
    params = adapter_parameters(model)
    with gathered(params.values()):
        tensors = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in params.items()}
    if not Ranks(start=False).is_main:
        return
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **resolved_config(model, config).to_dict(),
        "adapted_modules": [name for name, _, _ in adapter_layers(model)],
        "base_model": base_model_identity(model),
    }
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        write_json(tmp / CONFIG_NAME, meta)


def read_adapter_config(path: str | Path) -> tuple[AdapterConfig, dict]:
    """(config, metadata) of an adapter folder, validated."""
    raw = read_json(Path(path) / CONFIG_NAME, "adapter config")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise InputError(f"{str(path)!r} is not an adapters_ds adapter (format {found!r}, expected {FORMAT!r})")
    meta = {k: raw.pop(k, None) for k in _META_KEYS}
    return config_from_dict(raw), meta


def read_adapter_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        raise InputError(f"adapter weights not found: {str(file)!r}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise InputError(f"adapter weights {str(file)!r} are corrupt or unreadable: {exc}") from None


def check_base_model(model: nn.Module, meta: dict, path: str | Path) -> None:
    """Refuse an adapter (`meta`: its folder's metadata) trained on another model type than `model`'s."""
    base = meta["base_model"] or {}
    if base.get("model_type") != model.config.model_type:
        raise InputError(
            f"adapter {str(path)!r} was trained on a {base.get('model_type')!r} model "
            f"({base.get('name_or_path')!r}); this base model is {model.config.model_type!r}"
        )


def load_adapter(model: nn.Module, path: str | Path) -> AdapterConfig:
    """Attach the adapter saved in `path` to a freshly loaded base model, with its saved weights."""
    config, meta = read_adapter_config(path)
    check_base_model(model, meta, path)
    tensors = read_adapter_tensors(path)
    names = inject_adapters(model, config)
    try:
        if sorted(names) != sorted(meta["adapted_modules"] or []):
            missing = sorted(set(meta["adapted_modules"] or []) - set(names))[:3]
            raise InputError(
                f"adapter {str(path)!r} adapts {len(meta['adapted_modules'] or [])} modules, this base model "
                f"has {len(names)} matching ones (e.g. missing here: {missing}); it was trained on another base"
            )
        _copy_tensors(model, tensors, str(path))
    except BaseException:
        remove_adapters(model)  # leave the model as it was given
        raise
    return config


@torch.no_grad()
def _copy_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    params = adapter_parameters(model)
    if set(params) != set(tensors):
        extra, missing = sorted(set(tensors) - set(params))[:3], sorted(set(params) - set(tensors))[:3]
        raise InputError(f"adapter weights in {where!r} do not fit this model: unexpected {extra}, missing {missing}")
    for name, param in params.items():
        shape = tuple(getattr(param, "ds_shape", param.shape))
        if tuple(tensors[name].shape) != shape:
            raise InputError(
                f"adapter tensor {name!r} in {where!r} has shape {tuple(tensors[name].shape)}; "
                f"this base model needs {shape} (the adapter was trained on another base)"
            )
    with gathered(params.values(), modify=True):
        for name, param in params.items():
            param.copy_(tensors[name])
