"""The evaluation harness on a tiny random Llama: generation exactness, stop strings, resume, data parallelism,
output files, contamination counts and bad input. The real benchmark files are only read when present."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO, SHARED_DATA
from tiny_models import make_model
from tiny_tokenizer import VOCAB_SIZE, make_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig

from adapters_ds import InputError, LoRAConfig, SeriesConfig, adapter_parameters, inject_adapters, save_adapter
from adapters_ds.adapters.prefix import PrefixConfig
from adapters_ds.cli import evaluate as cli
from adapters_ds.distributed import Ranks, launched_rank, launched_world_size
from adapters_ds.evaluation import harness
from adapters_ds.evaluation.answers import score
from adapters_ds.evaluation.datasets import EvalDataset, load_dataset
from adapters_ds.evaluation.generation import (
    cut_at_stop,
    decode,
    encode_prompts,
    generate,
    generate_ids,
    length_sorted_batches,
)
from adapters_ds.evaluation.results import accuracy, format_table, summary_rows
from adapters_ds.hardware import DTYPE_NAMES, DTYPES, native_bf16, resolve_dtype
from adapters_ds.prompts import build_prompt

NUMERIC = [
    ("She has 12 apples and buys 30 more. How many apples does she have?", "42"),
    ("3 + 4", "7"),
    ("The quick brown fox jumps over 21 lazy dogs and then over 7 more. How many dogs did it jump over?", "28"),
    ("A box holds 6 pens. How many pens are in 7 boxes?", "42"),
    ("What is 100 - 37?", "63"),
    ("Tom had 1,200 dollars and spent 450 dollars on a bike and 5 dollars on a bell. How much is left?", "745"),
    ("Half of 9", "4.5"),
    ("She has 8 apples and gives 3 to the dog. How many apples are left?", "5"),
    ("A train goes 60 miles an hour for 3 hours. How far does it go?", "180"),
    ("What is 7 * 8?", "56"),
]
CHOICE = [
    ("What is 2 + 2? Answer Choices: (A) 3 (B) 4 (C) 5 (D) 6 (E) 7", "B"),
    ("A car goes 30 miles in half an hour. Its speed? Answer Choices: (A) 15 (B) 30 (C) 45 (D) 60 (E) 90", "D"),
    ("Which is even? Answer Choices: (A) 1 (B) 3 (C) 5 (D) 8 (E) 9", "D"),
    ("What is 10 / 4? Answer Choices: (A) 2 (B) 2.5 (C) 3 (D) 3.5 (E) 4", "B"),
    ("How many sides has a triangle? Answer Choices: (A) 3 (B) 4 (C) 5 (D) 6 (E) 8", "A"),
]
BATCH = 3
NEW_TOKENS = 10


def _records(items):
    return [{"instruction": q, "input": "", "output": "old rationale", "answer": a} for q, a in items]


def _tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.3,  # larger than the default so greedy output varies with the prompt
    )
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model's matrices are too small for two threads to pay; on a busy 2-core machine they cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, model, tokenizer)."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = make_tokenizer(folder)
    model = _tiny_llama()
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model, tokenizer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for name, items in (("Arith", NUMERIC), ("Choice", CHOICE)):
        (root / name).mkdir()
        (root / name / "test.json").write_text(json.dumps(_records(items)))
    (root / "train.json").write_text(
        json.dumps(
            [
                {"instruction": "she has 12 apples, and buys 30 more . how many apples does she have", "output": "."},
                {"instruction": f"Story. {NUMERIC[4][0]} Think.", "input": "", "output": "63"},
                {"instruction": "An unrelated question about 12 apples?", "input": "", "output": "12"},
            ]
        )
    )
    return root


def _args(tiny, data_dir, out, *extra):
    return [
        "--base_model", str(tiny[0]), "--datasets", "Arith,Choice", "--data_dir", str(data_dir),
        "--output_dir", str(out), "--batch_size", str(BATCH), "--max_new_tokens", str(NEW_TOKENS),
        "--dtype", "float32", *extra,
    ]  # fmt: skip


def _same_results(out, ref):
    """Identical rows and summaries; only the timing section of summary.json may differ."""
    for name in ("Arith.jsonl", "Choice.jsonl", "summary.md"):
        assert (out / name).read_text() == (ref / name).read_text(), name
    summary, expected = (json.loads((d / "summary.json").read_text()) for d in (out, ref))
    assert summary.pop("timing")["datasets"].keys() == expected.pop("timing")["datasets"].keys()
    assert summary == expected


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(tiny, data_dir, tmp_path_factory):
    """An uninterrupted single-process run with --train_data: the output folder, and what it printed."""
    out = tmp_path_factory.mktemp("reference")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        cli.main(_args(tiny, data_dir, out, "--train_data", str(data_dir / "train.json")))
    return out, stdout.getvalue()


# ------------------------------------------------------------------------------------------------- generation


def test_batched_greedy_equals_unbatched_for_prompts_of_different_lengths(tiny):
    _, model, tokenizer = tiny
    prompts = [build_prompt(q) for q, _ in NUMERIC[:5]]
    encoded = encode_prompts(tokenizer, prompts)
    assert len({len(ids) for ids in encoded}) == 5  # every row of the batch is padded differently
    single = [generate_ids(model, tokenizer, [ids], 16, stop_strings=())[0] for ids in encoded]
    batched = generate_ids(model, tokenizer, encoded, 16, stop_strings=())
    assert batched == single
    assert len({tuple(ids) for ids in single}) > 1  # the outputs depend on the prompt: the comparison means something
    # length-sorted batches of 2, original order restored
    texts = generate(model, tokenizer, prompts, batch_size=2, max_new_tokens=16, stop_strings=())
    assert texts == [decode(tokenizer, ids, ()) for ids in single]


def test_stop_string_ends_each_row_on_its_own_and_cuts_the_text(tiny):
    _, model, tokenizer = tiny
    prompts = [build_prompt(NUMERIC[0][0]), build_prompt(NUMERIC[2][0])]
    encoded = encode_prompts(tokenizer, prompts)
    free = [generate_ids(model, tokenizer, [ids], 24, stop_strings=())[0] for ids in encoded]
    text = decode(tokenizer, free[0], ())
    # a stop string that first occurs in the middle of row 0's free-running output
    start = next(
        k for k in range(3, len(text) - 2) if text[k : k + 2].isascii() and text[k : k + 2] not in text[: k + 1]
    )
    stop = text[start : start + 2]
    stopped = generate_ids(model, tokenizer, encoded, 24, stop_strings=(stop,))
    assert len(stopped[0]) < len(free[0])  # generation of row 0 ended early
    assert decode(tokenizer, stopped[0], (stop,)) == text[:start]
    # row 1 in the same batch is what it is alone with the same stop string
    assert stopped[1] == generate_ids(model, tokenizer, [encoded[1]], 24, stop_strings=(stop,))[0]


def test_beam_search_runs_batched(tiny):
    _, model, tokenizer = tiny
    encoded = encode_prompts(tokenizer, [build_prompt(q) for q, _ in NUMERIC[:3]])
    beams = generate_ids(model, tokenizer, encoded, 6, num_beams=3)
    assert len(beams) == 3 and all(len(ids) <= 6 for ids in beams)
    assert beams[1] == generate_ids(model, tokenizer, [encoded[1]], 6, num_beams=3)[0]


def test_cut_at_stop_and_length_sorted_batches():
    assert cut_at_stop("The answer is 5.\n### Instruction:\nmore", ("\n### ",)) == "The answer is 5."
    assert cut_at_stop("So x = 3\n#### 3", ("\n### ",)) == "So x = 3\n#### 3"  # the gsm8k marker is no section
    assert cut_at_stop("a STOP b END c", ("END", "STOP")) == "a "
    assert length_sorted_batches([3, 9, 3, 5, 9], 2) == [[1, 4], [3, 0], [2]]


# ------------------------------------------------------------------------------------------- dtype rule, ranks


def test_one_dtype_rule():
    assert set(DTYPE_NAMES) == {"auto", *DTYPES} and len(DTYPE_NAMES) == len(DTYPES) + 1
    for name, dtype in DTYPES.items():
        assert resolve_dtype(name, torch.device("cpu")) is dtype
    assert resolve_dtype("auto", torch.device("cpu")) is (torch.bfloat16 if native_bf16("cpu") else torch.float32)
    assert resolve_dtype("auto") is (torch.bfloat16 if native_bf16() else torch.float32)  # the accelerator's device
    with pytest.raises(InputError, match="found 'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_ranks_without_a_process_group_are_one_rank():
    ranks = Ranks(start=False)
    assert (ranks.rank, ranks.world_size, ranks.is_main, ranks.active) == (0, 1, True, False)
    assert ranks.broadcast({"a": 1}) == {"a": 1} and ranks.gather(3) == [3]
    assert torch.equal(ranks.sum(torch.ones(2)), torch.ones(2))
    ranks.barrier()
    assert ranks.on_main(lambda: 5) == 5

    def bad() -> None:
        raise InputError("bad input on rank 0")

    with pytest.raises(InputError, match="bad input on rank 0"):
        ranks.on_main(bad)


def test_launched_world_size():
    assert launched_world_size({}) == 1
    assert launched_world_size({"WORLD_SIZE": "4"}) == 4
    assert launched_world_size({"OMPI_COMM_WORLD_SIZE": "3"}) == 3
    assert launched_world_size({"SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "8"}) == 8


def test_launched_rank():
    """The rank a launcher announces, before a process group exists (an srun step's SLURM_PROCID included)."""
    assert launched_rank({}) == 0
    assert launched_rank({"RANK": "3"}) == 3
    assert launched_rank({"OMPI_COMM_WORLD_RANK": "2"}) == 2
    assert launched_rank({"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}) == 1
    assert launched_rank({"SLURM_PROCID": "1"}) == 0  # the batch script itself is no rank


# ------------------------------------------------------------------------------------------------------ the CLI


def test_outputs_summary_and_contamination(tiny, data_dir, reference_run):
    out, printed = reference_run
    for name, items in (("Arith", NUMERIC), ("Choice", CHOICE)):
        rows = _read_jsonl(out / f"{name}.jsonl")
        assert [row["index"] for row in rows] == list(range(len(items)))
        for row, (question, answer) in zip(rows, items, strict=True):
            assert set(row) == {"index", "prompt", "output", "prediction", "answer", "correct"}
            assert row["prompt"] == build_prompt(question) and row["answer"] == answer
            assert (row["prediction"], row["correct"]) == score(row["output"], answer, question, name == "Choice")
    summary = json.loads((out / "summary.json").read_text())
    by_name = {entry["dataset"]: entry for entry in summary["datasets"]}
    assert by_name["Arith"]["type"] == "numeric" and by_name["Choice"]["type"] == "multiple_choice"
    assert by_name["Arith"]["contaminated"] == 2 and by_name["Choice"]["contaminated"] == 0
    for name in ("Arith", "Choice"):
        rows = _read_jsonl(out / f"{name}.jsonl")
        assert by_name[name]["n"] == len(rows)
        assert by_name[name]["accuracy"] == round(accuracy(rows), 2)
    assert summary["average"]["n"] == len(NUMERIC) + len(CHOICE) and summary["average"]["contaminated"] == 2
    markdown = (out / "summary.md").read_text()
    assert markdown.splitlines()[0] == "| dataset | n | accuracy (%) | contaminated |"
    assert markdown.splitlines()[-1].startswith("| **average** | 15 |")
    assert printed == markdown
    assert summary["settings"]["dtype"] == "float32" and summary["settings"]["max_new_tokens"] == NEW_TOKENS


def test_summary_table_arithmetic():
    rows_a = [{"correct": c} for c in (True, False, True, True)]
    rows_b = [{"correct": False}, {"correct": True}]
    datasets = [EvalDataset("A", None, [], False), EvalDataset("B", None, [], True)]
    table, average = summary_rows({"A": rows_a, "B": rows_b}, datasets, None)
    assert [(e["n"], e["correct"], e["accuracy"]) for e in table] == [(4, 3, 75.0), (2, 1, 50.0)]
    assert (average["n"], average["accuracy"]) == (6, 62.5)  # the mean of the data sets, not of the examples
    assert format_table(table, average).splitlines()[2:] == [
        "| A | 4 | 75.00 |",
        "| B | 2 | 50.00 |",
        "| **average** | 6 | 62.50 |",
    ]


def test_evaluate_records_matches_the_command(tiny, reference_run):
    _, model, tokenizer = tiny
    model.train()
    rows = harness.evaluate_records(model, tokenizer, _records(CHOICE), batch_size=2, max_new_tokens=NEW_TOKENS)
    assert model.training  # mode restored
    model.eval()
    assert rows == _read_jsonl(reference_run[0] / "Choice.jsonl")
    assert accuracy(rows) == 100.0 * sum(r["correct"] for r in rows) / len(rows)


_GENERATE_ROWS = harness._generate_rows


class Killed(BaseException):
    """What a kill does to the harness: it stops between two writes (BaseException: no handler catches it)."""


def _spy(monkeypatch, kill_after: int | None = None):
    """Record the example indices each generated batch held; optionally die like a killed run."""
    generated: list[list[int]] = []
    real = _GENERATE_ROWS

    def spy(model, tokenizer, batch, *rest):
        if kill_after is not None and len(generated) == kill_after:
            raise Killed
        generated.append(list(batch))
        return real(model, tokenizer, batch, *rest)

    monkeypatch.setattr(harness, "_generate_rows", spy)
    return generated


def test_resume_after_kill_generates_only_the_missing_rows(tiny, data_dir, reference_run, tmp_path, monkeypatch):
    ref = reference_run[0]
    args = _args(tiny, data_dir, tmp_path, "--train_data", str(data_dir / "train.json"))
    generated = _spy(monkeypatch, kill_after=2)
    with pytest.raises(Killed):
        cli.main(args)
    assert len(_read_jsonl(tmp_path / "Arith.jsonl")) == 2 * BATCH
    done = {row["index"] for row in _read_jsonl(tmp_path / "Arith.jsonl")}
    # the kill also cut the next write in the middle of a line
    missing = sorted(set(range(len(NUMERIC))) - done)
    partial = json.dumps(_read_jsonl(ref / "Arith.jsonl")[missing[0]])
    with (tmp_path / "Arith.jsonl").open("a") as f:
        f.write(partial[: len(partial) // 2])

    generated = _spy(monkeypatch)
    cli.main(args)
    assert sorted(i for batch in generated[: len(generated) - 2] for i in batch) == missing  # Arith: 2 batches
    assert sorted(i for batch in generated[-2:] for i in batch) == list(range(len(CHOICE)))
    _same_results(tmp_path, ref)
    timing = json.loads((tmp_path / "summary.json").read_text())["timing"]["datasets"]
    assert timing["Arith"]["generated"] == len(missing) and timing["Choice"]["generated"] == len(CHOICE)

    generated = _spy(monkeypatch)  # nothing left to do
    cli.main(args)
    assert generated == []
    generated = _spy(monkeypatch)
    cli.main([*args, "--overwrite"])
    assert sum(len(batch) for batch in generated) == len(NUMERIC) + len(CHOICE)
    assert (tmp_path / "Arith.jsonl").read_text() == (ref / "Arith.jsonl").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_give_the_single_process_results(tiny, data_dir, reference_run, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        str(REPO / "launcher" / "evaluate.py"),
        *_args(tiny, data_dir, tmp_path, "--train_data", str(data_dir / "train.json")),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_results(tmp_path, reference_run[0])
    assert json.loads((tmp_path / "summary.json").read_text())["timing"]["ranks"] == 2
    assert proc.stdout.count("| **average** |") == 1  # the table is printed by rank 0 only


def test_lora_adapter_merged_or_not_gives_the_same_rows(tiny, data_dir, tmp_path):
    folder, _, _ = tiny
    model = _tiny_llama()
    config = LoRAConfig(r=4, alpha=8)
    inject_adapters(model, config)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape) * 0.3)
    save_adapter(model, config, tmp_path / "adapter")
    common = ["--adapter_dir", str(tmp_path / "adapter"), "--datasets", "Choice"]
    cli.main([*_args(tiny, data_dir, tmp_path / "merged"), *common])
    cli.main([*_args(tiny, data_dir, tmp_path / "hooks"), *common, "--no_merge"])
    merged, hooks = _read_jsonl(tmp_path / "merged/Choice.jsonl"), _read_jsonl(tmp_path / "hooks/Choice.jsonl")
    assert [r["output"] for r in merged] == [r["output"] for r in hooks]
    settings = json.loads((tmp_path / "merged/eval_settings.json").read_text())
    assert settings["adapter_method"] == "lora" and settings["merged"] is True


def test_series_adapter_stays_attached(tiny, data_dir, tmp_path):
    model = _tiny_llama()
    config = SeriesConfig(bottleneck_size=4, preset="pfeiffer")
    inject_adapters(model, config)
    save_adapter(model, config, tmp_path / "adapter")
    cli.main([*_args(tiny, data_dir, tmp_path / "out"), "--adapter_dir", str(tmp_path / "adapter")])
    settings = json.loads((tmp_path / "out/eval_settings.json").read_text())
    assert settings["adapter_method"] == "series" and settings["merged"] is False


def test_several_adapters_on_one_loaded_base_equal_separate_runs(tiny, data_dir, tmp_path, monkeypatch):
    """--adapter_dir a,b,c: the base is loaded once, each adapter scored in turn into its own folder; the rows and
    summaries are those of separate runs (a merged LoRA's weights restored exactly before the next adapter)."""
    configs = {"lora": LoRAConfig(r=4, alpha=8), "series": SeriesConfig(bottleneck_size=4, preset="pfeiffer"),
               "prefix": PrefixConfig(num_virtual_tokens=3, init="random")}  # fmt: skip
    folders = []
    for name, config in configs.items():
        model = _tiny_llama()
        inject_adapters(model, config)
        with torch.no_grad():
            for p in adapter_parameters(model).values():
                p.copy_(torch.randn(p.shape) * 0.3)
        save_adapter(model, config, tmp_path / name)
        folders.append(tmp_path / name)
    loads = []
    real_load = harness.load_base_model
    monkeypatch.setattr(harness, "load_base_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    outs = [tmp_path / f"out_{name}" for name in configs]
    cli.main([*_args(tiny, data_dir, ",".join(map(str, outs))), "--adapter_dir", ",".join(map(str, folders))])
    assert len(loads) == 1
    for folder, out in zip(folders, outs, strict=True):
        cli.main([*_args(tiny, data_dir, tmp_path / f"alone_{folder.name}"), "--adapter_dir", str(folder)])
        _same_results(out, tmp_path / f"alone_{folder.name}")
    assert len({(out / "Arith.jsonl").read_text() for out in outs}) == 3  # each adapter changed the outputs


def test_chat_template_and_limit(tiny, data_dir, tmp_path):
    cli.main([*_args(tiny, data_dir, tmp_path), "--template", "chat", "--limit", "2"])
    rows = _read_jsonl(tmp_path / "Choice.jsonl")
    assert [row["prompt"] for row in rows] == [
        build_prompt(q, template="chat", tokenizer=tiny[2]) for q, _ in CHOICE[:2]
    ]
    assert json.loads((tmp_path / "summary.json").read_text())["average"]["n"] == 4


# ------------------------------------------------------------------------------------------------- bad input


def _expect_error(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err  # (other lines: progress bars of weight loading)
    for fragment in fragments:
        assert fragment in errors[0]


def test_bad_input_exits_2_with_one_line(tiny, data_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    base = ["--base_model", str(tiny[0]), "--data_dir", str(data_dir), "--output_dir", out, "--dtype", "float32"]
    _expect_error(capsys, [*base, "--datasets", "Nope"], "Nope", "Arith")  # lists what exists
    bad = tmp_path / "data"
    shutil.copytree(data_dir, bad)
    (bad / "Empty").mkdir()
    _expect_error(capsys, [*base, "--data_dir", str(bad), "--datasets", "Empty"], "test.json")
    (bad / "Arith" / "test.json").write_text('[{"instruction": "1 + 1", "answer": "2"},')
    _expect_error(capsys, [*base, "--data_dir", str(bad), "--datasets", "Arith"], "invalid JSON at line 1")
    (bad / "Arith" / "test.json").write_text('[{"instruction": "1 + 1", "answer": "two"}]')
    _expect_error(capsys, [*base, "--data_dir", str(bad), "--datasets", "Arith"], "record 0", "two")
    (bad / "Arith" / "test.json").write_text('[{"question": "1 + 1", "answer": "2"}]')
    _expect_error(capsys, [*base, "--data_dir", str(bad), "--datasets", "Arith"], "instruction")
    _expect_error(capsys, [*base, "--datasets", "Arith", "--base_model", str(tmp_path / "no_model")], "no_model")
    _expect_error(capsys, [*base, "--datasets", "Arith", "--batch_size", "0"], "batch_size")
    _expect_error(capsys, [*base, "--datasets", "Arith", "--template", "other"], "template")
    _expect_error(capsys, [*base, "--datasets", "Arith", "--train_data", str(tmp_path / "none.json")], "none.json")
    # an adapter trained on another base model
    other = make_model("gpt2")
    config = LoRAConfig(r=2, alpha=4)
    inject_adapters(other, config)
    save_adapter(other, config, tmp_path / "gpt2_adapter")
    _expect_error(capsys, [*base, "--datasets", "Arith", "--adapter_dir", str(tmp_path / "gpt2_adapter")], "gpt2")


def test_rerun_with_other_settings_is_refused(tiny, data_dir, reference_run, tmp_path, capsys):
    shutil.copytree(reference_run[0], tmp_path / "out")
    argv = _args(tiny, data_dir, tmp_path / "out", "--max_new_tokens", "5")
    _expect_error(capsys, argv, "max_new_tokens", "--overwrite")
    (tmp_path / "out" / "Arith.jsonl").write_text("{}\n" + (tmp_path / "out" / "Arith.jsonl").read_text())
    _expect_error(capsys, _args(tiny, data_dir, tmp_path / "out"), "Arith.jsonl", "line 1")


# ------------------------------------------------------------------------------------------- the real data sets


def test_real_benchmarks_load_and_their_kind_is_read_from_the_data():
    math_dir = SHARED_DATA / "math"
    if not math_dir.is_dir():
        pytest.skip(f"benchmark data not present at {math_dir}")
    names = sorted(p.name for p in math_dir.iterdir() if (p / "test.json").is_file())
    assert names
    for name in names:
        dataset = load_dataset(math_dir, name)
        assert dataset.multiple_choice == (name == "AQuA"), name
