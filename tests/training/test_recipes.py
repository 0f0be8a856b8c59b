"""Runs as recipes and conversations end to end: a YAML recipe trains a tiny model on tool-call conversations with
a --chat_template file and three trackers; the run's train_args.json given back to --config repeats it with equal
losses; --preview_data shows the masks without training; a bad recipe key is an error naming it."""

from __future__ import annotations

import csv
import importlib.util
import json
import zipfile

import pytest
from launch import losses, run, write_train_assets

from adapters_ds.cli.train import run as run_command
from adapters_ds.errors import InputError
from adapters_ds.training.args import parse_train_args
from training.chat_templates import QWEN3_STYLE

pytestmark = pytest.mark.slow

WANDB = importlib.util.find_spec("wandb") is not None
COMET = importlib.util.find_spec("comet_ml") is not None
CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}


def conversation(a: int, b: int) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "Use the tool."},
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "add", "arguments": json.dumps({"a": a, "b": b})}}]},
            {"role": "tool", "content": str(a + b)},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
        ],
        "tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}],
    }  # fmt: skip


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = write_train_assets(tmp_path_factory.mktemp("recipe"))
    (root / "chat.jsonl").write_text("".join(json.dumps(conversation(a, a + 1)) + "\n" for a in range(1, 9)))
    (root / "qwen3.jinja").write_text(QWEN3_STYLE)
    trackers = "tensorboard,csv" + (",wandb" if WANDB else "")
    (root / "recipe.yaml").write_text(
        f"""# a recipe: every option by its flag name
ds_config: {root / "nozero_fp32.json"}
base_model: {root / "base"}
data_path: {root / "chat.jsonl"}
chat_template: {root / "qwen3.jinja"}
output_dir: {root / "overridden"}
target_modules: [q_proj, v_proj]
lora_r: 4
lora_alpha: 8
learning_rate: 2.0e-2
lr_scheduler: constant
max_steps: 3
micro_batch_size: 4
batch_size: 4
cutoff_len: 512
logging_steps: 1
save_steps: 0
group_by_length: false
report_to: {trackers}
seed: 7
"""
    )
    return root


def train(recipe, config, out, *extra, env=None):
    args = ["--config", str(config), "--output_dir", str(out), *extra]
    return run(args, launcher="python", nproc=1, env_extra={"WANDB_MODE": "offline", **(env or {})})


def test_recipe_run_repeats_from_its_saved_arguments_with_equal_losses(recipe):
    first, again = recipe / "first", recipe / "again"
    train(recipe, recipe / "recipe.yaml", first)
    assert not (recipe / "overridden").exists()  # the command line's --output_dir won over the recipe's
    saved = json.loads((first / "train_args.json").read_text())["args"]
    assert saved["target_modules"] == "q_proj,v_proj" and saved["lora_r"] == 4
    train(recipe, first / "train_args.json", again, "--report_to", "csv")
    assert len(losses(first)) == 3 and losses(again) == losses(first)

    # every tracker got the same metrics under the same names
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(first / "tensorboard" / "train"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s"} <= tags
    csv_files = {p.stem: p for p in (first / "csv" / "train").glob("*.csv")}
    assert set(csv_files) == {tag.replace("/", "_") for tag in tags}
    rows = list(csv.reader(csv_files["train_loss"].open()))[1:]
    assert [float(value) for _, value in rows] == pytest.approx([e.value for e in events.Scalars("train/loss")])
    if WANDB:  # the offline run's record file holds each name and each loss value as text (protobuf strings)
        (record,) = (first / "wandb").glob("offline-run-*/run-*.wandb")
        data = record.read_bytes()
        assert all(tag.encode() in data for tag in tags)
        assert all(repr(loss).encode() in data for loss in losses(first))


@pytest.mark.skipif(not COMET, reason="comet_ml is not installed here")
def test_comet_gets_the_metrics_of_the_other_trackers(recipe, tmp_path):
    """An offline Comet experiment (its archive complete once the run ends it) holds every step's metrics under the
    names and with the values that the CSV tracker writes."""
    out, archive = tmp_path / "run", tmp_path / "comet"
    train(recipe, recipe / "recipe.yaml", out, "--report_to", "csv,comet",
          env={"COMET_START_ONLINE": "0", "COMET_OFFLINE_DIRECTORY": str(archive)})  # fmt: skip
    (path,) = archive.glob("*.zip")
    logged: dict[str, list[tuple[int, float]]] = {}
    with zipfile.ZipFile(path) as zipped:
        for line in zipped.read("messages.json").decode().splitlines():
            metric = json.loads(line).get("payload", {}).get("metric")
            if metric and metric["metricName"].startswith("train/"):
                logged.setdefault(metric["metricName"], []).append((metric["step"], metric["metricValue"]))
    written = {
        p.stem: [(int(step), value) for step, value in list(csv.reader(p.open()))[1:]]
        for p in (out / "csv" / "train").glob("*.csv")
    }
    assert {name.replace("/", "_") for name in logged} == set(written)
    for name, values in logged.items():
        expected = written[name.replace("/", "_")]
        assert [step for step, _ in values] == [step for step, _ in expected] == [1, 2, 3]
        assert [float(v) for _, v in values] == pytest.approx([float(v) for _, v in expected], nan_ok=True)


def test_preview_data_shows_the_trained_spans_without_training(recipe, capsys):
    # no --ds_config: nothing trains
    options = {"base_model": "base", "data_path": "chat.jsonl", "chat_template": "qwen3.jinja", "output_dir": "preview"}
    run_command([*(f"--{k}={recipe / v}" for k, v in options.items()), "--cutoff_len=512", "--preview_data=2"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 2 and not (recipe / "preview").exists()
    assert lines[0]["trained_segments"] == [
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call><|im_end|>',
        "<think>\n\n</think>\n\n1 + 2 = 3.<|im_end|>",
    ]
    assert lines[0]["input_tokens"] > lines[0]["trained_tokens"] > 0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("lerning_rate: 1", "unknown option 'lerning_rate'"),
        ("group_by_length: 3", "option 'group_by_length' expects true or false"),
        ("lr_scheduler: sometimes", "argument --lr_scheduler: invalid choice: 'sometimes'"),
    ],
)
def test_a_bad_recipe_key_is_an_error_naming_it(recipe, tmp_path, line, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text((recipe / "recipe.yaml").read_text() + line + "\n")
    with pytest.raises(InputError, match=message):
        parse_train_args(["--config", str(bad)])


def test_saved_arguments_without_their_method_are_an_error(tmp_path):
    """Which method options a saved run repeats with depends on its `adapter`: a record without it is refused, not
    read as some default method's."""
    saved = tmp_path / "train_args.json"
    saved.write_text(json.dumps({"args": {"learning_rate": 0.1}, "ds_config": {}}))
    with pytest.raises(InputError, match=r"expected the run's 'adapter' in 'args'; found None"):
        parse_train_args(["--config", str(saved)])
