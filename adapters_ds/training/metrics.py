"""What a training run reports besides the loss: throughput over a logging window, peak memory, precision."""

from __future__ import annotations

import math
import resource
import time
from typing import Any

from deepspeed.accelerator import get_accelerator


def peak_memory_gb() -> float:
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return accelerator.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def precision_name(ds_config: dict[str, Any]) -> str:
    if ds_config.get("bf16", {}).get("enabled"):
        return "bf16"
    return "fp16" if ds_config.get("fp16", {}).get("enabled") else "fp32"


class Window:
    """Sums over the steps since the last log line."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.loss, self.tokens, self.samples, self.steps = 0.0, 0.0, 0, 0

    def add(self, result: dict[str, Any]) -> None:
        self.tokens += result["tokens"]
        self.samples += result["samples"]
        if not result["skipped"]:
            self.loss += result["loss"]
            self.steps += 1

    def values(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        return {
            "train/loss": self.loss / self.steps if self.steps else math.nan,
            "train/tokens_per_s": self.tokens / elapsed,
            "train/samples_per_s": self.samples / elapsed,
        }
