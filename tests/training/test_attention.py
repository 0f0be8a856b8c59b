"""Attention for packed rows with host-side boundaries (`adapters_ds.training.attention`, `packing.packed_sdpa`):
the loss and gradients of padded batches for every implementation that runs on a CPU, nothing read back from the
device inside the forward, transformers' own masks for calls without boundaries, and the trainer's one read per
optimizer step. The CUDA kernels (torch's varlen, flash-attn) are checked the same way in tests/gpu."""

from __future__ import annotations

import copy
import os
import signal

import pytest
import torch
from launch import EXTENSIONS, write_train_assets
from sync_count import host_reads
from tiny_models import FAMILIES, make_model

from adapters_ds.errors import InputError
from adapters_ds.training.attention import (
    BOUNDS,
    PACKED_FLASH,
    PACKED_SDPA,
    check_attn_implementation,
    packed_inputs,
    resolve_attn_implementation,
)
from adapters_ds.training.data import collate, collate_packed
from adapters_ds.training.loss import causal_lm_loss_sum, loss_sum
from adapters_ds.training.packing import enable_packing, supports_packing
from training.test_throughput_units import features, lora_model, loss_and_grads

PACKABLE = [f for f in FAMILIES if supports_packing(make_model(f))]
LENGTHS = [9, 14, 5, 11]


def packed_batch(model: torch.nn.Module, examples: list[dict], lengths: list[int]) -> dict:
    batch = collate_packed(examples)
    batch.update(packed_inputs(model.config._attn_implementation, lengths))
    return batch


@pytest.mark.parametrize("family", PACKABLE)
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_loss_with_host_boundaries_equals_padded_loss(family, implementation):
    model = lora_model(family)
    examples = features(LENGTHS, masked_prompt=3)
    padded, padded_grads = loss_and_grads(model, lambda: causal_lm_loss_sum(model, collate(examples, 0)))
    assert enable_packing(model, implementation)
    expected = {"sdpa": PACKED_SDPA, "eager": "eager"}[implementation]
    assert model.config._attn_implementation == expected
    batch = packed_batch(model, examples, LENGTHS)
    assert (BOUNDS in batch) == (implementation == "sdpa")  # eager finds the examples from position_ids itself
    packed, grads = loss_and_grads(model, lambda: causal_lm_loss_sum(model, batch))
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, padded_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_examples_longer_than_the_sliding_window_keep_it():
    """Mistral's sliding window (4 here) within each packed example, as the padded batch's mask has it."""
    torch.manual_seed(0)
    model = make_model("mistral")
    model.config.sliding_window = 4
    examples = features(LENGTHS)
    with torch.no_grad():
        padded = causal_lm_loss_sum(model, collate(examples, 0))
        unwindowed = copy.deepcopy(model)
        unwindowed.config.sliding_window = None
        assert not torch.allclose(causal_lm_loss_sum(unwindowed, collate(examples, 0)), padded)  # the window matters
        enable_packing(model, "sdpa")
        packed = causal_lm_loss_sum(model, packed_batch(model, examples, LENGTHS))
        from_positions = causal_lm_loss_sum(model, collate_packed(examples))  # no host boundaries: position_ids
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_positions, padded, rtol=1e-5, atol=1e-5)


def full_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Forward and backward with full logits: no boolean target selection, so every read counted is attention's."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    loss = loss_sum(model(**inputs, use_cache=False).logits, batch["labels"])
    loss.backward()
    return loss


def test_the_packed_forward_reads_nothing_back_from_the_device():
    model = lora_model("llama")
    examples = features(LENGTHS)
    layers = model.config.num_hidden_layers
    enable_packing(model, "sdpa")
    batch, bare = packed_batch(model, examples, LENGTHS), collate_packed(examples)  # collated on the host
    with host_reads() as counts:
        full_loss(model, batch)
    assert counts.by_source == {}
    # the same row without its boundaries: each layer finds them itself, and transformers detects the packing
    with host_reads() as counts:
        full_loss(model, bare)
    reads = {"training/packing.py": 2 * layers, "transformers/masking_utils.py": 1}  # packing: nonzero, tolist
    assert counts.by_source == reads
    enable_packing(model, "eager")  # transformers' dense block-diagonal mask: its detection reads back once
    with host_reads() as counts:
        full_loss(model, bare)
    assert counts.by_source == {"transformers/masking_utils.py": 1}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_calls_without_boundaries_get_transformers_masks(family):
    """Padded batches and cached generation with left padding on a packing-enabled model: as plain sdpa."""
    model = lora_model(family).eval()
    packed_model = copy.deepcopy(model)
    enable_packing(packed_model, "sdpa")
    batch = collate(features([9, 14, 5]), 0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(packed_model(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)
        left = {k: torch.flip(v, dims=[1]) for k, v in inputs.items()}  # left padding (the rows reversed)
        kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        want = model.generate(**left, **kwargs)
        got = packed_model.generate(**left, **kwargs)
    assert torch.equal(got, want)


def test_implementation_choices():
    packed = {
        ("auto", torch.float32, "cpu"): PACKED_SDPA,
        ("auto", torch.bfloat16, "cuda"): PACKED_SDPA,  # no flash-attn package here
        ("sdpa", torch.bfloat16, "cuda"): PACKED_SDPA,
        ("eager", torch.float32, "cpu"): "eager",
    }
    for (choice, dtype, device), expected in packed.items():
        assert resolve_attn_implementation(choice, dtype, True, device) == expected
    assert resolve_attn_implementation("sdpa", torch.float32, False, "cpu") == "sdpa"  # padded batches
    assert resolve_attn_implementation("eager", torch.float32, False, "cpu") == "eager"
    for dtype, device in ((torch.bfloat16, "cpu"), (torch.float32, "cuda"), (torch.bfloat16, "cuda")):
        with pytest.raises(InputError, match="flash_attention_2 needs a CUDA device, bf16 or fp16"):
            resolve_attn_implementation("flash_attention_2", dtype, True, device)  # and the package is not here
    with pytest.raises(InputError, match="flash_attention_2 needs"):
        check_attn_implementation("flash_attention_2", {"bf16": {"enabled": True}})
    with pytest.raises(InputError, match="must be one of auto, sdpa, flash_attention_2, eager"):
        resolve_attn_implementation("flash", torch.float32, True, "cpu")
    assert packed_inputs(PACKED_FLASH, [3, 2])[BOUNDS] == (0, 3, 5)
    assert packed_inputs("eager", [3, 2]) == {}


def test_a_family_without_packing_takes_the_choice_for_padded_batches():
    model = make_model("bloom")
    assert not enable_packing(model, "eager")
    assert model.config._attn_implementation == "eager"


@pytest.fixture
def in_process():
    """The trainer in this process sets RANK/MASTER_PORT and signal handlers: put back afterwards."""
    environ = dict(os.environ)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    os.environ.clear()
    os.environ.update(environ)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def test_the_trainer_reads_the_device_once_per_optimizer_step(tmp_path, in_process, monkeypatch):
    """Structural check of a training step outside DeepSpeed's own backward and step: the trainer's scalars are
    read once per step, and neither attention nor mask preparation reads anything back (2 micro-batches a step)."""
    from adapters_ds.training.args import parse_train_args
    from adapters_ds.training.trainer import Trainer

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(EXTENSIONS))  # DeepSpeed's ops, built once (launch.py)
    assets = write_train_assets(tmp_path / "assets")
    args = parse_train_args([
        "--base_model", str(assets / "base"), "--data_path", str(assets / "data.json"),
        "--output_dir", str(tmp_path / "run"), "--ds_config", str(assets / "zero3_fp32.json"), "--cutoff_len", "48",
        "--micro_batch_size", "4", "--batch_size", "8", "--max_steps", "2", "--lora_r", "4", "--lora_alpha", "8",
        "--attn_implementation", "sdpa",
    ])  # fmt: skip
    trainer = Trainer(args, args.base_model)
    assert trainer.pack and trainer.engine.module.config._attn_implementation == PACKED_SDPA
    received = []
    batch = trainer.batch

    def spy(indices, dataset=None):
        out = batch(indices, dataset)
        received.append(out.get(BOUNDS))
        return out

    trainer.batch = spy
    with host_reads() as counts:
        trainer.engine.backward = counts.pause(trainer.engine.backward)
        trainer.engine.step = counts.pause(trainer.engine.step)
        results = [trainer.train_step(step) for step in range(2)]
    assert all(not r["skipped"] for r in results)
    # every micro-batch carried its boundaries as Python numbers
    assert len(received) == 4 and all(isinstance(b, tuple) and all(isinstance(x, int) for x in b) for b in received)
    assert counts.by_source["training/trainer.py"] == 2, counts.by_source
    for name in ("training/attention.py", "training/packing.py", "transformers/masking_utils.py"):
        assert name not in counts.by_source, counts.by_source
    # the rest (the loss's boolean target selections; collation, which works on host tensors) is not attention's
