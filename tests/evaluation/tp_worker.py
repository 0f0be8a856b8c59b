"""One rank of the tensor-parallel tests (`test_tensor_parallel.py` starts it under torchrun): executes a plan written
by the test and writes what each rank saw to `<plan folder>/rank<N>.json`.

The plan: `checks`, models (a folder, an optional adapter folder) to load sharded (`load_sharded_model`) and unsharded
(`harness.load_model`, adapters attached, not merged) and compare: logits of a batch, greedy and beam-search token ids
of a left-padded batch (with the group's consensus), parameter bytes; then `runs`, argument lists of the evaluation
command run in this process group one after the other. A run with `kill_after: k` dies like a killed run after its
k-th generated batch on every rank (the next run of the plan resumes it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from adapters_ds.cli import evaluate as cli
from adapters_ds.distributed import Ranks, init_distributed, shutdown
from adapters_ds.evaluation import harness
from adapters_ds.evaluation.generation import generate_ids
from adapters_ds.evaluation.tensor_parallel import group_consensus, load_sharded_model, parameter_bytes

PROMPTS = [[1, 17, 250, 33, 99, 7], [1, 5, 400], [1, 300, 12, 8, 77, 190, 45, 3, 66]]  # lengths differ: left padding


class Killed(BaseException):
    """What a kill does to the harness: it stops between two batches (no handler catches a BaseException)."""


def check(spec: dict, ranks: Ranks) -> dict:
    dtype = torch.float32
    sharded, tokenizer, method = load_sharded_model(spec["model"], spec.get("adapter"), dtype, ranks)
    whole, _, _ = harness.load_model(spec["model"], spec.get("adapter"), dtype, torch.device("cpu"), merge=False)
    ids = torch.tensor([PROMPTS[0] * 2, PROMPTS[2] + [9, 10, 11]])
    with torch.inference_mode():
        difference = (sharded(input_ids=ids).logits - whole(input_ids=ids).logits).abs().max().item()
    result = {"method": method, "max_logit_difference": difference}
    for beams in (1, 2):
        consensus = [group_consensus(ranks, beams)]
        result[f"tokens_sharded_{beams}"] = generate_ids(
            sharded, tokenizer, PROMPTS, 8, num_beams=beams, stop_strings=(), logits_processor=consensus
        )
        result[f"tokens_whole_{beams}"] = generate_ids(whole, tokenizer, PROMPTS, 8, num_beams=beams, stop_strings=())
    result["bytes_sharded"], result["bytes_whole"] = parameter_bytes(sharded), parameter_bytes(whole)
    return result


def run(argv: list[str], kill_after: int | None) -> str:
    real = harness._generate_rows
    made = []

    def counting(*args, **kwargs):
        if kill_after is not None and len(made) == kill_after:
            raise Killed
        made.append(1)
        return real(*args, **kwargs)

    harness._generate_rows = counting
    try:
        cli.main(argv)
    except Killed:
        return "killed"
    finally:
        harness._generate_rows = real
    return "done"


def main() -> None:
    folder = Path(sys.argv[1])
    plan = json.loads((folder / "plan.json").read_text())
    init_distributed()
    ranks = Ranks(tensor_parallel=2)
    seen = {"checks": {name: check(spec, ranks) for name, spec in plan["checks"].items()}, "runs": []}
    for spec in plan["runs"]:
        seen["runs"].append(run(spec["argv"], spec.get("kill_after")))
    (folder / f"rank{ranks.rank}.json").write_text(json.dumps(seen))
    shutdown()


if __name__ == "__main__":
    main()
