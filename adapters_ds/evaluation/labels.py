"""Label tasks (the commonsense suite): read each record's label set from its prompt and take the model's chosen label
out of its response.

A label task's instruction (or input) ends with an `Answer format:` line listing the allowed labels, e.g.
`Answer format: true/false`, `answer1/answer2/answer3/answer4`, `solution1/solution2`, `ending1/.../ending4`,
`option1/option2`; the gold `answer` is one of them. The set is read per record (ARC items have 3, 4 or 5 answers),
never from a data set's name. Labels compare case-insensitively; predictions are written as the format line spells
them.

Extraction (`extract_label`), in order of trust. Only the model's own response counts (`answers.response_text`), and
an echoed `Answer format:` line is ignored.

1. Explicit picks: "the correct answer is answer3", "Answer: TRUE", "the best ending is ending2", "answer is 3" (a
   bare number for `<word><n>` labels), "option2 is the correct one", "I choose solution1". The LAST one wins, as for
   AQuA letters (`answers.extract_choice`): a response that reconsiders ("the answer is answer1? No: the correct
   answer is answer3") ends on its decision. A negated pick ("is not answer1") or one that names alternatives
   ("the answer is answer1 or answer2") is no pick; picks of every allowed label ("The answer is true.\n\nThe answer
   is false.", how small base models run on) are no choice at all: no prediction.
2. Otherwise, bare mentions of labels, without those that are not choices: lists of labels ("true or false",
   "answer1, answer2 or answer3", "answer1/answer2"), an echoed list of options (two or more labels written as
   headers, "Answer1: ... Answer2: ..."), rejections ("not true", "answer1 is wrong"). The FIRST remaining mention
   wins. Responses without an explicit pick are answer-first ("answer2\\n\\nAnswer1 is a muscle, ..." or "true. The
   passage says ..."): that is how the training outputs ("the correct answer is answer2") and the label-scoring
   mode put it, and the text after the first label is its justification or a run-on continuation, where other
   labels come up as alternatives. Chains of thought that end on their result end with an explicit pick (rule 1).
3. Otherwise, the text of exactly one option ("Answer2: a tundra" in the prompt, "a tundra" in the response).
4. Otherwise (a refusal, an echo of the options, no label): no prediction, never correct.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from adapters_ds.errors import InputError
from adapters_ds.evaluation.answers import response_text
from adapters_ds.records import normalize_question, question_text

# "Answer format: a/b/c": the rest of the line after the last such header lists the labels.
_FORMAT = re.compile(r"(?i)\banswer[ \t]+format[ \t]*:[ \t]*(?P<labels>[^\n]*)")
_LABEL_TEXT = re.compile(r"[A-Za-z0-9][\w-]*\Z")
_NUMBERED = re.compile(r"([A-Za-z]+)(\d+)\Z")  # answer3, solution1, ending4, option2

# What may come between the labels of a list ("true or false", "answer1, answer2, or answer3", "answer1/answer2").
_LIST_GAP = re.compile(r"\s*(?:/|,|,?\s*(?:or|and)\b)\s*\Z", re.IGNORECASE)
_HEADER_AFTER = re.compile(r"[ \t]*[:)]")  # "Answer1:" / "ending2)": an option's header, as the prompt lists them
_OPEN_PAREN_BEFORE = re.compile(r"\([ \t]*\Z")  # "(answer1)" is a mention in parentheses, not a header
_REJECTED_BEFORE = re.compile(r"(?i)\bnot[ \t]+\Z")
_REJECTED_AFTER = re.compile(r"(?i)[ \t]+(?:is|seems)[ \t]+(?:not\b|wrong\b|incorrect\b|false\b)")

# The text around an explicit pick; {label} is the label alternatives (see `_Matcher`).
_PICK_BEFORE = (
    r"(?:\b(?:answer|option|choice|solution|ending)\b[ \t]*(?:is|would[ \t]+be|should[ \t]+be|must[ \t]+be|will[ \t]+be"
    r"|=|:)[ \t]*:?"
    r"|\bI(?:'d|[ \t]+would|[ \t]+will)?[ \t]+(?:choose|pick|select|go[ \t]+with)"
    r"|\b(?:choose|pick|select)\b)"
    r"[ \t]*(?:the[ \t]+)?[\"'(*\[]*"
)
_PICK_AFTER = (
    r"[\"')*\]]*[ \t]+(?:is|seems|would[ \t]+be|fits)[ \t]+(?:the[ \t]+)?(?:most[ \t]+likely|correct|right|best"
    r"|true[ \t]+(?:answer|one)|answer\b)"
)


class _Matcher:
    """Regular expressions for one label set: mentions ("answer3", "Answer 3", "ANSWER #3") and explicit picks."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = tuple(labels)
        self.canonical = {_key(label): label for label in labels}
        numbered = [_NUMBERED.match(label) for label in labels]
        self.prefix = None  # the shared word of <word><n> labels, for "the answer is 3"
        if all(numbered) and len({m.group(1).lower() for m in numbered if m}) == 1:
            self.prefix = numbered[0].group(1).lower() if numbered[0] else None
        alternatives = []
        for label, m in sorted(zip(labels, numbered, strict=True), key=lambda lm: -len(lm[0])):
            alternatives.append(rf"{re.escape(m.group(1))}[ \t]*#?[ \t]*{m.group(2)}" if m else re.escape(label))
        mention = rf"(?<![\w-])(?:{'|'.join(alternatives)})(?![\w-])"
        self.mention = re.compile(mention, re.IGNORECASE)
        number = r"|(?<![\w.])\d+(?!\w|\.\d)" if self.prefix else ""  # "the answer is 3." for answer1..answer5
        not_a_list = rf"(?!\s*(?:/|,?\s*(?:or|and)\b|,\s*(?:{mention})))"  # "the answer is true or false": no pick
        self.picks = [
            re.compile(rf"{_PICK_BEFORE}(?P<label>{mention}{number}){not_a_list}", re.IGNORECASE),
            re.compile(rf"(?P<label>{mention}){_PICK_AFTER}", re.IGNORECASE),
        ]

    def label_of(self, text: str) -> str | None:
        key = _key(text)
        if key.isdigit() and self.prefix is not None:
            key = self.prefix + key
        return self.canonical.get(key)


def _key(text: str) -> str:
    return re.sub(r"[\s#]", "", text).lower()


# ---------------------------------------------------------------------------------------------- the label set


def read_labels(text: str) -> tuple[str, ...] | None:
    """The labels listed by the last `Answer format:` line of `text`, in order; None when there is no such line.

    A line that does not list at least two distinct labels separated by "/" (each a word such as "true" or
    "answer3") is an InputError: the label set cannot be read.
    """
    found = list(_FORMAT.finditer(text))
    if not found:
        return None
    listed = found[-1].group("labels").strip()
    labels = tuple(part.strip().rstrip(".").strip() for part in listed.split("/"))
    if len(labels) < 2 or not all(_LABEL_TEXT.match(label) for label in labels):
        raise InputError(
            "expected 'Answer format:' followed by two or more labels separated by '/' (e.g. 'true/false' or "
            f"'answer1/answer2/answer3'); found {listed!r}"
        )
    if len({label.lower() for label in labels}) != len(labels):
        raise InputError(f"expected distinct labels after 'Answer format:'; found {listed!r}")
    return labels


def record_labels(record: Mapping[str, object]) -> tuple[str, ...]:
    """The label set of one record (instruction, then input); InputError when it has no `Answer format:` line."""
    labels = read_labels(question_text(record))  # type: ignore[arg-type]
    if labels is None:
        raise InputError(
            "expected an 'Answer format: label1/label2/...' line in the instruction or input listing the labels; "
            "found none"
        )
    return labels


def is_label_task(records: Iterable[Mapping[str, object]]) -> bool:
    """Whether a data set is a label task: every record has an `Answer format:` line. None has one: not a label
    task. Only some: InputError naming the first record without one (one scoring rule applies to a whole set)."""
    has = [read_labels(question_text(record)) is not None for record in records]  # type: ignore[arg-type]
    if all(has) and has:
        return True
    if any(has):
        first = has.index(False)
        raise InputError(
            f"record {first} (0-based): the label set cannot be read: expected an 'Answer format: a/b/...' line as "
            f"in {sum(has)} of the {len(has)} records; found none"
        )
    return False


def gold_label(answer: str, labels: Sequence[str]) -> str:
    """The label `answer` names, as the format line spells it; InputError when it is not one of `labels`."""
    found = {label.lower(): label for label in labels}.get(answer.strip().lower())
    if found is None:
        raise InputError(f"expected a gold answer among the labels {'/'.join(labels)}; found {answer!r}")
    return found


def answer_lead(records: Iterable[Mapping[str, object]]) -> str:
    """The text a data set's outputs put before the label ("the correct answer is "), or "".

    Read from the records' `output`: when every output is some text followed by its own gold label (a final "."
    allowed), and that text is the same for all, it is the lead; otherwise "". Being the same for every record, it
    tells nothing about any gold label. Label scoring ranks the labels after prompt + lead: what a model trained on
    these outputs writes before its label.
    """
    leads = set()
    for record in records:
        output, answer = record.get("output"), str(record.get("answer", "")).strip()
        if not isinstance(output, str) or not answer:
            return ""
        text = output.rstrip().removesuffix(".").rstrip()
        if not text.lower().endswith(answer.lower()):
            return ""
        leads.add(text[: len(text) - len(answer)])
        if len(leads) > 1:
            return ""
    return leads.pop() if leads else ""


def option_texts(question: str, labels: Sequence[str]) -> dict[str, str]:
    """The text of each option as the prompt lists it ("Answer1: a marsh Answer2: a tundra"), label to text; {} when
    not every label has such a header before the `Answer format:` line."""
    formats = list(_FORMAT.finditer(question))
    text = question[: formats[-1].start()] if formats else question
    starts = []
    for label in labels:
        headers = list(re.finditer(rf"(?i)(?<![\w-]){re.escape(label)}[ \t]*:", text))
        if not headers:
            return {}
        starts.append((headers[-1].start(), headers[-1].end(), label))
    starts.sort()
    return {
        label: text[end : starts[i + 1][0] if i + 1 < len(starts) else len(text)].strip()
        for i, (_, end, label) in enumerate(starts)
    }


# ------------------------------------------------------------------------------------------------ extraction


def extract_label(output: str, labels: Sequence[str], question: str = "") -> str | None:
    """The label a model chose in `output`, or None (see the module docstring for the rules); `question` supplies
    the option texts for the last fallback."""
    matcher = _Matcher(labels)
    response = _FORMAT.sub(" ", response_text(output))
    picks = [
        (m.start(), label)
        for pattern in matcher.picks
        for m in pattern.finditer(response)
        if (label := matcher.label_of(m.group("label"))) is not None
    ]
    if len({label for _, label in picks}) == len(labels):  # "The answer is true. The answer is false.": no choice
        return None
    if picks:
        return max(picks)[1]
    chosen = _bare_mentions(response, matcher)
    if chosen:
        return chosen[0]
    return _option_text_match(response, option_texts(question, labels))


def _bare_mentions(response: str, matcher: _Matcher) -> list[str]:
    """The labels mentioned as choices, in order: lists, echoed option headers and rejections left out."""
    mentions = list(matcher.mention.finditer(response))
    in_list = set()
    for i in range(len(mentions) - 1):
        if _LIST_GAP.match(response[mentions[i].end() : mentions[i + 1].start()]):
            in_list.update((i, i + 1))
    headers = {
        i
        for i, m in enumerate(mentions)
        if _HEADER_AFTER.match(response, m.end()) and not _OPEN_PAREN_BEFORE.search(response, 0, m.start())
    }
    header_labels = {matcher.label_of(mentions[i].group()) for i in headers}
    chosen = []
    for i, m in enumerate(mentions):
        if i in in_list or (i in headers and len(header_labels) > 1):
            continue
        if _REJECTED_BEFORE.search(response[: m.start()]) or _REJECTED_AFTER.match(response, m.end()):
            continue
        label = matcher.label_of(m.group())
        if label is not None:
            chosen.append(label)
    return chosen


def _option_text_match(response: str, options: Mapping[str, str]) -> str | None:
    """The one option whose text the response contains (an option inside a longer matching one does not count)."""
    haystack = f" {normalize_question(response)} "
    texts = {label: normalize_question(text) for label, text in options.items()}
    found = {label: text for label, text in texts.items() if text and f" {text} " in haystack}
    kept = [label for label, text in found.items() if not any(text != t and text in t for t in found.values())]
    return kept[0] if len(kept) == 1 else None


def score_label(output: str, answer: str, question: str) -> tuple[str | None, bool]:
    """(prediction, correct) for one response to a label-task `question` with gold label `answer`."""
    labels = read_labels(question)
    if labels is None:
        raise InputError("expected an 'Answer format:' line listing the labels in the question; found none")
    gold = gold_label(answer, labels)
    prediction = extract_label(output, labels, question)
    return prediction, prediction == gold


def clean_pick(output: str, labels: Sequence[str], lead: str = "") -> str | None:
    """The label when the response is exactly lead + one label (case and surrounding space or a final "." aside),
    else None: a generation that picked a label cleanly, as label scoring scores it."""
    text = response_text(output).strip().removesuffix(".").strip().lower()
    lead = lead.strip().lower()
    if lead and not text.startswith(lead):
        return None
    rest = text[len(lead) :].strip()
    return next((label for label in labels if label.lower() == rest), None)
