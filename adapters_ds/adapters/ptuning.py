"""P-tuning: the virtual tokens' embeddings come from a trainable prompt encoder (Liu et al. 2021, "GPT Understands,
Too", arXiv 2103.10385, section 3.2), then go in front of the input embeddings as in prompt tuning.

    vocab (default):  P = E + encoder(E),  E: (num_virtual_tokens, hidden) trainable, from real tokens' embeddings,
                      the encoder's last linear layer zero at the start
    random:           P = encoder(E),      E trainable, N(0, 1): PEFT's `PromptEncoder` exactly
    mlp:  encoder = Linear(hidden, h) → ReLU → Linear(h, h) → ReLU → Linear(h, hidden)
    lstm: encoder = Linear(2h, 2h) → ReLU → Linear(2h, hidden) applied to a 2-layer bidirectional LSTM(hidden → h)
          over the virtual tokens (the paper's choice)

h is `--encoder_hidden_size`. The encoders are Hugging Face PEFT's `PromptEncoder` (MLP and LSTM, no dropout). The
encoder only reparameterises training: P does not depend on the input, so inference needs P alone, and `export
--peft` writes just that (`peft_embeddings`, computed in fp32), which PEFT reads whatever the form.

Initialisation. PEFT's form starts the model reading the encoder's output for random E, embeddings of another
scale than any real token's: on the embedded model it starts at a loss far above the base's and, in the main job's
30 steps, lifted the held-out accuracy by a gain whose 95 % interval included 0 (at 1e-3; 1e-2 did worse). So by
default (`--ptuning_init vocab`, or `--ptuning_init_text`) E starts as the input embeddings of real tokens, as
prompt tuning's (Lester et al. 2021), and the encoder adds to E instead of replacing it: the residual
reparameterisation of Razdaibiedina et al. 2023 ("Residual Prompt Tuning", arXiv 2305.03937), which makes
reparameterised prompts train faster and more stably. With the encoder's last layer zero, the model starts exactly
as the base model reading those tokens before each input, and the encoder's first layers get gradients from the
first step on through the last one (as LoRA's B = 0 start). `--ptuning_init random` keeps PEFT's form (and a saved
config without `init`, written before the option, means that form).

Default learning rate (`default_learning_rate`): 3e-2, prompt tuning's (`prompt`): in the residual form E is a soft
prompt whose gradient, while the encoder's last layer is near zero, is prompt tuning's, and at PEFT's P-tuning
example rate, 1e-3, it barely moves in a short run. Measured on the main job (embedded model, 30 steps, 200 held-out
problems, base 10.0 %): residual at 1e-3 +1.0 points (McNemar p 0.85), at 3e-2 +6.0 [+0.6, +11.6] (p 0.043); PEFT's
form at 1e-3 +4.5 (p 0.11) and at 1e-2 +2.0. (The paper's SuperGLUE runs tune the whole model with the encoder, so
their rate does not carry over.)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from adapters_ds.adapters.base import option
from adapters_ds.adapters.registry import register
from adapters_ds.adapters.virtual_tokens import (
    ENCODER_HIDDEN_SIZE,
    ENCODER_HIDDEN_SIZE_HELP,
    INIT_HELP,
    InitName,
    ModelDims,
    VirtualTokens,
    VirtualTokensConfig,
    check_count,
    check_init,
    resolve_init,
    start_embeddings,
)
from adapters_ds.errors import InputError

LSTM_LAYERS = 2  # PEFT's PromptEncoderConfig.encoder_num_layers


@dataclass
class PTuningConfig(VirtualTokensConfig):
    method: ClassVar[str] = "ptuning"
    peft_type: ClassVar[str] = "P_TUNING"
    default_learning_rate: ClassVar[float] = 3e-2

    encoder_type: Literal["mlp", "lstm"] = option(
        "mlp", "ptuning: prompt encoder, an MLP (PEFT's default) or a bidirectional LSTM + MLP (the paper's)",
        flag="encoder_type",
    )  # fmt: skip
    encoder_hidden_size: int = option(ENCODER_HIDDEN_SIZE, ENCODER_HIDDEN_SIZE_HELP, flag="encoder_hidden_size")
    init: InitName = option(
        "vocab", "ptuning: " + INIT_HELP + "; vocab and a text make the encoder residual, P = E + encoder(E)",
        flag="ptuning_init",
    )  # fmt: skip
    init_text: str | None = option(
        None, "ptuning: start E from the embeddings of this text's tokens (residual encoder)", flag="ptuning_init_text"
    )
    init_token_ids: tuple[int, ...] | None = None
    """The real tokens E starts from (the text's, or sampled): filled in by `resolve(tokenizer)`."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder_type not in ("mlp", "lstm"):
            raise InputError(f"ptuning encoder_type must be 'mlp' or 'lstm', found {self.encoder_type!r}")
        check_count("ptuning encoder_hidden_size", self.encoder_hidden_size)
        self.init_token_ids = check_init("ptuning", self.init, self.init_text, self.init_token_ids)

    @property
    def residual(self) -> bool:
        """P = E + encoder(E) (E from real tokens: init vocab or a text), else PEFT's P = encoder(E)."""
        return self.init_text is not None or self.init == "vocab"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PTuningConfig:
        # a saved config without `init` predates the residual form: it was PEFT's (random E, no residual)
        return super().from_dict({"init": "random", **values})  # type: ignore[return-value]

    def resolve(self, tokenizer: Any) -> PTuningConfig:
        return resolve_init(self, tokenizer)  # type: ignore[return-value]

    def layer_options(self, model: nn.Module, name: str) -> dict[str, Any]:
        return start_embeddings(self, model)


class PTuning(VirtualTokens):
    def __init__(
        self,
        config: PTuningConfig,
        dims: ModelDims,
        dtype: torch.dtype,
        device: torch.device,
        init: torch.Tensor | None = None,
    ) -> None:
        super().__init__(config.num_virtual_tokens)
        hidden, h = dims.hidden, config.encoder_hidden_size
        factory = {"dtype": dtype, "device": device}
        shape = (config.num_virtual_tokens, hidden)
        self.residual = config.residual
        # without `init` (PEFT's form, or a layer about to load saved weights) E starts N(0, 1)
        start = init.to(**factory).reshape(shape) if init is not None else torch.randn(shape, **factory)
        self.embedding = nn.Parameter(start)
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
        if self.residual:
            last = self.mlp[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def trainable_names(self) -> tuple[str, ...]:
        linears = (0, 2) if self.lstm is not None else (0, 2, 4)
        names = ["embedding", *(f"mlp.{i}.{p}" for i in linears for p in ("weight", "bias"))]
        if self.lstm is not None:
            for layer in range(LSTM_LAYERS):
                for direction in ("", "_reverse"):
                    names += [f"lstm.{p}_l{layer}{direction}" for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        return tuple(names)

    def forward(self) -> torch.Tensor:
        return encode(self.embedding, self.lstm, self.mlp, self.residual)

    @torch.no_grad()
    def peft_embeddings(self) -> torch.Tensor:
        lstm = None if self.lstm is None else copy.deepcopy(self.lstm).float()
        return encode(self.embedding.float(), lstm, copy.deepcopy(self.mlp).float(), self.residual)


def encode(embedding: torch.Tensor, lstm: nn.LSTM | None, mlp: nn.Module, residual: bool) -> torch.Tensor:
    """The virtual tokens' embeddings (num_virtual_tokens, hidden), a new tensor: the parameters stay untouched."""
    x = embedding  # (num_virtual_tokens, hidden)
    if lstm is not None:
        x = lstm(x.unsqueeze(0))[0][0]  # (num_virtual_tokens, 2h): both directions
    return embedding + mlp(x) if residual else mlp(x)


register(PTuningConfig, PTuning)
