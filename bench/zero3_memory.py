"""ZeRO-3 memory scaling: a randomly initialised LLaMA-shaped model (≥ 1B parameters) on 1 rank and on 2 ranks,
with and without parameter offload; per-rank resident base-parameter bytes and peak memory.

    python bench/zero3_memory.py [--hidden 2048 --intermediate 5632 --layers 22 --heads 32 --kv_heads 4
                                  --vocab 32000] [--dtype bfloat16] [--seq_len 8] [--configs zero3,zero3_offload]
                                 [--ranks 1,2]

QLoRA rows: a config name may carry a quantization, `zero3+nf4` (the base partitioned and quantized, as
`--quantization nf4` trains) or `zero2+nf4` (quantized, replicated on every rank):

    python bench/zero3_memory.py --configs zero3,zero3+nf4,zero2+nf4 --ranks 1,2

Every row also gives tokens/s of a second training step (the first one warms up). `--loss_vocabs 32000,152064`
instead compares the chunked training loss with the full-logits one (`--loss_tokens` target tokens, hidden
`--hidden`): peak memory above the inputs and time of forward + backward, each case in its own process.

The default shape is TinyLlama-1.1B's (1.1B parameters, 2.2 GB in bf16). Nothing is written to disk: every rank
builds the model with `from_config` under transformers' ZeRO-3 integration (`HfDeepSpeedConfig`, i.e.
`deepspeed.zero.Init`), so each layer is partitioned as soon as it is created and no rank ever holds the whole
model, as the training command loads a checkpoint. Then, as in training: LoRA (r 32, alpha 64 on q,k,v,up,down)
injected, the base frozen, the persistence threshold set, `deepspeed.initialize` with the shipped
ds_configs/<config>.json, and one training step on `--seq_len` random tokens (forward, backward, optimizer step),
which gathers every layer once.

Per rank: the base-parameter bytes resident on the rank's device (ZeRO-3 partitions plus persistent small tensors;
`trainer.partition_report`) and where they live, and the process's resident memory (VmRSS / peak VmHWM from
/proc) after start-up, after building the model, after `initialize` and after the step. On a CPU the offload
target and the "device" are the same memory, so offload moves nothing there; on a GPU the resident bytes are on the
GPU and the peak GPU memory (`max_memory_allocated`) is reported too. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def proc_memory_gb() -> dict[str, float]:
    """Resident and peak resident memory of this process (Linux /proc), GiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 2**20, 3)  # kB
    return {"rss_gb": fields["VmRSS"], "peak_rss_gb": fields["VmHWM"]}


def rank_main(spec: dict) -> None:
    """One rank: build, partition, initialize, one step; writes rank<r>.json into spec["out"]."""
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoModelForCausalLM, LlamaConfig

    from adapters_ds import LoRAConfig
    from adapters_ds.distributed import init_distributed
    from adapters_ds.quantization import spec_from_args
    from adapters_ds.training.ds_config import load_ds_config, resolve_ds_config
    from adapters_ds.training.engine import build_engine, partition_report
    from adapters_ds.training.loss import causal_lm_loss_sum

    info = init_distributed()
    memory = {"started": proc_memory_gb()}
    config_name, _, quantization = spec["config"].partition("+")
    ds_config = resolve_ds_config(
        load_ds_config(REPO / "ds_configs" / f"{config_name}.json"),
        world_size=info.world_size,
        micro_batch_size=1,
        batch_size=info.world_size,
        learning_rate=1e-4,
        weight_decay=0.0,
        max_grad_norm=1.0,
    )
    if spec.get("max_live_parameters"):  # how many gathered parameters ZeRO-3 may keep between uses
        zero = ds_config["zero_optimization"]
        zero["stage3_max_live_parameters"] = zero["stage3_max_reuse_distance"] = spec["max_live_parameters"]
    dtype = getattr(torch, spec["dtype"])
    ds_config["bf16"] = {"enabled": dtype == torch.bfloat16}
    config = LlamaConfig(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=2048,
        use_cache=False,
    )
    timings = {}

    def load(dtype: torch.dtype) -> torch.nn.Module:  # built under deepspeed.zero.Init, as training loads
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        timings["build_s"] = time.perf_counter() - start
        memory["built"] = proc_memory_gb()
        return model

    lora = LoRAConfig(
        r=32, alpha=64, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
    )
    quant = spec_from_args(quantization or None, False)
    engine = build_engine(load, ds_config, lora, learning_rate=1e-4, quantization=quant).engine
    build_s = timings["build_s"]
    memory["initialized"] = proc_memory_gb()
    report = partition_report(engine.module)
    base_params = [p for n, p in engine.module.named_parameters() if not p.requires_grad]
    devices = sorted({str(p.ds_tensor.device) for p in base_params if hasattr(p, "ds_tensor")})

    accelerator = get_accelerator()
    gen = torch.Generator().manual_seed(info.rank)
    ids = torch.randint(3, spec["vocab"], (1, spec["seq_len"]), generator=gen).to(engine.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    step_s = []
    for _ in range(2):  # the second step is timed warm
        start = time.perf_counter()
        loss = causal_lm_loss_sum(engine, batch)
        engine.backward(loss)
        engine.step()
        step_s.append(time.perf_counter() - start)
    memory["after_step"] = proc_memory_gb()
    result = {
        "rank": info.rank,
        "world_size": info.world_size,
        "base_numel": report["base_numel"],
        "base_resident_numel": report["base_local_numel"],
        "base_resident_bytes": report["base_bytes_per_rank"],
        "base_bytes_total": report["base_bytes_total"],
        "base_partitions_on": devices,
        "adapter_numel": report["adapter_numel"],
        "build_s": round(build_s, 1),
        "step_s": round(step_s[0], 1),
        "warm_step_s": round(step_s[1], 2),
        "tokens_per_s": round(info.world_size * spec["seq_len"] / step_s[1], 2),  # every rank's tokens, warm
        "loss": round(loss.item() / spec["seq_len"], 4),
        "memory_gb": memory,
        "threads": torch.get_num_threads(),
    }
    if accelerator.device_name() != "cpu":
        result["peak_device_memory_gb"] = round(accelerator.max_memory_allocated() / 2**30, 3)
    Path(spec["out"], f"rank{info.rank}.json").write_text(json.dumps(result))


def loss_main(spec: dict) -> None:
    """One loss case in this process: peak memory above the inputs and seconds of forward + backward."""
    from adapters_ds.training.loss import TargetForward, token_losses

    torch.manual_seed(0)  # the same head in both cases
    gen = torch.Generator().manual_seed(0)
    tokens, hidden_size, vocab = spec["tokens"], spec["hidden"], spec["vocab"]
    head = torch.nn.Linear(hidden_size, vocab, bias=False).requires_grad_(False)
    hidden = torch.randn(tokens, hidden_size, generator=gen, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    before = proc_memory_gb()["rss_gb"]
    start = time.perf_counter()
    if spec["chunked"]:
        forward = TargetForward(None, targets, torch.empty(0), {}, hidden=hidden, head=head)
    else:
        forward = TargetForward(head(hidden), targets, torch.empty(0), {})  # what the model's head returns
    loss = token_losses(forward).sum()
    loss.backward()
    seconds = time.perf_counter() - start
    peak = proc_memory_gb()["peak_rss_gb"]
    print(json.dumps({"peak_above_inputs_gb": round(peak - before, 3), "s": round(seconds, 3),
                      "loss": loss.item() / tokens}))  # fmt: skip


def loss_table(vocabs: list[int], tokens: int, hidden: int) -> dict:
    rows = {}
    for vocab in vocabs:
        for chunked in (False, True):
            case = {"vocab": vocab, "tokens": tokens, "hidden": hidden, "chunked": chunked}
            proc = subprocess.run([sys.executable, __file__, "--_loss", json.dumps(case)], capture_output=True,
                                  text=True, check=True)  # fmt: skip
            rows[f"vocab {vocab}, {'chunked' if chunked else 'full logits'}"] = json.loads(proc.stdout.splitlines()[-1])
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(spec: dict, ranks: int, workdir: Path) -> list[dict]:
    out = workdir / f"{spec['config'].replace('+', '_')}_{ranks}"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "adapters_ds" / "torch_extensions"))
    if torch.cuda.device_count() == 0:  # ranks share this machine's cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
    runner = Path(sys.executable).parent / "deepspeed"
    cmd = [str(runner), "--num_gpus", str(ranks), "--master_port", str(free_port()), __file__,
           "--_rank", json.dumps({**spec, "out": str(out)})]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['config']} on {ranks} rank(s) failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv_heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--seq_len", type=int, default=8, help="tokens of the one training step (bf16 may be slow)")
    parser.add_argument("--configs", default="zero3,zero3_offload", help="shipped ds_configs to compare")
    parser.add_argument("--ranks", default="1,2", help="rank counts to compare")
    parser.add_argument(
        "--max_live_parameters",
        type=float,
        help="override stage3_max_live_parameters and stage3_max_reuse_distance (the shipped configs: 1e9)",
    )
    parser.add_argument("--loss_vocabs", help="compare the chunked and the full loss at these vocabularies instead")
    parser.add_argument("--loss_tokens", type=int, default=8192, help="target tokens of the loss comparison")
    parser.add_argument("--_rank", help=argparse.SUPPRESS)
    parser.add_argument("--_loss", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # added by the deepspeed launcher
    args = parser.parse_args()
    spec = {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "dtype")}
    spec["seq_len"] = args.seq_len
    spec["max_live_parameters"] = int(args.max_live_parameters) if args.max_live_parameters else None
    if args._loss:
        loss_main(json.loads(args._loss))
        return
    if args.loss_vocabs:
        vocabs = [int(v) for v in args.loss_vocabs.split(",")]
        table = loss_table(vocabs, args.loss_tokens, args.hidden)
        print(json.dumps({"tokens": args.loss_tokens, "hidden": args.hidden, "fp32": True, "rows": table}, indent=2))
        return
    if args._rank:
        from adapters_ds.distributed import closing_distributed

        with closing_distributed(exit_process=True):  # a rank ends its process group, and then its process
            rank_main(json.loads(args._rank))
        return

    result: dict = {"model": {"shape": "LLaMA", **spec}, "load_avg_1min_before": os.getloadavg()[0], "runs": {}}
    rank_counts = [int(r) for r in args.ranks.split(",")]
    with tempfile.TemporaryDirectory(prefix="zero3_memory_") as tmp:
        for config in args.configs.split(","):
            for ranks in rank_counts:
                ranks_out = run({**spec, "config": config}, ranks, Path(tmp))
                result["runs"][f"{config}_{ranks}rank"] = ranks_out
    first = next(iter(result["runs"].values()))[0]
    result["model"]["params"] = first["base_numel"] + first["adapter_numel"]
    ratios = {}
    for config in args.configs.split(","):
        one, many = result["runs"].get(f"{config}_1rank"), result["runs"].get(f"{config}_{max(rank_counts)}rank")
        if one and many and many is not one:
            worst = max(r["base_resident_bytes"] for r in many)
            ratios[f"{config}: base bytes per rank, {max(rank_counts)} ranks / 1"] = round(
                worst / one[0]["base_resident_bytes"], 3
            )
            peak = max(r["memory_gb"]["after_step"]["peak_rss_gb"] for r in many)
            ratios[f"{config}: peak RSS per rank, {max(rank_counts)} ranks / 1"] = round(
                peak / one[0]["memory_gb"]["after_step"]["peak_rss_gb"], 3
            )
    result["ratios"] = ratios
    result["load_avg_1min_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
