"""A method is one module: a config and a layer that register themselves. A toy method written here, outside the
package, becomes trainable from the command line with its own option, no file of adapters_ds changed."""

from __future__ import annotations

import json

import pytest
from launch import run, write_train_assets

TOY = '''
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from adapters_ds.adapters.base import Adapter, AdapterConfig, option
from adapters_ds.adapters.registry import register


@dataclass
class ToyScaleConfig(AdapterConfig):
    """out + out * (init + delta): a learned per-feature scale of the sub-layer's output."""

    method: ClassVar[str] = "toyscale"
    target_roles = ("o", "mlp_down")

    init: float = option(0.0, "toy: initial scale offset (0: the identity)", flag="toy_init")


class ToyScale(Adapter):
    def __init__(self, config, dims, dtype, device):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dims.out_features,), config.init, dtype=dtype, device=device))

    def trainable_names(self):
        return ("scale",)

    def forward(self, x, out):
        return out * self.scale


register(ToyScaleConfig, ToyScale)
'''


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = write_train_assets(tmp_path_factory.mktemp("plugin"))
    (root / "toy_method.py").write_text(TOY)
    return root


@pytest.mark.slow
def test_a_method_module_outside_the_package_trains_from_the_command_line(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(assets))
    monkeypatch.setenv("ADAPTERS_DS_METHODS", "toy_method")
    out = tmp_path / "run"
    result = run(
        ["--ds_config", str(assets / "zero3_fp32.json"), "--base_model", str(assets / "base"),
         "--data_path", str(assets / "data.json"), "--output_dir", str(out), "--adapter", "toyscale",
         "--toy_init", "0.01", "--max_steps", "4", "--micro_batch_size", "4", "--batch_size", "8",
         "--learning_rate", "1e-2", "--logging_steps", "1"],
        launcher="deepspeed",
        nproc=2,
    )  # fmt: skip
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["method"] == "toyscale" and config["init"] == 0.01
    assert config["target_modules"] == ["o_proj", "down_proj"]  # its roles, in the LLaMA family's names
    assert json.loads((out / "train_args.json").read_text())["args"]["toy_init"] == 0.01
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    # the adapter is replicated under ZeRO-3 like any method's
    reports = json.loads((out / "zero3_partition.json").read_text())
    assert all(r["adapter_local_numel"] == r["adapter_numel"] > 0 for r in reports), reports
    assert "toyscale" in result.stdout + result.stderr
