"""Prefix tuning: trainable keys and values in front of every attention layer's own (Li & Liang 2021,
arXiv 2101.00190, section 4).

    layer l:  K = [K_l ; W_k h],  V = [V_l ; W_v h],   K_l, V_l: (kv_heads, num_virtual_tokens, head_dim)

Every query of layer l attends to the num_virtual_tokens prefix positions and, as before, to its own causal past.
The prefix is the same for all inputs, so nothing of it reaches the KV cache: it is added at every attention call,
which makes padded batches, packed rows (each packed example sees the prefix and only its own tokens) and the
evaluation harness's cached generation with left padding all work the same way. Semantics are Hugging Face PEFT's
PREFIX_TUNING, whose prefix is a pre-filled cache: the prefix keys get no rotary embedding, they carry
grouped-query attention's kv_heads (no repetition stored), and the real tokens' positions start at
num_virtual_tokens (also explicit `position_ids` are shifted by it), so `export --peft` gives the same logits.
One difference: under a sliding window (Mistral's, on sequences longer than it) the prefix stays visible to every
query here, while PEFT's cached prefix drops out of the window.

Parameters: one (num_virtual_tokens, 2 · kv_heads · head_dim) tensor per layer, `prefix_<l>`, laid out
[K | V] with each half (kv_heads, head_dim) row-major: concatenated over layers, that is PEFT's `prompt_embeddings`.
With `--prefix_projection` (the paper's reparameterisation, section 4.3) they are an MLP's output instead,

    prefix_l = Linear_l(tanh(Linear(E))),   E: (num_virtual_tokens, hidden),  Linear: hidden → encoder_hidden_size,

which is PEFT's `prefix_projection` MLP with its output layer cut per layer (the same function; tensors small
enough to stay whole under ZeRO-3). Only the MLP's output matters after training: the export folds it away.
Initialisation (Li & Liang 2021, section 7.2 "Prefix initialization": real words' activations beat random ones, which
train unstably): by default the frozen model reads num_virtual_tokens real tokens (sampled from the vocabulary's most
common ones, `virtual_tokens.init_token_ids`, or `--prefix_init_text`'s tokens) and each layer's prefix starts as the
keys and values that layer computed for them, exactly as they sit in its KV cache. The adapted model then starts as
the base model reading those tokens before each input (the prefix takes their positions 0..n-1, rotary embedding
included), close to the base, not at PEFT's N(0, 1) (`--prefix_init random`), from which the model starts far from
any text it has seen. With `--prefix_projection` the MLP's output cannot be set to given values: that
reparameterisation keeps PEFT's initialisation (E ~ N(0, 1) and PyTorch's Linear initialisation). Prefix tuning
cannot be the identity at step 0: every query attends to the prefix from the first step.

Default learning rate (`default_learning_rate`): 1e-2. The paper's rates (5e-5 to 8e-5, Appendix A) are for the
MLP reparameterisation, whose output moves far more per step than its weights; trained directly, as here by default,
the prefix values need the rate Hugging Face PEFT's prefix-tuning examples use (1e-2, AdamW).

How: the adapter switches the model to `PREFIX_ATTENTION`, transformers' sdpa attention with the layer's prefix
put in front of key and value (registered under transformers' attention interface like `training.packing`'s, whose
packed rows it handles itself), and a pre-hook on the transformer computes the prefixes once per forward and shifts
the positions. Families whose attention does not go through that interface cannot take a prefix: their family record
says why (`families.Family.prefix`, BLOOM's ALiBi) and they are refused with that reason, as are models of no
known family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from adapters_ds.adapters.base import Adapter, option
from adapters_ds.adapters.registry import register
from adapters_ds.adapters.virtual_tokens import (
    ENCODER_HIDDEN_SIZE,
    ENCODER_HIDDEN_SIZE_HELP,
    INIT_HELP,
    InitName,
    ModelDims,
    VirtualTokensConfig,
    as_kwargs,
    cache_length,
    check_count,
    check_init,
    packed_bounds,
    resolve_init,
    start_token_ids,
    transformer_of,
)
from adapters_ds.errors import InputError
from adapters_ds.families import family_of, find_family
from adapters_ds.zero import gathered

PREFIX_ATTENTION = "adapters_ds_prefix_sdpa"
SLOT_ATTR = "_adapters_ds_prefix"  # on each attention module: its layer's current prefix (a `_Slot`)


@dataclass
class PrefixConfig(VirtualTokensConfig):
    method: ClassVar[str] = "prefix"
    peft_type: ClassVar[str] = "PREFIX_TUNING"
    attn_implementations: ClassVar[tuple[str, ...]] = ("auto", "sdpa")  # `PREFIX_ATTENTION` is sdpa with the prefix
    default_learning_rate: ClassVar[float] = 1e-2

    init: InitName = option("vocab", "prefix: " + INIT_HELP, flag="prefix_init")
    init_text: str | None = option(
        None, "prefix: start from the keys and values of this text's tokens", flag="prefix_init_text"
    )
    init_token_ids: tuple[int, ...] | None = None
    """The real tokens whose keys and values the prefix starts from (the text's, or sampled): filled in by
    `resolve(tokenizer)`, so a saved adapter loads without a tokenizer."""
    projection: bool = option(
        False, "prefix: train the prefixes through an MLP (folded away on export)", flag="prefix_projection"
    )
    encoder_hidden_size: int = option(ENCODER_HIDDEN_SIZE, ENCODER_HIDDEN_SIZE_HELP, flag="encoder_hidden_size")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.projection, bool):
            raise InputError(f"prefix projection must be true or false, found {self.projection!r}")
        check_count("prefix encoder_hidden_size", self.encoder_hidden_size)
        self.init_token_ids = check_init("prefix", self.init, self.init_text, self.init_token_ids)
        # an option of the other mode would be silently ignored: the MLP starts at random, real-token prefixes have
        # no MLP (encoder_hidden_size is compared with its default, which both modes share)
        if self.projection and self.init_text is not None:
            raise InputError("--prefix_init_text does not apply with --prefix_projection (its MLP starts at random)")
        if not self.projection and self.encoder_hidden_size != ENCODER_HIDDEN_SIZE:
            raise InputError(
                f"--encoder_hidden_size {self.encoder_hidden_size} applies to prefix tuning only with "
                "--prefix_projection (the width of its MLP)"
            )

    def resolve(self, tokenizer: Any) -> PrefixConfig:
        return self if self.projection else resolve_init(self, tokenizer)

    def layer_options(self, model: nn.Module, name: str) -> dict[str, Any]:
        ids = None if self.projection else start_token_ids(self, model)
        if ids is None:
            return {}
        return {"init": real_token_prefixes(model, ids, self.layer_dims(name, model))}

    def peft_config(self, layers: dict[str, Adapter]) -> dict[str, Any]:
        return {**super().peft_config(layers), "prefix_projection": False}  # folded into prompt_embeddings

    def layer_dims(self, name: str, module: nn.Module) -> ModelDims:
        dims = super().layer_dims(name, module)
        family = family_of(dims.model_type, "prefix tuning")
        if family.prefix is not None:
            raise InputError(f"prefix tuning cannot be applied to {dims.model_type} models: {family.prefix}")
        found = len(attention_modules(module, dims.model_type))
        if found != dims.layers:
            raise InputError(f"prefix tuning: this model has {found} attention layers, its config {dims.layers}")
        return dims


def attention_modules(model: nn.Module, model_type: str) -> list[nn.Module]:
    """The attention module of every block, in layer order (the family table's paths)."""
    layout = family_of(model_type, "prefix tuning").layout
    return [block.get_submodule(layout.attention) for block in model.get_submodule(layout.blocks)]


@torch.no_grad()
def real_token_prefixes(model: nn.Module, ids: tuple[int, ...], dims: ModelDims) -> torch.Tensor:
    """Each layer's keys and values for the frozen model reading `ids` from position 0, as its KV cache holds them,
    in the prefix layout: (layers, len(ids), 2 · kv_heads · head_dim), [K | V] per token.

    Works on a ZeRO-3-partitioned model outside an engine: each module's own parameters are gathered just for its
    forward (every rank runs this same forward, as the collective gathers need), so at most one module is whole."""
    transformer = transformer_of(model)
    opened: list[Any] = []

    def gather(module: nn.Module, args: tuple) -> None:
        context = gathered(list(module.parameters(recurse=False)))
        context.__enter__()
        opened.append(context)

    def release(module: nn.Module, args: tuple, output: Any) -> None:
        opened.pop().__exit__(None, None, None)

    owners = [m for m in transformer.modules() if next(m.parameters(recurse=False), None) is not None]
    handles = [h for m in owners for h in (m.register_forward_pre_hook(gather), m.register_forward_hook(release))]
    was_training = model.training
    model.eval()  # no dropout in the activations the prefix starts from
    try:
        device = transformer.get_input_embeddings().weight.device
        out = transformer(input_ids=torch.tensor([list(ids)], device=device), use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
        while opened:
            opened.pop().__exit__(None, None, None)
        model.train(was_training)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    prefixes = []
    for layer in cache.layers[: dims.layers]:
        key, value = (t[0].transpose(0, 1).reshape(len(ids), -1) for t in (layer.keys, layer.values))  # (n, kv·hd)
        prefixes.append(torch.cat([key, value], dim=1))
    return torch.stack(prefixes).float()


class _Slot:
    """The prefix of one attention layer for the current forward: (key, value), each (1, kv_heads, n, head_dim).
    Kept until the next forward, so that gradient checkpointing's recomputation in backward sees the same one."""

    __slots__ = ("kv",)

    def __init__(self) -> None:
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None


class _Restore:
    """The undo of `PrefixTuning.hooks` beyond its pre-hook: a handle `detach` removes like the others."""

    def __init__(self, model: nn.Module, implementation: str, attentions: list[nn.Module]) -> None:
        self.model, self.implementation, self.attentions = model, implementation, attentions

    def remove(self) -> None:
        for attention in self.attentions:
            if hasattr(attention, SLOT_ATTR):
                delattr(attention, SLOT_ATTR)
        self.model.set_attn_implementation(self.implementation)


class PrefixTuning(Adapter):
    def __init__(
        self,
        config: PrefixConfig,
        dims: ModelDims,
        dtype: torch.dtype,
        device: torch.device,
        init: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.num_virtual_tokens, self.dims = config.num_virtual_tokens, dims
        width = 2 * dims.kv_heads * dims.head_dim  # [K | V] of one layer
        factory = {"dtype": dtype, "device": device}
        self.projection = config.projection
        if config.projection:
            self.embedding = nn.Parameter(torch.randn(config.num_virtual_tokens, dims.hidden, **factory))
            self.proj_in = nn.Linear(dims.hidden, config.encoder_hidden_size, **factory)
            self.proj_out = nn.ModuleList(
                nn.Linear(config.encoder_hidden_size, width, **factory) for _ in range(dims.layers)
            )
        else:
            for layer in range(dims.layers):
                values = torch.randn(config.num_virtual_tokens, width, **factory) if init is None else init[layer]
                self.register_parameter(f"prefix_{layer}", nn.Parameter(values.to(**factory).clone()))
        self._slots: list[_Slot] = []

    def trainable_names(self) -> tuple[str, ...]:
        if not self.projection:
            return tuple(f"prefix_{layer}" for layer in range(self.dims.layers))
        outs = [f"proj_out.{layer}.{p}" for layer in range(self.dims.layers) for p in ("weight", "bias")]
        return ("embedding", "proj_in.weight", "proj_in.bias", *outs)

    def forward(self) -> tuple[torch.Tensor, ...]:  # type: ignore[override]  (the prefix does not depend on input)
        """Each layer's prefix, (num_virtual_tokens, 2 · kv_heads · head_dim), as new tensors: ZeRO-3 may release
        the parameters' storage once this call returns."""
        if not self.projection:
            return tuple(getattr(self, f"prefix_{layer}").clone() for layer in range(self.dims.layers))
        hidden = torch.tanh(self.proj_in(self.embedding))  # (num_virtual_tokens, encoder_hidden_size)
        return tuple(out(hidden) for out in self.proj_out)

    def peft_tensors(self, path: str) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.peft_embeddings().cpu().contiguous()}

    @torch.no_grad()
    def peft_embeddings(self) -> torch.Tensor:
        """PEFT's `prompt_embeddings` (num_virtual_tokens, layers · 2 · kv_heads · head_dim), the layers' [K | V]
        side by side, computed in fp32 (the projection folded away)."""
        if not self.projection:
            return torch.cat([getattr(self, f"prefix_{layer}").float() for layer in range(self.dims.layers)], 1)

        def linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, module.weight.float(), module.bias.float())

        hidden = torch.tanh(linear(self.proj_in, self.embedding.float()))
        return torch.cat([linear(out, hidden) for out in self.proj_out], dim=1)

    def hooks(self, base: nn.Module) -> list[Any]:
        attentions = attention_modules(base, self.dims.model_type)  # as many as layers (`PrefixConfig.layer_dims`)
        self._slots = [_Slot() for _ in attentions]
        for attention, slot in zip(attentions, self._slots, strict=True):
            setattr(attention, SLOT_ATTR, slot)
        restore = _Restore(base, base.config._attn_implementation, attentions)
        base.set_attn_implementation(PREFIX_ATTENTION)
        n, dims = self.num_virtual_tokens, self.dims

        def inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
            kwargs = as_kwargs(module, args, kwargs)
            positions = kwargs.get("position_ids")
            if positions is None:
                positions = default_positions(kwargs, dims.model_type)
            kwargs["position_ids"] = torch.where(positions >= 0, positions + n, positions)  # OPT's pads stay at -1
            for slot, prefix in zip(self._slots, self(), strict=True):  # __call__: ZeRO-3 fetches the parameters
                key, value = prefix.view(n, 2, dims.kv_heads, dims.head_dim).permute(1, 2, 0, 3)  # (kv_heads, n, hd)
                slot.kv = (key.unsqueeze(0), value.unsqueeze(0))
            return (), kwargs

        return [transformer_of(base).register_forward_pre_hook(inputs, with_kwargs=True), restore]


def default_positions(kwargs: dict[str, Any], model_type: str) -> torch.Tensor:
    """The positions the model would give the call's tokens without a prefix (batch or 1, seq)."""
    source = kwargs.get("input_ids")
    source = source if source is not None else kwargs["inputs_embeds"]
    batch, length, past = source.shape[0], source.shape[1], cache_length(kwargs)
    mask = kwargs.get("attention_mask")
    family = find_family(model_type)
    if family is not None and family.positions_from_mask:  # as OPT's decoder does: count the unpadded tokens
        if mask is None or mask.ndim != 2:
            mask = torch.ones(batch, past + length, dtype=torch.long, device=source.device)
        return ((torch.cumsum(mask, dim=1) * mask - 1)[:, past:]).long()
    return torch.arange(past, past + length, device=source.device).unsqueeze(0)


# ---------------------------------------------------------------------------------------------------- attention


def example_bounds(position_ids: torch.Tensor | None, length: int) -> list[int]:
    """Boundaries (0, ..., length) of the examples of one row, where its positions restart (transformers' rule for
    packed rows; a prefix shifts every position alike, so restarts stay restarts)."""
    if position_ids is None:
        return [0, length]
    positions = position_ids.reshape(-1)
    restarts = ((positions[1:] - positions[:-1]) != 1).nonzero().flatten() + 1
    return [0, *restarts.tolist(), length]


def with_prefix_columns(mask: torch.Tensor | None, q_len: int, kv_len: int, n: int, device: torch.device):
    """The attention mask over [prefix ; keys]: the prefix visible to every query, the keys as `mask` says (None:
    causal, the queries being the last q_len of kv_len positions). Boolean (True: attend) or additive float."""
    if mask is None:
        query_end = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        mask = (torch.arange(kv_len, device=device)[None, :] <= query_end)[None, None]  # (1, 1, q, kv)
    columns = mask.new_ones if mask.dtype == torch.bool else mask.new_zeros
    return torch.cat([columns((*mask.shape[:-1], n)), mask], dim=-1)


def prefix_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention over [the layer's prefix ; key/value]. (batch, heads, seq, head_dim) in,
    (batch, seq, heads, head_dim) out. A module without a prefix gets plain sdpa."""
    slot = getattr(module, SLOT_ATTR, None)
    if slot is None or slot.kv is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    batch, _, q_len, _ = query.shape
    prefix_key, prefix_value = (t.to(key.dtype).expand(batch, -1, -1, -1) for t in slot.kv)
    n = prefix_key.shape[2]
    if batch == 1 and key.shape[2] == q_len:  # one row without a cache: perhaps a packed row
        bounds = packed_bounds(kwargs) or example_bounds(kwargs.get("position_ids"), q_len)
        if len(bounds) > 2:  # a packed row: each example attends to the prefix and, causally, to itself
            outputs = [
                sdpa_attention_forward(
                    module,
                    query[:, :, s:e],
                    torch.cat([prefix_key, key[:, :, s:e]], dim=2),
                    torch.cat([prefix_value, value[:, :, s:e]], dim=2),
                    with_prefix_columns(None, e - s, e - s, n, query.device),
                    **kwargs,
                )[0]
                for s, e in zip(bounds[:-1], bounds[1:], strict=True)
            ]
            return torch.cat(outputs, dim=1), None
    mask = with_prefix_columns(attention_mask, q_len, key.shape[2], n, query.device)
    key, value = torch.cat([prefix_key, key], dim=2), torch.cat([prefix_value, value], dim=2)
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)
AttentionMaskInterface.register(PREFIX_ATTENTION, sdpa_mask)

register(PrefixConfig, PrefixTuning)
