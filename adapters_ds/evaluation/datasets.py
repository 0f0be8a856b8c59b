"""Evaluation data sets: LLM-Adapters-format test files, checked, and the training file a test set is compared with.

A data set is `<data_dir>/<name>/test.json`, a JSON list (or JSON Lines) of `{"instruction", "input", "output",
"answer"}`. Whether it is multiple choice is read from its records (`answers.is_multiple_choice`), never from its
name; the `output` field (old rationales) is not used. With a training file, `contamination` counts the test
questions that occur in it (`records.occurs_in_training`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters_ds.errors import InputError
from adapters_ds.evaluation.answers import is_multiple_choice, score
from adapters_ds.records import json_type, occurs_in_training, question_text, read_records

TEST_FILE = "test.json"

Record = dict[str, Any]


@dataclass
class EvalDataset:
    name: str
    path: Path
    records: list[Record]
    multiple_choice: bool


def validate_records(records: Any, source: str) -> list[Record]:
    """Evaluation records, checked: objects with a non-empty string "instruction", an optional string "input" and
    a gold "answer" (a string or a number) that fits the data set's kind; answers are returned as strings."""
    if not isinstance(records, list) or not records:
        found = "an empty list" if isinstance(records, list) else f"a JSON {json_type(records)}"
        raise InputError(f"{source}: expected a non-empty JSON list of records; found {found}")
    clean = []
    for index, record in enumerate(records):
        where = f"{source}: record {index} (0-based)"
        if not isinstance(record, Mapping):
            raise InputError(f"{where}: expected a JSON object; found {json_type(record)}")
        instruction, input_, answer = record.get("instruction"), record.get("input"), record.get("answer")
        if not isinstance(instruction, str) or not instruction.strip():
            raise InputError(f"{where}: expected a non-empty string 'instruction'; found {instruction!r}")
        if input_ is not None and not isinstance(input_, str):
            raise InputError(f"{where}: expected 'input' to be a string; found {input_!r}")
        if isinstance(answer, bool) or not isinstance(answer, str | int | float):
            raise InputError(f"{where}: expected a gold 'answer' (string or number); found {answer!r}")
        clean.append({**record, "input": input_ or "", "answer": str(answer)})
    try:
        multiple_choice = is_multiple_choice(clean)
    except InputError as exc:
        raise InputError(f"{source}: {exc}") from None
    for index, record in enumerate(clean):
        try:
            score("", record["answer"], question_text(record), multiple_choice)  # raises on a gold of the wrong kind
        except InputError as exc:
            raise InputError(f"{source}: record {index} (0-based): {exc}") from None
    return clean


def load_dataset(data_dir: str | Path, name: str) -> EvalDataset:
    """`<data_dir>/<name>/test.json`, validated; its kind (numeric or multiple choice) is read from the records."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"data_dir: expected a folder of <name>/{TEST_FILE}; found no folder {str(data_dir)!r}")
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise InputError(f"datasets: expected folder names inside data_dir; found {name!r}")
    folder = data_dir / name
    if not folder.is_dir():
        available = sorted(p.name for p in data_dir.iterdir() if (p / TEST_FILE).is_file())
        raise InputError(f"dataset {name!r}: no folder {str(folder)!r}; data sets in {str(data_dir)!r}: {available}")
    path = folder / TEST_FILE
    records = validate_records(read_records(path, f"dataset {name!r} test file"), str(path))
    return EvalDataset(name, path, records, is_multiple_choice(records))


def training_texts(path: str | Path) -> list[str]:
    """The question of every record of a training file (JSON list or JSONL), for contamination counts.

    Alpaca-format records give instruction + input; raw GSM8K rows give "question", raw MAWPS rows
    "original_text"; a record with none of these (nor "text") is bad input.
    """
    rows = read_records(path, "train_data")
    texts = []
    for index, row in enumerate(rows):
        text = _training_question(row) if isinstance(row, Mapping) else None
        if text is None:
            found = f"fields {sorted(row)}" if isinstance(row, Mapping) else f"a JSON {json_type(row)}"
            raise InputError(
                f"train_data {str(path)!r}: record {index} (0-based): expected an object with a question field "
                f"('instruction', 'question', 'original_text' or 'text'); found {found}"
            )
        texts.append(text)
    if not texts:
        raise InputError(f"train_data {str(path)!r}: expected at least one record; found none")
    return texts


def _training_question(row: Mapping[str, Any]) -> str | None:
    if isinstance(row.get("instruction"), str):
        return question_text(row)
    return next((row[k] for k in ("question", "original_text", "text") if isinstance(row.get(k), str)), None)


def contamination(records: Sequence[Mapping[str, Any]], train_texts: Sequence[str]) -> int:
    """How many test questions occur (after normalisation) in the training texts."""
    return sum(occurs_in_training([question_text(r) for r in records], train_texts))
