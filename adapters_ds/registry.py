"""The adapter methods: name → (config class, layer class). Adding a method is one module and one line here."""

from __future__ import annotations

from typing import Any, NamedTuple

from adapters_ds.errors import InputError
from adapters_ds.gates import Gates, GatesConfig
from adapters_ds.layer import Adapter, AdapterConfig
from adapters_ds.lora import LoRA, LoRAConfig
from adapters_ds.parallel import ParallelAdapter, ParallelConfig
from adapters_ds.series import SeriesAdapter, SeriesConfig


class Method(NamedTuple):
    config: type[AdapterConfig]
    layer: type[Adapter]


METHODS: dict[str, Method] = {
    "lora": Method(LoRAConfig, LoRA),
    "series": Method(SeriesConfig, SeriesAdapter),
    "parallel": Method(ParallelConfig, ParallelAdapter),
    "gates": Method(GatesConfig, Gates),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise InputError(f"unknown adapter method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


def config_from_dict(values: dict[str, Any]) -> AdapterConfig:
    """Rebuild a config saved by `AdapterConfig.to_dict` (the `method` key picks the class)."""
    if not isinstance(values, dict) or "method" not in values:
        raise InputError(f"adapter config must be an object with a 'method' key, found {values!r}")
    return get_method(values["method"]).config.from_dict(values)
