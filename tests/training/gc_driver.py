"""Run under a 2-rank launcher: every registered adapter method (default settings) trained a few steps under each
given DeepSpeed config, with and without gradient checkpointing, on the same batches; rank 0 writes per-step losses
and the final adapter tensors to a JSON file. Used by test_gradient_checkpointing.py.

    deepspeed --num_gpus 2 gc_driver.py BASE_DIR CONFIG_JSON[,CONFIG_JSON...] OUT_JSON
"""

from __future__ import annotations

import gc
import json
import sys

import torch

from adapters_ds.adapters.base import adapter_parameters
from adapters_ds.adapters.registry import METHODS
from adapters_ds.distributed import Ranks, init_distributed
from adapters_ds.modeling import load_base_model
from adapters_ds.training.ds_config import load_ds_config, resolve_ds_config
from adapters_ds.training.engine import build_engine
from adapters_ds.training.loss import causal_lm_loss_sum
from adapters_ds.zero import gathered

STEPS, MICRO, SEQ, VOCAB = 3, 2, 12, 500


def batches(rank: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(100 + rank)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(3, VOCAB, (MICRO, SEQ), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def train(base: str, config_path: str, method: str, checkpointing: bool) -> dict:
    info = init_distributed()
    config = resolve_ds_config(load_ds_config(config_path), world_size=info.world_size, micro_batch_size=MICRO,
                               batch_size=MICRO * info.world_size, learning_rate=1e-2, weight_decay=0.0,
                               max_grad_norm=1.0)  # fmt: skip
    torch.manual_seed(0)  # the same adapter initialisation and dropout / gate noise in both runs
    built = build_engine(lambda dtype: load_base_model(base, dtype=dtype), config, METHODS[method].config(),
                         learning_rate=1e-2, gradient_checkpointing=checkpointing)  # fmt: skip
    engine = built.engine
    engine.train()
    losses = []
    for batch in batches(info.rank):
        loss = causal_lm_loss_sum(engine, {k: v.to(engine.device) for k, v in batch.items()}) / (MICRO * (SEQ - 1))
        engine.backward(loss)
        engine.step()
        losses.append(Ranks(start=False).gather(loss.item()))
    params = adapter_parameters(engine.module)
    with gathered(params.values()):
        final = {name: p.detach().float().flatten().tolist() for name, p in params.items()}
    del engine, built
    gc.collect()
    return {"losses": losses, "adapter": final}


def main() -> None:
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    base, configs, out = argv[0], argv[1].split(","), argv[2]
    results = {}
    for config_path in configs:
        for method in sorted(METHODS):
            for checkpointing in (False, True):
                key = f"{config_path}|{method}|{'gc' if checkpointing else 'plain'}"
                results[key] = train(base, config_path, method, checkpointing)
    if Ranks(start=False).is_main:
        with open(out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
