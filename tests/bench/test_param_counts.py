"""The README's "trainable on LLaMA-7B" column, every number of it, is what bench/param_counts.py counts by
injecting each method into LLaMA-7B's shapes on the meta device; every registered method has a row with a count."""

from __future__ import annotations

import importlib.util
import re

from launch import REPO

import adapters_ds

# the bench settings whose counts a row's cell quotes, in the order the numbers appear; a method not listed here is
# held to its count at default options
CELLS = {
    "lora": ["lora_r32_qkv_up_down", "dora_r32_qkv_up_down"],  # "56,098,816 (r 32; DoRA 56,975,360)"
    "series": ["series_256_pfeiffer", "series_256_houlsby"],
    "parallel": ["parallel_256_up_down"],
    "prefix": ["prefix_30_tokens"],
    "prompt": ["prompt_30_tokens"],
    "ptuning": ["ptuning_30_tokens_mlp_128"],
    "gates": ["gates_units_lora_r32", "gates_units_only"],  # "80,307,200 (LoRA r 32 inside + 353,280 unit gates)"
}


def bench_counts() -> dict[str, dict]:
    spec = importlib.util.spec_from_file_location("param_counts", REPO / "bench" / "param_counts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.counts()


def numbers(text: str) -> list[int]:
    return [int(found.replace(",", "")) for found in re.findall(r"\d{1,3}(?:,\d{3})+", text)]


def test_every_method_has_its_llama_7b_count_in_the_readme():
    readme = (REPO / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \|.*\| ([^|]*) \|$", readme, flags=re.MULTILINE))
    counted = bench_counts()
    for method in sorted(adapters_ds.METHODS):
        assert method in rows, f"the README's adapter table has no row for {method}"
        settings = CELLS.get(method, [f"{method}_defaults"])
        expected = [counted[name]["trainable"] for name in settings]
        assert numbers(rows[method]) == expected, f"{method}: README {rows[method]!r}, counted {expected}"
    # the DoRA paragraph: its extra parameters and its total
    dora = counted["dora_r32_qkv_up_down"]["trainable"]
    extra = dora - counted["lora_r32_qkv_up_down"]["trainable"]
    assert f"+{extra:,} parameters on LLaMA-7B at r 32, {dora:,} in all" in readme
    # rsLoRA only rescales: it counts as plain LoRA
    assert counted["lora_r32_rslora"]["trainable"] == counted["lora_r32_qkv_up_down"]["trainable"]
