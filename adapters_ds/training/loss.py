"""The training loss: summed next-token cross-entropy over the target tokens, with logits only where a label needs them.

A causal LM's head projects every position onto the vocabulary (SmolLM2: 576 → 49,152, about a fifth of the
forward FLOPs, and a (tokens, vocab) fp32 tensor to softmax). Padding positions, the last position of each
sequence and, with `--no_train_on_inputs`, the prompt have no next-token label, so `causal_lm_loss_sum` asks the
model for the hidden states of the target positions only, through transformers' own `logits_to_keep` (a boolean
(batch, seq) mask): the model's forward and its `lm_head` module run as usual, so DeepSpeed's ZeRO-3 hooks gather
the (possibly tied, partitioned) head weight as they would for full logits.

Even those logits are (target tokens, vocab) in fp32: at a 152k vocabulary and 16k target tokens, 9.7 GB before
the softmax's gradient. So the loss is chunked (`token_losses` on a `forward_targets(..., logits=False)`): the head's
input at the target positions is captured, the head runs on no rows, and a custom autograd function computes the
cross-entropy a chunk of tokens at a time, with each token's gradient computed while its chunk's logits exist
(memory: one chunk of logits, whatever the vocabulary, and the head's FLOPs of the full path). A method whose extra
loss terms read the logits (`batch_loss`: gates' distillation) gets them whole as before.

Beside the loss a run reports two narrower ones from the same per-token losses: the answer-only loss (the tokens of
the response, whatever `--train_on_inputs` trains on: `answer_mask`) and the digit-token loss (the answer tokens
whose label contains a digit: `digit_token_mask`), which on arithmetic tracks held-out accuracy far better than a
loss dominated by the prompt's tokens.

Mixture-of-experts models (Mixtral, Qwen3-MoE, OLMoE) compute an auxiliary load-balancing loss from their routers'
logits when `output_router_logits` is on (`enable_router_aux_loss`, called when the engine is built): it is added
to each micro-batch's loss as the model's own recipe does (`router_aux_loss_coef` · aux per target token, so its
weight against the mean token loss is the model's) and logged as `moe/router_aux_loss`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import datasets
import torch
import torch.nn.functional as F

from adapters_ds.adapters.base import ADAPTER_ATTR, Strategy
from adapters_ds.distributed import group_sum
from adapters_ds.training.data import IGNORE_INDEX, tokenize_records
from adapters_ds.zero import gathered


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the target tokens of full (batch, seq, vocab) logits, in fp32."""
    # (batch, seq, vocab) → predictions for positions 1..seq-1
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, targets): keep[b, p] is True where position p predicts a label (labels[b, p + 1] is a target);
    targets are those labels in row-major order, the order in which `hidden[keep]` returns the positions."""
    keep = torch.zeros_like(labels, dtype=torch.bool)  # (batch, seq)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep, labels[:, 1:][keep[:, :-1]]  # (n_targets,)


class TargetForward(NamedTuple):
    """A forward that projected only the positions predicting a target: their logits, or (chunked) the hidden states
    the head projects, whose logits `token_losses` computes a chunk of tokens at a time."""

    logits: torch.Tensor | None  # (n_targets, vocab); None when chunked
    targets: torch.Tensor  # (n_targets,)
    keep: torch.Tensor  # (batch, seq) bool: the positions of `logits`
    inputs: dict[str, Any]  # the model inputs (the batch without labels)
    router_loss: torch.Tensor | None = None  # router_aux_loss_coef · the model's auxiliary router loss, if any
    hidden: torch.Tensor | None = None  # (n_targets, hidden): the head's input, when chunked
    head: torch.nn.Module | None = None  # the output head (a linear layer), when chunked


def enable_router_aux_loss(model: torch.nn.Module) -> bool:
    """Make a model that has an auxiliary router loss (a positive `router_aux_loss_coef`) compute it; True if so."""
    if getattr(model.config, "router_aux_loss_coef", 0) and hasattr(model.config, "output_router_logits"):
        model.config.output_router_logits = True
        return True
    return False


def forward_targets(model: torch.nn.Module, batch: dict[str, torch.Tensor], logits: bool = True) -> TargetForward:
    """Forward `batch` (input_ids, labels, and attention_mask or position_ids) through `model` (a transformers
    causal LM or the DeepSpeed engine around one), with logits only at the positions that predict a target.

    `logits=False` asks for the chunked form where the model allows it (`chunkable_head`): the head's input is
    captured and the head itself runs on no rows, so no (targets, vocab) tensor is built here."""
    keep, targets = target_positions(batch["labels"])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    head = None if logits else chunkable_head(model)
    captured: list[torch.Tensor] = []

    def capture(module: torch.nn.Module, args: tuple) -> tuple:
        captured.append(args[0])  # (n_targets, hidden)
        return (args[0].narrow(-2, 0, 0), *args[1:])  # the head runs (ZeRO-3 gathers it as ever) on no rows

    # first among the head's pre-hooks: ZeRO-3's own wraps the head's input for its backward bookkeeping, and the
    # captured input must be the plain one (no gradient flows through the head, which runs on no rows)
    handle = head.register_forward_pre_hook(capture, prepend=True) if head is not None else None
    try:
        # use_cache=False also matters for packing: transformers only derives the packed mask when no cache is built
        out = model(**inputs, logits_to_keep=keep, use_cache=False)
    finally:
        if handle is not None:
            handle.remove()
    aux = getattr(out, "aux_loss", None)
    config = getattr(model, "module", model).config  # the engine's or the model's
    router_loss = None if aux is None else aux.float() * float(config.router_aux_loss_coef)
    if head is None:
        return TargetForward(out.logits, targets, keep, inputs, router_loss)  # logits: (n_targets, vocab)
    hidden = captured[0].reshape(-1, captured[0].shape[-1])
    return TargetForward(None, targets, keep, inputs, router_loss, hidden, head)


# a model that changes its logits after the head (Gemma's soft-capping, Granite's and Cohere's scaling) keeps the
# full-logits loss: the chunked one projects with the head alone
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logits_scaling", "logit_scale")


def chunkable_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's output head when the chunked loss computes exactly what its forward would: a frozen linear head
    (no adapter on it: its hook would see no rows) whose output the model returns unchanged. None otherwise."""
    module = getattr(model, "module", model)  # the DeepSpeed engine wraps the model
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    config = getattr(module, "config", None)
    if not isinstance(head, torch.nn.Linear) or getattr(head, ADAPTER_ATTR, None) is not None:
        return None
    if any(p.requires_grad for p in head.parameters()):
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return None
    return head


CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MB in fp32): peak memory independent of the vocabulary and tokens


class _ChunkedHeadLoss(torch.autograd.Function):
    """Per-token cross-entropy of `head(hidden)`, a chunk of target tokens at a time: the (targets, vocab) logits never
    exist whole. The head is frozen, so the only gradient is the hidden states', and each token's loss depends on its
    own row only: d loss_i / d hidden_i = (softmax_i - onehot_i) W, whatever the caller does with the losses. So the
    forward, while it has a chunk's logits, also computes those rows (when `hidden` needs a gradient) and the backward
    only scales them by the incoming per-token gradient: two passes over the head's matmul in all, as the full logits
    take (forward and backward), instead of recomputing every chunk's logits in the backward; what is kept is
    (targets, hidden), like `hidden` itself. Under ZeRO-3 the head's weight is gathered for the forward (every rank
    runs the same passes, as a gather requires) and applied without calling the module, whose ZeRO-3 hooks already ran
    once in the model's forward. Logits are computed in the head's dtype and taken to fp32, exactly as the full path's
    `logits.float()`; the rows are cast to the head's dtype before the matmul with W, as the head's own backward."""

    @staticmethod
    def forward(ctx, hidden, targets, head, chunk):  # type: ignore[override]
        losses, rows = [], []
        with gathered(list(head.parameters())):
            weight = head.weight  # (vocab, hidden)
            for start in range(0, hidden.shape[0], chunk):
                end = min(start + chunk, hidden.shape[0])
                logits = F.linear(hidden[start:end], weight, head.bias).float()  # (chunk, vocab)
                lse = torch.logsumexp(logits, dim=-1)
                picked = targets[start:end, None]
                losses.append(lse - logits.gather(1, picked).squeeze(1))
                if ctx.needs_input_grad[0]:
                    grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                    grad.scatter_add_(1, picked, grad.new_full(picked.shape, -1.0))  # - onehot
                    rows.append(grad.to(weight.dtype) @ weight)  # (chunk, hidden)
        ctx.save_for_backward(torch.cat(rows) if rows else hidden.new_zeros((0, *hidden.shape[1:])))
        ctx.hidden_dtype = hidden.dtype
        return torch.cat(losses) if losses else hidden.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        (rows,) = ctx.saved_tensors
        return (rows.float() * grad_loss[:, None]).to(ctx.hidden_dtype), None, None, None


def token_losses(forward: TargetForward, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Cross-entropy of every target token, (n_targets,) fp32: from the logits, or chunked from the hidden states
    (`chunk_elements` logits at a time)."""
    if forward.logits is not None:
        return F.cross_entropy(forward.logits.float(), forward.targets, reduction="none")
    chunk = max(1, chunk_elements // forward.head.out_features)
    return _ChunkedHeadLoss.apply(forward.hidden, forward.targets, forward.head, chunk)


def causal_lm_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunked: bool = True) -> torch.Tensor:
    """The summed token loss of `batch` through `model` (see `forward_targets`), in fp32; `chunked` (where the model
    allows it) never builds the (targets, vocab) logits whole.

    Equal to `loss_sum` on the full logits (tests/test_throughput_units.py), without projecting the positions that
    no label needs.
    """
    return token_losses(forward_targets(model, batch, logits=not chunked)).sum()


def answer_mask(targets: Sequence[int], answers: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Which of a micro-batch's target tokens are answer tokens, (n_targets,) bool. Example i of the micro-batch
    contributes `targets[i]` target tokens, consecutive and in example order (padded rows and packed rows alike),
    of which the last `answers[i]` are its response (the prompt comes first)."""
    mask = [flag for total, answer in zip(targets, answers, strict=True) for flag in (
        [False] * (total - min(answer, total)) + [True] * min(answer, total))]  # fmt: skip
    return torch.tensor(mask, dtype=torch.bool, device=device)


def digit_token_mask(tokenizer: Any, vocab_size: int | None = None) -> torch.Tensor:
    """(vocab,) bool: the token ids whose text contains a digit."""
    mask = torch.zeros(max(vocab_size or 0, len(tokenizer)), dtype=torch.bool)
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    mask[: len(tokens)] = torch.tensor([any(c.isdigit() for c in token or "") for token in tokens])
    return mask


def narrow_sums(per_token: torch.Tensor, answers: torch.Tensor, digits: torch.Tensor | None = None) -> torch.Tensor:
    """(summed loss, tokens) over every target token, the answer tokens (`answers`, bool) and, given the vocabulary's
    `digit_token_mask`, the answer tokens whose label has a digit: (6,) fp32 ((4,) without `digits`). `digits` is
    indexed by the labels, so pass it as `digit_token_mask(...)[targets]`."""
    masks = [torch.ones_like(answers), answers] + ([answers & digits] if digits is not None else [])
    return torch.stack([v for mask in masks for v in (per_token[mask].sum(), mask.sum().float())])


class MicroBatchLoss(NamedTuple):
    """A training micro-batch's loss sums (over its target tokens, not yet normalised)."""

    task: torch.Tensor  # the summed token loss, fp32, with its graph
    total: torch.Tensor  # task + the method's extra terms (`Strategy.batch_loss`): what is backpropagated
    answer: torch.Tensor  # (2,) detached: summed answer-token loss, answer tokens


def micro_batch_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    method: Strategy,
    step: int,
    targets: Sequence[int],
    answers: Sequence[int],
    metrics: dict[str, float],
) -> MicroBatchLoss:
    """One forward of `batch` and its loss sums: the task loss, the adapter method's extra terms (e.g. distillation;
    each is written to `metrics` per target token of this micro-batch) and the answer-only loss (`answer_mask` of the
    examples' `targets` and `answers` counts)."""
    needs_logits = type(method).batch_loss is not Strategy.batch_loss  # the method's extra terms read them
    forward = forward_targets(model, batch, logits=needs_logits)
    per_token = token_losses(forward)  # (n_targets,)
    task = per_token.sum()
    extra = method.batch_loss(model, forward.inputs, forward.keep, forward.logits, step) or {}
    if forward.router_loss is not None:  # per target token, as the model adds it to its mean token loss
        extra = {**extra, "moe/router_aux_loss": forward.router_loss * len(per_token)}
    metrics.update({tag: value.item() / max(1, len(per_token)) for tag, value in extra.items()})
    answer = narrow_sums(per_token.detach(), answer_mask(targets, answers, per_token.device))[2:]
    return MicroBatchLoss(task, task + sum(value.float() for value in extra.values()), answer)


class Means:
    """Per-tag means of scalars added once per step, over the steps since the last `pop`."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}

    def add(self, values: dict[str, float]) -> None:
        for tag, value in values.items():
            total = self.sums.setdefault(tag, [0.0, 0])
            total[0], total[1] = total[0] + value, total[1] + 1

    def pop(self) -> dict[str, float]:
        means = {tag: total / count for tag, (total, count) in self.sums.items()}
        self.sums = {}
        return means


def with_answer_targets(
    tokenized: datasets.Dataset, raw: datasets.Dataset, tokenizer: Any, args: Any
) -> datasets.Dataset:
    """`tokenized` (from `tokenize_records(raw, tokenizer, ...)` with the run's `args`) with an `answer_targets`
    column: each example's response target tokens, counted on the same texts tokenized with the prompt masked."""
    answers = tokenized
    if args.train_on_inputs and "conversation" not in raw.column_names:  # conversations: assistant tokens only
        answers = tokenize_records(raw, tokenizer, args.cutoff_len, False, args.template)
    return tokenized.add_column("answer_targets", target_counts(answers))


def target_counts(dataset: datasets.Dataset) -> list[int]:
    """Tokens each example contributes to the loss (labels after the causal shift that are not ignored)."""
    return [sum(1 for label in labels[1:] if label != IGNORE_INDEX) for labels in dataset["labels"]]


def validation_means(
    model: torch.nn.Module, dataset: datasets.Dataset, batch_of: Callable, info: Any, micro_batch_size: int,
    tokenizer: Any,
) -> dict[str, float]:  # fmt: skip
    """Mean token loss over `dataset` (eval/loss), its answer tokens (eval/answer_loss) and those whose label has a
    digit (eval/digit_loss, where there are any), sharded over the ranks (`info`: rank, world_size; `batch_of(indices,
    dataset)` collates). Every rank runs the same number of forwards (ZeRO-3 gathers collectively): a rank with
    nothing left re-runs a batch with weight 0."""
    n, world, mb = len(dataset), info.world_size, micro_batch_size
    counts = (target_counts(dataset), dataset["answer_targets"])
    digits = digit_token_mask(tokenizer)
    totals = None  # (summed loss, tokens) of all, answer and digit tokens
    for start in range(0, n, mb * world):
        indices = list(range(start + info.rank * mb, min(start + (info.rank + 1) * mb, n)))
        forward = forward_targets(model, batch_of(indices or [0], dataset), logits=False)
        mask = answer_mask(*([column[i] for i in indices or [0]] for column in counts), device=forward.targets.device)
        sums = narrow_sums(token_losses(forward), mask, digits.to(mask.device)[forward.targets]) * bool(indices)
        totals = sums if totals is None else totals + sums
    group_sum(totals)
    values = totals.tolist()
    names = ("eval/loss", "eval/answer_loss", "eval/digit_loss")
    return {name: values[2 * i] / values[2 * i + 1] for i, name in enumerate(names) if values[2 * i + 1] > 0}
