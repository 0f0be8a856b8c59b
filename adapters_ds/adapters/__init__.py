"""The adapter family on the model side: the protocol (`base`), the registry, one module per method, injection and
adapter files. Importing this package registers the built-in methods."""

from adapters_ds.adapters import (  # noqa: F401  (each registers itself)
    gates,
    gates_paper,
    lora,
    parallel,
    prefix,
    prompt,
    ptuning,
    series,
)
