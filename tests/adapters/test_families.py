"""One family table serves every method: default targets come from roles, match exactly the modules playing them,
and a family without a layout is a clear error naming the method."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import peft
import pytest
import torch
from launch import REPO, command, env
from tiny_models import (
    _LLAMA_LIKE,
    _MOE,
    CONFIGS,
    EXPERTS,
    KV,
    LAYERS,
    RECENT_CONFIGS,
    make_model,
    make_recent_model,
    sample_batch,
)
from transformers import AutoConfig, AutoModelForCausalLM

from adapters_ds import GatesConfig, InputError, LoRAConfig, ParallelConfig, SeriesConfig
from adapters_ds.adapters.base import adapter_parameters
from adapters_ds.adapters.inject import freeze_base, inject_adapters, resolve_targets
from adapters_ds.adapters.prefix import PrefixConfig
from adapters_ds.adapters.prompt import PromptConfig
from adapters_ds.adapters.ptuning import PTuningConfig
from adapters_ds.adapters.storage import load_adapter, read_adapter_config, read_adapter_tensors
from adapters_ds.export.peft import export_peft
from adapters_ds.families import ROLES, families, layout_of, role_paths

CASES = {
    "lora": (LoRAConfig(), ("q", "k", "v", "mlp_up", "mlp_down")),
    "series-pfeiffer": (SeriesConfig(), ("mlp_down",)),
    "series-houlsby": (SeriesConfig(preset="houlsby"), ("o", "mlp_down")),
    "parallel": (ParallelConfig(), ("mlp_up", "mlp_down")),
    "gates": (GatesConfig(), ROLES),
}


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("case", CASES)
def test_default_targets_match_exactly_the_modules_of_their_roles(family, case):
    config, roles = CASES[case]
    model = make_model(family)
    layout = layout_of(model.config.model_type)
    blocks = model.get_submodule(layout.blocks)
    expected = {
        f"{layout.blocks}.{i}.{path}" for i in range(len(blocks)) for r in roles for path in role_paths(layout, r)
    }
    assert set(resolve_targets(model, config)) == expected


_QKV_UP_DOWN = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
RECENT_DEFAULTS = {  # (lora, series pfeiffer, series houlsby, parallel), written from the architectures
    **{f: (_QKV_UP_DOWN, ("down_proj",), ("o_proj", "down_proj"), ("up_proj", "down_proj"))
       for f in ("llama3", "qwen3", "gemma2", "gemma3_text", "olmo2", "granite")},
    # fused [Q | K | V] and [gate | up]: LoRA on the fused matrices, Parallel on the fused up (it adds to its up half)
    "phi3": (("qkv_proj", "gate_up_proj", "down_proj"), ("down_proj",), ("o_proj", "down_proj"),
             ("gate_up_proj", "down_proj")),
    # the MLP is the experts module (both fused 3-D parameters); bottlenecks have no linear MLP layer to sit on
    **{f: (("q_proj", "k_proj", "v_proj", "experts"), None, None, None) for f in ("mixtral", "qwen3_moe", "olmoe")},
}  # fmt: skip


@pytest.mark.parametrize("family", list(RECENT_CONFIGS))
def test_recent_families_default_targets_map_the_reference_recipe_to_their_layouts(family):
    model = make_recent_model(family)
    model_type = model.config.model_type
    configs = (LoRAConfig(), SeriesConfig(), SeriesConfig(preset="houlsby"), ParallelConfig())
    for config, expected in zip(configs, RECENT_DEFAULTS[family], strict=True):
        if expected is None:
            with pytest.raises(InputError, match=rf"cannot adapt the MLP of {model_type} models: .*mixture of experts"):
                config.default_targets(model_type)
            continue
        assert config.default_targets(model_type) == expected
        blocks = len(model.model.layers)
        assert len(resolve_targets(model, config)) == blocks * len(expected)  # one module per name and block


def test_every_tested_family_has_a_layout():
    assert {make_model(f).config.model_type for f in CONFIGS} <= set(families())


def test_a_family_without_a_layout_is_an_error_naming_the_method():
    with pytest.raises(InputError, match=r"adapter method 'series' has no default target modules for model type 't5'"):
        SeriesConfig().default_targets("t5")


# ------------------------------------------------------------------ a family of one's own, and every family on 2 ranks

TOY_FAMILY = """
from adapters_ds.families import Family, Layout, register_family

# StarCoder2: LLaMA-like attention, a two-layer MLP named c_fc / c_proj (no gate), biases everywhere.
register_family(
    Family(
        "starcoder2",
        Layout(
            blocks="model.layers",
            attention="self_attn",
            q="self_attn.q_proj",
            k="self_attn.k_proj",
            v="self_attn.v_proj",
            o="self_attn.o_proj",
            mlp_in=("mlp.c_fc",),
            mlp_out="mlp.c_proj",
            gqa=True,
        ),
    )
)
"""


LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def _toy_model():
    config = AutoConfig.for_model("starcoder2", **_LLAMA_LIKE)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _unrecorded_moe():
    """Qwen2-MoE, which has no record here: fused experts beside a shared expert."""
    config = AutoConfig.for_model("qwen2_moe", **{**_LLAMA_LIKE, **_MOE}, num_experts=EXPERTS,
                                  shared_expert_intermediate_size=16)  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(
    ("build", "config", "adapted"),
    [
        (_toy_model, LoRAConfig(target_modules=("q_proj", "c_fc")), ("self_attn.q_proj", "mlp.c_fc")),
        (_toy_model, SeriesConfig(target_modules=("o_proj", "c_proj")), ("self_attn.o_proj", "mlp.c_proj")),
        (_toy_model, ParallelConfig(target_modules=("c_fc",)), ("mlp.c_fc",)),
        (
            _unrecorded_moe,
            LoRAConfig(target_modules=("q_proj", "experts.down_proj")),
            ("self_attn.q_proj", "mlp.experts"),
        ),
        (_unrecorded_moe, SeriesConfig(target_modules=("shared_expert.down_proj",)), ("mlp.shared_expert.down_proj",)),
    ],
)
def test_a_family_without_a_record_trains_lora_series_and_parallel_on_named_targets(build, config, adapted):
    model = build()
    assert model.config.model_type not in families()
    assert set(inject_adapters(model, config)) == {f"model.layers.{i}.{a}" for i in range(LAYERS) for a in adapted}
    freeze_base(model)
    batch = sample_batch()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None for p in adapter_parameters(model).values())


@pytest.mark.parametrize("config", [PromptConfig(num_virtual_tokens=3), PTuningConfig(num_virtual_tokens=3)])
def test_a_family_without_a_record_trains_prompt_methods_as_they_are(config):
    model = _toy_model()
    assert inject_adapters(model, config) == [""]  # the model itself: its input embeddings
    freeze_base(model)
    batch = sample_batch()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None for p in adapter_parameters(model).values())


@pytest.mark.parametrize("build", [_toy_model, _unrecorded_moe])
@pytest.mark.parametrize(
    ("config", "needed_for"),
    [
        (LoRAConfig(), "adapter method 'lora' has no default target modules"),
        (GatesConfig(), "adapter method 'gates' has no default target modules"),
        (GatesConfig(target_modules=("q_proj",)), "gates and pruning needs a known model family"),
        (PrefixConfig(num_virtual_tokens=3), "prefix tuning needs a known model family"),
    ],
)
def test_a_family_without_a_record_says_how_to_go_on(build, config, needed_for):
    with pytest.raises(InputError) as caught:
        inject_adapters(build(), config)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(needed_for) and "has no record" in message
    assert "--target_modules" in message and "register_family" in message


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 2-rank ZeRO-3 launch for every case: the toy family's LoRA and prefix (its record registered by a plugin
    module, nowhere else) and LoRA with default targets on every built-in family."""
    root = tmp_path_factory.mktemp("families")
    (root / "toy_family.py").write_text(TOY_FAMILY)
    _toy_model().save_pretrained(root / "starcoder2")
    cases = {
        "toy_lora": {"base": str(root / "starcoder2"), "method": "lora", "options": {"r": 4, "alpha": 8}},
        "toy_prefix": {"base": str(root / "starcoder2"), "method": "prefix", "options": {"num_virtual_tokens": 3}},
    }
    for family in RECENT_CONFIGS:
        make_recent_model(family).save_pretrained(root / family)
        cases[family] = {"base": str(root / family), "method": "lora", "options": LORA}
    router = {**LORA, "target_modules": ["q_proj", "experts", "mlp.gate"]}  # experts and the router adapted
    cases["mixtral_router"] = {"base": str(root / "mixtral"), "method": "lora", "options": router}
    forced = {"base": str(root / "mixtral"), "method": "lora", "options": LORA, "force_router": True}
    cases["moe_forced"] = forced
    results = {}
    for nproc, batch in ((2, cases), (1, {"moe_forced_one_process": {**forced, "ranks": 2}})):
        (root / "cases.json").write_text(json.dumps(batch))
        worker = str(Path(__file__).parent / "family_worker.py")
        variables = {**env(), "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
                     "ADAPTERS_DS_METHODS": "toy_family"}  # fmt: skip
        result = subprocess.run([*command("deepspeed", nproc, worker), str(root / "cases.json"), str(root)],
                                env=variables, capture_output=True, text=True, timeout=900, cwd=REPO)  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
        results.update(json.loads((root / "results.json").read_text()))
    return root, results


@pytest.mark.slow
def test_a_family_registered_in_one_place_trains_lora_and_prefix(trained):
    root, losses = trained
    for case in ("toy_lora", "toy_prefix"):
        assert len(losses[case]) == 4 and losses[case][-1] < losses[case][0], (case, losses[case])
    lora, _ = read_adapter_config(root / "adapters" / "toy_lora")
    assert lora.target_modules == ("q_proj", "k_proj", "v_proj", "c_fc", "c_proj")  # the record's roles
    prefix = read_adapter_tensors(root / "adapters" / "toy_prefix")
    assert sorted(prefix) == [f"adapter.prefix_{layer}" for layer in range(LAYERS)]
    assert all(t.shape == (3, 2 * KV) and t.abs().sum() > 0 for t in prefix.values())
    # without the record: LoRA with named modules works, the defaults and prefix say how to go on
    model = _toy_model()
    assert len(inject_adapters(model, LoRAConfig(target_modules=("q_proj", "c_fc")))) == 2 * LAYERS
    with pytest.raises(InputError, match=r"no default target modules for model type 'starcoder2'.*--target_modules"):
        inject_adapters(_toy_model(), LoRAConfig())
    with pytest.raises(InputError, match=r"prefix tuning needs a known model family; 'starcoder2' has no record"):
        inject_adapters(_toy_model(), PrefixConfig(num_virtual_tokens=3))


def _trained_and_exported_with_equal_logits(root: Path, case: str, family: str, out: Path) -> LoRAConfig:
    """The case's adapter moved away from zero, and its PEFT export gives the logits of the adapter loaded here."""
    base_dir, adapter_dir = root / family, root / "adapters" / case
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    load_adapter(model, adapter_dir)
    assert any(t.abs().sum() > 0 for n, t in read_adapter_tensors(adapter_dir).items() if "lora_B" in n)
    export_peft(str(base_dir), str(adapter_dir), str(out))
    peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out)
    batch = sample_batch()
    with torch.no_grad():
        torch.testing.assert_close(peft_model.eval()(**batch).logits, model(**batch).logits, rtol=1e-4, atol=1e-5)
    return read_adapter_config(adapter_dir)[0]


@pytest.mark.slow
@pytest.mark.parametrize("family", list(RECENT_CONFIGS))
def test_lora_with_default_targets_trains_on_two_ranks_and_exports_to_peft(trained, family, tmp_path):
    root, losses = trained
    assert len(losses[family]) == 4 and losses[family][-1] < losses[family][0], losses[family]
    config = _trained_and_exported_with_equal_logits(root, family, family, tmp_path / "peft")
    model_type = RECENT_CONFIGS[family]().model_type
    assert config.target_modules == LoRAConfig().default_targets(model_type)


@pytest.mark.slow
def test_lora_on_experts_and_router_trains_on_two_ranks_and_exports_to_peft(trained, tmp_path):
    root, losses = trained
    assert losses["mixtral_router"][-1] < losses["mixtral_router"][0], losses["mixtral_router"]
    tensors = read_adapter_tensors(root / "adapters" / "mixtral_router")
    assert all(tensors[f"model.layers.{i}.mlp.gate.adapter.lora_B"].abs().sum() > 0 for i in range(LAYERS))
    _trained_and_exported_with_equal_logits(root, "mixtral_router", "mixtral", tmp_path / "peft")


@pytest.mark.slow
def test_moe_rank_whose_tokens_skip_experts_neither_hangs_nor_changes_the_losses(trained):
    """Rank 0 routes no token to experts 2 and 3, rank 1 does: the 2-rank ZeRO-3 run finishes and its losses are
    those of one process training on both batches (fp32)."""
    _, losses = trained
    routed = losses["moe_forced_tokens_per_expert"]  # per rank, tokens per expert over the whole run
    assert routed[0][2:] == [0, 0] and min(routed[0][:2]) > 0 and min(routed[1]) > 0, routed
    assert losses["moe_forced"][-1] < losses["moe_forced"][0]
    torch.testing.assert_close(losses["moe_forced"], losses["moe_forced_one_process"], rtol=1e-5, atol=1e-6)
