"""The adapter methods by name. A method registers itself (`register(Config, Layer, Strategy)` at the end of its
module); nothing here knows the methods, so adding one changes no other file.

The built-in methods are imported by `adapters_ds.adapters`; others load as plugins (`load_plugins`): modules named
in the `ADAPTERS_DS_METHODS` environment variable (comma-separated) and entry points of the group
`adapters_ds.methods` of installed packages. Every command reaches a method through `get_method`, which loads the
plugins before it calls a name unknown, so a plugin's adapter trains, evaluates (also sharded), exports and loads in
a fresh process alike.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, NamedTuple

from adapters_ds.adapters.base import Adapter, AdapterConfig, Strategy
from adapters_ds.errors import InputError

PLUGINS_ENV = "ADAPTERS_DS_METHODS"
ENTRY_POINT_GROUP = "adapters_ds.methods"


class Method(NamedTuple):
    config: type[AdapterConfig]
    layer: type[Adapter]
    """The layer class: what the method's layers are and what they can do (merge, tensor parallelism, pruning)."""
    strategy: type[Strategy] = Strategy
    build: Callable[..., Adapter] | None = None
    """Builds a layer from (config, dims, dtype, device, **options) where one class does not fit every module (LoRA
    on an experts module); default: `layer` itself."""

    def make(self, config: AdapterConfig, dims: Any, dtype: Any, device: Any, **options: Any) -> Adapter:
        return (self.build or self.layer)(config, dims, dtype, device, **options)


METHODS: dict[str, Method] = {}


def register(
    config: type[AdapterConfig],
    layer: type[Adapter],
    strategy: type[Strategy] = Strategy,
    build: Callable[..., Adapter] | None = None,
) -> None:
    """Make a method known under `config.method`; registering the same classes again is a no-op. `strategy` is how
    it trains (`base.Strategy`: plain training by default); `build`, see `Method.build`."""
    name = getattr(config, "method", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"{config.__name__}.method must be an identifier, found {name!r}")
    if not (issubclass(config, AdapterConfig) and issubclass(layer, Adapter) and issubclass(strategy, Strategy)):
        raise TypeError("register(config, layer, strategy) takes subclasses of AdapterConfig, Adapter and Strategy")
    method = Method(config, layer, strategy, build)
    if name in METHODS and METHODS[name] != method:
        raise ValueError(f"adapter method {name!r} is already registered by {METHODS[name].config.__name__}")
    METHODS[name] = method


def get_method(name: str) -> Method:
    """The method registered as `name`; the plugins are loaded first when it is not (yet) known."""
    if name not in METHODS:
        load_plugins()
    if name not in METHODS:
        raise InputError(f"unknown adapter method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


def strategy_for(config: AdapterConfig) -> Strategy:
    """A new training strategy of `config`'s method (one per run: it may hold state between a forward and its loss
    terms)."""
    return get_method(config.method).strategy(config)


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
