"""A quantized frozen base (`--quantization`): the stored rows against bitsandbytes' own codes, the layer's forward
and backward against the dense computation, every adapter method on a quantized tiny LLaMA, and (slow) 2-rank
ZeRO-3 QLoRA against one process."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from launch import REPO, losses, run
from safetensors.torch import load_file
from tiny_tokenizer import make_tokenizer
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from adapters_ds.adapters.inject import freeze_base, inject_adapters
from adapters_ds.adapters.registry import get_method
from adapters_ds.errors import InputError
from adapters_ds.quantization import (
    QuantLinear,
    QuantSpec,
    dequantize_model,
    dequantize_weight,
    quantize_model,
    quantize_weight,
)

bnb = pytest.importorskip("bitsandbytes.functional")

SPECS = [QuantSpec("nf4"), QuantSpec("fp4"), QuantSpec("nf4", double_quant=True), QuantSpec("int8")]
IDS = ["nf4", "fp4", "nf4-double", "int8"]


def quantizable_llama(seed: int = 0) -> nn.Module:
    """A tiny LLaMA whose every linear layer has dimensions divisible by 64 (bitsandbytes' CPU 4-bit path needs
    output sizes divisible by 32; 4-bit blocks of 64 weights must not cross rows)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_stored_rows_decode_to_bitsandbytes_values_and_keep_each_rows_scales(spec):
    weight = torch.randn(192, 128)
    stored = quantize_weight(weight, spec, torch.float32)
    dense = dequantize_weight(stored, spec, 128, torch.float32)
    if spec.four_bit:
        codes, state = bnb.quantize_4bit(weight, blocksize=64, quant_type=spec.kind)
        reference = bnb.dequantize_4bit(codes, state)  # bitsandbytes' own round trip (fp32 absmax)
    else:
        codes, scale, _ = bnb.int8_vectorwise_quant(weight)
        reference = bnb.int8_vectorwise_dequant(codes, scale)
    # double quantization stores the absmax in 8 bits: within the absmax's own rounding of the reference
    tolerance = 0.02 * weight.abs().max().item() if spec.double_quant else 0.0
    torch.testing.assert_close(dense, reference, atol=tolerance, rtol=0)
    # bytes of a stored row of 128 weights: 4-bit codes + an fp32 absmax per 64; with double quantization a byte per
    # absmax, one fp32 second-level scale and one fp32 offset, padded to 4 bytes; int8 codes + an fp32 absmax
    row = {"nf4": 64 + 2 * 4, "fp4": 64 + 2 * 4, "int8": 128 + 4}[spec.kind]
    row = 64 + 2 + 8 + 2 if spec.double_quant else row
    assert stored.numel() * stored.element_size() == 192 * row
    # a row's codes and scales live in that row: quantizing permuted rows permutes the stored rows, byte for byte
    perm = torch.randperm(192)
    permuted = quantize_weight(weight[perm], spec, torch.float32)
    assert torch.equal(permuted.view(torch.uint8), stored[perm].view(torch.uint8))
    bf16 = quantize_weight(weight.bfloat16(), spec, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.shape[1] * 2 >= stored.shape[1] * 4 - 3


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_quantized_layer_computes_with_its_dequantized_weight_forward_and_backward(spec):
    linear = nn.Linear(128, 64, bias=True)
    layer = QuantLinear(128, 64, quantize_weight(linear.weight.detach(), spec, torch.float32), spec)
    layer.bias = linear.bias
    x = torch.randn(3, 5, 128, requires_grad=True)
    out = layer(x)
    dense = layer.dequantized()
    x_ref = x.detach().clone().requires_grad_(True)
    expected = F.linear(x_ref, dense, linear.bias)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert layer.weight.grad is None  # frozen: the stored bytes never get a gradient


def test_quantize_model_replaces_every_linear_but_the_head_and_refuses_whole():
    model = quantizable_llama()
    names = quantize_model(model, QuantSpec("nf4"))
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert not isinstance(model.lm_head, QuantLinear) and type(model.lm_head) is nn.Linear
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    assert not any(m.training for m in model.modules())  # the eval-mode model stays in eval mode (dropout off)
    assert dequantize_model(model) == 14 and not any(isinstance(m, QuantLinear) for m in model.modules())
    odd = quantizable_llama()
    odd.model.layers[1].mlp.down_proj = nn.Linear(96, 128, bias=False)  # 96 inputs: not whole 64-weight blocks
    before = {n: type(m) for n, m in odd.named_modules()}
    with pytest.raises(InputError, match=r"model.layers.1.mlp.down_proj.*96 input features"):
        quantize_model(odd, QuantSpec("nf4"))
    assert {n: type(m) for n, m in odd.named_modules()} == before  # nothing replaced
    quantize_model(odd, QuantSpec("int8"))  # int8 has no blocks: any width
    with pytest.raises(InputError, match="double_quant"):
        QuantSpec("int8", double_quant=True)


METHODS = [
    ("lora", {}),
    ("lora", {"use_dora": True}),
    ("lora", {"use_rslora": True}),
    ("series", {}),
    ("parallel", {}),
    ("prefix", {}),
    ("prompt", {}),
    ("ptuning", {}),
    ("gates", {}),
]


@pytest.mark.parametrize(("method", "options"), METHODS, ids=[m + "".join(f"-{k}" for k in o) for m, o in METHODS])
def test_every_method_on_a_quantized_base_equals_it_on_the_dequantized_weights(method, options):
    quantized = quantizable_llama()
    quantize_model(quantized, QuantSpec("nf4", double_quant=True))
    dense = copy.deepcopy(quantized)
    dequantize_model(dense)  # the same weights as plain nn.Linear layers
    batch = {"input_ids": torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        base_logits = quantized(**batch).logits
    config = get_method(method).config(**options)
    grads = []
    for model in (quantized, dense):
        torch.manual_seed(3)
        inject_adapters(model, config)
        freeze_base(model)
        logits = model(**batch).logits
        if not config.model_level:  # virtual tokens change the output from the start; a layer adapter does not
            torch.testing.assert_close(logits, base_logits, atol=1e-5, rtol=0)
        logits = logits[:, -12:]  # prompt tuning's virtual tokens come first
        F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and any(g.abs().sum() > 0 for g in grads[0].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], atol=1e-5, rtol=1e-4, msg=name)
    assert all(not isinstance(m, QuantLinear) or m.weight.grad is None for m in quantized.modules())


@pytest.fixture(scope="module")
def qlora_assets(tmp_path_factory):
    """The tiny quantizable LLaMA with the test tokenizer, a toy task, and fp32 variants of the shipped ZeRO-3
    config and of no ZeRO (fp32: the two runs compare to 1e-4)."""
    root = tmp_path_factory.mktemp("qlora")
    quantizable_llama().save_pretrained(root / "base")
    make_tokenizer().save_pretrained(root / "base")
    records = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} + {b} = {a + b}."}
               for a, b in ((1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3))]  # fmt: skip
    (root / "data.json").write_text(json.dumps(records))
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["bf16"] = {"enabled": False}
    (root / "zero3.json").write_text(json.dumps(config))
    (root / "nozero.json").write_text(json.dumps({**config, "zero_optimization": {"stage": 0}}))
    return root


def qlora_run(root, config: str, nproc: int):
    out = root / f"{config}-{nproc}"
    run(["--ds_config", str(root / f"{config}.json"), "--base_model", str(root / "base"),
         "--data_path", str(root / "data.json"), "--output_dir", str(out), "--quantization", "nf4", "--double_quant",
         "--lora_r", "8", "--lora_dropout", "0", "--max_steps", "4", "--micro_batch_size", str(4 // nproc),
         "--batch_size", "4", "--cutoff_len", "64", "--learning_rate", "1e-2", "--lr_scheduler", "constant",
         "--logging_steps", "1", "--save_steps", "0"],
        launcher="deepspeed" if nproc > 1 else "python", nproc=nproc)  # fmt: skip
    return out


@pytest.mark.slow
def test_two_rank_zero3_qlora_trains_like_one_process_and_saves_the_whole_adapter(qlora_assets):
    sharded = qlora_run(qlora_assets, "zero3", 2)
    single = qlora_run(qlora_assets, "nozero", 1)
    steps = losses(sharded)
    assert steps == pytest.approx(losses(single), abs=1e-4)  # the same quantized weights on both sides
    assert steps[-1] < steps[0]
    # the bytes of the quantized base, counted here from the same checkpoint, and split between the two ranks
    model = AutoModelForCausalLM.from_pretrained(qlora_assets / "base", dtype=torch.float32)
    quantize_model(model, QuantSpec("nf4", double_quant=True))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    vectors = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() < 2)  # norms: kept whole
    reports = json.loads((sharded / "zero3_partition.json").read_text())
    assert len(reports) == 2
    for rank in reports:
        assert rank["base_bytes_total"] == total
        assert rank["base_bytes_per_rank"] <= (total - vectors) / 2 + vectors + 64  # padding of a partition
        assert rank["adapter_local_numel"] == rank["adapter_numel"] > 0
    assert sum(r["base_bytes_per_rank"] for r in reports) < total + vectors + 128
    # the adapter saved after the ZeRO-3 run: every tensor whole, and the one-process run's values
    saved, reference = (load_file(run_dir / "adapter" / "adapter_model.safetensors") for run_dir in (sharded, single))
    assert saved.keys() == reference.keys() and len(saved) == 2 * 5 * 2  # A and B of q,k,v,up,down_proj, 2 layers
    for name, tensor in saved.items():
        assert tensor.shape == reference[name].shape and tensor.numel() > 0
        torch.testing.assert_close(tensor, reference[name], atol=1e-4, rtol=1e-3)
    assert any(t.abs().sum() > 0 for n, t in saved.items() if "lora_B" in n)  # B moved from zero: trained


def transformers_4bit(path):
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config, device_map="cpu")


def test_an_adapter_of_our_quantized_base_loads_on_transformers_4bit_base_and_exports(qlora_assets, tmp_path):
    """Our NF4 weights are bitsandbytes' NF4 weights of the same checkpoint; the adapter trained on them loads with
    `load_adapter` on a base transformers loaded in 4 bits, its PEFT export loads there with PEFT to the same logits,
    and `export --merge --quantization nf4` writes a plain model with the quantized model's logits."""
    from peft import PeftModel

    from adapters_ds.adapters.lora import LoRAConfig
    from adapters_ds.adapters.storage import load_adapter, save_adapter
    from adapters_ds.cli.export import main as export_main

    base = qlora_assets / "base"
    ours = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    quantize_model(ours, QuantSpec("nf4"))
    config = LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True)
    inject_adapters(ours, config)
    freeze_base(ours)
    torch.manual_seed(0)
    for name, param in ours.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter: B away from zero
            torch.nn.init.normal_(param, std=0.1)
    save_adapter(ours, config, tmp_path / "adapter")
    ids = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ours(input_ids=ids).logits

    four_bit = transformers_4bit(base)
    for name, module in ours.named_modules():
        if isinstance(module, QuantLinear):
            theirs = four_bit.get_submodule(name).weight
            assert torch.equal(module.dequantized(), bnb.dequantize_4bit(theirs.data, theirs.quant_state)), name
    load_adapter(four_bit, tmp_path / "adapter")
    with torch.no_grad():
        ours_on_theirs = four_bit(input_ids=ids).logits

    export_main(["--base_model", str(base), "--adapter_dir", str(tmp_path / "adapter"), "--output_dir",
                 str(tmp_path / "peft"), "--peft"])  # fmt: skip
    peft_model = PeftModel.from_pretrained(transformers_4bit(base), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, ours_on_theirs, atol=1e-5, rtol=0)

    export_main(["--base_model", str(base), "--adapter_dir", str(tmp_path / "adapter"), "--output_dir",
                 str(tmp_path / "merged"), "--merge", "--quantization", "nf4"])  # fmt: skip
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not any(isinstance(m, QuantLinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=0)


def test_evaluating_on_the_quantized_base_gives_the_rows_of_the_merged_export(qlora_assets, tmp_path):
    """`evaluate --quantization nf4 --double_quant` with two adapters on one loaded base: the LoRA's rows are
    those of the model `export --merge` writes with the same quantization (its logits too, to rounding); the series
    adapter's rows are those of a run of its own (the base left as it was); with --tensor_parallel it is refused."""
    from adapters_ds.adapters.lora import LoRAConfig
    from adapters_ds.adapters.series import SeriesConfig
    from adapters_ds.adapters.storage import save_adapter
    from adapters_ds.cli.evaluate import main as evaluate_main
    from adapters_ds.cli.evaluate import parse_args
    from adapters_ds.cli.export import main as export_main
    from adapters_ds.evaluation.loading import load_model

    base, spec = qlora_assets / "base", QuantSpec("nf4", double_quant=True)
    for name, config in (("lora", LoRAConfig(r=4, use_rslora=True)), ("series", SeriesConfig(bottleneck_size=8))):
        model = quantizable_llama()
        quantize_model(model, spec)
        inject_adapters(model, config)
        freeze_base(model)
        torch.manual_seed(1)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:  # a trained-looking adapter: every tensor away from its start
                    param.copy_(torch.randn(param.shape) * 0.2)
        save_adapter(model, config, tmp_path / name)
    questions = [f"What is {a} plus {b}?" for a, b in ((1, 2), (3, 4), (12, 30), (7, 8))]
    (tmp_path / "data" / "Arith").mkdir(parents=True)
    (tmp_path / "data" / "Arith" / "test.json").write_text(
        json.dumps([{"instruction": q, "input": "", "output": "", "answer": "0"} for q in questions])
    )

    def args(model, adapters, outs, *extra):
        return ["--base_model", str(model), "--adapter_dir", adapters, "--datasets", "Arith", "--data_dir",
                str(tmp_path / "data"), "--output_dir", outs, "--max_new_tokens", "6", "--dtype", "float32",
                *extra]  # fmt: skip

    quant = ["--quantization", "nf4", "--double_quant"]
    both = f"{tmp_path / 'lora'},{tmp_path / 'series'}"
    evaluate_main(args(base, both, f"{tmp_path / 'q_lora'},{tmp_path / 'q_series'}", *quant))
    evaluate_main(args(base, str(tmp_path / "series"), str(tmp_path / "series_alone"), *quant))
    export_main(["--base_model", str(base), "--adapter_dir", str(tmp_path / "lora"), "--output_dir",
                 str(tmp_path / "merged"), "--merge", *quant])  # fmt: skip
    evaluate_main(["--base_model", str(tmp_path / "merged"), "--datasets", "Arith", "--data_dir",
                   str(tmp_path / "data"), "--output_dir", str(tmp_path / "m_out"), "--max_new_tokens", "6",
                   "--dtype", "float32"])  # fmt: skip

    def rows(out):
        return [json.loads(line) for line in (tmp_path / out / "Arith.jsonl").read_text().splitlines()]

    assert len(rows("q_lora")) == 4 and rows("q_lora") == rows("m_out")
    assert rows("q_series") == rows("series_alone") != rows("q_lora")
    settings = json.loads((tmp_path / "q_lora" / "eval_settings.json").read_text())
    assert settings["quantization"] == "nf4" and settings["double_quant"] is True
    assert settings["adapter_method"] == "lora" and settings["merged"] is False  # nothing merges into NF4 codes

    quantized, _, _ = load_model(
        str(base), str(tmp_path / "lora"), torch.float32, torch.device("cpu"), quantization=spec
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert sum(isinstance(m, QuantLinear) for m in quantized.modules()) == 14
    ids = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(quantized(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=0)

    with pytest.raises(InputError, match="--tensor_parallel .*--quantization"):
        parse_args(args(base, str(tmp_path / "lora"), str(tmp_path / "tp"), *quant, "--tensor_parallel", "auto"))
    with pytest.raises(InputError, match="--double_quant"):
        parse_args(args(base, str(tmp_path / "lora"), str(tmp_path / "dq"), "--double_quant"))
