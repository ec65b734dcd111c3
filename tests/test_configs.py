"""The shipped recipes in configs/ stay valid against the schema and the preset table."""

from __future__ import annotations

from pathlib import Path

import pytest

from qadpipe.config import load_config
from qadpipe.quant.recipe import resolve_preset

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_recipes():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "qwen3-1.7b-nvfp4.yaml", "qwen3-4b-w4a8-fp8-quant-only.yaml",
                                         "qwen3-8b-mxfp4.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_loads_and_names_a_real_preset(path: Path):
    # GPU recipes point at cluster paths that do not exist here; everything else must validate.
    overrides = [] if path.name == "demo.yaml" else ["data.source=random"]
    config = load_config(path, overrides)
    resolve_preset(config.quant.preset, config.quant.group_size)
    if config.distill.loss == "sampled_ce":
        assert config.cache.target == "sampled"
