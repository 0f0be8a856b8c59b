"""bench/train_throughput.py's time split: a profiled step of known parts lands in the right categories."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from launch import REPO


def load_bench():
    spec = importlib.util.spec_from_file_location("train_throughput", REPO / "bench" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_time_split_categories():
    bench = load_bench()
    weight = torch.nn.Parameter(torch.randn(256, 256))
    optimizer = torch.optim.AdamW([weight], lr=1e-3)
    x = torch.randn(512, 256)
    q = torch.randn(1, 4, 128, 32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            h = F.dropout(x, 0.1) @ weight  # matmul, dropout_rng
            a = F.scaled_dot_product_attention(q, q, q, is_causal=True)  # attention
            loss = h.to(torch.float64).sum() + a.sum()  # copies (the cast), other (sum, add)
            loss.backward()
            optimizer.step()  # optimizer (torch's Optimizer.step range)
            optimizer.zero_grad()
    seconds = bench.category_seconds(prof.events())
    for category in ("matmul", "attention", "dropout_rng", "copies", "optimizer", "other"):
        assert seconds[category] > 0, category
    assert seconds["communication"] == 0
    split = bench.time_split(prof.events(), steps=2, wall_s=1e3)
    assert set(split["share"]) == set(split["s_per_step"]) == set(bench.SPLIT_CATEGORIES)
    top = split["top_ops_s_per_step"]
    assert len(top) == 8 and "aten::mm" in [name for name, _ in top]
    assert [s for _, s in top] == sorted((s for _, s in top), reverse=True)
    in_ops = sum(split["s_per_step"].values())
    assert split["wall_s_per_step"] == 500 and abs(split["outside_ops_s_per_step"] - (500 - in_ops)) < 0.01
    assert abs(sum(split["share"].values()) - 1) < 0.01
    assert bench.event_category("aten::mul", [bench.OPTIMIZER_RANGE]) == "optimizer"  # a range wins over the op
    assert bench.event_category("aten::copy_", ["c10d::allreduce_"]) == "communication"
    assert bench.event_category("aten::mm", ["aten::scaled_dot_product_attention"]) == "attention"
