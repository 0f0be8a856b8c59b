"""Tensor-parallel evaluation (`evaluation.tensor_parallel`): sharded models against unsharded ones, the evaluation
command on 2 ranks sharded 2 ways against one process, groups of one rank, resume after a kill, bad sizes.

The multi-rank parts run as one torchrun of `tp_worker.py` (2 ranks on gloo, tiny models of every family AutoTP
shards); 4 ranks (2 groups of 2) would be too slow on a 2-core CI machine, so the group arithmetic is checked by its
two corners: 1 group of 2 ranks and 2 groups of 1 rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO
from launch import env as launch_env
from launch import free_port
from tiny_models import CONFIGS, RECENT_CONFIGS
from tiny_tokenizer import make_tokenizer
from transformers import AutoModelForCausalLM

from adapters_ds import InputError, LoRAConfig, ParallelConfig, SeriesConfig, inject_adapters, save_adapter
from adapters_ds.adapters.base import adapter_layers, adapter_parameters, detach
from adapters_ds.adapters.gates_paper import PaperGatesConfig
from adapters_ds.adapters.prefix import PrefixConfig
from adapters_ds.adapters.prompt import PromptConfig
from adapters_ds.cli import evaluate as cli
from adapters_ds.distributed import Ranks
from adapters_ds.evaluation import tensor_parallel as tp
from adapters_ds.modeling import parameter_counts
from adapters_ds.pruned_model import FORMAT, FORMAT_VERSION, SHAPES_NAME

QUESTIONS = [
    ("She has 12 apples and buys 30 more. How many apples does she have?", "42"),
    ("3 + 4", "7"),
    ("A box holds 6 pens. How many pens are in 7 boxes?", "42"),
    ("What is 100 - 37?", "63"),
    ("Half of 9", "4.5"),
    ("A train goes 60 miles an hour for 3 hours. How far does it go?", "180"),
]
BATCH, NEW_TOKENS = 2, 8  # 3 batches
# families AutoTP cannot shard, and what their refusal says
REFUSED = {
    "gpt2": ("Conv1D",),
    "bloom": ("ALiBi",),
    "olmo2": ("q_norm/k_norm", "across all heads"),  # OLMoE's attention is the same
    "phi3": ("fused qkv_proj", "config's head counts"),
}

ADAPTERS = {  # name: (family, config) of the adapters the tests save
    "lora": ("llama", LoRAConfig(r=4, alpha=8)),
    "series": ("llama", SeriesConfig(bottleneck_size=4, preset="houlsby")),
    "parallel": ("llama", ParallelConfig(bottleneck_size=4)),
    "gates": ("llama", PaperGatesConfig(lora_r=2)),
    "prompt": ("llama", PromptConfig(num_virtual_tokens=3)),
    "prefix": ("llama", PrefixConfig(num_virtual_tokens=3)),
    "series_qwen2": ("qwen2", SeriesConfig(bottleneck_size=4)),
    "parallel_gpt_neox": ("gpt_neox", ParallelConfig(bottleneck_size=4)),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(family: str, seed: int = 0):
    """A tiny model whose logits are far apart (initializer range 0.3): greedy choices are no near-ties, so outputs
    compare exactly although a sharded layer rounds differently."""
    config = {**CONFIGS, **RECENT_CONFIGS}[family]()
    config.initializer_range = 0.3
    if hasattr(config, "max_position_embeddings"):
        config.max_position_embeddings = 512  # prompt template + new tokens
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def _randomize(model, scale: float = 0.3) -> None:
    """Adapter weights away from their identity initialisation, so an adapter lost in sharding would show."""
    with torch.no_grad():
        for param in adapter_parameters(model).values():
            param.copy_(torch.randn(param.shape) * scale)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Models of every family AutoTP shards (plus refused ones), adapters of every method on LLaMA, a data set."""
    root = tmp_path_factory.mktemp("tp")
    for family in (*tp.tp_families(), "llama3", *REFUSED):  # llama3: Llama 3.x's RoPE scaling
        _model(family).save_pretrained(root / family)
        make_tokenizer(root / family)
    for name, (family, config) in ADAPTERS.items():
        model = _model(family)
        inject_adapters(model, config)
        _randomize(model, 1.0 if name == "gates" else 0.3)  # gates: θ in [-1, 1] opens, closes and scales units
        save_adapter(model, config, root / "adapters" / name)
    data = root / "data" / "Arith"
    data.mkdir(parents=True)
    records = [{"instruction": q, "input": "", "output": "", "answer": a} for q, a in QUESTIONS]
    (data / "test.json").write_text(json.dumps(records))
    return root


def _argv(assets: Path, family: str, out: Path, adapter: str | None = None, *extra: str) -> list[str]:
    argv = [
        "--base_model", str(assets / family), "--datasets", "Arith", "--data_dir", str(assets / "data"),
        "--output_dir", str(out), "--batch_size", str(BATCH), "--max_new_tokens", str(NEW_TOKENS),
        "--dtype", "float32", *extra,
    ]  # fmt: skip
    return [*argv, "--adapter_dir", str(assets / "adapters" / adapter)] if adapter else argv


def _same_results(out: Path, ref: Path) -> None:
    """Identical rows and summaries; only the timing section of summary.json may differ."""
    for name in ("Arith.jsonl", "summary.md"):
        assert (out / name).read_text() == (ref / name).read_text(), (out, name)
    summary, expected = (json.loads((d / "summary.json").read_text()) for d in (out, ref))
    summary.pop("timing"), expected.pop("timing")
    assert summary == expected


# ------------------------------------------------------------------------------------------- one process, fast


def _expect_error(capsys, argv: list[str], *fragments: str) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_bad_sizes_families_and_methods_are_one_line_errors(assets, tmp_path, capsys):
    out = tmp_path / "out"

    def sharded(family: str, size: str, adapter: str | None = None, *extra: str) -> list[str]:
        return _argv(assets, family, out, adapter, "--tensor_parallel", size, *extra)

    _expect_error(capsys, sharded("llama", "2"), "divisor of the number of ranks, 1")
    _expect_error(capsys, sharded("llama", "3"), "4 attention heads", "2 key/value")
    _expect_error(capsys, sharded("llama", "0"), "positive integer or 'auto'")
    _expect_error(capsys, sharded("llama", "two"), "'two'")
    for family, reason in REFUSED.items():
        _expect_error(capsys, sharded(family, "2"), f"{family} models cannot be sharded", *reason)
    _expect_error(capsys, sharded("llama", "2", "prefix"), "'prefix'", "lora")
    _expect_error(capsys, sharded("llama", "2", "lora", "--no_merge"), "--no_merge")
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    for f in (assets / "llama").iterdir():
        (pruned / f.name).write_bytes(f.read_bytes())
    shapes = {"format": FORMAT, "format_version": FORMAT_VERSION, "loads_with_transformers": False, "layers": []}
    (pruned / SHAPES_NAME).write_text(json.dumps(shapes))
    _expect_error(capsys, sharded("llama", "2", None, "--base_model", str(pruned)), "per-layer shapes")
    assert not out.exists()  # refused before anything was written


def test_the_options_as_launchers_pass_them(assets, tmp_path):
    args = cli.parse_args([*_argv(assets, "llama", tmp_path), "--local_rank=1"])  # the deepspeed launcher adds it
    assert args.tensor_parallel == 1
    assert cli.parse_args([*_argv(assets, "llama", tmp_path), "--tensor_parallel", "auto"]).tensor_parallel == "auto"
    assert cli.parse_args([*_argv(assets, "llama", tmp_path), "--tensor_parallel", "8"]).tensor_parallel == 8


def test_ranks_without_tensor_parallelism_are_groups_of_one():
    ranks = Ranks(start=False)
    assert (ranks.tensor_parallel, ranks.dp_rank, ranks.dp_size, ranks.tp_rank, ranks.tp_group) == (1, 0, 1, 0, None)
    assert ranks.is_tp_leader and ranks.tp_leader == 0
    assert tp.group_consensus(ranks, 1) is None
    with pytest.raises(InputError, match="positive integer"):
        Ranks(start=False, tensor_parallel=0)
    with pytest.raises(InputError, match="launch a multiple of 2 ranks"):
        Ranks(start=False, tensor_parallel=2)


def test_parameter_counts_come_from_the_config_alone(assets):
    for family in ("llama", "opt"):  # OPT ties its head to the embedding: counted once
        model = AutoModelForCausalLM.from_pretrained(assets / family)
        counted = parameter_counts(str(assets / family))
        assert counted == (sum(p.numel() for p in model.parameters()), model.get_input_embeddings().weight.numel())


def test_auto_size_picks_the_smallest_shard_that_fits():
    gib = 2**30
    # 70B parameters in bf16 (1B of them the input embedding, kept whole): 140 GB in all
    total, embedding = 70 * 10**9, 10**9
    sizes = tp.candidate_sizes(world_size=16, n_heads=64, n_kv=8, per_node=8)
    assert sizes == [1, 2, 4, 8]  # 16 would split LLaMA-70B's 8 key/value heads
    assert tp.pick_size(total, embedding, 2, 80 * gib, sizes) == 4  # 2 ways: 66.1 GiB > 64; 4 ways: 34.0 GiB
    assert tp.pick_size(total, embedding, 2, 24 * gib, sizes) == 8  # 17.9 GiB <= 0.8 × 24 GiB
    with pytest.raises(InputError, match="split 8 ways"):
        tp.pick_size(total, embedding, 2, 8 * gib, sizes)
    assert tp.candidate_sizes(12, 32, 8, 4) == [1, 2, 4]  # 3, 6 and 12 straddle nodes or the KV heads
    assert tp.candidate_sizes(6, 4, 2, 6) == [1, 2]


def test_auto_size_on_this_machine_is_1_for_a_tiny_model(assets, tmp_path):
    cli.main(_argv(assets, "llama", tmp_path, None, "--tensor_parallel", "auto", "--limit", "2"))
    timing = json.loads((tmp_path / "summary.json").read_text())["timing"]
    assert (timing["tensor_parallel"], timing["groups"]) == (1, 1)
    assert timing["parameter_bytes_per_rank"] == [sum(p.numel() * 4 for p in _model("llama").parameters())]


def test_the_shared_memory_all_reduce_is_kept_only_where_it_is_right(monkeypatch):
    for local_size, size, world, kept in (("2", 2, 2, True), (None, 2, 2, False), ("4", 2, 4, False)):
        backend = SimpleNamespace(shm_vector_kernel_level=2)
        monkeypatch.setattr(tp.deepspeed_comm, "cdb", backend)
        if local_size is None:
            monkeypatch.delenv("LOCAL_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_SIZE", local_size)
        tp.use_group_all_reduce(SimpleNamespace(tensor_parallel=size, world_size=world))
        assert (backend.shm_vector_kernel_level == 2) == kept, (local_size, size, world)


def test_folded_gates_compute_what_the_gates_compute():
    """In float64, so that a fold that is right only up to rounding cannot pass for exact."""
    model = _model("llama").double()
    inject_adapters(model, PaperGatesConfig(lora_r=2))
    _randomize(model, 1.0)
    ids = torch.tensor([[1, 17, 250, 33, 99, 7, 300, 12]])
    with torch.no_grad():
        gated = model(input_ids=ids).logits
        layers = list(adapter_layers(model))
        gates = [adapter.eval_gates() for _, _, adapter in layers]
        assert any((cols == 0).any() for _, cols in gates) and any(((rows > 0) & (rows < 1)).any() for rows, _ in gates)
        for _, base, adapter in layers:
            adapter.fold(base)
            detach(base)
        folded = model(input_ids=ids).logits
    torch.testing.assert_close(folded, gated, rtol=1e-10, atol=1e-10)


# -------------------------------------------------------------------------------------------- two ranks (slow)

CHECKS = {
    **{family: {"model": family} for family in (*tp.tp_families(), "llama3")},
    **{method: {"model": "llama", "adapter": method} for method in ("lora", "series", "parallel", "gates", "prompt")},
    "series_qwen2": {"model": "qwen2", "adapter": "series_qwen2"},
    "parallel_gpt_neox": {"model": "gpt_neox", "adapter": "parallel_gpt_neox"},
}
RUNS = {  # name: (model, adapter, reference run, extra options, kill after this many batches)
    "lora_tp2": ("llama", "lora", "lora", ("--tensor_parallel", "2"), None),
    "series_qwen2_tp2": ("qwen2", "series_qwen2", "series_qwen2", ("--tensor_parallel", "2"), None),
    "parallel_neox_tp2": ("gpt_neox", "parallel_gpt_neox", "parallel_gpt_neox", ("--tensor_parallel", "2"), None),
    "lora_groups_of_1": ("llama", "lora", "lora", ("--tensor_parallel", "auto"), None),
    "resume_killed": ("llama", "lora", "lora", ("--tensor_parallel", "2"), 1),
    "resume": ("llama", "lora", "lora", ("--tensor_parallel", "2"), None),
}


@pytest.fixture(scope="module")
def worker(assets, tmp_path_factory):
    """The plan run by 2 ranks: (what each rank saw, the run folders, the one-process reference folders)."""
    folder = tmp_path_factory.mktemp("worker")
    references = {}
    for model, adapter, reference, _, _ in RUNS.values():
        references[reference] = folder / "reference" / reference
        if not references[reference].exists():
            cli.main(_argv(assets, model, references[reference], adapter))
    checks = {
        name: {"model": str(assets / spec["model"]), "adapter": str(assets / "adapters" / spec["adapter"])}
        if "adapter" in spec
        else {"model": str(assets / spec["model"])}
        for name, spec in CHECKS.items()
    }
    outs = {name: folder / "runs" / (name.removesuffix("_killed")) for name in RUNS}
    runs = [
        {"argv": _argv(assets, model, outs[name], adapter, *extra), "kill_after": kill}
        for name, (model, adapter, _, extra, kill) in RUNS.items()
    ]
    (folder / "plan.json").write_text(json.dumps({"checks": checks, "runs": runs}))
    env = {k: v for k, v in launch_env().items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE")}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(REPO / "tests" / "evaluation" / "tp_worker.py"), str(folder),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    seen = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]
    return seen, outs, references


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHECKS))
def test_a_sharded_model_computes_what_the_whole_model_computes(worker, name):
    seen, _, _ = worker
    for rank in seen:
        result = rank["checks"][name]
        assert result["method"] == (
            ADAPTERS[CHECKS[name]["adapter"]][1].method if "adapter" in CHECKS[name] else "none"
        )
        assert result["max_logit_difference"] < 1e-4
        for beams in (1, 2):
            assert result[f"tokens_sharded_{beams}"] == result[f"tokens_whole_{beams}"], beams
        assert len({tuple(ids) for ids in result["tokens_whole_1"]}) > 1  # the outputs depend on the prompt
    # each rank holds its half of the sharded weights (embeddings and norms whole)
    assert seen[0]["checks"][name]["bytes_sharded"] == seen[1]["checks"][name]["bytes_sharded"]
    sharded, whole = seen[0]["checks"][name]["bytes_sharded"], seen[0]["checks"][name]["bytes_whole"]
    # untied embeddings (OPT's and Gemma's heads are copies); a mixture of experts keeps its experts whole
    if name in ("llama", "llama3", "mistral", "qwen2", "qwen3", "granite", "gpt_neox", "gptj"):
        assert sharded < 0.75 * whole
    if name in ("mixtral", "qwen3_moe"):
        assert sharded < 0.85 * whole


@pytest.mark.slow
def test_two_ranks_sharded_two_ways_give_the_single_process_results(worker):
    seen, outs, references = worker
    assert seen[0]["runs"] == seen[1]["runs"] == ["done", "done", "done", "done", "killed", "done"]
    for name, (_, _, reference, _, _) in RUNS.items():
        if name != "resume_killed":
            _same_results(outs[name], references[reference])
    timing = {name: json.loads((outs[name] / "summary.json").read_text())["timing"] for name in outs}
    assert (timing["lora_tp2"]["tensor_parallel"], timing["lora_tp2"]["groups"], timing["lora_tp2"]["ranks"]) == (
        2,
        1,
        2,
    )
    # auto: a tiny model fits one rank, so 2 groups of 1 (data parallelism)
    assert (timing["lora_groups_of_1"]["tensor_parallel"], timing["lora_groups_of_1"]["groups"]) == (1, 2)
    sharded, whole = (
        timing["lora_tp2"]["parameter_bytes_per_rank"],
        timing["lora_groups_of_1"]["parameter_bytes_per_rank"],
    )
    assert sharded[0] == sharded[1] < whole[0] == whole[1]
    # the killed run wrote its first batch; the rerun made only the other two
    assert timing["resume"]["datasets"]["Arith"]["generated"] == len(QUESTIONS) - BATCH


# ------------------------------------------------------------------------------------------ slurm/eval.sh (stand-ins)

SRUN = '#!/bin/bash\necho "srun $*" >>"$CALLS"\n'
SCONTROL = '#!/bin/bash\n[[ "$1 $2" == "show hostnames" ]] && echo node01 && echo node02\n'


def test_eval_sh_passes_the_tensor_parallel_size_and_refuses_groups_across_nodes(tmp_path):
    """2 nodes × 4 GPUs: auto by default, a size that divides the ranks within a node or whole nodes, or an error."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "data").mkdir()
    job = {
        **os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CALLS": str(tmp_path / "calls.txt"),
        "REPO": str(REPO), "SLURM_JOB_ID": "78", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[01-02]",
        "SLURM_TASKS_PER_NODE": "4(x2)", "GPUS_PER_NODE": "4", "MODEL": "/models/base", "PYTHON": sys.executable,
        "ADAPTER_DIR": str(tmp_path / "run" / "adapter"), "EVAL_DATA": str(tmp_path / "data"),
    }  # fmt: skip

    def submit(**settings: str) -> tuple[int, str, str]:
        result = subprocess.run(["bash", str(REPO / "slurm" / "eval.sh")], env={**job, **settings},
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        calls = Path(job["CALLS"])
        srun = calls.read_text() if calls.exists() else ""
        calls.unlink(missing_ok=True)
        return result.returncode, srun, result.stderr

    code, srun, _ = submit()
    assert code == 0 and "--tensor_parallel auto" in srun and "LOCAL_WORLD_SIZE=4" in srun
    for size in ("2", "4", "8"):  # within a node, a node, both nodes
        code, srun, _ = submit(TENSOR_PARALLEL=size)
        assert code == 0 and srun.rstrip().endswith(f"--tensor_parallel {size}"), (size, srun)
    code, srun, err = submit(TENSOR_PARALLEL="3")
    assert code == 2 and srun == "" and "TENSOR_PARALLEL=3 does not divide the 8 ranks" in err
    code, srun, err = submit(TENSOR_PARALLEL="many")
    assert code == 2 and srun == "" and "positive number or auto" in err
    code, srun, err = submit(TENSOR_PARALLEL="6", SLURM_JOB_NUM_NODES="3", SLURM_TASKS_PER_NODE="4(x3)")
    assert code == 2 and srun == "" and "within one node or span whole nodes of 4 ranks" in err
