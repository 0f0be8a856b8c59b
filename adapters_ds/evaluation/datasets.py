"""Evaluation data sets: LLM-Adapters-format test files, checked, and the training file a test set is compared with.

A data set is `<data_dir>/<name>/test.json`, a JSON list (or JSON Lines) of `{"instruction", "input", "output",
"answer"}`. Its kind is read from its records, never from its name: a label task (the commonsense suite) when every
record has an `Answer format:` line listing its labels (`labels.is_label_task`), else multiple choice or numeric
(`answers.is_multiple_choice`), the math suite. For math, the `output` field (old rationales) is not used; a label
task's outputs give the text before the label that label scoring ranks after (`labels.answer_lead`). With a
training file, `contamination` counts the test questions that occur in it (`records.occurs_in_training`).

A record may also be a conversation (OpenAI `messages` or ShareGPT `conversations`, ending with the question, or
with the reference answer after it) with a gold "answer": the model is then asked through its chat template
(`prompts.record_prompt`), the last user message being the question; the math and commonsense sets keep their
Alpaca-format prompts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from adapters_ds.conversations import normalize, record_format
from adapters_ds.errors import InputError
from adapters_ds.evaluation.answers import is_multiple_choice, score
from adapters_ds.evaluation.labels import gold_label, is_label_task, record_labels
from adapters_ds.records import json_type, occurs_in_training, question_text, read_records

TEST_FILE = "test.json"

Record = dict[str, Any]


Kind = Literal["numeric", "multiple_choice", "labels"]
SUITES = ("math", "commonsense")  # the reference project's two suites, in its tables' order


@dataclass
class EvalDataset:
    name: str
    path: Path | None
    records: list[Record]
    multiple_choice: bool
    label_task: bool = False

    @property
    def kind(self) -> Kind:
        return "labels" if self.label_task else "multiple_choice" if self.multiple_choice else "numeric"

    @property
    def suite(self) -> str:
        """`commonsense` for label tasks, `math` for numbers and AQuA letters: decided by the data's kind."""
        return suite_of(self.kind)


def suite_of(kind: Kind) -> str:
    return "commonsense" if kind == "labels" else "math"


def record_kind(records: Sequence[Mapping[str, Any]]) -> Kind:
    """The kind of a data set, from its records: a label task, else multiple choice, else numeric."""
    if is_label_task(records):
        return "labels"
    return "multiple_choice" if is_multiple_choice(records) else "numeric"


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
        if record_format(record) in ("openai", "sharegpt"):
            record = conversation_record(record, where)
        instruction, input_, answer = record.get("instruction"), record.get("input"), record.get("answer")
        if not isinstance(instruction, str) or not instruction.strip():
            raise InputError(f"{where}: expected a non-empty string 'instruction'; found {instruction!r}")
        if input_ is not None and not isinstance(input_, str):
            raise InputError(f"{where}: expected 'input' to be a string; found {input_!r}")
        if isinstance(answer, bool) or not isinstance(answer, str | int | float):
            raise InputError(f"{where}: expected a gold 'answer' (string or number); found {answer!r}")
        clean.append({**record, "input": input_ or "", "answer": str(answer)})
    try:
        kind = record_kind(clean)
    except InputError as exc:
        raise InputError(f"{source}: {exc}") from None
    for index, record in enumerate(clean):
        try:
            if kind == "labels":
                gold_label(record["answer"], record_labels(record))
            else:  # raises on a gold of the wrong kind
                score("", record["answer"], question_text(record), kind == "multiple_choice")
        except InputError as exc:
            hint = ""
            if kind == "numeric":  # a word for a gold answer: most likely a label task without its format line
                hint = (
                    "; a label task (gold labels such as 'true' or 'answer2') needs an 'Answer format: a/b/...' line "
                    "in every record's instruction or input to read its labels from"
                )
            raise InputError(f"{source}: record {index} (0-based): {exc}{hint}") from None
    return clean


def conversation_record(record: Mapping[str, Any], where: str) -> Record:
    """A conversation as an evaluation record: its messages up to the question (a final assistant turn is the
    reference output and is dropped from the prompt), its tools, and the last user message as the "instruction"
    (the question text that decides the data set's kind and the contamination count)."""
    conversation = normalize(record, where, prompt_only=True)
    messages = conversation["messages"]
    output = messages.pop()["content"] if messages[-1]["role"] == "assistant" else ""
    questions = [m["content"] for m in messages if m["role"] == "user"]
    if not questions or messages[-1]["role"] == "assistant":
        raise InputError(f"{where}: expected a conversation ending with a user's question (and its answer); found none")
    rest = {k: v for k, v in record.items() if k not in ("messages", "conversations", "tools")}
    return {**rest, "instruction": questions[-1], "input": "", "output": output, **conversation}


def load_dataset(data_dir: str | Path, name: str) -> EvalDataset:
    """`<data_dir>/<name>/test.json`, validated; its kind (numeric, multiple choice, labels) is read from the
    records."""
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
    kind = record_kind(records)
    return EvalDataset(name, path, records, kind == "multiple_choice", kind == "labels")


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
