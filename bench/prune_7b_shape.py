"""A 7B-shape estimate of what the unit gates' pruning buys: the forward time of a stack of LLaMA-7B-shaped
decoder blocks before and after removing --share of their parameters by the rule the gates use, on this CPU.

    python bench/prune_7b_shape.py [--layers 2] [--share 0.3] [--batch 1] [--seq 512] [--reps 3]
                                   [--width_multiple 64] [--seed 0] [--bf16 auto|on|off]
                                   [--hidden 4096] [--intermediate 11008] [--heads 32] [--kv_heads 32]

1. Builds `LlamaForCausalLM` with --layers blocks of LLaMA-7B's shapes (hidden 4096, MLP 11008, 32 heads, 32 KV
   heads; a 128-token vocabulary, which the timing never touches) and random weights: nothing is downloaded.
2. Removes --share of the block parameters as a gates run with `--gate_importance random` ends: the units are the
   ones the gates have (MLP units, KV groups; `gate_schedule.unit_options` gives their costs) and
   `gate_schedule.choose` closes them in a random order (the same draw for the same --seed) until the share is
   reached, within the smallest unit, keeping one of each kind per block, an MLP's units --width_multiple at a
   time as the gates close them (`gate_schedule.run_size`). The importance only decides *which* units go, which
   does not change the time; how many go per kind and layer comes from the same rule. Then the export's plan: each
   kept MLP width rounded up to a multiple of --width_multiple (`export.pruned.round_widths`, 1: off; nothing to
   round after runs of it) and the blocks shrunk (`pruned_model.shrink_block`) as `export --prune` does.
3. Times the forward of the block stack (`model.model` on random `inputs_embeds`, --batch × --seq; final norm
   included, embedding and LM head not) of the dense and the pruned model, the fastest of --reps after one warm-up,
   the two models alternating (as `bench/prune_speed.py`), in fp32 and, where this CPU computes bf16 natively (AMX
   or AVX512-BF16; `--bf16 on` times it anyway, emulated), in bf16.

Prints one JSON object: the machine, the shapes, the share removed (with and without the width rounding), the kept
widths and heads per layer, and per dtype the dense and pruned seconds, their ratio (`speedup`) and the
FLOP-proportional ceiling (`pruned_model.forward_flops` of the stack, dense over pruned). The blocks are ~96 % of a
7B model's FLOPs per token (the LM head is the rest), so the stack's ratio is close to the whole model's. At its
defaults it runs in about 2 minutes on 2 cores (the --layers × 202M parameters are materialised twice in fp32).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="LLaMA-7B has 32; the ratio hardly depends on it")
    parser.add_argument("--share", type=float, default=0.3, help="share of the block parameters to remove")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--width_multiple", type=int, default=64, help="the export's kept-width rounding (1: off)")
    parser.add_argument("--seed", type=int, default=0, help="the random order in which units close")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto", help="auto: where it is native")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv_heads", type=int, default=32)
    args = parser.parse_args(argv)
    if not 0 <= args.share < 1:
        parser.error(f"--share must be in [0, 1), found {args.share}")
    if args.width_multiple < 1:
        parser.error(f"--width_multiple must be >= 1, found {args.width_multiple}")
    return args


def build(args: argparse.Namespace) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=128, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, 2048), tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def prune_like_the_gates(model: LlamaForCausalLM, share: float, width_multiple: int, seed: int) -> dict:
    """Shrink `model` in place by the gates' rule with random importance (see the module docstring); returns the
    share removed and the kept shapes."""
    from adapters_ds.adapters.gate_schedule import block_parameters, choose, run_size, unit_options
    from adapters_ds.export.pruned import round_widths
    from adapters_ds.families import layout_of
    from adapters_ds.pruned_model import BlockPlan, geometry, shrink_block

    layout = layout_of(model.config.model_type)
    blocks = model.get_submodule(layout.blocks)
    geo = geometry(model.config, blocks[0], layout)
    paths = [f"{layout.blocks}.{i}.{rel}" for i in range(len(blocks)) for rel in (layout.mlp_out, layout.o)]
    options = [unit_options(model, path) for path in paths]
    costs = [option["unit_cost"] for option in options]
    closed = [torch.zeros(geo.intermediate if path.endswith(layout.mlp_out) else geo.kv_heads, dtype=torch.bool)
              for path in paths]  # fmt: skip
    total = block_parameters(model, set())
    generator = torch.Generator().manual_seed(seed)
    scores = [torch.rand(len(shut), generator=generator) for shut in closed]  # --gate_importance random
    runs = [run_size(o["unit_kind"], len(shut), width_multiple) for o, shut in zip(options, closed, strict=True)]
    smallest = min(cost * run for cost, run in zip(costs, runs, strict=True))
    chosen = choose(scores, costs, closed, share * total, share * total + smallest, runs)
    plans = []
    for i in range(len(blocks)):
        units, groups = (~chosen[2 * i]).nonzero().flatten().tolist(), (~chosen[2 * i + 1]).nonzero().flatten()
        plans.append(BlockPlan([(g, list(range(g * geo.rep, (g + 1) * geo.rep))) for g in groups.tolist()], units))
    unpadded = sum(int(new.sum()) * cost for new, cost in zip(chosen, costs, strict=True)) / total
    plans = round_widths(plans, geo, width_multiple)
    for block, plan in zip(blocks, plans, strict=True):
        shrink_block(block, layout, geo, plan, copy=True)
    return {
        "blocks_removed_fraction": 1 - block_parameters(model, set()) / total,
        "blocks_removed_fraction_unpadded": unpadded,
        "kept": [{"heads": len(p.heads), "intermediate": len(p.intermediate)} for p in plans],
    }


@torch.no_grad()
def stack_latency(models: list, batch: int, seq: int, reps: int) -> list[float]:
    """Fewest seconds per forward of each model's block stack over `reps`, the models taking turns."""
    hidden = models[0].config.hidden_size
    x = torch.randn(batch, seq, hidden, generator=torch.Generator().manual_seed(0))
    times: list[list[float]] = [[] for _ in models]
    for rep in range(reps + 1):  # the first round warms up
        for model, spent in zip(models, times, strict=True):
            embeds = x.to(model.dtype)
            start = time.perf_counter()
            model.model(inputs_embeds=embeds, use_cache=False)
            if rep:
                spent.append(time.perf_counter() - start)
    return [min(spent) for spent in times]


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    flags = [f for f in ("amx_bf16", "avx512_bf16") if f in cpuinfo]
    return {"cpu": names[0] if names else platform.processor() or platform.machine(), "bf16_flags": flags,
            "threads": torch.get_num_threads()}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    from adapters_ds.hardware import native_bf16
    from adapters_ds.pruned_model import forward_flops

    args = parse_args(argv)
    start = time.perf_counter()
    dense = build(args)
    pruned = copy.deepcopy(dense)
    removed = prune_like_the_gates(pruned, args.share, args.width_multiple, args.seed)
    flops = [forward_flops(m, args.batch, args.seq) for m in (dense, pruned)]  # the 128-token head: ~0
    result: dict = {
        "machine": machine(),
        "shape": {
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "layers": args.layers,
        },  # fmt: skip
        "batch": args.batch,
        "seq": args.seq,
        "share": args.share,
        "width_multiple": args.width_multiple,
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in removed.items()},
    }
    native = native_bf16()
    runs = [("fp32", torch.float32)]
    if args.bf16 == "on" or (args.bf16 == "auto" and native):
        runs.append(("bf16", torch.bfloat16))
    else:
        result["bf16"] = {"native": native, "timed": False, "why": "emulated on this CPU (no AMX or AVX512-BF16)"
                          if not native else "--bf16 off"}  # fmt: skip
    for name, dtype in runs:
        models = [dense.to(dtype), pruned.to(dtype)]
        dense_s, pruned_s = stack_latency(models, args.batch, args.seq, args.reps)
        result[name] = {"native": dtype == torch.float32 or native, "dense_s": round(dense_s, 3),
                        "pruned_s": round(pruned_s, 3), "speedup": round(dense_s / pruned_s, 3),
                        "flop_ceiling": round(flops[0] / flops[1], 3)}  # fmt: skip
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2), flush=True)
    return result


if __name__ == "__main__":
    main()
