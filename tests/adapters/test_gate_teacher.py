"""The unit gates' dense fine-tuned teacher (`--gate_teacher`, `adapters/gate_teacher.py`): in teacher mode the gated
model computes the base with the teacher's LoRA exactly (whatever the gates' own LoRA and closed units hold), the
distillation term is the KL to that model, the teacher's tensors are neither trainable nor saved, a teacher that does
not fit is refused by name, and a real training run distills from it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import CONFIGS, FAMILIES, make_model, sample_batch
from transformers import AutoModelForCausalLM

from adapters.test_gate_units import R, labelled, layers_by_name, unit_gated
from adapters_ds import InputError, adapter_parameters, config_from_dict, inject_adapters, load_adapter
from adapters_ds.adapters import gate_schedule as schedule
from adapters_ds.adapters.gate_teacher import teaching
from adapters_ds.adapters.gates import GatesConfig, GatesStrategy
from adapters_ds.adapters.inject import count_parameters
from adapters_ds.adapters.lora import LoRAConfig
from adapters_ds.adapters.series import SeriesConfig
from adapters_ds.adapters.storage import WEIGHTS_NAME, save_adapter
from adapters_ds.training.args import adapter_config, parse_train_args
from adapters_ds.training.loss import forward_targets


def save_teacher(path, family: str = "llama", model=None, **lora) -> None:
    """A LoRA adapter of the tiny `family` model with a non-zero B (as after training), saved to `path`."""
    model = make_model(family) if model is None else model
    config = LoRAConfig(**{"r": 4, "alpha": 8.0, **lora})
    inject_adapters(model, config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in adapter_parameters(model).items():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    save_adapter(model, config, path)


def scramble(model, seed: int = 4) -> None:
    """The gates' own LoRA far from zero and every other unit closed: what the teacher must not see."""
    gen = torch.Generator().manual_seed(seed)
    for adapter in layers_by_name(model).values():
        with torch.no_grad():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=gen))
        if adapter.theta_cols is not None:
            adapter.close(torch.arange(adapter.theta_cols.numel()) % 2 == 0)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# ------------------------------------------------------------------------------------------------ teacher mode


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_mode_is_the_base_with_the_teacher_lora(family, tmp_path):
    # rsLoRA on one family: s = alpha / sqrt(r); no LoRA dropout, so the training-mode forwards can be compared too
    save_teacher(tmp_path / "teacher", family, dropout=0.0, use_rslora=family == "gpt2")
    reference = make_model(family)
    load_adapter(reference, tmp_path / "teacher")
    batch = sample_batch(batch=3, seq=10)
    model, strategy = unit_gated(family, lora_r=R, distill=1.0, teacher=str(tmp_path / "teacher"))
    scramble(model)
    student = logits(model.eval(), batch)
    assert (student - logits(reference.eval(), batch)).abs().max() > 1e-2  # the student is another model
    for mode in (True, False):  # the teacher runs inside training forwards (the base's own dropout: same draws)
        torch.manual_seed(0)
        expected = logits(reference.train(mode), batch)
        torch.manual_seed(0)
        with teaching(strategy.teachable(model).values()):
            torch.testing.assert_close(logits(model.train(mode), batch), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model.eval(), batch), student, atol=0, rtol=0)  # the mode ends with the block


def test_teacher_mode_of_a_bf16_base_is_the_bf16_base_with_the_teacher_lora(tmp_path):
    """The teacher's pair takes the dtype `load_adapter` gives a LoRA (the base's): equal logits, bit for bit."""
    save_teacher(tmp_path / "teacher")  # saved in fp32
    reference = make_model("llama", torch.bfloat16)
    load_adapter(reference, tmp_path / "teacher")
    batch = sample_batch(batch=3, seq=10)
    model, strategy = unit_gated("llama", torch.bfloat16, lora_r=R, distill=1.0, teacher=str(tmp_path / "teacher"))
    scramble(model)
    assert {a.teacher_A.dtype for a in layers_by_name(model).values() if a.teacher_A is not None} == {torch.bfloat16}
    with teaching(strategy.teachable(model).values()):
        assert torch.equal(logits(model.eval(), batch), logits(reference.eval(), batch))


def test_distillation_is_the_kl_to_the_teacher_from_the_first_step(tmp_path):
    """Unlike the self-teacher, the fine-tuned one differs from the student before any unit closes."""
    save_teacher(tmp_path / "teacher")
    reference = make_model("llama")
    load_adapter(reference, tmp_path / "teacher")
    model, strategy = unit_gated("llama", lora_r=R, distill=0.5, teacher=str(tmp_path / "teacher"))
    batch = labelled(sample_batch(batch=3, seq=10))
    teacher = forward_targets(reference.eval(), batch).logits
    for closed in (False, True):
        if closed:
            scramble(model)
        forward = forward_targets(model.train(), batch)
        distill = strategy.batch_loss(model, forward.inputs, forward.keep, forward.logits, 0)["gates/distill"]
        assert distill.item() > 0
        torch.testing.assert_close(distill, 0.5 * schedule.kl_sum(forward.logits, teacher), rtol=1e-5, atol=1e-6)
    distill.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora" in n)


def test_the_teacher_is_frozen_replicated_and_not_saved(tmp_path):
    save_teacher(tmp_path / "teacher", target_modules=("q_proj", "down_proj"))
    plain, _ = unit_gated("llama", lora_r=R)
    model, strategy = unit_gated("llama", lora_r=R, distill=1.0, teacher=str(tmp_path / "teacher"))
    held = {name: a for name, a in layers_by_name(model).items() if a.teacher_A is not None}
    assert sorted(held) == sorted(
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")
    )
    assert all(not a.teacher_A.requires_grad and not a.teacher_B.requires_grad for a in held.values())
    assert count_parameters(model) == count_parameters(plain)  # nothing trainable, nothing partitioned by ZeRO-3
    assert set(adapter_parameters(model)) == set(adapter_parameters(plain))
    assert not any("teacher" in key for key in model.state_dict())
    save_adapter(model, strategy.config, tmp_path / "gates")
    assert not any("teacher" in key for key in load_file(tmp_path / "gates" / WEIGHTS_NAME))
    assert set(load_file(tmp_path / "gates" / WEIGHTS_NAME)) == set(adapter_parameters(plain))


# ------------------------------------------------------------------------------------------------ warm start


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_warm_started_student_is_the_teacher_until_units_close(family, tmp_path):
    """With every gate open the warm-started student computes the LoRA model (gates' rank 2·r_t, their own alpha, so
    the copied B is rescaled; rsLoRA on gpt2); its other ranks add nothing yet but still learn; layers the teacher
    does not adapt keep B zero; closing units then changes the model."""
    targets = {"llama": ("q_proj", "down_proj"), "gpt2": ("c_attn", "c_proj")}[family]
    save_teacher(tmp_path / "teacher", family, dropout=0.0, target_modules=targets, use_rslora=family == "gpt2")
    reference = make_model(family)
    load_adapter(reference, tmp_path / "teacher")
    batch = labelled(sample_batch(batch=3, seq=10))
    model, strategy = unit_gated(family, lora_r=8, lora_alpha=3.0, warm_start=True, teacher=str(tmp_path / "teacher"))
    torch.testing.assert_close(logits(model.eval(), batch), logits(reference.eval(), batch), atol=1e-5, rtol=1e-5)
    held = {name: a for name, a in layers_by_name(model).items() if a.teacher_A is not None}
    assert held and all(a.lora_B[:, 4:].abs().sum() == 0 and a.lora_B[:, :4].abs().sum() > 0 for a in held.values())
    assert all(a.lora_B.abs().sum() == 0 for n, a in layers_by_name(model).items() if n not in held)
    forward = forward_targets(model.train(), batch)
    torch.nn.functional.cross_entropy(forward.logits, forward.targets).backward()
    assert all(a.lora_B.grad[:, 4:].abs().sum() > 0 for a in held.values())  # the extra ranks learn
    scramble(model)
    assert (logits(model.eval(), batch) - logits(reference.eval(), batch)).abs().max() > 1e-2


def test_a_warm_start_from_a_wider_teacher_is_refused_by_name(tmp_path):
    save_teacher(tmp_path / "teacher", r=8, alpha=16.0)
    with pytest.raises(InputError, match=r"teacher's LoRA has rank 8, the LoRA inside the gates 4; give --gate_lora_r"):
        unit_gated("llama", lora_r=4, warm_start=True, teacher=str(tmp_path / "teacher"))


# ------------------------------------------------------------------------------------------------ refusals


def test_a_teacher_that_does_not_fit_is_refused_by_name(tmp_path):
    series = make_model("llama")
    inject_adapters(series, SeriesConfig(bottleneck_size=4))
    save_adapter(series, SeriesConfig(bottleneck_size=4), tmp_path / "series")
    save_teacher(tmp_path / "dora", use_dora=True)
    save_teacher(tmp_path / "gpt2", "gpt2")
    save_teacher(tmp_path / "lm_head", target_modules=("q_proj", "lm_head"))
    wide = CONFIGS["llama"]()
    wide.intermediate_size = 64
    save_teacher(tmp_path / "wide", model=AutoModelForCausalLM.from_config(wide))
    save_teacher(tmp_path / "default")
    cases = [
        ("series", {}, r"is a 'series' adapter; the teacher must be a LoRA adapter \(--adapter lora\)"),
        ("dora", {}, "is a DoRA adapter; the teacher must be a plain LoRA adapter"),
        ("gpt2", {}, "was trained on a 'gpt2' model"),
        ("lm_head", {}, r"adapts 1 module\(s\) the gates do not \(e.g. \['lm_head'\]\)"),
        ("default", {"target_modules": ("o_proj", "down_proj")}, r"adapts 8 module\(s\) the gates do not"),
        ("wide", {}, r"tensor 'model.layers.0.mlp.up_proj.adapter.lora_B' has shape \(64, 4\); .* needs \(48, 4\)"),
        ("missing", {}, "adapter config not found"),
    ]
    for name, extra, message in cases:
        config = GatesConfig(lora_r=R, distill=1.0, teacher=str(tmp_path / name), **extra)
        model = make_model("llama")
        inject_adapters(model, config)
        with pytest.raises(InputError, match=f"--gate_teacher '{tmp_path / name}'.*{message}"):
            GatesStrategy(config).prepare(model)
        assert all(a.teacher_A is None for a in layers_by_name(model).values())  # nothing changed


def test_the_option_belongs_to_unit_gates():
    argv = ["--ds_config", "x.json", "--adapter", "gates", "--gate_distill", "0.5", "--gate_teacher", "runs/lora"]
    assert adapter_config(parse_train_args(argv)) == GatesConfig(distill=0.5, teacher="runs/lora")
    assert adapter_config(parse_train_args(["--ds_config", "x.json", "--adapter", "gates"])).teacher is None
    for adapter in ("lora", "gates_paper"):
        with pytest.raises(InputError, match=f"--gate_teacher does not apply to --adapter {adapter}"):
            parse_train_args(["--ds_config", "x.json", "--adapter", adapter, "--gate_teacher", "runs/lora"])


def test_a_teacher_without_a_distillation_weight_or_warm_start_is_an_error():
    with pytest.raises(InputError, match=r"used by distillation \(give its weight, distill \(--gate_distill\) > 0"):
        config_from_dict({"method": "gates", "teacher": "runs/lora/adapter"})
    assert GatesConfig(teacher="runs/lora", warm_start=True).distill == 0  # the warm start alone uses the teacher
    with pytest.raises(InputError, match=r"--gate_warm_start\) starts from --gate_teacher's LoRA: give one"):
        GatesConfig(warm_start=True)
    with pytest.raises(InputError, match=r"needs the LoRA inside the gates \(--gate_lora_r > 0\)"):
        GatesConfig(warm_start=True, teacher="runs/lora", lora_r=0)
    config = GatesConfig(distill=1.0, teacher="runs/lora/adapter")
    assert config_from_dict(config.to_dict()) == config  # a saved gates adapter loads without its teacher's folder


# ------------------------------------------------------------------------------------------------ a real run


@pytest.mark.slow
def test_a_training_run_distills_from_the_teacher_and_saves_no_teacher_tensor(tmp_path):
    """One process, ZeRO-3 (fp32): gates/distill is logged and non-zero while units are closed, the adapter holds
    the gates' tensors only; a teacher that is no LoRA adapter ends the command with a one-line error, exit 2."""
    from launch import run, write_train_assets
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assets = write_train_assets(tmp_path / "assets")
    save_teacher(tmp_path / "teacher", model=AutoModelForCausalLM.from_pretrained(assets / "base"))
    out = tmp_path / "run"

    def args(output, teacher):
        return ["--ds_config", str(assets / "zero3_fp32.json"), "--base_model", str(assets / "base"),
                "--data_path", str(assets / "data.json"), "--output_dir", str(output), "--adapter", "gates",
                "--gate_lora_r", "4", "--gate_distill", "1", "--gate_teacher", str(teacher), "--max_steps", "6",
                "--logging_steps", "1", "--micro_batch_size", "4", "--batch_size", "4", "--cutoff_len", "48",
                "--save_steps", "0"]  # fmt: skip

    run(args(out, tmp_path / "teacher"), launcher="python", nproc=1)
    events = EventAccumulator(str(out / "tensorboard" / "train"))
    events.Reload()
    removed = {e.step: e.value for e in events.Scalars("gates/removed")}
    distill = {e.step: e.value for e in events.Scalars("gates/distill")}
    closed = [step for step, share in removed.items() if share > 0]
    assert closed and all(distill[step] > 0 for step in closed), (removed, distill)
    saved = load_file(out / "adapter" / WEIGHTS_NAME)
    plain = make_model("llama")
    inject_adapters(plain, GatesConfig(lora_r=4))
    assert set(saved) == set(adapter_parameters(plain)) and not any("teacher" in key for key in saved)
    saved_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved_config["teacher"] == str(tmp_path / "teacher") and saved_config["distill"] == 1.0

    refused = run(args(tmp_path / "refused", out / "adapter"), launcher="python", nproc=1, check=False)
    assert refused.returncode == 2, refused.stderr[-2000:]
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --gate_teacher ") and "is a 'gates' adapter; the teacher must be a LoRA" in last
    assert not (tmp_path / "refused").exists()  # refused before the run folder is written
