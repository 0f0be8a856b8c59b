"""The adapter methods by name. A method registers itself (`register(Config, Layer)` at the end of its module);
nothing here knows the methods, so adding one changes no other file.

The built-in methods are imported by `adapters_ds.adapters`; others load as plugins (`load_plugins`): modules named
in the `ADAPTERS_DS_METHODS` environment variable (comma-separated) and entry points of the group
`adapters_ds.methods` of installed packages.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points
from typing import Any, NamedTuple

from adapters_ds.adapters.base import Adapter, AdapterConfig
from adapters_ds.errors import InputError

PLUGINS_ENV = "ADAPTERS_DS_METHODS"
ENTRY_POINT_GROUP = "adapters_ds.methods"


class Method(NamedTuple):
    config: type[AdapterConfig]
    layer: type[Adapter]


METHODS: dict[str, Method] = {}


def register(config: type[AdapterConfig], layer: type[Adapter]) -> None:
    """Make a method known under `config.method`; registering the same pair again is a no-op."""
    name = getattr(config, "method", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"{config.__name__}.method must be an identifier, found {name!r}")
    if name in METHODS and METHODS[name] != (config, layer):
        raise ValueError(f"adapter method {name!r} is already registered by {METHODS[name].config.__name__}")
    METHODS[name] = Method(config, layer)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise InputError(f"unknown adapter method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


def config_from_dict(values: dict[str, Any]) -> AdapterConfig:
    """Rebuild a config saved by `AdapterConfig.to_dict` (the `method` key picks the class)."""
    if not isinstance(values, dict) or "method" not in values:
        raise InputError(f"adapter config must be an object with a 'method' key, found {values!r}")
    return get_method(values["method"]).config.from_dict(values)


def load_plugins() -> None:
    """Import the plugin method modules (each registers itself when imported)."""
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise InputError(f"{PLUGINS_ENV}: cannot import adapter method module {module!r}: {exc}") from None
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()
