"""Conversations as training data: formats, checks, and the loss mask on exactly the assistant's tokens, on three
templates' behaviour (the embedded SmolLM2's own template and two written in tests/training/chat_templates.py in
the style of Qwen3 and Llama 3.x), and on the ChatML template with tool calls shipped for the embedded model."""

from __future__ import annotations

import copy
import json

import datasets
import pytest
import torch
from launch import REPO
from tiny_models import make_model
from tiny_tokenizer import make_tokenizer
from transformers import AutoTokenizer

from adapters_ds.conversations import assistant_spans, load_chat_template, normalize, render
from adapters_ds.demo.default_model import default_model_dir, is_complete
from adapters_ds.errors import InputError
from adapters_ds.training import data
from adapters_ds.training.data import IGNORE_INDEX, collate, collate_packed, load_records, preview, tokenize_records
from adapters_ds.training.loss import causal_lm_loss_sum
from adapters_ds.training.packing import enable_packing
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
    "smollm2_tools": (
        [f"{A1}<|im_end|>", f"{A2}<|im_end|>"],
        [
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
            "It is 18 C and sunny.<|im_end|>",
        ],
    ),
}
CHATML_TOOLS = REPO / "slurm" / "recipes" / "chatml_tools.jinja"  # shipped for the embedded model's tool calls


@pytest.fixture(params=["smollm2", "qwen3", "llama3", "smollm2_tools"])
def template(request, smol):
    if request.param == "smollm2":
        return request.param, smol
    if request.param == "smollm2_tools":
        tok = copy.deepcopy(smol)
        load_chat_template(tok, str(CHATML_TOOLS))
        return request.param, tok
    return request.param, tokenizer_with({"qwen3": QWEN3_STYLE, "llama3": LLAMA3_STYLE}[request.param])


def test_the_shipped_tool_template_renders_plain_chats_as_the_embedded_model_does(smol):
    tok = copy.deepcopy(smol)
    load_chat_template(tok, str(CHATML_TOOLS))
    for record in (MULTI_TURN, {"messages": MULTI_TURN["messages"][1:]}):
        conversation = normalize(record, "x")
        assert render(tok, conversation) == render(smol, conversation)
        assert render(tok, conversation, 2, prompt=True) == render(smol, conversation, 2, prompt=True)


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
    with pytest.raises(InputError, match="data.jsonl: record 0 .* does not render the tool call 'get_weather'"):
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
    with pytest.raises(InputError, match="first trained assistant turn fits"):
        examples(tmp_path, tok, [MULTI_TURN], cutoff_len=first_end - 1)
    with pytest.raises(InputError, match="first trained assistant turn fits"):  # the last turn is the one trained
        examples(tmp_path, tok, [MULTI_TURN], cutoff_len=len(labels) - 1, train_on_turns="last")


@pytest.mark.parametrize("per_example_attention", [False, True])
def test_packed_conversations_keep_to_themselves(tmp_path, per_example_attention):
    """Packing keeps conversation boundaries: conversations packed in one row (each with several trained spans)
    train on the same tokens, with the same loss, as the padded batch, so no token attends across conversations
    (with transformers' block-diagonal mask and with `packed_sdpa`)."""
    tok = tokenizer_with(LLAMA3_STYLE)
    tokenized, _ = examples(tmp_path, tok, [MULTI_TURN, TOOL_CALL, SHAREGPT])
    features = [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in tokenized]
    packed = collate_packed(features)
    assert packed["labels"][0].tolist() == [label for f in features for label in f["labels"]]
    model = make_model("llama")
    if per_example_attention:
        assert enable_packing(model)
    with torch.no_grad():
        padded_loss = causal_lm_loss_sum(model, collate(features, tok.pad_token_id))
        packed_loss = causal_lm_loss_sum(model, packed)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-5)


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


def test_a_hub_dataset_of_conversations_trains_like_the_same_file(tmp_path, monkeypatch):
    """Arrow fills every message with every key of every record (null tool_calls, null content): the result is
    the same as from the JSON file. `datasets.load_dataset` is stubbed with what it would return (no network)."""
    tok = tokenizer_with(LLAMA3_STYLE)
    records = [TOOL_CALL, MULTI_TURN]  # from_list takes its columns from the first record
    stub = datasets.Dataset.from_list(records)
    monkeypatch.setattr(data.datasets, "load_dataset", lambda name, split, cache_dir: stub)
    from_hub = tokenize_records(load_records("someone/chats"), tok, 512, True)
    from_file, _ = examples(tmp_path, tok, records)
    assert from_hub["input_ids"] == from_file["input_ids"] and from_hub["labels"] == from_file["labels"]


def test_reasoning_is_trained_where_the_template_keeps_it():
    """Qwen3-style: the last answer's reasoning (OpenAI's `reasoning_content`) is in its <think> block and trained;
    an earlier answer's reasoning is dropped from the history by the template, so it is not."""
    tok = tokenizer_with(QWEN3_STYLE)
    messages = [dict(m) for m in MULTI_TURN["messages"]]
    messages[2]["reasoning_content"], messages[4]["reasoning_content"] = "greet back", "add them"
    rendered = assistant_spans(tok, normalize({"messages": messages}, "x"))
    spans = [rendered.text[a:b] for a, b in rendered.spans]
    assert spans == [f"{A1}<|im_end|>", f"<think>\nadd them\n</think>\n\n{A2}<|im_end|>"]
    assert "greet back" not in rendered.text


def test_a_template_without_an_end_of_turn_marker_ends_each_answer_with_eos(tmp_path):
    tok = make_tokenizer()  # its template writes "<|role|>\ncontent\n" and nothing to stop on
    _, shown = examples(tmp_path, tok, [MULTI_TURN])
    assert shown[0]["trained_segments"] == [f"{A1}</s>", f"{A2}</s>"]


# Mistral's style: the tool list written before the last user message, so an earlier prefix renders differently
TOOLS_BEFORE_LAST_USER = (
    "{%- set last = namespace(i=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}{%- set last.i = loop.index0 %}"
    "{%- endif %}{%- endfor %}{{- bos_token }}{%- for m in messages %}{%- if m.role == 'user' %}"
    "{%- if tools and loop.index0 == last.i %}[TOOLS]{{ tools | tojson }}[/TOOLS]{%- endif %}"
    "[INST]{{ m.content }}[/INST]{%- elif m.role == 'assistant' %}{{ m.content }}</s>{%- endif %}{%- endfor %}"
)


def test_a_template_that_rewrites_earlier_turns_trains_the_last_turn_only(tmp_path):
    tok = tokenizer_with(TOOLS_BEFORE_LAST_USER)
    record = {"messages": MULTI_TURN["messages"][1:], "tools": TOOLS}
    with pytest.raises(InputError, match="record 0 .*before assistant message 1.*--train_on_turns last"):
        examples(tmp_path, tok, [record])
    _, shown = examples(tmp_path, tok, [record], train_on_turns="last")
    assert shown[0]["trained_segments"] == [f"{A2}</s>"]
