"""Evaluation and export on CUDA: batched greedy generation (left padding, KV cache) gives every prompt the tokens it
gets alone, and the PEFT export of a LoRA adapter gives PEFT's model our logits in bf16."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from adapters.test_adapters import randomize_adapters
from tiny_models import make_model, sample_batch
from tiny_tokenizer import make_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig

from adapters_ds import LoRAConfig, freeze_base, inject_adapters, save_adapter
from adapters_ds.cli.export import main as export_main
from adapters_ds.evaluation.generation import encode_prompts, generate_ids
from adapters_ds.prompts import build_prompt

pytestmark = pytest.mark.gpu

QUESTIONS = ["What is 2 plus 3?", "She has 12 apples and buys 30 more. How many?", "7 * 6 =",
             "the quick brown fox jumps over the lazy dog: how many words?", "Count: 1 2 3"]  # fmt: skip


def test_batched_generation_equals_unbatched(device):
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.3)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).to(device).eval()
    encoded = encode_prompts(tokenizer, [build_prompt(q, "", "alpaca", tokenizer) for q in QUESTIONS])
    assert len({len(ids) for ids in encoded}) == len(encoded)  # every row of the batch is padded differently
    single = [generate_ids(model, tokenizer, [ids], 16, stop_strings=())[0] for ids in encoded]
    batched = generate_ids(model, tokenizer, encoded, 16, stop_strings=())
    assert batched == single
    assert len({tuple(ids) for ids in single}) > 1  # the outputs depend on the prompt


def test_peft_export_gives_peft_our_logits_in_bf16(tmp_path, device):
    peft = pytest.importorskip("peft")
    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "peft"
    make_model("llama").save_pretrained(base_dir)
    model = make_model("llama")
    config = LoRAConfig(r=4, alpha=8, dropout=0.0)
    inject_adapters(model, config)
    freeze_base(model)
    randomize_adapters(model)
    save_adapter(model, config, adapter_dir)
    with contextlib.redirect_stdout(io.StringIO()):
        export_main(["--base_model", str(base_dir), "--adapter_dir", str(adapter_dir), "--output_dir", str(out),
                     "--peft"])  # fmt: skip
    batch = {k: v.to(device) for k, v in sample_batch().items()}
    with torch.no_grad():
        reference = model.to(device).eval()(**batch).logits  # fp32
        ours = model.to(torch.bfloat16)(**batch).logits.float()
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).to(device)
        theirs = peft.PeftModel.from_pretrained(base, out).eval()(**batch).logits.float()
    precision = (ours - reference).abs().max().item()  # what bf16 itself costs here
    assert precision > 0
    assert (theirs - ours).abs().max().item() <= 2 * precision, ((theirs - ours).abs().max(), precision)
    assert (theirs - reference).abs().max().item() <= 3 * precision
