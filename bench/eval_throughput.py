"""Evaluation throughput: the reference harness's decoding mode against this harness, same model, same questions.

    python bench/eval_throughput.py [--base_model PATH] [--n 64] [--max_new_tokens 64] [--batch_size 32]
                                    [--ranks K] [--single_n 16] [--reference_n 2] [--dtype auto|float32|bfloat16]

Modes, all on the same model, dtype, max_new_tokens and questions, measured in this one run:
  a  the reference (LLM-Adapters `evaluate.py`): one question at a time, 4-beam search, KV cache off, stop at EOS
     only; one process.
  b  one question at a time, greedy, KV cache on, stop strings; one process.
  One-process modes (a, b, c_1proc) use the faster of torch's default thread count and one thread, picked by a
  short probe: on a shared 2-core machine the two threads of one process wait on each other at every small
  operation (measured up to 6x slower under load), so the baselines are not handicapped by it.
  c  this harness, greedy, KV cache on, per-row stop, length-sorted batches of --batch_size:
     c_1proc   `evaluation.evaluate_records` in this process;
     c_ranks   the command `launcher/evaluate.py` data-parallel under torchrun, --ranks processes (default: one per
               CPU core on a CPU, 1 on a GPU) of one thread each, as the harness is meant to be run on a CPU.
               Only generation is timed (the harness's own `timing` in summary.json), not process start-up.
c runs all N questions. a and b generate one question at a time, so their questions/s does not depend on how
many they run, only on which: they run --reference_n and --single_n of the N, picked evenly along the sorted
prompt lengths so that the subsets have the N questions' length profile (mode a takes minutes per question on
2 CPU cores). Greedy batched decoding is exact (tests/test_evaluation.py), so b and c must produce the same
outputs for the same questions: the JSON says whether they did.

Model: --base_model, else the embedded SmolLM2-135M-Instruct (`default_model.prepare_default_model()`).
Questions: the first N of ../shared/data/math/gsm8k/test.json when present, else N generated test-split problems
(`adapters_ds.demo.problems`). Prints one JSON object: questions/s per mode and the ratios c/a and c/b.

Tensor-parallel mode (`--tensor_parallel_mode`): the evaluation command on the same questions three ways,

    python bench/eval_throughput.py --tensor_parallel_mode [--base_model PATH | --random_llama 160m|1.1b] [--n 16]

  tp2  2 ranks, one model sharded between them (--tensor_parallel 2);
  dp2  2 ranks, a whole model each (--tensor_parallel 1: data parallelism);
  one  1 rank.
Every rank has one thread, so the modes differ only in how the work is laid out (and dp2 and one compute exactly the
same products). Per mode: questions/s (the harness's own generation timing), each rank's resident parameter bytes
(summary.json), each rank process's peak resident memory sampled from /proc every 50 ms (anonymous: the process's
own allocations; total: also the mapped pages of the checkpoint files it read), the whole command's wall time, and
whether the outputs equal the one-rank outputs. The ranks run with a fixed malloc mmap threshold
(MALLOC_MMAP_THRESHOLD_), so that large freed buffers (the gathers of loading) go back to the system and the resident
size follows the live tensors rather than what glibc keeps for reuse. The model needs a head count divisible by 2:
--base_model, else a random LLaMA-shaped model (`RANDOM_LLAMAS`, bf16, the embedded model's tokenizer) built into a
temporary folder. Random weights give nearly flat logits, so in bf16 a sharded layer's other rounding can flip a
near-tie: there tp2's outputs may differ from the others.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

from adapters_ds.demo.default_model import prepare_default_model
from adapters_ds.demo.problems import generate_records
from adapters_ds.evaluation.generation import decode, encode_prompts, generate_ids, left_pad
from adapters_ds.evaluation.harness import evaluate_records
from adapters_ds.hardware import accelerator_device, resolve_dtype
from adapters_ds.modeling import load_base_model, load_tokenizer, parameter_counts
from adapters_ds.prompts import build_prompt

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "math" / "gsm8k" / "test.json"


def load_questions(n: int) -> tuple[list[dict], str]:
    if GSM8K.is_file():
        return json.loads(GSM8K.read_text())[:n], str(GSM8K)
    return generate_records(n, seed=0, split="test"), "adapters_ds.demo.problems (generated, test split)"


def evenly_spaced(lengths: list[int], k: int) -> list[int]:
    """k indices whose lengths spread over the whole sorted range (the middle of k equal slices), in index order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return sorted(order[int((j + 0.5) * len(order) / k)] for j in range(k))


@torch.inference_mode()
def reference_mode(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int) -> list[int]:
    """Mode a: the number of new tokens of each answer."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=4,
        use_cache=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    device = next(model.parameters()).device
    counts = []
    for ids in prompt_ids:
        input_ids, attention_mask = left_pad([ids], tokenizer.pad_token_id, device)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        counts.append(out.shape[1] - input_ids.shape[1])
    return counts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankMemory(threading.Thread):
    """Peak resident memory of each rank of one command (the processes whose environment holds `marker`), sampled
    from /proc every 50 ms: RssAnon (the process's own allocations) and VmRSS (also mapped file pages)."""

    def __init__(self, marker: str) -> None:
        super().__init__(daemon=True)
        self.marker, self.stop, self.peaks = marker.encode(), threading.Event(), {}

    def _ranks(self) -> dict[int, int]:
        found = {}
        for entry in Path("/proc").iterdir():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                cmdline = (entry / "cmdline").read_bytes()
            except (OSError, ValueError):  # not a process, gone, or not ours
                continue
            if self.marker in environ and b"evaluate.py" in cmdline and b"torch.distributed.run" not in cmdline:
                rank = next((v[5:] for v in environ if v.startswith(b"RANK=")), b"0")
                found[int(rank)] = int(entry.name)
        return found

    def run(self) -> None:
        while not self.stop.wait(0.05):
            for rank, pid in self._ranks().items():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                values = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status.splitlines()
                          if line.startswith(("RssAnon:", "VmRSS:"))}  # fmt: skip
                peak = self.peaks.setdefault(rank, {"anonymous": 0, "total": 0})
                peak["anonymous"] = max(peak["anonymous"], values.get("RssAnon", 0))
                peak["total"] = max(peak["total"], values.get("VmRSS", 0))


def run_command(
    base: str, records: list[dict], args: argparse.Namespace, ranks: int, dtype: str, extra: tuple = (),
    threads: int = 1, memory_hygiene: bool = False,
) -> dict:  # fmt: skip
    """The evaluation command under torchrun on `ranks` ranks of `threads` threads: its summary's timing, its
    outputs, each rank's peak memory and the command's wall time."""
    with tempfile.TemporaryDirectory(prefix="eval_bench_") as tmp:
        data = Path(tmp) / "data" / "bench"
        data.mkdir(parents=True)
        (data / "test.json").write_text(json.dumps(records))
        out = Path(tmp) / "out"
        drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_SIZE")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        marker = f"EVAL_BENCH_RUN={uuid.uuid4().hex}"
        env.update(OMP_NUM_THREADS=str(threads), EVAL_BENCH_RUN=marker.split("=")[1])
        if memory_hygiene:
            env["MALLOC_MMAP_THRESHOLD_"] = "131072"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
            "--master_port", str(_free_port()), str(REPO / "launcher" / "evaluate.py"),
            "--base_model", base, "--datasets", "bench", "--data_dir", str(data.parent), "--output_dir", str(out),
            "--batch_size", str(args.batch_size), "--max_new_tokens", str(args.max_new_tokens), "--dtype", dtype,
            *extra,
        ]  # fmt: skip
        memory = RankMemory(marker)
        memory.start()
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        memory.stop.set()
        memory.join()
        if proc.returncode != 0:
            raise RuntimeError(f"harness run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        timing = json.loads((out / "summary.json").read_text())["timing"]
        rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    return {
        "timing": timing["datasets"]["bench"],
        "summary_timing": timing,
        "outputs": [row["output"] for row in rows],
        "peak_memory_bytes": [memory.peaks.get(rank) for rank in range(ranks)],
        "wall_seconds": round(wall, 1),
    }


def harness_ranks(base: str, records: list[dict], args: argparse.Namespace, ranks: int, dtype: str) -> dict:
    """Mode c_ranks: the evaluation command under torchrun; its own generation timing and its outputs."""
    return run_command(base, records, args, ranks, dtype)


# LLaMA shapes whose head counts 2 divides: about 160M parameters, and TinyLlama's 1.1B (embeddings: the embedded
# model's vocabulary, 49152).
RANDOM_LLAMAS = {
    "160m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4),
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4),
}  # fmt: skip


def random_llama(preset: str, folder: Path) -> str:
    """A LLaMA-shaped model of random bf16 weights in `folder`, with the embedded model's tokenizer."""
    tokenizer = load_tokenizer(str(prepare_default_model()))
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, **ids, **RANDOM_LLAMAS[preset])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return str(folder)


def tensor_parallel_mode(args: argparse.Namespace) -> None:
    """--tensor_parallel_mode: tp2, dp2 and one (see the module docstring); prints one JSON object."""
    with tempfile.TemporaryDirectory(prefix="eval_bench_model_") as tmp:
        base = args.base_model or random_llama(args.random_llama, Path(tmp) / "model")
        dtype = str(resolve_dtype(args.dtype, accelerator_device())).removeprefix("torch.")
        total, _ = parameter_counts(base)
        records, source = load_questions(args.n)
        cores = os.cpu_count() or 1
        result: dict = {
            "model": args.base_model or f"random LLaMA-shaped {args.random_llama}",
            "parameters": total,
            "model_bytes": total * torch.empty((), dtype=getattr(torch, dtype)).element_size(),
            "dtype": dtype,
            "cpu": platform.processor() or platform.machine(),
            "cpu_cores": cores,
            "questions": len(records),
            "source": source,
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
            "load_avg_1min_before": os.getloadavg()[0],
        }
        layouts = {"tp2": (2, ("--tensor_parallel", "2")), "dp2": (2, ("--tensor_parallel", "1")), "one": (1, ())}
        runs = {name: run_command(base, records, args, n, dtype, extra, memory_hygiene=True)
                for name, (n, extra) in layouts.items()}  # fmt: skip
    modes = {}
    for name, run in runs.items():
        modes[name] = {
            "ranks": layouts[name][0],
            "questions_per_s": run["timing"]["questions_per_s"],
            "generation_seconds": run["timing"]["seconds"],
            "command_wall_seconds": run["wall_seconds"],
            "parameter_bytes_per_rank": run["summary_timing"]["parameter_bytes_per_rank"],
            "peak_memory_bytes_per_rank": run["peak_memory_bytes"],
        }
    result["modes"] = modes
    result["outputs_equal_one_rank"] = {
        name: runs[name]["outputs"] == runs["one"]["outputs"] for name in ("tp2", "dp2")
    }
    one = runs["one"]["summary_timing"]["parameter_bytes_per_rank"][0]
    result["tp2_parameter_bytes_share"] = round(modes["tp2"]["parameter_bytes_per_rank"][0] / one, 3)
    result["load_avg_1min_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base_model", help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--n", type=int, default=64, help="questions for mode c")
    parser.add_argument("--single_n", type=int, default=16, help="of those, questions for mode b")
    parser.add_argument("--reference_n", type=int, default=2, help="of those, questions for mode a (0: skip a)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32, help="mode c's batch size (per rank)")
    parser.add_argument("--ranks", type=int, help="mode c_ranks processes (default: CPU cores on a CPU, 1 on a GPU)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument(
        "--tensor_parallel_mode", action="store_true", help="TP 2 vs 2 data-parallel ranks vs 1 rank (see above)"
    )
    parser.add_argument("--random_llama", default="1.1b", choices=tuple(RANDOM_LLAMAS), help="tensor-parallel mode")
    args = parser.parse_args()
    if args.tensor_parallel_mode:
        tensor_parallel_mode(args)
        return

    base = args.base_model
    if base is None:
        base = str(prepare_default_model())
    device = accelerator_device()
    dtype = resolve_dtype(args.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    ranks = args.ranks or ((os.cpu_count() or 1) if device.type == "cpu" else 1)
    model = load_base_model(base, dtype=dtype).to(device).eval()
    tokenizer = load_tokenizer(base)
    records, source = load_questions(args.n)
    prompts = [build_prompt(r["instruction"], r.get("input") or "") for r in records]
    encoded = encode_prompts(tokenizer, prompts)
    lengths = [len(ids) for ids in encoded]
    default_threads = torch.get_num_threads()
    generate_ids(model, tokenizer, encoded[:2], 4)  # warm-up: first calls allocate and pick kernels

    result: dict = {
        "model": base,
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "dtype": dtype_name,
        "questions": len(records),
        "source": source,
        "mean_prompt_tokens": round(sum(lengths) / len(lengths), 1),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "load_avg_1min_before": os.getloadavg()[0],
    }
    modes: dict = {}

    # c_ranks first: it runs in other processes while this one waits
    c_ranks = harness_ranks(base, records, args, ranks, dtype_name)
    modes["c_ranks"] = {
        "ranks": ranks,
        "threads_per_rank": 1,
        "questions": c_ranks["timing"]["generated"],
        "seconds": c_ranks["timing"]["seconds"],
        "questions_per_s": c_ranks["timing"]["questions_per_s"],
    }

    # Which thread count suits one process here: a short probe, then b, c_1proc and a all use the faster one.
    single = evenly_spaced(lengths, min(args.single_n, len(records)))
    probe = {}
    for threads in dict.fromkeys((default_threads, 1)):
        torch.set_num_threads(threads)
        start = time.perf_counter()
        generate_ids(model, tokenizer, [encoded[single[0]]], 16)
        probe[threads] = time.perf_counter() - start
    best_threads = min(probe, key=probe.get)
    torch.set_num_threads(best_threads)
    result["thread_probe_seconds"] = {f"threads{t}": round(sec, 2) for t, sec in probe.items()}

    start = time.perf_counter()
    ids = [generate_ids(model, tokenizer, [encoded[i]], args.max_new_tokens)[0] for i in single]
    seconds = time.perf_counter() - start
    outputs_b = [decode(tokenizer, x) for x in ids]
    modes["b_batch1"] = {
        "threads": best_threads,
        "questions": len(single),
        "seconds": round(seconds, 2),
        "questions_per_s": len(single) / seconds,
        "mean_new_tokens": sum(map(len, ids)) / len(ids),
    }

    start = time.perf_counter()
    rows = evaluate_records(model, tokenizer, records, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    seconds = time.perf_counter() - start
    modes["c_1proc"] = {
        "threads": best_threads,
        "questions": len(rows),
        "seconds": round(seconds, 2),
        "questions_per_s": len(rows) / seconds,
        "accuracy_pct": sum(r["correct"] for r in rows) * 100.0 / len(rows),
    }
    result["b_c_outputs_identical"] = (
        outputs_b == [rows[i]["output"] for i in single] == [c_ranks["outputs"][i] for i in single]
    )

    if args.reference_n > 0:
        reference = evenly_spaced(lengths, min(args.reference_n, len(records)))
        start = time.perf_counter()
        counts = reference_mode(model, tokenizer, [encoded[i] for i in reference], args.max_new_tokens)
        seconds = time.perf_counter() - start
        modes["a_reference"] = {
            "threads": best_threads,
            "questions": len(reference),
            "seconds": round(seconds, 2),
            "questions_per_s": len(reference) / seconds,
            "mean_new_tokens": sum(counts) / len(counts),
        }

    result["modes"] = modes
    result["load_avg_1min_after"] = os.getloadavg()[0]
    b = modes["b_batch1"]["questions_per_s"]
    c = max(modes["c_ranks"]["questions_per_s"], modes["c_1proc"]["questions_per_s"])
    if "a_reference" in modes:
        a = modes["a_reference"]["questions_per_s"]
        result["c_over_a"] = round(c / a, 1)
        result["c_1proc_over_a"] = round(modes["c_1proc"]["questions_per_s"] / a, 1)
    result["c_over_b"] = round(c / b, 2)
    result["c_1proc_over_b"] = round(modes["c_1proc"]["questions_per_s"] / b, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
