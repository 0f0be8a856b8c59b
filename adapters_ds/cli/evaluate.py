"""Evaluate a base model (plus a trained adapter) on math and commonsense benchmarks in the LLM-Adapters format.

    python launcher/evaluate.py --base_model PATH [--adapter_dir DIR[,DIR...]] --datasets AddSub,gsm8k,AQuA \\
        --data_dir DIR --output_dir DIR[,DIR...] [--batch_size 32] [--max_new_tokens 256] [--num_beams 1] [--limit N] \\
        [--train_data FILE] [--overwrite] [--no_merge] [--template alpaca|chat] [--chat_template FILE]
        [--dtype auto|bfloat16|float32|float16] [--quantization nf4|fp4|int8 [--double_quant]]
        [--label_scoring | --compare_label_scoring] [--label_lead TEXT] [--tensor_parallel N|auto]

Several adapters for one base (`--adapter_dir a,b,c --output_dir oa,ob,oc`) are scored in turn on one loaded base,
each into its own folder, with the results of separate runs (`adapters_ds.evaluation.loading`).

Commonsense sets (BoolQ, PIQA, ARC, ...) are label tasks: each record's instruction ends with an `Answer format:` line
listing its labels (`adapters_ds.evaluation.labels`). They are generated and scored like the others, or with
`--label_scoring` scored by ranking the labels' log-likelihood after the prompt (one forward per batch, no
generation); `--compare_label_scoring` does both and reports their agreement. Numeric and AQuA sets always generate.

Also `adapters-ds-evaluate ...`, and under `deepspeed --num_gpus N`, torchrun, srun or mpirun, where the ranks share
the generation and the results are those of one process (`adapters_ds.evaluation.harness`). A model too large for one
device: `--tensor_parallel N` shards it over groups of N ranks (DeepSpeed AutoTP; the groups share the questions),
`--tensor_parallel auto` picks the smallest N whose shard fits (`adapters_ds.evaluation.tensor_parallel`).

An adapter trained on a quantized base (`train --quantization`): `--quantization` (and `--double_quant`) as in
training quantizes the base after loading, so the device holds the quantized base and the adapter computes on the
weights it was trained against (unmerged); the rows are those of the model `export --merge --quantization` writes.
Not with `--tensor_parallel` (refused).

Data: `<data_dir>/<name>/test.json` per data set (`adapters_ds.evaluation.datasets`). Outputs in `--output_dir`
(`adapters_ds.evaluation.results`): `<name>.jsonl` (one row per example, written as batches finish: a killed run
resumes where it stopped when rerun), `eval_settings.json` (a rerun with other settings into the same folder is
refused), `summary.json` and `summary.md` (accuracy per data set and the mean per suite, math and commonsense; with
`--train_data`, how many test questions occur in the training file). The table is also printed. Bad input: one
`error: ...` line, exit code 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from adapters_ds.distributed import closing_distributed
from adapters_ds.errors import ArgumentParser, InputError, run_main
from adapters_ds.evaluation.harness import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, evaluate
from adapters_ds.hardware import DTYPE_NAMES
from adapters_ds.prompts import TEMPLATES
from adapters_ds.quantization import add_quantization_options, spec_from_args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command's options, checked; `dataset_names` holds the names of `--datasets`."""
    parser = ArgumentParser(
        prog="launcher/evaluate.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--base_model", required=True, help="base model folder or hub id")
    parser.add_argument(
        "--adapter_dir",
        help="adapter folder written by training (<output_dir>/adapter); several, comma-separated, are scored in turn "
        "on one loaded base (one --output_dir each)",
    )
    parser.add_argument("--datasets", required=True, help="comma-separated names of folders in --data_dir")
    parser.add_argument("--data_dir", required=True, help="folder of <name>/test.json files (LLM-Adapters format)")
    parser.add_argument(
        "--output_dir", required=True, help="where <name>.jsonl and the summaries go (comma-separated: one per adapter)"
    )
    parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="prompts per generate call")
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--num_beams", type=int, default=1, help="1: greedy; more: beam search")
    parser.add_argument("--limit", type=int, help="evaluate only the first N examples of each data set")
    parser.add_argument("--train_data", help="training file (JSON/JSONL) to count contaminated test questions")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier results in output_dir")
    parser.add_argument("--no_merge", action="store_true", help="keep LoRA unmerged (slower; same outputs)")
    parser.add_argument("--template", choices=TEMPLATES, default="alpaca", help="prompt template, as in training")
    parser.add_argument("--chat_template", help="Jinja chat template file, as in training (for a model without one)")
    parser.add_argument(
        "--dtype", choices=DTYPE_NAMES, default="auto", help="auto: bf16 where the hardware has it, else fp32"
    )
    add_quantization_options(
        parser,
        "quantize the base's linear layers (but the output head) after loading, as the training run's "
        "--quantization did; adapters stay unmerged on it",
    )
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument(
        "--label_scoring",
        action="store_true",
        help="label tasks: rank the allowed labels by log-likelihood instead of generating",
    )
    modes.add_argument(
        "--compare_label_scoring",
        action="store_true",
        help="label tasks: generate and rank the labels; report both accuracies and their agreement",
    )
    parser.add_argument(
        "--label_lead",
        help="text scored before each label (default: what the records' outputs put before their label, e.g. "
        "'the correct answer is '; '' for none)",
    )
    parser.add_argument(
        "--tensor_parallel",
        default="1",
        help="ranks per model copy: N shards the model over groups of N ranks (N divides the ranks and the "
        "attention heads), auto takes the smallest N whose shard fits a rank's memory (default 1)",
    )
    parser.add_argument(
        "--local_rank", type=int, default=-1, help="set by the deepspeed launcher; ignored (LOCAL_RANK is read)"
    )
    args = parser.parse_args(argv)
    args.tensor_parallel = _tensor_parallel(args.tensor_parallel)
    args.quantization_spec = spec_from_args(args.quantization, args.double_quant)  # refuses a lone --double_quant
    if args.quantization_spec is not None and args.tensor_parallel != 1:
        raise InputError("--tensor_parallel works on an unquantized base only; evaluate with --quantization without it")
    for name in ("batch_size", "max_new_tokens", "num_beams", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name}: expected a positive integer; found {value}")
    names = [name.strip() for name in args.datasets.split(",") if name.strip()]
    if not names:
        raise InputError(f"--datasets: expected comma-separated data set names; found {args.datasets!r}")
    if len(set(names)) != len(names):
        raise InputError(f"--datasets: expected each name once; found {names}")
    args.dataset_names = names
    args.adapter_dirs = _adapters_and_outputs(args)
    return args


def _adapters_and_outputs(args: argparse.Namespace) -> list[str | None]:
    """--adapter_dir's folders (one None without it), with `args.output_dirs` set to --output_dir's, one each."""
    adapters = [a.strip() for a in args.adapter_dir.split(",")] if args.adapter_dir else [None]
    outputs = [o.strip() for o in args.output_dir.split(",")] if len(adapters) > 1 else [args.output_dir]
    if args.adapter_dir is not None and (not all(adapters) or len(set(adapters)) != len(adapters)):
        raise InputError(f"--adapter_dir: expected distinct comma-separated folders; found {args.adapter_dir!r}")
    if len(outputs) != len(adapters) or not all(outputs) or len(set(outputs)) != len(outputs):
        raise InputError(
            f"--output_dir: expected one distinct folder per --adapter_dir ({len(adapters)}); found {args.output_dir!r}"
        )
    args.output_dirs = outputs
    if len(adapters) == 1:
        args.adapter_dir = adapters[0]
    return adapters


def _tensor_parallel(value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise InputError(f"--tensor_parallel: expected a positive integer or 'auto'; found {value!r}")
    return int(value)


def main(argv: Sequence[str] | None = None) -> None:
    """The evaluation command: exit code 0, or 2 with one `error: ...` line on bad input. Without `argv` (the
    process's own command line) and with a process group started (under a launcher), the process ends here, the
    group ended first (`distributed.closing_distributed`)."""
    with closing_distributed(exit_process=argv is None):
        run_main(lambda: evaluate(parse_args(argv)))
