"""What prompt tuning, P-tuning and prefix tuning share: virtual tokens in front of the input, one adapter for the
whole model, the model geometry they are built from, and the rewriting of a forward call's inputs.

These methods do not adapt linear layers: their config sets `model_level`, so one adapter is attached to the model
itself (its tensors are named `adapter.<name>`) and acts through forward pre-hooks (`Adapter.hooks`). Two modules
are hooked: the causal-LM model, for the arguments only its head reads (`labels`, `logits_to_keep`), and the
transformer inside it (`transformer_of`), for the inputs (`input_ids` / `inputs_embeds`, `attention_mask`,
`position_ids`). The work that calls modules (the embedding, the adapter itself) happens in the inner hook, that is
inside the model's forward, where DeepSpeed's ZeRO-3 hooks expect submodules to run.

Where the virtual tokens go (`virtual_starts`): in front of every row of a padded batch; in a packed row (one row of
several examples, `training.data.collate_packed`: its boundaries given with the call, or its `position_ids`
restarting and no attention mask) in front of every example, so each packed example sees them as if it were alone;
the given boundaries move with them. Positions count the virtual tokens: a real token that had position p gets
p + n (n virtual tokens at 0..n-1), as PEFT's models see them; a decoding step (the cache already holds the prompt)
only shifts the new token's position and extends the attention mask.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from transformers import Cache

from adapters_ds.adapters.base import Adapter, AdapterConfig, option
from adapters_ds.errors import InputError
from adapters_ds.prompts import encode_texts
from adapters_ds.zero import gathered

IGNORE_INDEX = -100  # the label value cross-entropy skips (training.data's, which this layer cannot import)
PACKED_BOUNDS = "packed_bounds"  # a packed row's example boundaries as host numbers, passed by the trainer
NUM_VIRTUAL_TOKENS_HELP = "prompt, ptuning and prefix: virtual tokens per input (default 30, as in LLM-Adapters)"
COMMON_TOKENS = 5000  # Lester et al. 2021, section 3.2: sampled from the 5,000 most common tokens
InitName = Literal["vocab", "random"]
INIT_HELP = (
    "initialisation without an init text: vocab (from real tokens sampled from the vocabulary's first "
    f"{COMMON_TOKENS} ids, the literature's) or random (PEFT's N(0, 1))"
)
ENCODER_HIDDEN_SIZE = 128  # the default of --encoder_hidden_size (PEFT's P-tuning default), one for both methods
ENCODER_HIDDEN_SIZE_HELP = (
    "ptuning: hidden width of the prompt encoder; prefix with --prefix_projection: width of its reparameterisation MLP"
)


def check_count(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{name} must be a positive integer, found {value!r}")


@dataclass(frozen=True)
class ModelDims:
    """The geometry a model-level method is built from, read from the model's config (works on ZeRO-3 partitions)."""

    model_type: str
    hidden: int  # width of the input embeddings, which soft prompts stand in for
    layers: int
    kv_heads: int  # key/value heads: fewer than query heads under grouped-query attention
    head_dim: int


def model_dims(model: nn.Module) -> ModelDims:
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    return ModelDims(
        model_type=config.model_type,
        hidden=model.get_input_embeddings().embedding_dim,
        layers=config.num_hidden_layers,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
    )


@dataclass
class VirtualTokensConfig(AdapterConfig):
    """Fields of every virtual-token method (`prompt`, `ptuning`, `prefix`)."""

    model_level: ClassVar[bool] = True

    num_virtual_tokens: int = option(30, NUM_VIRTUAL_TOKENS_HELP, flag="num_virtual_tokens")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_modules is not None:
            raise InputError(
                f"{self.method} adapts the whole model, not chosen modules: --target_modules does not apply "
                f"(found {','.join(self.target_modules)})"
            )
        check_count(f"{self.method} num_virtual_tokens", self.num_virtual_tokens)

    def layer_dims(self, name: str, module: nn.Module) -> ModelDims:
        return model_dims(module)

    def peft_config(self, layers: dict[str, Adapter]) -> dict[str, Any]:
        """PEFT keeps one tensor for every virtual-token method, `prompt_embeddings` (see the layers'
        `peft_embeddings`); its config needs the count only."""
        return {"num_virtual_tokens": self.num_virtual_tokens}


# ------------------------------------------------------------------------------------------- initialising tokens


def check_init(method: str, init: object, text: object, token_ids: object) -> tuple[int, ...] | None:
    """Validate the init fields shared by prompt and prefix tuning; returns `token_ids` as a tuple (or None)."""
    if init not in ("vocab", "random"):
        raise InputError(f"{method} init must be 'vocab' or 'random', found {init!r}")
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise InputError(f"{method} init_text must be a non-empty text, found {text!r}")
    if token_ids is None:
        return None
    if text is None and init != "vocab":
        raise InputError(f"{method} init_token_ids are the tokens of init_text or sampled (init vocab); neither is set")
    ids = tuple(token_ids)  # type: ignore[arg-type]
    if not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise InputError(f"{method} init_token_ids must be token ids, found {token_ids!r}")
    return ids


def resolve_init(config: VirtualTokensConfig, tokenizer: Any) -> VirtualTokensConfig:
    """`config` with the real tokens its prompt/prefix starts from (`init_token_ids`) filled in from the base model's
    tokenizer: `init_text`'s tokens (special tokens off), repeated or cut to num_virtual_tokens; else, with init
    "vocab", num_virtual_tokens ids drawn uniformly with torch's global generator (seeded by the run's --seed, alike
    on every rank) from the first COMMON_TOKENS ids of the vocabulary (a byte-level BPE numbers its merges by
    frequency) less the special tokens. A new config; `config` itself when there is nothing to resolve."""
    init, text, n = config.init, config.init_text, config.num_virtual_tokens  # type: ignore[attr-defined]
    if config.init_token_ids is not None or (text is None and init != "vocab"):  # type: ignore[attr-defined]
        return config
    if text is not None:
        ids = encode_texts(tokenizer, [text], bos_id=None)[0]
        if not ids:
            raise InputError(f"--{config.method}_init_text {text!r} has no tokens")
        return dataclasses.replace(config, init_token_ids=repeat_to(tuple(ids), n))
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return dataclasses.replace(config, init_token_ids=sample_ids(min(COMMON_TOKENS, len(tokenizer)), special, n))


def start_token_ids(config: VirtualTokensConfig, model: nn.Module) -> tuple[int, ...] | None:
    """The real tokens a prompt/prefix layer starts from, read without changing `config`: its resolved
    `init_token_ids` (`resolve_init`); for init "vocab" without them (a library user who injects an unresolved
    config), ids sampled as `resolve_init` does, with the model config's bos/eos/pad ids as the special tokens; None
    for init "random". A text needs the tokenizer: resolve the config first (the training command does)."""
    method, n = config.method, config.num_virtual_tokens
    vocab = model.get_input_embeddings().num_embeddings
    ids = config.init_token_ids  # type: ignore[attr-defined]
    if ids is None and config.init_text is not None:  # type: ignore[attr-defined]
        raise InputError(
            f"--{method}_init_text needs the base model's tokenizer: call config.resolve(tokenizer) before injecting"
        )
    if ids is None and config.init == "vocab":  # type: ignore[attr-defined]
        text_config = model.config.get_text_config()
        special = {getattr(text_config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        ids = sample_ids(min(COMMON_TOKENS, vocab), {i for i in special if isinstance(i, int)}, n)
    if ids is None:
        return None
    if max(ids) >= vocab:
        raise InputError(f"{method} init_token_ids {max(ids)} is outside the model's {vocab} tokens")
    return repeat_to(ids, n)  # an older config kept the text's tokens unrepeated


def start_embeddings(config: VirtualTokensConfig, model: nn.Module) -> dict[str, Any]:
    """`{"init": (num_virtual_tokens, hidden)}`: the model's input embeddings of the real tokens a prompt starts from
    (`start_token_ids`), for a layer's constructor; {} for init "random". Every rank injects, so all gather the
    (ZeRO-3 partitioned) embedding."""
    ids = start_token_ids(config, model)
    if ids is None:
        return {}
    embedding = model.get_input_embeddings()
    with gathered([embedding.weight]):  # a ZeRO-3 partition holds no rows
        return {"init": embedding.weight[list(ids)].detach().clone()}


def sample_ids(first: int, special: set[int], n: int) -> tuple[int, ...]:
    """`n` ids drawn uniformly (torch's global generator) from range(first) less `special`."""
    candidates = [i for i in range(first) if i not in special]
    picks = torch.randint(len(candidates), (n,)).tolist()
    return tuple(candidates[i] for i in picks)


def repeat_to(ids: tuple[int, ...], n: int) -> tuple[int, ...]:
    """`ids` repeated and cut to exactly `n` tokens (PEFT's rule for a text shorter or longer than the prompt)."""
    return (tuple(ids) * -(-n // len(ids)))[:n]


# ---------------------------------------------------------------------------------------------------- call inputs


def transformer_of(model: nn.Module) -> nn.Module:
    """The module whose forward takes the token inputs and runs the blocks: the input embedding's parent (LLaMA's
    `model`, GPT-2's `transformer`, OPT's `model.decoder`, which its head calls directly)."""
    embedding = model.get_input_embeddings()
    path = next(name for name, module in model.named_modules() if module is embedding)
    return model.get_submodule(path.rpartition(".")[0])


def as_kwargs(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A forward call's arguments all by name (GPT-2's head passes `input_ids` positionally)."""
    if not args:
        return dict(kwargs)
    signature = inspect.signature(module.forward)
    bound = signature.bind_partial(*args, **kwargs).arguments
    var_keyword = [p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    extra = bound.pop(var_keyword[0], {}) if var_keyword else {}
    return {**bound, **extra}


def cache_length(kwargs: dict[str, Any]) -> int:
    """Tokens already in the call's KV cache (0 without one): > 0 means a decoding step."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0
    if isinstance(cache, Cache):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0  # legacy tuple of (key, value) per layer


def packed_bounds(kwargs: dict[str, Any]) -> list[int] | None:
    """The example boundaries of a packed row given with the call (0, ..., tokens), or None: as host numbers
    (`packed_bounds`, the trainer's) or as transformers' variable-length attention kwargs (`cu_seq_lens_q`)."""
    bounds = kwargs.get(PACKED_BOUNDS)
    if bounds is None and isinstance(kwargs.get("cu_seq_lens_q"), torch.Tensor):
        bounds = kwargs["cu_seq_lens_q"].tolist()
    return None if bounds is None else [int(b) for b in bounds]


def virtual_starts(kwargs: dict[str, Any]) -> list[int]:
    """Indices before which the virtual tokens go: [0] for a padded batch; for a packed row the start of every
    example, from the boundaries given with the call or else (batch 1, no attention mask) from where the positions
    restart, as transformers tells packed examples apart."""
    bounds = packed_bounds(kwargs)
    if bounds is not None:
        return bounds[:-1]
    positions, mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
    if mask is not None or positions is None or positions.ndim != 2 or positions.shape[0] != 1:
        return [0]
    restarts = (positions[0, 1:] - positions[0, :-1] != 1).nonzero().flatten() + 1
    return [0, *restarts.tolist()]


def move_bounds(kwargs: dict[str, Any], n: int) -> None:
    """Packed boundaries given with the call, moved for `n` virtual tokens in front of every example (in place)."""
    if kwargs.get(PACKED_BOUNDS) is not None:
        kwargs[PACKED_BOUNDS] = tuple(b + n * i for i, b in enumerate(kwargs[PACKED_BOUNDS]))
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        bounds = kwargs.get(key)
        if isinstance(bounds, torch.Tensor):  # (examples + 1,)
            kwargs[key] = bounds + n * torch.arange(len(bounds), device=bounds.device, dtype=bounds.dtype)
    for key in ("max_length_q", "max_length_k"):
        if kwargs.get(key) is not None:
            kwargs[key] = kwargs[key] + n


def spread(x: torch.Tensor, starts: Sequence[int], filler: torch.Tensor) -> torch.Tensor:
    """`x` (batch, seq, ...) with `filler` (batch, n, ...) inserted before each index of `starts` (along dim 1)."""
    bounds = [*starts, x.shape[1]]
    pieces = [x[:, : starts[0]]]
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        pieces += [filler, x[:, start:end]]
    return torch.cat(pieces, dim=1)


def moved_positions(positions: torch.Tensor, starts: Sequence[int], n: int) -> torch.Tensor:
    """Where sequence indices `positions` land once `n` virtual tokens are inserted before each of `starts`."""
    boundaries = torch.tensor(list(starts), device=positions.device)
    return positions + n * torch.searchsorted(boundaries, positions, right=True)


def extend_head_arguments(kwargs: dict[str, Any], n: int) -> dict[str, Any] | None:
    """The causal-LM head's own arguments with `n` virtual tokens inserted (see the module docstring): `labels` get
    -100 there (no loss on a virtual token), a boolean `logits_to_keep` False, index tensors are moved. None: no
    change (a decoding step, or neither argument given)."""
    if cache_length(kwargs) > 0:
        return None
    starts = virtual_starts(kwargs)
    changes: dict[str, Any] = {}
    labels = kwargs.get("labels")
    if labels is not None:
        changes["labels"] = spread(labels, starts, labels.new_full((labels.shape[0], n), IGNORE_INDEX))
    keep = kwargs.get("logits_to_keep")
    if isinstance(keep, torch.Tensor):
        if keep.dtype == torch.bool:  # (batch, seq) mask
            changes["logits_to_keep"] = spread(keep, starts, keep.new_zeros((keep.shape[0], n)))
        else:  # positions, (k,) or (batch, k)
            changes["logits_to_keep"] = moved_positions(keep, starts, n)
    return {**kwargs, **changes} if changes else None


def prepend_virtual_tokens(
    module: nn.Module, kwargs: dict[str, Any], prompt: torch.Tensor | None, n: int
) -> dict[str, Any]:
    """The inner model's inputs with `prompt` (n, hidden) inserted as embeddings (see the module docstring); `prompt`
    None: a decoding step, whose cache holds them already."""
    mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
    if mask is not None and mask.ndim != 2:
        raise ValueError(f"virtual tokens need a 2-D attention mask (batch, seq), found shape {tuple(mask.shape)}")
    if prompt is None:
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones((mask.shape[0], n)), mask], dim=1)
        if positions is not None:
            kwargs["position_ids"] = positions + n
        return kwargs
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = module.get_input_embeddings()(kwargs["input_ids"])  # (batch, seq, hidden)
    starts = virtual_starts(kwargs)
    batch = embeds.shape[0]
    kwargs["input_ids"] = None
    kwargs["inputs_embeds"] = spread(embeds, starts, prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1))
    if mask is not None:
        kwargs["attention_mask"] = spread(mask, starts, mask.new_ones((batch, n)))
    if positions is not None:
        virtual = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(positions.shape[0], n)
        kwargs["position_ids"] = spread(positions + n, starts, virtual)
    move_bounds(kwargs, n)
    return kwargs


class VirtualTokens(Adapter):
    """Base of the prompt-tuning and P-tuning layers: `forward()` returns the virtual tokens' embeddings
    (num_virtual_tokens, hidden), put in front of the input embeddings by this class's hooks."""

    tensor_parallel: ClassVar[str] = "unchanged (the input embeddings are not sharded)"

    def __init__(self, num_virtual_tokens: int) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens

    def before_sharding(self, base: nn.Module) -> str:
        return "stays"  # hooks on the model's inputs, which sharding does not touch

    def peft_tensors(self, path: str) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.peft_embeddings().cpu().contiguous()}

    def forward(self) -> torch.Tensor:  # type: ignore[override]  (no input: the prompt does not depend on it)
        raise NotImplementedError

    def peft_embeddings(self) -> torch.Tensor:
        """PEFT's `prompt_embeddings` (num_virtual_tokens, hidden): the embeddings the model sees, any encoder folded
        away, computed in fp32 whatever the training dtype."""
        raise NotImplementedError

    def hooks(self, base: nn.Module) -> list[Any]:
        n = self.num_virtual_tokens

        def head_arguments(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
            changed = extend_head_arguments(as_kwargs(module, args, kwargs), n)
            return None if changed is None else ((), changed)

        def inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
            kwargs = as_kwargs(module, args, kwargs)
            prompt = self() if cache_length(kwargs) == 0 else None  # __call__: ZeRO-3 fetches the parameters
            return (), prepend_virtual_tokens(module, kwargs, prompt, n)

        return [
            base.register_forward_pre_hook(head_arguments, with_kwargs=True),
            transformer_of(base).register_forward_pre_hook(inputs, with_kwargs=True),  # may be `base` itself
        ]
