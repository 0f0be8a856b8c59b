"""Training data: load Alpaca-format records, tokenize them with the shared prompt, split, plan batches, collate.

The flow a trainer follows::

    ds = load_records(path)                                   # validated {"instruction", "input", "output", ...}
    ds = tokenize_records(ds, tokenizer, cutoff_len, train_on_inputs)   # input_ids, labels, length
    train, val = split_validation(ds, val_set_size, seed)
    plan = BatchPlan(train["length"], micro_batch_size, world_size, rank, seed, group_by_length, accumulation)
    loader = DataLoader(train, batch_sampler=plan.micro_batches(epoch)[skip:], collate_fn=partial(collate, ...))

Everything here is a pure function of its arguments (and the data), so every rank computes the same thing and a
resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import datasets
import torch

from adapters_ds.conversations import TrainOnTurns, load_chat_template, record_format
from adapters_ds.errors import InputError
from adapters_ds.prompts import TemplateName, build_prompt, encode_texts, tokenizer_adds_bos
from adapters_ds.records import json_type, read_records
from adapters_ds.training.chat_data import IGNORE_INDEX, conversation_dataset, preview, tokenize_conversations

__all__ = ["IGNORE_INDEX", "conversation_dataset", "preview", "tokenize_conversations"]  # re-exported: the one data API

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("instruction", "output")
LOCAL_SUFFIXES = (".json", ".jsonl")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "owner/name"


# ---------------------------------------------------------------------------------------------------- loading


def load_records(data_path: str, cache_dir: str | None = None) -> datasets.Dataset:
    """Load and validate instruction records from a local .json/.jsonl file or a Hugging Face dataset name.

    Local files are parsed with `json` first, only to report bad input precisely (file, line, record index, field);
    the dataset itself is then built by `datasets.load_dataset("json")` so that it is disk-backed and every later
    `map` is cached by fingerprint. A path that does not exist and looks like `owner/name` is loaded from the hub
    (split "train"). A missing or null "input" becomes ""; extra fields (e.g. "answer") are kept.
    """
    path = Path(data_path)
    if path.exists():
        records = _read_json_records(path)
        if _has_conversations(records):
            return conversation_dataset(records, str(path))
        _validate_records(records, str(path))
        ds = _load_dataset(
            str(path), lambda: datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
        )
    elif path.suffix in LOCAL_SUFFIXES or not _HUB_NAME.match(data_path):
        raise InputError(
            f"data: expected an existing .json/.jsonl file or a Hugging Face dataset name; found no file {data_path!r}"
        )
    else:
        ds = _load_dataset(data_path, lambda: datasets.load_dataset(data_path, split="train", cache_dir=cache_dir))
        if {"messages", "conversations"} & set(ds.column_names):
            return conversation_dataset(ds, data_path)
        if not set(REQUIRED_FIELDS) <= set(ds.column_names):
            raise InputError(
                f"{data_path}: expected columns 'instruction' and 'output' (and optionally 'input'), 'messages' or "
                f"'conversations'; found columns {ds.column_names}"
            )
        present = [name for name in ("instruction", "input", "output") if name in ds.column_names]
        _validate_records(ds.select_columns(present), data_path)
    return ds.map(_default_input, batched=True, desc="filling missing inputs")


def _has_conversations(records: Sequence[Any]) -> bool:
    return any(record_format(record) in ("openai", "sharegpt") for record in records)


def _load_dataset(source: str, load: Callable[[], datasets.Dataset]) -> datasets.Dataset:
    """Run a `datasets` loader; the failures that mean bad input (a missing dataset or file, no network: OSError; a
    file that is no valid JSON or has no such split: ValueError, `datasets`' own DatasetsError) become InputError.
    Anything else is a bug and keeps its traceback."""
    try:
        return load()
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:  # re-raised with the cause chained
        raise InputError(
            f"data: expected a loadable dataset (split 'train'); could not load {source!r}: {type(exc).__name__}: {exc}"
        ) from exc


def _read_json_records(path: Path) -> list[Any]:
    if path.suffix not in LOCAL_SUFFIXES or not path.is_file():
        raise InputError(f"data: expected a .json or .jsonl file; found {path}")
    return read_records(path, "data")


def _validate_records(records: Iterable[Any], source: str) -> None:
    """Check every record: object, "instruction" and "output" strings, "input" a string when present and not null."""
    count = 0
    for index, record in enumerate(records):
        count += 1
        if not isinstance(record, Mapping):
            raise InputError(f"{source}: record {index} (0-based): expected a JSON object; found {json_type(record)}")
        for name in REQUIRED_FIELDS:
            if name not in record:
                raise InputError(
                    f"{source}: record {index} (0-based): expected field {name!r}; found fields {sorted(record)}"
                )
        for name in ("instruction", "input", "output"):
            value = record.get(name)
            if name == "input" and value is None:
                continue
            if not isinstance(value, str):
                raise InputError(
                    f"{source}: record {index} (0-based): expected field {name!r} to be a string; "
                    f"found {json_type(value)}"
                )
    if count == 0:
        raise InputError(f"{source}: expected at least one record; found an empty dataset")


def _default_input(batch: dict[str, list[Any]]) -> dict[str, list[str]]:
    """The "input" field is optional in the Alpaca format: absent or null means the no-input prompt."""
    inputs = batch.get("input") or [None] * len(batch["instruction"])
    return {"input": [value or "" for value in inputs]}


# ---------------------------------------------------------------------------------------------------- tokenizing


def tokenize_records(
    ds: datasets.Dataset,
    tokenizer: Any,
    cutoff_len: int,
    train_on_inputs: bool,
    template: TemplateName = "alpaca",
    train_on_turns: TrainOnTurns = "all",
) -> datasets.Dataset:
    """Turn records into `input_ids`, `labels` and `length` (Alpaca-LoRA's recipe, made consistent about specials).

    Text: `prompt + output`, then EOS. Both the prompt and the full text are encoded with the tokenizer's special
    tokens off, and BOS is prepended by us only if the tokenizer would add one and the text does not already start
    with it (a chat template may render it), so there is never a double BOS and never a tokenizer-added EOS.
    The prompt's token count is the mask length: with `train_on_inputs=False` the first `len(prompt_ids)` labels are
    -100. (As in Alpaca-LoRA, this assumes the prompt's tokens are a prefix of the full text's; both templates end
    the prompt with a newline or a special token, where tokenizers do not merge.)

    Truncation (Alpaca-LoRA's rule): the full text is cut to `cutoff_len` tokens and EOS is appended only if it
    still fits, i.e. only when the text had fewer than `cutoff_len` tokens. A truncated example therefore ends
    without EOS, so the model is never taught to stop mid-answer. Records whose prompt alone has `cutoff_len`
    tokens or more leave no target token and are dropped (logged); if all are, that is an `InputError`.

    `ds.map` runs in one process (parallel tokenization is the fast tokenizer's job) and is cached by `datasets`
    when `ds` is disk-backed.
    """
    if cutoff_len < 1:
        raise InputError(f"cutoff_len: expected a positive number of tokens; found {cutoff_len}")
    if "conversation" in ds.column_names:
        return tokenize_conversations(ds, tokenizer, cutoff_len, train_on_turns)
    if tokenizer.eos_token_id is None:
        raise InputError(
            f"tokenizer: expected an EOS token to end each example; found none on {type(tokenizer).__name__}"
        )
    build_prompt("", "", template, tokenizer)  # fail before the map on a bad template or a missing chat template
    if len(ds) == 0:
        raise InputError("tokenize_records: expected at least one record; found an empty dataset")

    tokenized = ds.map(
        _tokenize_batch,
        batched=True,
        remove_columns=ds.column_names,
        desc="tokenizing",
        fn_kwargs={
            "tokenizer": tokenizer,
            "cutoff_len": cutoff_len,
            "train_on_inputs": train_on_inputs,
            "template": template,
            "bos_id": tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None,
        },
    )
    dropped = len(ds) - len(tokenized)
    if len(tokenized) == 0:
        raise InputError(
            f"every prompt is longer than cutoff_len={cutoff_len} allows: expected a prompt shorter than "
            f"{cutoff_len} tokens so a target token fits; found all {dropped} prompts at {cutoff_len} "
            "tokens or more (raise cutoff_len)"
        )
    if dropped:
        logger.warning(
            "dropped %d of %d records whose prompt alone has >= cutoff_len=%d tokens (no target left)",
            dropped,
            len(ds),
            cutoff_len,
        )
    return tokenized


def _tokenize_batch(
    batch: dict[str, list[Any]],
    tokenizer: Any,
    cutoff_len: int,
    train_on_inputs: bool,
    template: TemplateName,
    bos_id: int | None,
) -> dict[str, list[Any]]:
    """Batched `map` function; returns fewer rows than it got when records are dropped."""
    prompts = [
        build_prompt(ins, inp, template, tokenizer)
        for ins, inp in zip(batch["instruction"], batch["input"], strict=True)
    ]
    fulls = [prompt + output for prompt, output in zip(prompts, batch["output"], strict=True)]
    eos_id = tokenizer.eos_token_id
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "length": []}
    for prompt_ids, full_ids in zip(
        encode_texts(tokenizer, prompts, bos_id), encode_texts(tokenizer, fulls, bos_id), strict=True
    ):
        if len(prompt_ids) >= cutoff_len:
            continue  # no room for a single target token
        input_ids = full_ids[:cutoff_len]
        if len(input_ids) < cutoff_len and input_ids[-1] != eos_id:
            input_ids.append(eos_id)
        n_masked = 0 if train_on_inputs else len(prompt_ids)
        out["input_ids"].append(input_ids)
        out["labels"].append([IGNORE_INDEX] * n_masked + input_ids[n_masked:])
        out["length"].append(len(input_ids))
    return out


def training_examples(
    tokenizer: Any, args: Any, records: list[dict[str, Any]] | None = None
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The run's raw records (`records`, else `args.data_path`) and their tokenized examples, as the run's options
    (`TrainArgs`: chat_template, cutoff_len, train_on_inputs, template, train_on_turns) ask."""
    load_chat_template(tokenizer, args.chat_template)
    raw = datasets.Dataset.from_list(records) if records is not None else load_records(args.data_path)
    tokenized = tokenize_records(
        raw, tokenizer, args.cutoff_len, args.train_on_inputs, args.template, args.train_on_turns
    )
    return raw, tokenized


# ---------------------------------------------------------------------------------------------------- splitting


def split_validation(
    ds: datasets.Dataset, val_set_size: int | float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Hold out a validation set: an int is a count, a float in (0, 1) a fraction (rounded up); 0 means none.

    Deterministic for a given seed (`train_test_split`'s seeded permutation), so every rank holds out the same rows.
    """
    n = len(ds)
    if isinstance(val_set_size, bool) or not isinstance(val_set_size, int | float) or val_set_size < 0:
        raise InputError(f"val_set_size: expected a count >= 0 or a fraction in (0, 1); found {val_set_size!r}")
    if val_set_size == 0:
        return ds, None
    if isinstance(val_set_size, float):
        if val_set_size >= 1:
            raise InputError(f"val_set_size: expected a fraction in (0, 1) or an integer count; found {val_set_size}")
        n_val = math.ceil(val_set_size * n)
    else:
        n_val = val_set_size
    if n_val >= n:
        raise InputError(
            f"val_set_size: expected fewer validation examples than the dataset's {n} (at least one left "
            f"to train on); found {val_set_size} = {n_val} examples"
        )
    split = ds.train_test_split(test_size=n_val, shuffle=True, seed=seed)
    return split["train"], split["test"]


# ---------------------------------------------------------------------------------------------------- batching


@dataclass(frozen=True)
class BatchPlan:
    """Which dataset indices each rank reads in each micro-step of an epoch: a pure function of its fields.

    The order, exactly (m = `micro_batch_size`, W = `world_size`, a = `gradient_accumulation_steps`, G = m·W the
    global micro-batch, B = G·a the global batch of one optimizer step, N = len(lengths)):

    1. `perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed + epoch))`: the same on every rank,
       independent of m, W, a and rank (as torch's DistributedSampler seeds by seed + epoch).
    2. Keep `perm[: (N // B) · B]`: the last incomplete optimizer step is dropped, not padded, so every rank runs
       the same number of micro-steps and no example is seen twice in an epoch.
    3. With `group_by_length`: cut that order into megabatches of 50·B consecutive indices and sort each by length,
       longest first (stable, so ties keep the shuffled order), as Hugging Face's `LengthGroupedSampler` does:
       batches of similar lengths waste less padding, and the shuffle keeps the megabatches random.
    4. Optimizer step t reads `order[t·B : (t+1)·B]`; its micro-step k is global micro-step s = t·a + k, the
       global micro-batch `order[s·G : (s+1)·G]`.
    5. Rank r takes slice r (of W slices of m) of that global micro-batch: with W = 1 as it is; with W > 1 after
       rearranging it so that the slices carry about the same number of tokens (`balanced`): in a synchronous step
       every rank waits for the slowest, and the rank with the longest examples is the slowest (on shuffled data
       plain slices differ by 3–16 % of their tokens per step).

    Steps 1–3 depend on the global batch B, never on how it is split into ranks, micro-batches and accumulation
    steps, and step 5 only moves examples between the ranks of one global micro-batch: every optimizer step trains
    on the same examples whatever the split. One rank with micro-batch 2m sees, at every step, exactly the examples
    two ranks with micro-batch m see together, and a run resumed on another number of ranks continues with the
    examples it would have read next. The step's gradient, (sum of token losses) / (target tokens of the global
    batch), does not depend on which rank computes which example. To resume an epoch after k micro-batches, take
    `micro_batches(epoch)[k:]`.

    The latest epoch's orders are kept (the trainer asks at every step; 50k examples took 0.3 s); both return copies.
    """

    lengths: Sequence[int] = field(repr=False)
    micro_batch_size: int
    world_size: int = 1
    rank: int = 0
    seed: int = 0
    group_by_length: bool = False
    gradient_accumulation_steps: int = 1

    MEGABATCH_MULT: ClassVar[int] = 50
    _kept: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # {name: (epoch, order)}

    def __post_init__(self) -> None:
        object.__setattr__(self, "lengths", tuple(int(length) for length in self.lengths))
        if self.micro_batch_size < 1 or self.world_size < 1 or self.gradient_accumulation_steps < 1:
            raise InputError(
                f"batch plan: expected micro_batch_size >= 1, world_size >= 1 and gradient_accumulation_steps >= 1; "
                f"found {self.micro_batch_size}, {self.world_size} and {self.gradient_accumulation_steps}"
            )
        if not 0 <= self.rank < self.world_size:
            raise InputError(f"batch plan: expected 0 <= rank < world_size={self.world_size}; found rank {self.rank}")
        if len(self.lengths) < self.global_micro_batch_size:
            raise InputError(
                f"batch plan: expected at least micro_batch_size x world_size = "
                f"{self.global_micro_batch_size} examples for one step; found {len(self.lengths)}"
            )

    @property
    def global_micro_batch_size(self) -> int:
        return self.micro_batch_size * self.world_size

    @property
    def global_batch_size(self) -> int:
        """Examples per optimizer step, over all ranks and accumulated micro-batches."""
        return self.global_micro_batch_size * self.gradient_accumulation_steps

    @property
    def micro_batches_per_epoch(self) -> int:
        """Micro-steps per epoch (a multiple of the accumulation steps; 0 when the data holds less than one global
        batch); every rank has exactly this many micro-batches."""
        return len(self.lengths) // self.global_batch_size * self.gradient_accumulation_steps

    def _latest(self, name: str, epoch: int, compute: Callable[[], list]) -> list:
        """`compute()`'s result, kept for the latest epoch asked for (the callers hand out copies)."""
        if self._kept.get(name, (None,))[0] != epoch:
            self._kept[name] = (epoch, compute())
        return self._kept[name][1]

    def global_order(self, epoch: int) -> list[int]:
        """All ranks' indices for `epoch` in step order (steps 1–3 of the class docstring)."""
        if epoch < 0:
            raise InputError(f"batch plan: expected epoch >= 0; found {epoch}")
        return list(self._latest("global", epoch, lambda: self._global_order(epoch)))

    def _global_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        kept = self.micro_batches_per_epoch * self.global_micro_batch_size
        order = torch.randperm(len(self.lengths), generator=generator)[:kept].tolist()
        if not self.group_by_length:
            return order
        megabatch = self.MEGABATCH_MULT * self.global_batch_size
        return [
            index
            for start in range(0, kept, megabatch)
            for index in sorted(order[start : start + megabatch], key=lambda i: -self.lengths[i])
        ]

    def balanced(self, micro_batch: Sequence[int]) -> list[int]:
        """`micro_batch` (one global micro-batch, G indices) as W consecutive slices of m with nearly equal tokens:
        longest example first (stable), each to the slice with the fewest tokens that has room (ties: the lower
        rank); within a slice, in the order placed."""
        m, world = self.micro_batch_size, self.world_size
        slices: list[list[int]] = [[] for _ in range(world)]
        tokens = [0] * world
        for index in sorted(micro_batch, key=lambda i: -self.lengths[i]):
            rank = min((r for r in range(world) if len(slices[r]) < m), key=lambda r: tokens[r])
            slices[rank].append(index)
            tokens[rank] += self.lengths[index]
        return [index for part in slices for index in part]

    def micro_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches for `epoch` (lists of dataset indices): usable as a DataLoader `batch_sampler`."""
        return [list(batch) for batch in self._latest("micro", epoch, lambda: self._micro_batches(epoch))]

    def _micro_batches(self, epoch: int) -> list[list[int]]:
        order, step = self.global_order(epoch), self.global_micro_batch_size
        if self.world_size > 1:
            order = [i for start in range(0, len(order), step) for i in self.balanced(order[start : start + step])]
        size, offset = self.micro_batch_size, self.rank * self.micro_batch_size
        return [order[start + offset : start + offset + size] for start in range(0, len(order), step)]


# ---------------------------------------------------------------------------------------------------- collating


def collate(
    features: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: `input_ids` with `pad_token_id`, `labels` with -100, `attention_mask` 1 on tokens.

    Right padding suits training (positions start at 0 for every row); `pad_to_multiple_of` rounds the width up
    (tensor-core friendly shapes, fewer distinct shapes).
    """
    width = max(len(feature["input_ids"]) for feature in features)
    if pad_to_multiple_of:
        width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)  # (batch, seq)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)  # (batch, seq)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)  # (batch, seq)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        input_ids[row, :n] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(feature["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_packed(features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
    """A micro-batch as one row, the examples back to back: no padding at all.

    `position_ids` restart at 0 with every example, and there is no `attention_mask`: from that transformers builds
    a block-diagonal causal mask (`masking_utils.find_packed_sequence_indices`), so each token attends only to its
    own example, as in the padded batch. The first label of every example is -100: it is never a target (a
    sequence's first token has no prediction), and in the row it would be the label of the previous example's last
    token. The loss therefore equals the padded batch's (tests/test_throughput_units.py).
    """
    input_ids = torch.cat([torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features])  # (tokens,)
    labels = torch.cat([torch.as_tensor(f["labels"], dtype=torch.long) for f in features])  # (tokens,)
    position_ids = torch.cat([torch.arange(len(f["input_ids"])) for f in features])  # (tokens,)
    labels[position_ids == 0] = IGNORE_INDEX
    return {"input_ids": input_ids[None], "position_ids": position_ids[None], "labels": labels[None]}


def count_tokens(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Non-padding tokens of a micro-batch from `collate`, or from `collate_packed` (which has no padding)."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)
