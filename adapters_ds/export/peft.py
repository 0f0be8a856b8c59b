"""`export --peft`: an adapter in Hugging Face PEFT's format, for every method PEFT has (`AdapterConfig.peft_type`:
LoRA with DoRA and rsLoRA, also on a mixture of experts' fused parameters, prefix, prompt and P-tuning);
`peft.PeftModel.from_pretrained(base, out)` gives the same
outputs as our adapted model. Each method maps itself (`AdapterConfig.peft_config`, `Adapter.peft_tensors`); this
module loads the adapter and writes the folder. `task_type` is CAUSAL_LM: without it PEFT builds a model that ignores
a virtual-token prompt.

Loading: a model-level method's layer is rebuilt from the base model's geometry only (`peft_prompts`: no weights
are read, so exporting the adapter of a 70B model needs no 70B of memory); a method on linear layers is loaded into
the base model as `storage.load_adapter` loads it.
"""

from __future__ import annotations

from typing import Any

from safetensors.torch import save_file
from torch import nn

from adapters_ds.adapters.base import Adapter, AdapterConfig, adapter_layers
from adapters_ds.adapters.registry import METHODS, get_method
from adapters_ds.adapters.storage import WEIGHTS_NAME, load_adapter, read_adapter_config, read_adapter_tensors
from adapters_ds.errors import InputError
from adapters_ds.export.peft_prompts import model_level_layer
from adapters_ds.fileio import atomic_dir, write_json
from adapters_ds.hardware import CHECKPOINT
from adapters_ds.modeling import load_base_model
from adapters_ds.quantization import QuantSpec, round_trip

PEFT_CONFIG_NAME = "adapter_config.json"


def peft_config(config: AdapterConfig, layers: dict[str, Adapter], base_name: str) -> dict[str, Any]:
    """PEFT's `adapter_config.json` of `config` whose adapter layers are `layers` (by module path)."""
    return {
        "peft_type": config.peft_type,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "inference_mode": True,
        **config.peft_config(layers),
    }


def peft_state_dict(model: nn.Module) -> dict:
    """Every adapter's tensors under PEFT's key names (e.g. `base_model.model.<module>.lora_A.weight`)."""
    tensors = {}
    for name, _, adapter in adapter_layers(model):
        tensors.update(adapter.peft_tensors(name))
    return tensors


def check_peft_method(config: AdapterConfig, adapter_dir: str) -> None:
    if config.peft_type is None:
        have = sorted(name for name, method in METHODS.items() if method.config.peft_type is not None)
        raise InputError(
            f"{config.method} adapters have no Hugging Face PEFT format ({', '.join(have)} do); {adapter_dir!r} "
            f"holds a {config.method} adapter"
        )


def load_mergeable(
    base_model: str, adapter_dir: str, dtype: str, quantization: QuantSpec | None = None
) -> tuple[nn.Module, AdapterConfig]:
    """The base model with the (mergeable) adapter of `adapter_dir` attached; a non-mergeable one is refused. With
    `quantization` the base's weights are those a run with that `--quantization` trained against (quantized, then
    dequantized into plain linear layers)."""
    model, config = _load(base_model, adapter_dir, dtype, quantization)
    if not get_method(config.method).layer.mergeable:
        have = sorted(name for name, method in METHODS.items() if method.layer.mergeable)
        raise InputError(
            f"only mergeable adapters ({', '.join(have)}) can be merged; {adapter_dir!r} holds a {config.method} "
            "adapter"
        )
    return model, config


def _load(
    base_model: str, adapter_dir: str, dtype: str, quantization: QuantSpec | None = None
) -> tuple[nn.Module, AdapterConfig]:
    read_adapter_tensors(adapter_dir)  # a corrupt file fails before the (slow) base model load
    model = round_trip(load_base_model(base_model, dtype=dtype), quantization)
    return model, load_adapter(model, adapter_dir)


def export_peft(base_model: str, adapter_dir: str, output_dir: str) -> None:
    config, _ = read_adapter_config(adapter_dir)
    check_peft_method(config, adapter_dir)
    if config.model_level:
        config, layer = model_level_layer(base_model, adapter_dir)
        layers, tensors = {"": layer}, layer.peft_tensors("")
    else:
        model, config = _load(base_model, adapter_dir, dtype=CHECKPOINT)
        layers, tensors = {path: a for path, _, a in adapter_layers(model)}, peft_state_dict(model)
    with atomic_dir(output_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        write_json(tmp / PEFT_CONFIG_NAME, peft_config(config, layers, base_model))
