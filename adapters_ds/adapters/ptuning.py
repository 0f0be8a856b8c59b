"""P-tuning: the virtual tokens' embeddings come from a trainable prompt encoder (Liu et al. 2021, "GPT Understands,
Too", arXiv 2103.10385, section 3.2), then go in front of the input embeddings as in prompt tuning.

    P = encoder(E),   E: (num_virtual_tokens, hidden) trainable, N(0, 1)
    mlp:  encoder = Linear(hidden, h) → ReLU → Linear(h, h) → ReLU → Linear(h, hidden)
    lstm: encoder = Linear(2h, 2h) → ReLU → Linear(2h, hidden) applied to a 2-layer bidirectional LSTM(hidden → h)
          over the virtual tokens (the paper's choice)

h is `--encoder_hidden_size`. The encoders are Hugging Face PEFT's `PromptEncoder` (MLP and LSTM, no dropout), so
an exported adapter means the same in PEFT. The encoder only reparameterises training: P does not depend on the
input, so inference needs P alone, and `export --peft` writes just that (`peft_embeddings`, computed in fp32).
There is no identity at step 0 (the method adds tokens to the input): the model starts reading the encoder's
output for random E in front of every input.

Default learning rate (`default_learning_rate`): 1e-3, Hugging Face PEFT's P-tuning example rate with AdamW for a
frozen base (the paper's SuperGLUE runs tune the whole model with the encoder, so their rate does not carry over).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from adapters_ds.adapters.base import option
from adapters_ds.adapters.registry import register
from adapters_ds.adapters.virtual_tokens import (
    ENCODER_HIDDEN_SIZE_HELP,
    ModelDims,
    VirtualTokens,
    VirtualTokensConfig,
    check_count,
)
from adapters_ds.errors import InputError

LSTM_LAYERS = 2  # PEFT's PromptEncoderConfig.encoder_num_layers


@dataclass
class PTuningConfig(VirtualTokensConfig):
    method: ClassVar[str] = "ptuning"
    default_learning_rate: ClassVar[float] = 1e-3

    encoder_type: Literal["mlp", "lstm"] = option(
        "mlp", "ptuning: prompt encoder, an MLP (PEFT's default) or a bidirectional LSTM + MLP (the paper's)",
        flag="encoder_type",
    )  # fmt: skip
    encoder_hidden_size: int = option(128, ENCODER_HIDDEN_SIZE_HELP, flag="encoder_hidden_size")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder_type not in ("mlp", "lstm"):
            raise InputError(f"ptuning encoder_type must be 'mlp' or 'lstm', found {self.encoder_type!r}")
        check_count("ptuning encoder_hidden_size", self.encoder_hidden_size)


class PTuning(VirtualTokens):
    def __init__(self, config: PTuningConfig, dims: ModelDims, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(config.num_virtual_tokens)
        hidden, h = dims.hidden, config.encoder_hidden_size
        factory = {"dtype": dtype, "device": device}
        self.embedding = nn.Parameter(torch.randn(config.num_virtual_tokens, hidden, **factory))
        self.lstm: nn.LSTM | None = None
        if config.encoder_type == "lstm":
            self.lstm = nn.LSTM(hidden, h, num_layers=LSTM_LAYERS, bidirectional=True, batch_first=True, **factory)
            self.mlp = nn.Sequential(nn.Linear(2 * h, 2 * h, **factory), nn.ReLU(), nn.Linear(2 * h, hidden, **factory))
        else:
            self.mlp = nn.Sequential(
                nn.Linear(hidden, h, **factory),
                nn.ReLU(),
                nn.Linear(h, h, **factory),
                nn.ReLU(),
                nn.Linear(h, hidden, **factory),
            )

    def trainable_names(self) -> tuple[str, ...]:
        linears = (0, 2) if self.lstm is not None else (0, 2, 4)
        names = ["embedding", *(f"mlp.{i}.{p}" for i in linears for p in ("weight", "bias"))]
        if self.lstm is not None:
            for layer in range(LSTM_LAYERS):
                for direction in ("", "_reverse"):
                    names += [f"lstm.{p}_l{layer}{direction}" for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        return tuple(names)

    def forward(self) -> torch.Tensor:
        return encode(self.embedding, self.lstm, self.mlp)

    @torch.no_grad()
    def peft_embeddings(self) -> torch.Tensor:
        lstm = None if self.lstm is None else copy.deepcopy(self.lstm).float()
        return encode(self.embedding.float(), lstm, copy.deepcopy(self.mlp).float())


def encode(embedding: torch.Tensor, lstm: nn.LSTM | None, mlp: nn.Module) -> torch.Tensor:
    """The virtual tokens' embeddings (num_virtual_tokens, hidden), a new tensor: the parameters stay untouched."""
    x = embedding  # (num_virtual_tokens, hidden)
    if lstm is not None:
        x = lstm(x.unsqueeze(0))[0][0]  # (num_virtual_tokens, 2h): both directions
    return mlp(x)


register(PTuningConfig, PTuning)
