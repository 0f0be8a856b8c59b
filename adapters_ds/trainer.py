"""The training run on DeepSpeed's engine, top to bottom.

args → distributed init → ds_config resolved → base model loaded under ZeRO-3 init (partitioned while
loading) → frozen → adapters injected → persistence threshold set so adapters stay replicated →
`deepspeed.initialize` → loop (forward, backward, step, log, checkpoint) → adapter gathered and saved.

The loss of a step is the mean over every target token of the global batch (all ranks, all accumulated
micro-batches), not a mean of per-micro-batch means: that makes the gradient independent of how the batch
is split across ranks and accumulation steps, so 2 ranks × m examples train exactly like 1 rank × 2m.

A step whose loss is not finite on any rank (in any micro-batch) is skipped: every rank learns it before the
update, which is then dropped (`Trainer.train_step`), so the adapter weights and the optimizer state stay
bit-identical. Skipped steps are counted (`train/nonfinite_steps`); `--max_nonfinite_steps` of them in a row stop
the run with an error, leaving the checkpoints as they are.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import signal
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import datasets
import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm
from transformers import set_seed

from adapters_ds.checkpoint import (
    check_checkpoint,
    checkpoint_root,
    complete_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from adapters_ds.data import (
    IGNORE_INDEX,
    BatchPlan,
    collate,
    collate_packed,
    count_tokens,
    load_records,
    split_validation,
    tokenize_records,
)
from adapters_ds.distributed import DistInfo, barrier, init_distributed
from adapters_ds.ds_config import (
    check_replication,
    compute_dtype,
    load_ds_config,
    resolve_ds_config,
    set_persistence_threshold,
    without_persistence_threshold,
    zero_stage,
)
from adapters_ds.errors import InputError
from adapters_ds.fileio import atomic_write_text, check_writable_dir, write_json
from adapters_ds.inject import adapter_parameters, freeze_base, inject_adapters, parameter_report
from adapters_ds.loss import causal_lm_loss_sum
from adapters_ds.modeling import check_causal_lm, load_base_model, load_tokenizer
from adapters_ds.packing import enable_packing
from adapters_ds.storage import save_adapter
from adapters_ds.train_args import TrainArgs, adapter_config, parse_train_args
from adapters_ds.zero import full_numel


@contextlib.contextmanager
def main_first(info: DistInfo) -> Iterator[None]:
    """Rank 0 runs the block first (downloads, dataset cache), the others then reuse its result."""
    if not info.is_main:
        barrier()
    yield
    if info.is_main:
        barrier()


def check_ds_config(config: dict) -> None:
    """Let DeepSpeed validate the resolved config now: an unknown key would otherwise surface as a traceback from
    inside model loading or `deepspeed.initialize`, after the output folder was made."""
    import pydantic
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS, DeepSpeedConfig, DeepSpeedConfigError

    try:
        name = DeepSpeedConfig(without_persistence_threshold(config)).optimizer_name
    except pydantic.ValidationError as exc:
        found = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InputError(
            f"ds_config is not valid for DeepSpeed {deepspeed.__version__} ({exc.title}): {found}"
        ) from None
    except (DeepSpeedConfigError, AssertionError, ValueError) as exc:
        raise InputError(f"ds_config is not valid for DeepSpeed {deepspeed.__version__}: {exc}") from None
    if name is not None and name not in DEEPSPEED_OPTIMIZERS and getattr(torch.optim, name, None) is None:
        raise InputError(  # DeepSpeed itself would only fail in deepspeed.initialize
            f"ds_config optimizer type {name!r} is neither a DeepSpeed optimizer {DEEPSPEED_OPTIMIZERS} "
            "nor a torch.optim class"
        )


def check_resume_source(args: TrainArgs) -> None:
    """DeepSpeed's engine checkpoints are pickles (loading one can run code): load those this run's output_dir
    holds (written by this tool), others only with --allow_pickle."""
    if args.resume in (None, "auto") or args.allow_pickle:
        return
    if not Path(args.resume).resolve().is_relative_to(Path(args.output_dir).resolve()):
        raise InputError(
            f"--resume {args.resume!r} lies outside --output_dir {args.output_dir!r}; DeepSpeed checkpoints are "
            "pickle files, which can run code when loaded: pass --allow_pickle if you trust it"
        )


def trim_log(path: Path, step: int) -> None:
    """Keep the log lines of steps up to `step`: a resumed run redoes the later ones (a kill may also have cut the
    last line short)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def check_output_dir(args: TrainArgs) -> bool:
    """Refuse a non-empty output_dir unless resuming or overwriting; returns whether it is non-empty."""
    out = Path(args.output_dir)
    check_writable_dir(out)
    non_empty = out.is_dir() and any(out.iterdir())
    if non_empty and not (args.resume or args.overwrite_output_dir):
        raise InputError(
            f"output_dir {str(out)!r} is not empty; pass --resume auto to continue or --overwrite_output_dir"
        )
    return non_empty


def create_output_dir(args: TrainArgs, info: DistInfo, non_empty: bool) -> Path:
    """Called once all input is validated, so bad input never leaves a folder behind."""
    out = Path(args.output_dir)
    barrier()  # every rank has checked before rank 0 changes anything
    if info.is_main:
        if non_empty and args.overwrite_output_dir and not args.resume:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    return out


def resolve_base_model(args: TrainArgs) -> str:
    if args.base_model:
        return args.base_model
    from adapters_ds.default_model import prepare_default_model  # file-locked: one process converts, others wait

    return str(prepare_default_model())


def load_training_data(args: TrainArgs, tokenizer, info: DistInfo) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    with main_first(info):
        if args.data_path:
            records = load_records(args.data_path)
        else:
            from adapters_ds.mathdata import default_splits

            records = datasets.Dataset.from_list(default_splits(seed=0)[0])
        tokenized = tokenize_records(records, tokenizer, args.cutoff_len, args.train_on_inputs, args.template)
    return split_validation(tokenized, args.val_set_size, args.seed)


def target_counts(dataset: datasets.Dataset) -> list[int]:
    """Tokens each example contributes to the loss (labels after the causal shift that are not ignored)."""
    return [sum(1 for label in labels[1:] if label != IGNORE_INDEX) for labels in dataset["labels"]]


def partition_report(model: torch.nn.Module) -> dict[str, int]:
    """Elements of base and adapter parameters this rank holds, and their full sizes."""
    adapter_ids = {id(p) for p in adapter_parameters(model).values()}
    report = dict.fromkeys(("base_local_numel", "base_numel", "adapter_local_numel", "adapter_numel"), 0)
    for p in model.parameters():
        kind = "adapter" if id(p) in adapter_ids else "base"
        # a persistent parameter is gathered once at its first use and then stays whole on every rank
        resident = full_numel(p) if getattr(p, "ds_persist", True) else p.ds_tensor.numel()
        report[f"{kind}_local_numel"] += resident
        report[f"{kind}_numel"] += full_numel(p)
    return report


def lr_lambda(step: int, warmup: int, total: int, kind: str) -> float:
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def peak_memory_gb() -> float:
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return accelerator.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def load_model(base_model: str, ds_config: dict, args: TrainArgs):
    """The base model, partitioned while loading under ZeRO-3. Returns (model, the ZeRO-3 context to keep alive)."""
    hf_ds_config = None
    if zero_stage(ds_config) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # must stay referenced until deepspeed.initialize
        hf_ds_config = HfDeepSpeedConfig(without_persistence_threshold(ds_config))
    model = load_base_model(
        base_model,
        dtype=compute_dtype(ds_config),
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
    )
    model.config.use_cache = False
    return model, hf_ds_config


EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL, "try again later": the SLURM launch script requeues on it


class StopSignal:
    """Records SIGUSR1 (SLURM's warning before the time limit) and SIGTERM (preemption, scancel); the loop
    checkpoints at the next step boundary and exits, and the requeued job resumes with `--resume auto`."""

    def __init__(self) -> None:
        self.received: str | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum).name


class Trainer:
    def __init__(self, args: TrainArgs) -> None:
        self.args = args
        self.stop = StopSignal()
        self.regularizer_metrics: dict[str, float] = {}  # latest scalars of the method's extra loss term
        self.info = init_distributed(timeout_s=args.dist_timeout)
        set_seed(args.seed)
        raw = load_ds_config(args.ds_config)
        self.ds_config = resolve_ds_config(
            raw,
            world_size=self.info.world_size,
            micro_batch_size=args.micro_batch_size,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm,
        )
        check_ds_config(self.ds_config)
        self.ds_config.setdefault(
            "tensorboard",
            {"enabled": True, "output_path": str(Path(args.output_dir) / "tensorboard"), "job_name": "train"},
        )
        self.adapter_config = adapter_config(args)
        non_empty = check_output_dir(args)
        check_resume_source(args)
        self.resume_from = resolve_resume(args.resume, args.output_dir)
        if self.resume_from is not None:
            check_checkpoint(self.resume_from, self.info)
        self.base_model = resolve_base_model(args)
        check_causal_lm(self.base_model, args.trust_remote_code)  # before the tokenizer and the data
        self.tokenizer = load_tokenizer(self.base_model, trust_remote_code=args.trust_remote_code)
        self.train_set, self.val_set = load_training_data(args, self.tokenizer, self.info)
        self.targets = target_counts(self.train_set)
        self.ga = self.ds_config["gradient_accumulation_steps"]
        self.plan = BatchPlan(
            lengths=self.train_set["length"],
            micro_batch_size=args.micro_batch_size,
            world_size=self.info.world_size,
            rank=self.info.rank,
            seed=args.seed,
            group_by_length=args.group_by_length,
        )
        self.steps_per_epoch = self.plan.micro_batches_per_epoch // self.ga
        if self.steps_per_epoch == 0:
            raise InputError(
                f"the training split has {len(self.train_set)} examples, fewer than one step of --batch_size "
                f"{args.batch_size}"
            )

        model, hf_ds_config = load_model(self.base_model, self.ds_config, args)
        self.pack = enable_packing(model)  # micro-batches as one packed row: no compute spent on padding
        inject_adapters(model, self.adapter_config)
        freeze_base(model)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        set_persistence_threshold(self.ds_config, model)
        self.log(parameter_report(model))
        self.out = create_output_dir(args, self.info, non_empty)

        self.total_steps = args.max_steps if args.max_steps > 0 else args.num_epochs * self.steps_per_epoch
        warmup = math.ceil(args.warmup_ratio * self.total_steps)
        schedule = partial(lr_lambda, warmup=warmup, total=self.total_steps, kind=args.lr_scheduler)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=self.adapter_config.param_groups(model, args.learning_rate),
            config=self.ds_config,
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
        )
        del hf_ds_config  # loading is done; the engine holds the ZeRO-3 state from here on
        if zero_stage(self.ds_config) == 3:
            check_replication(self.engine.module)
            self.write_partition_report()
        self.device = self.engine.device
        # ZeRO's optimizers and DeepSpeed's bf16/fp16 wrappers drop a step whose gradients are not finite (their
        # "overflow"); without them the engine steps a plain torch-style optimizer
        self.drops_overflow = hasattr(self.engine.optimizer, "overflow")
        if self.info.is_main:
            write_json(
                self.out / "train_args.json",
                {
                    "args": args.to_dict(),
                    "base_model": self.base_model,
                    "ds_config": self.ds_config,
                    "world_size": self.info.world_size,
                },
            )

    def write_partition_report(self) -> None:
        """Per-rank resident parameter elements under ZeRO-3 (`zero3_partition.json`): proof that the base is
        partitioned and the adapters are not, and the memory each rank holds."""
        mine = partition_report(self.engine.module)
        reports = [None] * self.info.world_size
        torch.distributed.all_gather_object(reports, mine)
        if self.info.is_main:
            write_json(self.out / "zero3_partition.json", reports)
            base = reports[0]
            self.log(
                f"ZeRO-3: base {base['base_local_numel']:,} of {base['base_numel']:,} elements resident per rank, "
                f"adapters {base['adapter_local_numel']:,} of {base['adapter_numel']:,} (replicated)"
            )

    def log(self, message: str) -> None:
        if self.info.is_main:
            tqdm.write(message)

    def batch(self, indices: list[int], dataset: datasets.Dataset | None = None) -> dict[str, torch.Tensor]:
        features = [(self.train_set if dataset is None else dataset)[i] for i in indices]
        # one packed row where the model keeps packed examples apart: no compute is spent on padding
        collated = collate_packed(features) if self.pack else collate(features, self.tokenizer.pad_token_id)
        return {k: v.to(self.device) for k, v in collated.items()}

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over `ga` micro-batches; returns the global mean token loss and counts, and whether
        the step was skipped for a non-finite loss."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        micro_batches = self.plan.micro_batches(epoch)[offset * self.ga : (offset + 1) * self.ga]
        global_indices = self.plan.global_order(epoch)
        step_size = self.plan.global_micro_batch_size * self.ga
        first = (offset * self.ga) * self.plan.global_micro_batch_size
        n_targets = sum(self.targets[i] for i in global_indices[first : first + step_size])
        # engine.backward divides by ga and DeepSpeed averages over ranks: undo both so the step's gradient
        # is that of (sum of token losses) / (target tokens in the global batch)
        scale = n_targets / (self.info.world_size * self.ga)
        # summed loss, non-padding tokens, ranks asked to stop, non-finite micro-batch losses
        local = torch.zeros(4, device=self.device)
        local[2] = float(self.stop.received is not None)
        skip = False
        for k, indices in enumerate(micro_batches):
            batch = self.batch(indices)
            summed = causal_lm_loss_sum(self.engine, batch)
            loss = summed / scale
            regularizer = self.adapter_config.regularizer(self.engine.module, step)
            if regularizer is not None:  # identical on every rank and micro-batch: its gradient is unchanged
                loss = loss + regularizer[0]  # by DeepSpeed's averaging over ranks and accumulation steps
                self.regularizer_metrics = regularizer[1]
            local[:2] += torch.stack([summed.detach(), count_tokens(batch).float()])
            local[3] += (~torch.isfinite(loss.detach())).float()
            if k == len(micro_batches) - 1:  # before the update, every rank learns whether any loss was not finite
                torch.distributed.all_reduce(local)
                skip = local[3].item() > 0
            if skip and self.drops_overflow:
                # all-NaN gradients send the step down DeepSpeed's own overflow path: it drops the update and
                # clears the gradient partitions, which only the ZeRO optimizer can reach
                loss = loss * math.nan
            self.engine.backward(loss)
            if skip and not self.drops_overflow:
                # a plain optimizer has no overflow path: drop the gradients and end the accumulation without an
                # update (through DeepSpeed's documented boundary override)
                self.engine.zero_grad()
                self.engine.set_gradient_accumulation_boundary(False)
            self.engine.step()
        if skip:
            self.engine.set_gradient_accumulation_boundary(None)  # back to counting micro-steps
            if self.engine.was_step_applied():  # e.g. bf16 "check_grad_overflow": false under ZeRO-1/2
                raise RuntimeError("DeepSpeed applied an update with non-finite gradients instead of skipping it")
            self.engine.lr_scheduler.step()  # a skipped step keeps its place: the schedule follows the step number
        return {"loss": local[0].item() / n_targets, "tokens": local[1].item(), "samples": step_size,
                "stop": local[2].item() > 0, "skipped": skip}  # fmt: skip

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean token loss over the validation split; every rank runs the same number of forwards (ZeRO-3
        gathers collectively), a rank with nothing left re-runs a batch with weight 0."""
        self.engine.eval()
        n, world, mb = len(self.val_set), self.info.world_size, self.args.micro_batch_size
        totals = torch.zeros(2, device=self.device)
        for start in range(0, n, mb * world):
            indices = list(range(start + self.info.rank * mb, min(start + (self.info.rank + 1) * mb, n)))
            batch = self.batch(indices or [0], self.val_set)
            summed = causal_lm_loss_sum(self.engine, batch)
            if indices:
                totals += torch.stack([summed, (batch["labels"][:, 1:] != IGNORE_INDEX).sum()])
        torch.distributed.all_reduce(totals)
        self.engine.train()
        return (totals[0] / totals[1]).item()

    def write_events(self, step: int, values: dict[str, float]) -> None:
        if self.engine.monitor.enabled:
            self.engine.monitor.write_events([(tag, value, step) for tag, value in values.items()])

    def nonfinite_error(self, step: int, in_a_row: int) -> InputError:
        found = complete_checkpoints(checkpoint_root(self.out))
        kept = f"the last complete checkpoint, {str(found[-1][1])!r}, is kept" if found else "no checkpoint yet"
        return InputError(
            f"the loss was not finite in {in_a_row} steps in a row (steps {step - in_a_row + 1} to {step}); "
            f"stopped without saving ({kept}): lower --learning_rate, check the data, or raise --max_nonfinite_steps"
        )

    def run(self) -> Path:
        args, info = self.args, self.info
        start = 0
        if self.resume_from is not None:
            start = load_checkpoint(self.engine, self.resume_from, info)
            self.log(f"resumed from {self.resume_from} at step {start}")
        if args.resume and info.is_main:
            trim_log(self.out / "train_log.jsonl", start)
        self.engine.train()
        bar = tqdm(total=self.total_steps, initial=start, disable=not info.is_main, desc="train", dynamic_ncols=True)
        log_file = (self.out / "train_log.jsonl").open("a") if info.is_main else None
        window_start, window = time.perf_counter(), {"loss": 0.0, "tokens": 0.0, "samples": 0, "steps": 0}
        skipped, in_a_row = 0, 0  # steps skipped for a non-finite loss: in all, and the current streak
        for step in range(start, self.total_steps):
            lr = self.engine.get_lr()[0]  # the rate this step uses (the scheduler moves on inside engine.step)
            result = self.train_step(step)
            done = step + 1
            stop = result["stop"] and done < self.total_steps
            grad_norm = self.engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            window["tokens"] += result["tokens"]
            window["samples"] += result["samples"]
            if result["skipped"]:
                skipped, in_a_row = skipped + 1, in_a_row + 1
                entry = {"step": done, "loss": None, "lr": lr, "grad_norm": None, "skipped": True}
            else:
                in_a_row = 0
                window["loss"] += result["loss"]
                window["steps"] += 1
                entry = {"step": done, "loss": result["loss"], "lr": lr, "grad_norm": grad_norm}
            if log_file:
                log_file.write(json.dumps(entry) + "\n")
                log_file.flush()
            if result["skipped"]:
                self.log(f"step {done}: the loss was not finite; step skipped (no update), {in_a_row} in a row")
                self.write_events(done, {"train/nonfinite_steps": skipped})
                if in_a_row >= args.max_nonfinite_steps:
                    bar.close()  # ends the progress line, so the error gets a line of its own
                    raise self.nonfinite_error(done, in_a_row)
            bar.update(1)
            bar.set_postfix(loss=f"{result['loss']:.4f}")
            if done % args.logging_steps == 0 or done == self.total_steps:
                elapsed = time.perf_counter() - window_start
                values = {
                    "train/loss": window["loss"] / window["steps"] if window["steps"] else math.nan,
                    "train/lr": lr,
                    "train/grad_norm": grad_norm,
                    "train/tokens_per_s": window["tokens"] / elapsed,
                    "train/samples_per_s": window["samples"] / elapsed,
                    "train/memory_gb": peak_memory_gb(),
                    **self.regularizer_metrics,
                }
                self.write_events(done, values)
                self.log(
                    f"step {done}/{self.total_steps} | loss {values['train/loss']:.4f} | lr {lr:.2e} | "
                    f"grad_norm {grad_norm:.3f} | {values['train/tokens_per_s']:.0f} tok/s | "
                    f"{values['train/memory_gb']:.2f} GB"
                )
                window_start, window = time.perf_counter(), dict.fromkeys(window, 0)
            if self.val_set is not None and (done % args.eval_steps == 0 or done == self.total_steps):
                val = self.validation_loss()
                self.write_events(done, {"eval/loss": val})
                self.log(f"step {done} | eval loss {val:.4f}")
            if args.save_steps and done % args.save_steps == 0 and done < self.total_steps or stop:
                save_checkpoint(self.engine, self.out, done, self.adapter_config, info, args.save_total_limit)
            if stop:  # every rank sees the same all-reduced flag, so all leave at this boundary
                self.log(f"stop requested ({self.stop.received or 'by another rank'}): checkpoint at step {done}")
                raise SystemExit(EXIT_PREEMPTED)
        bar.close()
        if log_file:
            log_file.close()
        if self.total_steps not in {step for step, _ in complete_checkpoints(checkpoint_root(self.out))}:
            save_checkpoint(self.engine, self.out, self.total_steps, self.adapter_config, info, args.save_total_limit)
        save_adapter(self.engine.module, self.adapter_config, self.out / "adapter")
        self.log(f"adapter saved to {self.out / 'adapter'}")
        return self.out / "adapter"


def train(args: TrainArgs) -> Path:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Trainer(args).run()


def main(argv: list[str] | None = None) -> None:
    """The training command; on the built-in data it goes on to show the gain on the held-out problems."""
    from adapters_ds.demo import is_demo, report_gain

    args = parse_train_args(argv)
    adapter_dir = train(args)
    if is_demo(args):
        report_gain(args, adapter_dir)
