"""Every method on every family of today's fine-tuning (Llama 3.x, Qwen3, Gemma 2/3, Phi-3, OLMo 2, Granite, Mixtral,
Qwen3-MoE, OLMoE): it trains (a backward reaches every adapter tensor, additive methods start as the identity), or
it is refused with one line naming the family and the method. Also per family: packed rows equal padded batches
where the record allows packing, and batched cached generation with left padding equals one prompt at a time."""

from __future__ import annotations

import re

import peft
import pytest
import torch
from tiny_models import LAYERS, MOE_FAMILIES, RECENT_CONFIGS, TOP_K, VOCAB, make_recent_model, sample_batch
from tiny_tokenizer import make_tokenizer
from transformers import AutoModelForCausalLM

from adapters_ds import GatesConfig, InputError, LoRAConfig, ParallelConfig, SeriesConfig, strategy_for
from adapters_ds.adapters.base import adapter_parameters
from adapters_ds.adapters.inject import freeze_base, inject_adapters
from adapters_ds.adapters.prefix import PrefixConfig
from adapters_ds.adapters.prompt import PromptConfig
from adapters_ds.adapters.ptuning import PTuningConfig
from adapters_ds.adapters.storage import save_adapter
from adapters_ds.evaluation.generation import generate_ids
from adapters_ds.evaluation.tensor_parallel import check_tensor_parallel
from adapters_ds.export.peft import export_peft
from adapters_ds.families import family_of
from adapters_ds.training.attention import packed_inputs
from adapters_ds.training.data import collate, collate_packed
from adapters_ds.training.loss import causal_lm_loss_sum, enable_router_aux_loss, micro_batch_loss
from adapters_ds.training.packing import enable_packing, supports_packing

METHODS = {  # case: (config, adds to the output: the identity at step 0)
    "lora": (lambda: LoRAConfig(r=2, alpha=4, dropout=0.0), True),
    "dora": (lambda: LoRAConfig(r=2, alpha=4, dropout=0.0, use_dora=True), True),
    "rslora_loraplus": (lambda: LoRAConfig(r=2, alpha=4, use_rslora=True, lora_plus_ratio=16.0), True),
    "series": (lambda: SeriesConfig(bottleneck_size=4), True),
    "series_houlsby": (lambda: SeriesConfig(bottleneck_size=4, preset="houlsby"), True),
    "parallel": (lambda: ParallelConfig(bottleneck_size=4), True),
    "prefix": (lambda: PrefixConfig(num_virtual_tokens=3), False),
    "prompt": (lambda: PromptConfig(num_virtual_tokens=3), False),
    "ptuning": (lambda: PTuningConfig(num_virtual_tokens=3), False),
    "gates": (lambda: GatesConfig(), False),
}
# (family, case) → what the one-line error must say besides the family's model type and the method
REFUSED = {
    ("gemma2", "prefix"): "soft-capped",
    ("phi3", "gates"): "fused",
    **{(f, "dora"): "DoRA" for f in MOE_FAMILIES},
    **{(f, c): "mixture of experts" for f in MOE_FAMILIES for c in ("series", "series_houlsby", "parallel", "gates")},
}
GRID = [(family, case) for family in RECENT_CONFIGS for case in METHODS]


def _labelled(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**batch, "labels": batch["input_ids"].clone()}


@pytest.mark.parametrize(("family", "case"), GRID)
def test_every_method_trains_on_every_family_or_is_refused_by_name(family, case):
    build, additive = METHODS[case]
    model, config = make_recent_model(family), build()
    model_type = model.config.model_type
    if (family, case) in REFUSED:
        with pytest.raises(InputError) as caught:
            inject_adapters(model, config)
        message = str(caught.value)
        assert "\n" not in message and model_type in message and REFUSED[family, case] in message
        assert config.method in message or "DoRA" in message
        return
    batch = sample_batch()
    with torch.no_grad():
        base = model(**batch).logits
    inject_adapters(model, config)
    freeze_base(model)
    if additive:  # LoRA, Series and Parallel start as the identity (MoE: another order of summing the experts)
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, base, rtol=0, atol=1e-5)
    strategy = strategy_for(config)  # how the method trains
    strategy.prepare(model)
    groups = strategy.param_groups(model, 1e-3)  # LoRA+: B in its own, faster group
    assert sum(len(g["params"]) for g in groups) == len(adapter_parameters(model))
    model.train()
    loss = causal_lm_loss_sum(model, _labelled(batch))
    extra = strategy.regularizer(model, 0)  # the method's own loss term (gates: the sparsity penalty)
    (loss + (extra[0] if extra else 0)).backward()
    params = adapter_parameters(model)
    assert params and torch.isfinite(loss)
    missing = [n for n, p in params.items() if p.grad is None]
    assert not missing, missing


def _features(lengths: list[int]) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(0)
    return [dict(input_ids=(ids := torch.randint(3, VOCAB, (n,), generator=gen).tolist()), labels=ids) for n in lengths]


@pytest.mark.parametrize("family", list(RECENT_CONFIGS))
def test_packed_rows_equal_padded_batches_where_the_record_allows_packing(family):
    model = make_recent_model(family)
    record = family_of(model.config.model_type, "test")
    assert supports_packing(model) == (record.packing is None)
    if record.packing is not None:
        return
    examples = _features([9, 14, 5, 11])
    with torch.no_grad():
        padded = causal_lm_loss_sum(model, collate(examples, 0))
        assert enable_packing(model)
        packed = causal_lm_loss_sum(model, collate_packed(examples))  # examples found from position_ids
        bounded = collate_packed(examples)  # as the trainer passes them: boundaries from the host
        bounded.update(packed_inputs(model, [len(f["input_ids"]) for f in examples]))
        assert ("cu_seq_lens_q" in bounded) == (model.config._attn_implementation != "eager")  # eager: positions
        with_bounds = causal_lm_loss_sum(model, bounded)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_bounds, padded, rtol=1e-5, atol=1e-5)


def test_soft_capped_attention_stays_soft_capped_in_packed_rows():
    """Gemma 2 with a cap low enough to change the loss: packed rows (eager, which caps) equal padded batches, and
    sdpa, which would drop the cap, is refused."""
    config = RECENT_CONFIGS["gemma2"]()
    config.attn_logit_softcapping, config.initializer_range = 0.5, 0.5  # attention logits well past the cap
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    uncapped = AutoModelForCausalLM.from_config(config).eval()
    uncapped.load_state_dict(model.state_dict())
    for layer in uncapped.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    examples = _features([9, 14, 5, 11])
    with torch.no_grad():
        padded = causal_lm_loss_sum(model, collate(examples, 0))
        assert not torch.allclose(causal_lm_loss_sum(uncapped, collate(examples, 0)), padded)  # the cap matters
        with pytest.raises(InputError, match="gemma2 models: their attention logits are soft-capped"):
            enable_packing(model, "sdpa")
        assert enable_packing(model) and model.config._attn_implementation == "eager"
        packed = causal_lm_loss_sum(model, collate_packed(examples))
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(RECENT_CONFIGS))
def test_batched_cached_generation_equals_one_prompt_at_a_time(family):
    """Left padding and the KV cache (Gemma's sliding window is shorter than these sequences) change nothing."""
    model, tokenizer = make_recent_model(family), make_tokenizer()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (9, 4, 6)]
    together = generate_ids(model, tokenizer, prompts, max_new_tokens=6, stop_strings=())
    alone = [
        generate_ids(model, tokenizer, [p], max_new_tokens=6, stop_strings=(), use_cache=False)[0] for p in prompts
    ]
    assert together == alone and all(together)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_the_models_router_aux_loss_joins_the_training_loss_and_is_logged(family):
    model = make_recent_model(family)
    assert enable_router_aux_loss(model) and model.config.output_router_logits
    config = LoRAConfig(r=2, dropout=0.0)
    inject_adapters(model, config)
    freeze_base(model)
    batch = _labelled(sample_batch())
    metrics: dict[str, float] = {}
    terms = micro_batch_loss(model, batch, strategy_for(config), 0, [11, 11], [11, 11], metrics)
    with torch.no_grad():
        reference = model(**batch)  # transformers' own: mean token loss + coef · aux
    n = 2 * 11
    expected = model.config.router_aux_loss_coef * reference.aux_loss
    torch.testing.assert_close(metrics["moe/router_aux_loss"], expected.item(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close((terms.total / n).detach(), reference.loss, rtol=1e-5, atol=1e-6)
    assert expected > 0


@pytest.mark.slow
def test_a_training_run_on_a_mixture_of_experts_logs_the_router_aux_loss(tmp_path):
    """The real training command on a tiny Mixtral (one process, ZeRO-3 fp32): the aux loss on the log line and in
    TensorBoard at every logged step."""
    from launch import run, write_train_assets
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assets = write_train_assets(tmp_path)
    make_recent_model("mixtral").save_pretrained(tmp_path / "mixtral")
    make_tokenizer().save_pretrained(tmp_path / "mixtral")
    out = tmp_path / "run"
    result = run(["--ds_config", str(assets / "zero3_fp32.json"), "--base_model", str(tmp_path / "mixtral"),
         "--data_path", str(assets / "data.json"), "--output_dir", str(out), "--adapter", "lora", "--max_steps", "2",
         "--logging_steps", "1", "--micro_batch_size", "2", "--batch_size", "2", "--cutoff_len", "64",
         "--save_steps", "0", "--val_set_size", "0"], launcher="python", nproc=1)  # fmt: skip
    logged = re.findall(r"step (\d)/2 \| loss .* \| moe/router_aux_loss (\S+)", result.stdout + result.stderr)
    assert [step for step, _ in logged] == ["1", "2"] and all(float(v) > 0 for _, v in logged), logged
    events = EventAccumulator(str(out / "tensorboard" / "train"))
    events.Reload()
    assert [e.step for e in events.Scalars("moe/router_aux_loss")] == [1, 2]
    assert all(e.value > 0 for e in events.Scalars("moe/router_aux_loss"))


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("case", ["dora", "series", "parallel"])
def test_methods_refused_on_experts_work_on_a_mixture_of_experts_attention(family, case):
    """What the matrix refuses on a mixture of experts' MLP works on its attention with --target_modules."""
    config = {
        "dora": LoRAConfig(r=2, dropout=0.0, use_dora=True, target_modules=("q_proj", "o_proj")),
        "series": SeriesConfig(bottleneck_size=4, target_modules=("o_proj",)),
        "parallel": ParallelConfig(bottleneck_size=4, target_modules=("o_proj",)),
    }[case]
    model = make_recent_model(family)
    batch = sample_batch()
    with torch.no_grad():
        base = model(**batch).logits
    inject_adapters(model, config)
    freeze_base(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base, rtol=0, atol=1e-5)
    model.train()
    causal_lm_loss_sum(model, _labelled(batch)).backward()
    assert all(p.grad is not None for p in adapter_parameters(model).values())


def test_parallel_on_a_fused_gate_up_projection_adds_to_the_up_half_only():
    model = make_recent_model("phi3")
    inject_adapters(model, ParallelConfig(bottleneck_size=4))
    fused = model.model.layers[0].mlp.gate_up_proj
    with torch.no_grad():
        fused.adapter.up.normal_()
        x = torch.randn(3, fused.in_features)
        delta = fused(x) - torch.nn.functional.linear(x, fused.weight)
    half = fused.out_features // 2
    assert fused.adapter.up.shape[0] == half
    assert torch.equal(delta[:, :half], torch.zeros(3, half)) and delta[:, half:].abs().min() > 0


@pytest.mark.parametrize("targets", [("q_proj", "experts.down_proj"), ("o_proj", "mlp.experts")])
def test_expert_lora_on_named_parameters_exports_to_peft_with_equal_logits(targets, tmp_path):
    """A target may name a fused expert parameter (only it is adapted) or the experts module (both are)."""
    make_recent_model("mixtral").save_pretrained(tmp_path / "base")
    model, config = make_recent_model("mixtral"), LoRAConfig(r=2, alpha=4, dropout=0.0, target_modules=targets)
    inject_adapters(model, config)
    freeze_base(model)
    params = adapter_parameters(model)
    fused = {n.rpartition(".")[2] for n in params if "experts" in n}
    wanted = {"down_proj"} if targets[1].endswith("down_proj") else {"gate_up_proj", "down_proj"}
    assert fused == {f"{p}_lora_{s}" for p in wanted for s in "AB"}
    with torch.no_grad():
        for p in params.values():
            p.normal_(std=0.2)
    save_adapter(model, config, tmp_path / "adapter")
    export_peft(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "peft"))
    base_model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = peft.PeftModel.from_pretrained(base_model, tmp_path / "peft")
    batch = sample_batch()
    with torch.no_grad():
        ours, theirs = model.eval()(**batch).logits, peft_model.eval()(**batch).logits
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")(**batch).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert (ours - base).abs().max() > 1e-3  # the adapters change the outputs


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_the_router_stays_frozen_by_default_and_lora_on_it_routes_trains_and_exports_to_peft(family, tmp_path):
    """Default targets leave the router (a bare weight, not a linear layer) frozen; named, its weight gets a LoRA
    pair: the routing and the router logits the aux loss reads follow it, a backward reaches it, and PEFT's
    `target_parameters` export gives equal logits."""
    model = make_recent_model(family)
    inject_adapters(model, LoRAConfig(r=2, dropout=0.0))
    freeze_base(model)
    router_params = [n for n, p in model.named_parameters() if ".mlp.gate." in n]
    assert router_params and not any(model.get_parameter(n).requires_grad for n in router_params)
    make_recent_model(family).save_pretrained(tmp_path / "base")
    model, batch = make_recent_model(family), sample_batch()
    with torch.no_grad():  # before injection: transformers' router-logit recorder hooks come first
        base_logits = model(**batch, output_router_logits=True).router_logits
    config = LoRAConfig(r=2, alpha=4, dropout=0.0, target_modules=("q_proj", "mlp.gate"))
    assert [p for p in inject_adapters(model, config) if p.endswith("gate")] == [
        f"model.layers.{i}.mlp.gate" for i in range(LAYERS)
    ]
    freeze_base(model)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.normal_(std=0.5)
        adapted = model(**batch, output_router_logits=True).router_logits
    choices = [t.topk(TOP_K, dim=-1).indices.sort(dim=-1).values for t in (*base_logits, *adapted)]
    assert any(not torch.equal(a, b) for a, b in zip(choices[:LAYERS], choices[LAYERS:], strict=True))
    model.train()
    assert enable_router_aux_loss(model)
    model(**_labelled(batch)).loss.backward()
    grads = {n: p.grad for n, p in adapter_parameters(model).items() if ".mlp.gate." in n}
    assert len(grads) == 2 * LAYERS and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    model.eval()
    save_adapter(model, config, tmp_path / "adapter")
    export_peft(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "peft"))
    base_model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = peft.PeftModel.from_pretrained(base_model, tmp_path / "peft")
    assert set(peft_model.peft_config["default"].target_parameters) == {"mlp.gate.weight"}
    with torch.no_grad():
        torch.testing.assert_close(peft_model.eval()(**batch).logits, model(**batch).logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match=r"DoRA cannot adapt the router 'model.layers.0.mlp.gate'"):
        inject_adapters(make_recent_model(family), LoRAConfig(use_dora=True, target_modules=("mlp.gate",)))


def test_tensor_parallel_evaluation_refuses_the_families_autotp_cannot_shard_by_name(tmp_path):
    """The others are sharded and compared with the whole model in tests/evaluation/test_tensor_parallel.py."""
    refused = []
    for family in RECENT_CONFIGS:
        config = RECENT_CONFIGS[family]()
        config.save_pretrained(tmp_path / family)
        why = family_of(config.model_type, "test").tensor_parallel
        if why is None:
            continue
        refused.append(family)
        with pytest.raises(InputError, match=rf"--tensor_parallel 2: {family} models cannot be sharded") as error:
            check_tensor_parallel(str(tmp_path / family), None, 2)
        assert why in str(error.value)
    assert refused == ["phi3", "olmo2", "olmoe"]
