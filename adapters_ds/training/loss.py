"""The training loss: summed next-token cross-entropy over the target tokens, with logits only where a label needs them.

A causal LM's head projects every position onto the vocabulary (SmolLM2: 576 → 49,152, about a fifth of the
forward FLOPs, and a (tokens, vocab) fp32 tensor to softmax). Padding positions, the last position of each
sequence and, with `--no_train_on_inputs`, the prompt have no next-token label, so `causal_lm_loss_sum` asks the
model for the hidden states of the target positions only, through transformers' own `logits_to_keep` (a boolean
(batch, seq) mask): the model's forward and its `lm_head` module run as usual, so DeepSpeed's ZeRO-3 hooks gather
the (possibly tied, partitioned) head weight as they would for full logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapters_ds.training.data import IGNORE_INDEX


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


def causal_lm_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward `batch` (input_ids, labels, and attention_mask or position_ids) through `model` (a transformers
    causal LM or the DeepSpeed engine around one) and return the summed token loss, in fp32.

    Equal to `loss_sum` on the full logits (tests/test_throughput_units.py), without projecting the positions that
    no label needs.
    """
    keep, targets = target_positions(batch["labels"])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # use_cache=False also matters for packing: transformers only derives the packed mask when no cache is built
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (n_targets, vocab)
    return F.cross_entropy(logits.float(), targets, reduction="sum")
