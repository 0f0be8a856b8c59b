"""Run under a 2-rank launcher: each case of CASES_JSON (a base model folder, an adapter method and its options)
trained a few steps under ZeRO-3 (fp32) with the real engine builder, every rank on its own fixed batch; the adapter
saved with the real saver to OUT_DIR/<case>, and rank 0 writes every case's per-step losses (mean over ranks) to
OUT_DIR/results.json. Plugin modules (`ADAPTERS_DS_METHODS`) load first, as in every command, so a family record
registered by one is known here. Used by test_families.py.

    deepspeed --num_gpus 2 family_worker.py CASES_JSON OUT_DIR

CASES_JSON: {"<case>": {"base": DIR, "method": NAME, "options": {...}, "ranks": 2, "force_router": false}, ...}
A case run by a single process with "ranks": 2 trains on both ranks' batches at once (the 2-rank run's reference).
"force_router": rank 0's tokens are routed to experts 0 and 1 only (a forward hook on every router rewrites its
choice), so on one rank the other experts get no token; a 2-rank forced case also records each rank's tokens per expert
(summed over layers and steps) as "<case>_tokens_per_expert", the proof that the forcing happened.
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
from adapters_ds.families import family_of
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


def force_router(model: torch.nn.Module, rows: int) -> None:
    """Route the first `rows` tokens of every forward to experts 0 and 1 only (the other experts' ids folded onto
    them): the routers' outputs are (logits, weights, expert ids)."""
    layout = family_of(model.config.model_type, "the forced router").layout

    def hook(module, args, output):
        logits, weights, experts = output
        experts = experts.clone()
        experts[:rows] = experts[:rows] % 2
        return logits, weights, experts

    for block in model.get_submodule(layout.blocks):
        block.get_submodule(layout.router).register_forward_hook(hook)


def count_routed(model: torch.nn.Module) -> torch.Tensor:
    """Tokens each expert receives in this process from now on (summed over layers and steps): a forward pre-hook on
    every experts module reads the expert ids it is called with."""
    layout = family_of(model.config.model_type, "counting routed tokens").layout
    experts = getattr(model.config, "num_local_experts", None) or model.config.num_experts
    counts = torch.zeros(experts, dtype=torch.long)

    def hook(module, args):
        counts.add_(torch.bincount(args[1].flatten().cpu(), minlength=experts))

    for block in model.get_submodule(layout.blocks):
        block.get_submodule(layout.experts).register_forward_pre_hook(hook)
    return counts


def train(
    base: str, method: str, options: dict, out: Path, ranks: int = 2, forced: bool = False
) -> tuple[list[float], list[list[int]] | None]:
    info = init_distributed()
    held = [info.rank] if info.world_size > 1 else list(range(ranks))  # whose batches this process trains on
    raw = load_ds_config(str(REPO / "ds_configs" / "zero3.json"))
    raw["bf16"] = {"enabled": False}
    micro = MICRO * len(held)
    config = resolve_ds_config(raw, world_size=info.world_size, micro_batch_size=micro,
                               batch_size=micro * info.world_size, learning_rate=LR, weight_decay=0.0,
                               max_grad_norm=1.0)  # fmt: skip
    torch.manual_seed(0)
    adapter_config = get_method(method).config(**options)
    built = build_engine(lambda dtype: load_base_model(base, dtype=dtype), config, adapter_config, learning_rate=LR)
    engine = built.engine
    engine.train()
    if forced:
        force_router(engine.module, MICRO * SEQ if held[0] == 0 else 0)
        routed = count_routed(engine.module)
    batches = [batch(r) for r in held]
    data = {k: torch.cat([b[k] for b in batches]).to(engine.device) for k in batches[0]}
    losses = []
    for _ in range(STEPS):
        loss = causal_lm_loss_sum(engine, data) / (micro * (SEQ - 1))
        engine.backward(loss)
        engine.step()
        losses.append(sum(Ranks(start=False).gather(loss.item())) / info.world_size)
    save_adapter(engine.module, adapter_config, out)
    del engine, built
    gc.collect()
    per_rank = Ranks(start=False).gather(routed.tolist()) if forced and info.world_size > 1 else None
    return losses, per_rank


def main() -> None:
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    cases, out = json.loads(Path(argv[0]).read_text()), Path(argv[1])
    load_plugins()
    results = {}
    for name, c in cases.items():
        where = out / "adapters" / name
        options, ranks, forced = c.get("options", {}), c.get("ranks", 2), c.get("force_router", False)
        results[name], routed = train(c["base"], c["method"], options, where, ranks, forced)
        if routed is not None:
            results[f"{name}_tokens_per_expert"] = routed
    if Ranks(start=False).is_main:
        (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
