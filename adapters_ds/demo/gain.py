"""The main job out of the box: train on the built-in problems, then show the gain on their held-out split.

`deepspeed launcher/train.py --ds_config ds_configs/zero3.json` with no model and no data trains LoRA on the
embedded SmolLM2-135M-Instruct and the built-in arithmetic word problems, then evaluates the base model and
the adapted model on the held-out problems with the evaluation harness's code (data-parallel over the ranks)
and prints a before/after accuracy table.
"""

from __future__ import annotations

import os
from pathlib import Path

from adapters_ds.demo.problems import default_splits
from adapters_ds.distributed import Ranks, init_distributed
from adapters_ds.evaluation.harness import evaluate_records
from adapters_ds.evaluation.loading import attached
from adapters_ds.evaluation.stats import PAIRED_INTERVAL, PAIRED_TEST, accuracy_summary, paired_difference
from adapters_ds.fileio import atomic_write_text, write_json
from adapters_ds.hardware import accelerator_device, resolve_dtype
from adapters_ds.modeling import load_base_model, load_tokenizer
from adapters_ds.training.args import TrainArgs

# Options the main job changes when the user sets neither --base_model nor --data_path (and not the option
# itself): sized so that training plus both evaluations take minutes on a small CPU machine (README).
DEMO_OPTIONS = {
    "output_dir": "outputs/demo",
    "max_steps": 30,  # enough for a clear gain on the held-out problems, few enough for a CPU
    "train_on_inputs": False,  # learn the answers, not the (shared) prompt template
    "cutoff_len": 128,
    "logging_steps": 10,
    "save_steps": 10,
    "warmup_ratio": 0.03,
    "resume": "auto",  # a rerun continues (or, when finished, just re-evaluates) instead of refusing the folder
}
DEMO_BATCH = 8  # examples per optimizer step
EVAL_MAX_NEW_TOKENS = 64  # the built-in rationales are one or two short sentences


def demo_options() -> dict:
    """DEMO_OPTIONS plus batch sizes that divide over however many ranks the launcher started."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_rank = max(1, DEMO_BATCH // world)
    return {**DEMO_OPTIONS, "micro_batch_size": per_rank, "batch_size": per_rank * world}


def training_records() -> list[dict]:
    """The built-in problems' training split: what the main job trains on without --data_path."""
    return default_splits(seed=0)[0]


def report_gain(args: TrainArgs, base_model: str, adapter_dir: Path) -> dict:
    """Accuracy of the base and the adapted model on the held-out built-in problems, each with its Wilson 95 %
    interval, and the paired gain (same questions) with its 95 % interval and exact McNemar p-value
    (`evaluation.stats`); rank 0 prints the table and writes `gain.json` and `gain.md` into the run folder."""
    info = init_distributed()
    test = default_splits(seed=0)[1][: args.eval_limit]
    shard = test[info.rank :: info.world_size]
    device = accelerator_device()
    dtype = resolve_dtype("auto", device)
    model, tokenizer = load_base_model(base_model, dtype=dtype).to(device).eval(), load_tokenizer(base_model)
    flags: dict[str, list[bool]] = {}
    for name, adapter in (("base", None), ("adapted", str(adapter_dir))):
        with attached(model, adapter):  # one base load; the adapter merged (LoRA) or attached as the harness does
            rows = evaluate_records(
                model,
                tokenizer,
                shard,
                max_new_tokens=EVAL_MAX_NEW_TOKENS,
                template=args.template,
                progress=info.is_main,
            )
        gathered = Ranks(start=False).gather([bool(r["correct"]) for r in rows])
        flags[name] = [flag for part in gathered for flag in part]  # both models: the same questions, same order
    del model
    gain = paired_difference(flags["adapted"], flags["base"])
    result = {
        "adapter": args.adapter,
        "learning_rate": args.learning_rate,
        "base": accuracy_summary(flags["base"]),
        "adapted": accuracy_summary(flags["adapted"]),
        "n": len(flags["base"]),
        "gain": gain,
        "interval": PAIRED_INTERVAL,
        "test": PAIRED_TEST,
    }
    table = gain_table(result, f"held-out built-in problems ({len(test)}), {Path(base_model).name}, {args.adapter}")
    if info.is_main:
        out = Path(args.output_dir)
        write_json(out / "gain.json", result)
        atomic_write_text(out / "gain.md", table + "\n")
        print("\n" + table, flush=True)
    return result


def gain_table(result: dict, title: str) -> str:
    """The Markdown table of `report_gain`'s result: accuracies with their intervals, the gain with its own."""
    gain = result["gain"]
    verdict = "significant" if gain["significant"] else "not significant"
    return "\n".join(
        [
            f"{title}:",
            "",
            "| model | n | accuracy | 95 % interval |",
            "|---|---:|---:|---:|",
            *(
                f"| {name} | {r['n']} | {r['accuracy']:.1f} % | [{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}] |"
                for name, r in (("base model", result["base"]), ("with adapter", result["adapted"]))
            ),
            f"| gain | {gain['n']} | {gain['delta']:+.1f} points | [{gain['ci95'][0]:+.1f}, {gain['ci95'][1]:+.1f}] |",
            "",
            f"paired over the same questions: {gain['only_first']} right only with the adapter, {gain['only_second']} "
            f"only without; exact McNemar p = {gain['p_value']:.3g} ({verdict} at 0.05)",
        ]
    )
