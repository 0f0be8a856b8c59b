"""Model FLOP utilisation of LoRA training on a randomly initialised LLaMA-shaped model, against the bf16 matmul
peak measured on the same device in the same run.

    python bench/mfu.py [--hidden 2048 --intermediate 5632 --layers 22 --heads 32 --kv_heads 4 --vocab 32000]
                        [--tokens 8192] [--steps 10] [--warmup 3] [--lora_r 16] [--attn_implementation auto]
                        [--gradient_checkpointing]

The default shape is TinyLlama-1.1B's. One process, no DeepSpeed (the compute path alone: the benches of the
engine are train_throughput.py and zero3_memory.py): the model on the accelerator in bf16, LoRA r 16 (alpha 2r,
no dropout) on q,k,v,o,gate,up,down_proj, the base frozen, AdamW on the adapters. Each step trains one packed
micro-batch of `--tokens` tokens (examples of seeded random lengths from 256 to 2048 tokens, packed as the trainer
packs them, with host-side boundaries, `--attn_implementation` as in training), every token a target, with the
trainer's loss (`causal_lm_loss_sum`).

Model FLOPs of a packed row (the convention of train_throughput.py): (4·N + 6·N_lora)·T + 3·A, N the weights of the
frozen base's matrix products (blocks and LM head: forward 2N, backward 2N for the input gradients only), N_lora the
adapter weights (forward 2, backward 4), T the tokens, A = Σ 2·layers·width·n·(n+1) over the examples' lengths n
(causal attention forward; backward twice that). The peak: FLOP/s of an 8192³ bf16 matmul on the device (1024³ on a
CPU), the mean of timed products after warm-up. Prints one JSON object (the figures, no verdict: the reader compares
them with the goal at hand).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from deepspeed.accelerator import get_accelerator
from transformers import AutoModelForCausalLM, LlamaConfig

from adapters_ds import LoRAConfig, freeze_base, inject_adapters
from adapters_ds.adapters.base import adapter_parameters
from adapters_ds.hardware import accelerator_device
from adapters_ds.training.attention import packed_inputs, to_device
from adapters_ds.training.data import collate_packed
from adapters_ds.training.loss import causal_lm_loss_sum
from adapters_ds.training.packing import enable_packing

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """FLOP/s of a large square matmul on `device`: the practical peak the MFU is measured against."""
    accelerator = get_accelerator()
    size, runs = (8192, 10) if device.type != "cpu" else (1024, 5)
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    for _ in range(3):
        torch.mm(a, b)
    accelerator.synchronize()
    start = time.perf_counter()
    for _ in range(runs):
        torch.mm(a, b)
    accelerator.synchronize()
    return 2 * size**3 * runs / (time.perf_counter() - start)


def example_lengths(tokens: int, seed: int) -> list[int]:
    """Seeded random lengths in [256, 2048] (shorter on tiny rows) summing to `tokens`."""
    generator = torch.Generator().manual_seed(seed)
    low, high = min(256, tokens), min(2048, tokens)
    lengths: list[int] = []
    while sum(lengths) < tokens:
        lengths.append(int(torch.randint(low, high + 1, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - tokens
    return [n for n in lengths if n > 0]


def model_flops(model: torch.nn.Module, config: LlamaConfig, lengths: list[int]) -> float:
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    adapter_ids = {id(p) for p in adapter_parameters(model).values()}
    n_base = sum(m.weight.numel() for m in linears.values() if id(m.weight) not in adapter_ids)
    n_lora = sum(p.numel() for p in adapter_parameters(model).values())
    width = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    attention = sum(2 * config.num_hidden_layers * width * n * (n + 1) for n in lengths)
    return (4 * n_base + 6 * n_lora) * sum(lengths) + 3 * attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv_heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of the packed micro-batch of each step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (kernel choice, allocations)")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--attn_implementation", default="auto", choices=("auto", "sdpa", "flash_attention_2", "eager"))
    parser.add_argument("--gradient_checkpointing", action="store_true")
    args = parser.parse_args()

    accelerator = get_accelerator()
    device = accelerator_device()
    dtype = torch.bfloat16
    peak = matmul_peak(device, dtype)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(4096, args.tokens), use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    lora = LoRAConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0, target_modules=TARGETS)
    inject_adapters(model, lora)
    freeze_base(model)
    for p in adapter_parameters(model).values():
        p.data = p.data.to(dtype)
    assert enable_packing(model, args.attn_implementation)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW(list(adapter_parameters(model).values()), lr=1e-4)
    implementation = model.config._attn_implementation

    batches, flops = [], []
    for step in range(args.warmup + args.steps):
        lengths = example_lengths(args.tokens, seed=step)
        generator = torch.Generator().manual_seed(1000 + step)
        features = []
        for n in lengths:
            ids = torch.randint(3, args.vocab, (n,), generator=generator).tolist()
            features.append({"input_ids": ids, "labels": ids})
        batch = collate_packed(features)
        batch.update(packed_inputs(implementation, lengths))
        batches.append(batch)
        flops.append(model_flops(model, config, lengths))

    def train_step(batch: dict) -> torch.Tensor:
        loss = causal_lm_loss_sum(model, to_device(batch, device)) / batch["input_ids"].numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    losses = [train_step(b) for b in batches[: args.warmup]]
    accelerator.synchronize()
    times = []
    for batch in batches[args.warmup :]:
        start = time.perf_counter()
        losses.append(train_step(batch))
        accelerator.synchronize()
        times.append(time.perf_counter() - start)
    timed_flops = sum(flops[args.warmup :])
    achieved = timed_flops / sum(times)
    mfu = achieved / peak
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "shape": {
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "layers": args.layers,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "vocab": args.vocab,
        },  # fmt: skip
        "params": sum(p.numel() for p in model.parameters()),
        "lora": {
            "r": args.lora_r,
            "targets": list(TARGETS),
            "params": sum(p.numel() for p in optimizer.param_groups[0]["params"]),
        },
        "attn_implementation": implementation,
        "gradient_checkpointing": args.gradient_checkpointing,
        "tokens_per_step": args.tokens,
        "timed_steps": args.steps,
        "s_per_step_median": round(statistics.median(times), 4),
        "tokens_per_s": round(args.tokens * args.steps / sum(times), 1),
        "model_tflops_per_s": round(achieved / 1e12, 3),
        "bf16_matmul_peak_tflops": round(peak / 1e12, 3),
        "mfu": round(mfu, 4),
        "loss_first_last": [round(float(losses[0]), 4), round(float(losses[-1]), 4)],
        "peak_memory_gb": round(accelerator.max_memory_allocated() / 2**30, 2) if device.type != "cpu" else None,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
