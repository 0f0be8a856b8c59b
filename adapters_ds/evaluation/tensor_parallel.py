"""Tensor-parallel evaluation: a model too large for one device, sharded over a group of ranks by DeepSpeed's AutoTP,
the groups sharing the questions as ranks do without it.

`--tensor_parallel N` lays the ranks out in groups of N consecutive ranks (`distributed.Ranks`). Each group holds
one copy of the model, its blocks' linear layers split between the group's ranks by
`deepspeed.init_inference(model, tensor_parallel=...)` (AutoTP: the q/k/v and MLP input projections by output
features, the attention and MLP output projections by input features followed by an all-reduce in the group, the LM
head likewise). Every rank of a group runs the same batches; the groups split the batches as ranks do without
tensor parallelism, and the group leaders' rows are gathered to rank 0 (`harness.evaluate_dataset`).
`--tensor_parallel auto` takes the smallest N whose shard fits a rank's device memory (GPU) or its share of the
host's available memory (CPU), from the parameter count (the config, on the meta device) and the dtype (`auto_size`).

Loading (`load_sharded_model`): no rank needs the whole model. The base model loads partitioned over all ranks
(`modeling.load_base_model_partitioned`: each rank holds 1/world of every weight); the adapter is loaded into it and
merged or folded into those partitions, or taken off to be put back on the shards (`tp_adapters`); AutoTP gathers
one linear layer at a time, keeps this rank's shard of it and drops the rest (`collecting_cycles` makes that
prompt), and the weights it does not shard (embeddings, norms) are gathered whole. A rank's peak is about the larger
of its partitions and its final shard, plus one gathered weight; `bench/eval_throughput.py --tensor_parallel_mode`
measures it.

Which models (`check_tensor_parallel`, from the configs alone, before any weight loads): the families whose AutoTP
sharding is tested here (their record's `families.Family.tensor_parallel` is None); every other family is refused
with its record's reason. N must divide the attention heads and the key/value heads. Pruned models with per-layer
shapes are refused: AutoTP splits every layer by the head counts of the config, which such a model does not have.

Lockstep: a group's ranks must take the same decisions, or one would wait forever in an all-reduce its peer never
joins. At each generation step the group leader's choice (its next tokens under greedy search, its scores under beam
search) is broadcast in the group (`GroupConsensus`), so the ranks generate the same tokens and stop together.
Against one process, a row-parallel layer sums its products in another order, so logits differ in the last bits:
greedy outputs are the same unless two tokens tie to that precision (the tests compare them in fp32; in bf16 a
near-tie can go the other way).

DeepSpeed 0.19 workaround (`use_group_all_reduce`): on CPU, the shared-memory all-reduce that AutoTP's layers call
(`deepspeed.comm.inference_all_reduce`) ignores its process group and sums over all ranks of the node, and crashes
where the launcher did not set LOCAL_SIZE (torchrun). It is switched off, leaving the process group's own
all-reduce, unless one group is all ranks of one node as the `deepspeed` launcher starts them, where it is right.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import deepspeed
import deepspeed.comm.comm as deepspeed_comm
import torch
from deepspeed.accelerator import get_accelerator
from torch import nn
from transformers import LogitsProcessor

from adapters_ds.adapters.storage import load_adapter, read_adapter_config, read_adapter_tensors
from adapters_ds.distributed import Ranks, broadcast_tensor
from adapters_ds.errors import InputError
from adapters_ds.evaluation.tp_adapters import check_method, prepare_adapters, reattach
from adapters_ds.families import families, find_family
from adapters_ds.hardware import accelerator_device
from adapters_ds.modeling import load_base_model_partitioned, load_model_config, load_tokenizer, parameter_counts
from adapters_ds.pruned_model import needs_pruned_loader
from adapters_ds.zero import gathered, is_partitioned


def tp_families() -> list[str]:
    """The model types whose AutoTP sharding is supported: the tests compare it with the unsharded model."""
    return [name for name, family in families().items() if family.tensor_parallel is None]


FIT_SHARE = 0.8  # of a rank's memory, for the weights: the rest is for the KV cache and activations


def heads(config: Any) -> tuple[int, int]:
    """(attention heads, key/value heads) of a model config."""
    n = config.num_attention_heads
    return n, getattr(config, "num_key_value_heads", None) or n


def check_tensor_parallel(base_model: str, adapter_dir: str | None, size: int, no_merge: bool = False) -> None:
    """Refuse, from the configs alone (before any weight loads), a tensor-parallel size that cannot work; N = 1
    always can."""
    if size == 1:
        return
    config = load_model_config(base_model)
    family = find_family(config.model_type)
    if family is None or family.tensor_parallel is not None:
        why = family.tensor_parallel if family else "it has no family record"
        raise InputError(
            f"--tensor_parallel {size}: {config.model_type} models cannot be sharded: {why} (supported: "
            f"{', '.join(tp_families())}); evaluate with --tensor_parallel 1"
        )
    n_heads, n_kv = heads(config)
    if n_heads % size or n_kv % size:
        raise InputError(
            f"--tensor_parallel {size}: expected a divisor of the model's {n_heads} attention heads and {n_kv} "
            "key/value heads (each rank computes whole heads)"
        )
    if needs_pruned_loader(base_model):
        raise InputError(
            f"--tensor_parallel {size}: {base_model!r} is a pruned model with per-layer shapes, which tensor "
            "parallelism cannot split (it splits every layer by the config's head counts); evaluate with "
            "--tensor_parallel 1"
        )
    if adapter_dir is not None:
        if no_merge:
            raise InputError(f"--tensor_parallel {size}: LoRA is merged before sharding; drop --no_merge")
        check_method(read_adapter_config(adapter_dir)[0].method)


# ------------------------------------------------------------------------------------------------- sizing


def local_ranks(world_size: int) -> int:
    """Ranks on this node, as the launcher says (torchrun, deepspeed, slurm/launch.sh); else all of them."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(key, "").isdigit() and int(os.environ[key]) > 0:
            return int(os.environ[key])
    return world_size


def candidate_sizes(world_size: int, n_heads: int, n_kv: int, per_node: int) -> list[int]:
    """Tensor-parallel sizes possible here, ascending: divisors of the world and of the head counts whose groups
    tile the nodes (a group within one node, or whole nodes)."""
    return [
        n
        for n in range(1, world_size + 1)
        if world_size % n == 0
        and n_heads % n == 0
        and n_kv % n == 0
        and (per_node % n == 0 if n <= per_node else n % per_node == 0)
    ]


def pick_size(total: int, embedding: int, itemsize: int, capacity: float, sizes: list[int]) -> int:
    """The smallest of `sizes` whose shard (the input embedding whole, every other weight split) takes at most
    FIT_SHARE of `capacity` bytes; an InputError when none does."""
    for n in sizes:
        if (embedding + (total - embedding) / n) * itemsize <= FIT_SHARE * capacity:
            return n
    largest = sizes[-1]
    need = (embedding + (total - embedding) / largest) * itemsize
    raise InputError(
        f"--tensor_parallel auto: the model's {total / 1e9:.2f}B parameters do not fit: split {largest} ways (the "
        f"most these ranks allow) a rank needs {need / 2**30:.1f} GiB for weights, and keeps at most "
        f"{FIT_SHARE:.0%} of its {capacity / 2**30:.1f} GiB for them; launch more ranks"
    )


def rank_memory(per_node: int) -> float:
    """Bytes one rank may use: its device's memory on an accelerator, its share of the available host memory on
    CPU (the ranks of a node share it)."""
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return accelerator.available_memory() / per_node
    return accelerator.total_memory(accelerator.current_device())


def auto_size(base_model: str, dtype: torch.dtype, world_size: int) -> int:
    """`--tensor_parallel auto`: the smallest size whose shard fits (`pick_size`)."""
    total, embedding = parameter_counts(base_model)
    per_node = local_ranks(world_size)
    n_heads, n_kv = heads(load_model_config(base_model))
    sizes = candidate_sizes(world_size, n_heads, n_kv, per_node)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return pick_size(total, embedding, itemsize, rank_memory(per_node), sizes)


def resolve_size(
    option: int | str, base_model: str, adapter_dir: str | None, dtype: torch.dtype, ranks: Ranks, no_merge: bool
) -> int:
    """The tensor-parallel size of a run (`--tensor_parallel`: a number or "auto", decided on rank 0 for all),
    checked (`check_tensor_parallel`)."""
    size = ranks.on_main(lambda: auto_size(base_model, dtype, ranks.world_size)) if option == "auto" else option
    check_tensor_parallel(base_model, adapter_dir, size, no_merge)
    return size


# ------------------------------------------------------------------------------------------------- loading


class _GroupUnit:
    """The "model parallel unit" DeepSpeed's inference engine asks for its group; given one, the engine uses that
    group instead of creating one of the first N ranks (which would be wrong for every group but the first)."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def get_model_parallel_group(self) -> Any:
        return self.group

    def get_model_parallel_rank(self) -> int:
        return torch.distributed.get_rank(self.group)

    def get_model_parallel_world_size(self) -> int:
        return torch.distributed.get_world_size(self.group)


def use_group_all_reduce(ranks: Ranks) -> None:
    """Make AutoTP's all-reduces stay inside their group (see the module docstring, DeepSpeed 0.19 workaround)."""
    backend = deepspeed_comm.cdb
    one_node_group = ranks.tensor_parallel == ranks.world_size and os.environ.get("LOCAL_SIZE") == str(ranks.world_size)
    if not one_node_group and backend is not None and hasattr(backend, "shm_vector_kernel_level"):
        backend.shm_vector_kernel_level = 0  # read at each call: 0 sends every all-reduce to the process group


@contextlib.contextmanager
def collecting_cycles(interval_s: float = 0.2) -> Iterator[None]:
    """Run Python's cycle collector every `interval_s` seconds (from a helper thread) inside the block.

    Why: a ZeRO-3 parameter is referenced by its own methods (the gather and partition closures DeepSpeed attaches to
    it), so when AutoTP replaces a layer's partitioned weight by its shard, the partition is garbage that only the
    cycle collector frees, and it runs far too rarely on its own: every layer's partition would stay until AutoTP
    is done, a peak of partitions plus shards. Collected while AutoTP works, a rank's peak stays about its
    partitions plus one gathered layer."""
    stop = threading.Event()

    def collect() -> None:
        while not stop.wait(interval_s):
            gc.collect()

    thread = threading.Thread(target=collect, name="collecting_cycles", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        gc.collect()


@torch.no_grad()
def gather_remaining(model: nn.Module) -> None:
    """Give every parameter still partitioned by ZeRO-3 (the ones AutoTP does not shard: embeddings, norms) its whole
    value as an ordinary parameter; a tensor shared by several modules stays shared. Collective: every rank walks
    the same modules in the same order."""
    replaced: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id → (old, whole): the old one kept alive
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not is_partitioned(param):
                continue
            if id(param) not in replaced:
                with gathered([param]):
                    whole = nn.Parameter(param.data.clone(), requires_grad=False)
                replaced[id(param)] = (param, whole)
            setattr(module, name, replaced[id(param)][1])


def load_sharded_model(
    base_model: str, adapter_dir: str | None, dtype: torch.dtype, ranks: Ranks
) -> tuple[Any, Any, str]:
    """(model, tokenizer, adapter method or "none"): this rank's shard of the base model with the adapter, in eval
    mode on this rank's device, for the tensor-parallel group of `ranks` (`Ranks(tensor_parallel=N)`, N > 1). Call
    on every rank. Checked first with `check_tensor_parallel`."""
    if adapter_dir is not None:  # a bad adapter folder fails before the (slow) base model load
        read_adapter_config(adapter_dir)
        read_adapter_tensors(adapter_dir)
    model = load_base_model_partitioned(base_model, dtype)
    method, detached = "none", []
    if adapter_dir is not None:
        method = load_adapter(model, adapter_dir).method
        detached = prepare_adapters(model)
    use_group_all_reduce(ranks)
    parallel = {"tp_size": ranks.tensor_parallel, "tp_group": ranks.tp_group, "mpu": _GroupUnit(ranks.tp_group)}
    # AutoTP prints its plan on every rank: stdout is the summary's
    with contextlib.redirect_stdout(sys.stderr), collecting_cycles():
        engine = deepspeed.init_inference(
            model, tensor_parallel=parallel, dtype=dtype, replace_with_kernel_inject=False
        )
    model = engine.module
    gather_remaining(model)
    reattach(model, detached, ranks.tp_group)
    return model.to(accelerator_device()).eval(), load_tokenizer(base_model), method


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this rank holds (a shared tensor once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- generation


class GroupConsensus(LogitsProcessor):
    """Each generation step, every rank of a tensor-parallel group takes its leader's choice: the leader's next
    tokens (greedy: the scores become 0 there and -inf elsewhere) or its scores (beam search). The ranks' own choices
    agree already unless their logits differ in the last bits; this makes them agree always, so the group's ranks
    generate the same tokens and stop at the same step."""

    def __init__(self, group: Any, leader: int, greedy: bool) -> None:
        self.group, self.leader, self.greedy = group, leader, greedy

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.greedy:
            return broadcast_tensor(scores.contiguous(), src=self.leader, group=self.group)
        choice = broadcast_tensor(scores.argmax(-1), src=self.leader, group=self.group)  # (batch,)
        return torch.full_like(scores, float("-inf")).scatter_(-1, choice[:, None], 0.0)


def group_consensus(ranks: Ranks, num_beams: int) -> GroupConsensus | None:
    """The consensus of this rank's tensor-parallel group; None without tensor parallelism."""
    if ranks.tensor_parallel == 1:
        return None
    return GroupConsensus(ranks.tp_group, ranks.tp_leader, greedy=num_beams == 1)
