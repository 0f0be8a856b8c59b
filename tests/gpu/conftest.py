"""Tests marked `gpu`: they need a CUDA device and are skipped without one, except in the GPU check's dry run
(`ADAPTERS_DS_GPU_DRY_RUN=1`, set by `bench/gpu_check.sh OUT --dry-run`), where their bodies run on the CPU with
the same tiny models, so that what the GPU machine will run has run somewhere. CUDA-only assertions (kernels,
synchronisation counts) are skipped there."""

from __future__ import annotations

import os

import pytest
import torch

DRY_RUN = os.environ.get("ADAPTERS_DS_GPU_DRY_RUN") == "1"
CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if CUDA or DRY_RUN:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (bench/gpu_check.sh runs these on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")


@pytest.fixture
def cuda_only():
    """For a test (or a part of one) that means nothing without CUDA."""
    if not CUDA:
        pytest.skip("CUDA-only check (dry run on the CPU)")
