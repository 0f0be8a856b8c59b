"""Loading a base model (and its tokenizer) with the project's safety and error conventions.

Weights are read from safetensors only and remote code stays off unless the caller allows it: a model
repository must not be able to run code on a training cluster by being loaded. Two helpers serve models larger than
one device: `load_base_model_partitioned` (each rank holds a share of every weight while loading) and
`parameter_counts` (a model's size from its config alone, on the meta device).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.integrations import HfDeepSpeedConfig

from adapters_ds.errors import InputError
from adapters_ds.hardware import CHECKPOINT, resolve_dtype
from adapters_ds.pruned_model import load_pruned_model, needs_pruned_loader

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _load_error(what: str, name: str, exc: Exception) -> InputError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return InputError(f"cannot load {what} {name!r}: {first_line}")


def load_model_config(name: str, trust_remote_code: bool = False):
    if not Path(name).exists() and (name.startswith((".", "/")) or name.count("/") > 1):
        raise InputError(f"base model not found: {name!r} is neither a local folder nor a hub id")
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        if "trust_remote_code" in str(exc):
            raise InputError(
                f"base model {name!r} needs code shipped in its repository to load, and such code runs only with "
                "--trust_remote_code (pass it if you trust that code)"
            ) from None
        raise _load_error("base model", name, exc) from None


def check_causal_lm(name: str, trust_remote_code: bool = False, config=None) -> None:
    """Refuse a model whose architecture has no causal-LM class in transformers (an encoder, a vision model)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = config or load_model_config(name, trust_remote_code)
    remote = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if not remote and type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise InputError(
            f"base model {name!r} is a {config.model_type!r} model, which transformers has no causal language "
            f"model class for (expected a decoder such as llama, mistral, qwen2, gpt2)"
        )


def check_weights_format(name: str, allow_pickle: bool = False) -> None:
    """Refuse a local model folder whose weights are pickles only (loading a pickle can run code)."""
    folder = Path(name)
    if allow_pickle or not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise InputError(
            f"base model {name!r} has pickle weights only ({', '.join(pickles[:3])}), and loading a pickle can run "
            "code: convert them to safetensors (training loads them with --allow_pickle, if you trust the files)"
        )


def load_base_model(
    name: str, dtype: str | torch.dtype = "auto", trust_remote_code: bool = False, allow_pickle: bool = False
) -> PreTrainedModel:
    """A causal LM from a local folder or hub id; bad names, unsupported architectures and unreadable weights are
    InputErrors. Weights come from safetensors files only unless `allow_pickle`.

    `dtype`: a torch dtype, a name of `hardware.DTYPE_NAMES` ("auto" is the project's one rule,
    `hardware.resolve_dtype`: bf16 where the hardware computes it natively, else fp32), or "checkpoint": the dtype
    the checkpoint is stored in (what an export writes back).

    A folder written by `export --prune` with per-layer shapes loads through `pruned_model.load_pruned_model`."""
    config = load_model_config(name, trust_remote_code)
    check_causal_lm(name, trust_remote_code, config)
    check_weights_format(name, allow_pickle)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else "auto" if dtype == CHECKPOINT else resolve_dtype(dtype)
    if needs_pruned_loader(name):
        return load_pruned_model(name, dtype=torch_dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(
            name,
            config=config,
            dtype=torch_dtype,
            use_safetensors=None if allow_pickle else True,  # None: safetensors first, pickles as a fallback
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError, KeyError, SafetensorError) as exc:  # SafetensorError: a corrupt weights file
        raise _load_error("base model", name, exc) from None


def load_base_model_partitioned(
    name: str, dtype: torch.dtype, trust_remote_code: bool = False, allow_pickle: bool = False
) -> PreTrainedModel:
    """`load_base_model`, each weight partitioned over all ranks as it loads (ZeRO-3's construction,
    `deepspeed.zero.Init`, through transformers' `HfDeepSpeedConfig`): a rank holds 1/world of every weight and never
    the whole model (rank 0 reads the checkpoint, one module at a time). Call it on every rank of a started process
    group. The weights are ZeRO-3 parameters (values only inside `zero.gathered`); a caller that needs ordinary
    tensors gathers them, e.g. a layer at a time. A pruned folder with per-layer shapes cannot load this way."""
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": dtype == torch.bfloat16},  # zero.Init creates the partitions in this dtype
        "fp16": {"enabled": dtype == torch.float16},
    }
    partitioned = HfDeepSpeedConfig(ds_config)  # transformers holds a weak reference: alive for the load only
    model = load_base_model(name, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    del partitioned  # later loads and `generate` see ZeRO-3 off again
    return model


def parameter_counts(name: str, trust_remote_code: bool = False) -> tuple[int, int]:
    """(all parameters, the input embedding's) of the model `name` loads to, counted from its config alone: the model
    is built on the meta device, so no weight is read or allocated. Tied weights count once."""
    config = load_model_config(name, trust_remote_code)
    check_causal_lm(name, trust_remote_code, config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    return total, model.get_input_embeddings().weight.numel()


def load_tokenizer(name: str, trust_remote_code: bool = False):
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error("tokenizer of", name, exc) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only models often ship without a pad token
    return tokenizer


def has_tokenizer(path: str | Path) -> bool:
    return (Path(path) / "tokenizer_config.json").is_file()
