"""The shipped recipes in configs/ stay valid against the schema and the preset table."""

from __future__ import annotations

from pathlib import Path

import pytest

from qadpipe.config import load_config
from qadpipe.quant.recipe import resolve_preset

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_recipes():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "qwen3-1.7b-nvfp4.yaml", "qwen3-4b-w4a8-fp8-quant-only.yaml",
                                         "qwen3-8b-mxfp4.yaml", "qwen3-30b-a3b-nvfp4.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_loads_and_names_a_real_preset(path: Path):
    # GPU recipes point at cluster paths that do not exist here; everything else must validate.
    overrides = [] if path.name == "demo.yaml" else ["data.source=random"]
    config = load_config(path, overrides)
    resolve_preset(config.quant.preset, config.quant.group_size)
    if config.distill.loss == "sampled_ce":
        assert config.cache.target == "sampled"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_builds_its_student(path: Path):
    """Loading is not enough: a preset and a learnable setting that cannot go together were
    refused only when distill started, after the whole generate array had run.  The quant
    recipe is applied to a tiny Qwen3 whose widths every group size divides (a Qwen3-MoE for an
    MoE model's recipe: its experts quantized too), and one forward+backward runs through the
    fake-quantized layers."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from qadpipe.quant.recipe import apply_recipe

    overrides = [] if path.name == "demo.yaml" else ["data.source=random"]
    config = load_config(path, overrides)
    torch.manual_seed(0)
    shape = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64)
    if "-a3b-" in path.name:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**shape, moe_intermediate_size=256, num_experts=4,
                                                   num_experts_per_tok=2))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**shape))
    recipe = apply_recipe(model, config.quant)
    assert bool(recipe.experts) == ("-a3b-" in path.name)
    for module in model.modules():                 # a range for every static input quantizer
        if hasattr(module, "set_amax") and not module.calibrated:
            module.set_amax(torch.tensor(4.0))
    model(input_ids=torch.randint(0, 256, (1, 8))).logits.sum().backward()
