"""Answer extraction and scoring (`adapters_ds.evaluation.answers`) on hand-written model outputs and on the real
answer formats; the contamination key (`adapters_ds.records.normalize_question`, `occurs_in_training`).

The hand-written outputs imitate what fine-tuned LLMs print: chains of thought with many numbers, gsm8k's
"#### 72", money and percentages, echoed prompts, AQuA picks in several spellings. Each row states the
prediction the harness must record and whether it counts as correct.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from adapters_ds.errors import InputError
from adapters_ds.evaluation.answers import (
    choice_value,
    extract_choice,
    extract_number,
    is_multiple_choice,
    numbers_match,
    parse_choices,
    score,
)
from adapters_ds.records import normalize_question, occurs_in_training

MATH_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "math"

ECHO_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nA shop sells 6 boxes of 7 pens and 100 loose pens. How many pens is that?\n\n### Response:\n"
)

# (id, model output, gold answer, expected prediction, expected correct)
NUMERIC_CASES = [
    ("plain", "There were 7 crayons and Mary took 3, so 7 - 3 = 4. The answer is 4.", "4", "4", True),
    (
        "gold-with-.0",
        "Sam bought 13 + 17 = 30 books and 15 were used, so 30 - 15 = 15. The answer is 15.",
        "15.0",
        "15",
        True,
    ),
    (
        "thousands",
        "He had 1,200 dollars and earned 34 more: 1,200 + 34 = 1,234. The answer is 1,234.",
        "1234.0",
        "1234",
        True,
    ),
    (
        "gsm8k-hashes",
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72",
        "72",
        "72",
        True,
    ),
    (
        "negative",
        "The temperature fell from 5 degrees by 15 degrees to -10 degrees. The answer is -10.",
        "-10.0",
        "-10",
        True,
    ),
    (
        "negative-money",
        "He paid $90 and got back $200, so he was out $90 - $200 = -$110. The answer is -$110.",
        "-110",
        "-110",
        True,
    ),
    ("decimal", "Each of the 8 pieces weighs 20 / 8 = 2.5 ounces. The answer is 2.5.", "2.5", "2.5", True),
    (
        "money",
        "Coffee is $3.50 and a bagel $4.25, so she spends $3.50 + $4.25 = $7.75. The answer is $7.75.",
        "7.75",
        "7.75",
        True,
    ),
    ("percent", "She got 18 of 24 right, which is 18 / 24 * 100 = 75%. The answer is 75%.", "75.0", "75", True),
    (
        "no-marker-last-number",
        "Sam bought 13 + 17 = 30 books. 15 were used, so he has 30 - 15 = 15 new books.",
        "15.0",
        "15",
        True,
    ),
    ("trailing-period", "Each box holds 4 pens, so 3 boxes hold 12.", "12", "12", True),
    ("no-number", "I am not sure how to solve this problem.", "12", None, False),
    ("empty", "", "12", None, False),
    ("wrong", "She has 5 apples and buys 3 more, so 5 + 3 = 8. The answer is 8.", "9", "8", False),
    (
        "continues-into-new-turn",
        "So he needs 3 boxes.\n\n### Instruction:\nA farmer has 17 cows and buys 4.",
        "3",
        "3",
        True,
    ),
    (
        "marker-then-new-turn",
        "The answer is 9.\n### Instruction:\nTom has 5 apples and 12 pears.\n### Response:\n17",
        "9",
        "9",
        True,
    ),
    (
        "echo-without-preamble",
        "### Instruction:\nTom has 5 apples and 12 pears.\n\n### Response:\n5 + 12 = 17",
        "17",
        "17",
        True,
    ),
    (
        "echoed-prompt",
        ECHO_PROMPT + "6 * 7 = 42 pens in boxes, 42 + 100 = 142.\n\n### Instruction:\nWhat is 2 + 5?",
        "142",
        "142",
        True,
    ),
    ("echo-without-response", "### Instruction:\nA farmer has 17 cows and buys 4 more.", "21", None, False),
    ("fraction", "Each of the 4 friends gets 3/4 of a pizza. The answer is 3/4.", "0.75", "0.75", True),
    (
        "fraction-of-thirds",
        "Three friends share 29 liters: 20/3 + 9 - 1 = 29/3. The answer is 29/3.",
        "9.666666666666666",
        "9.666666666666666",
        True,
    ),
    ("mixed-number", "She used 1 1/4 cups and then 1 1/4 cups more. The answer is 2 1/2.", "2.5", "2.5", True),
    (
        "rounded-2-decimals",
        "The green one is 3 - 1.17 = 1.83 inches longer. The answer is 1.83.",
        "1.8333333333333335",
        "1.83",
        True,
    ),
    ("rounded-small", "Each gets 1 / 6 = 0.17 of the cake. The answer is 0.17.", "0.16666666666666666", "0.17", True),
    (
        "rounded-1-decimal",
        "The green one is about 1.8 inches longer. The answer is 1.8.",
        "1.8333333333333335",
        "1.8",
        False,
    ),
    ("scaled-by-100", "The green one is 183 hundredths of an inch longer. The answer is 183.", "1.83", "183", False),
    (
        "integer-gold-fraction-pred",
        "The tiles cover 576.5 square inches. The answer is 576.5.",
        "576.0",
        "576.5",
        False,
    ),
    ("integer-gold-exact-decimals", "He needs 24 * 24 = 576 tiles. The answer is 576.00.", "576.0", "576", True),
    (
        "large-integer-off-by-100",
        "The house sold for $2,400,100. The answer is 2,400,100.",
        "2400000.0",
        "2400100",
        False,
    ),
    ("large-integer-no-marker", "Together they paid 2 * $1,200,000 = $2,400,000.", "2400000.0", "2400000", True),
    (
        "sum-after-marker",
        "4 flashlights, 4 * 4 = 16 small and 5 * 4 = 20 medium candles. The answer is 4 + 16 + 20 = 40.",
        "56",
        "40",
        False,
    ),
    (
        "result-after-equals",
        "He did 220 pushups, 90 squats and 60 presses. The answer is 220 + 90 + 60 = 370.",
        "370.0",
        "370",
        True,
    ),
    (
        "marker-then-more-numbers",
        "The answer is 5 apples. She had given away 3 of her 8 apples yesterday.",
        "5",
        "5",
        True,
    ),
    ("answer-colon", "She sold 48 + 24 = 72 clips in April and May.\nAnswer: 72", "72", "72", True),
    (
        "final-answer-decimal",
        "Price after 10% off: 1,371.73 * 0.9 = 1,234.56\nFinal answer: $1,234.56",
        "1234.56",
        "1234.56",
        True,
    ),
    ("answer-on-next-line", "Add the three amounts: 12 + 30 + 8.\nThe answer is\n50", "50", "50", True),
    ("marker-without-number", "We get r = 32 - 4 - 2y, and y is not known. The answer is unknown.", "20", "2", False),
    ("spaced-minus-is-not-negative", "Tom's score minus Ann's score is 20 - 8", "12", "8", False),
    (
        "scientific",
        "Light covers 3e8 meters per second, so 1.5e3 meters is quick. The answer is 1.5e3.",
        "1500",
        "1500",
        True,
    ),
    ("unit-glued", "The car travels 60km in 1 hour, so in 3 hours it travels 180km.", "180", "180", True),
    ("euro", "She has €1500 - €1423 = €77 left for clothes. The answer is €77.", "77.0", "77", True),
    ("date-is-not-a-fraction", "On 3/4/2020 the shop sold 45 cakes.", "45", "45", True),
]

AQUA_QUESTION = "How many stamps are left? Answer Choices: (A) 15 (B) 24 (C) 25 (D) 40 (E) 52"
UNPAREN_QUESTION = "What is the speed? Answer Choices: A)12 km/h B)15 km/h C)18 km/h D)21 km/h E)24 km/h"
FRACTION_QUESTION = "What is the probability? Answer Choices: (A) 1/18 (B) 1/9 (C) 23/90 (D) 5/18 (E) 13/45"
PERCENT_QUESTION = "What is the profit? Answer Choices: (A) 20% (B) 28% (C) 36% (D) 40% (E) 42%"
ALGEBRA_QUESTION = "What is the volume? Answer Choices: (A) 750pi (B) 1500pi (C) 1875pi (D) 3000pi (E) 7500pi"

# (id, model output, question, gold letter, expected prediction, expected correct)
CHOICE_CASES = [
    ("paren-after-marker", "15 + 25 = 40 stamps were used. The answer is (C).", AQUA_QUESTION, "C", "C", True),
    ("answer-colon-letter", "There are 52 stamps left.\nAnswer: E", AQUA_QUESTION, "E", "E", True),
    ("answer-colon-letter-wrong", "There are 52 stamps left.\nAnswer: E", AQUA_QUESTION, "D", "E", False),
    ("letter-then-number", "15 + 10 = 25, so the answer is B. 25", AQUA_QUESTION, "B", "B", True),
    ("bare-letter-after-marker", "So the answer is D", AQUA_QUESTION, "D", "D", True),
    ("number-matches-choice", "The stamps used are 15 + 25 = 40.", AQUA_QUESTION, "D", "D", True),
    (
        "article-a-ignored",
        "A bag holds 15 stamps. A box holds 10. All together there are 25 stamps.",
        AQUA_QUESTION,
        "C",
        "C",
        True,
    ),
    ("answer-a-total", "Answer: A total of 52 stamps are left.", AQUA_QUESTION, "E", "E", True),
    (
        "explicit-beats-earlier-parens",
        "Checking: (A) and (B) are too small. The answer is (D).",
        AQUA_QUESTION,
        "D",
        "D",
        True,
    ),
    (
        "explicit-beats-later-parens",
        "The answer is C. Option (A) gives 15, which is too small.",
        AQUA_QUESTION,
        "C",
        "C",
        True,
    ),
    ("lone-final-letter", "Adding the two amounts gives 40 stamps.\nD", AQUA_QUESTION, "D", "D", True),
    ("lone-final-letter-in-parens", "Adding the two amounts gives 40 stamps.\n(D).", AQUA_QUESTION, "D", "D", True),
    ("correct-option-is", "Each day 3 stamps go. The correct option is B.", AQUA_QUESTION, "B", "B", True),
    ("answer-is-option", "15 + 9 = 24, so the answer is option B", AQUA_QUESTION, "B", "B", True),
    ("answer-is-paren-with-value", "The answer is (C) 25", AQUA_QUESTION, "C", "C", True),
    ("number-then-paren", "The answer is 25, which is (C).", AQUA_QUESTION, "C", "C", True),
    (
        "echoed-choices-ignored",
        "Answer Choices: (A) 15 (B) 24 (C) 25 (D) 40 (E) 52\nThere are 24 left.",
        AQUA_QUESTION,
        "B",
        "B",
        True,
    ),
    ("number-not-a-choice", "A total of 33 stamps are left.", AQUA_QUESTION, "B", None, False),
    ("nothing", "I cannot determine this from the information given.", AQUA_QUESTION, "A", None, False),
    ("unparenthesised-choices", "It covers 42 km in 2 hours, so 42 / 2 = 21 km/h.", UNPAREN_QUESTION, "D", "D", True),
    ("fraction-choice", "The probability is 5/18.", FRACTION_QUESTION, "D", "D", True),
    ("rounded-fraction-choice", "The probability is about 0.28.", FRACTION_QUESTION, "D", "D", True),
    ("percent-choice", "The profit is 9 / 25 * 100 = 36%.", PERCENT_QUESTION, "C", "C", True),
    ("algebraic-choice-not-numeric", "The volume is 750.", ALGEBRA_QUESTION, "A", None, False),
    ("explicit-letter-on-algebra", "The volume is 750 pi. The answer is (A).", ALGEBRA_QUESTION, "A", "A", True),
]


@pytest.mark.parametrize(
    ("output", "answer", "prediction", "correct"),
    [case[1:] for case in NUMERIC_CASES],
    ids=[case[0] for case in NUMERIC_CASES],
)
def test_score_numeric(output: str, answer: str, prediction: str | None, correct: bool) -> None:
    assert score(output, answer, "", multiple_choice=False) == (prediction, correct)


@pytest.mark.parametrize(
    ("output", "question", "answer", "prediction", "correct"),
    [case[1:] for case in CHOICE_CASES],
    ids=[case[0] for case in CHOICE_CASES],
)
def test_score_multiple_choice(output: str, question: str, answer: str, prediction: str | None, correct: bool) -> None:
    assert score(output, answer, question, multiple_choice=True) == (prediction, correct)


def test_extract_number_returns_floats() -> None:
    assert extract_number("The answer is 1,234.") == 1234.0
    assert extract_number("The answer is -0.5.") == -0.5
    assert extract_number("Rs.500 in total") == 500.0
    assert extract_number("no digits here") is None


def test_extract_choice_ignores_letters_outside_choices() -> None:
    # Only four choices: an "(E)" the model invents is not a pick, so the number decides.
    choices = {"A": "10", "B": "20", "C": "30", "D": "40"}
    assert extract_choice("Clearly not (E). The total is 30.", choices) == "C"


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        (576, 576.0, True),  # integer gold, integer print
        (576.004, 576.0, False),  # integer golds are exact: no rounding excuse
        (2_400_100, 2_400_000.0, False),  # a relative 1e-3 would accept this
        (1.83, 1.8333333333333335, True),  # two-decimal rounding
        (1.833, 1.8333333333333335, True),
        (1.8, 1.8333333333333335, False),  # one-decimal rounding is too coarse
        (183, 1.83, False),
        (0.17, 0.16666666666666666, True),  # 2 % off relatively, but a correct two-decimal rounding
        (0.13, 0.125, True),  # half-up rounding lands exactly on the tolerance
        (0.12, 0.125, True),  # half-even rounding
        (0.14, 0.125, False),
        (33.3, 33.333333333333336, True),  # 0.1 % relative for large fractional golds
        (33.0, 33.333333333333336, False),
        (-1.83, 1.8333333333333335, False),
        (math.nan, 1.5, False),
        (math.inf, 1.5, False),
    ],
)
def test_numbers_match(pred: float, gold: float, expected: bool) -> None:
    assert numbers_match(pred, gold) is expected


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        (AQUA_QUESTION, {"A": "15", "B": "24", "C": "25", "D": "40", "E": "52"}),
        (UNPAREN_QUESTION, {"A": "12 km/h", "B": "15 km/h", "C": "18 km/h", "D": "21 km/h", "E": "24 km/h"}),
        ("Pick one. Answer Choices: (A) A) 59 (B) B) 69 (C) C) 79", {"A": "59", "B": "69", "C": "79"}),
        (
            "Find it. Answer Choices: (A) D/ (M-3)  (B) MD/3 (C) M/ (D-3)  (D) 3D/ (M2-3M)  (E) None of these",
            {"A": "D/ (M-3)", "B": "MD/3", "C": "M/ (D-3)", "D": "3D/ (M2-3M)", "E": "None of these"},
        ),
        ("Which is largest? (A) 3 (B) 4", {"A": "3", "B": "4"}),
        ("How many apples does Tom have? A farmer has 17 cows.", {}),
    ],
)
def test_parse_choices(question: str, expected: dict[str, str]) -> None:
    assert parse_choices(question) == expected


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("12", 12.0),
        ("$1,200", 1200.0),
        ("Rs.500", 500.0),
        ("20%", 20.0),
        ("-23.5", -23.5),
        ("+30", 30.0),
        ("5/18", 5 / 18),
        ("11.75 miles", 11.75),
        ("9 hours.", 9.0),
        ("After 6 minutes", 6.0),
        ("41km/hr", 41.0),
        ("4 1/3 km/h", 13 / 3),
        ("750pi", None),
        ("3x", None),
        ("5C3*4C3", None),
        ("2: π", None),
        ("600, 400", None),
        ("13x/2 - 6", None),
        ("y/400", None),
        ("None of these", None),
    ],
)
def test_choice_value(choice: str, expected: float | None) -> None:
    assert choice_value(choice) == expected


def test_is_multiple_choice_from_gold_letters() -> None:
    assert is_multiple_choice([{"instruction": "Q?", "answer": "A"}, {"instruction": "Q2?", "answer": "e"}])


def test_is_multiple_choice_from_prompt_without_gold() -> None:
    assert is_multiple_choice([{"instruction": "Q? Answer Choices: (A) 1 (B) 2", "input": ""}])


def test_is_multiple_choice_numeric() -> None:
    assert not is_multiple_choice(
        [{"instruction": "How many?", "answer": "576.0"}, {"instruction": "?", "answer": "4"}]
    )


def test_is_multiple_choice_rejects_mixed_and_empty() -> None:
    with pytest.raises(InputError, match="1 of 2"):
        is_multiple_choice([{"instruction": "Q?", "answer": "B"}, {"instruction": "How many?", "answer": "4"}])
    with pytest.raises(InputError, match="none"):
        is_multiple_choice([])


def test_score_rejects_bad_gold() -> None:
    with pytest.raises(InputError, match="letter"):
        score("The answer is (C).", "7", AQUA_QUESTION, multiple_choice=True)
    with pytest.raises(InputError, match="numeric"):
        score("The answer is 7.", "seven", "", multiple_choice=False)
    with pytest.raises(InputError, match="numeric"):
        score("The answer is 7.", "nan", "", multiple_choice=False)


def test_normalize_question() -> None:
    tokenised = "There are 7 crayons in the drawer . Mary took 3 crayons out of the drawer . How many ? "
    plain = "There are 7 crayons in the drawer. Mary took 3 crayons out of the drawer.\nHow many?"
    assert normalize_question(tokenised) == normalize_question(plain)
    assert (
        normalize_question(plain) == "there are 7 crayons in the drawer mary took 3 crayons out of the drawer how many"
    )
    assert normalize_question("A well-known  $5   deal!") == "a well known 5 deal"


def test_occurs_in_training() -> None:
    training = [
        "Joan has 40 blue balloons . Melanie has 41 blue balloons . How many blue balloons do they have in total ?",
        "Sam had 9 dimes in his bank. His dad gave him 7 dimes. How many dimes does Sam have now? Answer: 16",
    ]
    questions = [
        "Joan has 40 blue balloons. Melanie has 41 blue balloons. How many blue balloons do they have in total?",
        "Sam had 9 dimes in his bank . His dad gave him 7 dimes . How many dimes does Sam have now ?",  # contained
        "Joan has 4 blue balloons.",  # "4" is not "40": word boundaries
        "Tom has 3 red marbles. How many marbles?",
        "   ",
    ]
    assert occurs_in_training(questions, training) == [True, True, False, False, False]


def _load(name: str) -> list[dict[str, str]]:
    path = MATH_DATA / name / "test.json"
    if not path.is_file():
        pytest.skip(f"benchmark data not found at {path}")
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", ["AddSub", "MultiArith", "SingleEq", "gsm8k", "AQuA", "mawps"])
def test_gold_answers_score_correct(name: str) -> None:
    """The scorer reads every real gold answer, stated plainly, as correct: no format of the data is missed."""
    records = _load(name)
    multiple_choice = is_multiple_choice(records)
    assert multiple_choice is (name == "AQuA")  # the test may know names; the code may not
    wrong = [
        (r["answer"], score(f"The answer is {r['answer']}.", r["answer"], r["instruction"], multiple_choice))
        for r in records
    ]
    wrong = [(gold, result) for gold, result in wrong if not result[1]]
    assert wrong == [], f"{len(wrong)} of {len(records)} gold answers scored wrong, e.g. {wrong[:3]}"


def test_aqua_choices_all_parse() -> None:
    records = _load("AQuA")
    counts = [len(parse_choices(r["instruction"])) for r in records]
    assert counts == [5] * len(records)


def test_mawps_train_overlaps_addsub() -> None:
    """The known trap: MAWPS training questions reappear in AddSub's test set, and the count must show it."""
    train_path = MATH_DATA / "mawps" / "trainset.json"
    if not train_path.is_file():
        pytest.skip(f"MAWPS training data not found at {train_path}")
    training = [r["original_text"] for r in json.loads(train_path.read_text())]
    addsub = _load("AddSub")
    assert sum(occurs_in_training([r["instruction"] + "\n" + r["input"] for r in addsub], training)) > len(addsub) // 2
    gsm8k = _load("gsm8k")
    assert sum(occurs_in_training([r["instruction"] for r in gsm8k], training)) == 0
