"""Conversations as training data: records in OpenAI's `messages` form or ShareGPT's `conversations` form, checked
and normalised, rendered with the model's own chat template, and split into the spans the loss trains on.

Formats (detected per record; `record_format`):

- OpenAI: `{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...], "tools": [...]}`; an
  assistant message may carry `tool_calls` (`{"type": "function", "function": {"name", "arguments"}}`, arguments a
  JSON object or a JSON string of one), a `tool` message answers one of them (`tool_call_id` when the calls have ids).
- ShareGPT: `{"conversations": [{"from": "system"|"human"|"gpt"|"tool", "value": ...}, ...], "tools": ...}`, with
  LLaMA-Factory's `function_call` (an assistant tool call, the value a JSON `{"name", "arguments"}` or a list of
  them) and `observation` (a tool result) roles.
- Alpaca (`instruction`, `input`, `output`), which in a data set of conversations is one user turn and its answer.

Normalised, every conversation is the form Hugging Face chat templates take: `{"messages": [...], "tools": [...]}`
with tool-call arguments as objects. It must end with an assistant turn; a record that breaks a rule is an
`InputError` naming the source and the record index.

Masks (`assistant_spans`): most chat templates have no `{% generation %}` markers, so the assistant's spans are found
by rendering the conversation's prefixes, as LLaMA-Factory, axolotl and torchtune do. For an assistant turn i, the
conversation before it rendered with the generation prompt must be a prefix of the whole conversation's text: the
turn starts right after it. It ends where the conversation up to and including it ends, when that text is a prefix of
the whole (the prefix property); where the template rewrites history (Qwen3 drops earlier turns' reasoning), it ends
at the first end-of-turn marker after its start, the marker being what the template writes after an answer. The
trailing whitespace of a turn (the separator after the end-of-turn marker) is not trained; a template that writes
no marker gets the tokenizer's EOS after each answer, so the model still learns to stop. Every span is checked to
hold the turn's tool calls (a template that drops them cannot train them). The pieces are then encoded one by one,
context and answers apart, so no token straddles a boundary and an answer's tokens are those a model generates after
the prompt's text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from adapters_ds.errors import InputError
from adapters_ds.records import json_type

Format = Literal["openai", "sharegpt", "alpaca"]
TrainOnTurns = Literal["all", "last"]
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool", "observation": "tool", "function_call": "assistant"}  # fmt: skip


def record_format(record: Any) -> Format | None:
    """The format of one record, from its fields; None when it fits none."""
    if not isinstance(record, Mapping):
        return None
    if "messages" in record:
        return "openai"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return None


def normalize(record: Mapping[str, Any], where: str, prompt_only: bool = False) -> dict[str, Any]:
    """The record as `{"messages", "tools"}` for a chat template, checked; `where` ("data.json: record 3 (0-based)")
    starts every error message. `prompt_only` (an evaluation question): the conversation may end with the user's
    turn instead of the assistant's."""
    kind = record_format(record)
    if kind is None:
        found = f"fields {sorted(record)}" if isinstance(record, Mapping) else f"a JSON {json_type(record)}"
        raise InputError(
            f"{where}: expected 'messages' (OpenAI), 'conversations' (ShareGPT) or 'instruction' and 'output' "
            f"(Alpaca); found {found}"
        )
    if kind == "alpaca":
        instruction, input_, output = (record.get(k) for k in ("instruction", "input", "output"))
        if not all(isinstance(v, str) for v in (instruction, output)) or not isinstance(input_, str | None):
            raise InputError(f"{where}: expected string 'instruction', 'output' (and 'input'); found {dict(record)}")
        content = f"{instruction}\n\n{input_}" if input_ else instruction
        messages = [{"role": "user", "content": content}, {"role": "assistant", "content": output}]
    elif kind == "openai":
        messages = [_openai_message(m, f"{where}: message {i}") for i, m in enumerate(_list(record, "messages", where))]
    else:
        messages = [
            _sharegpt_message(m, f"{where}: turn {i}") for i, m in enumerate(_list(record, "conversations", where))
        ]
    tools = record.get("tools")
    if isinstance(tools, str):  # ShareGPT files (LLaMA-Factory's) keep the tool list as a JSON string
        tools = _json(tools, f"{where}: 'tools'")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, Mapping) for t in tools)):
        raise InputError(f"{where}: expected 'tools' to be a list of objects; found {json_type(tools)}")
    _check_order(messages, where, prompt_only)
    return {"messages": messages, "tools": tools or None}


def _list(record: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = record[key]
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: expected {key!r} to be a non-empty list; found {json_type(value)}")
    return value


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: expected JSON; found invalid JSON ({exc.msg}) in {text[:60]!r}") from None


def _content(value: Any, where: str) -> str:
    """Message content: a string, null (an assistant turn that only calls tools) or OpenAI's list of text parts."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    raise InputError(f"{where}: expected 'content' to be a string or a list of text parts; found {json_type(value)}")


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    function = call.get("function", call) if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise InputError(f"{where}: expected a tool call with a function 'name'; found {json.dumps(call)[:80]}")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        arguments = _json(arguments, f"{where}: arguments of {function['name']!r}")
    if not isinstance(arguments, Mapping):
        raise InputError(f"{where}: expected the arguments of {function['name']!r} as an object; found {arguments!r}")
    normalized = {"type": "function", "function": {"name": function["name"], "arguments": dict(arguments)}}
    if isinstance(call, Mapping) and call.get("id") is not None:
        normalized["id"] = str(call["id"])
    return normalized


def _openai_message(message: Any, where: str) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise InputError(f"{where}: expected an object with 'role' and 'content'; found {json_type(message)}")
    role = message.get("role")
    if role not in ROLES:
        raise InputError(f"{where}: expected a role among {', '.join(ROLES)}; found {role!r}")
    out: dict[str, Any] = {"role": role, "content": _content(message.get("content"), where)}
    calls = message.get("tool_calls")
    if calls:
        if role != "assistant" or not isinstance(calls, list):
            raise InputError(f"{where}: expected 'tool_calls' as a list on an assistant message; found it on {role!r}")
        out["tool_calls"] = [_tool_call(c, f"{where}: tool call {k}") for k, c in enumerate(calls)]
    for key in ("tool_call_id", "name"):
        if message.get(key) is not None and role == "tool":
            out[key] = str(message[key])
    if isinstance(message.get("reasoning_content"), str) and role == "assistant":
        out["reasoning_content"] = message["reasoning_content"]  # templates of reasoning models (Qwen3) read it
    if role != "tool" and not out["content"].strip() and not calls:
        raise InputError(f"{where}: expected text in a {role} message; found it empty")
    return out


def _sharegpt_message(turn: Any, where: str) -> dict[str, Any]:
    if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
        raise InputError(f"{where}: expected an object with 'from' and a string 'value'; found {json_type(turn)}")
    kind = turn.get("from")
    if kind not in SHAREGPT_ROLES:
        raise InputError(f"{where}: expected 'from' among {', '.join(SHAREGPT_ROLES)}; found {kind!r}")
    if kind == "function_call":
        calls = _json(turn["value"], where)
        calls = calls if isinstance(calls, list) else [calls]
        return {"role": "assistant", "content": "", "tool_calls": [_tool_call(c, where) for c in calls]}
    return _openai_message({"role": SHAREGPT_ROLES[kind], "content": turn["value"]}, where)


def _check_order(messages: list[dict[str, Any]], where: str, prompt_only: bool = False) -> None:
    """System only first; tool results only answering the calls of the assistant turn before them; the last turn
    is the assistant's."""
    open_calls: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system" and i > 0:
            raise InputError(f"{where}: message {i}: expected a system message only first; found one at {i}")
        if role == "tool":
            if not open_calls:
                raise InputError(
                    f"{where}: message {i}: expected a tool result after an assistant tool call; found none"
                )
            ids = [c["id"] for c in open_calls if "id" in c]
            wanted = message.get("tool_call_id")
            if wanted is not None and ids and wanted not in ids:
                raise InputError(f"{where}: message {i}: tool result for call {wanted!r}; open calls are {ids}")
            open_calls.remove(next((c for c in open_calls if c.get("id") == wanted), open_calls[0]))
        else:
            open_calls = list(message.get("tool_calls", [])) if role == "assistant" else []
    if messages[-1]["role"] != "assistant" and not prompt_only:
        raise InputError(
            f"{where}: expected the conversation to end with an assistant turn; found {messages[-1]['role']!r} last"
        )


# ---------------------------------------------------------------------------------------------------- rendering


def load_chat_template(tokenizer: Any, path: str | None) -> None:
    """Give `tokenizer` the Jinja chat template in file `path` (for a model without one, or to replace it)."""
    if path is None:
        return
    file = Path(path)
    if not file.is_file():
        raise InputError(f"chat_template: expected a Jinja template file; found no file {path!r}")
    tokenizer.chat_template = file.read_text(encoding="utf-8")


def require_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"conversations need a chat template; the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has none "
            "(pass --chat_template FILE with a Jinja template)"
        )


def render(tokenizer: Any, conversation: Mapping[str, Any], n: int | None = None, prompt: bool = False) -> str:
    """The text of the first `n` messages (all by default), with the generation prompt when `prompt`."""
    messages = conversation["messages"][:n]
    return tokenizer.apply_chat_template(
        messages, tools=conversation.get("tools"), tokenize=False, add_generation_prompt=prompt
    )


def end_of_turn(tokenizer: Any) -> str:
    """What the template writes after an assistant's answer (its end-of-turn marker, "<|im_end|>", "<|eot_id|>"),
    whitespace stripped: from a probe conversation rendered with and without the answer."""
    answer = "zq7x"  # text no template writes by itself
    probe = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": answer}]}
    full, before = render(tokenizer, probe), render(tokenizer, probe, 1, prompt=True)
    if not full.startswith(before) or answer not in full[len(before) :]:
        raise InputError("chat template: the generation prompt is not how the template starts an assistant turn")
    return full[len(before) :].split(answer, 1)[1].strip()


@dataclass(frozen=True)
class Rendered:
    """A conversation's text and its trained character spans ([start, end), in order, disjoint)."""

    text: str
    spans: list[tuple[int, int]]


def assistant_spans(
    tokenizer: Any, conversation: Mapping[str, Any], train_on_turns: TrainOnTurns = "all", eot: str | None = None
) -> Rendered:
    """The whole conversation's text and the character spans of its assistant turns (see the module docstring);
    `eot` is `end_of_turn(tokenizer)`, computed once per data set."""
    messages = conversation["messages"]
    text = render(tokenizer, conversation)
    eot = end_of_turn(tokenizer) if eot is None else eot
    turns = [
        i
        for i, m in enumerate(messages)
        if m["role"] == "assistant" and (i == 0 or messages[i - 1]["role"] != "assistant")
    ]
    turns = turns[-1:] if train_on_turns == "last" else turns
    spans: list[tuple[int, int]] = []
    for i in turns:
        last = i
        while last + 1 < len(messages) and messages[last + 1]["role"] == "assistant":
            last += 1  # consecutive assistant messages are one turn
        before = render(tokenizer, conversation, i, prompt=True)
        if not text.startswith(before):
            raise InputError(
                f"chat template: the conversation before assistant message {i}, rendered with the generation prompt, "
                "is not a prefix of the whole conversation's text, so its answer cannot be located (the template "
                "writes earlier turns differently once later ones follow; --train_on_turns last trains the last one)"
            )
        start = len(before)
        upto = render(tokenizer, conversation, last + 1)
        if text.startswith(upto) and len(upto) > start:
            end = start + len(upto[start:].rstrip())
        else:  # history rewritten: the turn ends at its first end-of-turn marker
            found = text.find(eot, start) if eot else -1
            if found < 0:
                raise InputError(f"chat template: no end-of-turn marker {eot!r} after assistant message {i}")
            end = found + len(eot)
        if spans and start < spans[-1][1]:
            raise InputError(f"chat template: assistant message {i} overlaps the turn before it")
        for m in messages[i : last + 1]:
            for call in m.get("tool_calls", []):
                if call["function"]["name"] not in text[start:end]:
                    raise InputError(
                        f"chat template: it does not render the tool call {call['function']['name']!r} of assistant "
                        f"message {i}; use a template with tool calls (--chat_template FILE)"
                    )
        spans.append((start, end))
    return Rendered(text, spans)


def encode_spans(
    tokenizer: Any, rendered: Rendered, bos_id: int | None, eos_id: int | None = None
) -> list[tuple[list[int], bool]]:
    """The text as consecutive (token ids, trained) pieces: context before each span, the span, and what follows
    the last one; `bos_id` is prepended where the text does not start with it (see `prompts.encode_texts`), and
    `eos_id` ends every span (for a template that writes no end-of-turn marker, so the model still learns to stop)."""
    cuts, pieces = 0, []
    for start, end in rendered.spans:
        pieces += [(rendered.text[cuts:start], False), (rendered.text[start:end], True)]
        cuts = end
    pieces.append((rendered.text[cuts:], False))
    pieces = [(text, trained) for text, trained in pieces if text]
    ids = tokenizer([text for text, _ in pieces], add_special_tokens=False)["input_ids"]
    encoded = [(p + [eos_id] if t and eos_id is not None else p, t) for p, (_, t) in zip(ids, pieces, strict=True)]
    if bos_id is not None and encoded and encoded[0][0][:1] != [bos_id]:
        encoded.insert(0, ([bos_id], False))
    return encoded


def fit_turns(pieces: Sequence[tuple[list[int], bool]], cutoff_len: int) -> tuple[list[int], list[bool], int]:
    """Keep whole (context, answer) pairs from the start while they fit in `cutoff_len` tokens: never a turn's start
    without its end. Returns the token ids, the trained flag of each, and how many trained turns were dropped."""
    ids: list[int] = []
    trained: list[bool] = []
    pending: list[tuple[list[int], bool]] = []
    dropped = sum(1 for _, t in pieces if t)
    for piece in pieces:
        pending.append(piece)
        if not piece[1] and piece is not pieces[-1]:
            continue
        size = sum(len(p) for p, _ in pending)
        if len(ids) + size > cutoff_len:
            break
        for p, t in pending:
            ids += p
            trained += [t] * len(p)
            dropped -= int(t)
        pending = []
    return ids, trained, dropped
