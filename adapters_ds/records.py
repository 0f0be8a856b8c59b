"""Record files and question keys: the one reader of JSON / JSON Lines record files, and the normalised question
text that decides whether a test question occurs in a training set.

Every record file of the project goes through `read_records`: training data, evaluation sets, the raw GSM8K and
MAWPS files the converters read, and the training file the harness counts contamination against. A file is a JSON
list of records, a single JSON object (a one-record JSON Lines file), or JSON Lines; what is wrong with a bad one
(the file, the line and column of a syntax error, the JSON type found) is an `InputError`.

`normalize_question` is the one contamination key: the built-in problem generator splits train from test with it,
and the evaluation harness counts test questions that occur in a training file with it (`occurs_in_training`).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from adapters_ds.errors import InputError

_JSON_TYPES = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "list"}


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type ("object", "list", "string", "number", "boolean", "null")."""
    return "object" if isinstance(value, Mapping) else _JSON_TYPES.get(type(value), type(value).__name__)


def read_records(path: str | Path, what: str = "records file") -> list[Any]:
    """The records of a JSON list, a single JSON object or a JSON Lines file, in file order, unvalidated.

    `what` names the file in error messages ("train_data", "gsm8k", ...). A missing file, bytes that are not UTF-8
    (a UTF-8 byte order mark is accepted), a syntax error (reported with its line and column: of the whole
    document for a JSON list, of the bad line for JSON Lines) or a JSON document that is neither a list nor an
    object is an InputError naming `what` and the path. Blank lines of a JSON Lines file are skipped; an empty file
    gives []: whether that is an error is the caller's call.
    """
    path = Path(path)
    where = f"{what} {str(path)!r}"
    if not path.is_file():
        raise InputError(f"{what}: expected a JSON or JSON Lines file; found no file {str(path)!r}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{where}: expected UTF-8 JSON; found undecodable bytes at position {exc.start}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("["):  # a JSON list: the whole-document error position is the useful one
            raise InputError(
                f"{where}: expected a JSON list of records; found invalid JSON at line {exc.lineno} "
                f"column {exc.colno}: {exc.msg}"
            ) from None
        return _read_json_lines(text, where)
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        return [document]  # a one-line JSON Lines file
    raise InputError(f"{where}: expected a JSON list of records or JSON Lines; found a JSON {json_type(document)}")


def _read_json_lines(text: str, where: str) -> list[Any]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(
                f"{where}: expected one JSON record per line (JSON Lines); found invalid JSON at line {lineno} "
                f"column {exc.colno}: {exc.msg}"
            ) from None
    return records


def question_text(record: Mapping[str, Any]) -> str:
    """The question of an instruction record as the model sees it: the instruction, then the input when there is
    one (a non-empty string), on its own line."""
    instruction, input_ = record["instruction"], record.get("input")
    return f"{instruction}\n{input_}" if isinstance(input_, str) and input_ else instruction


def normalize_question(text: str) -> str:
    """`text` lowercased, punctuation turned into spaces and whitespace collapsed: the contamination key.

    Punctuation becomes a space rather than vanishing so that tokenised copies ("crayons . How") and plain ones
    ("crayons. How") normalise alike; MAWPS-derived sets use the first form, other copies the second.
    """
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def occurrences(questions: Sequence[str], training_texts: Sequence[str]) -> list[list[int]]:
    """For each question, the indices of the training texts it occurs in, with `occurs_in_training`'s rule
    (normalised text equal to or contained in a training text, on word boundaries).

    A text that contains the question contains each of its words as a whole word, so only the texts holding the
    question's rarest word are searched: the same answer as comparing against every text.
    """
    training = [f" {normalize_question(t)} " for t in training_texts]
    holding: dict[str, list[int]] = defaultdict(list)
    for i, text in enumerate(training):
        for word in set(text.split()):
            holding[word].append(i)
    found = []
    for question in questions:
        words = normalize_question(question).split()
        if not words or any(word not in holding for word in words):
            found.append([])
            continue
        needle = f" {' '.join(words)} "
        rarest = min(set(words), key=lambda word: len(holding[word]))
        found.append([i for i in holding[rarest] if needle in training[i]])
    return found


def occurs_in_training(questions: Sequence[str], training_texts: Iterable[str]) -> list[bool]:
    """For each test question, whether it occurs in the training texts (e.g. instruction + input per record).

    "Occurs" means its normalised text equals, or is contained in, a normalised training text, on word
    boundaries ("add 3" is not inside "add 35"). Used to report how much of a test set a training file leaks.
    """
    return [bool(hits) for hits in occurrences(questions, list(training_texts))]
