"""bench/family_shapes.py counts on published shapes (meta device) what the formulas say: LoRA r 32 with each
family's default targets (a mixture of experts: one pair per expert on the fused matrices), every adapter tensor
whole and the base partitioned but for its norm vectors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("family_shapes", Path(__file__).parents[2] / "bench" / "family_shapes.py")
family_shapes = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(family_shapes)


def lora(r: int, *shapes: tuple[int, int], experts: int = 1) -> int:
    return sum(experts * r * (i + o) for i, o in shapes)


R = 32
EXPECTED = {  # per layer × layers, written from the published configs
    "Llama-3.1-8B": 32 * lora(R, (4096, 4096), (4096, 1024), (4096, 1024), (4096, 14336), (14336, 4096)),
    "Mixtral-8x7B": 32 * (lora(R, (4096, 4096), (4096, 1024), (4096, 1024))
                          + lora(R, (4096, 2 * 14336), (14336, 4096), experts=8)),
    "Qwen3-30B-A3B": 48 * (lora(R, (2048, 4096), (2048, 512), (2048, 512))
                           + lora(R, (2048, 2 * 768), (768, 2048), experts=128)),
    "Phi-4": 40 * lora(R, (5120, 5120 + 2 * 1280), (5120, 2 * 17920), (17920, 5120)),
}  # fmt: skip


@pytest.fixture(scope="module")
def rows() -> dict[str, dict]:
    return {name: family_shapes.measure(name) for name in family_shapes.SHAPES}


@pytest.mark.parametrize("name", EXPECTED)
def test_default_lora_counts_on_real_shapes(rows, name):
    assert rows[name]["lora_trainable"] == EXPECTED[name]


@pytest.mark.parametrize("name", list(family_shapes.SHAPES))
def test_every_adapter_tensor_whole_and_the_base_partitioned_on_real_shapes(rows, name):
    row = rows[name]
    layers = family_shapes.SHAPES[name][1]["num_hidden_layers"]
    assert row["adapter_tensors_whole"] == 2 * layers * len(row["lora_targets"]) + (
        2 * layers if "experts" in row["lora_targets"] else 0  # experts: a pair for each of the two fused matrices
    )
    assert 0 < row["base_replicated_share_pct"] < 5  # >= 95 % of the base partitioned
