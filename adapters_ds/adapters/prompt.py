"""Prompt tuning: trainable soft-prompt embeddings put in front of the input embeddings (Lester, Al-Rfou, Constant
2021, arXiv 2104.08691, section 2).

    inputs_embeds = [P ; E(x)],   P: (num_virtual_tokens, hidden), the only trainable tensor

The attention mask and positions grow by the virtual tokens, labels get -100 there (see `virtual_tokens`), so the
frozen model reads P as a prompt of `num_virtual_tokens` tokens at positions 0..n-1 and the input after it. As in
Hugging Face PEFT, the model's logits then cover the virtual positions too (batch, n + seq, vocab); training asks for
the target positions only, generation for the last one.

Initialisation (the paper's section 3.2 compares them): random, N(0, 1) as PEFT's `RANDOM`; or from a text
(`--prompt_init_text`), P = the model's own input embeddings of the text's tokens (encoded without special tokens,
repeated or cut to num_virtual_tokens). Prompt tuning cannot be the identity at step 0 (it adds tokens to the
input); what holds instead with a text: the model starts exactly as the base model reading that text before each
input. The token ids are read once, from the base model's tokenizer, outside the config (`PromptConfig.resolve`, which
training calls before injecting), and kept in it (`init_token_ids`), so a saved adapter loads without a tokenizer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from adapters_ds.adapters.base import option
from adapters_ds.adapters.registry import register
from adapters_ds.adapters.virtual_tokens import ModelDims, VirtualTokens, VirtualTokensConfig
from adapters_ds.errors import InputError
from adapters_ds.prompts import encode_texts
from adapters_ds.zero import gathered


@dataclass
class PromptConfig(VirtualTokensConfig):
    method: ClassVar[str] = "prompt"
    peft_type: ClassVar[str] = "PROMPT_TUNING"

    init_text: str | None = option(
        None, "prompt: initialise the soft prompt from the embeddings of this text's tokens (default: random)",
        flag="prompt_init_text",
    )  # fmt: skip
    init_token_ids: tuple[int, ...] | None = None
    """The tokens of `init_text`, by the base model's tokenizer (`resolve`); kept in the saved config, so an adapter
    loads without a tokenizer."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_text is not None and (not isinstance(self.init_text, str) or not self.init_text.strip()):
            raise InputError(f"prompt init_text must be a non-empty text, found {self.init_text!r}")
        if self.init_token_ids is not None:
            if self.init_text is None:
                raise InputError("prompt init_token_ids are the tokens of init_text, which is not set")
            self.init_token_ids = tuple(self.init_token_ids)
            if not self.init_token_ids or not all(isinstance(i, int) and i >= 0 for i in self.init_token_ids):
                raise InputError(f"prompt init_token_ids must be token ids, found {self.init_token_ids!r}")

    def resolve(self, tokenizer: Any) -> PromptConfig:
        """With `init_text` and no token ids yet: a copy holding its tokens (special tokens off)."""
        if self.init_text is None or self.init_token_ids is not None:
            return self
        ids = encode_texts(tokenizer, [self.init_text], bos_id=None)[0]
        if not ids:
            raise InputError(f"--prompt_init_text {self.init_text!r} has no tokens")
        return dataclasses.replace(self, init_token_ids=tuple(ids))

    def layer_options(self, model: nn.Module, name: str) -> dict[str, Any]:
        if self.init_text is None:
            return {}
        if self.init_token_ids is None:
            raise InputError(
                "--prompt_init_text needs the base model's tokenizer: resolve the config first "
                "(`config.resolve(tokenizer)`, as training does)"
            )
        embedding = model.get_input_embeddings()
        vocab = embedding.num_embeddings
        if max(self.init_token_ids) >= vocab:
            raise InputError(f"prompt init_token_ids {max(self.init_token_ids)} is outside the model's {vocab} tokens")
        ids = repeat_to(self.init_token_ids, self.num_virtual_tokens)
        with gathered([embedding.weight]):  # a ZeRO-3 partition holds no rows; every rank injects, so all gather
            return {"init": embedding.weight[list(ids)].detach().clone()}


def repeat_to(ids: tuple[int, ...], n: int) -> tuple[int, ...]:
    """`ids` repeated and cut to exactly `n` tokens (PEFT's rule for a text shorter or longer than the prompt)."""
    return (ids * math.ceil(n / len(ids)))[:n]


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
