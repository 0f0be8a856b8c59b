"""Conversations as training data: formats, checks, and the loss mask on exactly the assistant's tokens, on three
templates' behaviour (the embedded SmolLM2's own template and two written in tests/training/chat_templates.py in
the style of Qwen3 and Llama 3.x)."""

from __future__ import annotations

import json

import pytest
from tiny_tokenizer import make_tokenizer
from transformers import AutoTokenizer

from adapters_ds.demo.default_model import default_model_dir, is_complete
from adapters_ds.errors import InputError
from adapters_ds.training.data import IGNORE_INDEX, load_records, preview, tokenize_records
from training.chat_templates import LLAMA3_STYLE, QWEN3_STYLE

SYSTEM, Q1, A1, Q2, A2 = "Be brief.", "Hi there!", "Hello. How can I help?", "What is 2+2?", "2+2 is 4."
WEATHER_CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
MULTI_TURN = {
    "messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": Q1},
        {"role": "assistant", "content": A1},
        {"role": "user", "content": Q2},
        {"role": "assistant", "content": A2},
    ]
}
TOOL_CALL = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": "18 C, sunny"},
        {"role": "assistant", "content": "It is 18 C and sunny."},
    ],
    "tools": TOOLS,
}
SHAREGPT = {
    "conversations": [
        {"from": "system", "value": SYSTEM},
        {"from": "human", "value": Q1},
        {"from": "gpt", "value": A1},
        {"from": "human", "value": Q2},
        {"from": "gpt", "value": A2},
    ]
}


def tokenizer_with(template: str):
    tok = make_tokenizer()
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def smol():
    if not is_complete(default_model_dir()):
        pytest.skip("the embedded model is prepared by .ci/setup")
    return AutoTokenizer.from_pretrained(str(default_model_dir()))


def examples(tmp_path, tokenizer, records, cutoff_len=512, train_on_turns="all"):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenized = tokenize_records(load_records(str(path)), tokenizer, cutoff_len, True, "alpaca", train_on_turns)
    return tokenized, preview(tokenized, tokenizer, len(tokenized))


# the trained text of MULTI_TURN, TOOL_CALL (None: the template cannot render tool calls), and its end of turn
EXPECTED = {
    "smollm2": ([f"{A1}<|im_end|>", f"{A2}<|im_end|>"], None),
    "qwen3": (
        [f"{A1}<|im_end|>", f"<think>\n\n</think>\n\n{A2}<|im_end|>"],
        [
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
            "<think>\n\n</think>\n\nIt is 18 C and sunny.<|im_end|>",
        ],
    ),
    "llama3": (
        [f"{A1}<|eot_id|>", f"{A2}<|eot_id|>"],
        ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', "It is 18 C and sunny.<|eot_id|>"],
    ),
}


@pytest.fixture(params=["smollm2", "qwen3", "llama3"])
def template(request, smol):
    tok = (
        smol
        if request.param == "smollm2"
        else tokenizer_with({"qwen3": QWEN3_STYLE, "llama3": LLAMA3_STYLE}[request.param])
    )
    return request.param, tok


def test_loss_covers_exactly_the_assistant_turns(tmp_path, template):
    name, tok = template
    multi, calls = EXPECTED[name]
    records = [MULTI_TURN, SHAREGPT] + ([TOOL_CALL] if calls else [])
    tokenized, shown = examples(tmp_path, tok, records)
    assert shown[0]["trained_segments"] == multi
    assert shown[1]["trained_segments"] == multi  # ShareGPT is the same conversation
    assert tokenized[0]["input_ids"] == tokenized[1]["input_ids"]
    if calls:
        assert shown[2]["trained_segments"] == calls  # the tool call is trained, the tool's result is not
    for example, row in zip(shown, tokenized, strict=True):
        assert example["trained_tokens"] == sum(label != IGNORE_INDEX for label in row["labels"])
        assert example["input_tokens"] == len(row["input_ids"])
        # what is not trained, decoded, holds every system, user and tool text
        untrained = tok.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label == -100])
        assert all(
            text in untrained for text in (Q1, Q2, "Weather in Paris?", "18 C, sunny") if text in example["text"]
        )
    last, _ = examples(tmp_path, tok, [MULTI_TURN], train_on_turns="last")
    assert preview(last, tok, 1)[0]["trained_segments"] == multi[-1:]
    assert last[0]["input_ids"] == tokenized[0]["input_ids"]


def test_a_template_without_tool_calls_is_an_error(tmp_path, smol):
    with pytest.raises(InputError, match="does not render the tool call 'get_weather'"):
        examples(tmp_path, smol, [TOOL_CALL])


def test_truncation_keeps_whole_turns(tmp_path, caplog):
    tok = tokenizer_with(LLAMA3_STYLE)
    full, shown = examples(tmp_path, tok, [MULTI_TURN])
    labels = full[0]["labels"]
    first_end = min(i for i in range(1, len(labels)) if labels[i - 1] != -100 and labels[i] == -100)
    for cutoff in (first_end, len(labels) - 1):  # room for the first turn only: the second is dropped whole
        cut, cut_shown = examples(tmp_path, tok, [MULTI_TURN], cutoff_len=cutoff)
        assert cut[0]["input_ids"] == full[0]["input_ids"][:first_end]
        assert cut_shown[0]["trained_segments"] == shown[0]["trained_segments"][:1]
    assert "and 1 assistant turns" in caplog.text
    with pytest.raises(InputError, match="first assistant turn fits"):
        examples(tmp_path, tok, [MULTI_TURN], cutoff_len=first_end - 1)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": [{"role": "user", "content": "a"}]}, "record 1 .*end with an assistant turn; found 'user'"),
        ({"messages": [{"role": "robot", "content": "a"}]}, "record 1 .*message 0: expected a role .* found 'robot'"),
        (
            {"conversations": [{"from": "tool", "value": "3"}, {"from": "gpt", "value": "a"}]},
            "record 1 .*expected a tool result after an assistant tool call",
        ),
        ({"text": "a"}, "record 1 .*expected 'messages' \\(OpenAI\\), 'conversations' \\(ShareGPT\\) or"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"function": {}}]}]},
            "record 1 .*tool call 0: expected a tool call with a function 'name'",
        ),
    ],
)
def test_a_bad_record_is_an_error_naming_file_and_index(tmp_path, record, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([MULTI_TURN, record]))
    with pytest.raises(InputError, match=f"{path}: {message}"):
        load_records(str(path))


def test_conversations_need_a_chat_template(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = None
    with pytest.raises(InputError, match="--chat_template FILE"):
        examples(tmp_path, tok, [MULTI_TURN])
