"""Attention over packed micro-batches with the boundaries known on the host: variable-length kernels, no Python
loop over the examples where a kernel exists, and no host-device synchronisation inside the model's forward.

A packed row (`data.collate_packed`) holds several examples back to back. The trainer knows their lengths when it
collates, so `packed_inputs` turns them into model inputs once per micro-batch, on the host:

    cu_seq_lens_q / cu_seq_lens_k   (examples + 1,) int32: cumulative lengths, the varlen kernels' boundaries
    max_length_q / max_length_k     int: the longest example
    packed_bounds                   tuple of int: the same boundaries as Python numbers (the per-example loop)
    attention_mask                  (1, tokens) all True: a packed row has no padding

These travel through transformers' forward as attention kwargs (the names of its `FlashAttentionKwargs`) down to
every attention layer. Without them every layer re-derives the boundaries from `position_ids` on the device and
reads them back (`.nonzero().tolist()`: one synchronisation per layer), and transformers' mask preparation reads the
positions back once per forward to detect packing (`find_packed_sequence_indices`): the explicit all-True mask skips
that detection, and the mask functions registered here (`deferred_mask`) build nothing unless a call without
boundaries needs a mask.

Kernels, by `--attn_implementation` (`resolve_attn_implementation`):

    flash_attention_2   `PACKED_FLASH`: the flash-attn package's varlen kernel (FA3's `flash_attn_interface` where
                        installed, else FA2), through transformers' own flash-attention plumbing; CUDA, bf16/fp16.
    sdpa                `PACKED_SDPA` (`packing.packed_sdpa`): on CUDA in bf16/fp16 torch's own variable-length
                        flash kernel (`torch.nn.attention.varlen.varlen_attn`); elsewhere transformers' sdpa once per
                        example over the host boundaries (`per_example_sdpa`).
                        On a CPU the calls stay per example: one sdpa call per layer with the row's block-diagonal
                        mask (bench/packed_attention.py's `dense` path) computes the masked blocks too and measured
                        slower, a padded batch of the examples adds copies and padded blocks, and torch's
                        `flex_attention` has no backward on the CPU.
    eager               transformers' eager attention with the block-diagonal mask it derives from `position_ids`
                        (a dense (tokens, tokens) mask; the reference, and the way for families whose record
                        refuses packing, `families.Family.packing`).
    auto                flash_attention_2 where it can run, else sdpa.

A call without boundaries (a padded batch, generation with a cache, a packed row collated elsewhere) gets exactly the
mask transformers would have built for sdpa (`DeferredMask.materialize`), so the implementations are safe wherever
sdpa is; only the packed path above is free of synchronisation.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Sequence
from functools import cache
from typing import Any, Literal, get_args

import torch
from deepspeed.accelerator import get_accelerator
from transformers import AttentionInterface
from transformers.integrations.flash_attention import get_target_dtype
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_flash_attention_utils import _flash_attention_forward, flash_attn_supports_top_left_mask
from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

from adapters_ds.errors import InputError
from adapters_ds.training.ds_config import compute_dtype

AttnChoice = Literal["auto", "sdpa", "flash_attention_2", "eager"]
ATTN_CHOICES: tuple[str, ...] = get_args(AttnChoice)

PACKED_SDPA = "adapters_ds_packed_sdpa"  # registered by `packing` (its per-example function predates this module)
PACKED_FLASH = "adapters_ds_packed_flash"
PACKED_IMPLEMENTATIONS = frozenset({PACKED_SDPA, PACKED_FLASH})
BOUNDS = "packed_bounds"  # the host-side boundaries among the attention kwargs
VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", BOUNDS)
HALF = (torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------- choosing


def flash_package() -> str | None:
    """transformers' name of the installed flash-attention package's implementation (FA3 first), or None."""
    if is_flash_attn_3_available():
        return "flash_attention_3"
    if is_flash_attn_2_available():
        return "flash_attention_2"
    return None


def resolve_attn_implementation(choice: str, dtype: torch.dtype, packed: bool, device_type: str | None = None) -> str:
    """transformers' attention implementation name for `--attn_implementation choice` on a model computing in
    `dtype`; `packed`: the model trains on packed rows (else transformers' own implementations, for padded batches).
    `device_type` defaults to DeepSpeed's accelerator's."""
    if choice not in ATTN_CHOICES:
        raise InputError(f"--attn_implementation must be one of {', '.join(ATTN_CHOICES)}; found {choice!r}")
    device_type = device_type or get_accelerator().device_name()
    flash = flash_package() if device_type == "cuda" and dtype in HALF else None
    if choice == "flash_attention_2" and flash is None:
        found = f"device {device_type!r}, dtype {str(dtype).removeprefix('torch.')}, flash-attn package "
        found += "installed" if flash_package() else "not installed"
        raise InputError(
            "--attn_implementation flash_attention_2 needs a CUDA device, bf16 or fp16 compute and the flash-attn "
            f"package (or FA3's flash_attn_interface); found {found}"
        )
    if choice == "auto":
        choice = "flash_attention_2" if flash else "sdpa"
    if choice == "eager":
        return "eager"
    if choice == "flash_attention_2":
        return PACKED_FLASH if packed else flash
    return PACKED_SDPA if packed else "sdpa"


def check_attn_implementation(choice: str, ds_config: dict[str, Any]) -> None:
    """Fail on a choice this machine cannot run (before a run loads anything): `resolve_attn_implementation`."""
    resolve_attn_implementation(choice, compute_dtype(ds_config), packed=True)


# ---------------------------------------------------------------------------------------------------- inputs


def packed_inputs(model: Any, lengths: Sequence[int]) -> dict[str, Any]:
    """Extra model inputs of one packed row of examples of these `lengths`, for `model` (or a model whose attention
    implementation has this name); nothing for implementations that find the boundaries themselves. Host tensors
    and Python numbers: the caller moves the tensors with the rest of the batch."""
    implementation = model if isinstance(model, str) else model.config._attn_implementation
    if implementation not in PACKED_IMPLEMENTATIONS:
        return {}
    bounds = tuple(itertools.accumulate(lengths, initial=0))
    cu_seq_lens = torch.tensor(bounds, dtype=torch.int32)  # (examples + 1,)
    longest = max(lengths)
    return {
        "attention_mask": torch.ones(1, bounds[-1], dtype=torch.bool),  # (1, tokens): no padding in a packed row
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": longest,
        "max_length_k": longest,
        BOUNDS: bounds,
    }


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The tensors of a host batch on `device`, copied from page-locked memory without waiting for the copy (a
    plain copy from pageable memory makes the host wait until the device has caught up); other values as they are."""
    pin = device.type != "cpu"
    return {
        k: (v.pin_memory() if pin else v).to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


class DeferredMask:
    """The mask transformers' `create_causal_mask` would build for sdpa, built only when an attention call needs
    it: a packed call with host boundaries never does. `padding` is the 2D padding mask (or None), as transformers'
    flash-attention mask function gives it."""

    __slots__ = ("_built", "_mask", "kwargs")

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.kwargs, self._mask, self._built = kwargs, None, False

    @property
    def padding(self) -> torch.Tensor | None:
        mask = self.kwargs.get("attention_mask")
        return None if mask is None else mask[:, -self.kwargs["kv_length"] :]

    def materialize(self) -> torch.Tensor | None:
        if not self._built:
            self._mask, self._built = sdpa_mask(**self.kwargs), True
        return self._mask


def deferred_mask(**kwargs: Any) -> DeferredMask:
    """Mask function of the packed implementations (transformers' `AttentionMaskInterface`)."""
    return DeferredMask(kwargs)


def materialize(mask: Any) -> torch.Tensor | None:
    return mask.materialize() if isinstance(mask, DeferredMask) else mask


def is_packed_call(query: torch.Tensor, key: torch.Tensor, module: torch.nn.Module, kwargs: dict[str, Any]) -> bool:
    """A call on one packed row with host boundaries: one row, no cache (keys = queries), causal."""
    return (
        kwargs.get(BOUNDS) is not None
        and query.shape[0] == 1
        and key.shape[2] == query.shape[2]
        and getattr(module, "is_causal", True)
    )


def without_varlen(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k not in VARLEN_KWARGS}


# ---------------------------------------------------------------------------------------------------- kernels


@cache
def _torch_varlen() -> tuple[Any, frozenset[str]] | None:
    """torch's variable-length attention and its keyword parameters (they changed across torch versions); None
    where this torch has none, or none that trains (no backward registered)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    if not hasattr(torch.ops.torch_attn, "_varlen_attn_backward"):
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def torch_varlen_runs(query: torch.Tensor, dropout: float, sliding_window: int | None) -> bool:
    """Whether `torch_varlen_attention` can take this call: torch's flash kernel, CUDA, bf16/fp16, no dropout."""
    found = _torch_varlen()
    if found is None or query.device.type != "cuda" or query.dtype not in HALF or dropout > 0:
        return False
    head_dim = query.shape[-1]
    return head_dim % 8 == 0 and head_dim <= 256 and (sliding_window is None or "window_size" in found[1])


def torch_varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    longest: int,
    scaling: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """Causal attention of every example of a packed row in one kernel call: (1, heads, tokens, head_dim) in,
    (1, tokens, heads, head_dim) out, as transformers' attention functions return."""
    varlen_attn, params = _torch_varlen()
    heads, kv_heads = query.shape[1], key.shape[1]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, head_dim)
    kwargs: dict[str, Any] = {"scale": scaling}
    if kv_heads != heads:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # an int repeat count: no synchronisation
            k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    left = -1 if sliding_window is None or longest <= sliding_window else sliding_window - 1
    if "is_causal" in params:  # earlier torch: a flag (window_size, where present, then bounds the left side)
        kwargs["is_causal"] = True
        if left >= 0:
            kwargs["window_size"] = (left, 0)
    else:  # later torch: causal is the window (-1, 0)
        kwargs["window_size"] = (left, 0)
    out = varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, longest, longest, **kwargs)  # (tokens, heads, head_dim)
    return out[None]


def per_example_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: Sequence[int],
    sliding_window: int | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """transformers' sdpa once per example of a packed row, causal and unmasked (a sliding window, where an example
    outgrows it, as a banded mask): (1, heads, tokens, head_dim) in, (1, tokens, heads, head_dim) out."""
    outputs = []
    for start, end in itertools.pairwise(bounds):
        n = end - start
        mask = None
        if sliding_window is not None and n > sliding_window:
            i = torch.arange(n, device=query.device)
            mask = ((i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < sliding_window))[None, None]
        q, k, v = (t[:, :, start:end] for t in (query, key, value))
        outputs.append(sdpa_attention_forward(module, q, k, v, mask, is_causal=mask is None, **kwargs)[0])
    return torch.cat(outputs, dim=1)


def varlen_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """The sdpa implementation's packed path (see `is_packed_call`): torch's varlen kernel where it runs, else the
    per-example loop; neither reads anything back from the device."""
    if torch_varlen_runs(query, dropout, sliding_window):
        longest = kwargs["max_length_q"]
        return torch_varlen_attention(query, key, value, kwargs["cu_seq_lens_q"], longest, scaling, sliding_window)
    rest = without_varlen(kwargs)
    rest.pop("position_ids", None)
    return per_example_sdpa(
        module, query, key, value, kwargs[BOUNDS], sliding_window, dropout=dropout, scaling=scaling, **rest
    )


def packed_flash(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' flash attention (FA3 or FA2 package) with the packed row's host boundaries: its varlen kernel
    runs once for all examples. (batch, heads, seq, head_dim) in, (batch, seq, heads, head_dim) out. A call without
    boundaries goes the way transformers' `flash_attention_2` goes, with the padding mask."""
    implementation = flash_package()
    if implementation is None:
        raise RuntimeError(f"{PACKED_FLASH} needs the flash-attn package, which is not installed")
    packed = is_packed_call(query, key, module, kwargs)
    padding = None if packed else (attention_mask.padding if isinstance(attention_mask, DeferredMask) else None)
    if not packed:
        kwargs = without_varlen(kwargs)
    else:
        kwargs.pop(BOUNDS)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (batch, seq, heads, head_dim)
    out = _flash_attention_forward(
        q,
        k,
        v,
        padding,
        query_length=q.shape[1],
        is_causal=getattr(module, "is_causal", True),
        dropout=dropout,
        softmax_scale=scaling,
        sliding_window=sliding_window,
        softcap=softcap,
        use_top_left_mask=flash_attn_supports_top_left_mask(),
        target_dtype=get_target_dtype(query, module),
        attn_implementation=implementation,
        layer_idx=getattr(module, "layer_idx", None),
        **kwargs,
    )
    return out, None


AttentionInterface.register(PACKED_FLASH, packed_flash)
AttentionMaskInterface.register(PACKED_FLASH, deferred_mask)
