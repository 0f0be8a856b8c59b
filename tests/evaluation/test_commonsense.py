"""The commonsense suite in the harness: label scoring exact against unpadded single rows, label scoring choosing what
greedy generation chooses where it writes a label cleanly, both modes side by side with their agreement, summaries
grouped by suite, two ranks equal to one process, resume after a kill. Tiny models from configs; hand-written data."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from tiny_models import make_model
from tiny_tokenizer import make_tokenizer

from adapters_ds.cli import evaluate as cli
from adapters_ds.evaluation import harness, label_scoring
from adapters_ds.evaluation.datasets import EvalDataset
from adapters_ds.evaluation.generation import encode_prompts
from adapters_ds.evaluation.label_scoring import continuation_ids, continuation_log_likelihoods
from adapters_ds.evaluation.labels import clean_pick, record_labels, score_label
from adapters_ds.evaluation.results import accuracy, compare_modes, format_table, suite_rows, summary_rows
from adapters_ds.prompts import build_prompt

from .test_evaluation import NUMERIC, Killed, _expect_error, _free_port, _read_jsonl, _records, _tiny_llama

LEAD = "the correct answer is "
BOOL = [
    ("is the sky blue on a clear day", "true"),
    ("do fish live in trees", "false"),
    ("is ice colder than steam", "true"),
    ("can a dog read a newspaper", "false"),
    ("is seven larger than three", "true"),
    ("is the sun a planet", "false"),
]
ARC = [
    ("Where is fog most likely?", ["a marsh", "a desert", "the moon", "an oven"], "answer1"),
    ("What do plants need to grow?", ["sunlight", "plastic", "noise"], "answer1"),
    ("Which is a mammal?", ["a trout", "a whale", "a frog", "a crow", "a shark"], "answer2"),
    ("What melts ice fastest?", ["wind", "shade", "heat", "snow"], "answer3"),
    ("Which tool measures mass?", ["a ruler", "a clock", "a balance", "a compass"], "answer3"),
    ("What do bees make?", ["milk", "silk", "wax", "honey"], "answer4"),
    ("Which is a liquid at room temperature?", ["iron", "water", "salt"], "answer2"),
]
BATCH = 3
NEW_TOKENS = 10


def _bool_records():
    return [
        {
            "instruction": f"Please answer the following question with true or false, question: {q}?\n\n"
            "Answer format: true/false",
            "input": "",
            "output": LEAD + a,
            "answer": a,
        }
        for q, a in BOOL
    ]


def _arc_records():
    records = []
    for question, options, answer in ARC:
        listed = " ".join(f"Answer{i + 1}: {o}" for i, o in enumerate(options))
        labels = "/".join(f"answer{i + 1}" for i in range(len(options)))
        instruction = (
            f"Please choose the correct answer to the question: {question}\n\n{listed}\n\nAnswer format: {labels}"
        )
        records.append({"instruction": instruction, "input": "", "output": LEAD + answer, "answer": answer})
    return records


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = make_tokenizer(folder)
    model = _tiny_llama()
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model, tokenizer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for name, records in (("Arith", _records(NUMERIC)), ("Bool", _bool_records()), ("Arc", _arc_records())):
        (root / name).mkdir()
        (root / name / "test.json").write_text(json.dumps(records))
    return root


def _args(tiny, data_dir, out, *extra, datasets="Arith,Bool,Arc"):
    return [
        "--base_model", str(tiny[0]), "--datasets", datasets, "--data_dir", str(data_dir), "--output_dir", str(out),
        "--batch_size", str(BATCH), "--max_new_tokens", str(NEW_TOKENS), "--dtype", "float32", *extra,
    ]  # fmt: skip


FILES = ("Arith.jsonl", "Bool.jsonl", "Arc.jsonl", "Bool.label_scoring.jsonl", "Arc.label_scoring.jsonl", "summary.md")


def _same_results(out, ref, files=FILES):
    for name in files:
        assert (out / name).read_text() == (ref / name).read_text(), name
    summary, expected = (json.loads((d / "summary.json").read_text()) for d in (out, ref))
    summary.pop("timing"), expected.pop("timing")
    assert summary == expected


@pytest.fixture(scope="module")
def reference_run(tiny, data_dir, tmp_path_factory):
    """One uninterrupted single-process run of both modes over a math set and two label sets."""
    out = tmp_path_factory.mktemp("reference")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        cli.main(_args(tiny, data_dir, out, "--compare_label_scoring"))
    return out, stdout.getvalue()


# -------------------------------------------------------------------------------------------- label scoring


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "qwen2"])
def test_label_scoring_equals_unpadded_single_rows(family, monkeypatch):
    model = make_model(family).float().eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, vocab, (n,), generator=g).tolist() for n in (7, 12, 3)]
    conts = [[torch.randint(5, vocab, (m,), generator=g).tolist() for m in ms] for ms in ([1, 3], [2, 2, 4], [5])]
    expected = []
    with torch.no_grad():
        for prompt, items in zip(prompts, conts, strict=True):
            scores = []
            for cont in items:
                logprobs = torch.log_softmax(model(input_ids=torch.tensor([prompt + cont])).logits[0], -1)
                scores.append(sum(logprobs[len(prompt) - 1 + j, t].item() for j, t in enumerate(cont)))
            expected.append(scores)
    tokenizer = make_tokenizer()
    for shared in (True, False):
        got = continuation_log_likelihoods(model, tokenizer, prompts, conts, shared_prefix=shared)
        assert [len(s) for s in got] == [2, 3, 1]
        torch.testing.assert_close(torch.tensor(sum(got, [])), torch.tensor(sum(expected, [])), atol=2e-5, rtol=0)
    if family == "llama":  # the shared-prefix path really ran (it does not fall back to one row per label)
        monkeypatch.setattr(label_scoring, "_row_scores", None)
        continuation_log_likelihoods(model, tokenizer, prompts, conts)


@pytest.fixture(scope="module")
def trained(tiny):
    """A tiny Llama trained to answer "the correct answer is <label>" on 16 items of the numbered formats, and
    (training items, held-out items). Chat template: short prompts, a few seconds of training."""
    _, _, tokenizer = tiny
    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "fox", "table", "lamp", "green", "seven", "paper", "music"]
    formats = [("answer", 4), ("solution", 2), ("ending", 4), ("option", 2), ("answer", 5), ("answer", 3)]

    def record(i):
        word, k = formats[i % len(formats)]
        options = " ".join(f"{word.capitalize()}{j + 1}: {rng.choice(words)}" for j in range(k))
        labels = "/".join(f"{word}{j + 1}" for j in range(k))
        question = " ".join(rng.choice(words) for _ in range(3))
        answer = f"{word}{rng.randrange(k) + 1}"
        instruction = f"Please choose the correct {word}: {question}?\n\n{options}\n\nAnswer format: {labels}"
        return {"instruction": instruction, "input": "", "output": LEAD + answer, "answer": answer}

    train, held_out = [record(i) for i in range(16)], [record(i) for i in range(16)]
    torch.manual_seed(0)
    model = _tiny_llama()
    prompts = [build_prompt(r["instruction"], template="chat", tokenizer=tokenizer) for r in train]
    prompt_ids = encode_prompts(tokenizer, prompts)
    full_ids = encode_prompts(tokenizer, [p + r["output"] for p, r in zip(prompts, train, strict=True)])
    width = max(len(f) for f in full_ids) + 1
    input_ids = torch.zeros(len(train), width, dtype=torch.long)
    labels = torch.full((len(train), width), -100)
    mask = torch.zeros(len(train), width, dtype=torch.long)
    for i, (p, f) in enumerate(zip(prompt_ids, full_ids, strict=True)):
        f = [*f, tokenizer.eos_token_id]
        input_ids[i, : len(f)], mask[i, : len(f)] = torch.tensor(f), 1
        labels[i, len(p) : len(f)] = torch.tensor(f[len(p) :])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    return model.eval(), train, held_out


def test_label_scoring_picks_what_greedy_generation_picks_cleanly(tiny, trained):
    """Greedy decoding takes the most likely next token at each step. When it writes lead + label, and the allowed
    labels' tokens differ only in their last token (here: "answer" + digit, ...; checked below), every other label
    shares the chosen one's tokens up to that last one, where greedy took the likelier token: so the chosen label
    has the highest likelihood, and label scoring must pick it. The trained model writes clean labels on training
    items (its memorised gold) and on held-out items (its own choice)."""
    _, _, tokenizer = tiny
    model, train, held_out = trained
    clean_total = 0
    for records in (train, held_out):
        generated = harness.evaluate_records(
            model, tokenizer, records, batch_size=4, max_new_tokens=20, template="chat"
        )
        scored = harness.evaluate_records(model, tokenizer, records, batch_size=4, label_scoring=True, template="chat")
        for record, gen, label in zip(records, generated, scored, strict=True):
            labels = record_labels(record)
            prompt = build_prompt(record["instruction"], template="chat", tokenizer=tokenizer)
            conts = continuation_ids(
                tokenizer, [prompt], encode_prompts(tokenizer, [prompt]), [[LEAD + y for y in labels]]
            )
            assert len({tuple(c[:-1]) for c in conts[0]}) == 1  # the labels differ in their last token only
            assert label["output"] == LEAD + label["prediction"]
            pick = clean_pick(gen["output"], labels, LEAD)
            if pick is not None:
                clean_total += 1
                assert label["prediction"] == pick == gen["prediction"], (gen["output"], label["label_scores"])
    assert clean_total >= 16  # of 32 (26 when written): the comparison covered many items
    # and the held-out choices are the model's own, not all the gold
    held = harness.evaluate_records(model, tokenizer, held_out, batch_size=4, label_scoring=True, template="chat")
    assert 0 < sum(r["correct"] for r in held) < len(held)


# ---------------------------------------------------------------------------------------------------- the CLI


def test_both_modes_rows_agreement_and_summary_by_suite(tiny, data_dir, reference_run):
    out, printed = reference_run
    summary = json.loads((out / "summary.json").read_text())
    by_name = {e["dataset"]: e for e in summary["datasets"]}
    assert [(e["suite"], e["type"]) for e in summary["datasets"]] == [
        ("math", "numeric"),
        ("commonsense", "labels"),
        ("commonsense", "labels"),
    ]
    assert summary["settings"]["label_scoring"] == "compare"
    for name, records in (("Bool", _bool_records()), ("Arc", _arc_records())):
        generated, scored = _read_jsonl(out / f"{name}.jsonl"), _read_jsonl(out / f"{name}.label_scoring.jsonl")
        assert [r["index"] for r in scored] == list(range(len(records)))
        for record, gen, label in zip(records, generated, scored, strict=True):
            assert (gen["prediction"], gen["correct"]) == score_label(
                gen["output"], record["answer"], record["instruction"]
            )
            labels = record_labels(record)
            assert list(label["label_scores"]) == list(labels)
            best = max(labels, key=lambda y: label["label_scores"][y])
            assert (label["prediction"], label["output"]) == (best, LEAD + best)
            assert label["correct"] == (best == record["answer"])
        entry = by_name[name]
        assert entry["accuracy"] == round(accuracy(generated), 2)
        assert entry["label_scoring_accuracy"] == round(accuracy(scored), 2)
        agreement = compare_modes(generated, scored, [record_labels(r) for r in records], LEAD)
        assert {k: entry[k] for k in agreement} == agreement
        same = sum(g["prediction"] == s["prediction"] for g, s in zip(generated, scored, strict=True))
        assert entry["agreement"] == round(100 * same / len(records), 2)
    suites = {s["suite"]: s for s in summary["suites"]}
    assert suites["math"]["datasets"] == ["Arith"] and suites["commonsense"]["datasets"] == ["Bool", "Arc"]
    assert suites["math"]["accuracy"] == by_name["Arith"]["accuracy"]
    accuracies = [accuracy(_read_jsonl(out / f"{n}.jsonl")) for n in ("Bool", "Arc")]
    assert suites["commonsense"]["accuracy"] == round(sum(accuracies) / 2, 2)
    assert suites["commonsense"]["n"] == len(BOOL) + len(ARC)
    markdown = (out / "summary.md").read_text()
    assert printed == markdown
    lines = markdown.splitlines()
    assert lines[0] == "**math**" and "**commonsense**" in lines
    commonsense = lines[lines.index("**commonsense**") + 2 :]
    assert commonsense[0] == "| dataset | n | accuracy (%) | label scoring (%) | agreement (%) |"
    assert commonsense[-1].startswith(
        f"| **average** | {len(BOOL) + len(ARC)} | {suites['commonsense']['accuracy']:.2f} |"
    )
    assert set(summary["timing"]["label_scoring"]) == {"Bool", "Arc"}


def test_summary_tables_grouped_by_suite():
    def rows(*flags):
        return [{"correct": flag} for flag in flags]

    results = {"A": rows(True, False), "B": rows(True), "C": rows(False, False, True, True), "D": rows(True, True)}
    datasets = [
        EvalDataset("A", None, [], False),
        EvalDataset("B", None, [], False, True),
        EvalDataset("C", None, [], True),
        EvalDataset("D", None, [], False, True),
    ]
    compared = {"B": {"label_scoring_accuracy": 100.0, "agreement": 100.0}, "D": {"label_scoring_accuracy": 50.0,
                                                                             "agreement": 0.0}}  # fmt: skip
    table, average = summary_rows(results, datasets, None, compared)
    suites = suite_rows(table, results)
    assert [(s["suite"], s["datasets"], s["n"], s["accuracy"]) for s in suites] == [
        ("math", ["A", "C"], 6, 50.0),
        ("commonsense", ["B", "D"], 3, 100.0),
    ]
    assert (suites[1]["label_scoring_accuracy"], suites[1]["agreement"]) == (75.0, 50.0)
    assert average["accuracy"] == 75.0  # all four data sets (summary.json keeps it; the tables show each suite's)
    assert format_table(table, average, suites).splitlines() == [
        "**math**",
        "",
        "| dataset | n | accuracy (%) |",
        "|---|---:|---:|",
        "| A | 2 | 50.00 |",
        "| C | 4 | 50.00 |",
        "| **average** | 6 | 50.00 |",
        "",
        "**commonsense**",
        "",
        "| dataset | n | accuracy (%) | label scoring (%) | agreement (%) |",
        "|---|---:|---:|---:|---:|",
        "| B | 1 | 100.00 | 100.00 | 100.00 |",
        "| D | 2 | 100.00 | 50.00 | 0.00 |",
        "| **average** | 3 | 100.00 | 75.00 | 50.00 |",
    ]


def test_label_scoring_mode_alone(tiny, data_dir, reference_run, tmp_path, capsys):
    ref = reference_run[0]
    cli.main(_args(tiny, data_dir, tmp_path, "--label_scoring"))
    assert (tmp_path / "Arith.jsonl").read_text() == (ref / "Arith.jsonl").read_text()  # math still generates
    for name in ("Bool", "Arc"):
        assert (tmp_path / f"{name}.jsonl").read_text() == (ref / f"{name}.label_scoring.jsonl").read_text()
        assert not (tmp_path / f"{name}.label_scoring.jsonl").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["settings"]["label_scoring"] == "on" and "label_scoring" not in summary["timing"]
    # a rerun in another mode would mix rows: refused either way
    _expect_error(capsys, _args(tiny, data_dir, tmp_path), "label_scoring: 'on' then, None now", "--overwrite")
    _expect_error(capsys, _args(tiny, data_dir, ref, "--label_scoring"), "label_scoring: 'compare' then, 'on' now")
    # an explicit lead is part of the settings and of the rows
    cli.main(_args(tiny, data_dir, tmp_path / "lead", "--label_scoring", "--label_lead", "", "--datasets", "Bool"))
    rows = _read_jsonl(tmp_path / "lead" / "Bool.jsonl")
    assert all(r["output"] == r["prediction"] for r in rows)
    assert json.loads((tmp_path / "lead" / "eval_settings.json").read_text())["label_lead"] == ""


def test_bad_label_input_exits_2(tiny, data_dir, tmp_path, capsys):
    _expect_error(capsys, _args(tiny, data_dir, tmp_path, "--label_scoring", "--compare_label_scoring"), "not allowed")
    bad = tmp_path / "data"
    shutil.copytree(data_dir, bad)
    records = _bool_records()
    records[2]["instruction"] = records[2]["instruction"].replace("Answer format: true/false", "")
    (bad / "Bool" / "test.json").write_text(json.dumps(records))
    _expect_error(capsys, _args(tiny, bad, tmp_path / "out", datasets="Bool"), "record 2", "label set cannot be read")


_LABEL_ROWS = harness._label_rows
_GENERATE_ROWS = harness._generate_rows


def _spy(monkeypatch, kill_after: int | None = None):
    """The batches each mode made (("generate" | "labels", indices)); optionally die like a killed run when label
    scoring starts its batch number `kill_after`."""
    made: list[tuple[str, list[int]]] = []

    def wrap(mode, real):
        def spy(model, tokenizer, batch, *rest):
            if mode == "labels" and kill_after is not None and sum(m == "labels" for m, _ in made) == kill_after:
                raise Killed
            made.append((mode, list(batch)))
            return real(model, tokenizer, batch, *rest)

        return spy

    monkeypatch.setattr(harness, "_generate_rows", wrap("generate", _GENERATE_ROWS))
    monkeypatch.setattr(harness, "_label_rows", wrap("labels", _LABEL_ROWS))
    return made


def test_resume_after_kill_in_label_scoring(tiny, data_dir, reference_run, tmp_path, monkeypatch):
    ref = reference_run[0]
    args = _args(tiny, data_dir, tmp_path, "--compare_label_scoring", datasets="Bool,Arc")
    _spy(monkeypatch, kill_after=1)  # Bool: generated, then one batch of label scoring
    with pytest.raises(Killed):
        cli.main(args)
    written = _read_jsonl(tmp_path / "Bool.label_scoring.jsonl")
    assert len(written) == BATCH
    missing = sorted(set(range(len(BOOL))) - {r["index"] for r in written})
    partial = json.dumps(_read_jsonl(ref / "Bool.label_scoring.jsonl")[missing[0]])
    with (tmp_path / "Bool.label_scoring.jsonl").open("a") as f:  # the kill cut a write in the middle of a line
        f.write(partial[: len(partial) // 2])

    made = _spy(monkeypatch)
    cli.main(args)
    assert made[0] == ("labels", missing)  # Bool's generation is complete: only its missing label rows are made
    assert sorted(i for mode, batch in made[1:] if mode == "generate" for i in batch) == list(range(len(ARC)))
    assert sorted(i for mode, batch in made[1:] if mode == "labels" for i in batch) == list(range(len(ARC)))
    names = ("Bool.jsonl", "Arc.jsonl", "Bool.label_scoring.jsonl", "Arc.label_scoring.jsonl")
    for name in names:
        assert (tmp_path / name).read_text() == (ref / name).read_text(), name
    timing = json.loads((tmp_path / "summary.json").read_text())["timing"]
    assert timing["label_scoring"]["Bool"]["generated"] == len(missing) and timing["datasets"]["Bool"]["generated"] == 0

    made = _spy(monkeypatch)
    cli.main([*args, "--overwrite"])  # starts over: both rows files of each set are replaced
    assert sum(len(batch) for mode, batch in made if mode == "labels") == len(BOOL) + len(ARC)


def test_rerun_scores_kept_outputs_with_the_current_rules(tiny, data_dir, reference_run, tmp_path, monkeypatch):
    """Rows kept by a resumed run are scored again (a change of the extraction rules needs no new generation)."""
    ref = reference_run[0]
    shutil.copytree(ref, tmp_path, dirs_exist_ok=True)
    rows = _read_jsonl(tmp_path / "Bool.jsonl")
    rows[0] = {**rows[0], "output": "The answer is true.", "prediction": "stale", "correct": None}
    (tmp_path / "Bool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    made = _spy(monkeypatch)
    cli.main(_args(tiny, data_dir, tmp_path, "--compare_label_scoring"))
    assert made == []  # nothing generated or scored by the model
    row = _read_jsonl(tmp_path / "Bool.jsonl")[0]
    assert (row["prediction"], row["correct"]) == ("true", BOOL[0][1] == "true")
    assert (tmp_path / "Arc.jsonl").read_text() == (ref / "Arc.jsonl").read_text()


def test_two_ranks_give_the_single_process_results(tiny, data_dir, reference_run, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        str(REPO / "launcher" / "evaluate.py"), *_args(tiny, data_dir, tmp_path, "--compare_label_scoring"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_results(tmp_path, reference_run[0])
    assert json.loads((tmp_path / "summary.json").read_text())["timing"]["ranks"] == 2
