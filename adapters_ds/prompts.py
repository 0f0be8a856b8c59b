"""The one prompt template and the one way to encode it, shared by training (`adapters_ds.training.data`) and the
evaluation harness.

Training and evaluation must render byte-identical prompts and encode them to the same token ids: the reference
project (LLM-Adapters) used different whitespace in its training and evaluation copies of the template, which costs
accuracy. So the text lives here only, and so does the encoding (`encode_texts`: special tokens off, BOS prepended
only when the tokenizer would add one itself, `tokenizer_adds_bos`).

`alpaca` is the Stanford Alpaca template as Alpaca-LoRA / LLM-Adapters define it (`templates/alpaca.json`: with a
trailing newline after "### Response:"). `chat` renders the tokenizer's own chat template with one user turn.
An evaluation record that is a conversation is rendered whole through the chat template (`record_prompt`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from adapters_ds.errors import InputError

TemplateName = Literal["alpaca", "chat"]
TEMPLATES: tuple[TemplateName, ...] = ("alpaca", "chat")

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def build_prompt(instruction: str, input: str = "", template: TemplateName = "alpaca", tokenizer: Any = None) -> str:
    """Render the prompt that precedes the response; the response (training target or generation) follows directly.

    An empty `input` selects the no-input variant, as in Alpaca. For `chat`, the user message is the instruction,
    followed by a blank line and the input when there is one; the rendered text ends with the generation prompt
    (the assistant turn's header) and already contains the template's special tokens, such as BOS.
    """
    if template == "alpaca":
        if input:
            return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
        return ALPACA_NO_INPUT.format(instruction=instruction)
    if template == "chat":
        if tokenizer is None:
            raise InputError("template 'chat' needs a tokenizer with a chat template; found tokenizer=None")
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(
                f"template 'chat' needs a tokenizer with a chat template; found none on {type(tokenizer).__name__}"
                f" {getattr(tokenizer, 'name_or_path', '')!r} (use template 'alpaca')"
            )
        content = f"{instruction}\n\n{input}" if input else instruction
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    raise InputError(f"prompt template: expected one of {', '.join(TEMPLATES)}; found {template!r}")


def record_prompt(record: Mapping[str, Any], template: TemplateName = "alpaca", tokenizer: Any = None) -> str:
    """The prompt of an evaluation record. A conversation (its "messages", as `evaluation.datasets` normalises them,
    and "tools") is rendered through the tokenizer's chat template with the generation prompt, whatever `template`
    says, as the model saw its conversations in training; any other record is `build_prompt`'s."""
    messages = record.get("messages")
    if messages is None:
        return build_prompt(record["instruction"], record.get("input") or "", template, tokenizer)
    build_prompt("", "", "chat", tokenizer)  # the same error as `chat` without a chat template
    return tokenizer.apply_chat_template(
        list(messages), tools=record.get("tools"), tokenize=False, add_generation_prompt=True
    )


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer prepends BOS by itself (Llama does, GPT-2 and Qwen do not): ask it, don't guess."""
    bos_id = tokenizer.bos_token_id
    return bos_id is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos_id]


def encode_texts(tokenizer: Any, texts: list[str], bos_id: int | None) -> list[list[int]]:
    """Token ids of each text, special tokens off, with `bos_id` prepended where the text does not start with it.

    Pass `tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None` (computed once: it runs the tokenizer);
    a chat-template prompt already holds its BOS and gets no second one.
    """
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if bos_id is None:
        return encoded
    return [ids if ids[:1] == [bos_id] else [bos_id, *ids] for ids in encoded]
