"""The training command.

    deepspeed [--num_gpus N] launcher/train.py --ds_config ds_configs/zero3.json [--base_model M --data_path D ...]

With neither --base_model nor --data_path it is the demo (the main job): the embedded SmolLM2-135M-Instruct trained
on the built-in arithmetic problems, with the demo's defaults for the options the command line does not set, then the
accuracy gain on their held-out split. Otherwise both are needed: one without the other is an error, never a silent
fallback to the demo's model or data.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from adapters_ds.cli.output import quiet_third_party
from adapters_ds.demo.default_model import prepare_default_model
from adapters_ds.demo.gain import demo_options, report_gain, training_records
from adapters_ds.distributed import closing_distributed, launched_rank
from adapters_ds.errors import InputError, run_main
from adapters_ds.modeling import load_tokenizer
from adapters_ds.training.args import parse_train_args
from adapters_ds.training.data import preview, training_examples
from adapters_ds.training.trainer import train


def run(argv: Sequence[str] | None = None) -> None:
    quiet_third_party()
    argv = None if argv is None else list(argv)
    args = parse_train_args(argv)
    demo = args.base_model is None and args.data_path is None
    if not demo and (args.base_model is None or args.data_path is None):
        given, missing = ("--base_model", "--data_path") if args.data_path is None else ("--data_path", "--base_model")
        raise InputError(f"{given} needs {missing} too (the built-in demo runs only when neither is given)")
    if demo:
        args = parse_train_args(argv, defaults=demo_options())  # options on the command line still win
    base_model = str(prepare_default_model()) if demo else args.base_model  # file-locked: one rank converts
    records = training_records() if demo else None
    if args.preview_data:  # the examples as the loss sees them, then exit without training
        tokenizer = load_tokenizer(base_model, trust_remote_code=args.trust_remote_code)
        tokenized = training_examples(tokenizer, args, records)[1]
        if launched_rank() == 0:  # under a launcher, one rank prints
            for example in preview(tokenized, tokenizer, args.preview_data):
                print(json.dumps(example, ensure_ascii=False), flush=True)
        return
    adapter_dir = train(args, base_model, records)
    if demo:
        report_gain(args, base_model, adapter_dir)


def main(argv: Sequence[str] | None = None) -> None:
    """Exit code 0, 2 with one `error: ...` line on bad input, 75 after a checkpoint on SIGUSR1/SIGTERM. Without
    `argv` (the process's own command line) the process ends here, its process group ended first
    (`distributed.closing_distributed`)."""
    with closing_distributed(exit_process=argv is None):
        run_main(lambda: run(argv))
