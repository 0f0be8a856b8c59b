"""Evaluation throughput: the reference harness's decoding mode against this harness, same model, same questions.

    python bench/eval_throughput.py [--base_model PATH] [--n 32] [--max_new_tokens 64] [--batch_size 32]
                                    [--reference_n 4] [--dtype auto|float32|bfloat16]

Modes, each over the same questions and the same max_new_tokens, measured in this one run:
  a  the reference (LLM-Adapters `evaluate.py`): one question at a time, 4-beam search, KV cache off, stopping
     at EOS only;
  b  one question at a time, greedy, KV cache on, stop strings (the harness with --batch_size 1);
  c  this harness: `evaluation.evaluate_records`, length-sorted batches of --batch_size, greedy, KV cache on,
     per-row stop at EOS or a stop string.
Mode a costs minutes per question on a 2-core CPU (each step reruns the whole sequence for 4 beams), so it runs
on --reference_n of the N questions, picked evenly along their sorted prompt lengths so that its per-question
time represents all N; its questions/s is compared with the others'. b and c run all N, and because batched greedy
decoding is exact (tests/test_evaluation.py), they must give the same outputs: the JSON says whether they did.

Model: --base_model, else the embedded SmolLM2-135M-Instruct (`default_model.prepare_default_model()`).
Questions: the first N of ../shared/data/math/gsm8k/test.json when present, else N generated test-split problems
(`adapters_ds.mathdata`). Prints one JSON object: questions/s per mode and the ratios c/a and c/b.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

from adapters_ds.evaluation import evaluate_records
from adapters_ds.generation import (
    accelerator_device,
    decode,
    encode_prompts,
    generate_ids,
    left_pad,
    resolve_dtype,
)
from adapters_ds.prompts import build_prompt

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "math" / "gsm8k" / "test.json"


def questions(n: int) -> tuple[list[dict], str]:
    if GSM8K.is_file():
        return json.loads(GSM8K.read_text())[:n], str(GSM8K)
    from adapters_ds.mathdata import generate_records

    return generate_records(n, seed=0, split="test"), "adapters_ds.mathdata (generated, test split)"


def evenly_spaced(lengths: list[int], k: int) -> list[int]:
    """k indices whose lengths spread over the whole sorted range (the middle of k equal slices)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[int((j + 0.5) * len(order) / k)] for j in range(k)]


@torch.inference_mode()
def reference_mode(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int) -> list[int]:
    """Mode a; returns the number of new tokens of each answer."""
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


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base_model", help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--n", type=int, default=32, help="questions for modes b and c")
    parser.add_argument("--reference_n", type=int, default=4, help="of those, questions for mode a")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32, help="mode c's batch size")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--modes", default="a,b,c", help="subset of a,b,c to run")
    args = parser.parse_args()

    from adapters_ds.modeling import load_base_model, load_tokenizer

    base = args.base_model
    if base is None:
        from adapters_ds.default_model import prepare_default_model

        base = str(prepare_default_model())
    device = accelerator_device()
    dtype = resolve_dtype(args.dtype, device)
    model = load_base_model(base, dtype=dtype).to(device).eval()
    tokenizer = load_tokenizer(base)
    records, source = questions(args.n)
    prompts = [build_prompt(r["instruction"], r.get("input") or "") for r in records]
    encoded = encode_prompts(tokenizer, prompts)
    modes = set(args.modes.split(","))

    # warm-up: first calls allocate and pick kernels
    generate_ids(model, tokenizer, encoded[:2], 4)

    result: dict = {
        "model": base,
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "questions": len(records),
        "source": source,
        "mean_prompt_tokens": round(sum(map(len, encoded)) / len(encoded), 1),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "load_avg_before": os.getloadavg()[0],
    }
    modes_out = {}
    outputs_b = None
    if "a" in modes:
        subset = evenly_spaced([len(ids) for ids in encoded], min(args.reference_n, len(encoded)))
        counts, seconds = timed(
            lambda: reference_mode(model, tokenizer, [encoded[i] for i in subset], args.max_new_tokens)
        )
        modes_out["a_reference_beam4_nocache_batch1"] = {
            "questions": len(subset),
            "seconds": round(seconds, 2),
            "questions_per_s": len(subset) / seconds,
            "mean_new_tokens": sum(counts) / len(counts),
        }
    if "b" in modes:

        def run_b():
            return [generate_ids(model, tokenizer, [ids], args.max_new_tokens)[0] for ids in encoded]

        ids_b, seconds = timed(run_b)
        outputs_b = [decode(tokenizer, ids) for ids in ids_b]
        modes_out["b_greedy_cache_batch1"] = {
            "questions": len(encoded),
            "seconds": round(seconds, 2),
            "questions_per_s": len(encoded) / seconds,
            "mean_new_tokens": sum(map(len, ids_b)) / len(ids_b),
        }
    if "c" in modes:
        rows, seconds = timed(
            lambda: evaluate_records(
                model, tokenizer, records, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens
            )
        )
        modes_out["c_harness_batched"] = {
            "questions": len(rows),
            "seconds": round(seconds, 2),
            "questions_per_s": len(rows) / seconds,
            "accuracy_pct": sum(r["correct"] for r in rows) * 100.0 / len(rows),
        }
        if outputs_b is not None:
            result["b_and_c_outputs_identical"] = outputs_b == [row["output"] for row in rows]
    result["modes"] = modes_out
    result["load_avg_after"] = os.getloadavg()[0]
    rate = {key[0]: value["questions_per_s"] for key, value in modes_out.items()}
    if "c" in rate and "a" in rate:
        result["c_over_a"] = round(rate["c"] / rate["a"], 1)
    if "c" in rate and "b" in rate:
        result["c_over_b"] = round(rate["c"] / rate["b"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
