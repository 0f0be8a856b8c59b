"""Adapter files: exact round trip, refusal of mismatched bases and corrupt files, PEFT and merged exports."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pytest
import torch
from adapters.test_adapters import CASES, adapted, logits, randomize_adapters
from adapters.test_lora_variants import VARIANTS, base_model, randomize_variant, variant_model
from conftest import REPO
from tiny_models import FAMILIES, make_model
from transformers import AutoModelForCausalLM, LlamaConfig

from adapters_ds import (
    InputError,
    adapter_layers,
    adapter_parameters,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from adapters_ds.adapters.storage import CONFIG_NAME, WEIGHTS_NAME
from adapters_ds.cli.export import main as export_main


def trained(family, case, dtype=torch.float32):
    model, config = adapted(family, case, dtype)
    randomize_adapters(model)
    return model, config


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_save_load_round_trip_is_exact(tmp_path, family, case):
    model, config = trained(family, case)
    save_adapter(model, config, tmp_path / "adapter")
    fresh = make_model(family)
    assert not torch.equal(logits(fresh), logits(model))
    loaded_config = load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(logits(fresh), logits(model))
    assert loaded_config.method == config.method
    assert loaded_config.target_modules  # defaults written out explicitly


def test_round_trip_bf16_bit_for_bit(tmp_path):
    model, config = trained("llama", "lora", torch.bfloat16)
    save_adapter(model, config, tmp_path / "a")
    fresh = make_model("llama", torch.bfloat16)
    load_adapter(fresh, tmp_path / "a")
    assert torch.equal(logits(fresh), logits(model))


def test_adapter_files_content(tmp_path):
    model, config = trained("llama", "lora")
    save_adapter(model, config, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    meta = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert meta["method"] == "lora" and meta["r"] == 4 and meta["alpha"] == 8
    assert meta["target_modules"] == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert meta["base_model"]["model_type"] == "llama"
    assert meta["base_model"]["architecture"] == "LlamaForCausalLM"
    assert len(meta["adapted_modules"]) == 10
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "a" / WEIGHTS_NAME)
    assert len(tensors) == 20 and all(".adapter.lora_" in k for k in tensors)  # adapter tensors only
    config2, meta2 = read_adapter_config(tmp_path / "a")
    assert config2.r == 4 and meta2["adapted_modules"] == meta["adapted_modules"]


def test_save_replaces_existing_adapter_atomically(tmp_path):
    model, config = trained("llama", "lora")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "stale.txt").write_text("old")
    save_adapter(model, config, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary folder left behind


def _other_llama(**overrides):
    config = make_model("llama").config.to_dict()
    config.update(overrides)
    return AutoModelForCausalLM.from_config(LlamaConfig.from_dict(config)).eval()


@pytest.mark.parametrize(
    "make_base,message",
    [
        (lambda: make_model("gpt2"), "trained on a 'llama' model .* this base model is 'gpt2'"),
        (lambda: _other_llama(intermediate_size=64), r"has shape \(48, 4\); this base model needs \(64, 4\)"),
        (lambda: _other_llama(num_hidden_layers=3), "adapts 10 modules, this base model has 15"),
    ],
)
def test_load_into_mismatched_base_is_refused_and_leaves_model_unchanged(tmp_path, make_base, message):
    model, config = trained("llama", "lora")
    save_adapter(model, config, tmp_path / "a")
    base = make_base()
    before = logits(base)
    with pytest.raises(InputError, match=message):
        load_adapter(base, tmp_path / "a")
    assert not list(adapter_layers(base))
    assert torch.equal(logits(base), before)


def test_corrupt_or_missing_adapter_files(tmp_path):
    model, config = trained("llama", "lora")
    save_adapter(model, config, tmp_path / "a")
    weights = tmp_path / "a" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(InputError, match="corrupt or unreadable"):
        load_adapter(make_model("llama"), tmp_path / "a")
    (tmp_path / "a" / CONFIG_NAME).write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_adapter(make_model("llama"), tmp_path / "a")
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(InputError, match="not an adapters_ds adapter"):
        load_adapter(make_model("llama"), tmp_path / "a")
    with pytest.raises(InputError, match="adapter config not found"):
        load_adapter(make_model("llama"), tmp_path / "missing")


# ---- exports through the real command line ----------------------------------------------------------------


def export(*args: str) -> subprocess.CompletedProcess:
    """The export command in this process (a subprocess costs seconds of imports; one test runs the real one)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            export_main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code
    return subprocess.CompletedProcess(args, code, "", stderr.getvalue())


def test_launcher_script_exit_codes(saved, tmp_path):
    base_dir, adapter_dir, _ = saved("llama")
    script = [sys.executable, str(REPO / "launcher" / "export.py"), "--base_model", str(base_dir)]
    ok = subprocess.run(
        [*script, "--adapter_dir", str(adapter_dir), "--output_dir", str(tmp_path / "o"), "--peft"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    bad = subprocess.run(
        [*script, "--adapter_dir", str(tmp_path / "x"), "--output_dir", str(tmp_path / "o2"), "--peft"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: adapter")


@pytest.fixture
def saved(tmp_path):
    """A tiny base model folder and a trained LoRA adapter folder, per family."""

    def make(family: str, case: str = "lora"):
        base_dir, adapter_dir = tmp_path / f"{family}-base", tmp_path / f"{family}-{case}"
        make_model(family).save_pretrained(base_dir)
        model, config = trained(family, case)
        save_adapter(model, config, adapter_dir)
        return base_dir, adapter_dir, model

    return make


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_export_gives_same_logits_in_peft(saved, tmp_path, family):
    peft = pytest.importorskip("peft")
    base_dir, adapter_dir, model = saved(family)
    out = tmp_path / "peft"
    result = export(
        "--base_model", str(base_dir), "--adapter_dir", str(adapter_dir), "--output_dir", str(out), "--peft"
    )
    assert result.returncode == 0, result.stderr
    peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).eval()
    torch.testing.assert_close(logits(peft_model), logits(model), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom"])
def test_merge_export_is_a_plain_model_with_same_logits(saved, tmp_path, family):
    base_dir, adapter_dir, model = saved(family)
    out = tmp_path / "merged"
    result = export(
        "--base_model", str(base_dir), "--adapter_dir", str(adapter_dir), "--output_dir", str(out), "--merge"
    )
    assert result.returncode == 0, result.stderr
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("adapter" in n for n in merged.state_dict())
    torch.testing.assert_close(logits(merged), logits(model), atol=1e-5, rtol=0)


def test_export_errors_are_one_line_and_destroy_nothing(saved, tmp_path):
    base_dir, adapter_dir, _ = saved("llama", "series_pfeiffer")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    cases = [
        (["--adapter_dir", str(adapter_dir), "--output_dir", str(tmp_path / "o1"), "--peft"], "holds a series adapter"),
        (["--adapter_dir", str(adapter_dir), "--output_dir", str(out), "--merge"], "is not empty; pass --overwrite"),
        (["--adapter_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o2"), "--peft"], "not found"),
        (["--adapter_dir", str(adapter_dir), "--output_dir", str(out / "keep.txt"), "--peft"], "is not a directory"),
    ]
    for args, message in cases:
        result = export("--base_model", str(base_dir), *args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr
        assert not [line for line in lines if line.startswith("Traceback")]
    missing = export(
        "--base_model",
        str(tmp_path / "no-model"),
        "--adapter_dir",
        str(adapter_dir),
        "--output_dir",
        str(tmp_path / "o3"),
        "--merge",
    )
    assert missing.returncode == 2 and "base model not found" in missing.stderr
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["llama-base", "llama-series_pfeiffer", "out"])


# ---- LoRA variants (DoRA, rsLoRA): storage and both exports -----------------------------------------------------


@pytest.fixture
def saved_variant(tmp_path):
    """A tiny base model folder and a trained LoRA-variant adapter folder (`test_lora_variants.VARIANTS`)."""

    def make(family: str, variant: str):
        base_dir, adapter_dir = tmp_path / f"{family}-base", tmp_path / f"{family}-{variant}"
        base_model(family).save_pretrained(base_dir)  # biases not zero, so their (un)scaling is checked too
        model, config = variant_model(family, variant)
        randomize_variant(model)
        save_adapter(model, config, adapter_dir)
        return base_dir, adapter_dir, model

    return make


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_save_load_round_trip_is_exact(tmp_path, family, variant):
    model, config = variant_model(family, variant)
    randomize_variant(model)
    save_adapter(model, config, tmp_path / "adapter")
    fresh = base_model(family)
    loaded_config = load_adapter(fresh, tmp_path / "adapter")
    assert loaded_config == read_adapter_config(tmp_path / "adapter")[0]
    assert (loaded_config.use_dora, loaded_config.use_rslora) == (config.use_dora, config.use_rslora)
    for name, p in adapter_parameters(model).items():
        assert torch.equal(adapter_parameters(fresh)[name], p), name
    assert torch.equal(logits(fresh), logits(model))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_peft_export_gives_same_logits_in_peft(saved_variant, tmp_path, family, variant):
    peft = pytest.importorskip("peft")
    base_dir, adapter_dir, model = saved_variant(family, variant)
    out = tmp_path / "peft"
    result = export(
        "--base_model", str(base_dir), "--adapter_dir", str(adapter_dir), "--output_dir", str(out), "--peft"
    )
    assert result.returncode == 0, result.stderr
    written = json.loads((out / CONFIG_NAME).read_text())
    assert (written["use_dora"], written["use_rslora"]) == (variant.startswith("dora"), variant.endswith("rslora"))
    from safetensors.torch import load_file

    keys = load_file(out / WEIGHTS_NAME)
    magnitudes = [k for k in keys if k.endswith(".lora_magnitude_vector")]
    assert len(magnitudes) == (len(keys) // 3 if variant.startswith("dora") else 0)
    peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).eval()
    torch.testing.assert_close(logits(peft_model), logits(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom"])
@pytest.mark.parametrize("variant", ["dora", "rslora"])
def test_variant_merge_export_is_a_plain_model_with_same_logits(saved_variant, tmp_path, family, variant):
    base_dir, adapter_dir, model = saved_variant(family, variant)
    out = tmp_path / "merged"
    result = export(
        "--base_model", str(base_dir), "--adapter_dir", str(adapter_dir), "--output_dir", str(out), "--merge"
    )
    assert result.returncode == 0, result.stderr
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("adapter" in n for n in merged.state_dict())
    torch.testing.assert_close(logits(merged), logits(model), atol=1e-5, rtol=0)
