"""Conversations as training examples: records of any format as one `conversation` column, tokenized with the chat
template's assistant spans as the only targets (`adapters_ds.conversations`), and a preview of what the loss sees.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

import datasets
import jinja2

from adapters_ds.conversations import (
    TrainOnTurns,
    assistant_spans,
    encode_spans,
    end_of_turn,
    fit_turns,
    normalize,
    require_chat_template,
)
from adapters_ds.errors import InputError
from adapters_ds.prompts import tokenizer_adds_bos

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and transformers' loss) skips


def conversation_dataset(records: Iterable[Any], source: str) -> datasets.Dataset:
    """Records of any format (detected per record) as a `conversation` column of normalised JSON text (JSON keeps
    each record's own tool-call arguments; an Arrow schema would merge every record's keys into each) and a
    `record` column naming the source and index, for the errors the chat template raises later."""
    rows = []
    for index, record in enumerate(records):
        where = f"{source}: record {index} (0-based)"
        rows.append({"conversation": json.dumps(normalize(record, where)), "record": where})
    if not rows:
        raise InputError(f"{source}: expected at least one record; found an empty dataset")
    return datasets.Dataset.from_list(rows)


def tokenize_conversations(
    ds: datasets.Dataset, tokenizer: Any, cutoff_len: int, train_on_turns: TrainOnTurns = "all"
) -> datasets.Dataset:
    """Conversations (`conversation_dataset`) rendered with the tokenizer's chat template: `input_ids`, `labels`
    (-100 outside the assistant's turns; `train_on_turns="last"`: outside the last one), `length`.

    Truncation keeps whole turns (`conversations.fit_turns`): the turns that do not fit in `cutoff_len` tokens are
    dropped with the context before them, and counted (logged); a conversation whose first trained answer (the last
    one under `train_on_turns="last"`) does not fit is dropped (logged); if all are, that is an `InputError`.
    """
    require_chat_template(tokenizer)
    if len(ds) == 0:
        raise InputError("tokenize_conversations: expected at least one conversation; found an empty dataset")
    tokenized = ds.map(
        _tokenize_conversations,
        batched=True,
        remove_columns=ds.column_names,
        desc="tokenizing conversations",
        fn_kwargs={
            "tokenizer": tokenizer,
            "cutoff_len": cutoff_len,
            "train_on_turns": train_on_turns,
            "eot": end_of_turn(tokenizer),
            "bos_id": tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None,
        },
    )
    dropped = len(ds) - len(tokenized)
    if len(tokenized) == 0:
        raise InputError(
            f"no conversation's first trained assistant turn fits in cutoff_len={cutoff_len} tokens; found all "
            f"{dropped} longer (raise cutoff_len)"
        )
    dropped_turns = sum(tokenized["dropped_turns"])
    if dropped or dropped_turns:
        logger.warning(
            "cutoff_len=%d: dropped %d of %d conversations whose first trained answer does not fit, and %d assistant "
            "turns (with their context) that did not fit after the turns kept",
            cutoff_len,
            dropped,
            len(ds),
            dropped_turns,
        )
    return tokenized.remove_columns("dropped_turns")


def _tokenize_conversations(
    batch: dict[str, list[Any]],
    tokenizer: Any,
    cutoff_len: int,
    train_on_turns: TrainOnTurns,
    eot: str,
    bos_id: int | None,
) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "length": [], "dropped_turns": []}
    for text, where in zip(batch["conversation"], batch["record"], strict=True):
        try:
            rendered = assistant_spans(tokenizer, json.loads(text), train_on_turns, eot)
        except (InputError, jinja2.TemplateError) as exc:  # a template's own raise_exception is a TemplateError
            raise InputError(f"{where}: {exc}") from None
        eos_id = None if eot else tokenizer.eos_token_id  # no end-of-turn marker: EOS ends each answer
        ids, trained, dropped = fit_turns(encode_spans(tokenizer, rendered, bos_id, eos_id), cutoff_len)
        if not any(trained):
            continue
        out["input_ids"].append(ids)
        out["labels"].append([i if t else IGNORE_INDEX for i, t in zip(ids, trained, strict=True)])
        out["length"].append(len(ids))
        out["dropped_turns"].append(dropped)
    return out


def preview(tokenized: datasets.Dataset, tokenizer: Any, n: int) -> list[dict[str, Any]]:
    """The first `n` examples as the loss sees them: `input_tokens`, `trained_tokens` and `trained_segments` (the
    decoded text of each contiguous trained span, in order), and the whole decoded `text`."""
    examples = []
    for row in tokenized.select(range(min(n, len(tokenized)))):
        segments, current = [], []
        for token, label in zip(row["input_ids"], row["labels"], strict=True):
            if label != IGNORE_INDEX:
                current.append(token)
            elif current:
                segments, current = [*segments, current], []
        segments += [current] if current else []
        examples.append(
            {
                "input_tokens": len(row["input_ids"]),
                "trained_tokens": sum(len(s) for s in segments),
                "trained_segments": [tokenizer.decode(s) for s in segments],
                "text": tokenizer.decode(row["input_ids"]),
            }
        )
    return examples
