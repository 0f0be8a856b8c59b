"""Label scoring against generation on commonsense label tasks: items/s of both modes and their agreement, same model,
same items, same batches.

    python bench/label_scoring.py [--base_model PATH] [--data_dir DIR] [--datasets boolq,ARC-Easy,openbookqa]
                                  [--n 64] [--batch_size 16] [--max_new_tokens 32] [--dtype auto|float32|bfloat16]

For each data set, the first N test items are cut into the harness's length-sorted batches; each batch is generated
(greedy, KV cache, stop strings: the harness's `_generate_rows`) and label-scored (`_label_rows`: the prompt once,
every label's continuation after it), the two timed alternately batch by batch, so a machine whose load changes
during the run slows both alike. Reported per data set and in total: items/s of each mode, their ratio, the
accuracy of each, and their agreement (`results.compare_modes`). One process, torch's default thread count.

Model: --base_model, else the embedded SmolLM2-135M-Instruct (`default_model.prepare_default_model()`). Data:
--data_dir (default ../shared/data/commonsense); exits with a message when it is missing. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from adapters_ds.demo.default_model import prepare_default_model
from adapters_ds.evaluation import harness
from adapters_ds.evaluation.datasets import load_dataset
from adapters_ds.evaluation.generation import DEFAULT_STOP_STRINGS, encode_prompts, length_sorted_batches
from adapters_ds.evaluation.labels import answer_lead, record_labels
from adapters_ds.evaluation.results import accuracy, compare_modes
from adapters_ds.hardware import accelerator_device, resolve_dtype
from adapters_ds.modeling import load_base_model, load_tokenizer
from adapters_ds.prompts import build_prompt

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base_model")
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "commonsense"))
    parser.add_argument("--datasets", default="boolq,ARC-Easy,openbookqa")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    if not Path(args.data_dir).is_dir():
        sys.exit(f"no data at {args.data_dir}: pass --data_dir (a folder of <name>/test.json label tasks)")
    base_model = args.base_model or str(prepare_default_model())
    device = accelerator_device()
    dtype = resolve_dtype(args.dtype, device)
    model = load_base_model(base_model, dtype=dtype).to(device).eval()
    tokenizer = load_tokenizer(base_model)
    generation = {"max_new_tokens": args.max_new_tokens, "num_beams": 1, "stop_strings": DEFAULT_STOP_STRINGS}

    results, totals = {}, {"generation": [0, 0.0], "label_scoring": [0, 0.0]}
    for name in args.datasets.split(","):
        dataset = load_dataset(args.data_dir, name)
        records = dataset.records[: args.n]
        lead = answer_lead(dataset.records)
        label_sets = [record_labels(r) for r in records]
        prompts = [build_prompt(r["instruction"], r["input"]) for r in records]
        encoded = encode_prompts(tokenizer, prompts)
        rows = {"generation": {}, "label_scoring": {}}
        seconds = {"generation": 0.0, "label_scoring": 0.0}
        for batch in length_sorted_batches([len(ids) for ids in encoded], args.batch_size):
            for mode in ("generation", "label_scoring"):
                begin = time.perf_counter()
                if mode == "generation":
                    made = harness._generate_rows(
                        model, tokenizer, batch, encoded, prompts, records, "labels", generation
                    )
                else:
                    made = harness._label_rows(model, tokenizer, batch, encoded, prompts, records, label_sets, lead)
                seconds[mode] += time.perf_counter() - begin
                rows[mode].update((row["index"], row) for row in made)
        ordered = {mode: [rows[mode][i] for i in range(len(records))] for mode in rows}
        entry = {"n": len(records), "lead": lead}
        for mode in ordered:
            entry[mode] = {
                "items_per_s": round(len(records) / seconds[mode], 3),
                "seconds": round(seconds[mode], 2),
                "accuracy": round(accuracy(ordered[mode]), 2),
            }
            totals[mode][0] += len(records)
            totals[mode][1] += seconds[mode]
        entry["speedup"] = round(seconds["generation"] / seconds["label_scoring"], 2)
        entry.update(compare_modes(ordered["generation"], ordered["label_scoring"], label_sets, lead))
        results[name] = entry
    overall = {mode: round(n / s, 3) for mode, (n, s) in totals.items()}
    overall["speedup"] = round(totals["generation"][1] / totals["label_scoring"][1], 2)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    report = {
        "model": base_model,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu_bf16": [flag for flag in ("amx_bf16", "avx512_bf16") if flag in cpuinfo],
        "platform": platform.platform(),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "datasets": results,
        "items_per_s": overall,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
