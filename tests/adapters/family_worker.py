"""Run under a 2-rank launcher: each case of CASES_JSON (a base model folder, an adapter method and its options)
trained a few steps under ZeRO-3 (fp32) with the real engine builder, every rank on its own fixed batch; the adapter
saved with the real saver to OUT_DIR/<case>, and rank 0 writes every case's per-step losses (mean over ranks) to
OUT_DIR/results.json. Plugin modules (`ADAPTERS_DS_METHODS`) load first, as in every command, so a family record
registered by one is known here. Used by test_families.py.

    deepspeed --num_gpus 2 family_worker.py CASES_JSON OUT_DIR

CASES_JSON: {"<case>": {"base": DIR, "method": NAME, "options": {...}}, ...}
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch

from adapters_ds.adapters.registry import get_method, load_plugins
from adapters_ds.adapters.storage import save_adapter
from adapters_ds.distributed import Ranks, init_distributed
from adapters_ds.modeling import load_base_model
from adapters_ds.training.ds_config import load_ds_config, resolve_ds_config
from adapters_ds.training.engine import build_engine
from adapters_ds.training.loss import causal_lm_loss_sum

REPO = Path(__file__).resolve().parents[2]
STEPS, MICRO, SEQ, VOCAB, LR = 4, 2, 10, 500, 1e-2


def batch(rank: int) -> dict[str, torch.Tensor]:
    """The same batch at every step: a few steps must lower its loss whatever the method."""
    ids = torch.randint(3, VOCAB, (MICRO, SEQ), generator=torch.Generator().manual_seed(100 + rank))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def train(base: str, method: str, options: dict, out: Path) -> list[float]:
    info = init_distributed()
    raw = load_ds_config(str(REPO / "ds_configs" / "zero3.json"))
    raw["bf16"] = {"enabled": False}
    config = resolve_ds_config(raw, world_size=info.world_size, micro_batch_size=MICRO,
                               batch_size=MICRO * info.world_size, learning_rate=LR, weight_decay=0.0,
                               max_grad_norm=1.0)  # fmt: skip
    torch.manual_seed(0)
    adapter_config = get_method(method).config(**options)
    built = build_engine(lambda dtype: load_base_model(base, dtype=dtype), config, adapter_config, learning_rate=LR)
    engine = built.engine
    engine.train()
    data = {k: v.to(engine.device) for k, v in batch(info.rank).items()}
    losses = []
    for _ in range(STEPS):
        loss = causal_lm_loss_sum(engine, data) / (MICRO * (SEQ - 1))
        engine.backward(loss)
        engine.step()
        losses.append(sum(Ranks(start=False).gather(loss.item())) / info.world_size)
    save_adapter(engine.module, adapter_config, out)
    del engine, built
    gc.collect()
    return losses


def main() -> None:
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    cases, out = json.loads(Path(argv[0]).read_text()), Path(argv[1])
    load_plugins()
    results = {name: train(c["base"], c["method"], c.get("options", {}), out / name) for name, c in cases.items()}
    if Ranks(start=False).is_main:
        (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
