"""`export --peft` of prefix, prompt and ptuning adapters: Hugging Face PEFT loads the export
(`PeftModel.from_pretrained(base, out)`) and gives our model's logits (fp32, atol 1e-5) on every family, with left
padding; the files hold exactly PEFT's one tensor; bad input is a one-line error that writes nothing."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings

import pytest
import torch
from adapters.test_prompt_methods import CASES, GRID, N, adapted, padded_batch
from safetensors.torch import load_file
from tiny_models import HEADS, KV_HEADS, LAYERS, H, make_model
from transformers import AutoModelForCausalLM, LlamaConfig

from adapters_ds import adapter_layers, inject_adapters, save_adapter
from adapters_ds.adapters.storage import CONFIG_NAME, WEIGHTS_NAME
from adapters_ds.cli.export import main as export_main

peft = pytest.importorskip("peft")

PEFT_TYPES = {"prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING", "ptuning": "P_TUNING"}


@pytest.fixture
def exported(tmp_path):
    """(our model, the PEFT export folder, the base folder) of an adapter trained on `family`."""

    def make(family: str, case: str):
        model, config = adapted(family, case)
        with torch.no_grad():  # as trained: no tensor at its start (P-tuning's residual encoder adds nothing there)
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param), alpha=0.05)
        make_model(family).save_pretrained(tmp_path / "base")
        save_adapter(model, config, tmp_path / "adapter")
        out = tmp_path / "peft"
        export_main(["--base_model", str(tmp_path / "base"), "--adapter_dir", str(tmp_path / "adapter"),
                     "--output_dir", str(out), "--peft"])  # fmt: skip
        return model, out, tmp_path / "base"

    return make


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_in_peft(out, family: str):
    """PEFT's model from our export, and the warnings it gave while loading the adapter."""
    base = make_model(family)
    handler = _Records()
    logging.getLogger("peft").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = peft.PeftModel.from_pretrained(base, str(out))
    finally:
        logging.getLogger("peft").removeHandler(handler)
    found = [str(w.message) for w in caught if "peft" in (w.filename or "")] + handler.messages
    return model.eval(), found


@pytest.mark.parametrize("family,case", GRID)
def test_peft_loads_the_export_and_gives_our_logits(exported, family, case):
    model, out, _ = exported(family, case)
    reference, peft_warnings = load_in_peft(out, family)
    assert peft_warnings == []
    batch = padded_batch()
    with torch.no_grad():
        ours, theirs = model(**batch).logits, reference(**batch).logits
    assert ours.shape == theirs.shape  # prompt methods: both cover the virtual positions too
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("case", ["prefix", "prefix_projection"])
def test_prefix_matches_peft_on_eager_attention_too(tmp_path, family, case):
    """Eager attention on both sides: PEFT's through the model's own eager code and its cache, ours switched to the
    prefix-aware sdpa; the kernels differ, the logits agree to rounding."""
    model = make_model(family)
    model.set_attn_implementation("eager")
    config = CASES[case]()
    inject_adapters(model, config)
    make_model(family).save_pretrained(tmp_path / "base")
    save_adapter(model, config, tmp_path / "adapter")
    export_main(["--base_model", str(tmp_path / "base"), "--adapter_dir", str(tmp_path / "adapter"),
                 "--output_dir", str(tmp_path / "peft"), "--peft"])  # fmt: skip
    base = make_model(family)
    base.set_attn_implementation("eager")
    reference = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    batch = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_export_files_hold_peft_config_and_one_tensor(exported, case):
    model, out, base = exported("llama", case)
    config = json.loads((out / CONFIG_NAME).read_text())
    method = case.split("_")[0]
    assert config["peft_type"] == PEFT_TYPES[method] and config["task_type"] == "CAUSAL_LM"
    assert config["num_virtual_tokens"] == N and config["base_model_name_or_path"] == str(base)
    assert config.get("prefix_projection", False) is False  # a projection is folded into the tensor
    tensors = load_file(str(out / WEIGHTS_NAME))
    width = LAYERS * 2 * KV_HEADS * (H // HEADS) if method == "prefix" else H
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"prompt_embeddings": (N, width)}
    assert tensors["prompt_embeddings"].dtype == torch.float32


def test_peft_export_of_a_bf16_adapter_is_computed_in_fp32(exported, tmp_path):
    """A bf16 adapter's encoder runs in fp32 for the export: the tensor is the fp32 model's, not a bf16 rounding."""
    model, config = adapted("llama", "ptuning_mlp", torch.bfloat16)
    ((_, _, adapter),) = adapter_layers(model)
    with torch.no_grad():  # as trained: the residual encoder's last layer no longer zero
        adapter.mlp[-1].weight.normal_(0, 0.1)
    make_model("llama").save_pretrained(tmp_path / "b16base")
    save_adapter(model, config, tmp_path / "b16")
    export_main(["--base_model", str(tmp_path / "b16base"), "--adapter_dir", str(tmp_path / "b16"),
                 "--output_dir", str(tmp_path / "b16peft"), "--peft"])  # fmt: skip
    exported_tensor = load_file(str(tmp_path / "b16peft" / WEIGHTS_NAME))["prompt_embeddings"]
    with torch.no_grad():
        in_bf16 = adapter().float()
        in_fp32 = adapter.float()()  # the same weights, upcast before the encoder runs
    assert torch.equal(exported_tensor, in_fp32) and not torch.equal(in_fp32, in_bf16)


def run_export(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        export_main(argv)
    return exit_info.value.code, err.getvalue()


def test_export_onto_another_family_is_a_one_line_error_and_writes_nothing(exported, tmp_path):
    _, _, base = exported("llama", "prefix")
    make_model("gpt2").save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "never"
    code, err = run_export(["--base_model", str(tmp_path / "gpt2"), "--adapter_dir", str(tmp_path / "adapter"),
                            "--output_dir", str(out), "--peft"])  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "was trained on a 'llama' model" in err
    assert not out.exists()


def test_export_onto_a_base_of_other_shape_is_a_one_line_error(exported, tmp_path):
    exported("llama", "prompt")
    wider = LlamaConfig(**{**make_model("llama").config.to_dict(), "hidden_size": 64, "head_dim": None})
    AutoModelForCausalLM.from_config(wider).save_pretrained(tmp_path / "wide")
    code, err = run_export(["--base_model", str(tmp_path / "wide"), "--adapter_dir", str(tmp_path / "adapter"),
                            "--output_dir", str(tmp_path / "never"), "--peft"])  # fmt: skip
    assert code == 2 and "do not fit" in err and not (tmp_path / "never").exists()


def test_merge_export_of_a_prompt_adapter_is_refused(exported, tmp_path):
    exported("llama", "prompt")
    code, err = run_export(["--base_model", str(tmp_path / "base"), "--adapter_dir", str(tmp_path / "adapter"),
                            "--output_dir", str(tmp_path / "merged"), "--merge"])  # fmt: skip
    assert code == 2 and "prompt adapter" in err and not (tmp_path / "merged").exists()
