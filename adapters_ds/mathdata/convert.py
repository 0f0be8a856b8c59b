"""Converters of public math word-problem sets into the training format: GSM8K and MAWPS.

Every record they write is in the LLM-Adapters format that training and evaluation read::

    {"instruction": question, "input": "", "output": rationale ending "The answer is N.", "answer": "N"}

Together, GSM8K's and MAWPS's training files give a math_10k-like training set. The command
`python -m adapters_ds.mathdata convert [--gsm8k FILE] [--mawps FILE] --out FILE` (`adapters_ds.cli.mathdata`)
reads the raw files with `records.read_records` and writes one JSON list.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from adapters_ds.errors import InputError

Record = dict[str, str]


def format_number(value: float) -> str:
    """A number as a model should write it: 8.0 -> "8", 10.333333333333334 -> "10.3333" (6 significant digits).

    Six significant digits keep non-integers within 5e-6 relative error, far inside the harness's tolerance
    (`answers.numbers_match`), without teaching a small model to emit 16-digit float noise; integers stay exact.
    """
    if math.isclose(value, round(value), rel_tol=0.0, abs_tol=1e-9):
        return str(int(round(value)))
    text = f"{value:.6g}"
    return repr(value) if "e" in text else text


_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's "<<48/2=24>>" calculator annotations


def gsm8k_to_records(rows: Iterable[Mapping[str, Any]], source: str = "gsm8k") -> list[Record]:
    """GSM8K rows `{"question", "answer": rationale ending "#### N"}` as training records.

    The calculator annotations are removed (a model trained on them learns to emit them), and "#### N" becomes a
    final "The answer is N." (the phrase the built-in problems and the answer extractor use); thousands separators are
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
_AST_OPS: dict[type, tuple[str, Callable[[float, float], float]]] = {
    ast.Add: ("+", operator.add),
    ast.Sub: ("-", operator.sub),
    ast.Mult: ("*", operator.mul),
    ast.Div: ("/", operator.truediv),
}


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
            op, apply = _AST_OPS[type(node.op)]
            if a is None or b is None or (op == "/" and b == 0):
                return None
            result = apply(a, b)
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
