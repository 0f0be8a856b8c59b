"""The commonsense training mix (`mathdata.commonsense`, `python -m adapters_ds.mathdata commonsense`): per-source
counts, deduplication, conflicting labels, the contamination report against the test sets and decontamination, on
hand-written records."""

from __future__ import annotations

import json

import pytest

from adapters_ds.cli import mathdata as mathdata_cli
from adapters_ds.errors import InputError
from adapters_ds.mathdata.commonsense import build_mix
from adapters_ds.records import normalize_question, occurrences, occurs_in_training


def _bool(question, answer):
    return {
        "instruction": f"Please answer the following question with true or false, question: {question}?\n\n"
        "Answer format: true/false",
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


def _choice(question, options, answer):
    listed = " ".join(f"Answer{i + 1}: {o}" for i, o in enumerate(options))
    labels = "/".join(f"answer{i + 1}" for i in range(len(options)))
    return {
        "instruction": f"Please choose the correct answer to the question: {question}\n\n{listed}\n\n"
        f"Answer format: {labels}",
        "input": "",
        "output": f"the correct answer is {answer}",
        "answer": answer,
    }


BOOL_TRAIN = [
    _bool("is the sky blue", "true"),
    _bool("Is the SKY blue", "true"),  # a duplicate up to case
    _bool("do fish fly", "false"),
    _bool("is a tomato a fruit", "true"),
    _bool("is a tomato a fruit", "false"),  # conflicting labels: both copies go
    _bool("is ice cold", "true"),  # also a test question
]
ARC_TRAIN = [
    _choice("Which is a mammal?", ["a whale", "a trout"], "answer1"),
    _choice("What do bees make?", ["honey", "milk", "silk"], "answer1"),
    _choice("Which is a mammal?", ["a whale", "a trout"], "answer1"),  # a duplicate within the source
    _bool("do fish fly", "false"),  # a duplicate of another source's record
]
TESTS = {
    "boolq": [_bool("is ice cold", "true"), _bool("is fire hot", "true")],
    "arc": [
        _choice("What do bees make?", ["honey", "milk", "silk"], "answer1"),
        _choice("Why?", ["a", "b"], "answer2"),
    ],
}


def test_counts_dedup_conflicts_and_contamination():
    mix, report = build_mix({"boolq": BOOL_TRAIN, "arc": ARC_TRAIN}, TESTS)
    assert mix == [BOOL_TRAIN[0], BOOL_TRAIN[2], BOOL_TRAIN[5], ARC_TRAIN[0], ARC_TRAIN[1]]  # first copies, in order
    assert report["sources"] == {
        "boolq": {"read": 6, "duplicates": 1, "conflicting": 2, "contaminated": 1, "kept": 3},
        "arc": {"read": 4, "duplicates": 2, "conflicting": 0, "contaminated": 1, "kept": 2},
    }
    assert report["tests"] == {"boolq": {"n": 2, "in_mix": 1}, "arc": {"n": 2, "in_mix": 1}}
    assert report["total"] == 5 and report["decontaminated"] is False


def test_decontaminate_drops_the_records_holding_test_questions():
    mix, report = build_mix({"boolq": BOOL_TRAIN, "arc": ARC_TRAIN}, TESTS, decontaminate=True)
    assert mix == [BOOL_TRAIN[0], BOOL_TRAIN[2], ARC_TRAIN[0]]
    assert [c["kept"] for c in report["sources"].values()] == [2, 1]
    assert [t["in_mix"] for t in report["tests"].values()] == [0, 0]
    assert report["total"] == 3


def brute_force(questions, training):
    """The rule by definition: every normalised question against every normalised training text."""
    texts = [f" {normalize_question(t)} " for t in training]
    return [[i for i, t in enumerate(texts) if normalize_question(q) and f" {normalize_question(q)} " in t]
            for q in questions]  # fmt: skip


def test_occurrences_agree_with_the_rule_by_definition():
    training = [
        "Add 35 apples to the basket.",
        "She said: add 3 apples, then add 4 more!",
        "completely unrelated text",
        "ADD 3 APPLES",
    ]
    questions = ["add 3 apples", "add 3", "add 35 apples to the basket", "add", "nothing here", "", "?!", "add 4 more"]
    found = occurrences(questions, training)
    assert found == brute_force(questions, training)
    assert [bool(f) for f in found] == occurs_in_training(questions, training)
    assert found[0] == [1, 3] and found[1] == [1, 3] and found[3] == [0, 1, 3] and found[5] == []


def test_the_command_writes_the_mix_and_the_report(tmp_path, capsys):
    for name, train, test in (("boolq", BOOL_TRAIN, TESTS["boolq"]), ("arc", ARC_TRAIN, TESTS["arc"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.json").write_text(json.dumps(train))
        (tmp_path / name / "test.json").write_text(json.dumps(test))
    out, report = tmp_path / "mix.json", tmp_path / "report.json"
    mathdata_cli.run(["commonsense", "--data_dir", str(tmp_path), "--out", str(out), "--report", str(report)])
    printed = capsys.readouterr().out
    # sources in name order: arc's copy of "do fish fly" comes first now
    assert json.loads(out.read_text()) == [ARC_TRAIN[0], ARC_TRAIN[1], ARC_TRAIN[3], BOOL_TRAIN[0], BOOL_TRAIN[5]]
    assert "| arc | 4 | 1 | 0 | 1 | 3 |" in printed and "| boolq | 6 | 2 | 2 | 1 | 2 |" in printed
    assert "| boolq | 2 | 1 |" in printed and printed.rstrip().endswith(f"wrote 5 records to {out}")
    assert json.loads(report.read_text())["sources"]["boolq"]["conflicting"] == 2
    # one source, decontaminated; test sets from another folder
    (tmp_path / "tests" / "boolq").mkdir(parents=True)
    (tmp_path / "tests" / "boolq" / "test.json").write_text(json.dumps(TESTS["boolq"]))
    mathdata_cli.run(
        ["commonsense", "--data_dir", str(tmp_path), "--datasets", "boolq", "--test_dir", str(tmp_path / "tests"),
         "--decontaminate", "--out", str(out)]
    )  # fmt: skip
    assert json.loads(out.read_text()) == [BOOL_TRAIN[0], BOOL_TRAIN[2]]
    assert "| boolq | 2 | 0 |" in capsys.readouterr().out


def test_bad_input(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "train.json").write_text(json.dumps([{"instruction": "Q?\n\nAnswer format: x/y", "answer": "x"}]))
    out = tmp_path / "mix.json"
    with pytest.raises(InputError, match=r"record 0 \(0-based\).*'output'"):
        mathdata_cli.run(["commonsense", "--data_dir", str(tmp_path), "--out", str(out)])
    with pytest.raises(InputError, match="'nope'.*train.json.*\\['a'\\]"):
        mathdata_cli.run(["commonsense", "--data_dir", str(tmp_path), "--datasets", "nope", "--out", str(out)])
    with pytest.raises(SystemExit) as exc:
        mathdata_cli.main(["commonsense", "--data_dir", str(tmp_path / "none"), "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "none" in err
    assert not out.exists()
