"""bench/prune_speed.py's FLOP-proportional ceiling beside each forward speed-up and its width option (the export
stages keyed by it, training not), and bench/prune_7b_shape.py's code path on tiny shapes."""

from __future__ import annotations

import argparse
import importlib.util

import pytest
import torch
from adapters.test_gates import _export
from launch import REPO
from tiny_models import LAYERS, H, make_model

from adapters_ds.pruned_model import forward_flops
from bench.test_prune_speed_teacher import Recorded, load_bench, parse


def test_forward_flops_counts_the_linear_weights_the_head_and_the_attention_square():
    model = make_model("llama")
    blocks = model.model.layers
    weights = sum(m.weight.numel() for m in blocks.modules() if isinstance(m, torch.nn.Linear))
    weights += model.lm_head.weight.numel()
    assert forward_flops(model, 3, 10) == 3 * 10 * (2 * weights + 4 * 10 * H * LAYERS)


def test_speed_reports_the_flop_ceiling_beside_each_forward_speedup(tmp_path):
    _, pruned, _ = _export(tmp_path, "llama", "--prune_width_multiple", "8")
    args = argparse.Namespace(batch=2, seq=8, reps=1, bf16_reps=1, bf16_batch=2, gen_tokens=0)
    result = load_bench().speed(str(tmp_path / "base"), str(pruned), args, [])
    for dtype in ("fp32", "bf16"):
        assert result[dtype]["flop_ceiling"] > 1 and result[dtype]["speedup"] > 0


def test_the_width_multiple_keys_the_export_stages_and_reaches_the_curve(monkeypatch):
    bench = load_bench()
    for argv, multiple in (([], 64), (["--width_multiple", "1"], 1)):
        args = parse(bench, monkeypatch, *argv)
        stages = Recorded()
        point = bench.gates_point("base", args, stages, 0.3, False, {"prompts": [], "records": []}, None)
        assert args.width_multiple == multiple and point["width_multiple"] == multiple
        assert "width_multiple" not in stages.seen["train gates_0.3"]  # the same training either way
        assert stages.seen["export gates_0.3"].get("width_multiple", 1) == multiple
        assert stages.seen["speed gates_0.3"]["flop_ceiling"] and "fp32_flop_ceiling" in point
        assert stages.seen["speed gates_0.3"]["reps"] == [7, 5]  # a quick run's timings are another stage


def test_the_7b_shape_estimate_runs_on_tiny_shapes(capsys):
    spec = importlib.util.spec_from_file_location("prune_7b_shape", REPO / "bench" / "prune_7b_shape.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--hidden", "64", "--intermediate", "200", "--heads", "4", "--kv_heads", "2",
                          "--seq", "16", "--reps", "1", "--width_multiple", "16", "--bf16", "on"])  # fmt: skip
    # hidden 64, MLP 200, 4 query heads in 2 KV groups of head size 16: an MLP unit holds 3 × 64 parameters, a KV
    # group 4 × 32 × 64 (query rows, key and value rows, output columns); MLP units close 16 at a time (the first
    # run 8, the remainder), so the rule lands within 16 units and the rounding to 16 has nothing to add
    blocks = 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 64 * 200 + 2 * 64)
    assert 0.3 <= result["blocks_removed_fraction_unpadded"] <= 0.3 + 16 * 3 * 64 / blocks
    assert result["blocks_removed_fraction"] == pytest.approx(result["blocks_removed_fraction_unpadded"], abs=1e-12)
    assert all(k["intermediate"] in (*range(16, 200, 16), 200) and k["heads"] % 2 == 0 for k in result["kept"])
    for dtype in ("fp32", "bf16"):
        assert result[dtype]["speedup"] > 0 and result[dtype]["flop_ceiling"] > 1
    assert '"flop_ceiling"' in capsys.readouterr().out
