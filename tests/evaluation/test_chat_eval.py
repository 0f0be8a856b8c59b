"""Evaluation sets of conversations: asked through the model's chat template, scored like any other set."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from tiny_models import make_model
from tiny_tokenizer import make_tokenizer
from training.chat_templates import QWEN3_STYLE

from adapters_ds.cli import evaluate as cli
from adapters_ds.errors import InputError
from adapters_ds.evaluation import harness
from adapters_ds.evaluation.datasets import validate_records

SYSTEM = {"role": "system", "content": "Answer with a number."}
RECORDS = [
    {"messages": [SYSTEM, {"role": "user", "content": "What is 2 plus 3?"}], "answer": "5"},
    {  # ShareGPT, ending with the reference answer (not part of the prompt)
        "conversations": [{"from": "human", "value": "What is 1 plus 1?"}, {"from": "gpt", "value": "2"}],
        "answer": 2,
    },
]


def test_a_conversation_set_is_asked_through_the_chat_template():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = QWEN3_STYLE
    clean = validate_records(RECORDS, "test.json")
    assert [r["instruction"] for r in clean] == ["What is 2 plus 3?", "What is 1 plus 1?"]
    assert clean[1]["output"] == "2" and clean[1]["messages"] == [{"role": "user", "content": "What is 1 plus 1?"}]
    rows = harness.evaluate_records(make_model("llama"), tokenizer, RECORDS, max_new_tokens=3, template="alpaca")
    expected = [
        "<|im_start|>system\nAnswer with a number.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\n",
        "<|im_start|>user\nWhat is 1 plus 1?<|im_end|>\n<|im_start|>assistant\n",
    ]
    assert [row["prompt"] for row in rows] == expected
    assert [row["answer"] for row in rows] == ["5", "2"] and all(isinstance(row["correct"], bool) for row in rows)


def test_a_conversation_without_a_question_is_an_error():
    records = [{"messages": [SYSTEM, {"role": "assistant", "content": "4"}], "answer": "4"}]
    with pytest.raises(InputError, match="test.json: record 0 .*ending with a user's question"):
        validate_records(records, "test.json")


def test_the_evaluate_command_takes_a_chat_template_file(tmp_path, capsys):
    """A model saved without a chat template: --chat_template gives it one; without it, a conversation set fails."""
    model_dir, data_dir = tmp_path / "model", tmp_path / "data"
    tokenizer = make_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(model_dir)
    make_model("llama").save_pretrained(model_dir)
    (data_dir / "chat").mkdir(parents=True)
    (data_dir / "chat" / "test.json").write_text(json.dumps(RECORDS))
    (tmp_path / "qwen3.jinja").write_text(QWEN3_STYLE)
    args = ["--base_model", str(model_dir), "--datasets", "chat", "--data_dir", str(data_dir), "--max_new_tokens", "2",
            "--dtype", "float32"]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        cli.main([*args, "--output_dir", str(tmp_path / "out"), "--chat_template", str(tmp_path / "qwen3.jinja")])
    rows = [json.loads(line) for line in (tmp_path / "out" / "chat.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows][
        1
    ] == "<|im_start|>user\nWhat is 1 plus 1?<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stdout(io.StringIO()):
        cli.main([*args, "--output_dir", str(tmp_path / "none")])
    assert exit_info.value.code == 2 and "needs a tokenizer with a chat template" in capsys.readouterr().err
