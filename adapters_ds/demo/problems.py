"""The built-in math training data: a generator of arithmetic word problems, split into train and test by text.

Why a generator: the project must train and show an improvement offline with no data download, on a 135M-parameter
base model (SmolLM2) on CPU cores. Short one- and two-step problems with small numbers are what such a model can
learn in a few hundred steps, and a generator gives unlimited, exactly-correct, seed-reproducible data.

Every record is in the LLM-Adapters format that training and evaluation read::

    {"instruction": question, "input": "", "output": rationale ending "The answer is N.", "answer": "N"}

Train/test separation (`default_splits`): a question belongs to the test split when the SHA-256 hash of its
normalised text (`records.normalize_question`, the harness's own contamination key) falls in the lowest
`TEST_FRACTION` of the hash range, else to the train split. Membership depends on the text alone, so no test
question can appear in any training set this module generates, whatever the seeds and sizes; within a split,
duplicate questions are dropped.

Command (`adapters_ds.cli.mathdata`, which also converts GSM8K / MAWPS: `adapters_ds.mathdata`)::

    python -m adapters_ds.mathdata synth --out FILE [--n N --seed S --split train|test]
"""

from __future__ import annotations

import hashlib
import operator
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

from adapters_ds.errors import InputError
from adapters_ds.records import normalize_question

Kind = Literal["add", "subtract", "multiply", "divide", "two_step"]
KINDS: tuple[Kind, ...] = get_args(Kind)
Split = Literal["train", "test"]
TEST_FRACTION = 0.2  # share of the question space reserved for the test split (by hash of the text)
DEFAULT_N_TRAIN = 2000
DEFAULT_N_TEST = 200

Record = dict[str, str]

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
