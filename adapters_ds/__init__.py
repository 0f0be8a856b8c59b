"""adapters_ds: parameter-efficient fine-tuning of large language models on DeepSpeed.

Library API (the launchers are thin wrappers around it):

    model = load_base_model(path)
    config = LoRAConfig(r=32, alpha=64)            # or SeriesConfig / ParallelConfig / GatesConfig / ...
    inject_adapters(model, config); freeze_base(model)
    print(parameter_report(model))
    ... train ...
    save_adapter(model, config, "out/adapter")      # later: load_adapter(fresh_base, "out/adapter")
"""

from adapters_ds import quantization  # first: it mutes bitsandbytes' import-time noise (peft imports bitsandbytes)
from adapters_ds.adapters.base import Adapter, AdapterConfig, adapter_layers, adapter_parameters
from adapters_ds.adapters.gates import GatesConfig
from adapters_ds.adapters.inject import (
    count_parameters,
    freeze_base,
    inject_adapters,
    merge_adapters,
    parameter_report,
    remove_adapters,
    unmerge_adapters,
)
from adapters_ds.adapters.lora import LoRAConfig
from adapters_ds.adapters.parallel import ParallelConfig
from adapters_ds.adapters.registry import METHODS, config_from_dict, get_method, register
from adapters_ds.adapters.series import SeriesConfig
from adapters_ds.adapters.storage import load_adapter, read_adapter_config, save_adapter
from adapters_ds.errors import InputError
from adapters_ds.modeling import load_base_model, load_tokenizer
from adapters_ds.quantization import QuantSpec, quantize_model

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Adapter",
    "AdapterConfig",
    "GatesConfig",
    "InputError",
    "LoRAConfig",
    "ParallelConfig",
    "QuantSpec",
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
    "quantization",
    "quantize_model",
    "read_adapter_config",
    "register",
    "remove_adapters",
    "save_adapter",
    "unmerge_adapters",
]
