"""The training command line: one typed dataclass, turned into argparse options field by field.

Option names are a contract (SLURM templates, docs and users depend on them). Boolean fields get both
`--name` and `--no_name`.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

from adapters_ds.errors import ArgumentParser, InputError
from adapters_ds.layer import AdapterConfig
from adapters_ds.registry import get_method


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainArgs:
    ds_config: str = _opt(None, "DeepSpeed JSON config (ds_configs/zero3.json, ...)", required=True)
    base_model: str | None = _opt(None, "base model folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    data_path: str | None = _opt(
        None, "JSON/JSONL file of {instruction,input,output} records or a hub dataset (default: built-in problems)"
    )
    output_dir: str = _opt("outputs/run", "run folder: adapter/, checkpoints/, tensorboard/, train_args.json")
    adapter: Literal["lora", "series", "parallel", "gates"] = _opt("lora", "adapter method")
    target_modules: str | None = _opt(None, "comma-separated module names (default: the model family's table)")
    lora_r: int = _opt(32, "LoRA rank")
    lora_alpha: float = _opt(64.0, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = _opt(0.05, "dropout on the LoRA branch")
    bottleneck_size: int = _opt(256, "Series/Parallel bottleneck width")
    non_linearity: str = _opt("tanh", "Series/Parallel activation (any transformers activation name)")
    adapter_dropout: float = _opt(0.0, "dropout on the bottleneck input")
    scaling: str = _opt("1.0", "bottleneck output scale: a number or 'learned'")
    series_preset: Literal["pfeiffer", "houlsby"] = _opt("pfeiffer", "Series placement preset")
    gate_target_sparsity: float = _opt(0.3, "stochastic gates: share of each layer's rows/columns to close")
    gate_lambda: float = _opt(50.0, "stochastic gates: weight of the sparsity penalty in the loss")
    gate_lr: float = _opt(1e-2, "stochastic gates: learning rate of the gates (LoRA inside them uses --learning_rate)")
    gate_lora_r: int = _opt(0, "stochastic gates: rank of LoRA inside the gates (0: gates only)")
    gate_penalty_steps: int = _opt(0, "stochastic gates: steps with the sparsity penalty, then task loss only (0: all)")
    gate_scope: Literal["all", "mlp"] = _opt(
        "all", "stochastic gates: rows and columns of every target (all), or only the MLP units export removes (mlp)"
    )
    num_epochs: int = _opt(3, "epochs over the training split (ignored when --max_steps > 0)")
    max_steps: int = _opt(-1, "optimizer steps to run; overrides --num_epochs when > 0")
    learning_rate: float = _opt(3e-4, "peak learning rate")
    lr_scheduler: Literal["linear", "cosine", "constant"] = _opt("linear", "decay after warmup")
    warmup_ratio: float = _opt(0.0, "share of the steps spent warming up linearly from 0")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 disables)")
    micro_batch_size: int = _opt(4, "examples per rank per forward")
    batch_size: int = _opt(16, "global examples per optimizer step (gradient accumulation fills the gap)")
    cutoff_len: int = _opt(256, "maximum tokens per example (prompt + response)")
    val_set_size: float = _opt(0, "validation examples held out of the data (count, or a fraction < 1)")
    train_on_inputs: bool = _opt(True, "train on the prompt tokens too (--no_train_on_inputs masks them)")
    group_by_length: bool = _opt(False, "batch examples of similar length together (less padding)")
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward to save memory")
    template: Literal["alpaca", "chat"] = _opt("alpaca", "prompt template: Alpaca, or the tokenizer's chat template")
    eval_limit: int = _opt(200, "with the built-in data: held-out problems scored before and after training")
    seed: int = _opt(42, "seed of initialisation, data order and dropout")
    logging_steps: int = _opt(10, "log to the terminal and TensorBoard every N steps")
    eval_steps: int = _opt(200, "validation loss every N steps (needs --val_set_size)")
    save_steps: int = _opt(200, "checkpoint every N steps (0: only at the end)")
    save_total_limit: int = _opt(3, "checkpoints kept (oldest pruned)")
    resume: str | None = _opt(None, "'auto' (newest complete checkpoint in output_dir) or a checkpoint path")
    overwrite_output_dir: bool = _opt(False, "start over in a non-empty output_dir (its contents are deleted)")
    trust_remote_code: bool = _opt(False, "allow code shipped with a model repository to run")
    allow_pickle: bool = _opt(
        False,
        "allow pickle files, which can run code when loaded: a base model's .bin/.pt weights, and a --resume "
        "checkpoint outside output_dir (DeepSpeed's engine files are pickles)",
    )
    max_nonfinite_steps: int = _opt(
        5, "a step with a non-finite loss is skipped (no update); stop after this many in a row"
    )
    dist_timeout: float = _opt(600.0, "seconds a collective waits for the other ranks before the run fails")
    local_rank: int = _opt(-1, "set by the deepspeed launcher; ignored (LOCAL_RANK is read from the environment)")

    def __post_init__(self) -> None:
        positive = ("micro_batch_size", "batch_size", "cutoff_len", "logging_steps", "eval_steps", "num_epochs")
        positive += ("max_nonfinite_steps", "dist_timeout")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"--{name} must be >= 1, found {getattr(self, name)}")
        for name in ("save_steps", "save_total_limit", "weight_decay", "max_grad_norm", "val_set_size"):
            if getattr(self, name) < 0:
                raise InputError(f"--{name} must be >= 0, found {getattr(self, name)}")
        if self.val_set_size >= 1:  # a count (argparse reads every value as a float)
            if self.val_set_size != int(self.val_set_size):
                raise InputError(f"--val_set_size must be a count or a fraction < 1, found {self.val_set_size}")
            self.val_set_size = int(self.val_set_size)
        if not 0 <= self.warmup_ratio < 1:
            raise InputError(f"--warmup_ratio must be in [0, 1), found {self.warmup_ratio}")
        if self.learning_rate <= 0:
            raise InputError(f"--learning_rate must be > 0, found {self.learning_rate}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Which command-line option feeds which field of each method's config. A new method adds a line here.
ADAPTER_OPTIONS: dict[str, dict[str, str]] = {
    "lora": {"r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout"},
    "series": {
        "bottleneck_size": "bottleneck_size",
        "non_linearity": "non_linearity",
        "dropout": "adapter_dropout",
        "scaling": "scaling",
        "preset": "series_preset",
    },
    "parallel": {
        "bottleneck_size": "bottleneck_size",
        "non_linearity": "non_linearity",
        "dropout": "adapter_dropout",
        "scaling": "scaling",
    },
    "gates": {
        "target_sparsity": "gate_target_sparsity",
        "sparsity_lambda": "gate_lambda",
        "gate_lr": "gate_lr",
        "lora_r": "gate_lora_r",
        "scope": "gate_scope",
        "penalty_steps": "gate_penalty_steps",
    },
}


def adapter_config(args: TrainArgs) -> AdapterConfig:
    values = {field: getattr(args, option) for field, option in ADAPTER_OPTIONS[args.adapter].items()}
    return get_method(args.adapter).config(target_modules=args.target_modules, **values)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Fine-tune a causal LM with an adapter on DeepSpeed.")
    hints = get_type_hints(TrainArgs)
    for f in dataclasses.fields(TrainArgs):
        hint, flag, help_text = hints[f.name], f"--{f.name}", f.metadata["help"]
        if hint is bool:
            parser.add_argument(flag, dest=f.name, action="store_true", default=f.default, help=help_text)
            parser.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", help=argparse.SUPPRESS)
            continue
        kwargs: dict[str, Any] = {
            "default": f.default,
            "help": help_text,
            "required": f.metadata.get("required", False),
        }
        if get_origin(hint) is Literal:
            kwargs["choices"] = get_args(hint)
        else:
            base = [t for t in get_args(hint) if t is not type(None)] or [hint]
            kwargs["type"] = base[0]
        parser.add_argument(flag, **kwargs)
    return parser


def parse_train_args(argv: list[str] | None = None) -> TrainArgs:
    parser = build_parser()
    namespace = parser.parse_args(argv)
    if namespace.data_path is None and namespace.base_model is None:
        from adapters_ds.demo import demo_options

        # argparse fills only attributes the namespace lacks: options given on the command line still win
        namespace = parser.parse_args(argv, namespace=argparse.Namespace(**demo_options()))
    return TrainArgs(**vars(namespace))
