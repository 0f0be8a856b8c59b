"""Stochastic-gates pruning: accuracy and speed of the pruned model at several removed shares, against LoRA and the
base, on the embedded model and the built-in problems, in one run (resumable).

    python bench/prune_speed.py [--sparsities 0.2,0.3,0.4,0.5] [--steps 200] [--lora_steps N] [--floor [0.3,...]]
                                [--gate OPTION=VALUE ...] [--gates_learning_rate 3e-4] [--plain [--teacher_from_lora]]
                                [--eval_n 200] [--val_n 48]
                                [--batch 8] [--seq 256] [--width_multiple 64]
                                [--reps 7] [--bf16_reps 5] [--bf16_batch B] [--gen_tokens 32]
                                [--out_dir outputs/bench_prune] [--fresh]

1. Trains, with the real trainer in this process (one rank, ZeRO-2, the shipped config's precision), on the
   built-in problems' training split (`demo.gain.training_records`) less `--val_n` held-out problems (the run's
   validation split: its eval/answer_loss and eval/digit_loss are logged every 10 steps and reported here):
   LoRA (the defaults of `--adapter lora`, r 32) for `--lora_steps` (default `--steps`), then `--adapter gates` with
   `--gate_target_sparsity` s for every s of `--sparsities`, `--steps` each, by the recipe (`RECIPE`): the LoRA
   reference is the dense teacher (`--gate_teacher <its adapter>`), distilled from (`--gate_distill 1`) and started
   from (`--gate_warm_start`: the LoRA inside the gates starts as the teacher's), units closing from the first step
   until half the run (`--gate_ramp 0,0.5`), at `--gates_learning_rate` 3e-4. `--gate K=V` passes `--gate_K V` to
   the gates runs (a bare K: the switch `--gate_K`), in place of the recipe's K. `--plain` drops the recipe: the
   gates' own defaults at `--learning_rate`, no teacher unless `--gate teacher=DIR` or `--teacher_from_lora` (this
   run's LoRA; it needs `--gate distill=W`, W > 0, and / or `--gate warm_start`).
   `--floor` adds, at every s (or at the shares it lists), a gates run that closes random units
   (`--gate_importance random`): what the same schedule and recovery give without the importance estimates.
   The gates close an MLP's units --width_multiple at a time (`--gate_width_multiple`, unless `--gate
   width_multiple=M` says otherwise), so each kept MLP width is a multiple of it.
2. Exports each gates adapter (`export.pruned.export_pruned`, per-layer shapes, fp32 weights, each layer's kept MLP
   width rounded up to a multiple of --width_multiple with closed units whose outputs are zero: none where the gates
   closed in runs of it; 1: no rounding) and
   checks that the pruned model's logits equal the gated model's (evaluation mode) on a batch of held-out prompts.
   The curve gives the share the export removes (`blocks_removed_fraction`, rounding included) beside the target and
   the share the closed units alone remove (`blocks_removed_fraction_unpadded`).
3. Forward latency of the dense base and each pruned model on the same random batch (--batch × --seq), the fastest
   of --reps runs after one warm-up (load on a shared machine only ever adds time: the median of 3 moved the
   speed-up of one model between 1.14× and 1.37× from run to run on 2 busy cores; the fastest of 7 varies less, though
   not to nothing: read differences of a few % as noise), the
   two models alternating (a shared machine's load drifts), in fp32 and bf16
   (on CPUs without AMX or AVX512-BF16, bf16 is emulated and far slower: reported anyway, with fewer runs and
   --bf16_batch 1 unless told otherwise); with --gen_tokens > 0 also greedy generation throughput (KV cache).
   Beside each forward speed-up, `flop_ceiling`: the dense model's forward FLOPs (blocks and LM head) over the
   pruned model's for the same batch × seq (`pruned_model.forward_flops`), the speed-up the removed FLOPs allow.
4. Held-out accuracy (`evaluation.evaluate_records`, the first --eval_n test problems, max 64 new tokens, fp32) of
   the base, LoRA and each pruned model, each with its Wilson 95 % interval (`accuracy_95`, `accuracy_95_percent`).

Every finished stage is kept in <out_dir>/stages.json, so a rerun with the same settings continues where the last one
stopped (--fresh starts over). Prints one JSON object (also written to <out_dir>/prune_speed.json), with `curve`:
one entry per removed share (parameters removed, speed-ups and accuracy beside LoRA's and the base's): a curve to
read, not a pass/fail verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

REPO = Path(__file__).resolve().parents[1]
EVAL_MAX_NEW_TOKENS = 64  # the built-in rationales are one or two short sentences (as adapters_ds.demo.gain)


# The gates runs' recipe unless --plain: the LoRA reference is the dense teacher, distilled from (weight 1) and
# started from (warm start), pruning from the first step to half the run, the rest recovering, at a lower learning
# rate than LoRA's (Adam's first steps at 1e-3 moved the warm-started LoRA far from the teacher before any unit
# closed). Each part measured at 30 % removed: the README's gates section.
RECIPE = ("distill=1", "warm_start", "ramp=0,0.5")
RECIPE_LEARNING_RATE = 3e-4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_model", help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--sparsities", default="0.2,0.3,0.4,0.5", help="shares of block parameters to remove")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of each gates run (batch 8)")
    parser.add_argument("--lora_steps", type=int, help="steps of the LoRA reference (default --steps; 0: skip)")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="LoRA's, and the LoRA inside the gates'")
    parser.add_argument(
        "--gates_learning_rate",
        type=float,
        help=f"the gates runs' (default {RECIPE_LEARNING_RATE:g}; with --plain, --learning_rate)",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help=f"the gates runs with the trainer's defaults and --learning_rate, not the recipe ({' '.join(RECIPE)} "
        "with this run's LoRA as the teacher)",
    )
    parser.add_argument(
        "--gate",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="for the gates runs: --gate_OPTION VALUE (a bare OPTION: the switch --gate_OPTION); replaces the "
        "recipe's value of the same OPTION",
    )
    parser.add_argument(
        "--teacher_from_lora",
        action="store_true",
        help="this run's LoRA reference is the gates runs' --gate_teacher; needs --gate distill=W (W > 0) and / or "
        "--gate warm_start",
    )
    parser.add_argument(
        "--floor", nargs="?", const="all", help="also prune random units at every share, or at those listed (0.3,0.4)"
    )
    parser.add_argument("--val_n", type=int, default=48, help="held-out training problems for the eval/* losses")
    parser.add_argument("--eval_n", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--bf16_reps", type=int, default=5)
    parser.add_argument(
        "--bf16_batch",
        type=int,
        help="batch of the bf16 latency (default: --batch where bf16 is native, else 1: emulated bf16 runs at "
        "about 1 GFLOP/s on an AVX2 CPU, so a batch-8 forward of even a 135M model takes minutes)",
    )
    parser.add_argument("--gen_tokens", type=int, default=32, help="0: no generation throughput")
    parser.add_argument(
        "--width_multiple",
        type=int,
        help="the gates close MLP units this many at a time (--gate_width_multiple) and the export rounds each "
        "layer's kept MLP width up to a multiple of it (default: the export's, 64; 1: unit by unit, no rounding)",
    )
    parser.add_argument("--out_dir", default="outputs/bench_prune")
    parser.add_argument("--fresh", action="store_true", help="ignore the stages a previous run finished")
    args = parser.parse_args()
    args.sparsities = [float(s) for s in args.sparsities.split(",") if s]
    floor = args.floor or ""
    args.floor = args.sparsities if floor == "all" else [float(s) for s in floor.split(",") if s]
    args.lora_steps = args.steps if args.lora_steps is None else args.lora_steps
    if not args.plain:
        given = [option.partition("=")[0] for option in args.gate]
        args.gate = [option for option in RECIPE if option.partition("=")[0] not in given] + args.gate
        args.teacher_from_lora = args.teacher_from_lora or "teacher" not in given
    if args.gates_learning_rate is None:
        args.gates_learning_rate = args.learning_rate if args.plain else RECIPE_LEARNING_RATE
    if args.width_multiple is None:
        from adapters_ds.export.pruned import WIDTH_MULTIPLE

        args.width_multiple = WIDTH_MULTIPLE
    if args.width_multiple < 1:
        parser.error(f"--width_multiple must be >= 1 (1: no rounding), found {args.width_multiple}")
    if "width_multiple" not in [option.partition("=")[0] for option in args.gate]:  # the schedule's runs match it
        args.gate.append(f"width_multiple={args.width_multiple}")
    if args.teacher_from_lora:
        given = dict(option.partition("=")[::2] for option in args.gate)
        if "teacher" in given:
            parser.error("--teacher_from_lora and --gate teacher=DIR name two teachers: give one")
        try:
            weight = float(given.get("distill", 0))
        except ValueError:
            weight = 0.0
        if weight <= 0 and "warm_start" not in given:
            parser.error(
                "--teacher_from_lora needs a use for the teacher: --gate distill=W with W > 0 (e.g. 1), or --gate "
                "warm_start"
            )
        if not args.lora_steps:
            parser.error("the teacher (the recipe's or --teacher_from_lora; --plain: none) needs the LoRA reference "
                         "run: --lora_steps > 0")  # fmt: skip
    return args


class Stages:
    """Finished stages' results in <out_dir>/stages.json, keyed by name and the settings they depend on. The file is
    re-read before each stage and merged on each write, so runs with different --sparsities can share a folder."""

    def __init__(self, path: Path, fresh: bool) -> None:
        self.path = path
        if fresh and path.is_file():
            path.unlink()

    def _read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, name: str, settings: dict, compute) -> dict:
        key = f"{name} {json.dumps(settings, sort_keys=True)}"
        result = self._read().get(key)
        if result is None:
            start = time.perf_counter()
            result = {**compute(), "stage_seconds": round(time.perf_counter() - start, 1)}
            done = {**self._read(), key: result}
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(done, indent=1) + "\n")
            tmp.replace(self.path)
        print(json.dumps({name: result}), flush=True)
        return result


def train_adapter(
    base: str, out: Path, args: argparse.Namespace, method: str, steps: int, lr: float, extra: list[str]
) -> dict:
    from adapters_ds.demo.gain import training_records
    from adapters_ds.training.args import parse_train_args
    from adapters_ds.training.trainer import train

    argv = [
        "--ds_config", str(REPO / "ds_configs" / "zero2.json"), "--base_model", base, "--output_dir", str(out),
        "--adapter", method, "--max_steps", str(steps), "--learning_rate", str(lr),
        "--micro_batch_size", "8", "--batch_size", "8", "--cutoff_len", "128", "--warmup_ratio", "0.03",
        "--logging_steps", "10", "--save_steps", "0", "--overwrite_output_dir", "--val_set_size", str(args.val_n),
        "--eval_steps", "10", *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    adapter_dir = train(parse_train_args(argv), base, training_records())
    return {"adapter_dir": str(adapter_dir), "train": training_summary(out, time.perf_counter() - start)}


def training_summary(run_dir: Path, seconds: float) -> dict:
    """The run's method options, first / last loss and the last logged scalars of interest."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from adapters_ds.adapters.registry import get_method

    train_args = json.loads((run_dir / "train_args.json").read_text())["args"]
    config = get_method(train_args["adapter"]).config
    flags = {config.flag(f) for f in config.options()}  # the method's own options
    summary = {k: v for k, v in train_args.items() if k in flags or k in ("adapter", "max_steps")}
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    summary["loss_first_last"] = [round(log[0]["loss"], 4), round(log[-1]["loss"], 4)]
    events = EventAccumulator(str(run_dir / "tensorboard" / "train"))
    events.Reload()
    for tag in sorted(events.Tags()["scalars"]):
        if tag.startswith(("eval/", "gates/", "train/answer_loss")):
            summary[tag] = round(events.Scalars(tag)[-1].value, 4)
    summary["digit_loss_curve"] = [[e.step, round(e.value, 4)] for e in events.Scalars("eval/digit_loss")]
    summary["seconds"] = round(seconds, 1)
    return summary


@torch.no_grad()
def forward_latency(models: list, batch: int, seq: int, reps: int) -> list[float]:
    """Fewest seconds per forward of each model over `reps`; the models take turns, so load drift hits them
    alike."""
    ids = torch.randint(3, models[0].config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    times: list[list[float]] = [[] for _ in models]
    for rep in range(reps + 1):  # the first round warms up
        for model, spent in zip(models, times, strict=True):
            start = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            if rep:
                spent.append(time.perf_counter() - start)
    return [min(spent) for spent in times]


@torch.no_grad()
def generation_throughput(models: list, tokenizer, prompts: list[str], new_tokens: int, reps: int) -> list[float]:
    """Most new tokens per second of each model over `reps`, the models taking turns (as `forward_latency`)."""
    from adapters_ds.evaluation.generation import encode_prompts, left_pad

    input_ids, attention_mask = left_pad(
        encode_prompts(tokenizer, prompts), tokenizer.pad_token_id, torch.device("cpu")
    )
    config = GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    warm_up = GenerationConfig(max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    rates: list[list[float]] = [[] for _ in models]
    for model in models:
        model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=warm_up)
    for _ in range(reps):
        for model, spent in zip(models, rates, strict=True):
            start = time.perf_counter()
            model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
            spent.append(len(prompts) * new_tokens / (time.perf_counter() - start))
    return [max(r) for r in rates]


def accuracy_of(base: str, adapter_dir: str | None, records: list[dict]) -> float:
    from adapters_ds.evaluation.harness import evaluate_records, load_model
    from adapters_ds.evaluation.results import accuracy

    model, tokenizer, _ = load_model(base, adapter_dir, torch.float32, torch.device("cpu"))
    return accuracy(evaluate_records(model, tokenizer, records, max_new_tokens=EVAL_MAX_NEW_TOKENS))


@torch.no_grad()
def gated_vs_pruned(base: str, adapter_dir: str, pruned: str, prompts: list[str]) -> float:
    """Largest |logit difference| between the gated model (evaluation mode) and the pruned export, fp32."""
    from adapters_ds.evaluation.harness import load_model
    from adapters_ds.modeling import load_base_model

    gated, tokenizer, _ = load_model(base, adapter_dir, torch.float32, torch.device("cpu"))
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    expected = gated(**batch).logits
    return (load_base_model(pruned, dtype=torch.float32).eval()(**batch).logits - expected).abs().max().item()


def speed(base: str, pruned: str, args: argparse.Namespace, prompts: list[str]) -> dict:
    """fp32 and bf16 forward latency, and generation throughput, of the dense base and the pruned model; beside
    each forward speed-up the FLOP-proportional ceiling (`flop_ceiling`)."""
    from adapters_ds.hardware import native_bf16
    from adapters_ds.modeling import load_base_model, load_tokenizer
    from adapters_ds.pruned_model import forward_flops

    bf16_batch = args.bf16_batch or (args.batch if native_bf16() else 1)
    result: dict = {"seq": args.seq}
    for name, dtype, reps, batch in (
        ("fp32", torch.float32, args.reps, args.batch),
        ("bf16", torch.bfloat16, args.bf16_reps, bf16_batch),
    ):
        models = [load_base_model(path, dtype=dtype).eval() for path in (base, pruned)]
        dense_s, pruned_s = forward_latency(models, batch, args.seq, reps)
        dense_flops, pruned_flops = (forward_flops(model, batch, args.seq) for model in models)
        result[name] = {"batch": batch, "native": dtype == torch.float32 or native_bf16(), "dense_s": round(dense_s, 3),
                        "pruned_s": round(pruned_s, 3), "speedup": round(dense_s / pruned_s, 3),
                        "flop_ceiling": round(dense_flops / pruned_flops, 3)}  # fmt: skip
    if args.gen_tokens:
        models = [load_base_model(path, dtype=torch.float32).eval() for path in (base, pruned)]
        dense, fast = generation_throughput(models, load_tokenizer(base), prompts, args.gen_tokens, args.reps)
        result["generation_tokens_per_s"] = {"batch": len(prompts), "new_tokens": args.gen_tokens,
                                             "dense": round(dense, 1), "pruned": round(fast, 1),
                                             "speedup": round(fast / dense, 3)}  # fmt: skip
    return result


def interval_95(accuracy: float, n: int) -> list[float]:
    """The Wilson 95 % interval, in percent, of an accuracy in percent over n questions."""
    from adapters_ds.evaluation.stats import wilson_interval

    low, high = wilson_interval(round(accuracy * n / 100), n)
    return [round(100 * low, 1), round(100 * high, 1)]


def gates_point(
    base: str, args: argparse.Namespace, stages: Stages, sparsity: float, floor: bool, data: dict, teacher: dict | None
) -> dict:
    """Train, export, check, time and score a gates run at `sparsity` (`floor`: random units; `teacher`: the LoRA
    reference's stage settings and result, whose adapter the run distills from)."""
    from adapters_ds.export.pruned import export_pruned

    name = f"gates_{sparsity:g}" + ("_random" if floor else "")
    run_dir = Path(args.out_dir) / name
    extra = ["--gate_target_sparsity", str(sparsity), *(["--gate_importance", "random"] if floor else [])]
    for option in args.gate:
        key, equals, value = option.partition("=")
        extra += [f"--gate_{key}", value] if equals else [f"--gate_{key}"]  # a bare name: a switch (warm_start)
    if teacher is not None:
        extra += ["--gate_teacher", teacher["result"]["adapter_dir"]]
    settings = {"steps": args.steps, "lr": args.gates_learning_rate, "extra": extra, "val_n": args.val_n, "base": base}
    if teacher is not None:  # keyed by the teacher's own settings too: a retrained LoRA is another teacher
        settings["teacher"] = teacher["settings"]
    lr = args.gates_learning_rate
    trained = stages.run(f"train {name}", settings, lambda: train_adapter(base, run_dir, args, "gates", args.steps, lr,
                                                                          extra))  # fmt: skip
    pruned = str(run_dir / "pruned")
    if args.width_multiple != 1:  # another export, timed and scored anew (1: the stages of runs before the option)
        settings = {**settings, "width_multiple": args.width_multiple}

    def export() -> dict:
        record = export_pruned(base, trained["adapter_dir"], pruned, dtype="float32",
                               width_multiple=args.width_multiple)  # fmt: skip
        layers = record["layers"]
        return {**record["parameters"], "heads_kept": sum(s["heads"] for s in layers),
                "kv_heads_kept": sum(s["kv_heads"] for s in layers),
                "intermediate_kept": sum(s["intermediate"] for s in layers),
                "max_abs_logit_diff_gated_vs_pruned": gated_vs_pruned(base, trained["adapter_dir"], pruned,
                                                                      data["prompts"])}  # fmt: skip

    exported = stages.run(f"export {name}", settings, export)
    timed = {**settings, "batch": args.batch, "seq": args.seq, "timing": "fastest", "flop_ceiling": True,
             "reps": [args.reps, args.bf16_reps], "gen_tokens": args.gen_tokens}  # fmt: skip
    timing = stages.run(f"speed {name}", timed, lambda: speed(base, pruned, args, data["prompts"]))
    scored = stages.run(f"accuracy {name}", {**settings, "eval_n": args.eval_n},
                        lambda: {"accuracy": accuracy_of(pruned, None, data["records"])})  # fmt: skip
    return {"target_sparsity": sparsity, "importance": "random" if floor else "fisher",
            "blocks_removed_fraction": round(exported["blocks_removed_fraction"], 4),
            "blocks_removed_fraction_unpadded": round(exported.get("blocks_removed_fraction_unpadded",
                                                                   exported["blocks_removed_fraction"]), 4),
            "width_multiple": args.width_multiple,
            "removed_fraction": round(exported["removed_fraction"], 4), "accuracy": scored["accuracy"],
            "accuracy_95": interval_95(scored["accuracy"], len(data["records"])),
            "fp32_speedup": timing["fp32"]["speedup"], "fp32_flop_ceiling": timing["fp32"].get("flop_ceiling"),
            "bf16_speedup": timing["bf16"]["speedup"], "bf16_flop_ceiling": timing["bf16"].get("flop_ceiling"),
            "generation_speedup": timing.get("generation_tokens_per_s", {}).get("speedup"),
            "max_abs_logit_diff_gated_vs_pruned": exported["max_abs_logit_diff_gated_vs_pruned"],
            "train": trained["train"], "export": exported, "speed": timing}  # fmt: skip


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from adapters_ds.demo.default_model import prepare_default_model
    from adapters_ds.demo.problems import default_splits
    from adapters_ds.modeling import load_tokenizer
    from adapters_ds.prompts import build_prompt

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = args.base_model or str(prepare_default_model())
    stages = Stages(out / "stages.json", args.fresh)
    _, test_records = default_splits(seed=0)
    tokenizer = load_tokenizer(base)
    prompts = [build_prompt(r["instruction"], r["input"], "alpaca", tokenizer) for r in test_records[: args.batch]]
    data = {"records": test_records[: args.eval_n], "prompts": prompts}
    cpu = platform.processor() or platform.machine()
    flags = [f for f in ("amx_bf16", "avx512_bf16") if f in Path("/proc/cpuinfo").read_text()] if Path(
        "/proc/cpuinfo").is_file() else []  # fmt: skip
    result: dict = {"machine": {"cpu": cpu, "bf16_flags": flags, "threads": torch.get_num_threads()},
                    "base_model": base, "eval_n": len(data["records"]), "steps": args.steps}  # fmt: skip
    accuracy, lora, teacher = {}, None, None
    if args.lora_steps:  # first: with --teacher_from_lora the gates runs distill from it
        settings = {"steps": args.lora_steps, "lr": args.learning_rate, "val_n": args.val_n, "base": base}
        steps, lr = args.lora_steps, args.learning_rate
        lora = stages.run(
            "train lora", settings, lambda: train_adapter(base, out / "lora", args, "lora", steps, lr, [])
        )
        teacher = {"settings": settings, "result": lora} if args.teacher_from_lora else None
    if teacher is not None:
        result["teacher"] = teacher["result"]["adapter_dir"]
    curve = [gates_point(base, args, stages, s, False, data, teacher) for s in args.sparsities]
    curve += [gates_point(base, args, stages, s, True, data, teacher) for s in args.floor]
    if lora is not None:
        accuracy["lora"] = stages.run("accuracy lora", {**settings, "eval_n": args.eval_n},
                                      lambda: {"accuracy": accuracy_of(base, lora["adapter_dir"], data["records"])}
                                      )["accuracy"]  # fmt: skip
        result["lora_train"] = lora["train"]
    base_accuracy = stages.run(
        "accuracy base",
        {"eval_n": args.eval_n, "base": base},
        lambda: {"accuracy": accuracy_of(base, None, data["records"])},
    )
    result["accuracy_percent"] = {"base": base_accuracy["accuracy"], **accuracy}
    n = len(data["records"])
    result["accuracy_95_percent"] = {name: interval_95(value, n) for name, value in result["accuracy_percent"].items()}
    result["curve"] = curve
    text = json.dumps(result, indent=2)
    (out / "prune_speed.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
