"""Prompt tuning: trainable soft-prompt embeddings put in front of the input embeddings (Lester, Al-Rfou, Constant
2021, arXiv 2104.08691, section 2).

    inputs_embeds = [P ; E(x)],   P: (num_virtual_tokens, hidden), the only trainable tensor

The attention mask and positions grow by the virtual tokens, labels get -100 there (see `virtual_tokens`), so the
frozen model reads P as a prompt of `num_virtual_tokens` tokens at positions 0..n-1 and the input after it. As in
Hugging Face PEFT, the model's logits then cover the virtual positions too (batch, n + seq, vocab); training asks for
the target positions only, generation for the last one.

Initialisation (the paper's section 3.2 compares them; sampled vocabulary and class labels beat random): by default
"vocab", P = the model's own input embeddings of num_virtual_tokens real tokens sampled from the vocabulary's most
common ones (`virtual_tokens.init_token_ids`); from a text (`--prompt_init_text`), the embeddings of the text's tokens
(repeated or cut to num_virtual_tokens); or `--prompt_init random`, N(0, 1) as PEFT's `RANDOM`. Prompt tuning cannot
be the identity at step 0 (it adds tokens to the input); what holds instead with real tokens: the model starts exactly
as the base model reading those tokens before each input. The token ids are resolved from the base model's tokenizer
before injection (`PromptConfig.resolve`, which the training command calls; the config itself does no I/O) and kept in
the config (`init_token_ids`), so a saved adapter loads without a tokenizer.

Default learning rate (`default_learning_rate`): 3e-2. The paper trains with Adafactor at 0.3; AdamW, whose steps are
about the learning rate per coordinate whatever the gradient's scale, needs a tenth of that on input embeddings of
this scale, the rate Hugging Face PEFT's prompt-tuning examples use with AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from adapters_ds.adapters.base import option
from adapters_ds.adapters.registry import register
from adapters_ds.adapters.virtual_tokens import (
    INIT_HELP,
    InitName,
    ModelDims,
    VirtualTokens,
    VirtualTokensConfig,
    check_init,
    resolve_init,
    start_embeddings,
)


@dataclass
class PromptConfig(VirtualTokensConfig):
    method: ClassVar[str] = "prompt"
    peft_type: ClassVar[str] = "PROMPT_TUNING"

    default_learning_rate: ClassVar[float] = 3e-2

    init: InitName = option("vocab", "prompt: " + INIT_HELP, flag="prompt_init")
    init_text: str | None = option(
        None, "prompt: initialise the soft prompt from the embeddings of this text's tokens", flag="prompt_init_text"
    )
    init_token_ids: tuple[int, ...] | None = None
    """The real tokens the prompt starts from (the text's, or sampled): filled in by `resolve(tokenizer)`."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.init_token_ids = check_init("prompt", self.init, self.init_text, self.init_token_ids)

    def resolve(self, tokenizer: Any) -> PromptConfig:
        return resolve_init(self, tokenizer)

    def layer_options(self, model: nn.Module, name: str) -> dict[str, Any]:
        return start_embeddings(self, model)


class PromptTuning(VirtualTokens):
    def __init__(
        self,
        config: PromptConfig,
        dims: ModelDims,
        dtype: torch.dtype,
        device: torch.device,
        init: torch.Tensor | None = None,
    ) -> None:
        super().__init__(config.num_virtual_tokens)
        shape = (config.num_virtual_tokens, dims.hidden)
        if init is not None:
            self.prompt_embeddings = nn.Parameter(init.to(device=device, dtype=dtype).reshape(shape))
        else:
            self.prompt_embeddings = nn.Parameter(torch.randn(shape, dtype=dtype, device=device))  # PEFT's RANDOM

    def trainable_names(self) -> tuple[str, ...]:
        return ("prompt_embeddings",)

    @torch.no_grad()
    def peft_embeddings(self) -> torch.Tensor:
        return self.prompt_embeddings.float().clone()

    def forward(self) -> torch.Tensor:
        # a copy, not the parameter itself: ZeRO-3 may release the parameter's storage once this call returns
        return self.prompt_embeddings.clone()  # (num_virtual_tokens, hidden)


register(PromptConfig, PromptTuning)
