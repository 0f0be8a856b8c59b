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
from tiny_models import _LLAMA_LIKE, CONFIGS, KV, LAYERS, RECENT_CONFIGS, make_model, make_recent_model, sample_batch
from transformers import AutoConfig, AutoModelForCausalLM

from adapters_ds import GatesConfig, InputError, LoRAConfig, ParallelConfig, SeriesConfig
from adapters_ds.adapters.inject import inject_adapters, resolve_targets
from adapters_ds.adapters.prefix import PrefixConfig
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


@pytest.mark.slow
@pytest.mark.parametrize("family", list(RECENT_CONFIGS))
def test_lora_with_default_targets_trains_on_two_ranks_and_exports_to_peft(trained, family, tmp_path):
    root, losses = trained
    assert len(losses[family]) == 4 and losses[family][-1] < losses[family][0], losses[family]
    base_dir, adapter_dir = root / family, root / "adapters" / family
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    load_adapter(model, adapter_dir)
    config, _ = read_adapter_config(adapter_dir)
    assert config.target_modules == LoRAConfig().default_targets(model.config.model_type)
    assert any(t.abs().sum() > 0 for n, t in read_adapter_tensors(adapter_dir).items() if "lora_B" in n)
    export_peft(str(base_dir), str(adapter_dir), str(tmp_path / "peft"))
    peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "peft")
    batch = sample_batch()
    with torch.no_grad():
        torch.testing.assert_close(peft_model.eval()(**batch).logits, model(**batch).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_moe_rank_whose_tokens_skip_experts_neither_hangs_nor_changes_the_losses(trained):
    """Rank 0 routes no token to experts 2 and 3, rank 1 does: the 2-rank ZeRO-3 run finishes and its losses are
    those of one process training on both batches (fp32)."""
    _, losses = trained
    assert losses["moe_forced"][-1] < losses["moe_forced"][0]
    torch.testing.assert_close(losses["moe_forced"], losses["moe_forced_one_process"], rtol=1e-5, atol=1e-6)
