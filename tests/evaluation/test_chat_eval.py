"""Evaluation sets of conversations: asked through the model's chat template, scored like any other set."""

from __future__ import annotations

import pytest
from tiny_models import make_model
from tiny_tokenizer import make_tokenizer
from training.chat_templates import QWEN3_STYLE

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
