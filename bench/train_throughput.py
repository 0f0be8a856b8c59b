"""Training throughput: Hugging Face PEFT + Trainer against adapters_ds, same model, data, LoRA and steps.

    python bench/train_throughput.py [--base_model PATH] [--steps 6] [--warmup_steps 1] [--micro_batch_size 4]
                                     [--batch_size 8] [--cutoff_len 256] [--learning_rate 3e-4]
                                     [--modes a_bf16,a_fp32,b,b_bf16,b_fp32,c] [--bf16_steps 2] [--bf16_limit_s 120]
                                     [--split_steps 1]
    python bench/train_throughput.py --profile [--steps 4]     # where one rank of adapters_ds spends its time

Modes, each in a process of its own (clean peak memory), one after the other in this one run:
  a_bf16  HF PEFT LoRA + HF Trainer with `bf16=True`, the way the reference project (LLM-Adapters) trains: the model
          loaded in fp32, the Trainer's autocast computes in bf16.
  a_fp32  the same with `bf16=False`.
  b       adapters_ds, `launcher/train.py` on one rank, ds_configs/zero3.json as shipped: bf16 "auto", which is
          bf16 where the hardware has bf16 matrix units and fp32 where bf16 is emulated (`hardware.native_bf16`).
  b_bf16  the same with bf16 forced on (weights and compute in bf16, as DeepSpeed's bf16 mode does).
  b_fp32  the same with bf16 off: against a_fp32 the fp32 comparison on any machine (left out where b itself trains
          in fp32).
  c       adapters_ds, ZeRO-3 on 2 ranks under the `deepspeed` launcher (one thread per rank on a CPU), bf16 "auto";
          on CUDA it needs 2 GPUs (one rank per GPU) and is left out on a machine with one.
Same for all: the model (--base_model, else the embedded SmolLM2-135M-Instruct), LoRA r 32, alpha 64, dropout
0.05 on q,k,v,up,down_proj, AdamW (lr, betas 0.9/0.999, eps 1e-8, no weight decay), linear decay, clipping 1.0,
micro-batch, global batch, cutoff, seed, the tokenization (`adapters_ds.training.data.tokenize_records`, Alpaca prompt,
targets on the whole text as in LLM-Adapters) and the data order: the Trainer reads the examples sequentially in
the order `adapters_ds.training.data.BatchPlan` gives adapters_ds, so every step sees the same examples in every mode.
The loss of step 1 is computed from identical weights (every adapter is the identity at step 0): the modes must
agree on it to float precision, and on the last step's loss closely.

Data: the first steps × batch_size GSM8K training questions from ../shared/data/gsm8k_raw/train.jsonl when present
(`mathdata.gsm8k_to_records`), else the built-in generated problems.

Figures per mode, over the steps after --warmup_steps (the first steps pick kernels and allocate): target tokens/s
(tokens with a label: every non-padding token but each sequence's first), seconds per step, peak memory (on a CPU
the process's resident memory, on a GPU the device memory allocated; of rank 0 for c), the loss of step 1 and of the
last step, and the model FLOP utilisation (MFU): model FLOPs per second over the FLOP/s of a large matmul measured at
the start of this run (fp32 and bf16; 2048² on a CPU, 8192² on a GPU).
Model FLOPs of a sequence of n tokens: (4·N + 6·N_lora)·n + 3·A(n), N the weights of the frozen base's matrix
products (the blocks and the LM head: forward 2N, backward 2N for the input gradients only), N_lora the adapter
weights (forward 2, backward 4), A(n) = 2·layers·hidden·n·(n+1) the causal attention forward (QKᵀ and AV over the
n(n+1)/2 visible pairs), its backward twice that. Padding counts for nothing.

Time split per mode (`time_split`, --split_steps after --warmup_steps, in a run of its own so that the timed run
carries no profiler overhead): torch.profiler's self CPU time of rank 0 per step, by category: matmul (mm, addmm,
bmm), attention (everything inside an attention op), dropout_rng (Bernoulli and random draws, dropout), copies
(copy_, dtype casts, clone, cat, fills), optimizer (inside the optimizer's step: torch's `Optimizer.step` range,
DeepSpeed's optimizer in a range of the bench's), communication (c10d/gloo/NCCL collectives), other (the rest:
elementwise ops, norms, the loss, ZeRO-3's hooks); beside it the ops with the most self time and the wall time the
main thread spends in no op (Python, and on 2 ranks waiting for the slower one). On a GPU the CPU time is the launch
overhead, not the kernels'.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k_raw" / "train.jsonl"
TARGET_MODULES = "q_proj,k_proj,v_proj,up_proj,down_proj"
LORA = {"r": 32, "alpha": 64, "dropout": 0.05}
MODES = ("a_bf16", "a_fp32", "b", "b_bf16", "b_fp32", "c")
DS_BF16 = {"b": "auto", "b_bf16": True, "b_fp32": False, "c": "auto"}  # each adapters_ds mode's config bf16 setting


# ---------------------------------------------------------------------------------------------------- shared set-up


def write_records(n: int, path: Path) -> str:
    """The first n GSM8K training questions (or generated problems) as Alpaca-format JSON; returns the source."""
    from adapters_ds.demo.problems import generate_records
    from adapters_ds.mathdata.convert import gsm8k_to_records

    if GSM8K.is_file():
        rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:n]]
        records, source = gsm8k_to_records(rows), str(GSM8K)
    else:
        records, source = (
            generate_records(n, seed=0, split="train"),
            "adapters_ds.demo.problems (generated, train split)",
        )
    if len(records) < n:
        raise SystemExit(f"error: {source} has {len(records)} examples, fewer than the {n} the steps need")
    path.write_text(json.dumps(records))
    return source


def tokenized(data: Path, base: str, cutoff_len: int):
    """The examples exactly as both trainers see them."""
    from adapters_ds.modeling import load_tokenizer
    from adapters_ds.training.data import load_records, tokenize_records

    tokenizer = load_tokenizer(base)
    return tokenize_records(load_records(str(data)), tokenizer, cutoff_len, train_on_inputs=True), tokenizer


def data_order(lengths: list[int], micro_batch_size: int, seed: int) -> list[int]:
    """adapters_ds's example order for epoch 0 (independent of the number of ranks, see BatchPlan)."""
    from adapters_ds.training.data import BatchPlan

    return BatchPlan(lengths=lengths, micro_batch_size=micro_batch_size, seed=seed).global_order(0)


def model_flops(base: str, lengths: list[int]) -> float:
    """Model FLOPs of training on sequences of these lengths (see the module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    n_matmul = sum(m.weight.numel() for m in linears.values())  # the LM head is a Linear even when tied
    targets = set(TARGET_MODULES.split(","))
    n_lora = sum(
        LORA["r"] * (m.in_features + m.out_features) for name, m in linears.items() if name.split(".")[-1] in targets
    )
    width = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    attention = sum(2 * config.num_hidden_layers * width * n * (n + 1) for n in lengths)
    return (4 * n_matmul + 6 * n_lora) * sum(lengths) + 3 * attention


def matmul_flops(dtype: torch.dtype, size: int = 2048, seconds: float = 3.0) -> float:
    """FLOP/s of a size² matmul in `dtype` on the accelerator (this process's threads on a CPU): the hardware's
    practical peak. On a GPU the product is 8192² whatever `size` says: a small one measures launch overhead."""
    from deepspeed.accelerator import get_accelerator

    from adapters_ds.hardware import accelerator_device

    accelerator, device = get_accelerator(), accelerator_device()
    size = size if device.type == "cpu" else 8192
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    torch.mm(a, b)  # warm-up: kernel selection, packing buffers
    accelerator.synchronize()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        runs += 1
        if device.type != "cpu" and runs % 10 == 0:
            accelerator.synchronize()  # the host would otherwise only queue work
    accelerator.synchronize()
    return 2 * size**3 * runs / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------- time split

SPLIT_CATEGORIES = ("matmul", "attention", "dropout_rng", "copies", "optimizer", "communication", "other")
OPTIMIZER_RANGE = "adapters_bench/optimizer"  # the bench's own range around a DeepSpeed optimizer step
_MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv", "aten::dot")
_COPIES = ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::cat", "aten::fill_", "aten::zero_",
           "aten::index_copy", "aten::slice_backward", "aten::contiguous", "aten::stack")  # fmt: skip
_COMM = ("c10d", "gloo", "nccl", "all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter", "broadcast",
         "record_param_comms")  # fmt: skip


def event_category(name: str, ancestors: list[str]) -> str:
    """The category of a profiler event's own (self) time: a range around it (optimizer, communication,
    attention) wins over the op's own kind, so the elementwise ops of an optimizer step count as optimizer."""
    chain = [name, *ancestors]
    if any(c in n.lower() for n in chain for c in _COMM):
        return "communication"
    if any(n == OPTIMIZER_RANGE or n.startswith("Optimizer.step") for n in chain):
        return "optimizer"
    if any("attention" in n.lower() for n in chain):
        return "attention"
    if name in _MATMUL:
        return "matmul"
    if any(k in name for k in ("bernoulli", "random_", "dropout", "aten::rand", "uniform_")):
        return "dropout_rng"
    if name in _COPIES:
        return "copies"
    return "other"


def category_seconds(events: list) -> dict[str, float]:
    """Self CPU time in seconds per `SPLIT_CATEGORIES` of torch.profiler's events."""
    seconds = dict.fromkeys(SPLIT_CATEGORIES, 0.0)
    for event in events:
        ancestors, parent = [], event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        seconds[event_category(event.name, ancestors)] += event.self_cpu_time_total / 1e6
    return seconds


def top_ops(events: list, steps: int, n: int = 8) -> list[list]:
    """The `n` ops with the most self CPU time, [name, seconds per step], most first."""
    seconds: dict[str, float] = {}
    for event in events:
        seconds[event.name] = seconds.get(event.name, 0.0) + event.self_cpu_time_total / 1e6
    ranked = sorted(seconds.items(), key=lambda item: -item[1])[:n]
    return [[name, round(value / steps, 3)] for name, value in ranked]


def time_split(events: list, steps: int, wall_s: float | None = None) -> dict:
    """Self CPU time per step by `SPLIT_CATEGORIES`, in seconds and as shares of the total (torch.profiler's
    events of `steps` steps), and the ops that take most of it. With `wall_s` (the profiled steps' wall time) also
    `outside_ops_s_per_step`: the wall time in no op at all (Python, and on several ranks waiting for the slowest)."""
    seconds = category_seconds(events)
    total = sum(seconds.values()) or 1.0
    split = {
        "s_per_step": {k: round(v / steps, 3) for k, v in seconds.items()},
        "share": {k: round(v / total, 3) for k, v in seconds.items()},
        "top_ops_s_per_step": top_ops(events, steps),
    }
    if wall_s is not None:
        split["wall_s_per_step"] = round(wall_s / steps, 3)
        split["outside_ops_s_per_step"] = round(max(0.0, wall_s - total) / steps, 3)
    return split


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_limited(cmd: list[str], env: dict[str, str], limit_s: float | None) -> subprocess.CompletedProcess:
    """Run cmd in a session of its own; past limit_s kill that session (the launcher and its ranks): the result then
    has returncode None and the output so far."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return subprocess.CompletedProcess(cmd, None, stdout, stderr)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def child_env(threads: int | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(TOKENIZERS_PARALLELISM="false", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "adapters_ds" / "torch_extensions"))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


# ---------------------------------------------------------------------------------------------------- mode a


def hf_trainer_child(spec: dict) -> dict:
    """Mode a in this (child) process: HF PEFT LoRA + HF Trainer; per-step wall clock and loss from a callback."""
    import peft
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, TrainerCallback, TrainingArguments
    from transformers import Trainer as HFTrainer

    train, tokenizer = tokenized(Path(spec["data"]), spec["base"], spec["cutoff_len"])
    order = data_order(train["length"], spec["micro_batch_size"], spec["seed"])
    train = train.select(order).remove_columns(["length"])
    model = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=torch.float32)
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=TARGET_MODULES.split(","),
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )

    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.losses: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the step's kernels are done, not just queued
            self.times.append(time.perf_counter())
            if spec.get("split_warmup") and state.global_step == spec["split_warmup"]:
                profiler.start()  # --split: the steps after the warm-up under the profiler

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    def report_autocast(module, inputs):  # what the Trainer really computes in, seen from inside its forward
        if not reported:
            reported.append(True)
            kind = next(module.parameters()).device.type
            enabled = torch.is_autocast_enabled(kind)
            dtype = str(torch.get_autocast_dtype(kind)).removeprefix("torch.") if enabled else "off"
            print(f"AUTOCAST {kind} {dtype}, weights {next(module.parameters()).dtype}", file=sys.stderr, flush=True)

    reported: list[bool] = []
    # on a Linear inside the model: accelerate enters autocast inside the wrapped top-level forward, after its hooks
    next(m for m in model.modules() if isinstance(m, torch.nn.Linear)).register_forward_pre_hook(report_autocast)
    clock = Clock()
    with tempfile.TemporaryDirectory(prefix="hf_trainer_") as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=spec["micro_batch_size"],
            gradient_accumulation_steps=spec["batch_size"] // spec["micro_batch_size"],
            max_steps=spec["steps"],
            learning_rate=spec["learning_rate"],
            lr_scheduler_type="linear",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            optim="adamw_torch",
            bf16=spec["bf16"],
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=spec["seed"],
            train_sampling_strategy="sequential",  # the order was set above: adapters_ds's order
            dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
        )
        collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
        trainer = HFTrainer(model=model, args=args, train_dataset=train, data_collator=collator, callbacks=[clock])
        trainer.train()
    if spec.get("split_warmup"):
        profiler.stop()
        wall_s = clock.times[-1] - clock.times[spec["split_warmup"] - 1]
        return {"split": time_split(profiler.events(), spec["steps"] - spec["split_warmup"], wall_s)}
    if torch.cuda.is_available():  # the Trainer's own device (it has no other accelerator path here)
        peak_gb = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {"step_ends": clock.times, "losses": clock.losses, "peak_memory_gb": peak_gb}


def run_hf(spec: dict, limit_s: float | None) -> dict:
    proc = run_limited([sys.executable, __file__, "--_hf_child", json.dumps(spec)], child_env(), limit_s)
    autocast = [line.split(" ", 1)[1] for line in proc.stderr.splitlines() if line.startswith("AUTOCAST ")]
    if proc.returncode is None:
        return {"finished": False, "autocast": autocast[:1]}
    if proc.returncode != 0:
        raise RuntimeError(f"HF Trainer run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "autocast": autocast[:1]}


# ---------------------------------------------------------------------------------------------------- modes b, c


def train_argv(spec: dict, config_path: Path, out: Path) -> list[str]:
    """launcher/train.py's arguments for the bench's run: the same LoRA, data, batches and schedule as mode a."""
    return [
        "--ds_config", str(config_path), "--base_model", spec["base"], "--data_path", spec["data"],
        "--output_dir", str(out), "--max_steps", str(spec["steps"]),
        "--micro_batch_size", str(spec["micro_batch_size"]), "--batch_size", str(spec["batch_size"]),
        "--cutoff_len", str(spec["cutoff_len"]),
        "--learning_rate", str(spec["learning_rate"]), "--lr_scheduler", "linear", "--seed", str(spec["seed"]),
        "--lora_r", str(LORA["r"]), "--lora_alpha", str(LORA["alpha"]), "--lora_dropout", str(LORA["dropout"]),
        "--target_modules", TARGET_MODULES, "--logging_steps", "1", "--save_steps", "0", "--train_on_inputs",
    ]  # fmt: skip


def deepspeed_launcher(ranks: int) -> list[str]:
    runner = Path(sys.executable).parent / "deepspeed"
    return [str(runner), "--num_gpus", str(ranks), "--master_port", str(free_port())]


def write_config(workdir: Path, ranks: int, bf16: str | bool) -> tuple[Path, str]:
    """ds_configs/zero3.json with bf16 set to `bf16`, in workdir; returns its path and the run's name."""
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["bf16"] = {"enabled": bf16}
    name = f"ranks{ranks}_bf16{bf16}"
    config_path = workdir / f"{name}.json"
    config_path.write_text(json.dumps(config))
    return config_path, name


def run_adapters_ds(spec: dict, ranks: int, bf16: str | bool, workdir: Path, limit_s: float | None) -> dict | None:
    """launcher/train.py under the deepspeed launcher; per-step wall clock from its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config_path, name = write_config(workdir, ranks, bf16)
    out = workdir / name
    cmd = [*deepspeed_launcher(ranks), str(REPO / "launcher" / "train.py"), *train_argv(spec, config_path, out)]
    proc = run_limited(cmd, child_env(threads=1 if ranks > 1 else None), limit_s)
    if proc.returncode is None:
        return {"finished": False}
    if proc.returncode != 0:
        raise RuntimeError(f"adapters_ds run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    # DeepSpeed's monitor writes into <output_path>/<job_name>/
    events = EventAccumulator(str(next((out / "tensorboard").rglob("events.out.tfevents*")).parent))
    events.Reload()
    loss_events = events.Scalars("train/loss")  # rank 0's monitor writes every step (--logging_steps 1)
    losses, step_ends = [e.value for e in loss_events], [e.wall_time for e in loss_events]
    peak_gb = max(e.value for e in events.Scalars("train/memory_gb"))
    return {"step_ends": step_ends, "losses": losses, "peak_memory_gb": peak_gb}


# ---------------------------------------------------------------------------------------------------- summary


def summarize(raw: dict, step_targets: list[int], step_flops: list[float], warmup: int, peak: dict) -> dict:
    """Figures over the steps after the warm-up: step k ends at step_ends[k - 1]."""
    ends = raw["step_ends"]
    steps = len(ends) - warmup
    seconds = ends[-1] - ends[warmup - 1]
    tokens, flops = sum(step_targets[warmup:]), sum(step_flops[warmup:])
    return {
        "timed_steps": steps,
        "target_tokens_per_s": round(tokens / seconds, 1),
        "s_per_step": round(seconds / steps, 3),
        "peak_memory_gb": round(raw["peak_memory_gb"], 2),
        "loss_first_step": round(raw["losses"][0], 5),
        "loss_last_step": round(raw["losses"][-1], 5),
        "model_tflops_per_s": round(flops / seconds / 1e12, 4),
        "mfu_vs_fp32_matmul": round(flops / seconds / peak["fp32"], 4),
        "mfu_vs_bf16_matmul": round(flops / seconds / peak["bf16"], 4),
    }


def profiled_steps(spec: dict, config_path: Path, out: Path, warmup: int) -> tuple[Any, float]:
    """adapters_ds's Trainer (launcher/train.py's arguments) in this process, one rank of a run: `warmup` steps, then
    the rest of spec["steps"] under torch.profiler, the optimizer's step in a range of its own. Returns the profiler
    and the profiled steps' seconds."""
    from adapters_ds.training.args import parse_train_args
    from adapters_ds.training.trainer import Trainer

    os.environ.update(TOKENIZERS_PARALLELISM="false")
    args = parse_train_args(train_argv(spec, config_path, out))
    trainer = Trainer(args, args.base_model)
    trainer.engine.train()
    optimizer, optimizer_step = trainer.engine.optimizer, trainer.engine.optimizer.step

    def step_in_range(*a: Any, **k: Any) -> Any:
        with torch.profiler.record_function(OPTIMIZER_RANGE):
            return optimizer_step(*a, **k)

    optimizer.step = step_in_range  # this instance only: the split sees the optimizer's own time
    for step in range(warmup):
        trainer.train_step(step)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for step in range(warmup, spec["steps"]):
            trainer.train_step(step)
        seconds = time.perf_counter() - start
    return prof, seconds


def profile_one_rank(spec: dict, workdir: Path) -> None:
    """The top of torch.profiler's table for adapters_ds's train_step on one rank (mode b), to stderr."""
    config_path, name = write_config(workdir, 1, "auto")
    prof, seconds = profiled_steps(spec, config_path, workdir / name, warmup=1)
    print(f"{spec['steps'] - 1} steps in {seconds:.2f} s", file=sys.stderr)
    print(json.dumps(time_split(prof.events(), spec["steps"] - 1, seconds)), file=sys.stderr)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=60), file=sys.stderr)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60),
          file=sys.stderr)  # fmt: skip


def ds_split_child(job: dict) -> None:
    """One rank of a --split run of mode b or c (under the deepspeed launcher): rank 0 prints its time split."""
    spec, warmup = job["spec"], job["warmup"]
    prof, seconds = profiled_steps(spec, Path(job["config"]), Path(job["out"]), warmup)
    if int(os.environ.get("RANK", "0")) == 0:
        print("SPLIT " + json.dumps(time_split(prof.events(), spec["steps"] - warmup, seconds)), flush=True)


def run_split(mode: str, spec: dict, workdir: Path, warmup: int, limit_s: float | None) -> dict:
    """The time split of `mode`: a run of its own of spec["steps"] steps, the steps after `warmup` profiled (the
    timed runs stay free of the profiler's overhead)."""
    if mode.startswith("a"):
        proc = run_limited(
            [
                sys.executable,
                __file__,
                "--_hf_child",
                json.dumps({**spec, "bf16": mode == "a_bf16", "split_warmup": warmup}),
            ],
            child_env(),
            limit_s,
        )
    else:
        ranks = 2 if mode == "c" else 1
        config_path, name = write_config(workdir, ranks, DS_BF16[mode])
        job = {"spec": spec, "config": str(config_path), "out": str(workdir / f"split_{name}"), "warmup": warmup}
        cmd = [*deepspeed_launcher(ranks), __file__, "--_ds_split_child", json.dumps(job)]
        proc = run_limited(cmd, child_env(threads=1 if ranks > 1 else None), limit_s)
    if proc.returncode is None:
        return {"finished": False, "limit_s": limit_s}
    if proc.returncode != 0:
        raise RuntimeError(f"--split run of {mode} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = proc.stdout.strip().splitlines()
    if mode.startswith("a"):
        return json.loads(lines[-1])["split"]
    return json.loads(next(line for line in lines if line.startswith("SPLIT ")).removeprefix("SPLIT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base_model", help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per mode")
    parser.add_argument("--bf16_steps", type=int, default=2, help="steps of a_bf16 and b_bf16 (bf16 may be slow)")
    parser.add_argument(
        "--bf16_limit_s", type=float, default=120, help="time limit of a bf16 mode where bf16 is emulated (0: none)"
    )
    parser.add_argument("--warmup_steps", type=int, default=1, help="first steps left out of the timing")
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8, help="global examples per step (a multiple of 2 × micro)")
    parser.add_argument("--cutoff_len", type=int, default=256)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--profile", action="store_true", help="profile mode b's train_step instead (to stderr)")
    parser.add_argument(
        "--split_steps",
        type=int,
        default=1,
        help="steps profiled after --warmup_steps in a run of its own per mode, for the time split (0: none)",
    )
    parser.add_argument("--_hf_child", help=argparse.SUPPRESS)
    parser.add_argument("--_ds_split_child", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's (split child)
    args = parser.parse_args()
    if args._hf_child:
        print(json.dumps(hf_trainer_child(json.loads(args._hf_child))))
        return
    if args._ds_split_child:
        ds_split_child(json.loads(args._ds_split_child))
        return
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}; expected a subset of {MODES}")
    if args.batch_size % (2 * args.micro_batch_size) or min(args.steps, args.bf16_steps) <= args.warmup_steps:
        parser.error("--batch_size must be a multiple of 2 × --micro_batch_size, and steps > --warmup_steps")
    if args.warmup_steps < 1:
        parser.error("--warmup_steps must be >= 1: the first step ends the start-up")
    skipped_modes = {}
    if torch.cuda.is_available() and torch.cuda.device_count() < 2 and "c" in modes:
        modes.remove("c")  # NCCL runs one rank per GPU
        skipped_modes["c"] = f"needs 2 GPUs (one rank each), found {torch.cuda.device_count()}"

    base = args.base_model
    if base is None:
        from adapters_ds.demo.default_model import prepare_default_model

        base = str(prepare_default_model())
    with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp:
        workdir = Path(tmp)
        longest = max(args.steps, args.bf16_steps)
        data = workdir / "data.json"
        source = write_records(longest * args.batch_size, data)
        spec = {
            "base": base, "data": str(data), "micro_batch_size": args.micro_batch_size,
            "batch_size": args.batch_size, "cutoff_len": args.cutoff_len, "learning_rate": args.learning_rate,
            "seed": args.seed,
        }  # fmt: skip
        if args.profile:
            profile_one_rank({**spec, "steps": args.steps}, workdir)
            return

        train, _ = tokenized(data, base, args.cutoff_len)
        from adapters_ds.training.trainer import target_counts

        targets, lengths = target_counts(train), train["length"]
        order = data_order(lengths, args.micro_batch_size, args.seed)
        per_step = [order[s : s + args.batch_size] for s in range(0, len(order), args.batch_size)]
        step_targets = [sum(targets[i] for i in step) for step in per_step]
        step_flops = [model_flops(base, [lengths[i] for i in step]) for step in per_step]
        padded = sum(
            max(lengths[i] for i in step[m : m + args.micro_batch_size]) * args.micro_batch_size
            for step in per_step
            for m in range(0, len(step), args.micro_batch_size)
        )
        result: dict = {
            "model": base,
            "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "data": source,
            "examples": len(train),
            "mean_tokens_per_example": round(sum(lengths) / len(lengths), 1),
            "padding_share_at_micro_batch": round(1 - sum(lengths) / padded, 3),
            "micro_batch_size": args.micro_batch_size,
            "batch_size": args.batch_size,
            "cutoff_len": args.cutoff_len,
            "learning_rate": args.learning_rate,
            "lora": {**LORA, "target_modules": TARGET_MODULES},
            "load_avg_1min_before": os.getloadavg()[0],
        }
        # bf16 at 1024²: where bf16 is emulated one 2048² product alone takes over a minute
        peak = {"fp32": matmul_flops(torch.float32), "bf16": matmul_flops(torch.bfloat16, size=1024, seconds=2.0)}
        result["matmul_tflops"] = {k: round(v / 1e12, 4) for k, v in peak.items()}
        from adapters_ds.hardware import native_bf16

        result["native_bf16"] = native_bf16()
        if not result["native_bf16"] and "b_fp32" in modes and "b" in modes:
            modes.remove("b_fp32")
            skipped_modes["b_fp32"] = "b trains in fp32 on this machine (bf16 is emulated): the same run"
        runs = {}
        for mode in modes:
            bf16 = mode in ("a_bf16", "b_bf16")
            steps = args.bf16_steps if bf16 else args.steps
            # emulated bf16 runs at about 1/50 of fp32 here: a step can take longer than the whole bench
            limit = args.bf16_limit_s if bf16 and not result["native_bf16"] and args.bf16_limit_s > 0 else None
            mode_spec = {**spec, "steps": steps}
            if mode.startswith("a"):
                raw = run_hf({**mode_spec, "bf16": bf16}, limit)
            else:
                raw = run_adapters_ds(mode_spec, 2 if mode == "c" else 1, DS_BF16[mode], workdir, limit)
            if raw.get("finished") is False:  # the steps did not finish within the limit: an upper bound
                runs[mode] = {
                    **({"autocast": raw["autocast"]} if raw.get("autocast") else {}),
                    "steps": steps,
                    "finished": False,
                    "limit_s": limit,
                    "target_tokens_per_s_at_most": round(sum(step_targets[:steps]) / limit, 2),
                    "note": f"{steps} steps did not finish within {limit:.0f} s (start-up included)",
                }
                continue
            runs[mode] = summarize(raw, step_targets[:steps], step_flops[:steps], args.warmup_steps, peak)
            runs[mode]["steps"] = steps
            if args.split_steps > 0:
                split_spec = {**spec, "steps": args.warmup_steps + args.split_steps}
                runs[mode]["time_split"] = run_split(mode, split_spec, workdir, args.warmup_steps, limit)
            if raw.get("autocast"):
                runs[mode]["autocast"] = raw["autocast"]
            print(json.dumps({mode: runs[mode]}), file=sys.stderr, flush=True)  # kept if a later mode fails
        result["modes"] = runs
        if skipped_modes:
            result["modes_left_out"] = skipped_modes
        result["load_avg_1min_after"] = os.getloadavg()[0]

        def ratio(x: str, y: str) -> float | str | None:
            if x not in runs or y not in runs or "target_tokens_per_s" not in runs[x]:
                return None
            if "target_tokens_per_s" not in runs[y]:  # y did not finish: x is at least this much faster
                return f">= {runs[x]['target_tokens_per_s'] / runs[y]['target_tokens_per_s_at_most']:.1f}"
            return round(runs[x]["target_tokens_per_s"] / runs[y]["target_tokens_per_s"], 2)

        def loss_gap(x: str, y: str) -> float | None:
            if all("loss_last_step" in runs.get(m, {}) for m in (x, y)) and runs[x]["steps"] == runs[y]["steps"]:
                return round(abs(runs[x]["loss_last_step"] / runs[y]["loss_last_step"] - 1), 4)
            return None

        result["ratios"] = {
            "b_over_a_bf16 (each tool's default 'bf16' on this machine)": ratio("b", "a_bf16"),
            # b trains in fp32 only where bf16 is emulated ("auto"); elsewhere b_fp32 is the fp32 run
            "b_over_a_fp32 (both fp32)": ratio("b_fp32", "a_fp32") if result["native_bf16"] else ratio("b", "a_fp32"),
            "b_bf16_over_a_bf16 (both bf16)": ratio("b_bf16", "a_bf16"),
            "c_over_b (2 ranks ZeRO-3 total over 1 rank)": ratio("c", "b"),
        }
        result["last_loss_relative_gap"] = {
            "b_vs_a_fp32": loss_gap("b_fp32", "a_fp32") if result["native_bf16"] else loss_gap("b", "a_fp32"),
            "b_bf16_vs_a_bf16": loss_gap("b_bf16", "a_bf16"),
            "c_vs_b": loss_gap("c", "b"),
        }
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    from adapters_ds.distributed import closing_distributed

    with closing_distributed(exit_process=True):  # --profile trains in this process: its process group ends here
        main()
