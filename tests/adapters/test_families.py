"""One family table serves every method: default targets come from roles, match exactly the modules playing them,
and a family without a layout is a clear error naming the method."""

from __future__ import annotations

import pytest
from tiny_models import CONFIGS, make_model

from adapters_ds import GatesConfig, InputError, LoRAConfig, ParallelConfig, SeriesConfig
from adapters_ds.adapters.inject import resolve_targets
from adapters_ds.families import LAYOUTS, ROLES, layout_of, role_paths

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
    assert {make_model(f).config.model_type for f in CONFIGS} <= set(LAYOUTS)


def test_a_family_without_a_layout_is_an_error_naming_the_method():
    with pytest.raises(InputError, match=r"adapter method 'series' has no default target modules for model type 't5'"):
        SeriesConfig().default_targets("t5")
