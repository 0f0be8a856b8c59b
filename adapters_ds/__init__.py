"""adapters_ds: parameter-efficient fine-tuning of large language models on DeepSpeed.

Library API (the launchers are thin wrappers around it):

    model = load_base_model(path)
    config = LoRAConfig(r=32, alpha=64)            # or SeriesConfig / ParallelConfig
    inject_adapters(model, config); freeze_base(model)
    print(parameter_report(model))
    ... train ...
    save_adapter(model, config, "out/adapter")      # later: load_adapter(fresh_base, "out/adapter")
"""

from adapters_ds.errors import InputError
from adapters_ds.inject import (
    adapter_layers,
    adapter_parameters,
    count_parameters,
    freeze_base,
    inject_adapters,
    merge_adapters,
    parameter_report,
    remove_adapters,
    unmerge_adapters,
)
from adapters_ds.layer import Adapter, AdapterConfig
from adapters_ds.lora import LoRAConfig
from adapters_ds.modeling import load_base_model, load_tokenizer
from adapters_ds.parallel import ParallelConfig
from adapters_ds.registry import METHODS, config_from_dict, get_method
from adapters_ds.series import SeriesConfig
from adapters_ds.storage import load_adapter, read_adapter_config, save_adapter

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Adapter",
    "AdapterConfig",
    "InputError",
    "LoRAConfig",
    "ParallelConfig",
    "SeriesConfig",
    "adapter_layers",
    "adapter_parameters",
    "config_from_dict",
    "count_parameters",
    "freeze_base",
    "get_method",
    "inject_adapters",
    "load_adapter",
    "load_base_model",
    "load_tokenizer",
    "merge_adapters",
    "parameter_report",
    "read_adapter_config",
    "remove_adapters",
    "save_adapter",
    "unmerge_adapters",
]
