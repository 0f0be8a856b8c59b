"""Label tasks (`adapters_ds.evaluation.labels`): the label set read from the records, the chosen label taken out of
hand-written responses in the five formats of the commonsense suite, and the data-set checks. The shared BoolQ /
ARC-Easy / OpenBookQA files are only read when present."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_DATA

from adapters_ds.errors import InputError
from adapters_ds.evaluation.datasets import load_dataset, record_kind, validate_records
from adapters_ds.evaluation.labels import (
    answer_lead,
    clean_pick,
    extract_label,
    gold_label,
    is_label_task,
    option_texts,
    read_labels,
    record_labels,
    score_label,
)
from adapters_ds.evaluation.results import score_row

BOOLQ = (
    "Please answer the following question with true or false, question: is the sky blue on a clear day?\n\n"
    "Answer format: true/false"
)
PIQA = (
    "Please choose the correct solution to the question: How do you open a jar?\n\n"
    "Solution1: twist the lid counterclockwise\n\nSolution2: hit the jar with a hammer\n\n"
    "Answer format: solution1/solution2"
)
ARC = (
    "Please choose the correct answer to the question: There is most likely going to be fog around:\n\n"
    "Answer1: a marsh Answer2: a tundra Answer3: the plains Answer4: a desert\n\n"
    "Answer format: answer1/answer2/answer3/answer4"
)
SIQA = (
    "Please choose the correct answer to the question: Tracy lent Jan her car. How would Jan feel?\n\n"
    "Answer1: grateful Answer2: angry Answer3: sleepy\n\nAnswer format: answer1/answer2/answer3"
)
HELLASWAG = (
    "Please choose the correct ending to complete the given sentence: A man stands on a ladder. He\n\n"
    "Ending1: paints the wall. Ending2: eats soup under water. Ending3: flies away. Ending4: sings to the moon.\n\n"
    "Answer format: ending1/ending2/ending3/ending4"
)
WINOGRANDE = (
    "Please choose the correct answer to fill in the blank to complete the given sentence: Sarah was a much better "
    "surgeon than Maria so _ always got the harder cases.\n\nOption1: Sarah Option2: Maria "
    "Answer format: option1/option2"
)
ARC_OPTIONS = "Answer1: a marsh Answer2: a tundra Answer3: the plains Answer4: a desert"

# (id, question, model response, the label the harness must take; None: no prediction)
RESPONSES = [
    # BoolQ: true/false
    ("bool-plain", BOOLQ, "true", "true"),
    ("bool-trained-form", BOOLQ, "the correct answer is false", "false"),
    ("bool-upper", BOOLQ, "TRUE", "true"),
    ("bool-upper-sentence", BOOLQ, "The correct answer is FALSE.", "false"),
    ("bool-early-then-later", BOOLQ, "False. The sky is only true blue when the air is clean.", "false"),
    ("bool-explicit-beats-earlier", BOOLQ, "It is true that it rains, so the answer is false", "false"),
    ("bool-refusal", BOOLQ, "I'm sorry, I cannot tell from the question alone.", None),
    ("bool-options-question", BOOLQ, "true or false? It depends on the weather.", None),
    ("bool-echoed-format", BOOLQ, "Answer format: true/false\n\nfalse", "false"),
    ("bool-rejection", BOOLQ, "This is not true.", None),
    (
        "bool-invented-next-turn",
        BOOLQ,
        "the correct answer is true\n\n### Instruction:\nIs water dry?\n\n### Response:\nthe correct answer is false",
        "true",
    ),
    ("bool-yes-is-no-label", BOOLQ, "Yes, it is.", None),
    ("bool-answer-colon", BOOLQ, "Answer: true", "true"),
    ("bool-list-then-pick", BOOLQ, "The answer is true or false depending on the day; I say true.", "true"),
    ("bool-every-label-stated", BOOLQ, "The answer is true.\n\nThe answer is false.", None),
    # PIQA: solution1/solution2
    ("piqa-plain", PIQA, "solution1", "solution1"),
    ("piqa-keyword", PIQA, "The correct solution is solution2", "solution2"),
    ("piqa-upper-spaced", PIQA, "SOLUTION 2", "solution2"),
    (
        "piqa-echoed-options",
        PIQA,
        "Solution1: twist the lid counterclockwise\n\nSolution2: hit the jar with a hammer",
        None,
    ),
    (
        "piqa-options-then-choice",
        PIQA,
        "Solution1: twist the lid counterclockwise\n\nSolution2: hit the jar with a hammer\n\n"
        "the correct answer is solution1",
        "solution1",
    ),
    ("piqa-option-text", PIQA, "You should twist the lid counterclockwise.", "solution1"),
    ("piqa-i-choose", PIQA, "I would choose solution2 because hammers are fun.", "solution2"),
    ("piqa-wrong-then-correct", PIQA, "Solution1 is wrong; solution2 is correct.", "solution2"),
    # ARC / OpenBookQA / SIQA: answer1..answerN
    ("arc-trained-form", ARC, "the correct answer is answer3", "answer3"),
    ("arc-capitalised", ARC, "The correct answer is Answer3.", "answer3"),
    ("arc-upper", ARC, "ANSWER1", "answer1"),
    ("arc-options-then-choice", ARC, f"{ARC_OPTIONS}\n\nthe correct answer is answer1", "answer1"),
    ("arc-echoed-options", ARC, ARC_OPTIONS, None),
    ("arc-options-then-bare-label", ARC, f"{ARC_OPTIONS}\n\nanswer2", "answer2"),
    ("arc-early-then-later", ARC, "answer4. A marsh (answer1) would have fog too, but less.", "answer4"),
    ("arc-reconsidered", ARC, "The answer is answer1? No, the correct answer is answer4.", "answer4"),
    ("arc-bare-number", ARC, "The correct answer is 2", "answer2"),
    ("arc-bare-number-sentence", ARC, "The correct answer is 1.\n", "answer1"),
    ("arc-decimal-is-no-label", ARC, "The answer is 2.5 metres", None),
    ("arc-alternatives", ARC, "It could be answer1 or answer2.", None),
    ("arc-list-is-no-pick", ARC, "the answer is answer1, answer2 or answer3", None),
    ("arc-option-text", ARC, "a marsh", "answer1"),
    ("arc-answer-colon-text", ARC, "Answer: a tundra", "answer2"),
    ("arc-echoed-format", ARC, "Answer format: answer1/answer2/answer3/answer4", None),
    ("arc-refusal", ARC, "I don't know.", None),
    ("arc-spaced", ARC, "answer 3", "answer3"),
    ("arc-label-not-allowed", ARC, "the correct answer is answer5", None),
    ("arc-longer-number", ARC, "answer10", None),
    ("arc-header-form-pick", ARC, "Answer2: a tundra", "answer2"),
    ("arc-parenthesised-is-no-header", ARC, "Answer3: the plains. A marsh (answer1) would be foggier.", "answer3"),
    ("siqa-is-the-best", SIQA, "Answer3 is the best answer here.", "answer3"),
    ("siqa-rejected-then-bare", SIQA, "answer2 is wrong. answer1", "answer1"),
    # HellaSwag: ending1..ending4
    ("hella-trained-form", HELLASWAG, "the correct answer is ending1", "ending1"),
    ("hella-fits-best", HELLASWAG, "Ending 3 fits best.", "ending3"),
    (
        "hella-echoed-options",
        HELLASWAG,
        "Ending1: paints the wall. Ending2: eats soup under water. Ending3: flies away. Ending4: sings to the moon.",
        None,
    ),
    ("hella-best-ending", HELLASWAG, "The best ending is ending4", "ending4"),
    ("hella-upper", HELLASWAG, "ENDING2", "ending2"),
    # WinoGrande: option1/option2
    ("wino-plain", WINOGRANDE, "option2", "option2"),
    ("wino-spaced", WINOGRANDE, "Option 1", "option1"),
    ("wino-option-text", WINOGRANDE, "Maria", "option2"),
    ("wino-echoed-options", WINOGRANDE, "Option1: Sarah Option2: Maria", None),
    ("wino-not-then-answer", WINOGRANDE, "Not option1; the answer is option2", "option2"),
    ("wino-undecided", WINOGRANDE, "option1 or option2, I cannot tell.", None),
]


def test_enough_hand_written_responses_in_every_format():
    assert len(RESPONSES) >= 40
    formats = {read_labels(question) for _, question, _, _ in RESPONSES}
    assert {labels[0] for labels in formats} == {"true", "solution1", "answer1", "ending1", "option1"}


@pytest.mark.parametrize(("question", "output", "expected"), [r[1:] for r in RESPONSES], ids=[r[0] for r in RESPONSES])
def test_extract_label(question, output, expected):
    labels = read_labels(question)
    assert extract_label(output, labels, question) == expected
    if expected is not None:  # scored against the gold: right when it is the chosen label, wrong otherwise
        assert score_label(output, expected.upper(), question) == (expected, True)
        other = next(label for label in labels if label != expected)
        assert score_label(output, other, question) == (expected, False)
    else:
        assert score_label(output, labels[0], question) == (None, False)


def test_read_labels():
    assert read_labels(BOOLQ) == ("true", "false")
    assert read_labels(WINOGRANDE) == ("option1", "option2")  # the header in the middle of a line
    assert read_labels("Q?\n\nanswer FORMAT:  Answer1 / Answer2 / Answer3.") == ("Answer1", "Answer2", "Answer3")
    assert read_labels("What is 2 + 2?") is None
    # the last format line counts (an earlier one can be part of the question's text)
    assert read_labels("Answer format: a/b\nQ?\nAnswer format: yes/no") == ("yes", "no")
    for bad in ("Answer format: true", "Answer format:", "Answer format: pick one/or another", "Answer format: a/A"):
        with pytest.raises(InputError, match="Answer format"):
            read_labels(f"Q?\n\n{bad}")


def test_option_texts():
    assert option_texts(ARC, read_labels(ARC)) == {
        "answer1": "a marsh",
        "answer2": "a tundra",
        "answer3": "the plains",
        "answer4": "a desert",
    }
    assert option_texts(WINOGRANDE, ("option1", "option2")) == {"option1": "Sarah", "option2": "Maria"}
    assert option_texts(BOOLQ, ("true", "false")) == {}  # no option headers
    # an option inside a longer matching one does not count
    question = "Q?\nAnswer1: water Answer2: salt water\nAnswer format: answer1/answer2"
    assert extract_label("It is salt water.", ("answer1", "answer2"), question) == "answer2"


def test_label_task_kind_is_read_from_the_records():
    records = [{"instruction": BOOLQ, "answer": "true"}, {"instruction": ARC, "answer": "answer2"}]
    assert is_label_task(records) and record_kind(records) == "labels"
    assert record_labels(records[1]) == ("answer1", "answer2", "answer3", "answer4")
    # the format line may sit in the input
    assert record_labels({"instruction": "Q?", "input": "Answer format: yes/no"}) == ("yes", "no")
    assert not is_label_task([{"instruction": "What is 2 + 2?", "answer": "4"}])
    with pytest.raises(InputError, match=r"record 1 \(0-based\).*Answer format"):
        is_label_task([records[0], {"instruction": "Is it?", "answer": "true"}])


def test_gold_label_and_answer_lead():
    assert gold_label(" TRUE ", ("true", "false")) == "true"
    with pytest.raises(InputError, match="true/false.*'yes'"):
        gold_label("yes", ("true", "false"))
    outputs = [("the correct answer is answer2", "answer2"), ("the correct answer is TRUE.", "true")]
    assert answer_lead([{"output": o, "answer": a} for o, a in outputs]) == "the correct answer is "
    assert answer_lead([{"output": "answer2", "answer": "answer2"}]) == ""
    assert answer_lead([{"output": "x answer2", "answer": "answer2"}, {"output": "y true", "answer": "true"}]) == ""
    assert answer_lead([{"output": "the answer is answer3", "answer": "answer2"}]) == ""  # not ending with the gold
    assert answer_lead([{"answer": "true"}]) == ""


def test_clean_pick():
    labels = ("answer1", "answer2")
    assert clean_pick("the correct answer is Answer2.", labels, "the correct answer is ") == "answer2"
    assert clean_pick(" answer1\n", labels) == "answer1"
    assert clean_pick("the correct answer is answer2 because", labels, "the correct answer is ") is None
    assert clean_pick("answer2", labels, "the correct answer is ") is None


def test_score_row_of_a_label_task():
    record = {"instruction": ARC, "input": "", "answer": "answer1"}
    row = score_row(3, record, "PROMPT", "Answer1: a marsh", "labels")
    assert (row["index"], row["prediction"], row["correct"]) == (3, "answer1", True)


# ----------------------------------------------------------------------------------------------- data sets


def _write(folder, name, records):
    (folder / name).mkdir(parents=True)
    (folder / name / "test.json").write_text(json.dumps(records))


def test_bad_label_data_is_a_clear_error(tmp_path):
    _write(tmp_path, "Mixed", [{"instruction": BOOLQ, "answer": "true"}, {"instruction": "Is it?", "answer": "false"}])
    with pytest.raises(InputError, match=r"Mixed.*record 1 \(0-based\).*label set cannot be read"):
        load_dataset(tmp_path, "Mixed")
    _write(tmp_path, "NoFormat", [{"instruction": "Is the sky blue?", "answer": "true"}])
    with pytest.raises(InputError, match="record 0.*'true'.*Answer format"):
        load_dataset(tmp_path, "NoFormat")
    _write(tmp_path, "BadGold", [{"instruction": BOOLQ, "answer": "true"}, {"instruction": BOOLQ, "answer": "yes"}])
    with pytest.raises(InputError, match=r"record 1 \(0-based\).*true/false.*'yes'"):
        load_dataset(tmp_path, "BadGold")
    _write(tmp_path, "OneLabel", [{"instruction": "Is it?\n\nAnswer format: true", "answer": "true"}])
    with pytest.raises(InputError, match="OneLabel.*two or more labels"):
        load_dataset(tmp_path, "OneLabel")
    # a label task with letter golds is a label task, not AQuA
    letters = [{"instruction": "Pick.\n\nAnswer format: A/B/C", "answer": "B"}]
    assert record_kind(validate_records(letters, "letters")) == "labels"


def test_shared_commonsense_sets_load_as_label_tasks_and_their_outputs_score_right():
    root = SHARED_DATA / "commonsense"
    if not root.is_dir():
        pytest.skip(f"commonsense data not present at {root}")
    names = sorted(p.name for p in root.iterdir() if (p / "test.json").is_file())
    assert names
    for name in names:
        dataset = load_dataset(root, name)
        assert dataset.kind == "labels" and dataset.suite == "commonsense", name
        assert answer_lead(dataset.records) == "the correct answer is ", name
        for record in dataset.records[:300]:  # the reference outputs are "the correct answer is <gold>"
            question = record["instruction"]
            assert score_label(record["output"], record["answer"], question) == (record["answer"], True), question
