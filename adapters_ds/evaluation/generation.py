"""Batched generation for evaluation: greedy (or beam) decoding with the KV cache, left padding and stop strings.

What makes it fast: the KV cache makes each step process one new token instead of the whole sequence again; a
batch of rows shares each step's read of the weights; and each row stops at EOS or at a stop string ("\\n### ", the
start of a new Alpaca section), the batch as soon as every row has.

Batches are formed from length-sorted prompts, so left padding wastes little compute; the callers restore the
original order. Left padding is exact: the attention mask hides the pad tokens and `transformers` derives position
ids from the mask, so a prompt's tokens are the same whatever batch it is in (the evaluation tests check it).

Prompts are encoded exactly as training encodes them (`prompts.encode_texts`: special tokens off, BOS prepended
only when the tokenizer would add one), so the model sees at evaluation the token sequence it was trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from adapters_ds.errors import InputError
from adapters_ds.prompts import encode_texts, tokenizer_adds_bos

# A new "### Instruction:" / "### Input:" / "### Response:" section: the model has answered and starts inventing the
# next turn. Not "###" alone: "#### 42" (the gsm8k answer marker) must not stop generation; "\n#### 42" does not
# contain "\n### " because the fourth "#" follows where the space would be.
DEFAULT_STOP_STRINGS: tuple[str, ...] = ("\n### ",)


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, encoded the way training encodes prompts (see the module docstring)."""
    bos_id = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    return encode_texts(tokenizer, list(prompts), bos_id)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices into `lengths` grouped into batches of similar length, longest first.

    Longest first, so an out-of-memory batch size fails at once rather than at the end. Ties are broken by index:
    the batches depend on the lengths and `batch_size` only, which keeps a data-parallel run (batch b on rank
    b % world_size) and a resumed run on exactly the batches of a single uninterrupted run.
    """
    if batch_size < 1:
        raise InputError(f"batch_size: expected a positive integer; found {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def cut_at_stop(text: str, stop_strings: Iterable[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    end = len(text)
    for stop in stop_strings:
        found = text.find(stop)
        if found != -1:
            end = min(end, found)
    return text[:end]


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends a sequence: the tokenizer's EOS plus the model's (Llama 3 lists several)."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids += [configured] if isinstance(configured, int) else list(configured)
    return list(dict.fromkeys(ids))


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (batch, longest row), rows right-aligned behind pad tokens."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row) :] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.inference_mode()
def generate_ids(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    num_beams: int = 1,
    stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS,
    use_cache: bool = True,
    synced_gpus: bool = False,
    logits_processor: Sequence[LogitsProcessor] = (),
) -> list[list[int]]:
    """Generated token ids for one batch of encoded prompts (one row each; EOS, what follows it and trailing pad
    tokens removed).

    Greedy when `num_beams` is 1, beam search otherwise; no sampling. Each row stops at its own EOS or stop string
    (the other rows go on; a finished row only receives pad tokens). `synced_gpus=True` keeps every rank stepping
    until all have finished, which a ZeRO-3-partitioned model needs (each forward gathers weights collectively).
    `logits_processor` run after the configured ones at each step (e.g. `tensor_parallel.GroupConsensus`).
    """
    if not prompt_ids:
        return []
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    input_ids, attention_mask = left_pad(prompt_ids, pad_id, next(model.parameters()).device)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=num_beams,
        use_cache=use_cache,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        stop_strings=list(stop_strings) or None,
    )
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=config,
        tokenizer=tokenizer if stop_strings else None,
        synced_gpus=synced_gpus,
        logits_processor=LogitsProcessorList(logits_processor) if logits_processor else None,
    )
    new_tokens = out[:, input_ids.shape[1] :].tolist()  # (batch, generated)
    ends = set(eos_ids)
    result = []
    for row in new_tokens:
        cut = next((i for i, token in enumerate(row) if token in ends), len(row))
        while cut > 0 and row[cut - 1] == pad_id:  # a row stopped by a stop string is filled up with pad tokens
            cut -= 1
        result.append(row[:cut])
    return result


def decode(tokenizer: Any, ids: Sequence[int], stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS) -> str:
    """The text of generated ids, special tokens dropped, cut before the first stop string."""
    return cut_at_stop(tokenizer.decode(list(ids), skip_special_tokens=True), stop_strings)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    batch_size: int = 16,
    max_new_tokens: int = 256,
    num_beams: int = 1,
    stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS,
    use_cache: bool = True,
    synced_gpus: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Generated texts for `prompts`, in the order given, in length-sorted batches of `batch_size`.

    `on_batch(n)` is called after each batch with the number of prompts it held (e.g. a progress bar's update).
    """
    if max_new_tokens < 1 or num_beams < 1:
        raise InputError(f"expected max_new_tokens >= 1 and num_beams >= 1; found {max_new_tokens} and {num_beams}")
    encoded = encode_prompts(tokenizer, prompts)
    texts: list[str] = [""] * len(prompts)
    for batch in length_sorted_batches([len(ids) for ids in encoded], batch_size):
        generated = generate_ids(
            model,
            tokenizer,
            [encoded[i] for i in batch],
            max_new_tokens,
            num_beams=num_beams,
            stop_strings=stop_strings,
            use_cache=use_cache,
            synced_gpus=synced_gpus,
        )
        for i, ids in zip(batch, generated, strict=True):
            texts[i] = decode(tokenizer, ids, stop_strings)
        if on_batch is not None:
            on_batch(len(batch))
    return texts
