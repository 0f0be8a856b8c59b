"""The export command: a trained adapter for use outside adapters_ds.

    python launcher/export.py --base_model B --adapter_dir A --output_dir O --peft|--merge|--prune [--uniform_shapes]
                              [--prune_width_multiple 64]

- `--peft`: an adapter of a method Hugging Face PEFT has (LoRA, prefix, prompt, ptuning: `AdapterConfig.peft_type`)
  in PEFT's format; `peft.PeftModel.from_pretrained(base, out)` gives the same outputs as our adapted model.
- `--merge`: a mergeable adapter (LoRA) folded into the base weights, written as a plain Hugging Face model folder.
- `--prune`: a pruning adapter (stochastic gates) folded into the base and the closed rows, columns and heads cut out:
  a physically smaller model (`--uniform_shapes` pads all layers to one shape so that plain
  `AutoModelForCausalLM.from_pretrained` loads it; `--prune_width_multiple` rounds each layer's kept MLP width up to
  a multiple of 64 by default, with closed units whose outputs are zero, for the matmul kernels).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adapters_ds.distributed import closing_distributed
from adapters_ds.errors import ArgumentParser, InputError, run_main
from adapters_ds.export.merged import export_merged
from adapters_ds.export.peft import export_peft
from adapters_ds.export.pruned import WIDTH_MULTIPLE, export_pruned
from adapters_ds.fileio import check_output_dir
from adapters_ds.hardware import CHECKPOINT, DTYPE_NAMES
from adapters_ds.quantization import add_quantization_options, spec_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="launcher/export.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base_model", required=True, help="base model folder or hub id the adapter was trained on")
    parser.add_argument("--adapter_dir", required=True, help="adapter folder written by training (output_dir/adapter)")
    parser.add_argument("--output_dir", required=True)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--peft", action="store_true", help="write a Hugging Face PEFT adapter (LoRA, prefix, prompt, ptuning)"
    )
    mode.add_argument("--merge", action="store_true", help="write the base model with LoRA merged in")
    mode.add_argument("--prune", action="store_true", help="write the smaller model a gates adapter prunes to")
    parser.add_argument(
        "--uniform_shapes",
        action="store_true",
        help="with --prune: give every layer the same (largest kept) shapes, loadable by plain transformers",
    )
    parser.add_argument(
        "--prune_width_multiple",
        type=int,
        help=f"with --prune: round each layer's kept MLP width up to a multiple of this (at most the full width) "
        f"with closed units whose outputs are zero, so the export stays exact (default {WIDTH_MULTIPLE}; 1: off)",
    )
    parser.add_argument(
        "--dtype",
        choices=(CHECKPOINT, *DTYPE_NAMES),
        default=CHECKPOINT,
        help="with --prune: dtype of the written model (checkpoint: the base checkpoint's; float32 keeps outputs "
        "exact; auto: bf16 where the hardware computes it natively, else fp32)",
    )
    add_quantization_options(
        parser,
        "with --merge or --prune: the training run's --quantization (fold into the dequantized weights it "
        "trained against)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Exit code 0, or 2 with one `error: ...` line on bad input. Without `argv` (the process's own command line)
    and with a process group started (under a launcher), the process ends here, the group ended first
    (`distributed.closing_distributed`)."""

    def run() -> None:
        args = parse_args(argv)
        out = Path(args.output_dir)
        check_output_dir(out, allowed=args.overwrite)
        if (
            args.uniform_shapes or args.dtype != CHECKPOINT or args.prune_width_multiple is not None
        ) and not args.prune:
            raise InputError("--uniform_shapes, --prune_width_multiple and --dtype only apply to --prune")
        multiple = WIDTH_MULTIPLE if args.prune_width_multiple is None else args.prune_width_multiple
        if multiple < 1:
            raise InputError(f"--prune_width_multiple must be >= 1 (1: no rounding), found {multiple}")
        quantization = spec_from_args(args.quantization, args.double_quant)
        if quantization is not None and args.peft:
            raise InputError("--quantization applies to --merge and --prune (a PEFT adapter is the same either way)")
        if args.prune:
            record = export_pruned(
                args.base_model, args.adapter_dir, args.output_dir, uniform=args.uniform_shapes, dtype=args.dtype,
                quantization=quantization, width_multiple=multiple,
            )  # fmt: skip
            counts = record["parameters"]
            print(
                f"removed {counts['removed']:,} of {counts['base']:,} parameters "
                f"({100 * counts['removed_fraction']:.1f} %; {100 * counts['blocks_removed_fraction']:.1f} % of the "
                f"blocks; {100 * counts['blocks_removed_fraction_unpadded']:.1f} % without the "
                f"{counts['width_padding_units']:,} closed MLP units kept to round widths to multiples of {multiple}); "
                f"loads with plain transformers: {record['loads_with_transformers']}"
            )
        elif args.peft:
            export_peft(args.base_model, args.adapter_dir, args.output_dir)
        else:
            export_merged(args.base_model, args.adapter_dir, args.output_dir, quantization)
        print(f"wrote {out}")

    with closing_distributed(exit_process=argv is None):
        run_main(run)
