"""The one prompt template, shared by training (`adapters_ds.data`) and the evaluation harness.

Training and evaluation must render byte-identical prompts: the reference project (LLM-Adapters) used different
whitespace in its training and evaluation copies of the template, which costs accuracy. So the text lives here only.

`alpaca` is the Stanford Alpaca template as Alpaca-LoRA / LLM-Adapters define it (`templates/alpaca.json`: with a
trailing newline after "### Response:"). `chat` renders the tokenizer's own chat template with one user turn.
"""

from __future__ import annotations

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
