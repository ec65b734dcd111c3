"""apply_recipe: presets, rules, fused groups, bad recipes as one-line QuantErrors, reload."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qadpipe.errors import QuantError
from qadpipe.quant.calibrate import calibrate
from qadpipe.quant.formats import Kind
from qadpipe.quant.quantizers import QuantLinear, Quantizer
from qadpipe.quant.recipe import PRESETS, apply_recipe, quant_parameters, sibling_groups

LINEARS_PER_LAYER = 7   # q k v o gate up down


def _batches(n: int, pad: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(n):
        mask = torch.ones(2, 12, dtype=torch.long)
        if pad:
            mask[1, -pad:] = 0
        out.append({"input_ids": torch.randint(0, 256, (2, 12), generator=g), "attention_mask": mask})
    return out


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_applies_and_runs_forward_backward(preset, make_llama, quant_config):
    fixed_128 = PRESETS[preset].weight.fp8_group_scales     # W4A8-FP8: vLLM's kernel takes groups of 128 only
    model = make_llama(hidden=128) if fixed_128 else make_llama()
    configurable = PRESETS[preset].weight.group_size == 128 and not fixed_128
    recipe = apply_recipe(model, quant_config(preset=preset, group_size=32 if configurable else None))
    assert len(recipe.layers) == 2 * LINEARS_PER_LAYER and recipe.ignored == ["lm_head"]
    assert recipe.fused_groups == [("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                    "model.layers.0.self_attn.v_proj"),
                                   ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
                                    "model.layers.1.self_attn.v_proj"),
                                   ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"),
                                   ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj")]
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert type(model.lm_head) is nn.Linear
    calibrate(model, _batches(1), 1)
    logits = model(**_batches(1)[0]).logits
    logits.float().pow(2).mean().backward()
    assert torch.isfinite(logits).all()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_rules_first_match_wins_and_group_override(make_llama, quant_config):
    model = make_llama()
    recipe = apply_recipe(model, quant_config(preset="w4a16_int", group_size=32, rules=[
        {"targets": r"mlp\.down_proj", "preset": "w8a8_int"},
        {"targets": r"layers\.1\.", "preset": "w4a16_int", "group_size": 16},
        {"targets": r"proj", "preset": "nvfp4"},               # decides only what rules 0 and 1 leave
    ]))
    assert recipe.layers["model.layers.0.self_attn.o_proj"].preset == "nvfp4"
    assert recipe.layers["model.layers.0.mlp.down_proj"].preset == "w8a8_int"
    assert recipe.layers["model.layers.1.mlp.down_proj"].preset == "w8a8_int"
    assert recipe.layers["model.layers.1.self_attn.o_proj"].weight.group_size == 16
    assert recipe.layers["model.layers.0.mlp.down_proj"].input.kind is Kind.INT


def test_fused_groups_share_the_nvfp4_weight_global_amax(make_llama, quant_config):
    model = make_llama()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.k_proj.weight.mul_(5.0)                       # k has the largest |w|
    expected = attn.k_proj.weight.abs().max()
    apply_recipe(model, quant_config(preset="nvfp4_a16"))
    amaxes = [getattr(attn, p).weight_quantizer.amax for p in ("q_proj", "k_proj", "v_proj")]
    assert all(torch.equal(a, expected) for a in amaxes)
    assert torch.equal(attn.q_proj.quantized_weight().global_scale,
                       attn.v_proj.quantized_weight().global_scale)
    assert attn.o_proj.weight_quantizer.amax == attn.o_proj.weight.abs().max()


def test_sibling_groups_take_the_longest_group_and_never_a_layer_twice():
    layers = [f"attn.{leaf}" for leaf in ("q_proj", "k_proj", "v_proj", "g_proj", "o_proj")] + \
             [f"cross.{leaf}" for leaf in ("k_proj", "v_proj")] + ["mla.q_a_proj", "mla.kv_a_proj_with_mqa"]
    assert sorted(sibling_groups(layers)) == [("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.g_proj"),
                                              ("cross.k_proj", "cross.v_proj"),
                                              ("mla.q_a_proj", "mla.kv_a_proj_with_mqa")]


def _vllm_fused_groups() -> set[tuple[str, ...]]:
    """Every group of two or more layers a model of the installed vLLM fuses, as leaf names,
    read from the ``packed_modules_mapping`` literals of its model sources."""
    import ast
    from pathlib import Path

    vllm = pytest.importorskip("vllm")
    groups = set()
    for source in (Path(vllm.__file__).parent / "model_executor" / "models").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            target = node.target if isinstance(node, ast.AnnAssign) else \
                node.targets[0] if isinstance(node, ast.Assign) else None
            if getattr(target, "id", None) == "packed_modules_mapping" and isinstance(node.value, ast.Dict):
                for value in node.value.values:   # a "**base" entry's value is the base's name: skipped
                    if isinstance(value, ast.List) and len(value.elts) > 1:
                        groups.add(tuple(member.rpartition(".")[2] for member in ast.literal_eval(value)))
    return groups


def test_every_group_vllm_fuses_shares_its_scales_here():
    """A group vLLM fuses but qadpipe trained apart is served with its largest member's NVFP4
    global scale, the others rescaled (DeepSeek's q_a_proj + kv_a_proj_with_mqa: x0.83)."""
    groups = _vllm_fused_groups()
    assert ("q_a_proj", "kv_a_proj_with_mqa") in groups and len(groups) > 10   # the parse found them
    for leaves in groups:
        found = sibling_groups(f"layer.{leaf}" for leaf in leaves)
        assert len(found) == 1 and {f"layer.{leaf}" for leaf in leaves} <= set(found[0]), leaves


def test_deepseek_mla_projections_share_the_nvfp4_weight_global_amax(quant_config):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
        first_k_dense_replace=1, n_group=1, topk_group=1))
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.kv_a_proj_with_mqa.weight.mul_(3.0)
    expected = attn.kv_a_proj_with_mqa.weight.abs().max()
    apply_recipe(model, quant_config(preset="nvfp4_a16", moe_experts="dense"))
    assert torch.equal(attn.q_a_proj.weight_quantizer.amax, expected)
    assert torch.equal(attn.kv_a_proj_with_mqa.weight_quantizer.amax, expected)


@pytest.mark.parametrize("fields,message", [
    (dict(preset="w4a16_int"), "quant.group_size: w4a16_int group size 128 does not divide in_features 64 "
                               "of model.layers.0.self_attn.q_proj; set quant.group_size to a divisor such as 64"),
    (dict(preset="w8a8_int", ignore=["embed_tokens"]),
     "quant.preset: the LM head lm_head with preset 'w8a8_int': vLLM serves a quantized LM head only as "
     "weight-only int"),
    (dict(preset="nvfp4_a16", ignore=["embed_tokens"]),   # weight-only, but float
     "quant.preset: the LM head lm_head with preset 'nvfp4_a16': vLLM serves a quantized LM head only as "
     "weight-only int"),
    (dict(preset="mxfp4_a16", ignore=["embed_tokens"]),   # weight-only, but float
     "quant.preset: the LM head lm_head with preset 'mxfp4_a16': vLLM serves a quantized LM head only as "
     "weight-only int"),
    (dict(preset="mxfp8_a16", ignore=["embed_tokens"]),   # weight-only, but float
     "quant.preset: the LM head lm_head with preset 'mxfp8_a16': vLLM serves a quantized LM head only as "
     "weight-only int"),
    (dict(preset="fp8", ignore=["lm_head"], rules=[{"targets": "attn_proj", "preset": "fp8"}]),
     "quant.rules[0].targets: regex 'attn_proj' matches no nn.Linear"),
    (dict(preset="fp8", rules=[{"targets": "embed_tokens", "preset": "w8a16_int"}]),   # a module, not a Linear
     "quant.rules[0].targets: regex 'embed_tokens' matches no nn.Linear"),
    (dict(preset="fp8", ignore=["lm_head", "vision_tower"]),
     "quant.ignore[1]: regex 'vision_tower' matches no module (names look like 'model')"),
    (dict(preset="fp8", rules=[{"targets": "lm_head", "preset": "w8a16_int"}]),
     "quant.rules[0].targets: every nn.Linear it matches (lm_head, ...) is in quant.ignore, which wins over rules"),
    (dict(preset="fp8", rules=[{"targets": "mlp", "preset": "w8a16_int"}, {"targets": "down_proj", "preset": "fp8"}]),
     "quant.rules[1].targets: every nn.Linear it matches (model.layers.0.mlp.down_proj, ...) is taken by "
     "quant.rules[0] (the first matching rule wins)"),
    (dict(preset="fp8", rules=[{"targets": "k_proj", "preset": "w8a8_int"}]),
     "q_proj, model.layers.0.self_attn.k_proj, model.layers.0.self_attn.v_proj are fused by vLLM"),
    (dict(preset="w4a16_int", group_size=32, rules=[{"targets": "k_proj", "preset": "w4a16_int", "group_size": 16}]),
     "must be quantized alike (same preset and group size); they got q_proj: w4a16_int group 32, "
     "k_proj: w4a16_int group 16, v_proj: w4a16_int group 32"),
    (dict(preset="nvfp4", learnable="clip"),
     "quant.learnable: 'clip' needs a symmetric int weight preset, quant.preset is 'nvfp4'"),
    (dict(preset="w4a16_int", group_size=32, learnable="lsq", rules=[{"targets": "mlp", "preset": "nvfp4_a16"}]),
     "quant.learnable: 'lsq' needs a symmetric int weight preset, quant.rules[0].preset is 'nvfp4_a16'"),
])
def test_bad_recipes_fail_with_one_clear_line(fields, message, make_llama, quant_config):
    with pytest.raises(QuantError) as info:
        apply_recipe(make_llama(), quant_config(**fields))
    text = str(info.value)
    assert message in text and "\n" not in text


@pytest.mark.parametrize("preset", ["nvfp4", "mxfp4_a16", "w4a8_fp8"])
def test_a_layer_off_a_fixed_block_format_gets_a_fix_it_can_apply(preset, make_llama, quant_config):
    """NVFP4/MX blocks and W4A8-FP8's groups are the format's, not quant.group_size's: the
    error must not send the user to a field the preset then refuses."""
    with pytest.raises(QuantError) as info:
        apply_recipe(make_llama(hidden=72), quant_config(preset=preset))
    text = str(info.value)
    assert text.startswith(f"quant.preset: {preset} cannot quantize model.layers.0.self_attn.q_proj: its "
                           "in_features 72 is not a multiple of") and "group_size" not in text, text
    assert "quant.rules entry" in text and "\n" not in text


def test_a_group_size_the_format_refuses_names_the_field():
    from qadpipe.config import build_config
    from qadpipe.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        build_config({"quant": {"preset": "sherry_3of4", "rules": [{"targets": "mlp", "preset": "sherry_3of4",
                                                                     "group_size": 130}]}})
    assert "quant.rules[0].group_size: 130 cannot apply to preset 'sherry_3of4' (sherry: group_size 130 must be " \
           "a multiple of M=4)" in str(info.value)


def test_an_ignore_entry_that_keeps_nothing_dense_is_said(make_llama, quant_config, caplog):
    """A decoder layer's name (not its Linears'), or an MoE router that is not an nn.Linear:
    ignore acts on nn.Linear modules, so such an entry keeps nothing in full precision."""
    model = make_llama()
    with caplog.at_level("INFO", logger="qadpipe.quant.recipe"):
        recipe = apply_recipe(model, quant_config(preset="fp8", ignore=["lm_head", "embed_tokens", r"layers\.0$"]))
    assert recipe.ignored == ["lm_head"]
    assert ("quant.ignore[2]: regex 'layers\\.0$' matches no nn.Linear (e.g. model.layers.0, a LlamaDecoderLayer): "
            "ignore acts on nn.Linear modules, so it keeps nothing in full precision; to keep its Linears "
            "dense, match their names (e.g. 'model\\.layers\\.0\\.')") in caplog.text
    assert "embed_tokens" not in caplog.text   # embeddings are never quantized: naming them is fine
    caplog.clear()
    with caplog.at_level("WARNING", logger="qadpipe.quant.recipe"):   # the hint, followed, keeps layer 0 dense
        recipe = apply_recipe(make_llama(), quant_config(preset="fp8", ignore=["lm_head", r"model\.layers\.0\."]))
    assert len(recipe.ignored) == 8 and not caplog.text


def test_an_ignore_entry_naming_a_module_that_is_never_quantized_is_harmless(make_llama, quant_config, caplog):
    """An MoE router is no nn.Linear in transformers 5 ('mlp\\.gate$' is llm-compressor's usual
    entry): it stays dense anyway, nothing to warn about."""
    class Router(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 64))

    model = make_llama()
    model.model.layers[0].mlp.gate = Router()
    with caplog.at_level("INFO", logger="qadpipe.quant.recipe"):
        apply_recipe(model, quant_config(preset="fp8", ignore=["lm_head", r"mlp\.gate$"]))
    assert "quant.ignore[1]: 'mlp\\.gate$' matches no nn.Linear (e.g. model.layers.0.mlp.gate, a Router, which " \
           "qadpipe does not quantize anyway)" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "quant.ignore" in r.getMessage()]


def test_weights_outside_nn_linear_are_said_to_stay_dense(make_llama, quant_config, caplog):
    """A module holding matrices that is neither an nn.Linear nor an experts module transformers
    describes (no ``has_gate``/``is_transposed``... attributes): the recipe cannot reach it, and
    the user hears it."""
    class FusedExperts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(4, 64, 256))

    model = make_llama()
    model.model.layers[0].mlp.experts = FusedExperts()
    with caplog.at_level("WARNING", logger="qadpipe.quant.recipe"):
        apply_recipe(model, quant_config(preset="fp8"))
    assert "% of the model's weights sit in modules that are neither nn.Linear nor transformers' fused MoE " \
           "experts (FusedExperts) and stay in full precision" in caplog.text


def test_a_trained_students_recipe_rebuilds_with_its_no_op_entries(make_llama, quant_config, caplog):
    """A student trained before a refusal existed (a rule an earlier one shadows, an ignore
    entry matching no Linear) must still load for export, eval and --resume."""
    config = quant_config(preset="fp8", ignore=["lm_head", r"layers\.0$"],
                          rules=[{"targets": "mlp", "preset": "w8a16_int"}, {"targets": "down_proj", "preset": "fp8"}])
    with pytest.raises(QuantError, match=r"quant.rules\[1\].targets: every nn.Linear it matches"):
        apply_recipe(make_llama(), config)
    caplog.clear()
    with caplog.at_level("WARNING", logger="qadpipe.quant.recipe"):
        recipe = apply_recipe(make_llama(), config, rebuild=True)
    assert recipe.layers["model.layers.0.mlp.down_proj"].preset == "w8a16_int" and not caplog.text


class _HeadNamedOutput(nn.Module):
    """A causal LM whose head is not called lm_head (InternLM2's ``output``)."""

    def __init__(self, llama: nn.Module) -> None:
        super().__init__()
        self.model, self.output = llama.model, llama.lm_head

    def get_output_embeddings(self) -> nn.Module:
        return self.output

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens


@pytest.mark.parametrize("tie,preset,message", [
    (False, "nvfp4", "quant.preset: the LM head output with preset 'nvfp4': vLLM serves a quantized LM head only"),
    (True, "w4a16_int", "quant.preset: the LM head output shares its weight with the input embeddings"),
])
def test_the_lm_head_is_found_whatever_its_name(tie, preset, message, make_llama, quant_config):
    """The export finds the head by identity and refuses it after training; the recipe must
    refuse it before."""
    model = _HeadNamedOutput(make_llama(tie=tie))
    with pytest.raises(QuantError) as info:
        apply_recipe(model, quant_config(preset=preset, group_size=32 if preset == "w4a16_int" else None,
                                         ignore=["embed_tokens"]))
    assert message in str(info.value)


def test_the_default_ignore_keeps_the_lm_head_dense_whatever_its_name(make_llama, quant_config):
    """``lm_head`` and ``embed_tokens`` in the default ignore are roles: a model whose head is
    ``output`` (InternLM2) or whose embeddings are named otherwise (GPT-NeoX ``embed_in``) was
    refused for "matches no module"; its head must stay dense, as on Llama.  Other entries
    matching nothing are still refused."""
    model = _HeadNamedOutput(make_llama())
    model.model.embed_in = model.model.embed_tokens
    del model.model.embed_tokens
    recipe = apply_recipe(model, quant_config(preset="nvfp4"))
    assert recipe.ignored == ["output"] and type(model.output) is nn.Linear
    assert "model.layers.0.self_attn.q_proj" in recipe.layers
    with pytest.raises(QuantError, match=r"quant.ignore\[2\]: regex 'gate_proj_typo' matches no module"):
        apply_recipe(_HeadNamedOutput(make_llama()), quant_config(preset="nvfp4",
                                                                  ignore=["lm_head", "embed_tokens", "gate_proj_typo"]))


def test_an_invalid_regex_is_one_line_for_a_config_built_without_the_loader(make_llama):
    """The loader refuses it first (tests/test_config.py); a library caller's QuantConfig
    reaches apply_recipe unchecked."""
    from qadpipe.config.schema import QuantConfig, QuantRule

    with pytest.raises(QuantError) as info:
        apply_recipe(make_llama(), QuantConfig(preset="fp8", rules=[QuantRule(targets="(", preset="fp8")]))
    assert "'(' is not a valid regex" in str(info.value) and "\n" not in str(info.value)


def test_tied_lm_head_refuses_quantization(make_llama, quant_config):
    with pytest.raises(QuantError, match="shares its weight with the input embeddings"):
        apply_recipe(make_llama(tie=True), quant_config(preset="w4a16_int", group_size=32, ignore=["embed_tokens"]))


def test_untied_lm_head_with_weight_only_int_is_allowed(make_llama, quant_config):
    model = make_llama()
    recipe = apply_recipe(model, quant_config(preset="w4a16_int", group_size=32, ignore=["embed_tokens"]))
    assert "lm_head" in recipe.layers and isinstance(model.lm_head, QuantLinear)


def test_clip_on_an_lsq_preset_is_said_to_do_nothing_and_a_trained_one_still_rebuilds(make_llama, quant_config,
                                                                                         caplog):
    """An lsq_* preset learns LSQ steps whatever quant.learnable says: clip trained LSQ silently."""
    config = quant_config(preset="lsq_int4", group_size=32, learnable="clip")
    with caplog.at_level("WARNING", logger="qadpipe.quant.recipe"):
        apply_recipe(make_llama(), config)
    assert ("quant.learnable: clip does nothing here: every quantized layer has an lsq_* preset, which learns LSQ "
            "steps instead; set quant.learnable: none") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="qadpipe.quant.recipe"):
        apply_recipe(make_llama(), config, rebuild=True)   # a student trained so: no word, it loads
    assert "clip does nothing" not in caplog.text


def test_a_partly_quantized_fused_group_is_found(make_llama, quant_config):
    from qadpipe.quant.recipe import partly_quantized_groups

    model = make_llama()
    apply_recipe(model, quant_config(preset="w4a16_int", group_size=32, ignore=["lm_head", r"layers\.0\..*k_proj"]))
    assert partly_quantized_groups(model) == [tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")]


def test_static_input_quantizer_refuses_to_run_uncalibrated(make_llama, quant_config):
    model = make_llama()
    apply_recipe(model, quant_config(preset="nvfp4"))
    with pytest.raises(QuantError, match="used before calibration"):
        model(**_batches(1)[0])


@pytest.mark.parametrize("preset,learnable", [("nvfp4", "none"), ("fp8_static", "none"),
                                              ("w4a16_int", "lsq"), ("w4a16_int", "clip")])
def test_rebuild_from_state_dict_reproduces_the_model(preset, learnable, make_llama, quant_config):
    config = quant_config(preset=preset, learnable=learnable, group_size=32 if preset == "w4a16_int" else None)
    trained = make_llama(seed=0)
    apply_recipe(trained, config)
    calibrate(trained, _batches(2), 2)
    with torch.no_grad():                                   # "training" moved weights and steps
        for p in quant_parameters(trained):
            p.mul_(1.05)
        trained.model.layers[0].mlp.up_proj.weight.add_(0.01)
    state = {k: v.clone() for k, v in trained.state_dict().items()}

    rebuilt = make_llama(seed=1)                             # different init: everything must load
    apply_recipe(rebuilt, config)
    rebuilt.load_state_dict(state)
    batch = _batches(1)[0]
    assert torch.equal(rebuilt(**batch).logits, trained(**batch).logits)
    assert any(k.endswith("weight_quantizer.amax") or k.endswith("weight_quantizer.step")
               or k.endswith("weight_quantizer.clip_logit") or k.endswith("input_quantizer.amax") for k in state)


@pytest.mark.parametrize("preset,learnable,lsq_grid,grid", [
    ("w4a16_int", "none", "preset", (-7, 7)), ("w4a16_int", "lsq", "preset", (-7, 7)),
    ("w4a16_int", "clip", "preset", (-7, 7)), ("w4a16_int", "lsq", "full", (-8, 7)),
    ("lsq_int4", "none", "preset", (-8, 7)), ("lsq_int2", "none", "preset", (-2, 1))])
def test_learning_the_step_keeps_the_presets_code_grid(preset, learnable, lsq_grid, grid, make_llama, quant_config):
    """learnable: lsq on w4a16_int moved its layers to [-8, 7] (and the PTQ start to amax/7.5):
    the comparison with none and clip ran on another grid.  lsq_* presets keep the LSQ paper's,
    and quant.lsq_grid: full asks for it (what a student recorded before the field took)."""
    model = make_llama()
    apply_recipe(model, quant_config(preset=preset, learnable=learnable, lsq_grid=lsq_grid, group_size=32))
    codes = [m.quantized_weight().codes for m in model.modules() if isinstance(m, QuantLinear)]
    assert (min(int(c.min()) for c in codes), max(int(c.max()) for c in codes)) == grid


def test_quant_parameters_are_quantizer_params_and_norms(make_llama, quant_config):
    model = make_llama()
    apply_recipe(model, quant_config(preset="lsq_int4", group_size=32))
    params = quant_parameters(model)
    steps = [m.step for m in model.modules() if isinstance(m, Quantizer) and hasattr(m, "step")]
    norms = [m.weight for m in model.modules() if "RMSNorm" in type(m).__name__]
    assert len(steps) == 14 and len(norms) == 5
    assert {id(p) for p in params} == {id(p) for p in steps + norms}


def test_a_preset_in_the_wrong_case_is_named():
    from qadpipe.quant.recipe import resolve_preset

    with pytest.raises(QuantError, match=r"unknown preset 'NVFP4'; .*; did you mean 'nvfp4'\?$"):
        resolve_preset("NVFP4", None)


def test_a_partly_quantized_fused_group_is_said_before_training(make_llama, quant_config, caplog):
    model = make_llama()
    recipe = apply_recipe(model, quant_config(preset="w4a16_int", group_size=32,
                                              ignore=["lm_head", "embed_tokens", r"k_proj"]))
    assert "model.layers.0.self_attn.k_proj" in recipe.ignored
    assert ("model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj, model.layers.0.self_attn.v_proj are "
            "fused by vLLM into one GEMM but only model.layers.0.self_attn.q_proj, model.layers.0.self_attn.v_proj "
            "quantized") in caplog.text
    assert "gate_proj" not in caplog.text


def test_kv_cache_on_a_model_with_a_fused_qkv_projection_names_it(quant_config):
    """The message said "only HF decoder models are supported" of Phi-3, an HF decoder."""
    from transformers import Phi3Config, Phi3ForCausalLM

    model = Phi3ForCausalLM(Phi3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, pad_token_id=0))
    with pytest.raises(QuantError, match=r"^quant.kv_cache=fp8: qadpipe finds the attention modules by their k_proj "
                                         r"and v_proj, and Phi3ForCausalLM has none: this architecture fuses them into "
                                         r"one projection \(model.layers.0.self_attn.qkv_proj\); set quant.kv_cache: "
                                         r"null$"):
        apply_recipe(model, quant_config(preset="w4a16_int", group_size=32, kv_cache="fp8"))
