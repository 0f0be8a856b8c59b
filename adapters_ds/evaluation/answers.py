"""Scoring core of the math-reasoning harness: pull the answer out of a model's text and compare it with the gold one.

No generation and no model here, only strings, so every rule can be tested on hand-written outputs.
The rules:

- Only the model's own response is read (`response_text`): if the generation runs on into a new
  "### Instruction:" turn, or echoes the prompt, numbers from the echoed question are not counted.
- Numeric answers: the first number after the last "answer is" / "answer:" / "####" (after its last "=",
  so "The answer is 12 - 5 = 7" gives 7), otherwise the last number of the response. Thousands separators,
  "$", "%", negatives, decimals, fractions ("3/4", "2 1/2") and exponents ("1.5e3") are understood.
- Multiple choice: an explicit letter ("answer is (C)", "Answer: E", "the correct option is D", a parenthesised
  "(B)", a letter alone at the end) — never the "A" of "Answer" or the article "A" — else the extracted number matched
  against the numeric values of the choices.
- Numbers compare with `numbers_match`: exact for integer golds, rounding-tolerant for fractional ones.
- Whether a data set is multiple choice is read from its records (`is_multiple_choice`), never its name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from adapters_ds.errors import InputError

LETTERS = "ABCDE"

# A prompt-section header such as "### Instruction:" / "### Response:"; "####" (the gsm8k answer marker) is not one.
_SECTION = re.compile(r"(?<!#)###(?!#)[ \t]*(\w+)")
# What may precede the first header of an echoed prompt: nothing, or the Alpaca preamble.
_ECHO_START = re.compile(r"\s*(?:Below is an instruction\b.*)?\Z", re.DOTALL | re.IGNORECASE)

# One number as written in prose. The look-behinds keep "x2", the "3" of "1.2.3" and the "4" of "3/4" from being
# numbers of their own ("Rs.500" is still 500), and a minus sign counts only when attached ("-3"), so "10 - 3" is
# ten and three, not ten and minus three.
_NUMBER = re.compile(
    r"""
    (?<![\w/])(?<!\d\.)
    (?P<sign>[-+\u2212])?
    (?:\$\s?)?
    (?:
        (?P<whole>\d+)[ ](?P<mnum>\d+)/(?P<mden>\d+)(?![\d/])     # mixed number: 2 1/2
      | (?P<num>\d+)/(?P<den>\d+)(?![\d/])                       # fraction 3/4, but not a date 3/4/2020
      | (?P<dec>\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?               # 1,234 and 1,234.50
               | \d+(?:\.\d+)?(?:[eE][-+]?\d+)?                  # 12, 12.5, 1.5e3
               | \.\d+)                                          # .5
    )
    """,
    re.VERBOSE,
)

# Where a stated final answer starts. `\banswer\b` needs the whole word, so "answers" does not count.
_ANSWER_ANCHOR = re.compile(r"(?i)\banswer\b\s*(?:is\b|:|=)|####")
# End of the answer's sentence: a full stop that is not a decimal point, or a line break.
_SENTENCE_END = re.compile(r"\.(?!\d)|\n")

# "answer is", "answer:", "option is" or "choice is", then a choice letter as a token: in parentheses, or bare and
# followed by punctuation, the end, or a number ("B. 25", "B 25"), so the article in "Answer: A total of 25" is not
# a choice. A bare "option (A)" is a reference in the reasoning, not a pick.
_LETTER = r"(?:\((?P<p>[A-E])\)|(?P<b>[A-E])(?=[.,;:)]|\s*$|\s+[\d$(-]))"
_EXPLICIT_CHOICE = re.compile(
    r"(?i:\banswer\b\s*(?:is\b|:|=)|\b(?:option|choice)\s+is\b:?)\s*(?i:(?:option|choice)\s*)?" + _LETTER,
    re.MULTILINE,
)
_PAREN_CHOICE = re.compile(r"\(([A-E])\)")
# A letter standing alone at the end: the whole last line ("C", "(C).") or right after "is" / ":" ("... is D.").
_FINAL_LETTER = re.compile(r"(?:^|\bis|:)[ \t]*\(?([A-E])\)?[.!]?\s*\Z", re.MULTILINE)
# Choice lists the model copies from the prompt: their "(E)" would otherwise read as its pick.
_ECHOED_CHOICES = re.compile(r"(?i)answer choices:[^\n]*")

_CHOICES_HEADER = re.compile(r"(?i)answer choices\s*:?")
# Inside a choice's text: operators and ratio marks make it an expression, not a number.
_OPERATORS = re.compile(r"[-+*/×÷=^√π:<>≠\u2212\u2013]")


def response_text(output: str) -> str:
    """The model's own answer inside `output`, without echoed prompt sections.

    When the output starts with a "### <Section>" header, alone or after the Alpaca preamble ("Below is an
    instruction ..."), the prompt was echoed and the response is the body of the first "### Response:" section.
    Otherwise the response is the text before the first header: the model answered and then invented a new
    "### Instruction:" turn (which may have its own "### Response:"). Either way the response ends at the next
    header, so numbers of the echoed question or of an invented follow-up are never read as the answer.
    """
    headers = list(_SECTION.finditer(output))
    if not headers:
        return output
    if not _ECHO_START.match(output[: headers[0].start()]):
        return output[: headers[0].start()]
    for i, header in enumerate(headers):
        if header.group(1).lower() == "response":
            end = headers[i + 1].start() if i + 1 < len(headers) else len(output)
            return output[header.end() : end].lstrip(":")
    return ""


def _numbers(text: str) -> list[float]:
    """Every number written in `text`, in order (see `_NUMBER` for what counts)."""
    values = []
    for m in _NUMBER.finditer(text):
        if m.group("dec") is not None:
            value = float(m.group("dec").replace(",", ""))
        elif m.group("num") is not None:
            if int(m.group("den")) == 0:
                continue
            value = int(m.group("num")) / int(m.group("den"))
        else:
            if int(m.group("mden")) == 0:
                continue
            value = int(m.group("whole")) + int(m.group("mnum")) / int(m.group("mden"))
        if math.isfinite(value):
            values.append(-value if m.group("sign") in ("-", "\u2212") else value)
    return values


def extract_number(text: str) -> float | None:
    """The numeric answer a model gave, or None when it wrote no number.

    The first number after the last answer marker ("The answer is", "Answer:", "####") within that sentence,
    taken after the sentence's last "=" ("The answer is 12 - 5 = 7" means 7). Without a marker, or with one not
    followed by a number in its sentence ("The answer is approx. 12"), the last number of the response: chain of
    thought ends with its result, and the question's own numbers come earlier.
    """
    text = response_text(text)
    anchors = list(_ANSWER_ANCHOR.finditer(text))
    if anchors:
        sentence = _SENTENCE_END.split(text[anchors[-1].end() :].lstrip(), maxsplit=1)[0]
        found = _numbers(sentence[sentence.rfind("=") + 1 :])
        if found:
            return found[0]
    found = _numbers(text)
    return found[-1] if found else None


def numbers_match(pred: float, gold: float, rel_tol: float = 1e-3, abs_tol: float = 5e-3) -> bool:
    """Whether a predicted number counts as the gold one.

    Integer golds (576.0, 2400000.0) must be hit exactly (up to float noise): a count or an amount of money
    off by one is wrong however large it is, which a relative tolerance would forgive (0.1 % of 2,400,000 is
    2,400). Fractional golds (1.8333333333333335, 0.125) are stored to full float precision while models print a
    rounding, so they match within `abs_tol` = 0.005, i.e. any rounding to two decimals (1.83, 0.17 for 0.1667,
    0.13 for 0.125), or within `rel_tol` = 0.1 % for large values (33.3 for 33.333). An absolute
    tolerance of 1e-3 would reject 1.83, and so would a purely relative 1e-3 (0.18 % off), which would accept 0.17
    only at 2 %. 1.8 for 1.8333 (1.8 % off, 0.033 away) and 183 for 1.83 do not match.
    """
    if not (math.isfinite(pred) and math.isfinite(gold)):
        return False
    if math.isclose(gold, round(gold), rel_tol=1e-9, abs_tol=1e-9):
        return math.isclose(pred, gold, rel_tol=1e-9, abs_tol=1e-9)
    # 1e-9 of slack so a rounding that lands exactly on the tolerance (0.13 for 0.125) is not lost to float error.
    return abs(pred - gold) <= max(rel_tol * abs(gold), abs_tol) + 1e-9


def parse_choices(question: str) -> dict[str, str]:
    """The answer choices of an AQuA-style question, letter to text, in order; {} when it has none.

    Reads what follows the last "Answer Choices:" (the whole text if there is no such header), where the
    markers are "(A)" or "A)". Markers are searched in order A, B, C, ... so a parenthesis inside a choice,
    as in "(C) M/ (D-3)", is not taken for the next letter. Some AQuA items repeat the marker inside the
    choice ("(A) A) 59"): that repetition is dropped.
    """
    headers = list(_CHOICES_HEADER.finditer(question))
    text = question[headers[-1].end() :] if headers else question
    starts: list[tuple[str, int, int]] = []  # (letter, marker start, marker end)
    position = 0
    for letter in LETTERS:
        m = re.compile(rf"(?:(?<=\s)|(?<=^)|(?<=:))\(?{letter}\)").search(text, position)
        if m is None:
            break
        starts.append((letter, m.start(), m.end()))
        position = m.end()
    if len(starts) < 2:
        return {}
    choices = {}
    for i, (letter, _, end) in enumerate(starts):
        stop = starts[i + 1][1] if i + 1 < len(starts) else len(text)
        value = text[end:stop].strip()
        choices[letter] = re.sub(rf"^{letter}\)\s*", "", value)
    return choices


def choice_value(choice: str) -> float | None:
    """The number a choice stands for, or None when it is not a plain number.

    Plain means one number with optional words around it: "12", "$1.23", "Rs.500", "20%", "-23.5", "5/18",
    "11.75 miles", "25km", "After 6 minutes". Not plain: a second number ("600, 400"), an operator or ratio
    ("a3 + b3", "2: π", "13x/2 - 6"), or a number glued to a single letter or "pi" ("3x", "750pi", "5C3"),
    which AQuA uses for algebra; "2.6m" (metres) is lost that way too, a price paid to keep "4y" from reading
    as 4. Such choices can still be picked by letter.
    """
    text = choice.strip().rstrip(".")
    matches = list(_NUMBER.finditer(text))
    if len(matches) != 1:
        return None
    m = matches[0]
    glued = re.match(r"[A-Za-z]+", text[m.end() :])
    if glued and (len(glued.group()) == 1 or glued.group().lower() == "pi"):
        return None
    rest = re.sub(r"[A-Za-z]+/[A-Za-z]+", " ", text[: m.start()] + " " + text[m.end() :])  # units: km/h, m/s
    if _OPERATORS.search(rest):
        return None
    return _numbers(m.group())[0]


def extract_choice(text: str, choices: Mapping[str, str]) -> str | None:
    """The letter a model picked, or None.

    In order of trust: the last explicit pick ("answer is (C)", "Answer: E", "the answer is B. 25", "option is D"),
    the last parenthesised letter "(C)", a letter alone at the end; an echoed "Answer Choices: ..." line is
    ignored. Otherwise the extracted number (`extract_number`) is compared with each numeric choice and the
    closest one within `numbers_match` wins, so "The answer is 25" picks the choice that reads 25.
    Letters outside `choices` are ignored when `choices` is not empty.
    """
    allowed = set(choices) or set(LETTERS)
    response = _ECHOED_CHOICES.sub(" ", response_text(text))
    for pattern in (_EXPLICIT_CHOICE, _PAREN_CHOICE, _FINAL_LETTER):
        letters = [next(g for g in m.groups() if g) for m in pattern.finditer(response)]
        letters = [letter for letter in letters if letter in allowed]
        if letters:
            return letters[-1]
    pred = extract_number(response)
    if pred is None:
        return None
    best: tuple[float, str] | None = None
    for letter, choice in choices.items():
        value = choice_value(choice)
        if value is not None and numbers_match(pred, value):
            distance = abs(pred - value)
            if best is None or distance < best[0]:
                best = (distance, letter)
    return best[1] if best else None


def _format_number(value: float) -> str:
    """A prediction as text for the per-example record: 576 rather than 576.0, full precision otherwise."""
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def score(output: str, answer: str, question: str, multiple_choice: bool) -> tuple[str | None, bool]:
    """(prediction, correct) for one generated `output` against the gold `answer`.

    The prediction is a letter for multiple-choice items and a number written as text otherwise; None when
    nothing could be extracted (then never correct). `question` supplies the choices. A gold answer that is not
    a letter A-E (multiple choice) or a number (numeric) is bad data and raises InputError.
    """
    gold = answer.strip()
    if multiple_choice:
        gold = gold.upper()
        if len(gold) != 1 or gold not in LETTERS:
            raise InputError(f"expected a gold choice letter A-E for a multiple-choice item, found {answer!r}")
        letter = extract_choice(output, parse_choices(question))
        return letter, letter == gold
    try:
        gold_value = float(gold.replace(",", ""))
    except ValueError:
        gold_value = math.nan
    if not math.isfinite(gold_value):
        raise InputError(f"expected a numeric gold answer, found {answer!r}")
    pred = extract_number(output)
    if pred is None:
        return None, False
    return _format_number(pred), numbers_match(pred, gold_value)


def _prompt_text(record: Mapping[str, object]) -> str:
    return f"{record.get('instruction', '')}\n{record.get('input', '')}"


def is_multiple_choice(records: Iterable[Mapping[str, object]]) -> bool:
    """Whether a data set (LLM-Adapters records) is multiple choice, judged from its records, not its name.

    A record looks multiple-choice when its gold `answer` is a letter A-E or its instruction/input contains
    "Answer Choices". All records must agree: a file mixing both kinds (or an empty one) is bad input, because
    one scoring rule is applied to the whole data set.
    """
    votes = [
        str(record.get("answer", "")).strip().upper() in set(LETTERS)
        or "answer choices" in _prompt_text(record).lower()
        for record in records
    ]
    if not votes:
        raise InputError("expected at least one record to decide numeric vs multiple choice, found none")
    if all(votes):
        return True
    if not any(votes):
        return False
    raise InputError(
        f"expected all records numeric or all multiple choice, found {sum(votes)} of {len(votes)} multiple choice "
        "(gold letter A-E or 'Answer Choices' in the prompt)"
    )
