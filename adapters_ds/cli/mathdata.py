"""Write math training data as a JSON list of LLM-Adapters records: built-in problems or converted GSM8K / MAWPS.

    python -m adapters_ds.mathdata synth --out FILE [--n N --seed S --split train|test]
    python -m adapters_ds.mathdata convert [--gsm8k FILE] [--mawps FILE] --out FILE
    python -m adapters_ds.mathdata commonsense --data_dir DIR --out FILE [--datasets A,B] [--test_dir DIR]
        [--decontaminate] [--report FILE]

`synth` writes generated arithmetic word problems (`adapters_ds.demo.problems`) of one split; `convert` turns a
GSM8K file (JSON Lines of {question, answer ending "#### N"}) and/or a MAWPS file (JSON list of {original_text,
equation, ans}) into one training file (`adapters_ds.mathdata.convert`); `commonsense` merges the train splits of
label tasks (`<data_dir>/<name>/train.json`) into one training mix, deduplicated, and prints per-source counts and
how many questions of each `<test_dir>/<name>/test.json` occur in it (`adapters_ds.mathdata.commonsense`). The output
is written atomically; bad input: one `error: ...` line, exit code 2, nothing written.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import get_args

from adapters_ds.demo.problems import DEFAULT_N_TEST, DEFAULT_N_TRAIN, Split, generate_records
from adapters_ds.errors import ArgumentParser, InputError, run_main
from adapters_ds.fileio import write_json
from adapters_ds.mathdata.commonsense import commonsense_mix, format_report
from adapters_ds.mathdata.convert import gsm8k_to_records, mawps_to_records
from adapters_ds.records import read_records

PROG = "python -m adapters_ds.mathdata"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
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
    mix = commands.add_parser("commonsense", help="merge commonsense train splits into one deduplicated training mix")
    mix.add_argument("--data_dir", required=True, help="folder of <name>/train.json (and test.json) files")
    mix.add_argument("--datasets", help="comma-separated names of folders in --data_dir (default: all with train.json)")
    mix.add_argument("--test_dir", help="folder of <name>/test.json to check contamination against (default data_dir)")
    mix.add_argument("--decontaminate", action="store_true", help="drop training records holding a test question")
    mix.add_argument("--report", help="also write the report (counts per source and test set) to this .json file")
    mix.add_argument("--out", required=True, help="output .json file")
    return parser.parse_args(argv)


def records_for(args: argparse.Namespace) -> list[dict[str, str]]:
    """The records the parsed command asks for."""
    if args.command == "synth":
        n = args.n if args.n is not None else (DEFAULT_N_TRAIN if args.split == "train" else DEFAULT_N_TEST)
        return generate_records(n, args.seed, args.split)
    if not args.gsm8k and not args.mawps:
        raise InputError("convert: expected at least one of --gsm8k FILE and --mawps FILE, found neither")
    records = []
    if args.gsm8k:
        records += gsm8k_to_records(read_records(args.gsm8k, "gsm8k"), source=args.gsm8k)
    if args.mawps:
        records += mawps_to_records(read_records(args.mawps, "mawps"), source=args.mawps)
    return records


def run(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "commonsense":
        names = None
        if args.datasets is not None:
            names = [name.strip() for name in args.datasets.split(",") if name.strip()]
            if not names or len(set(names)) != len(names):
                raise InputError(f"--datasets: expected distinct comma-separated names; found {args.datasets!r}")
        records, report = commonsense_mix(args.data_dir, names, args.test_dir, args.decontaminate)
        write_json(args.out, records)
        if args.report:
            write_json(args.report, report)
        print(format_report(report), end="")
    else:
        records = records_for(args)
        write_json(args.out, records)
    print(f"wrote {len(records)} records to {args.out}")


def main(argv: Sequence[str] | None = None) -> None:
    """The command: exit code 0, or 2 with one `error: ...` line on bad input."""
    run_main(lambda: run(argv))
