"""`export --peft`: a LoRA adapter (DoRA and rsLoRA included) in Hugging Face PEFT's format;
`peft.PeftModel.from_pretrained(base, out)` gives the same outputs as our adapted model.

PEFT's names: `base_model.model.<module>.lora_A.weight` (r, in), `.lora_B.weight` (out, r), and for DoRA
`.lora_magnitude_vector` (out,), without a `.weight` suffix (PEFT adds it back when loading). PEFT's DoRA norm and
rsLoRA scale are ours (see `adapters.lora`), so `use_dora` / `use_rslora` carry over as they are; LoRA+ only changes
training and leaves nothing to export. LoRA on a mixture of experts' fused parameters goes to PEFT's
`target_parameters` (`adapters.lora_experts`), with `lora_dropout` 0, which PEFT requires there (dropout acts in
training only, so the exported model computes the same)."""

from __future__ import annotations

from safetensors.torch import save_file
from torch import nn

from adapters_ds.adapters.base import adapter_layers
from adapters_ds.adapters.lora import LoRAConfig
from adapters_ds.adapters.lora_experts import ExpertLoRA, peft_expert_tensors
from adapters_ds.adapters.storage import WEIGHTS_NAME, load_adapter, read_adapter_tensors
from adapters_ds.errors import InputError
from adapters_ds.fileio import atomic_dir, write_json
from adapters_ds.modeling import load_base_model
from adapters_ds.quantization import QuantSpec, round_trip

PEFT_CONFIG_NAME = "adapter_config.json"


def peft_config(config: LoRAConfig, base_name: str, fan_in_fan_out: bool, experts: dict[str, list[str]]) -> dict:
    """`experts`: {target name that selected experts modules or their parameters: PEFT's `target_parameters`}."""
    modules = [t for t in config.target_modules if t not in experts]
    target_parameters = list(dict.fromkeys(p for params in experts.values() for p in params))
    extra = {"target_parameters": target_parameters, "lora_dropout": 0.0} if experts else {}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        # our matching rule (exact name or dotted suffix) is PEFT's, so the same modules are adapted
        "target_modules": modules,
        "fan_in_fan_out": fan_in_fan_out,  # GPT-2's Conv1D stores (in, out) weights
        "bias": "none",
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": config.use_rslora,  # s = alpha / sqrt(r)
        "use_dora": config.use_dora,
        **extra,
    }


def peft_state_dict(model: nn.Module, targets: tuple[str, ...]) -> tuple[dict, dict[str, list[str]]]:
    """Our LoRA tensors under PEFT's key names (`base_model.model.<module>.lora_A.weight`, ...), and for LoRA on
    expert parameters {target name: the parameters PEFT must target under it} (`target_parameters`)."""
    tensors, experts = {}, {}
    for name, _, adapter in adapter_layers(model):
        prefix = f"base_model.model.{name}"
        if isinstance(adapter, ExpertLoRA):
            expert_tensors, params = peft_expert_tensors(prefix, adapter)
            tensors.update(expert_tensors)
            for t in targets:  # a target naming the module stands for its parameters; one naming a parameter, for it
                if name == t or name.endswith("." + t):
                    experts[t] = [f"{t}.{p}" for p in params]
                elif any(f"{name}.{p}" == t or f"{name}.{p}".endswith("." + t) for p in params):
                    experts[t] = [t]
            continue
        tensors[f"{prefix}.lora_A.weight"] = adapter.lora_A.detach().cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = adapter.lora_B.detach().cpu().contiguous()
        if adapter.use_dora:
            tensors[f"{prefix}.lora_magnitude_vector"] = adapter.lora_magnitude.detach().cpu().contiguous()
    return tensors, experts


def load_lora(
    base_model: str, adapter_dir: str, dtype: str, quantization: QuantSpec | None = None
) -> tuple[nn.Module, LoRAConfig]:
    """The base with the LoRA adapter; with `quantization` the base's weights are those a run with that
    `--quantization` trained against (quantized, then dequantized into plain linear layers)."""
    read_adapter_tensors(adapter_dir)  # a corrupt file fails before the (slow) base model load
    model = round_trip(load_base_model(base_model, dtype=dtype), quantization)
    config = load_adapter(model, adapter_dir)
    if not isinstance(config, LoRAConfig):
        raise InputError(
            f"only LoRA adapters can be exported this way; {adapter_dir!r} holds a {config.method} adapter"
        )
    return model, config


def export_peft(base_model: str, adapter_dir: str, output_dir: str) -> None:
    model, config = load_lora(base_model, adapter_dir, dtype="auto")
    fan_in_fan_out = any(adapter.transposed for _, _, adapter in adapter_layers(model))
    tensors, experts = peft_state_dict(model, config.target_modules)
    with atomic_dir(output_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        write_json(tmp / PEFT_CONFIG_NAME, peft_config(config, base_model, fan_in_fan_out, experts))
