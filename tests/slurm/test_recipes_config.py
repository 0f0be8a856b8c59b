"""The shipped recipe files (slurm/recipes/*.yaml) are the SLURM templates' recipes, and CONFIG= hands one to the
trainer in their place (under the stand-in SLURM commands of test_slurm.py)."""

from __future__ import annotations

import subprocess

import pytest
from launch import REPO

from adapters_ds.errors import InputError
from adapters_ds.training.args import parse_train_args
from slurm.test_slurm import run_script, stubs  # noqa: F401  (stubs is a fixture)

METHODS = ("lora", "series", "parallel")


def template_flags(method: str) -> list[str]:
    """RECIPE_ARGS of slurm/llama13b_<method>.sh, and its default batch sizes, as the shell expands them."""
    script = REPO / "slurm" / f"llama13b_{method}.sh"
    text = f'eval "$(sed -n \'/^BATCH_SIZE=/,/^)/p\' {script})"; printf "%s\\n" "${{RECIPE_ARGS[@]}}" ' \
           '--batch_size "$BATCH_SIZE" --micro_batch_size "$MICRO_BATCH_SIZE"'  # fmt: skip
    return subprocess.run(["bash", "-c", text], capture_output=True, text=True, check=True).stdout.splitlines()


@pytest.mark.parametrize("method", METHODS)
def test_recipe_file_equals_the_template_recipe(method):
    required = ["--ds_config", "ds_configs/zero3.json"]
    from_file = parse_train_args(["--config", str(REPO / "slurm" / "recipes" / f"llama13b_{method}.yaml"), *required])
    from_flags = parse_train_args([*template_flags(method), *required])
    assert from_file.config and from_file.to_dict() == {**from_flags.to_dict(), "config": from_file.config}
    overridden = parse_train_args(["--config", from_file.config, *required, "--learning_rate", "1e-4"])
    assert overridden.learning_rate == 1e-4  # the command line wins


def test_config_replaces_the_template_recipe_flags(stubs, tmp_path):  # noqa: F811
    recipe = REPO / "slurm" / "recipes" / "llama13b_series.yaml"
    result, calls = run_script(stubs, CONFIG=str(recipe))
    assert result.returncode == 0, result.stdout + result.stderr
    srun = calls[0]
    assert f"--config {recipe} --batch_size 16 --micro_batch_size 2" in srun and "--lora_r" not in srun
    missing, _ = run_script(stubs, CONFIG=str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "CONFIG=" in missing.stderr and "does not exist" in missing.stderr


def test_a_config_naming_another_config_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text(f"config: {tmp_path / 'b.yaml'}\n")
    with pytest.raises(InputError, match="cannot name another config"):
        parse_train_args(["--config", str(tmp_path / "a.yaml"), "--ds_config", "x.json"])


def test_readme_shows_the_shipped_lora_recipe():
    readme = (REPO / "README.md").read_text()
    block = readme.split("# slurm/recipes/llama13b_lora.yaml\n", 1)[1].split("```", 1)[0]
    shipped = (REPO / "slurm" / "recipes" / "llama13b_lora.yaml").read_text()
    assert block == "".join(line + "\n" for line in shipped.splitlines() if not line.startswith("#"))
