"""Evaluation results: the scored rows, their files, the settings they depend on, and the summary table.

Files in an evaluation's output folder:
- `<name>.jsonl`: one row per example, `{"index", "prompt", "output", "prediction", "answer", "correct"}`
  (`RESULT_FIELDS`; label-scoring rows add `label_scores`, label to log-likelihood, and their output is the lead
  plus the chosen label), in index order once the data set is done. With `--compare_label_scoring`, a label task's
  label-scoring rows go to `<name>.label_scoring.jsonl` beside its generation rows. While it runs, rows are appended
  (and flushed to disk) as batches finish (`RowWriter`), so a killed run loses at most the batches in flight;
  `resume_rows` keeps every complete row already written and drops a line cut short by the kill.
- `eval_settings.json`: what the rows depend on (`eval_settings`); `start_output` refuses to add rows made with
  other settings to a folder, unless told to start over.
- `summary.json` and `summary.md`: per data set n, correct, accuracy (%) and optionally how many test questions
  occur in the training file; the average row is the mean of the data sets' accuracies (as the LLM-Adapters tables
  report it). Data sets are grouped by suite, math (numbers, AQuA letters) and commonsense (label tasks), each with
  its own average: one table when a single suite was evaluated, one per suite otherwise. When both scoring modes
  ran, a label task also reports the label-scoring accuracy and the agreement of the two modes (`compare_modes`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from adapters_ds.errors import InputError
from adapters_ds.evaluation.answers import score
from adapters_ds.evaluation.datasets import SUITES, EvalDataset, Kind
from adapters_ds.evaluation.label_scoring import best_label
from adapters_ds.evaluation.labels import clean_pick, score_label
from adapters_ds.fileio import atomic_write_text, read_json, write_json
from adapters_ds.records import question_text

if TYPE_CHECKING:
    from adapters_ds.quantization import QuantSpec

SETTINGS_FILE = "eval_settings.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
RESULT_FIELDS = ("index", "prompt", "output", "prediction", "answer", "correct")
LABEL_SCORING_SUFFIX = ".label_scoring"  # rows file of the second mode under --compare_label_scoring

Row = dict[str, Any]


# ------------------------------------------------------------------------------------------------------- rows


def score_row(index: int, record: Mapping[str, Any], prompt: str, output: str, kind: Kind) -> Row:
    """The result row of one generated `output` for `record` (validated, with its gold "answer")."""
    if kind == "labels":
        prediction, correct = score_label(output, record["answer"], question_text(record))
    else:
        prediction, correct = score(output, record["answer"], question_text(record), kind == "multiple_choice")
    return {
        "index": index,
        "prompt": prompt,
        "output": output,
        "prediction": prediction,
        "answer": record["answer"],
        "correct": correct,
    }


def label_row(
    index: int, record: Mapping[str, Any], prompt: str, lead: str, labels: Sequence[str], scores: Sequence[float]
) -> Row:
    """The result row of label scoring: the best label (`label_scoring.best_label`'s rule) and every label's score."""
    best = best_label(labels, scores)
    return {
        "index": index,
        "prompt": prompt,
        "output": lead + best,
        "prediction": best,
        "answer": record["answer"],
        "correct": best.lower() == record["answer"].strip().lower(),
        "label_scores": dict(zip(labels, scores, strict=True)),
    }


def compare_modes(
    generated: Sequence[Mapping[str, Any]],
    scored: Sequence[Mapping[str, Any]],
    label_sets: Sequence[Sequence[str]],
    lead: str,
) -> dict[str, Any]:
    """How often generation and label scoring chose the same label, in percent of all items (`agreement`; no label
    extracted from the generation counts as a disagreement), and among the items whose generation is exactly lead +
    a label (`clean`: their number; `clean_agreement`: None when there is none)."""
    same = [g["prediction"] == s["prediction"] for g, s in zip(generated, scored, strict=True)]
    picks = [clean_pick(g["output"], labels, lead) for g, labels in zip(generated, label_sets, strict=True)]
    clean = [agree for agree, pick in zip(same, picks, strict=True) if pick is not None]
    return {
        "agreement": round(100.0 * sum(same) / len(same), 2) if same else 0.0,
        "clean": len(clean),
        "clean_agreement": round(100.0 * sum(clean) / len(clean), 2) if clean else None,
    }


def accuracy(rows: Iterable[Mapping[str, Any]]) -> float:
    """Share of rows marked correct, in percent (0.0 for no rows)."""
    flags = [bool(row["correct"]) for row in rows]
    return 100.0 * sum(flags) / len(flags) if flags else 0.0


def rows_path(out_dir: Path, name: str, suffix: str = "") -> Path:
    """The rows file of data set `name` (`suffix`: LABEL_SCORING_SUFFIX for the second mode's rows)."""
    return out_dir / f"{name}{suffix}.jsonl"


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
    label_scoring: str = "off",
    label_lead: str | None = None,
    quantization: QuantSpec | None = None,
) -> dict[str, Any]:
    """What the rows depend on; batch size and limit are not, so a rerun may change them.

    `merged`: a mergeable adapter asked to be merged; never on a quantized base (the adapters stay attached there,
    `loading.merges`). `label_scoring` ("off", "on", "compare"), an explicit `label_lead` and the base's
    `quantization` are recorded only when set, so folders written before they existed resume as they were.
    """
    optional = {"label_scoring": label_scoring} if label_scoring != "off" else {}
    if label_lead is not None:
        optional["label_lead"] = label_lead
    if quantization is not None:
        optional.update(quantization.to_dict())
    return {
        "base_model": path_or_name(base_model),
        "adapter_dir": None if adapter_dir is None else path_or_name(adapter_dir),
        "adapter_method": adapter_method,
        "merged": merged and quantization is None,
        "template": template,
        "dtype": str(dtype).removeprefix("torch."),
        "max_new_tokens": max_new_tokens,
        "num_beams": num_beams,
        "stop_strings": list(stop_strings),
        **optional,
    }


def start_output(out_dir: Path, settings: dict[str, Any], names: Sequence[str], overwrite: bool) -> None:
    """Refuse to resume results made with other settings; with `overwrite`, drop the earlier results of these data
    sets before anything else, so a killed overwriting run cannot later resume from stale rows. Then record
    `settings`. Run it on one rank only."""
    path = out_dir / SETTINGS_FILE
    if overwrite:
        rows_files = [rows_path(out_dir, n, suffix) for n in names for suffix in ("", LABEL_SCORING_SUFFIX)]
        for stale in [*rows_files, *(out_dir / f for f in (SUMMARY_JSON, SUMMARY_MD))]:
            stale.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    elif path.is_file():
        previous = read_json(path, "evaluation settings")
        keys = [*settings, *(k for k in previous if k not in settings)]  # a setting dropped is a change too
        changed = {k: (previous.get(k), settings.get(k)) for k in keys if previous.get(k) != settings.get(k)}
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
    results: Mapping[str, list[Row]],
    datasets: Sequence[EvalDataset],
    contaminated: Mapping[str, int] | None,
    compared: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per data set {dataset, suite, type, n, correct, accuracy (%), [label-scoring columns], [contaminated]}, then
    the average row over all data sets. `compared[name]`: the label-scoring accuracy and `compare_modes` figures of a
    label task evaluated both ways."""
    table = []
    for dataset in datasets:
        rows = results[dataset.name]
        entry = {
            "dataset": dataset.name,
            "suite": dataset.suite,
            "type": dataset.kind,
            "n": len(rows),
            "correct": sum(bool(row["correct"]) for row in rows),
            "accuracy": round(accuracy(rows), 2),
            "_accuracy": accuracy(rows),  # unrounded, for the averages; dropped below
        }
        if compared is not None and dataset.name in compared:
            entry.update(compared[dataset.name])
        if contaminated is not None:
            entry["contaminated"] = contaminated[dataset.name]
        table.append(entry)
    average = _average_row("average", table)
    return [{k: v for k, v in e.items() if k != "_accuracy"} for e in table], average


def suite_rows(table: Sequence[Mapping[str, Any]], results: Mapping[str, list[Row]]) -> list[dict[str, Any]]:
    """The average row of each suite present, in `SUITES` order: {suite, datasets, n, correct, accuracy, ...}."""
    rows = []
    for suite in SUITES:
        entries = [{**e, "_accuracy": accuracy(results[e["dataset"]])} for e in table if e["suite"] == suite]
        if entries:
            rows.append({"suite": suite, "datasets": [e["dataset"] for e in entries], **_average_row(suite, entries)})
    return rows


def _average_row(name: str, entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Sums of n and correct, means of the data sets' percentages (not of the examples), as the reference reports."""
    average: dict[str, Any] = {
        "dataset": name,
        "n": sum(e["n"] for e in entries),
        "correct": sum(e["correct"] for e in entries),
        "accuracy": round(sum(e["_accuracy"] for e in entries) / len(entries), 2),
    }
    for key in ("label_scoring_accuracy", "agreement"):
        values = [e[key] for e in entries if e.get(key) is not None]
        if values:
            average[key] = round(sum(values) / len(values), 2)
    if any("contaminated" in e for e in entries):
        average["contaminated"] = sum(e.get("contaminated", 0) for e in entries)
    return average


def format_table(
    table: Sequence[Mapping[str, Any]], average: Mapping[str, Any], suites: Sequence[Mapping[str, Any]] = ()
) -> str:
    """Markdown: one table (dataset, n, accuracy (%), [label scoring (%), agreement (%)], [contaminated]) with the
    average row last; with two or more `suites` (`suite_rows`), one titled table per suite with its own average."""
    if len(suites) < 2:
        return _markdown_table(table, average)
    sections = []
    for suite in suites:
        entries = [e for e in table if e["dataset"] in suite["datasets"]]
        sections.append(f"**{suite['suite']}**\n\n" + _markdown_table(entries, suite))
    return "\n".join(sections)


def _markdown_table(table: Sequence[Mapping[str, Any]], average: Mapping[str, Any]) -> str:
    with_contamination = "contaminated" in average
    compared = any("label_scoring_accuracy" in e for e in table)
    header = "| dataset | n | accuracy (%) |" + (" label scoring (%) | agreement (%) |" if compared else "")
    header += " contaminated |" if with_contamination else ""
    rule = "|---|---:|---:|" + ("---:|---:|" if compared else "") + ("---:|" if with_contamination else "")
    lines = [header, rule]
    for entry in [*table, average]:
        name = "**average**" if entry is average else entry["dataset"]
        line = f"| {name} | {entry['n']} | {entry['accuracy']:.2f} |"
        if compared:
            line += "".join(
                f" {entry[k]:.2f} |" if entry.get(k) is not None else " – |"
                for k in ("label_scoring_accuracy", "agreement")
            )
        if with_contamination:
            line += f" {entry['contaminated']} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def write_summary(out_dir: Path, summary: Mapping[str, Any], markdown: str) -> None:
    """`summary.json` and `summary.md` (the table of `format_table`)."""
    write_json(out_dir / SUMMARY_JSON, summary)
    atomic_write_text(out_dir / SUMMARY_MD, markdown)
