"""Label scoring: rank a label task's allowed labels by the model's log-likelihood after the prompt, without generating.

For one item with prompt p, lead l ("the correct answer is ", `labels.answer_lead`) and labels y_1..y_k, the score of
y_j is log P(l + y_j | p) = sum of the log-probabilities of its tokens, and the prediction is the best-scoring label
(the first in format order on a tie). The lead's tokens are shared by every label, so they shift every score alike
and do not change the ranking; they are in the continuation so the label is scored where a model trained on
"<lead><label>" outputs writes it. No length normalisation and no end-of-sequence token: the score is the exact
likelihood of the model writing that text next, so when greedy decoding writes lead + label and the labels'
tokens differ only in their last one (true/false, answer1..answer5 and the other numbered formats in the usual
tokenizers), the top label is exactly the generated one.

Tokens: a continuation's ids are those of the full text prompt + lead + label after the prompt's ids, encoded as
training encodes prompt + output (`training.data`), so the scored tokens are the ones the model was trained on.

Batched, the prompt computed once per item: the batch's prompts run once (left-padded, an attention mask and position
ids counted from the first real token), their key/value cache is repeated once per label, and all continuations run
in one more forward after it (right-padded), as a generation step would: per item, the prompt's tokens plus k short
continuations instead of k copies of the prompt. Models whose cache cannot be repeated that way get the plain form,
one forward with a row per (item, label). Either way each row comes out as it would alone (the tests compare both
against unpadded single rows).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from adapters_ds.errors import InputError
from adapters_ds.evaluation.generation import eos_token_ids, left_pad
from adapters_ds.prompts import encode_texts, tokenizer_adds_bos


def continuation_ids(
    tokenizer: Any, prompts: Sequence[str], prompt_ids: Sequence[Sequence[int]], texts: Sequence[Sequence[str]]
) -> list[list[list[int]]]:
    """For item i, the token ids of each continuation texts[i][j] after prompts[i] (encoded as `prompt_ids[i]`).

    The full text prompt + continuation is encoded and the prompt's ids cut off; where the prompt's ids are not a
    prefix of the full text's (a tokenizer merging across the boundary), the continuation is encoded alone.
    """
    bos_id = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    fulls = encode_texts(tokenizer, [p + t for p, conts in zip(prompts, texts, strict=True) for t in conts], bos_id)
    result: list[list[list[int]]] = []
    position = 0
    for ids, conts in zip(prompt_ids, texts, strict=True):
        item = []
        for text in conts:
            full = fulls[position]
            position += 1
            if full[: len(ids)] == list(ids) and len(full) > len(ids):
                item.append(full[len(ids) :])
            else:
                item.append(tokenizer(text, add_special_tokens=False)["input_ids"])
            if not item[-1]:
                raise InputError(f"label scoring: expected tokens for the continuation {text!r}; found none")
        result.append(item)
    return result


def _accepts(model: Any, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _pad_id(model: Any, tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_ids(model, tokenizer)[0]


@torch.inference_mode()
def continuation_log_likelihoods(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[Sequence[int]]],
    shared_prefix: bool = True,
) -> list[list[float]]:
    """log P(continuation | prompt) for every continuation of every item of a batch.

    `shared_prefix` (where the model returns a cache that can select rows): the prompts run once, left-padded, and
    their key/value cache is repeated for each continuation, which then runs right-padded after it, as a generation
    step would; the prompt is computed once per item instead of once per label. Otherwise every (prompt,
    continuation) pair is one row of a single forward. Both give each row's log-likelihood as if it ran alone.
    """
    if not prompt_ids:
        return []
    if shared_prefix:
        scores = _shared_prefix_scores(model, tokenizer, prompt_ids, continuations)
        if scores is not None:
            return scores
    return _row_scores(model, tokenizer, prompt_ids, continuations)


def _row_scores(
    model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], continuations: Sequence[Sequence[Sequence[int]]]
) -> list[list[float]]:
    rows = [list(p) + list(c) for p, conts in zip(prompt_ids, continuations, strict=True) for c in conts]
    lengths = [len(c) for conts in continuations for c in conts]
    input_ids, attention_mask = left_pad(rows, _pad_id(model, tokenizer), next(model.parameters()).device)
    keep = max(lengths) + 1  # logits of the last `keep` positions predict every continuation token
    kwargs: dict[str, Any] = {"use_cache": False}
    if _accepts(model, "position_ids"):  # left padding: positions count from each row's first real token
        kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits[:, -keep:]  # (rows, keep, V)
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position t predicts token t + 1
    targets = input_ids[:, -(keep - 1) :]  # (rows, keep - 1)
    token_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (rows, keep - 1)
    steps = torch.arange(keep - 1, device=token_logprobs.device)
    counts = torch.tensor(lengths, device=token_logprobs.device)
    in_continuation = steps.unsqueeze(0) >= (keep - 1 - counts).unsqueeze(1)  # (rows, keep - 1)
    return _per_item(torch.where(in_continuation, token_logprobs, 0.0).sum(-1).tolist(), continuations)


def _shared_prefix_scores(
    model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], continuations: Sequence[Sequence[Sequence[int]]]
) -> list[list[float]] | None:
    """The shared-prefix computation; None when the model's cache cannot be repeated per continuation."""
    # transformers 5 names the cache argument `cache` (`past_key_values` before, still accepted by some models)
    cache_arg = next((name for name in ("cache", "past_key_values") if _accepts(model, name)), None)
    if cache_arg is None or not _accepts(model, "position_ids"):
        return None
    device = next(model.parameters()).device
    pad_id = _pad_id(model, tokenizer)
    input_ids, prompt_mask = left_pad(prompt_ids, pad_id, device)  # (items, width)
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=input_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True, **kwargs)
    cache = out["cache"] if "cache" in out else getattr(out, "past_key_values", None)
    if not hasattr(cache, "batch_select_indices"):
        return None
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (items, V): predicts each continuation's 1st token
    owner = torch.tensor([i for i, conts in enumerate(continuations) for _ in conts], device=device)  # (rows,)
    cache.batch_select_indices(owner)
    rows = [list(c) for conts in continuations for c in conts]
    lengths = torch.tensor([len(c) for c in rows], device=device)
    width = int(lengths.max())
    cont_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)  # right-padded
    for r, row in enumerate(rows):
        cont_ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
    steps = torch.arange(width, device=device)
    cont_mask = (steps.unsqueeze(0) < lengths.unsqueeze(1)).long()  # (rows, width)
    mask = torch.cat([prompt_mask[owner], cont_mask], dim=1)
    cont_positions = prompt_mask.sum(-1)[owner].unsqueeze(1) + steps.unsqueeze(0)  # after each prompt's last token
    logits = model(
        input_ids=cont_ids, attention_mask=mask, position_ids=cont_positions, use_cache=True, **{cache_arg: cache}
    ).logits  # (rows, width, V): position t predicts continuation token t + 1
    scores = first[owner].gather(-1, cont_ids[:, :1]).squeeze(-1)  # (rows,)
    if width > 1:
        later = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, cont_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        scores = scores + torch.where(cont_mask[:, 1:].bool(), later, 0.0).sum(-1)
    return _per_item(scores.tolist(), continuations)


def _per_item(flat: list[float], continuations: Sequence[Sequence[Sequence[int]]]) -> list[list[float]]:
    scores, position = [], 0
    for conts in continuations:
        scores.append(flat[position : position + len(conts)])
        position += len(conts)
    return scores


def best_label(labels: Sequence[str], scores: Sequence[float]) -> str:
    """The label of the highest score; the first in format order among equals."""
    return labels[max(range(len(labels)), key=lambda j: (scores[j], -j))]
