"""Packed micro-batch step time by attention path, in one process, the paths interleaved round by round.

    python bench/packed_attention.py [--base_model PATH] [--rounds 5] [--micro_batches 4] [--micro_batch_size 4]
                                     [--cutoff_len 256] [--paths before,after,eager,dense] [--dtype auto]

One training micro-step (forward, loss as the trainer computes it, backward of LoRA r 32 on q,k,v,up,down_proj) on a
packed row of `--micro_batch_size` examples, for each path:

  before  `packed_sdpa` given the row alone (what the trainer passed until host boundaries): every attention layer
          reads the example boundaries back from `position_ids` (`.nonzero().tolist()`), and transformers' mask
          preparation reads the positions back to detect the packing and builds a dense block-diagonal mask.
  after   the same implementation given the boundaries from the host (`attention.packed_inputs`): torch's
          variable-length flash kernel on CUDA in bf16/fp16, sdpa once per example elsewhere; nothing read back.
  eager   transformers' eager attention with its block-diagonal mask (the reference of `--attn_implementation eager`).
  dense   transformers' own sdpa: one call per layer over the whole row with the dense block-diagonal mask it builds
          from `position_ids` (attention over a packed row in one call; the masked blocks are computed too).
  flash   the flash-attn package's variable-length kernel (`--attn_implementation flash_attention_2`; CUDA only).

Each round times every path on the same micro-batches, in rotating order, so a load change on a shared machine
hits all paths alike; the figures are medians over rounds of the seconds per micro-step, wall clock and this
process's CPU time (steadier than the wall clock on a loaded machine). The losses of the paths are
compared too (they must agree). Data: GSM8K training questions from ../shared/data when present, else the built-in
generated problems. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from deepspeed.accelerator import get_accelerator
from train_throughput import TARGET_MODULES, tokenized, write_records  # a script's folder is on the path

from adapters_ds import LoRAConfig, freeze_base, inject_adapters
from adapters_ds.hardware import accelerator_device, native_bf16
from adapters_ds.modeling import load_base_model
from adapters_ds.training.attention import packed_inputs, resolve_attn_implementation
from adapters_ds.training.data import collate_packed
from adapters_ds.training.loss import causal_lm_loss_sum
from adapters_ds.training.packing import enable_packing

PATHS = ("before", "after", "eager", "dense", "flash")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base_model", help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--micro_batches", type=int, default=4, help="micro-batches timed per path and round")
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--cutoff_len", type=int, default=256)
    parser.add_argument(
        "--paths", default="before,after,eager,dense", help=f"comma-separated subset of {','.join(PATHS)}"
    )
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                        help="auto: bf16 where the hardware has bf16 matrix units (ds_configs' 'auto')")  # fmt: skip
    args = parser.parse_args()
    paths = args.paths.split(",")
    if unknown := set(paths) - set(PATHS):
        parser.error(f"unknown paths {sorted(unknown)}; expected a subset of {PATHS}")
    accelerator = get_accelerator()
    device = accelerator_device()
    if args.dtype == "auto":
        dtype = torch.bfloat16 if native_bf16(device) else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    base = args.base_model
    if base is None:
        from adapters_ds.demo.default_model import prepare_default_model

        base = str(prepare_default_model())
    data = Path(os.environ.get("TMPDIR", "/tmp")) / f"packed_attention_{os.getpid()}.json"
    n = args.micro_batches * args.micro_batch_size
    source = write_records(n, data)
    train, _ = tokenized(data, base, args.cutoff_len)
    data.unlink()
    features = [train[i] for i in range(n)]
    groups = [features[i : i + args.micro_batch_size] for i in range(0, n, args.micro_batch_size)]

    torch.manual_seed(0)
    model = load_base_model(base, dtype=dtype).to(device)
    model.config.use_cache = False
    inject_adapters(model, LoRAConfig(r=32, alpha=64, dropout=0.0, target_modules=tuple(TARGET_MODULES.split(","))))
    freeze_base(model)
    model.train()
    implementations = {
        "before": resolve_attn_implementation("sdpa", dtype, True, device.type),
        "after": resolve_attn_implementation("sdpa", dtype, True, device.type),
        "eager": "eager",
        "dense": "sdpa",
        "flash": "flash_attention_2",
    }

    def batches(path: str) -> list[dict]:
        out = []
        for group in groups:
            batch = collate_packed(group)
            if path not in ("before", "dense"):
                lengths = [len(f["input_ids"]) for f in group]
                batch.update(packed_inputs(implementations[path], lengths))
            out.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        return out

    def use(path: str) -> None:
        if path == "flash":
            enable_packing(model, "flash_attention_2")
        else:
            model.set_attn_implementation(implementations[path])

    def step(batch: dict) -> float:
        loss = causal_lm_loss_sum(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    prepared = {path: batches(path) for path in paths}
    times: dict[str, list[float]] = {path: [] for path in paths}
    cpu_times: dict[str, list[float]] = {path: [] for path in paths}
    losses: dict[str, list[float]] = {}
    for path in paths:  # warm-up: kernel selection, allocations
        use(path)
        losses[path] = [step(b) for b in prepared[path]]
    load_before = os.getloadavg()[0]
    for r in range(args.rounds):
        for path in paths[r % len(paths) :] + paths[: r % len(paths)]:
            use(path)
            accelerator.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            for batch in prepared[path]:
                step(batch)
            accelerator.synchronize()
            times[path].append((time.perf_counter() - start) / len(prepared[path]))
            cpu_times[path].append((time.process_time() - cpu_start) / len(prepared[path]))
    tokens = sum(len(f["input_ids"]) for f in features) / len(groups)
    medians = {path: statistics.median(t) for path, t in times.items()}
    result = {
        "model": base,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "data": source,
        "micro_batch_size": args.micro_batch_size,
        "mean_tokens_per_micro_batch": round(tokens, 1),
        "rounds": args.rounds,
        "micro_batches_per_round": len(groups),
        "load_avg_1min": [load_before, os.getloadavg()[0]],
        "s_per_micro_step_median": {p: round(m, 4) for p, m in medians.items()},
        "s_per_micro_step_all": {p: [round(x, 4) for x in t] for p, t in times.items()},
        "cpu_s_per_micro_step_median": {p: round(statistics.median(t), 4) for p, t in cpu_times.items()},
        "loss_max_relative_gap_to_first_path": max(
            abs(a / b - 1) for p in paths for a, b in zip(losses[p], losses[paths[0]], strict=True)
        ),
    }
    if "before" in medians and "after" in medians:
        result["speedup_after_over_before"] = round(medians["before"] / medians["after"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
