"""The training command line: one typed dataclass for the run, plus the options of every registered adapter method
(derived from the fields of its config class), turned into argparse options field by field.

Option names are a contract (SLURM templates, docs and users depend on them). Boolean fields get both
`--name` and `--no_name`. `--adapter` takes any registered method, plugins included (`registry.load_plugins`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

from adapters_ds.adapters.base import AdapterConfig
from adapters_ds.adapters.registry import METHODS, get_method, load_plugins
from adapters_ds.conversations import TrainOnTurns
from adapters_ds.errors import ArgumentParser, InputError
from adapters_ds.quantization import QuantSpec, spec_from_args
from adapters_ds.training.attention import AttnChoice
from adapters_ds.training.recipes import config_argv


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainArgs:
    ds_config: str | None = _opt(None, "DeepSpeed JSON config (ds_configs/zero3.json, ...); required to train")
    base_model: str | None = _opt(None, "base model folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    data_path: str | None = _opt(
        None, "JSON/JSONL file of {instruction,input,output} records or a hub dataset (default: built-in problems)"
    )
    output_dir: str = _opt("outputs/run", "run folder: adapter/, checkpoints/, tensorboard/, train_args.json")
    adapter: str = _opt("lora", "adapter method (one of the registered methods)")
    target_modules: str | None = _opt(None, "comma-separated module names (default: the model family's table)")
    num_epochs: int = _opt(3, "epochs over the training split (ignored when --max_steps > 0)")
    max_steps: int = _opt(-1, "optimizer steps to run; overrides --num_epochs when > 0")
    learning_rate: float | None = _opt(
        None, "peak learning rate (default: the method's own, its config's default_learning_rate)"
    )
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
    attn_implementation: AttnChoice = _opt(
        "auto",
        "attention kernel: flash_attention_2 (the flash-attn package's variable-length kernel, CUDA), sdpa (torch's "
        "variable-length kernel on CUDA, else sdpa per packed example), eager (transformers' own, a dense mask), "
        "auto (flash_attention_2 where installed, else sdpa)",
    )
    template: Literal["alpaca", "chat"] = _opt(
        "alpaca",
        "prompt template of Alpaca records: Alpaca, or the tokenizer's chat template (conversations always "
        "use the chat template)",
    )
    chat_template: str | None = _opt(None, "Jinja chat template file, for a model without one (or to replace it)")
    train_on_turns: TrainOnTurns = _opt(
        "all", "conversations: the loss on every assistant turn, or on the last one only (never on other roles)"
    )
    preview_data: int = _opt(0, "print the first N training examples as JSON lines (tokens, trained text); no training")
    report_to: str = _opt(
        "tensorboard", "trackers, comma-separated, through DeepSpeed's monitor: tensorboard, csv, wandb, comet, none"
    )
    config: str | None = _opt(
        None, "YAML or JSON file of options by flag name (or a run's train_args.json); the command line overrides it"
    )
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
    max_replicated_base_share: float = _opt(
        0.05,
        "ZeRO-3: the largest share of the base's elements that may stay whole on every rank (frozen tensors at or "
        "below the persistence threshold; the adapters always do); a run above it stops with an error",
    )
    quantization: Literal["none", "nf4", "fp4", "int8"] = _opt(
        "none",
        "store the frozen base's linear layers in 4 bits (nf4, fp4: QLoRA) or 8 bits (int8); partitioned under "
        "ZeRO-3; computes in the config's dtype",
    )
    double_quant: bool = _opt(False, "with nf4/fp4: store the 4-bit blocks' scales in 8 bits too")
    local_rank: int = _opt(-1, "set by the deepspeed launcher; ignored (LOCAL_RANK is read from the environment)")
    method_options: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})
    """Values of every registered method's options, by flag name (`lora_r`, `bottleneck_size`, ...)."""

    def __post_init__(self) -> None:
        if self.ds_config is None and not self.preview_data:  # a preview only tokenizes
            raise InputError("--ds_config: expected a DeepSpeed JSON config (ds_configs/zero3.json, ...); found none")
        positive = ("micro_batch_size", "batch_size", "cutoff_len", "logging_steps", "eval_steps", "num_epochs")
        positive += ("max_nonfinite_steps", "dist_timeout")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"--{name} must be >= 1, found {getattr(self, name)}")
        for name in ("save_steps", "save_total_limit", "weight_decay", "max_grad_norm", "val_set_size", "preview_data"):
            if getattr(self, name) < 0:
                raise InputError(f"--{name} must be >= 0, found {getattr(self, name)}")
        if self.val_set_size >= 1:  # a count (argparse reads every value as a float)
            if self.val_set_size != int(self.val_set_size):
                raise InputError(f"--val_set_size must be a count or a fraction < 1, found {self.val_set_size}")
            self.val_set_size = int(self.val_set_size)
        if not 0 <= self.warmup_ratio < 1:
            raise InputError(f"--warmup_ratio must be in [0, 1), found {self.warmup_ratio}")
        if not 0 <= self.max_replicated_base_share <= 1:
            raise InputError(f"--max_replicated_base_share must be in [0, 1], found {self.max_replicated_base_share}")
        if self.learning_rate is None:
            self.learning_rate = get_method(self.adapter).config.default_learning_rate
        if self.learning_rate <= 0:
            raise InputError(f"--learning_rate must be > 0, found {self.learning_rate}")
        self.quantization_spec()  # refuses --double_quant without 4-bit quantization

    def quantization_spec(self) -> QuantSpec | None:
        """The base's quantization (`--quantization`, `--double_quant`); None without."""
        return spec_from_args(self.quantization, self.double_quant)

    def __getattr__(self, name: str) -> Any:  # a method option reads like any other: args.lora_r
        options = self.__dict__.get("method_options", {})
        if name in options:
            return options[name]
        raise AttributeError(name)

    def to_dict(self) -> dict[str, Any]:
        """Every option by its flag name, method options included (what train_args.json records)."""
        values = dataclasses.asdict(self)
        return {**values.pop("method_options"), **values}


def method_options() -> dict[str, tuple[type[AdapterConfig], dataclasses.Field]]:
    """Every registered method's command-line options by flag name: (the first config class declaring it, its
    field). Methods sharing a flag must agree on its default."""
    options: dict[str, tuple[type[AdapterConfig], dataclasses.Field]] = {}
    for method in METHODS.values():
        for f in method.config.options():
            flag = method.config.flag(f)
            if flag in options and options[flag][1].default != f.default:
                raise TypeError(f"option --{flag} is declared with different defaults by two adapter methods")
            options.setdefault(flag, (method.config, f))
    return options


def adapter_config(args: TrainArgs) -> AdapterConfig:
    """The chosen method's config from its options on the command line."""
    config_cls = get_method(args.adapter).config
    values = {f.name: args.method_options[config_cls.flag(f)] for f in config_cls.options()}
    return config_cls(target_modules=args.target_modules, **values)


def _add_option(parser: argparse.ArgumentParser, name: str, hint: Any, default: Any, help_text: str, **kw: Any) -> None:
    flag = f"--{name}"
    if hint is bool:
        parser.add_argument(flag, dest=name, action="store_true", default=default, help=help_text)
        parser.add_argument(f"--no_{name}", dest=name, action="store_false", help=argparse.SUPPRESS)
        return
    kwargs: dict[str, Any] = {"default": default, "help": help_text, **kw}
    if get_origin(hint) is Literal:
        kwargs["choices"] = get_args(hint)
    else:
        members = [t for t in get_args(hint) if t is not type(None)] or [hint]
        # a union of a number and a word (scaling: float | "learned") is read as text; the config parses it
        kwargs["type"] = members[0] if len(members) == 1 and members[0] in (int, float, str) else str
    parser.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The training options, then every registered method's options (from their config fields)."""
    parser = ArgumentParser(description="Fine-tune a causal LM with an adapter on DeepSpeed.")
    hints = get_type_hints(TrainArgs)
    for f in dataclasses.fields(TrainArgs):
        if f.metadata.get("cli", True):
            choices = sorted(METHODS) if f.name == "adapter" else None
            extra = {"choices": choices} if choices else {}
            _add_option(parser, f.name, hints[f.name], f.default, f.metadata["help"], **extra,
                        **({"required": True} if f.metadata.get("required") else {}))  # fmt: skip
    group = parser.add_argument_group("adapter method options")
    for flag, (config_cls, f) in method_options().items():
        _add_option(group, flag, get_type_hints(config_cls)[f.name], f.default, f.metadata["help"])
    return parser


def parse_train_args(argv: list[str] | None = None, defaults: dict[str, Any] | None = None) -> TrainArgs:
    """Parse the training command line; `defaults` replace the built-in defaults of options the command line
    does not set (the demo's settings, for instance). A `--config FILE` contributes its options before the command
    line's, which therefore win (`recipes.config_argv`)."""
    load_plugins()
    parser = build_parser()
    argv = config_argv(parser, sys.argv[1:] if argv is None else list(argv))
    namespace = parser.parse_args(argv, namespace=argparse.Namespace(**(defaults or {})))
    values = vars(namespace)
    flags = method_options()
    return TrainArgs(
        **{k: v for k, v in values.items() if k not in flags},
        method_options={k: v for k, v in values.items() if k in flags},
    )
