"""`export --merge`: LoRA folded into the base weights (in fp32, cast back), written as a plain Hugging Face model
folder that loads without adapters_ds. DoRA folds exactly as well (W' = m ⊙ (W + s·BA) / ‖W + s·BA‖, per output
row); rsLoRA differs only in s. An adapter trained on a quantized base (`--quantization`) merges into the
dequantized weights."""

from __future__ import annotations

from adapters_ds.adapters.inject import merge_adapters, remove_adapters
from adapters_ds.export.peft import load_lora
from adapters_ds.fileio import atomic_dir
from adapters_ds.modeling import has_tokenizer, load_tokenizer
from adapters_ds.quantization import QuantSpec


def export_merged(base_model: str, adapter_dir: str, output_dir: str, quantization: QuantSpec | None = None) -> None:
    """With `quantization` (the run's `--quantization`) the LoRA is merged into the dequantized weights it was
    trained against, written in the checkpoint's dtype: a plain model, no bitsandbytes needed to load it."""
    model, _ = load_lora(base_model, adapter_dir, dtype="auto", quantization=quantization)
    merge_adapters(model)
    remove_adapters(model)
    with atomic_dir(output_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if has_tokenizer(base_model):
            load_tokenizer(base_model).save_pretrained(tmp)
