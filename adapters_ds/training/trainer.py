"""The training run on DeepSpeed's engine, top to bottom.

`Trainer(args, base_model)` runs its phases in order: preflight checks (distributed start, ds_config resolved and
validated, adapter config, output folder, resume source: all bad input fails here, before anything is written) →
data (tokenizer, tokenized splits, batch plan) → engine (`engine.build_engine`: partitioned load → adapters →
persistence threshold → `deepspeed.initialize`) → output (run folder, `train_args.json`, ZeRO-3 report).
`fit()` runs the loop (forward, backward, step, log, validate, checkpoint) and saves the adapter.

The loss of a step is the mean over every target token of the global batch (all ranks, all accumulated
micro-batches), not a mean of per-micro-batch means: that makes the gradient independent of how the batch
is split across ranks and accumulation steps, so 2 ranks × m examples train exactly like 1 rank × 2m.

A step whose loss is not finite on any rank (in any micro-batch) is skipped: every rank learns it before the
update, which is then dropped (`Trainer.train_step`), so the adapter weights and the optimizer state stay
bit-identical. Skipped steps are counted (`train/nonfinite_steps`); `--max_nonfinite_steps` of them in a row stop
the run with an error, leaving the checkpoints as they are.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm import tqdm
from transformers import set_seed

from adapters_ds.adapters.base import AdapterConfig
from adapters_ds.adapters.inject import parameter_report
from adapters_ds.adapters.registry import strategy_for
from adapters_ds.adapters.storage import save_adapter
from adapters_ds.distributed import Ranks, group_sum, init_distributed
from adapters_ds.errors import InputError
from adapters_ds.fileio import check_output_dir, write_json
from adapters_ds.modeling import check_causal_lm, load_base_model, load_tokenizer
from adapters_ds.training import loss as losses
from adapters_ds.training.args import TrainArgs, adapter_config
from adapters_ds.training.attention import check_attn_implementation, packed_inputs, to_device
from adapters_ds.training.checkpoint import (
    check_checkpoint,
    check_resume_source,
    checkpoint_root,
    complete_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    trim_log,
)
from adapters_ds.training.data import (
    BatchPlan,
    collate,
    collate_packed,
    count_tokens,
    split_validation,
    training_examples,
)
from adapters_ds.training.ds_config import (
    check_ds_config,
    finish_trackers,
    load_ds_config,
    monitor_config,
    resolve_ds_config,
    zero_stage,
)
from adapters_ds.training.engine import build_engine, partition_report
from adapters_ds.training.loss import target_counts
from adapters_ds.training.metrics import Window, peak_memory_gb, precision_name
from adapters_ds.training.stop import EXIT_PREEMPTED, StopSignal


def lr_lambda(step: int, warmup: int, total: int, kind: str) -> float:
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


class Trainer:
    """One training run. `base_model` is a folder or hub id; `records` (a list of {instruction, input, output})
    replaces `args.data_path` when given (the built-in problems of the demo, for instance)."""

    def __init__(self, args: TrainArgs, base_model: str, records: list[dict[str, Any]] | None = None) -> None:
        self.args = args
        self.base_model = base_model
        self.stop = StopSignal()
        self.regularizer_metrics: dict[str, float] = {}  # latest scalars of the method's extra loss term
        self.preflight()
        self.load_data(records)
        self.build()
        self.prepare_output()

    # ------------------------------------------------------------------------------------------------ phases

    def preflight(self) -> None:
        """Every check of the input that can fail, before the model loads and before anything is written."""
        args = self.args
        self.info = init_distributed(timeout_s=args.dist_timeout)
        if not self.info.is_main:
            datasets.disable_progress_bars()  # rank 0 alone reports
        set_seed(args.seed)
        self.ds_config = resolve_ds_config(
            load_ds_config(args.ds_config),
            world_size=self.info.world_size,
            micro_batch_size=args.micro_batch_size,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm,
        )
        check_ds_config(self.ds_config)
        for section, value in monitor_config(args.report_to, args.output_dir).items():
            self.ds_config.setdefault(section, value)  # a monitor section of the DeepSpeed JSON wins
        self.adapter_config: AdapterConfig = adapter_config(args)
        check_attn_implementation(args.attn_implementation, self.ds_config, self.adapter_config)
        self.output_non_empty = check_output_dir(
            args.output_dir,
            allowed=bool(args.resume or args.overwrite_output_dir),
            hint="pass --resume auto to continue or --overwrite_output_dir",
        )
        check_resume_source(args.resume, args.output_dir, args.allow_pickle)
        self.resume_from = resolve_resume(args.resume, args.output_dir)
        if self.resume_from is not None:  # another number of ranks or ZeRO stage loads the consolidated state
            check_checkpoint(self.resume_from, self.info, self.ds_config)
        check_causal_lm(self.base_model, args.trust_remote_code)  # before the tokenizer and the data

    def load_data(self, records: list[dict[str, Any]] | None) -> None:
        """Tokenizer, tokenized training (and validation) split, and the batch plan of every epoch."""
        args = self.args
        self.tokenizer = load_tokenizer(self.base_model, trust_remote_code=args.trust_remote_code)
        with self.info.main_first():  # downloads, the dataset cache: the others reuse them
            raw, tokenized = training_examples(self.tokenizer, args, records)
            tokenized = losses.with_answer_targets(tokenized, raw, self.tokenizer, args)  # for the answer-only loss
        self.train_set, self.val_set = split_validation(tokenized, args.val_set_size, args.seed)
        self.targets = target_counts(self.train_set)
        self.answers, self.step_metrics, self.answer_loss = self.train_set["answer_targets"], {}, losses.Means()
        self.ga = self.ds_config["gradient_accumulation_steps"]
        self.plan = BatchPlan(
            lengths=self.train_set["length"],
            micro_batch_size=args.micro_batch_size,
            world_size=self.info.world_size,
            rank=self.info.rank,
            seed=args.seed,
            group_by_length=args.group_by_length,
            gradient_accumulation_steps=self.ga,  # the order depends on the global batch, not on its split
        )
        self.steps_per_epoch = self.plan.micro_batches_per_epoch // self.ga
        if self.steps_per_epoch == 0:
            raise InputError(
                f"the training split has {len(self.train_set)} examples, fewer than one step of --batch_size "
                f"{args.batch_size}"
            )
        self.total_steps = args.max_steps if args.max_steps > 0 else args.num_epochs * self.steps_per_epoch

    def build(self) -> None:
        """The DeepSpeed engine with the adapters (see `engine.build_engine`)."""
        args = self.args
        warmup = math.ceil(args.warmup_ratio * self.total_steps)
        schedule = partial(lr_lambda, warmup=warmup, total=self.total_steps, kind=args.lr_scheduler)

        load = partial(load_base_model, self.base_model, trust_remote_code=args.trust_remote_code,
                       allow_pickle=args.allow_pickle)  # fmt: skip
        self.adapter_config = self.adapter_config.resolve(self.tokenizer)  # e.g. a prompt's init text → token ids
        self.strategy = strategy_for(self.adapter_config)  # how the method trains (state of this run only)

        built = build_engine(
            load,
            self.ds_config,
            self.adapter_config,
            learning_rate=args.learning_rate,
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
            gradient_checkpointing=args.gradient_checkpointing,
            max_replicated_base_share=args.max_replicated_base_share,
            attn_implementation=args.attn_implementation,
            before_initialize=self.create_output_dir,
            strategy=self.strategy,
            quantization=args.quantization_spec(),
        )
        self.engine, self.pack = built.engine, built.packed
        # the run's metrics go to DeepSpeed's monitors at optimizer-step numbers; the engine's own events (lr at the
        # sample count) are turned off: W&B drops any event whose step is below one already logged
        self.monitor = self.engine.monitor if self.engine.monitor.enabled else None
        self.engine.monitor.enabled = False
        self.device = self.engine.device
        # ZeRO's optimizers and DeepSpeed's bf16/fp16 wrappers drop a step whose gradients are not finite (their
        # "overflow"); without them the engine steps a plain torch-style optimizer
        self.drops_overflow = hasattr(self.engine.optimizer, "overflow")

    def create_output_dir(self) -> None:
        """The run folder, emptied first with --overwrite_output_dir: called once all input is checked (the model
        loaded and adapted) and before `deepspeed.initialize`, whose TensorBoard monitor writes into it."""
        self.out = Path(self.args.output_dir)
        self.info.barrier()  # every rank has checked before rank 0 changes anything
        if self.info.is_main:
            if self.output_non_empty and self.args.overwrite_output_dir and not self.args.resume:
                shutil.rmtree(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
        self.info.barrier()

    def prepare_output(self) -> None:
        """`train_args.json`, the start-up line and, under ZeRO-3, `zero3_partition.json`."""
        args, info = self.args, self.info
        if info.is_main:
            write_json(
                self.out / "train_args.json",
                {"args": args.to_dict(), "base_model": self.base_model, "ds_config": self.ds_config,
                 "world_size": info.world_size},
            )  # fmt: skip
        info.barrier()
        self.log(
            f"training {Path(self.base_model).name} with {args.adapter} on {info.world_size} rank(s), ZeRO stage "
            f"{zero_stage(self.ds_config)}, {precision_name(self.ds_config)}, quantization {args.quantization}; "
            f"{parameter_report(self.engine.module)}"
        )
        if zero_stage(self.ds_config) == 3:
            self.write_partition_report()

    def write_partition_report(self) -> None:
        """Per-rank resident parameter elements under ZeRO-3 (`zero3_partition.json`): proof that the base is
        partitioned and the adapters are not, and the memory each rank holds."""
        reports = Ranks(start=False).gather(partition_report(self.engine.module))
        if self.info.is_main:
            write_json(self.out / "zero3_partition.json", reports)
            base = reports[0]
            self.log(
                f"ZeRO-3: base {base['base_local_numel']:,} of {base['base_numel']:,} elements "
                f"({base['base_bytes_per_rank']:,} of {base['base_bytes_total']:,} bytes) resident per rank "
                f"({base['base_replicated_numel']:,} = {100 * base['base_replicated_share']:.2f} % of the base kept "
                f"whole on every rank), adapters {base['adapter_local_numel']:,} of {base['adapter_numel']:,} "
                "(replicated)"
            )

    # ------------------------------------------------------------------------------------------------ steps

    def log(self, message: str) -> None:
        if self.info.is_main:
            tqdm.write(message)

    def batch(self, indices: list[int], dataset: datasets.Dataset | None = None) -> dict[str, torch.Tensor]:
        features = [(self.train_set if dataset is None else dataset)[i] for i in indices]
        # one packed row where the model keeps packed examples apart: no compute is spent on padding
        collated = collate_packed(features) if self.pack else collate(features, self.tokenizer.pad_token_id)
        if self.pack:  # the examples' boundaries from the host: the attention layers need not read them back
            collated.update(packed_inputs(self.engine.module, [len(f["input_ids"]) for f in features]))
        return to_device(collated, self.device)

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
        self.step_metrics = self.strategy.step_begin(self.engine.module, step, self.total_steps)
        # summed loss, non-padding tokens, ranks asked to stop, non-finite micro-batch losses, answer-token loss, tokens
        local = torch.zeros(6, device=self.device)
        local[2] = float(self.stop.received is not None)
        skip = False
        for k, indices in enumerate(micro_batches):
            batch = self.batch(indices)
            counts = [self.targets[i] for i in indices], [self.answers[i] for i in indices]
            terms = losses.micro_batch_loss(self.engine, batch, self.strategy, step, *counts, self.step_metrics)
            summed, loss = terms.task, terms.total / scale  # total: the task loss + the method's `batch_loss`
            local[4:] += terms.answer
            regularizer = self.strategy.regularizer(self.engine.module, step)
            if regularizer is not None:  # identical on every rank and micro-batch: its gradient is unchanged
                loss = loss + regularizer[0]  # by DeepSpeed's averaging over ranks and accumulation steps
                self.regularizer_metrics = regularizer[1]
            local[:2] += torch.stack([summed.detach(), count_tokens(batch).float()])
            local[3] += (~torch.isfinite(loss.detach())).float()
            if k == len(micro_batches) - 1:  # before the update, every rank learns whether any loss was not finite
                group_sum(local)
                totals = local.tolist()  # the step's one read of the device: every scalar at once
                skip = totals[3] > 0
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
        self.answer_loss.add({} if skip else {"train/answer_loss": totals[4] / max(1.0, totals[5])})
        return {"loss": totals[0] / n_targets, "tokens": totals[1], "samples": step_size,
                "stop": totals[2] > 0, "skipped": skip}  # fmt: skip

    @torch.no_grad()
    def validation_loss(self) -> dict[str, float]:
        """eval/loss, eval/answer_loss and eval/digit_loss over the validation split (`loss.validation_means`)."""
        self.engine.eval()
        mb = self.args.micro_batch_size
        values = losses.validation_means(self.engine, self.val_set, self.batch, self.info, mb, self.tokenizer)
        self.engine.train()
        return values

    def write_events(self, step: int, values: dict[str, float]) -> None:
        if self.monitor:
            self.monitor.write_events([(tag, value, step) for tag, value in values.items()])

    def nonfinite_error(self, step: int, in_a_row: int) -> InputError:
        found = complete_checkpoints(checkpoint_root(self.out))
        kept = f"the last complete checkpoint, {str(found[-1][1])!r}, is kept" if found else "no checkpoint yet"
        return InputError(
            f"the loss was not finite in {in_a_row} steps in a row (steps {step - in_a_row + 1} to {step}); "
            f"stopped without saving ({kept}): lower --learning_rate, check the data, or raise --max_nonfinite_steps"
        )

    # ------------------------------------------------------------------------------------------------ the loop

    def fit(self) -> Path:
        """Train from step 0 (or the resumed checkpoint) to the last step; returns the saved adapter folder."""
        args, info = self.args, self.info
        start = self.resume()
        self.engine.train()
        bar = tqdm(total=self.total_steps, initial=start, disable=not info.is_main, desc="train", dynamic_ncols=True)
        log_file = (self.out / "train_log.jsonl").open("a") if info.is_main else None
        self.window = Window()
        loop_start = time.perf_counter()  # train_log.jsonl's elapsed_s: seconds of this run's loop (no start-up)
        skipped, in_a_row = 0, 0  # steps skipped for a non-finite loss: in all, and the current streak
        try:
            for step in range(start, self.total_steps):
                lr = self.engine.get_lr()[0]  # the rate this step uses (the scheduler moves on inside engine.step)
                result = self.train_step(step)
                done = step + 1
                grad_norm = self.engine.get_global_grad_norm()
                grad_norm = float(grad_norm) if grad_norm is not None else math.nan
                self.window.add(result)
                if result["skipped"]:
                    skipped, in_a_row = skipped + 1, in_a_row + 1
                    entry = {"step": done, "loss": None, "lr": lr, "grad_norm": None, "skipped": True}
                else:
                    in_a_row = 0
                    entry = {"step": done, "loss": result["loss"], "lr": lr, "grad_norm": grad_norm}
                entry.update(tokens=int(result["tokens"]), elapsed_s=round(time.perf_counter() - loop_start, 3))
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
                    self.log_window(done, lr, grad_norm)
                if self.val_set is not None and (done % args.eval_steps == 0 or done == self.total_steps):
                    self.validate(done)
                stop = result["stop"] and done < self.total_steps
                if args.save_steps and done % args.save_steps == 0 and done < self.total_steps or stop:
                    self.checkpoint(done)
                if stop:  # every rank sees the same all-reduced flag, so all leave at this boundary
                    self.log(f"stop requested ({self.stop.received or 'by another rank'}): checkpoint at step {done}")
                    raise SystemExit(EXIT_PREEMPTED)
        finally:
            bar.close()
            if log_file:
                log_file.close()
        return self.finish()

    def resume(self) -> int:
        """Load the checkpoint to resume from, if any; the first step to run."""
        start = 0
        if self.resume_from is not None:
            start = load_checkpoint(self.engine, self.resume_from, self.info, self.args.seed)
            self.log(f"resumed from {self.resume_from} at step {start} on {self.info.world_size} rank(s)")
        if self.args.resume and self.info.is_main:
            trim_log(self.out / "train_log.jsonl", start)
        return start

    def log_window(self, done: int, lr: float, grad_norm: float) -> None:
        """Means of the steps since the last log line, to the terminal and TensorBoard."""
        values = {
            **self.window.values(),
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/memory_gb": peak_memory_gb(),
            **self.regularizer_metrics,
            **self.step_metrics,
            **self.answer_loss.pop(),
        }
        self.write_events(done, values)
        self.log(
            f"step {done}/{self.total_steps} | loss {values['train/loss']:.4f} | answer loss "
            f"{values.get('train/answer_loss', math.nan):.4f} | lr {lr:.2e} | "
            f"grad_norm {grad_norm:.3f} | {values['train/tokens_per_s']:.0f} tok/s | "
            f"{values['train/memory_gb']:.2f} GB"
            + "".join(f" | {tag} {value:.4g}" for tag, value in self.step_metrics.items())  # e.g. gates/removed
        )
        self.window = Window()

    def validate(self, done: int) -> None:
        values = self.validation_loss()
        self.write_events(done, values)
        self.log(
            f"step {done} | "
            + " | ".join(f"{tag.replace('/', ' ').replace('_', ' ')} {v:.4f}" for tag, v in values.items())
        )

    def checkpoint(self, done: int) -> None:
        save_checkpoint(self.engine, self.out, done, self.adapter_config, self.info, self.args.save_total_limit)

    def finish(self) -> Path:
        """The last checkpoint (unless it exists) and the adapter files."""
        if self.total_steps not in {step for step, _ in complete_checkpoints(checkpoint_root(self.out))}:
            self.checkpoint(self.total_steps)
        save_adapter(self.engine.module, self.adapter_config, self.out / "adapter")
        finish_trackers(self.monitor)
        self.log(f"adapter saved to {self.out / 'adapter'}")
        return self.out / "adapter"


def train(args: TrainArgs, base_model: str, records: list[dict[str, Any]] | None = None) -> Path:
    """Train and save the adapter; returns its folder."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Trainer(args, base_model, records).fit()
