"""What a command prints: the user's own output, not third-party noise they cannot act on."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_third_party() -> None:
    """Silence deprecation chatter from inside torch, DeepSpeed and transformers (e.g. DeepSpeed calling torch's
    deprecated collectives on every step) and DeepSpeed's info logging; warnings raised by the user's own code and
    errors are kept. `ADAPTERS_DS_VERBOSE=1` keeps everything."""
    if os.environ.get("ADAPTERS_DS_VERBOSE"):
        return
    for module in ("torch", "deepspeed", "transformers", "datasets"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
        warnings.filterwarnings("ignore", category=UserWarning, module=rf"{module}\.distributed")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
