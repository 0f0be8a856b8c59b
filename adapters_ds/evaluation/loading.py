"""The model the harness scores: a base model loaded once, with one adapter attached at a time.

`load_model` gives the base with one adapter for good (the demo, single-adapter runs). `attached(model, adapter_dir)`
attaches an adapter to an already loaded base for the length of a block and leaves the base exactly as it found it,
so that one loaded base scores several adapters in turn (`launcher/evaluate.py --adapter_dir a,b,c`) with the
results of separate runs: a mergeable adapter (LoRA) is merged as a separate run merges it, and the weights the
merge changed are restored afterwards from an exact copy (kept in host memory; an unmerge would leave rounding),
others are detached.

On a quantized base (`--quantization`, `adapters_ds.quantization`: the base quantized right after loading, as
training quantizes it) the base's linear layers stay quantized, so nothing merges into them: every adapter stays
attached and computes on the dequantized weights, as in training; the outputs are those of the model `export
--merge --quantization` writes, up to rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from adapters_ds.adapters.inject import adapter_layers, merge_adapters, remove_adapters
from adapters_ds.adapters.storage import load_adapter, read_adapter_config, read_adapter_tensors
from adapters_ds.modeling import load_base_model, load_tokenizer
from adapters_ds.quantization import QuantLinear, QuantSpec, quantize_model


def load_model(
    base_model: str,
    adapter_dir: str | None,
    dtype: torch.dtype,
    device: torch.device,
    merge: bool = True,
    quantization: QuantSpec | None = None,
) -> tuple[Any, Any, str]:
    """(model, tokenizer, adapter method or "none"): the base model (quantized with `quantization`) with the
    adapter attached, in eval mode.

    No DeepSpeed engine: the adapter is loaded as `storage.load_adapter` loads it. Mergeable adapters (LoRA) are
    merged into the base weights (then the empty adapters are removed) unless `merge` is False or the base is
    quantized: the same outputs at the base model's speed. Adapters that cannot be merged (Series, Parallel) stay
    attached.
    """
    if adapter_dir is not None:  # a bad adapter folder fails before the (slow) base model load
        check_adapter_dir(adapter_dir)
    model = prepared_base(load_base_model(base_model, dtype=dtype), quantization, device)
    method = "none"
    if adapter_dir is not None:
        method = load_adapter(model, adapter_dir).method
        if merges(model, merge):
            merge_adapters(model)
            remove_adapters(model)
    return model.eval(), load_tokenizer(base_model), method


def prepared_base(model: Any, quantization: QuantSpec | None, device: torch.device) -> Any:
    """A loaded base model quantized (on the host, where it was loaded: the device only ever holds the quantized
    base), on `device`, in eval mode."""
    if quantization is not None:
        quantize_model(model, quantization)
    return model.to(device).eval()


def merges(model: Any, merge: bool) -> bool:
    """Whether the attached adapters are merged: asked to (`merge`), every one mergeable, none on a quantized layer."""
    layers = adapter_layers(model)
    return merge and all(adapter.mergeable and not isinstance(base, QuantLinear) for _, base, adapter in layers)


def check_adapter_dir(adapter_dir: str) -> None:
    """An InputError for a folder that is not a readable adapter (before any slow load)."""
    read_adapter_config(adapter_dir)
    read_adapter_tensors(adapter_dir)


@contextmanager
def attached(model: Any, adapter_dir: str | None, merge: bool = True) -> Iterator[str]:
    """`model` (a base without adapters) with the adapter of `adapter_dir` (None: none) for the block; yields the
    method's name ("none"). Merged like `load_model` merges; on exit the base is as before, bit for bit."""
    if adapter_dir is None:
        yield "none"
        return
    was_training = model.training
    method = load_adapter(model, adapter_dir).method
    model.eval()
    saved: dict[str, dict[str, torch.Tensor]] | None = None
    try:
        if merges(model, merge):
            saved = {
                name: {key: p.detach().to("cpu", copy=True) for key, p in base.named_parameters(recurse=False)}
                for name, base, _ in adapter_layers(model)
            }
            merge_adapters(model)
            remove_adapters(model)
        yield method
    finally:
        remove_adapters(model)  # nothing left to remove after a merge
        with torch.no_grad():
            for name, tensors in (saved or {}).items():
                module = model.get_submodule(name)
                for key, value in tensors.items():
                    getattr(module, key).copy_(value)
        model.train(was_training)
