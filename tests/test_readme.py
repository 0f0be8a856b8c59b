"""The README's library example runs as printed, through the public API of `adapters_ds`."""

from __future__ import annotations

import re

import torch
from launch import REPO
from tiny_models import make_model

import adapters_ds


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)


def test_the_library_example_runs_as_written(tmp_path, monkeypatch, capsys):
    (example,) = [block for block in readme_python_blocks() if "inject_adapters" in block]
    monkeypatch.chdir(tmp_path)
    model = make_model("llama")
    namespace = {"model": model}
    exec(compile(example, "README.md", "exec"), namespace)
    assert re.search(
        r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: [\d.]+", capsys.readouterr().out
    )
    # the saved adapter loads into a fresh base with the same outputs
    fresh = make_model("llama")
    adapters_ds.load_adapter(fresh, "out/adapter")
    ids = torch.arange(3, 19).unsqueeze(0)
    torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


def test_the_public_api_names_exist():
    assert set(adapters_ds.__all__) <= set(dir(adapters_ds))
    assert {"lora", "series", "parallel", "gates"} <= set(adapters_ds.METHODS)
