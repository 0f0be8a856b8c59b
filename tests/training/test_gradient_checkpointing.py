"""Gradient checkpointing under ZeRO-3 (2 ranks, gloo), with and without parameter offload, for every registered
method: per-step losses and the final adapter equal those of the same run without it (the combination breaks in
other tools when a frozen embedding gives checkpointed blocks no input that requires grad)."""

from __future__ import annotations

import json

import pytest
from launch import command, env, write_train_assets

from adapters_ds.adapters.registry import METHODS

pytestmark = pytest.mark.slow

DRIVER = __file__.replace("test_gradient_checkpointing.py", "gc_driver.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import subprocess

    assets = write_train_assets(tmp_path_factory.mktemp("gc"))
    offload = json.loads((assets / "zero3_fp32.json").read_text())
    offload["zero_optimization"]["offload_param"] = {"device": "cpu"}
    offload["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    (assets / "zero3_offload_fp32.json").write_text(json.dumps(offload))
    out = assets / "results.json"
    configs = f"{assets / 'zero3_fp32.json'},{assets / 'zero3_offload_fp32.json'}"
    proc = subprocess.run([*command("deepspeed", 2, DRIVER), str(assets / "base"), configs, str(out)], env=env(),
                          capture_output=True, text=True, timeout=1500)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def test_every_method_and_config_ran(results):
    assert len(results) == 2 * len(METHODS) * 2


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("config", ["zero3_fp32.json", "zero3_offload_fp32.json"])
def test_checkpointing_changes_no_loss_and_no_weight(results, method, config):
    (plain_key,) = [k for k in results if k.endswith(f"{config}|{method}|plain")]
    plain, checkpointed = results[plain_key], results[plain_key.replace("|plain", "|gc")]
    assert len(plain["losses"]) == 3
    for a, b in zip(plain["losses"], checkpointed["losses"], strict=True):
        assert a == pytest.approx(b, abs=1e-6)  # per rank, per step
    assert plain["adapter"].keys() == checkpointed["adapter"].keys()
    for name, values in plain["adapter"].items():
        assert max(abs(x - y) for x, y in zip(values, checkpointed["adapter"][name], strict=True)) <= 1e-6, name
    # the run trained: the adapter moved away from its initialisation in the first step's direction
    assert plain["losses"][0] != plain["losses"][-1]
