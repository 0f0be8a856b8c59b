"""The commonsense training mix: the train splits of label tasks (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC, OBQA:
what the reference project's commonsense_170k merges) in one training file of the same record format, deduplicated,
with per-source counts and a report of how many test questions the mix contains.

    python -m adapters_ds.mathdata commonsense --data_dir DIR --out mix.json [--datasets a,b] [--decontaminate]

Sources are `<data_dir>/<name>/train.json` (LLM-Adapters records `{"instruction", "input", "output", "answer"}`);
test sets are every `<test_dir>/<name>/test.json` (`test_dir` defaults to `data_dir`). The records are copied as they
are (instruction with its `Answer format:` line, output "the correct answer is <label>", answer), so training sees
exactly the prompts the evaluation harness builds from the test files.

- Deduplication: records are keyed by their normalised question (`records.normalize_question` of instruction +
  input, the contamination key). The first record of a question is kept and later copies dropped; when copies
  disagree on the answer, every copy is dropped (`conflicting`): the question alone does not decide its label
  (BoolQ without its passage is such a case) and training on both labels teaches noise.
- Contamination: a test question occurs in the mix when its normalised text equals or is contained in a training
  question, on word boundaries: the harness's rule (`records.occurs_in_training`), computed through an index of
  words, which gives the same answer in a fraction of the time on 170k x 20k pairs. The report counts, per test
  set, its questions found in the mix, and per source, the training records that contain a test question; with
  `decontaminate` those records are dropped and the counts after dropping are 0.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from adapters_ds.errors import InputError
from adapters_ds.records import json_type, normalize_question, occurrences, question_text, read_records

TRAIN_FILE, TEST_FILE = "train.json", "test.json"
FIELDS = ("instruction", "input", "output", "answer")

Record = dict[str, str]


def split_names(folder: str | Path, file_name: str) -> list[str]:
    """The names of the sub-folders of `folder` that hold `file_name`, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"expected a folder of <name>/{file_name} files; found no folder {str(folder)!r}")
    return sorted(p.name for p in folder.iterdir() if (p / file_name).is_file())


def read_split(folder: str | Path, name: str, file_name: str) -> list[Record]:
    """`<folder>/<name>/<file_name>` as checked records with the four fields (input "" when absent)."""
    path = Path(folder) / name / file_name
    if not path.is_file():
        available = split_names(folder, file_name)
        raise InputError(f"{name!r}: no file {str(path)!r}; sets with a {file_name} in {str(folder)!r}: {available}")
    rows = read_records(path, f"{name} {file_name}")
    if not rows:
        raise InputError(f"{str(path)!r}: expected at least one record; found none")
    records = []
    for index, row in enumerate(rows):
        where = f"{str(path)!r}: record {index} (0-based)"
        if not isinstance(row, Mapping):
            raise InputError(f"{where}: expected a JSON object; found {json_type(row)}")
        record = {"input": ""} | {k: row[k] for k in FIELDS if k in row and row[k] is not None}
        for field in FIELDS:
            value = record.get(field)
            if not isinstance(value, str) or (field != "input" and not value.strip()):
                raise InputError(f"{where}: expected a {'' if field == 'input' else 'non-empty '}string {field!r}; "
                                 f"found {value!r}")  # fmt: skip
        records.append({k: record[k] for k in FIELDS})
    return records


def build_mix(
    sources: Mapping[str, Sequence[Record]], tests: Mapping[str, Sequence[Record]], decontaminate: bool = False
) -> tuple[list[Record], dict[str, Any]]:
    """(the mix, the report): the sources' records in source order, deduplicated, optionally decontaminated.

    Report: `sources` per source {read, duplicates, conflicting, contaminated, kept}, where `contaminated` counts
    the deduplicated records that contain a test question (dropped when `decontaminate`); `tests` per test set {n,
    in_mix}: its questions that occur in the written mix; `total` the mix's size.
    """
    keyed = [(name, record, normalize_question(question_text(record))) for name, rs in sources.items() for record in rs]
    answers: dict[str, set[str]] = defaultdict(set)
    for _, record, key in keyed:
        answers[key].add(record["answer"].strip().lower())
    counts = {
        name: {"read": len(rs), "duplicates": 0, "conflicting": 0, "contaminated": 0} for name, rs in sources.items()
    }
    seen: set[str] = set()
    unique: list[tuple[str, Record]] = []
    for name, record, key in keyed:
        if len(answers[key]) > 1:
            counts[name]["conflicting"] += 1
        elif key in seen:
            counts[name]["duplicates"] += 1
        else:
            seen.add(key)
            unique.append((name, record))
    test_questions = {name: [question_text(r) for r in rs] for name, rs in tests.items()}
    flat = [q for qs in test_questions.values() for q in qs]
    hits = occurrences(flat, [question_text(record) for _, record in unique])
    contaminated = {i for found in hits for i in found}
    for i in contaminated:
        counts[unique[i][0]]["contaminated"] += 1
    mix = [record for i, (_, record) in enumerate(unique) if not (decontaminate and i in contaminated)]
    for name in counts:
        dropped = counts[name]["contaminated"] if decontaminate else 0
        counts[name]["kept"] = sum(n == name for n, _ in unique) - dropped
    report_tests, position = {}, 0
    for name, questions in test_questions.items():
        found = hits[position : position + len(questions)]
        position += len(questions)
        in_mix = sum(bool(f) and not (decontaminate and contaminated.issuperset(f)) for f in found)
        report_tests[name] = {"n": len(questions), "in_mix": in_mix}
    report = {"sources": counts, "tests": report_tests, "total": len(mix), "decontaminated": decontaminate}
    return mix, report


def format_report(report: Mapping[str, Any]) -> str:
    """The report as two Markdown tables: per source, then per test set."""
    lines = [
        "| source | read | duplicates | conflicting | with a test question | kept |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, c in report["sources"].items():
        lines.append(
            f"| {name} | {c['read']} | {c['duplicates']} | {c['conflicting']} | {c['contaminated']} | {c['kept']} |"
        )
    lines.append(f"| **mix** | {sum(c['read'] for c in report['sources'].values())} | | | | {report['total']} |")
    lines += ["", "| test set | n | in the mix |", "|---|---:|---:|"]
    lines += [f"| {name} | {t['n']} | {t['in_mix']} |" for name, t in report["tests"].items()]
    return "\n".join(lines) + "\n"


def commonsense_mix(
    data_dir: str | Path, names: Iterable[str] | None, test_dir: str | Path | None, decontaminate: bool
) -> tuple[list[Record], dict[str, Any]]:
    """Read the sources (`names`, default every `<data_dir>/<name>/train.json`) and the test sets, build the mix."""
    names = list(names) if names else split_names(data_dir, TRAIN_FILE)
    if not names:
        raise InputError(f"data_dir {str(data_dir)!r}: expected <name>/{TRAIN_FILE} files; found none")
    sources = {name: read_split(data_dir, name, TRAIN_FILE) for name in names}
    test_dir = data_dir if test_dir is None else test_dir
    tests = {name: read_split(test_dir, name, TEST_FILE) for name in split_names(test_dir, TEST_FILE)}
    return build_mix(sources, tests, decontaminate)
