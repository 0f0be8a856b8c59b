"""The reference project's comparison, rerun by the tool: every adapter method trained the same way on the same data,
scored on the same benchmarks, one table.

    python bench/adapter_table.py [--base_model M] [--data_path TRAIN] [--methods lora,series,...] [--max_steps N]
        [--data_dir D] [--datasets A,B] [--output_dir O] [--limit K] [--decontaminate]
        [--reference llm-adapters-llama7b] [--nproc N]

For each method (default: every registered method at the reference project's settings, `REFERENCE_SETTINGS`) it
trains through `launcher/train.py` under the shipped ZeRO-3 config with the same data order, steps, batch and cutoff,
evaluates the adapter and the base model with the harness (`launcher/evaluate.py`) on the `--data_dir` sets, and
prints one Markdown table (rows: base + methods; columns: the data sets, their average, trainable parameters, train
tokens/s, eval questions/s) and one JSON object with everything (also `table.md` / `table.json` in the output folder).

Each run has its own folder (`O/<method>/`, `O/base/`); a rerun of the same command skips what is finished (a trained
adapter is not retrained, a finished evaluation is read back) and resumes what is not (the harness resumes its rows).

Training data: by default a clean set, built here: GSM8K train + MAWPS train converted by the project
(`adapters_ds.mathdata.convert`), deduplicated, and with every question that occurs in one of the `--data_dir` test
sets dropped (`O/train_clean.json`, counts in the JSON). `--data_path` takes any training file instead, e.g. the
reference project's own `math_data.json`, to show what its contamination does: the contamination column counts,
per data set, the test questions that occur in the training file, and `--decontaminate` adds the accuracies with
those questions left out ("clean" columns), so both ways are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from safetensors import safe_open

from adapters_ds.adapters.registry import METHODS, get_method, load_plugins
from adapters_ds.demo.default_model import prepare_default_model
from adapters_ds.demo.problems import default_splits
from adapters_ds.evaluation.datasets import training_texts
from adapters_ds.evaluation.stats import PAIRED_INTERVAL, PAIRED_TEST, accuracy_summary, paired_difference
from adapters_ds.fileio import atomic_write_text
from adapters_ds.mathdata.convert import gsm8k_to_records, mawps_to_records
from adapters_ds.records import normalize_question, occurs_in_training, question_text, read_records

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
BUILTIN = "builtin"  # the built-in problems' held-out split (adapters_ds.demo.problems), scored like a data set

# The reference project's settings (LLM-Adapters' math runs); methods not listed train with their defaults.
REFERENCE_SETTINGS = {
    "lora": ["--lora_r", "32", "--lora_alpha", "64"],
    "series": ["--bottleneck_size", "256", "--series_preset", "pfeiffer"],
    "parallel": ["--bottleneck_size", "256"],
    "prefix": ["--num_virtual_tokens", "30"],
}
# Published rows (accuracy %), with their source, printed beside ours with --reference.
REFERENCES = {
    "llm-adapters-llama7b": {
        "source": "LLM-Adapters README (arXiv 2304.01933), LLaMA-7B trained on math_10k",
        "columns": ["gsm8k", "AQuA", "mawps", "SVAMP", "average"],
        "rows": {
            "lora": [37.5, 18.9, 79.0, 52.1, 46.9],
            "series": [33.3, 15.0, 77.7, 52.3, 44.6],
            "parallel": [35.3, 18.1, 82.4, 49.6, 46.4],
            "prefix": [24.4, 14.2, 63.4, 38.1, 35.0],
        },
    }
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base_model", help="base model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--data_path", help="training file (default: the clean GSM8K + MAWPS set built here)")
    parser.add_argument("--gsm8k", default=str(SHARED / "gsm8k_raw" / "train.jsonl"), help="for the clean set")
    parser.add_argument("--mawps", default=str(SHARED / "math" / "mawps" / "trainset.json"), help="for the clean set")
    parser.add_argument("--methods", help="comma-separated (default: every registered method)")
    parser.add_argument("--max_steps", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--cutoff_len", type=int, default=256)
    parser.add_argument("--learning_rate", type=float, help="one rate for every method (default: each method's own)")
    parser.add_argument("--ds_config", default=str(REPO / "ds_configs" / "zero3.json"))
    parser.add_argument("--data_dir", default=str(SHARED / "math"), help="folder of <name>/test.json sets")
    parser.add_argument(
        "--datasets",
        help=f"comma-separated sets of --data_dir, or {BUILTIN} (the built-in problems' held-out split); default: "
        f"every set in --data_dir, and {BUILTIN} first on the embedded model",
    )
    parser.add_argument(
        "--limit", type=int, help=f"score only the first N questions of each --data_dir set ({BUILTIN} is scored whole)"
    )
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--output_dir", default="outputs/adapter_table")
    parser.add_argument("--decontaminate", action="store_true", help="also report accuracy without contaminated items")
    parser.add_argument("--reference", choices=sorted(REFERENCES), help="print a published table beside ours")
    parser.add_argument("--nproc", type=int, default=2, help="ranks for training and evaluation (CPU: one per core)")
    args = parser.parse_args(argv)
    load_plugins()  # the launched commands load them too (the environment is passed on)
    args.methods = args.methods.split(",") if args.methods else sorted(METHODS)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; registered: {sorted(METHODS)}")
    data_dir = Path(args.data_dir)
    found = sorted(p.parent.name for p in data_dir.glob("*/test.json") if p.parent.name != BUILTIN)
    default = [BUILTIN] * (args.base_model is None) + found
    args.datasets = args.datasets.split(",") if args.datasets else default
    if not args.datasets or not set(args.datasets) <= {BUILTIN, *found}:
        parser.error(f"--datasets {args.datasets} must be {BUILTIN} or sets of --data_dir {str(data_dir)!r}: {found}")
    return args


def builtin_records() -> list[dict]:
    """The built-in problems' held-out split (the main job's), as a data set."""
    return default_splits(seed=0)[1]


def full_test_set(args: argparse.Namespace, name: str) -> list[dict]:
    """Every question of data set `name`: the built-in held-out split, or `--data_dir`'s `<name>/test.json`."""
    return builtin_records() if name == BUILTIN else read_records(Path(args.data_dir) / name / "test.json", name)


def scored_data_dir(args: argparse.Namespace, out: Path) -> Path:
    """A folder of <name>/test.json for the harness holding exactly the questions scored (`O/sets`): builtin whole
    (its 200 questions are what makes its intervals narrow), each `--data_dir` set its first `--limit`. Rewritten
    when the selection changed, atomically (`fileio.atomic_write_text`)."""
    root = out / "sets"
    for name in args.datasets:
        records = full_test_set(args, name)
        if name != BUILTIN and args.limit:
            records = records[: args.limit]
        text = json.dumps(records, ensure_ascii=False)
        target = root / name / "test.json"
        if target.is_file() and target.read_text() == text:
            continue
        atomic_write_text(target, text)
    return root


def test_sets(args: argparse.Namespace) -> dict[str, list[dict]]:
    """The scored records of each data set (as staged by `scored_data_dir`)."""
    return {name: read_records(Path(args.sets_dir) / name / "test.json", name) for name in args.datasets}


def clean_training_set(args: argparse.Namespace, sets: dict[str, list[dict]], out: Path) -> dict:
    """GSM8K train + MAWPS train (+ the built-in problems' training split when builtin is scored) as training
    records, deduplicated, without any question of a scored test set (all of their questions, not only the --limit
    scored). Writes `out`; returns the counts."""
    parts = {
        BUILTIN: default_splits(seed=0)[0] if BUILTIN in args.datasets else [],  # shares no question with its test
        "gsm8k": gsm8k_to_records(read_records(args.gsm8k, "gsm8k"), source=args.gsm8k),
        "mawps": mawps_to_records(read_records(args.mawps, "mawps"), source=args.mawps),
    }
    records = [record for part in parts.values() for record in part]
    every_test = [question_text(r) for name in args.datasets for r in full_test_set(args, name)]
    contaminated = occurs_in_training([question_text(r) for r in records], every_test)
    seen, kept, duplicates = set(), [], 0
    for record, dirty in zip(records, contaminated, strict=True):
        key = normalize_question(question_text(record))
        if dirty:
            continue
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        kept.append(record)
    out.write_text(json.dumps(kept, ensure_ascii=False))
    return {**{name: len(part) for name, part in parts.items()}, "contaminated_dropped": sum(contaminated),
            "duplicates_dropped": duplicates, "kept": len(kept)}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, argv: list[str], nproc: int, log: Path) -> float:
    """Run a launcher script on `nproc` ranks (one plain process for 1); returns wall seconds; raises on failure."""
    if nproc == 1:
        cmd = [sys.executable, str(REPO / "launcher" / script)]
    else:
        runner = Path(sys.executable).parent / "deepspeed"
        cmd = [
            str(runner),
            "--num_gpus",
            str(nproc),
            "--master_port",
            str(free_port()),
            str(REPO / "launcher" / script),
        ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, os.cpu_count() // nproc)))}
    start = time.perf_counter()
    with log.open("a") as f:
        code = subprocess.run([*cmd, *argv], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    if code != 0:
        raise SystemExit(f"error: {script} failed with exit code {code}; see {log}")
    return time.perf_counter() - start


def train(args: argparse.Namespace, method: str, base: str, data: str, run: Path) -> dict:
    """Train one method unless its run folder holds a finished adapter; returns its training facts."""
    done = run / "train_done.json"
    if done.is_file():
        return json.loads(done.read_text())
    run.mkdir(parents=True, exist_ok=True)
    argv = ["--ds_config", args.ds_config, "--base_model", base, "--data_path", data,
            "--output_dir", str(run / "train"), "--adapter", method, "--max_steps", str(args.max_steps),
            "--batch_size", str(args.batch_size), "--micro_batch_size", str(args.micro_batch_size),
            "--cutoff_len", str(args.cutoff_len), "--save_steps", "0", "--logging_steps", "10",
            "--resume", "auto", *REFERENCE_SETTINGS.get(method, [])]  # fmt: skip
    argv += ["--learning_rate", str(args.learning_rate)] if args.learning_rate else []
    seconds = launch("train.py", argv, args.nproc, run / "train.log")
    log = [json.loads(line) for line in (run / "train" / "train_log.jsonl").read_text().splitlines()]
    tokens, loop_s = sum(e.get("tokens", 0) for e in log), max((e.get("elapsed_s", 0.0) for e in log), default=0.0)
    facts = {
        "method": method,
        "settings": REFERENCE_SETTINGS.get(method, []),
        "learning_rate": args.learning_rate or get_method(method).config.default_learning_rate,
        "steps": len(log),
        "first_loss": log[0]["loss"],
        "last_loss": log[-1]["loss"],
        "train_tokens_per_s": round(tokens / loop_s, 1) if loop_s else None,
        "train_wall_s": round(seconds, 1),
        "trainable_params": trainable_params(run / "train" / "adapter"),
    }
    done.write_text(json.dumps(facts))
    return facts


def trainable_params(adapter_dir: Path) -> int:
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (a safe_open handle)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def evaluate(args: argparse.Namespace, base: str, adapters: dict[Path, Path | None], train_data: str) -> dict:
    """Score the base (adapter None) or adapters on the data sets, {output folder: summary}; the unfinished adapters
    in one launch on one loaded base (`--adapter_dir a,b,c`; the harness resumes a killed run)."""
    pending = {out: adapter for out, adapter in adapters.items() if not (out / "summary.json").is_file()}
    if pending:
        argv = ["--base_model", base, "--datasets", ",".join(args.datasets), "--data_dir", args.sets_dir,
                "--output_dir", ",".join(map(str, pending)), "--train_data", train_data,
                "--max_new_tokens", str(args.max_new_tokens)]  # fmt: skip
        folders = [str(adapter) for adapter in pending.values() if adapter is not None]
        argv += ["--adapter_dir", ",".join(folders)] if folders else []
        for out in pending:
            out.mkdir(parents=True, exist_ok=True)
        launch("evaluate.py", argv, args.nproc, Path(args.output_dir) / "eval.log")
    return {out: json.loads((out / "summary.json").read_text()) for out in adapters}


def score_table(summary: dict, out: Path, sets: dict[str, list[dict]], train_texts: list[str]) -> dict:
    """Per data set: accuracy, n and its Wilson 95 % interval, contaminated count, and the accuracy on the questions
    not in the training file."""
    result = {}
    for name, records in sets.items():
        rows = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines() if line.strip()]
        dirty = occurs_in_training([question_text(r) for r in records], train_texts)
        clean = [row for row in rows if not dirty[row["index"]]]
        rows.sort(key=lambda row: row["index"])
        result[name] = {
            **accuracy_summary([bool(row["correct"]) for row in rows]),  # the harness's accuracy, with its interval
            "contaminated": sum(dirty),
            "clean_n": len(clean),
            "clean_accuracy": round(100 * sum(bool(r["correct"]) for r in clean) / len(clean), 2) if clean else None,
        }
    timing = summary.get("timing", {}).get("datasets", {})
    rates = [t["questions_per_s"] for t in timing.values() if t.get("questions_per_s")]
    result["_eval_questions_per_s"] = round(sum(rates) / len(rates), 3) if rates else None
    return result


def correct_flags(out: Path, name: str) -> list[bool]:
    """Whether each question of data set `name` (in index order) was answered right, from the harness's rows."""
    rows = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines() if line.strip()]
    return [bool(row["correct"]) for row in sorted(rows, key=lambda row: row["index"])]


def comparisons(flags: dict[str, dict[str, list[bool]]], datasets: list[str], against: str) -> dict | None:
    """Per method row, per data set: the paired difference to row `against` (`stats.paired_difference`)."""
    if against not in flags:
        return None
    return {
        row: {d: paired_difference(per_set[d], flags[against][d]) for d in datasets}
        for row, per_set in flags.items()
        if row not in ("base", against)
    }


def average(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(sum(present) / len(present), 2) if present and len(present) == len(values) else None


def markdown(rows: dict[str, dict], datasets: list[str], decontaminate: bool) -> str:
    header = ["model", *datasets, "average"]
    if decontaminate:
        header += [f"{d} (clean)" for d in datasets] + ["average (clean)"]
    header += ["contaminated", "trainable params", "train tokens/s", "eval questions/s"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, row in rows.items():
        scores = row["scores"]
        cells = [name, *(cell(scores[d], row.get("vs_base", {}).get(d)) for d in datasets), _fmt(row["average"])]
        if decontaminate:
            cells += [_fmt(scores[d]["clean_accuracy"]) for d in datasets] + [_fmt(row["clean_average"])]
        cells += [
            "/".join(str(scores[d]["contaminated"]) for d in datasets),
            f"{row['trainable_params']:,}" if row.get("trainable_params") else "0",
            _fmt(row.get("train_tokens_per_s")),
            _fmt(scores.get("_eval_questions_per_s")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", NOTE]
    return "\n".join(lines) + "\n"


NOTE = (
    "Accuracy % [Wilson 95 % interval], then for a method the difference to the base in points on the same "
    "questions; † marks a difference that is not significant (exact McNemar p >= 0.05). table.json holds every "
    "interval and p-value, against the base (vs_base) and against LoRA (vs_lora)."
)


def cell(score: dict, vs_base: dict | None) -> str:
    """`accuracy [lo, hi]`, and for a method its paired difference to the base, † when not significant."""
    text = f"{score['accuracy']:.1f} [{score['ci95'][0]:.1f}, {score['ci95'][1]:.1f}]"
    if vs_base is not None:
        text += f" {vs_base['delta']:+.1f}" + ("" if vs_base["significant"] else "†")
    return text


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)


def reference_markdown(key: str) -> str:
    ref = REFERENCES[key]
    lines = [f"Published ({ref['source']}):", "", "| method | " + " | ".join(ref["columns"]) + " |",
             "|---|" + "---:|" * len(ref["columns"])]  # fmt: skip
    lines += [f"| {m} | " + " | ".join(f"{v:.1f}" for v in values) + " |" for m, values in ref["rows"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = args.base_model or str(prepare_default_model())
    args.sets_dir = str(scored_data_dir(args, out))
    sets = test_sets(args)
    clean_counts = None
    data = args.data_path
    if data is None:
        data = str(out / "train_clean.json")
        counts_file = out / "train_clean_counts.json"
        if not counts_file.is_file():
            counts_file.write_text(json.dumps(clean_training_set(args, sets, Path(data))))
        clean_counts = json.loads(counts_file.read_text())
    train_texts = training_texts(data)
    facts = {method: train(args, method, base, data, out / method) for method in args.methods}
    folders = {"base": (out / "base" / "eval", None)}
    folders.update({m: (out / m / "eval", out / m / "train" / "adapter") for m in args.methods})
    evaluate(args, base, {folders["base"][0]: None}, data)
    summaries = evaluate(args, base, {folder: adapter for m, (folder, adapter) in folders.items() if m != "base"}, data)
    summaries[folders["base"][0]] = json.loads((folders["base"][0] / "summary.json").read_text())
    rows: dict[str, dict] = {}
    flags: dict[str, dict[str, list[bool]]] = {}
    for name, (folder, _) in folders.items():
        rows[name] = {**facts.get(name, {}), "scores": score_table(summaries[folder], folder, sets, train_texts)}
        flags[name] = {d: correct_flags(folder, d) for d in args.datasets}
    for against, key in (("base", "vs_base"), ("lora", "vs_lora")):
        for name, per_set in (comparisons(flags, args.datasets, against) or {}).items():
            rows[name][key] = per_set
    for row in rows.values():
        row["average"] = average([row["scores"][d]["accuracy"] for d in args.datasets])
        row["clean_average"] = average([row["scores"][d]["clean_accuracy"] for d in args.datasets])
    table = markdown(rows, args.datasets, args.decontaminate)
    if args.reference:
        table += "\n" + reference_markdown(args.reference)
    result = {
        "base_model": base,
        "training_data": data,
        "clean_training_set": clean_counts,
        "settings": {
            k: getattr(args, k)
            for k in (
                "max_steps",
                "batch_size",
                "micro_batch_size",
                "cutoff_len",
                "learning_rate",
                "limit",
                "nproc",
                "max_new_tokens",
            )
        },  # fmt: skip
        "datasets": args.datasets,
        "statistics": {"accuracy_ci95": "Wilson score interval", "delta_ci95": PAIRED_INTERVAL, "p_value": PAIRED_TEST},
        "rows": rows,
        "reference": REFERENCES.get(args.reference),
    }
    (out / "table.md").write_text(table)
    (out / "table.json").write_text(json.dumps(result, indent=2))
    print(table)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
