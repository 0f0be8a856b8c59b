"""Tests for the prompt template (`adapters_ds.prompts`) and the training-data pipeline
(`adapters_ds.training.data`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest
import torch
from tiny_tokenizer import VOCAB_SIZE, make_tokenizer

from adapters_ds.errors import InputError
from adapters_ds.prompts import build_prompt
from adapters_ds.training import data
from adapters_ds.training.data import IGNORE_INDEX, BatchPlan, collate, load_records, split_validation, tokenize_records

RECORD = {"instruction": "Add 12 and 30.", "input": "", "output": "12 + 30 = 42. The answer is 42"}
RECORD_WITH_INPUT = {"instruction": "Add the numbers.", "input": "12 and 30", "output": "The answer is 42"}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def records_ds(*records: dict) -> datasets.Dataset:
    return datasets.Dataset.from_list([dict(r) for r in records])


def encode(tok, text: str) -> list[int]:
    """Independent reference encoding: the tokenizer's own special tokens (one BOS for the tiny tokenizer)."""
    return tok(text)["input_ids"]


# ------------------------------------------------------------------------------------------------ tiny tokenizer


def test_tiny_tokenizer_is_deterministic_and_sized(tmp_path: Path):
    a, b = make_tokenizer(), make_tokenizer(tmp_path)
    assert len(a) == VOCAB_SIZE
    assert a.get_vocab() == b.get_vocab()
    assert (tmp_path / "tokenizer.json").is_file()
    assert None not in (a.bos_token_id, a.eos_token_id, a.pad_token_id, a.unk_token_id)
    text = "Below is an instruction. 12 + 30 = 42\n### Response:\n"
    ids = a(text)["input_ids"]
    assert ids[0] == a.bos_token_id and a.decode(ids, skip_special_tokens=True) == text


# ------------------------------------------------------------------------------------------------ prompts


@pytest.mark.parametrize(
    ("instruction", "input_", "expected"),
    [
        (
            "Add 1 and 2.",
            "",
            "Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\nAdd 1 and 2.\n\n### Response:\n",
        ),
        (
            "Add the numbers.",
            "1 and 2",
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n"
            "### Input:\n1 and 2\n\n### Response:\n",
        ),
        ("Braces {x} stay {0}", "", None),  # no str.format surprises from the user's text
    ],
)
def test_alpaca_prompt_text(instruction: str, input_: str, expected: str | None):
    prompt = build_prompt(instruction, input_)
    if expected is not None:
        assert prompt == expected
    assert f"### Instruction:\n{instruction}\n\n" in prompt and prompt.endswith("### Response:\n")


def test_chat_prompt_uses_the_tokenizer_template(tok):
    prompt = build_prompt("Add the numbers.", "1 and 2", template="chat", tokenizer=tok)
    assert prompt == "<s><|user|>\nAdd the numbers.\n\n1 and 2\n<|assistant|>\n"


@pytest.mark.parametrize("case", ["no tokenizer", "no chat template", "unknown template"])
def test_prompt_errors(tok, case: str):
    if case == "no tokenizer":
        call, match = lambda: build_prompt("x", template="chat"), "tokenizer=None"
    elif case == "no chat template":
        plain = make_tokenizer()
        plain.chat_template = None
        call, match = lambda: build_prompt("x", template="chat", tokenizer=plain), "found none"
    else:
        call, match = lambda: build_prompt("x", template="vicuna"), "found 'vicuna'"
    with pytest.raises(InputError, match=match):
        call()


# ------------------------------------------------------------------------------------------------ loading

GOOD = [
    {"instruction": "a", "output": "b", "answer": "1"},
    {"instruction": "c", "input": "x", "output": "d"},
    {"instruction": "e", "input": None, "output": "f"},
]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("list.json", json.dumps(GOOD, indent=2)),
        ("lines.jsonl", "\n".join(json.dumps(r) for r in GOOD) + "\n"),
        ("lines_in.json", "\n".join(json.dumps(r) for r in GOOD)),  # JSON Lines under a .json name
        ("blank_lines.jsonl", "\n\n".join(json.dumps(r) for r in GOOD) + "\n\n"),
    ],
    ids=["list", "jsonl", "jsonl-named-json", "jsonl-blank-lines"],
)
def test_load_records_json_and_jsonl(tmp_path: Path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    ds = load_records(str(path), cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 3
    assert ds["instruction"][:] == ["a", "c", "e"]
    assert ds["input"][:] == ["", "x", ""]  # missing and null input both mean ""
    assert ds["output"][:] == ["b", "d", "f"]
    assert ds["answer"][:] == ["1", None, None]  # extra fields are kept


BAD_FILES = [
    ("bad.json", '[{"instruction": "a", "output": "b"},\n {"instruction": }]', r"bad\.json.*line 2 column 18"),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a",\n', r"bad\.jsonl.*line 2 column"),
    ("csv.json", "instruction,output\na,b\n", r"invalid JSON at line 1 column 1"),
    ("missing.json", json.dumps([GOOD[0], {"instruction": "x"}]), r"record 1 \(0-based\): expected field 'output'"),
    ("missing.jsonl", json.dumps({"output": "x"}), r"record 0 \(0-based\): expected field 'instruction'"),
    (
        "type.json",
        json.dumps([{"instruction": 5, "output": "b"}]),
        r"record 0 \(0-based\): .*'instruction'.*found number",
    ),
    (
        "null.json",
        json.dumps([GOOD[0], {"instruction": "a", "output": None}]),
        r"record 1 \(0-based\): .*'output'.*null",
    ),
    (
        "input.json",
        json.dumps([{"instruction": "a", "input": [], "output": "b"}]),
        r"record 0 \(0-based\): .*'input'.*list",
    ),
    ("notobj.json", json.dumps([GOOD[0], "text"]), r"record 1 \(0-based\): expected a JSON object; found string"),
    ("scalar.json", "3", r"expected a JSON list of records or JSON Lines; found a JSON number"),
    ("empty.json", "[]", r"empty\.json: expected at least one record"),
    ("empty.jsonl", "", r"empty\.jsonl: expected at least one record"),
    ("data.txt", json.dumps(GOOD), r"expected a \.json or \.jsonl file"),
]


@pytest.mark.parametrize(("name", "text", "match"), BAD_FILES, ids=[row[0] for row in BAD_FILES])
def test_load_records_rejects_bad_input(tmp_path: Path, name: str, text: str, match: str):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError, match=match) as info:
        load_records(str(path), cache_dir=str(tmp_path / "cache"))
    assert "\n" not in str(info.value)


def test_load_records_missing_local_file(tmp_path: Path):
    with pytest.raises(InputError, match="found no file"):
        load_records(str(tmp_path / "nope.json"))


def test_load_records_hub_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The hub branch without network: `datasets.load_dataset` stubbed with what it would return."""
    calls = []

    def fake_load_dataset(name, split, cache_dir):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"instruction": "a", "output": "b", "source": "s"}])

    monkeypatch.setattr(data.datasets, "load_dataset", fake_load_dataset)
    ds = load_records("someone/math_10k")
    assert calls == [("someone/math_10k", "train")]
    assert ds[0] == {"instruction": "a", "output": "b", "source": "s", "input": ""}


@pytest.mark.parametrize(
    ("behaviour", "match"),
    [
        ("raise", r"could not load 'someone/gone': ConnectionError: offline"),
        ("no output column", r"expected columns 'instruction' and 'output'.*found columns \['instruction', 'text'\]"),
        ("null output", r"record 1 \(0-based\): .*'output'.*null"),
    ],
)
def test_load_records_hub_errors(monkeypatch: pytest.MonkeyPatch, behaviour: str, match: str):
    def fake_load_dataset(name, split, cache_dir):
        if behaviour == "raise":
            raise ConnectionError("offline")
        if behaviour == "no output column":
            return datasets.Dataset.from_list([{"instruction": "a", "text": "b"}])
        return datasets.Dataset.from_list([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": None}])

    monkeypatch.setattr(data.datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(InputError, match=match):
        load_records("someone/gone")


@pytest.mark.parametrize("bug", [TypeError("unexpected keyword"), AttributeError("no attribute"), KeyError("x")])
def test_a_loader_bug_is_not_reported_as_bad_input(bug: Exception):
    """Only the failures that mean bad input become InputError (exit 2, one line); a bug keeps its traceback."""

    def load():
        raise bug

    with pytest.raises(type(bug)):
        data._load_dataset("someone/set", load)
    with pytest.raises(InputError, match=r"could not load 'someone/set': FileNotFoundError"):
        data._load_dataset("someone/set", lambda: datasets.load_dataset("json", data_files="/nonexistent/x.json"))


# ------------------------------------------------------------------------------------------------ tokenizing


@pytest.mark.parametrize("record", [RECORD, RECORD_WITH_INPUT], ids=["no-input", "with-input"])
@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_tokenize_masks_exactly_the_prompt(tok, record: dict, train_on_inputs: bool):
    prompt = build_prompt(record["instruction"], record["input"])
    prompt_ids = encode(tok, prompt)
    full_ids = encode(tok, prompt + record["output"]) + [tok.eos_token_id]
    assert full_ids[: len(prompt_ids)] == prompt_ids  # the tiny BPE does not merge across the boundary

    row = tokenize_records(records_ds(record), tok, cutoff_len=512, train_on_inputs=train_on_inputs)[0]

    assert row["input_ids"] == full_ids
    assert row["length"] == len(full_ids)
    assert row["input_ids"].count(tok.bos_token_id) == 1 and row["input_ids"][0] == tok.bos_token_id
    if train_on_inputs:
        assert row["labels"] == full_ids
    else:
        n = len(prompt_ids)
        assert row["labels"] == [IGNORE_INDEX] * n + full_ids[n:]
        target = [t for t in row["labels"] if t != IGNORE_INDEX]
        assert tok.decode(target) == record["output"] + tok.eos_token


def test_tokenize_chat_template_has_one_bos(tok):
    """The chat template renders `<s>` itself; the tokenizer must not prepend a second one."""
    row = tokenize_records(records_ds(RECORD), tok, cutoff_len=512, train_on_inputs=False, template="chat")[0]
    prompt = build_prompt(RECORD["instruction"], template="chat", tokenizer=tok)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert prompt_ids[0] == tok.bos_token_id
    assert row["input_ids"].count(tok.bos_token_id) == 1
    assert row["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert tok.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == RECORD["output"] + tok.eos_token


def test_tokenize_adds_no_bos_when_the_tokenizer_does_not(tok):
    """A GPT-2/Qwen-style tokenizer (no BOS of its own) gets none from us either."""
    no_bos = make_tokenizer()
    no_bos.backend_tokenizer.post_processor = None
    assert no_bos("a")["input_ids"][0] != no_bos.bos_token_id
    row = tokenize_records(records_ds(RECORD), no_bos, cutoff_len=512, train_on_inputs=True)[0]
    assert no_bos.bos_token_id not in row["input_ids"]
    assert row["input_ids"][-1] == no_bos.eos_token_id


# Sizes relative to P = prompt tokens and L = prompt + output tokens (without EOS): (base, offset) pairs.
@pytest.mark.parametrize(
    ("cutoff", "expected_length", "ends_with_eos"),
    [
        (("L", 5), ("L", 1), True),  # room to spare: EOS appended
        (("L", 1), ("L", 1), True),  # EOS just fits
        (("L", 0), ("L", 0), False),  # the text fills cutoff_len: no room for EOS (Alpaca-LoRA's rule)
        (("L", -2), ("L", -2), False),  # truncated mid-output: no EOS
        (("P", 1), ("P", 1), False),  # one target token left
    ],
    ids=["room", "eos-fits", "exact-fill", "truncated", "one-target"],
)
def test_tokenize_truncation_and_eos(tok, cutoff: tuple, expected_length: tuple, ends_with_eos: bool):
    prompt = build_prompt(RECORD["instruction"])
    sizes = {"P": len(encode(tok, prompt)), "L": len(encode(tok, prompt + RECORD["output"]))}
    assert sizes["L"] - sizes["P"] > 3
    cutoff_len, length = sizes[cutoff[0]] + cutoff[1], sizes[expected_length[0]] + expected_length[1]
    full_ids = encode(tok, prompt + RECORD["output"]) + [tok.eos_token_id]

    row = tokenize_records(records_ds(RECORD), tok, cutoff_len=cutoff_len, train_on_inputs=False)[0]

    assert row["length"] == len(row["input_ids"]) == length <= cutoff_len
    assert row["input_ids"] == full_ids[:length]
    assert (row["input_ids"][-1] == tok.eos_token_id) is ends_with_eos
    assert row["labels"] == [IGNORE_INDEX] * sizes["P"] + full_ids[sizes["P"] : length]


def test_tokenize_drops_prompts_that_fill_the_cutoff(tok, caplog: pytest.LogCaptureFixture):
    long_record = {"instruction": "Add 12 and 30. " * 20, "input": "", "output": "42"}
    P_short = len(encode(tok, build_prompt(RECORD["instruction"])))
    P_long = len(encode(tok, build_prompt(long_record["instruction"])))
    ds = records_ds(long_record, RECORD, long_record)

    with caplog.at_level(logging.WARNING, logger="adapters_ds.training.data"):
        out = tokenize_records(ds, tok, cutoff_len=P_short + 1, train_on_inputs=False)
    assert len(out) == 1 and out.column_names == ["input_ids", "labels", "length"]
    assert out[0]["input_ids"] == encode(tok, build_prompt(RECORD["instruction"]) + RECORD["output"])[: P_short + 1]
    assert "dropped 2 of 3 records" in caplog.text

    # a prompt of exactly cutoff_len tokens leaves no target either
    assert len(tokenize_records(ds, tok, cutoff_len=P_long + 1, train_on_inputs=False)) == 3
    assert len(tokenize_records(ds, tok, cutoff_len=P_long, train_on_inputs=False)) == 1


@pytest.mark.parametrize("cutoff", [1, 5])
def test_tokenize_every_record_dropped_is_an_error(tok, cutoff: int):
    with pytest.raises(InputError, match=f"every prompt is longer than cutoff_len={cutoff} .*found all 2 prompts"):
        tokenize_records(records_ds(RECORD, RECORD_WITH_INPUT), tok, cutoff_len=cutoff, train_on_inputs=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cutoff_len": 0}, "cutoff_len: expected a positive number"),
        ({"template": "chat", "tokenizer": "no-chat"}, "needs a tokenizer with a chat template"),
    ],
)
def test_tokenize_argument_errors(tok, kwargs: dict, match: str):
    args = {"tokenizer": tok, "cutoff_len": 64, "train_on_inputs": False, **kwargs}
    if args["tokenizer"] == "no-chat":
        args["tokenizer"] = make_tokenizer()
        args["tokenizer"].chat_template = None
    with pytest.raises(InputError, match=match):
        tokenize_records(records_ds(RECORD), **args)


def test_load_then_tokenize_is_cached_on_disk(tmp_path: Path, tok):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [RECORD, RECORD_WITH_INPUT]))
    ds = load_records(str(path), cache_dir=str(tmp_path / "cache"))
    first = tokenize_records(ds, tok, cutoff_len=256, train_on_inputs=False)
    second = tokenize_records(ds, tok, cutoff_len=256, train_on_inputs=False)
    assert first.cache_files and first.cache_files == second.cache_files
    assert first[:] == second[:]


# ------------------------------------------------------------------------------------------------ validation split


@pytest.mark.parametrize(("size", "n_val"), [(0, None), (0.0, None), (2, 2), (0.25, 3), (9, 9)])
def test_split_validation_sizes(size: int | float, n_val: int | None):
    ds = datasets.Dataset.from_dict({"i": list(range(10))})
    train, val = split_validation(ds, size, seed=7)
    if n_val is None:
        assert val is None and train["i"][:] == list(range(10))
        return
    assert len(val) == n_val and len(train) == 10 - n_val
    assert sorted(train["i"][:] + val["i"][:]) == list(range(10))
    again_train, again_val = split_validation(ds, size, seed=7)
    assert again_train["i"][:] == train["i"][:] and again_val["i"][:] == val["i"][:]


def test_split_validation_depends_on_seed():
    ds = datasets.Dataset.from_dict({"i": list(range(100))})
    assert split_validation(ds, 10, seed=1)[1]["i"][:] != split_validation(ds, 10, seed=2)[1]["i"][:]


@pytest.mark.parametrize("size", [10, 11, 0.99999, 1.0, 2.5, -1, True])
def test_split_validation_rejects_too_large_or_bad(size):
    ds = datasets.Dataset.from_dict({"i": list(range(10))})
    with pytest.raises(InputError, match="val_set_size"):
        split_validation(ds, size, seed=0)


# ------------------------------------------------------------------------------------------------ batch plan

LENGTHS = [(i * 37) % 101 + 1 for i in range(257)]  # 257 examples, varied lengths, odd count


def plans(world_size: int, micro: int, group: bool, seed: int = 3) -> list[BatchPlan]:
    return [BatchPlan(LENGTHS, micro, world_size, rank, seed, group) for rank in range(world_size)]


@pytest.mark.parametrize("group", [False, True], ids=["shuffled", "grouped"])
@pytest.mark.parametrize(("world_size", "micro"), [(1, 4), (2, 2), (4, 1), (3, 2), (2, 3)])
def test_batch_plan_ranks_partition_each_global_step(world_size: int, micro: int, group: bool):
    ranks = plans(world_size, micro, group)
    single = BatchPlan(LENGTHS, micro * world_size, 1, 0, 3, group)  # one rank, the same global micro-batch
    G = micro * world_size
    per_rank = [plan.micro_batches(epoch=1) for plan in ranks]

    steps = len(LENGTHS) // G  # the incomplete last global step is dropped
    assert all(
        len(batches) == steps == plan.micro_batches_per_epoch for plan, batches in zip(ranks, per_rank, strict=True)
    )
    assert all(len(batch) == micro for batches in per_rank for batch in batches)
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert len(seen) == len(set(seen)) == steps * G  # disjoint across ranks and steps
    for s, expected in enumerate(single.micro_batches(epoch=1)):
        parts = [batches[s] for batches in per_rank]
        assert sorted(i for part in parts for i in part) == sorted(expected)  # the ranks share one global batch
        tokens = [sum(LENGTHS[i] for i in part) for part in parts]  # balanced: never more than one example apart
        assert max(tokens) - min(tokens) <= max(LENGTHS[i] for i in expected)


def test_the_ranks_of_a_global_micro_batch_get_nearly_equal_tokens():
    """Longest first, each to the slice with the fewest tokens that has room (ties: the lower rank)."""
    lengths = [5, 100, 7, 60, 50, 3]
    plan = BatchPlan(lengths, micro_batch_size=3, world_size=2)
    # 100 → rank 0 (tie); 60 → 1; 50 → 1 (60 < 100); 7 → 0 (100 < 110); 5 → 0 (107 < 110; now full); 3 → 1
    assert plan.balanced(range(6)) == [1, 2, 0, 3, 4, 5]
    order = BatchPlan(LENGTHS, 4, 4, 0, seed=1).global_order(0)  # the order before step 5
    ranks = [BatchPlan(LENGTHS, 4, 4, r, seed=1).micro_batches(0) for r in range(4)]

    def slowest(parts_per_step):  # the step waits for its rank with the most tokens
        return sum(max(sum(LENGTHS[i] for i in part) for part in parts) for parts in parts_per_step)

    steps = len(order) // 16
    plain_parts = [[order[s * 16 + r * 4 : s * 16 + (r + 1) * 4] for r in range(4)] for s in range(steps)]
    balanced_parts = [[ranks[r][s] for r in range(4)] for s in range(steps)]
    total = sum(LENGTHS[i] for i in order)
    assert slowest(balanced_parts) < slowest(plain_parts) and slowest(balanced_parts) < 1.05 * total / 4


@pytest.mark.parametrize("group", [False, True])
def test_batch_plan_is_a_pure_function_of_seed_and_epoch(group: bool):
    a, b = BatchPlan(LENGTHS, 2, 2, 1, 5, group), BatchPlan(list(LENGTHS), 2, 2, 1, 5, group)
    assert a.micro_batches(0) == b.micro_batches(0) == a.micro_batches(0)
    assert a.micro_batches(0) != a.micro_batches(1)  # epochs reshuffle
    assert a.micro_batches(0) != BatchPlan(LENGTHS, 2, 2, 1, 6, group).micro_batches(0)  # seeds differ
    resumed = b.micro_batches(0)[7:]  # what the trainer does after 7 micro-batches
    assert resumed == a.micro_batches(0)[7:] and resumed[0] == a.micro_batches(0)[7]
    # the kept orders are copies: changing one changes no later answer, and going back an epoch recomputes it
    order, batches = a.global_order(1), a.micro_batches(1)
    order.reverse(), batches[0].clear()
    assert a.global_order(1) == b.global_order(1) != order and a.micro_batches(1) == b.micro_batches(1) != batches
    assert a.micro_batches(0) == BatchPlan(LENGTHS, 2, 2, 1, 5, group).micro_batches(0)


def test_batch_plan_order_definition():
    """The documented order: randperm seeded by seed + epoch, truncated to whole global steps."""
    plan = BatchPlan(LENGTHS, 4, 2, 0, seed=10)
    perm = torch.randperm(len(LENGTHS), generator=torch.Generator().manual_seed(10 + 2)).tolist()
    assert plan.global_order(2) == perm[: (len(LENGTHS) // 8) * 8]
    assert plan.micro_batches(2)[:2] == [plan.balanced(perm[0:8])[0:4], plan.balanced(perm[8:16])[0:4]]
    assert BatchPlan(LENGTHS, 8, 1, 0, seed=10).micro_batches(2)[:2] == [perm[0:8], perm[8:16]]  # one rank: as is


def test_batch_plan_group_by_length_sorts_within_megabatches():
    world_size, micro = 2, 1  # G = 2, megabatch = 100: 257 -> 256 kept -> megabatches of 100, 100, 56
    grouped = BatchPlan(LENGTHS, micro, world_size, 0, 3, group_by_length=True)
    shuffled = BatchPlan(LENGTHS, micro, world_size, 0, 3, group_by_length=False)
    mega = BatchPlan.MEGABATCH_MULT * micro * world_size
    g, s = grouped.global_order(4), shuffled.global_order(4)
    assert len(g) == len(s) == 256
    for start in range(0, len(g), mega):
        chunk = g[start : start + mega]
        assert set(chunk) == set(s[start : start + mega])  # same members: sorting never crosses a megabatch
        lengths = [LENGTHS[i] for i in chunk]
        assert lengths == sorted(lengths, reverse=True)  # longest first
    assert [LENGTHS[i] for i in g] != sorted((LENGTHS[i] for i in g), reverse=True)  # not one global sort


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 2}, "expected 0 <= rank < world_size=2"),
        ({"micro_batch_size": 0}, "micro_batch_size >= 1"),
        ({"lengths": [5, 5, 5]}, "at least micro_batch_size x world_size = 4 examples"),
    ],
)
def test_batch_plan_errors(kwargs: dict, match: str):
    args = {"lengths": LENGTHS, "micro_batch_size": 2, "world_size": 2, "rank": 0, **kwargs}
    with pytest.raises(InputError, match=match):
        BatchPlan(**args)


# ------------------------------------------------------------------------------------------------ collate


@pytest.mark.parametrize(("multiple", "width"), [(None, 5), (1, 5), (4, 8), (8, 8), (5, 5)])
def test_collate_right_pads(multiple: int | None, width: int):
    features = [
        {"input_ids": [1, 10, 11, 2], "labels": [-100, -100, 11, 2], "length": 4},
        {"input_ids": [1, 12, 13, 14, 2], "labels": [1, 12, 13, 14, 2], "length": 5},
        {"input_ids": [1, 2], "labels": [-100, 2], "length": 2},
    ]
    batch = collate(features, pad_token_id=0, pad_to_multiple_of=multiple)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for key in batch:
        assert batch[key].shape == (3, width) and batch[key].dtype == torch.long
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        assert batch["input_ids"][row].tolist() == feature["input_ids"] + [0] * (width - n)
        assert batch["labels"][row].tolist() == feature["labels"] + [IGNORE_INDEX] * (width - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)


def test_pipeline_end_to_end(tmp_path: Path, tok):
    """load -> tokenize -> split -> plan -> collate, the way the trainer chains them."""
    path = tmp_path / "train.json"
    path.write_text(json.dumps([RECORD, RECORD_WITH_INPUT] * 6))
    ds = tokenize_records(load_records(str(path), cache_dir=str(tmp_path / "c")), tok, 256, train_on_inputs=False)
    train, val = split_validation(ds, 2, seed=0)
    plan = BatchPlan(train["length"], micro_batch_size=2, world_size=2, rank=1, seed=0, group_by_length=True)
    loader = torch.utils.data.DataLoader(
        train, batch_sampler=plan.micro_batches(0), collate_fn=lambda f: collate(f, tok.pad_token_id, 8)
    )
    batches = list(loader)
    assert len(batches) == 10 // 4 == len(plan.micro_batches(0))
    for batch in batches:
        assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] % 8 == 0
        assert ((batch["labels"] != IGNORE_INDEX) <= (batch["attention_mask"] == 1)).all()
