"""The SLURM cluster, the tiny assets and the uninterrupted 1-node job, shared by the real-cluster tests here."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .cluster import ONE_NODE, Cluster, Job, make_assets, start_cluster, submit_lora, wait_for_end


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    with start_cluster() as started:
        yield started


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slurm-jobs")
    make_assets(root)
    return root


@pytest.fixture(scope="session")
def straight(cluster, assets) -> tuple[Job, dict[str, str]]:
    """An uninterrupted training job on one node, two ranks, fp32, which chains its evaluation: the reference the
    interrupted and the two-node jobs are held to."""
    job = submit_lora(cluster, assets, "straight", ONE_NODE, DS_CONFIG=str(assets / "fp32.json"))
    return job, wait_for_end(cluster, job)
