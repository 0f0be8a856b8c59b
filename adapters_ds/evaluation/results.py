"""Evaluation results: the scored rows, their files, the settings they depend on, and the summary table.

Files in an evaluation's output folder:
- `<name>.jsonl`: one row per example, `{"index", "prompt", "output", "prediction", "answer", "correct"}`
  (`RESULT_FIELDS`), in index order once the data set is done. While it runs, rows are appended (and flushed to
  disk) as batches finish (`RowWriter`), so a killed run loses at most the batches in flight; `resume_rows` keeps
  every complete row already written and drops a line cut short by the kill.
- `eval_settings.json`: what the rows depend on (`eval_settings`); `start_output` refuses to add rows made with
  other settings to a folder, unless told to start over.
- `summary.json` and `summary.md`: per data set n, correct, accuracy (%) and optionally how many test questions
  occur in the training file; the average row is the mean of the data sets' accuracies (as the LLM-Adapters tables
  report it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from adapters_ds.errors import InputError
from adapters_ds.evaluation.answers import score
from adapters_ds.evaluation.datasets import EvalDataset
from adapters_ds.fileio import atomic_write_text, read_json, write_json
from adapters_ds.records import question_text

SETTINGS_FILE = "eval_settings.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
RESULT_FIELDS = ("index", "prompt", "output", "prediction", "answer", "correct")

Row = dict[str, Any]


# ------------------------------------------------------------------------------------------------------- rows


def score_row(index: int, record: Mapping[str, Any], prompt: str, output: str, multiple_choice: bool) -> Row:
    """The result row of one generated `output` for `record` (validated, with its gold "answer")."""
    prediction, correct = score(output, record["answer"], question_text(record), multiple_choice)
    return {
        "index": index,
        "prompt": prompt,
        "output": output,
        "prediction": prediction,
        "answer": record["answer"],
        "correct": correct,
    }


def accuracy(rows: Iterable[Mapping[str, Any]]) -> float:
    """Share of rows marked correct, in percent (0.0 for no rows)."""
    flags = [bool(row["correct"]) for row in rows]
    return 100.0 * sum(flags) / len(flags) if flags else 0.0


def rows_path(out_dir: Path, name: str) -> Path:
    """The rows file of data set `name`."""
    return out_dir / f"{name}.jsonl"


def rows_text(rows: Iterable[Row]) -> str:
    """Rows as JSON Lines text, one row per line."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_rows(path: Path, rows: Iterable[Row]) -> None:
    """Replace the rows file at `path` by `rows`, atomically."""
    atomic_write_text(path, rows_text(rows))


def read_rows_file(path: Path, prompts: Sequence[str], answers: Sequence[str]) -> dict[int, Row]:
    """Rows already written to `path` for examples 0..len(prompts)-1, by index; {} when there is no file.

    A last line without its newline that does not parse is what a kill mid-write leaves: it is dropped. Any other
    bad line, or a row whose prompt or answer is not this run's (another template, data file or model's prompt),
    is an InputError: resuming would mix results, so the user must pass --overwrite. Rows of indices beyond this
    run's examples (an earlier run without --limit) are ignored.
    """
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    rows: dict[int, Row] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the unterminated last line of a killed run
                continue
            raise InputError(
                f"results file {str(path)!r}: line {number} is not valid JSON; the file is damaged "
                "(pass --overwrite to start over)"
            ) from None
        if not isinstance(row, dict) or set(RESULT_FIELDS) - set(row) or not isinstance(row["index"], int):
            raise InputError(
                f"results file {str(path)!r}: line {number}: expected a row with fields {list(RESULT_FIELDS)}; "
                f"found {str(row)[:80]!r} (pass --overwrite to start over)"
            )
        index = row["index"]
        if not 0 <= index < len(prompts):
            continue
        if row["prompt"] != prompts[index] or row["answer"] != answers[index]:
            raise InputError(
                f"results file {str(path)!r}: the row of example {index} was made from another prompt or gold "
                "answer (another --template or data file); pass --overwrite to start over"
            )
        rows[index] = row
    return rows


def resume_rows(path: Path, prompts: Sequence[str], answers: Sequence[str]) -> dict[int, Row]:
    """The rows kept from an earlier run (`read_rows_file`); the file rewritten with exactly those, ready to append
    to."""
    done = read_rows_file(path, prompts, answers)
    if path.exists():
        write_rows(path, (done[i] for i in sorted(done)))
    return done


class RowWriter:
    """Appends rows to a results file, each group flushed and synced to disk before the call returns."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a", encoding="utf-8")

    def write(self, rows: Sequence[Row]) -> None:
        if rows:
            self._file.write(rows_text(rows))  # one write per group: a kill cuts at most its last line
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


# --------------------------------------------------------------------------------------------------- settings


def path_or_name(name: str) -> str:
    """An existing path made absolute (a rerun from another folder is the same run), anything else as given."""
    return str(Path(name).resolve()) if Path(name).exists() else name


def eval_settings(
    base_model: str,
    adapter_dir: str | None,
    adapter_method: str,
    merged: bool,
    template: str,
    dtype: torch.dtype,
    max_new_tokens: int,
    num_beams: int,
    stop_strings: Sequence[str],
) -> dict[str, Any]:
    """What the rows depend on; batch size and limit are not, so a rerun may change them."""
    return {
        "base_model": path_or_name(base_model),
        "adapter_dir": None if adapter_dir is None else path_or_name(adapter_dir),
        "adapter_method": adapter_method,
        "merged": merged,
        "template": template,
        "dtype": str(dtype).removeprefix("torch."),
        "max_new_tokens": max_new_tokens,
        "num_beams": num_beams,
        "stop_strings": list(stop_strings),
    }


def start_output(out_dir: Path, settings: dict[str, Any], names: Sequence[str], overwrite: bool) -> None:
    """Refuse to resume results made with other settings; with `overwrite`, drop the earlier results of these data
    sets before anything else, so a killed overwriting run cannot later resume from stale rows. Then record
    `settings`. Run it on one rank only."""
    path = out_dir / SETTINGS_FILE
    if overwrite:
        for stale in [*(rows_path(out_dir, n) for n in names), *(out_dir / f for f in (SUMMARY_JSON, SUMMARY_MD))]:
            stale.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    elif path.is_file():
        previous = read_json(path, "evaluation settings")
        changed = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
        if changed:
            listed = "; ".join(f"{k}: {old!r} then, {new!r} now" for k, (old, new) in changed.items())
            raise InputError(
                f"output_dir {str(out_dir)!r} holds results made with other settings ({listed}); "
                "pass --overwrite to start over or choose another output_dir"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, settings)


# ---------------------------------------------------------------------------------------------------- summary


def summary_rows(
    results: Mapping[str, list[Row]], datasets: Sequence[EvalDataset], contaminated: Mapping[str, int] | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per data set {dataset, type, n, correct, accuracy (%), [contaminated]}, then the average row."""
    table = []
    for dataset in datasets:
        rows = results[dataset.name]
        entry = {
            "dataset": dataset.name,
            "type": "multiple_choice" if dataset.multiple_choice else "numeric",
            "n": len(rows),
            "correct": sum(bool(row["correct"]) for row in rows),
            "accuracy": round(accuracy(rows), 2),
        }
        if contaminated is not None:
            entry["contaminated"] = contaminated[dataset.name]
        table.append(entry)
    average = {
        "dataset": "average",
        "n": sum(e["n"] for e in table),
        "correct": sum(e["correct"] for e in table),
        "accuracy": round(sum(accuracy(results[d.name]) for d in datasets) / len(datasets), 2),
    }
    if contaminated is not None:
        average["contaminated"] = sum(contaminated.values())
    return table, average


def format_table(table: Sequence[Mapping[str, Any]], average: Mapping[str, Any]) -> str:
    """A Markdown table: dataset, n, accuracy (%), [contaminated]; the average row last."""
    with_contamination = "contaminated" in average
    header = "| dataset | n | accuracy (%) |" + (" contaminated |" if with_contamination else "")
    rule = "|---|---:|---:|" + ("---:|" if with_contamination else "")
    lines = [header, rule]
    for entry in [*table, average]:
        name = "**average**" if entry is average else entry["dataset"]
        line = f"| {name} | {entry['n']} | {entry['accuracy']:.2f} |"
        if with_contamination:
            line += f" {entry['contaminated']} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def write_summary(out_dir: Path, summary: Mapping[str, Any], markdown: str) -> None:
    """`summary.json` and `summary.md` (the table of `format_table`)."""
    write_json(out_dir / SUMMARY_JSON, summary)
    atomic_write_text(out_dir / SUMMARY_MD, markdown)
