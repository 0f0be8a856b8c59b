"""Exporting a trained adapter for use outside adapters_ds.

- `--peft`: a LoRA adapter in Hugging Face PEFT's format; `peft.PeftModel.from_pretrained(base, out)` gives
  the same outputs as our adapted model.
- `--merge`: LoRA folded into the base weights, written as a plain Hugging Face model folder.
- `--prune`: a stochastic-gates adapter folded into the base and the closed rows, columns and heads cut out:
  a physically smaller model (see `adapters_ds/prune.py`; `--uniform_shapes` pads all layers to one shape so
  that plain `AutoModelForCausalLM.from_pretrained` loads it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from adapters_ds.errors import ArgumentParser, InputError, run_main
from adapters_ds.fileio import atomic_dir, check_writable_dir, write_json
from adapters_ds.inject import adapter_layers, merge_adapters, remove_adapters
from adapters_ds.lora import LoRAConfig
from adapters_ds.modeling import has_tokenizer, load_base_model, load_tokenizer
from adapters_ds.storage import WEIGHTS_NAME, load_adapter, read_adapter_tensors

PEFT_CONFIG_NAME = "adapter_config.json"


def peft_config(config: LoRAConfig, base_name: str, fan_in_fan_out: bool) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        # our matching rule (exact name or dotted suffix) is PEFT's, so the same modules are adapted
        "target_modules": list(config.target_modules),
        "fan_in_fan_out": fan_in_fan_out,  # GPT-2's Conv1D stores (in, out) weights
        "bias": "none",
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
    }


def peft_state_dict(model: nn.Module) -> dict:
    """Our LoRA tensors under PEFT's key names (`base_model.model.<module>.lora_A.weight`)."""
    tensors = {}
    for name, _, adapter in adapter_layers(model):
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = adapter.lora_A.detach().cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = adapter.lora_B.detach().cpu().contiguous()
    return tensors


def _load_lora(base_model: str, adapter_dir: str, dtype: str) -> tuple[nn.Module, LoRAConfig]:
    read_adapter_tensors(adapter_dir)  # a corrupt file fails before the (slow) base model load
    model = load_base_model(base_model, dtype=dtype)
    config = load_adapter(model, adapter_dir)
    if not isinstance(config, LoRAConfig):
        raise InputError(
            f"only LoRA adapters can be exported this way; {adapter_dir!r} holds a {config.method} adapter"
        )
    return model, config


def export_peft(base_model: str, adapter_dir: str, output_dir: str) -> None:
    model, config = _load_lora(base_model, adapter_dir, dtype="auto")
    fan_in_fan_out = any(adapter.transposed for _, _, adapter in adapter_layers(model))
    with atomic_dir(output_dir) as tmp:
        save_file(peft_state_dict(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        write_json(tmp / PEFT_CONFIG_NAME, peft_config(config, base_model, fan_in_fan_out))


def export_merged(base_model: str, adapter_dir: str, output_dir: str) -> None:
    model, _ = _load_lora(base_model, adapter_dir, dtype="auto")
    merge_adapters(model)
    remove_adapters(model)
    with atomic_dir(output_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if has_tokenizer(base_model):
            load_tokenizer(base_model).save_pretrained(tmp)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_model", required=True, help="base model folder or hub id the adapter was trained on")
    parser.add_argument("--adapter_dir", required=True, help="adapter folder written by training (output_dir/adapter)")
    parser.add_argument("--output_dir", required=True)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--peft", action="store_true", help="write a Hugging Face PEFT LoRA adapter")
    mode.add_argument("--merge", action="store_true", help="write the base model with LoRA merged in")
    mode.add_argument("--prune", action="store_true", help="write the smaller model a gates adapter prunes to")
    parser.add_argument(
        "--uniform_shapes",
        action="store_true",
        help="with --prune: give every layer the same (largest kept) shapes, loadable by plain transformers",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="with --prune: dtype of the written model (auto: the base checkpoint's; float32 keeps outputs exact)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    def run() -> None:
        args = parse_args(argv)
        out = Path(args.output_dir)
        check_writable_dir(out)
        if out.is_dir() and any(out.iterdir()) and not args.overwrite:
            raise InputError(f"output_dir {str(out)!r} is not empty; pass --overwrite to replace it")
        if (args.uniform_shapes or args.dtype != "auto") and not args.prune:
            raise InputError("--uniform_shapes and --dtype only apply to --prune")
        if args.prune:
            from adapters_ds.prune import export_pruned

            record = export_pruned(
                args.base_model, args.adapter_dir, args.output_dir, uniform=args.uniform_shapes, dtype=args.dtype
            )
            counts = record["parameters"]
            print(
                f"removed {counts['removed']:,} of {counts['base']:,} parameters "
                f"({100 * counts['removed_fraction']:.1f} %; {100 * counts['blocks_removed_fraction']:.1f} % of the "
                f"blocks); loads with plain transformers: {record['loads_with_transformers']}"
            )
        else:
            (export_peft if args.peft else export_merged)(args.base_model, args.adapter_dir, args.output_dir)
        print(f"wrote {out}")

    run_main(run)
