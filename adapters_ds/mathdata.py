"""Default math training data: a built-in generator of arithmetic word problems, and converters of GSM8K / MAWPS.

Why a generator: the project must train and show an improvement offline with no data download, on a 135M-parameter
base model (SmolLM2) and 2 CPU cores. Short one- and two-step problems with small numbers are what such a model can
learn in a few hundred steps, and a generator gives unlimited, exactly-correct, seed-reproducible data.

Every record is in the LLM-Adapters format that training and evaluation read::

    {"instruction": question, "input": "", "output": rationale ending "The answer is N.", "answer": "N"}

Train/test separation (`default_splits`): a question belongs to the test split when the SHA-256 hash of its
normalised text (`answers.normalize_question`, the harness's own contamination key) falls in the lowest
`TEST_FRACTION` of the hash range, else to the train split. Membership depends on the text alone, so no test
question can appear in any training set this module generates, whatever the seeds and sizes; within a split,
duplicate questions are dropped.

Commands::

    python -m adapters_ds.mathdata synth --out FILE [--n N --seed S --split train|test]
    python -m adapters_ds.mathdata convert [--gsm8k FILE] [--mawps FILE] --out FILE
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import operator
import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from adapters_ds.answers import normalize_question
from adapters_ds.errors import ArgumentParser, InputError, run_main
from adapters_ds.fileio import write_json

Kind = Literal["add", "subtract", "multiply", "divide", "two_step"]
KINDS: tuple[Kind, ...] = get_args(Kind)
Split = Literal["train", "test"]
TEST_FRACTION = 0.2  # share of the question space reserved for the test split (by hash of the text)
DEFAULT_N_TRAIN = 2000
DEFAULT_N_TEST = 200

Record = dict[str, str]

# ------------------------------------------------------------------------------------------------- formatting


def format_number(value: float) -> str:
    """A number as a model should write it: 8.0 -> "8", 10.333333333333334 -> "10.3333" (6 significant digits).

    Six significant digits keep non-integers within 5e-6 relative error, far inside the harness's tolerance
    (`answers.numbers_match`), without teaching a small model to emit 16-digit float noise; integers stay exact.
    """
    if math.isclose(value, round(value), rel_tol=0.0, abs_tol=1e-9):
        return str(int(round(value)))
    text = f"{value:.6g}"
    return repr(value) if "e" in text else text


# -------------------------------------------------------------------------------------------------- generator

# (name, subject pronoun): the pronoun keeps the questions grammatical ("She buys 5 more").
NAMES: tuple[tuple[str, str], ...] = (
    ("Mia", "She"), ("Leo", "He"), ("Ava", "She"), ("Noah", "He"), ("Emma", "She"), ("Liam", "He"),
    ("Zoe", "She"), ("Omar", "He"), ("Lily", "She"), ("Ben", "He"), ("Sara", "She"), ("Ravi", "He"),
    ("Nora", "She"), ("Sam", "He"), ("Chloe", "She"), ("Jack", "He"), ("Aisha", "She"), ("Tom", "He"),
    ("Grace", "She"), ("Kenji", "He"), ("Hana", "She"), ("Lucas", "He"), ("Maya", "She"), ("Diego", "He"),
)  # fmt: skip
OBJECTS: tuple[str, ...] = (
    "apples", "marbles", "stickers", "pencils", "cookies", "books", "cards", "shells", "balloons", "oranges",
    "stamps", "candies", "beads", "crayons", "eggs", "toy cars", "muffins", "flowers", "coins", "rocks",
)  # fmt: skip
# (singular, plural)
CONTAINERS: tuple[tuple[str, str], ...] = (
    ("bag", "bags"), ("box", "boxes"), ("pack", "packs"), ("jar", "jars"), ("basket", "baskets"),
    ("bowl", "bowls"),
)  # fmt: skip
PLACES: tuple[str, ...] = ("basket", "box", "drawer", "bag", "jar", "bowl")

_OPS: dict[str, Callable[[float, float], float]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
}


@dataclass(frozen=True)
class Step:
    """One arithmetic step `left op right`; kept so tests can recompute the answer independently of the text."""

    left: int
    op: Literal["+", "-", "*", "/"]
    right: int

    @property
    def result(self) -> int:
        value = _OPS[self.op](self.left, self.right)
        if value != int(value) or value < 0:
            raise ValueError(f"step {self} does not give a whole non-negative number")
        return int(value)

    def __str__(self) -> str:
        return f"{self.left} {self.op} {self.right} = {self.result}"


@dataclass(frozen=True)
class Problem:
    """A generated word problem: its kind, template, text, rationale and the steps that give its answer."""

    kind: Kind
    template: str
    question: str
    rationale: str  # ends with "The answer is {answer}."
    steps: tuple[Step, ...]

    @property
    def answer(self) -> int:
        return self.steps[-1].result

    def record(self) -> Record:
        return {"instruction": self.question, "input": "", "output": self.rationale, "answer": str(self.answer)}


@dataclass(frozen=True)
class _Cast:
    """The random names and things one problem is about."""

    name: str
    pronoun: str  # "She" / "He"
    other: str  # a second, different name
    obj: str  # plural noun
    box: str  # container, singular
    boxes: str  # container, plural
    place: str


def _cast(rng: random.Random) -> _Cast:
    (name, pronoun), (other, _) = rng.sample(NAMES, 2)
    box, boxes = rng.choice(CONTAINERS)
    return _Cast(name, pronoun, other, rng.choice(OBJECTS), box, boxes, rng.choice(PLACES))


def _problem(kind: Kind, template: str, question: str, reasoning: str, *steps: Step) -> Problem:
    answer = steps[-1].result
    return Problem(kind, template, question, f"{reasoning} The answer is {answer}.", steps)


# Each template draws its numbers first (so the answer is whole and in range), then writes the text. Ranges: sums
# up to 100, differences of 2-digit numbers, products of 2..12 by 2..12, quotients 2..12 with divisors 2..10.


def _add_gets_more(rng: random.Random, c: _Cast) -> Problem:
    s = Step(rng.randint(2, 60), "+", rng.randint(2, 40))
    return _problem(
        "add",
        "add/gets_more",
        f"{c.name} has {s.left} {c.obj}. {c.other} gives {c.name} {s.right} more {c.obj}. "
        f"How many {c.obj} does {c.name} have now?",
        f"{c.name} starts with {s.left} {c.obj} and gets {s.right} more, so {c.name} has {s} {c.obj}.",
        s,
    )


def _add_two_places(rng: random.Random, c: _Cast) -> Problem:
    s = Step(rng.randint(2, 60), "+", rng.randint(2, 40))
    return _problem(
        "add",
        "add/two_places",
        f"There are {s.left} {c.obj} in the {c.place} and {s.right} {c.obj} on the table. "
        f"How many {c.obj} are there in all?",
        f"We add the two groups: {s}.",
        s,
    )


def _add_two_days(rng: random.Random, c: _Cast) -> Problem:
    s = Step(rng.randint(2, 60), "+", rng.randint(2, 40))
    return _problem(
        "add",
        "add/two_days",
        f"{c.name} collected {s.left} {c.obj} on Monday and {s.right} {c.obj} on Tuesday. "
        f"How many {c.obj} did {c.name} collect altogether?",
        f"Over the two days {c.name} collected {s} {c.obj}.",
        s,
    )


def _subtract_gives_away(rng: random.Random, c: _Cast) -> Problem:
    a = rng.randint(10, 99)
    s = Step(a, "-", rng.randint(2, a - 1))
    return _problem(
        "subtract",
        "subtract/gives_away",
        f"{c.name} had {s.left} {c.obj} and gave {s.right} of them to {c.other}. "
        f"How many {c.obj} does {c.name} have left?",
        f"{c.name} gives away {s.right} of the {s.left} {c.obj}, so {s} are left.",
        s,
    )


def _subtract_sold(rng: random.Random, c: _Cast) -> Problem:
    a = rng.randint(10, 99)
    s = Step(a, "-", rng.randint(2, a - 1))
    return _problem(
        "subtract",
        "subtract/sold",
        f"A shop had {s.left} {c.obj}. It sold {s.right} of them. How many {c.obj} are left in the shop?",
        f"The shop has {s} {c.obj} left.",
        s,
    )


def _subtract_compare(rng: random.Random, c: _Cast) -> Problem:
    a = rng.randint(10, 99)
    s = Step(a, "-", rng.randint(2, a - 1))
    return _problem(
        "subtract",
        "subtract/compare",
        f"{c.name} has {s.left} {c.obj} and {c.other} has {s.right} {c.obj}. "
        f"How many more {c.obj} does {c.name} have than {c.other}?",
        f"The difference is {s}.",
        s,
    )


def _multiply_containers(rng: random.Random, c: _Cast) -> Problem:
    s = Step(rng.randint(2, 12), "*", rng.randint(2, 12))
    return _problem(
        "multiply",
        "multiply/containers",
        f"{c.name} buys {s.left} {c.boxes} of {c.obj}. Each {c.box} holds {s.right} {c.obj}. "
        f"How many {c.obj} does {c.name} buy?",
        f"{s.left} {c.boxes} with {s.right} {c.obj} each make {s} {c.obj}.",
        s,
    )


def _multiply_rows(rng: random.Random, c: _Cast) -> Problem:
    s = Step(rng.randint(2, 12), "*", rng.randint(2, 12))
    return _problem(
        "multiply",
        "multiply/rows",
        f"{c.name} lays out {c.obj} in {s.left} rows with {s.right} {c.obj} in each row. How many {c.obj} are there?",
        f"{s.left} rows of {s.right} make {s} {c.obj}.",
        s,
    )


def _multiply_days(rng: random.Random, c: _Cast) -> Problem:
    s = Step(rng.randint(2, 12), "*", rng.randint(2, 12))
    return _problem(
        "multiply",
        "multiply/days",
        f"{c.name} gets {s.right} {c.obj} every day for {s.left} days. How many {c.obj} does {c.name} get in total?",
        f"In {s.left} days {c.name} gets {s} {c.obj}.",
        s,
    )


def _exact_division(rng: random.Random) -> Step:
    divisor, quotient = rng.randint(2, 10), rng.randint(2, 12)
    return Step(divisor * quotient, "/", divisor)


def _divide_share(rng: random.Random, c: _Cast) -> Problem:
    s = _exact_division(rng)
    return _problem(
        "divide",
        "divide/share",
        f"{c.name} has {s.left} {c.obj} and shares them equally among {s.right} friends. "
        f"How many {c.obj} does each friend get?",
        f"Each friend gets {s} {c.obj}.",
        s,
    )


def _divide_pack(rng: random.Random, c: _Cast) -> Problem:
    s = _exact_division(rng)
    return _problem(
        "divide",
        "divide/pack",
        f"{c.name} packs {s.left} {c.obj} into {c.boxes} with {s.right} {c.obj} in each {c.box}. "
        f"How many {c.boxes} does {c.name} fill?",
        f"{c.name} fills {s} {c.boxes}.",
        s,
    )


def _divide_groups(rng: random.Random, c: _Cast) -> Problem:
    s = _exact_division(rng)
    return _problem(
        "divide",
        "divide/groups",
        f"There are {s.left} {c.obj}. They are put into {s.right} {c.boxes} with the same number in each "
        f"{c.box}. How many {c.obj} are in each {c.box}?",
        f"Each {c.box} gets {s} {c.obj}.",
        s,
    )


def _two_step_buy_then_give(rng: random.Random, c: _Cast) -> Problem:
    first = Step(rng.randint(5, 50), "+", rng.randint(2, 30))
    second = Step(first.result, "-", rng.randint(2, first.result - 1))
    return _problem(
        "two_step",
        "two_step/buy_then_give",
        f"{c.name} has {first.left} {c.obj}. {c.pronoun} buys {first.right} more and then gives {second.right} "
        f"to {c.other}. How many {c.obj} does {c.name} have now?",
        f"After buying, {c.name} has {first} {c.obj}. After giving some away, {c.name} has {second}.",
        first,
        second,
    )


def _two_step_share_then_add(rng: random.Random, c: _Cast) -> Problem:
    first = _exact_division(rng)
    second = Step(first.result, "+", rng.randint(1, 15))
    return _problem(
        "two_step",
        "two_step/share_then_add",
        f"{c.name} shares {first.left} {c.obj} equally among {first.right} friends. Each friend already had "
        f"{second.right} {c.obj}. How many {c.obj} does each friend have now?",
        f"Each friend gets {first} {c.obj}. Then each friend has {second}.",
        first,
        second,
    )


def _two_step_packs_then_give(rng: random.Random, c: _Cast) -> Problem:
    first = Step(rng.randint(2, 9), "*", rng.randint(2, 10))
    second = Step(first.result, "-", rng.randint(1, min(20, first.result - 1)))
    return _problem(
        "two_step",
        "two_step/packs_then_give",
        f"{c.name} buys {first.left} {c.boxes} of {c.obj} with {first.right} {c.obj} in each {c.box}. "
        f"{c.pronoun} gives away {second.right} of them. How many {c.obj} are left?",
        f"{c.name} buys {first} {c.obj}. After giving some away, {second} are left.",
        first,
        second,
    )


def _two_step_lose_then_find(rng: random.Random, c: _Cast) -> Problem:
    a = rng.randint(10, 60)
    first = Step(a, "-", rng.randint(2, a - 1))
    second = Step(first.result, "+", rng.randint(2, 30))
    return _problem(
        "two_step",
        "two_step/lose_then_find",
        f"{c.name} had {first.left} {c.obj}. {c.pronoun} lost {first.right} of them and then found "
        f"{second.right} more. How many {c.obj} does {c.name} have now?",
        f"After losing some, {c.name} has {first}. After finding more, {c.name} has {second}.",
        first,
        second,
    )


def _two_step_pool_then_share(rng: random.Random, c: _Cast) -> Problem:
    total = _exact_division(rng)
    a = rng.randint(1, total.left - 1)
    first = Step(a, "+", total.left - a)
    second = Step(first.result, "/", total.right)
    return _problem(
        "two_step",
        "two_step/pool_then_share",
        f"{c.name} has {first.left} {c.obj} and {c.other} has {first.right} {c.obj}. They put them together "
        f"and share them equally among {second.right} children. How many {c.obj} does each child get?",
        f"Together they have {first} {c.obj}. Each child gets {second}.",
        first,
        second,
    )


TEMPLATES: dict[Kind, tuple[Callable[[random.Random, _Cast], Problem], ...]] = {
    "add": (_add_gets_more, _add_two_places, _add_two_days),
    "subtract": (_subtract_gives_away, _subtract_sold, _subtract_compare),
    "multiply": (_multiply_containers, _multiply_rows, _multiply_days),
    "divide": (_divide_share, _divide_pack, _divide_groups),
    "two_step": (
        _two_step_buy_then_give,
        _two_step_share_then_add,
        _two_step_packs_then_give,
        _two_step_lose_then_find,
        _two_step_pool_then_share,
    ),
}


def random_problem(rng: random.Random) -> Problem:
    """One problem: a kind uniformly at random, then one of its templates, names, objects and numbers."""
    kind = rng.choice(KINDS)
    template = rng.choice(TEMPLATES[kind])
    return template(rng, _cast(rng))


def split_of(question: str) -> Split:
    """The split a question text belongs to, from a stable hash of its normalised text (see module docstring)."""
    digest = hashlib.sha256(normalize_question(question).encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") < TEST_FRACTION * 2**64 else "train"


def generate_problems(n: int, seed: int = 0, split: Split | None = None) -> list[Problem]:
    """`n` distinct problems (by normalised question), deterministic in `seed`; only `split`'s when given."""
    if n < 0:
        raise InputError(f"expected a number of problems >= 0, found {n}")
    rng = random.Random(seed)
    seen: set[str] = set()
    problems: list[Problem] = []
    max_draws = 50 * n + 1000  # the question space is far larger; this only stops an impossible request
    for _ in range(max_draws):
        if len(problems) == n:
            break
        problem = random_problem(rng)
        key = normalize_question(problem.question)
        if key in seen or (split is not None and split_of(problem.question) != split):
            continue
        seen.add(key)
        problems.append(problem)
    if len(problems) < n:
        raise InputError(f"expected {n} distinct problems, could only draw {len(problems)} in {max_draws} tries")
    return problems


def generate_records(n: int, seed: int = 0, split: Split | None = None) -> list[Record]:
    """`generate_problems` as LLM-Adapters records."""
    return [problem.record() for problem in generate_problems(n, seed, split)]


def default_splits(
    n_train: int = DEFAULT_N_TRAIN, n_test: int = DEFAULT_N_TEST, seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """(train, test) records of the built-in data; no normalised question occurs in both (split by text hash)."""
    return generate_records(n_train, seed, "train"), generate_records(n_test, seed, "test")


# ------------------------------------------------------------------------------------------------- converters

_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's "<<48/2=24>>" calculator annotations


def gsm8k_to_records(rows: Iterable[Mapping[str, Any]], source: str = "gsm8k") -> list[Record]:
    """GSM8K rows `{"question", "answer": rationale ending "#### N"}` as training records.

    The calculator annotations are removed (a model trained on them learns to emit them), and "#### N" becomes a
    final "The answer is N." (the phrase the generator and the answer extractor use); thousands separators are
    stripped from N. `source` names the data in error messages.
    """
    records = []
    for index, row in enumerate(rows):
        question, answer = _fields(row, ("question", "answer"), source, index)
        body, marker, final = answer.rpartition("####")
        number = final.strip().replace(",", "")
        if not marker or not _is_number(number):
            raise InputError(
                f"{source}: record {index}: expected an answer ending in '#### <number>', found {answer[-60:]!r}"
            )
        lines = [line.rstrip() for line in _CALCULATOR.sub("", body).strip().splitlines()]
        rationale = "\n".join([*lines, f"The answer is {number}."]).strip()
        records.append({"instruction": question.strip(), "input": "", "output": rationale, "answer": number})
    return records


def mawps_to_records(rows: Iterable[Mapping[str, Any]], source: str = "mawps") -> list[Record]:
    """MAWPS rows `{"original_text", "equation", "ans"}` as training records with a short step-by-step rationale.

    An equation `x=<arithmetic>` (e.g. "X=((22.0-14.0)/4.0)") becomes one sentence per operation, innermost first:
    "We compute 22 - 14 = 8. Then 8 / 4 = 2. The answer is 2." Equations that are not of that form (x on the right
    side, "X-6=52") or whose value disagrees with `ans` beyond label rounding get "We solve <equation> for <its
    unknown>." instead. The answer is always `ans`, formatted by `format_number`.
    The question text is kept as given (MAWPS is tokenised, "section . If"), like the LLM-Adapters test sets.
    """
    records = []
    for index, row in enumerate(rows):
        text, equation = _fields(row, ("original_text", "equation"), source, index)
        raw = row.get("ans")
        if isinstance(raw, bool) or not isinstance(raw, int | float | str) or not _is_number(str(raw)):
            raise InputError(f"{source}: record {index}: expected a numeric 'ans', found {raw!r}")
        answer = format_number(float(raw))
        steps = _equation_steps(equation)
        # rel_tol 1e-3: some labels are rounded (27.15 for 27.1528); the steps show the exact value, then the label
        if steps and math.isclose(steps[-1][1], float(raw), rel_tol=1e-3, abs_tol=1e-9):
            reasoning = " ".join(f"{'We compute' if i == 0 else 'Then'} {step}." for i, (step, _) in enumerate(steps))
        else:
            unknown = next(iter(_IDENTIFIER.findall(equation)), "x")
            reasoning = f"We solve {equation.strip()} for {unknown}."
        records.append(
            {
                "instruction": text.strip(),
                "input": "",
                "output": f"{reasoning} The answer is {answer}.",
                "answer": answer,
            }
        )
    return records


_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
_AST_OPS: dict[type, str] = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def _equation_steps(equation: str) -> list[tuple[str, float]] | None:
    """The operations of `var=<arithmetic>` as ("a op b = c", c) in evaluation order, or None if not that form."""
    left, sep, right = equation.partition("=")
    if not sep or not left.strip().isidentifier() or "=" in right:
        return None
    try:
        tree = ast.parse(right.strip(), mode="eval").body
    except SyntaxError:
        return None
    steps: list[tuple[str, float]] = []

    def value(node: ast.expr) -> float | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            inner = value(node.operand)
            return None if inner is None else -inner
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            a, b = value(node.left), value(node.right)
            op = _AST_OPS[type(node.op)]
            if a is None or b is None or (op == "/" and b == 0):
                return None
            result = _OPS[op](a, b)
            steps.append((f"{format_number(a)} {op} {format_number(b)} = {format_number(result)}", result))
            return result
        return None

    return steps if value(tree) is not None and steps else None  # "x=5" has no operation to show


def _fields(row: Any, names: tuple[str, ...], source: str, index: int) -> tuple[str, ...]:
    """The string fields `names` of one row, or an InputError naming the source, the record and what was found."""
    if not isinstance(row, Mapping):
        raise InputError(f"{source}: record {index}: expected an object, found {type(row).__name__}")
    values = []
    for name in names:
        value = row.get(name)
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{source}: record {index}: expected a non-empty string field {name!r}, found {value!r}")
        values.append(value)
    return tuple(values)


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def read_rows(path: str | Path) -> list[Any]:
    """Rows of a JSON list or JSONL file; a missing or malformed file is an InputError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"input file not found: {str(path)!r}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(rows, list):
            raise InputError(f"{path}: expected a JSON list of records, found a JSON {type(rows).__name__}")
        return rows
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}: line {number}: not valid JSON: {exc}") from None
    return rows


# ---------------------------------------------------------------------------------------------------- command


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m adapters_ds.mathdata", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser("synth", help="write generated arithmetic word problems as a JSON list")
    synth.add_argument("--out", required=True, help="output .json file")
    synth.add_argument("--split", choices=get_args(Split), default="train")
    synth.add_argument(
        "--n", type=int, help=f"number of records (default {DEFAULT_N_TRAIN} train, {DEFAULT_N_TEST} test)"
    )
    synth.add_argument("--seed", type=int, default=0)
    convert = commands.add_parser("convert", help="convert GSM8K (JSONL) and/or MAWPS (JSON) into one JSON list")
    convert.add_argument("--gsm8k", help="GSM8K file: rows {question, answer ending '#### N'}")
    convert.add_argument("--mawps", help="MAWPS file: rows {original_text, equation, ans}")
    convert.add_argument("--out", required=True, help="output .json file")
    args = parser.parse_args(argv)

    if args.command == "synth":
        n = args.n if args.n is not None else (DEFAULT_N_TRAIN if args.split == "train" else DEFAULT_N_TEST)
        records = generate_records(n, args.seed, args.split)
    else:
        if not args.gsm8k and not args.mawps:
            raise InputError("convert: expected at least one of --gsm8k FILE and --mawps FILE, found neither")
        records = []
        if args.gsm8k:
            records += gsm8k_to_records(read_rows(args.gsm8k), source=args.gsm8k)
        if args.mawps:
            records += mawps_to_records(read_rows(args.mawps), source=args.mawps)
    write_json(args.out, records)
    print(f"wrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    run_main(main)
