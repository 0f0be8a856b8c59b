"""Kernel-friendly kept widths (`export --prune --prune_width_multiple`, `export.pruned.round_widths`): each layer's
kept MLP width is rounded up to a multiple of the option (at most the full width) with closed units whose consumer
columns are zero, the export stays exactly the gated model, and the record says what the rounding kept."""

from __future__ import annotations

import json

import pytest
import torch
from adapters.test_gates import MLP, SHAPES_NAME, _export, expected_removed, hand_pruned, logits
from tiny_models import INTER, make_model

from adapters_ds import InputError
from adapters_ds.export.pruned import WIDTH_MULTIPLE, prune_model, round_widths
from adapters_ds.pruned_model import BlockPlan, Geometry, weight_out_in

BLOCKS_OF = {
    "llama": lambda m: m.model.layers,
    "gpt_neox": lambda m: m.gpt_neox.layers,
    "gpt2": lambda m: m.transformer.h,
}


def block_numel(model, family: str) -> int:
    return sum(p.numel() for p in BLOCKS_OF[family](model).parameters())


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2"])
def test_rounded_widths_keep_the_gated_logits_and_count_the_padding(family):
    """Layer 0 keeps 35 units of 48 (38 without LLaMA's up_proj rows): rounded to 40 with closed units, among them
    units whose producer rows are closed but consumer columns open, which the export zeroes."""
    model, _, closed = hand_pruned(family)
    expected = logits(model)
    base_blocks = block_numel(make_model(family), family)
    removed_by_gates = expected_removed(model, family, closed)
    record = prune_model(model, width_multiple=8)
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)
    widths = [s["intermediate"] for s in record["layers"]]
    assert widths == [40, INTER]
    alive = INTER - closed["units0"]
    counts = record["parameters"]
    assert counts["width_multiple"] == 8 and counts["width_padding_units"] == 40 - alive
    assert counts["removed"] == removed_by_gates - counts["width_padding_parameters"]
    assert counts["blocks_removed_fraction_unpadded"] == pytest.approx(removed_by_gates / base_blocks, abs=1e-12)
    assert counts["blocks_removed_fraction"] < counts["blocks_removed_fraction_unpadded"]
    # the padding is the first closed units; their consumer columns are zero in the export
    kept = record["kept"][0]["intermediate"]
    consumer = weight_out_in(BLOCKS_OF[family](model)[0].get_submodule(MLP[family][1]))
    by_hand = {*range(10), *((20, 21, 22) if family == "llama" else ())}  # the units `hand_pruned` closes
    padded = [i for i, unit in enumerate(kept) if unit in by_hand]
    assert len(padded) == 40 - alive and not consumer[:, padded].any()


def test_a_multiple_above_the_width_keeps_the_full_width_and_one_keeps_the_exact_width():
    model, _, closed = hand_pruned("llama")
    expected = logits(model)
    record = prune_model(model, width_multiple=WIDTH_MULTIPLE)  # 64 > 48: rounding up reaches the full width
    assert [s["intermediate"] for s in record["layers"]] == [INTER, INTER]
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)
    model, _, _ = hand_pruned("llama")
    record = prune_model(model, width_multiple=1)
    assert record["layers"][0]["intermediate"] == INTER - closed["units0"]
    assert record["parameters"]["width_padding_units"] == 0
    geo = Geometry(heads=4, kv_heads=2, head_dim=8, intermediate=200)
    plans = [
        BlockPlan([(0, [0, 1])], list(range(0, 200, 3))),
        BlockPlan([(0, [0])], list(range(128))),
        BlockPlan([(0, [0])], [5]),
    ]
    assert [len(p.intermediate) for p in round_widths(plans, geo, 64)] == [128, 128, 64]
    assert round_widths(plans, geo, 64)[2].intermediate[:6] == [0, 1, 2, 3, 4, 5]  # the first others, ascending
    with pytest.raises(InputError, match="multiple must be an integer >= 1"):
        round_widths(plans, geo, 0)


def test_export_command_rounds_by_default_and_takes_the_option(tmp_path, capsys):
    from adapters_ds.modeling import load_base_model

    model, out, _ = _export(tmp_path / "default", "llama")
    record = json.loads((out / SHAPES_NAME).read_text())
    assert record["parameters"]["width_multiple"] == WIDTH_MULTIPLE == 64
    assert [s["intermediate"] for s in record["layers"]] == [INTER, INTER]  # 48 < 64: the full width
    assert "closed MLP units kept to round widths to multiples of 64" in capsys.readouterr().out
    model, out, _ = _export(tmp_path / "eight", "llama", "--prune_width_multiple", "8")
    record = json.loads((out / SHAPES_NAME).read_text())
    assert [s["intermediate"] for s in record["layers"]] == [40, INTER]
    assert record["parameters"]["target_sparsity"] == pytest.approx(0.3)
    torch.testing.assert_close(logits(load_base_model(str(out), dtype="checkpoint")), logits(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "extra", [["--prune", "--prune_width_multiple", "0"], ["--merge", "--prune_width_multiple", "8"]]
)
def test_export_command_refuses_a_bad_multiple(tmp_path, capsys, extra):
    from adapters_ds.cli.export import main as export_main

    with pytest.raises(SystemExit) as exc:
        export_main(["--base_model", str(tmp_path / "base"), "--adapter_dir", str(tmp_path / "a"),
                     "--output_dir", str(tmp_path / "o"), *extra])  # fmt: skip
    assert exc.value.code == 2 and "--prune_width_multiple" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
