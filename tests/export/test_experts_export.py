"""Export of quantized MoE experts: the fake checkpoint computes what the student computes, and
the compressed-tensors one holds one weight-only layer per expert and projection -- the layout
vLLM's fused-MoE loader reads (``<experts>.<e>.gate_proj.weight_packed``, ...) -- which the
compressed-tensors library decompresses to exactly the student's per-expert weights."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from ct_reference import ct_decompress, load_export
from transformers import AutoModelForCausalLM

from qadpipe.errors import ExportError
from qadpipe.export import export_model
from qadpipe.quant.experts import QuantExperts
from qadpipe.quant.formats import dequantize

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _save_qwen3_moe(out: Path, width: int, layers: int) -> Path:
    """A random bf16 Qwen3-MoE (4 experts, top 2) whose experts' in-features are ``width``."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=256, hidden_size=width, intermediate_size=128, moe_intermediate_size=width,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=width // 2, num_experts=4,
        num_experts_per_tok=2)).to(torch.bfloat16).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_qwen3_moe(tmp_path_factory.mktemp("tiny-qwen3-moe"), 64, 2)


def _experts(model: torch.nn.Module) -> dict[str, QuantExperts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantExperts)}


@pytest.mark.parametrize("preset,group", [("w4a16_int", 32), ("nvfp4_a16", None), ("lsq_int4", 32)])
def test_fake_export_of_quantized_experts_computes_what_the_student_computes(student, tiny_moe_dir, tmp_path,
                                                                             preset, group):
    model, config = student(tiny_moe_dir, preset, group)
    export_model(model, tiny_moe_dir, tmp_path / "fake", "fake", config)
    _, tensors = load_export(tmp_path / "fake")
    assert sorted(k for k in tensors if "quantizer" in k) == []   # training state (LSQ steps) stays out
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fake"), dtype=torch.bfloat16).eval()
    for name, experts in _experts(model).items():
        for weight in experts.layout.weight_names:
            stored = getattr(loaded.get_submodule(name), weight)
            assert torch.equal(stored, experts.fake_quantized(weight)), (name, weight)
            assert not torch.equal(stored, getattr(experts, weight)), f"{name}.{weight} was not quantized"
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("preset,group,fmt", [("w4a16_int", 32, "pack-quantized"),
                                              ("lsq_int4", 32, "pack-quantized"),
                                              ("w4a16_int_asym", 32, "pack-quantized"),
                                              ("nvfp4_a16", None, "nvfp4-pack-quantized"),
                                              ("mxfp4_a16", None, "mxfp4-pack-quantized")])
def test_packed_experts_decompress_to_the_students_weights(student, tiny_moe_dir, tmp_path, preset, group, fmt):
    """Per expert and projection, CT's own decompressor gives the codes x scales the student's
    fake-quant forward multiplies with (in bf16, what vLLM computes in)."""
    model, config = student(tiny_moe_dir, preset, group)
    export_model(model, tiny_moe_dir, tmp_path / "ct", "compressed-tensors", config)
    exported, tensors = load_export(tmp_path / "ct")
    assert exported["quantization_config"]["format"] == fmt
    assert sorted(k for k in tensors if "quantizer" in k) == []   # training state (LSQ steps) stays out
    assert not any(key.endswith(("gate_up_proj", "experts.down_proj")) for key in tensors)   # no 3-D copies
    for name, experts in _experts(model).items():
        num_experts = experts.gate_up_proj.shape[0]
        names = [f"{name}.{e}.{p}" for e in range(num_experts) for p in PROJECTIONS]
        decompressed = ct_decompress(tmp_path / "ct", names)
        assert set(decompressed) == set(names)
        matrices = experts.expert_matrices()
        fake_gate_up, fake_down = experts.fake_quantized("gate_up_proj"), experts.fake_quantized("down_proj")
        half = fake_gate_up.shape[1] // 2
        fake = {"gate_proj": fake_gate_up[:, :half], "up_proj": fake_gate_up[:, half:], "down_proj": fake_down}
        for e in range(num_experts):
            for p in PROJECTIONS:
                got = decompressed[f"{name}.{e}.{p}"]
                exact = dequantize(dataclasses.replace(matrices[p][e], dtype=torch.float32))
                assert torch.equal(got, exact.to(got.dtype)), (name, e, p)
                assert torch.equal(got.to(torch.bfloat16), fake[p][e].to(torch.bfloat16)), (name, e, p)


def test_quantized_experts_are_targets_and_the_router_stays_dense(student, tiny_moe_dir, tmp_path):
    """vLLM looks an expert up as ``<experts>.0.<proj>`` (``re:`` entries ``re.match``-ed, others
    equal): quantized experts must not be in ``ignore``; with two schemes, their config group
    must name them; the router, no nn.Linear, stays dense."""
    model, config = student(tiny_moe_dir, "w4a16_int", 32,
                            rules=[{"targets": r"experts$", "preset": "nvfp4_a16"}])
    # a matrix of the MoE block's own around its quantized experts: named alone, never its sub-names
    model.model.layers[0].mlp.register_parameter("extra", torch.nn.Parameter(torch.zeros(2, 2)))
    export_model(model, tiny_moe_dir, tmp_path / "ct", "compressed-tensors", config)
    qconfig = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]

    def matches(entries: list[str], name: str) -> bool:
        return any(re.match(e[3:], name) if e.startswith("re:") else e == name for e in entries)

    groups = {g["format"]: g["targets"] for g in qconfig["config_groups"].values()}
    for layer in range(2):
        for p in PROJECTIONS:
            expert = f"model.layers.{layer}.mlp.experts.0.{p}"
            assert not matches(qconfig["ignore"], expert)
            assert matches(groups["nvfp4-pack-quantized"], expert) and not matches(groups["pack-quantized"], expert)
        assert matches(qconfig["ignore"], f"model.layers.{layer}.mlp.gate")
    assert matches(qconfig["ignore"], "model.layers.0.mlp")
    assert not matches(groups["nvfp4-pack-quantized"], "model.layers.1.mlp.experts.0.gate_up_proj")


def test_experts_vllm_has_no_per_expert_names_for_are_refused_in_one_line(tmp_path):
    """gpt-oss's experts (transposed, gate/up interleaved, biased) export as fake only."""
    from transformers import GptOssConfig, GptOssForCausalLM

    from qadpipe.config import build_config
    from qadpipe.quant.recipe import apply_recipe

    torch.manual_seed(0)
    GptOssForCausalLM(GptOssConfig(
        vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["full_attention"])).save_pretrained(tmp_path / "base")
    config = build_config({"model": {"path": str(tmp_path / "base")},
                           "quant": {"preset": "w4a16_int", "group_size": 16}})
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    apply_recipe(model, config.quant)
    with pytest.raises(ExportError) as caught:
        export_model(model, tmp_path / "base", tmp_path / "ct", "compressed-tensors", config)
    message = str(caught.value)
    assert message.startswith("model.layers.0.mlp.experts: GptOssExperts experts are transposed, biased, gate/up "
                              "interleaved;") and "use --format fake, or quant.moe_experts: dense" in message
    assert "\n" not in message and not (tmp_path / "ct").exists()
    export_model(model, tmp_path / "base", tmp_path / "fake", "fake", config)
    assert (tmp_path / "fake" / "config.json").is_file()


def test_exports_use_the_architectures_checkpoint_names(student, tmp_path):
    """transformers 5 loads Mixtral's ``block_sparse_moe.experts.<e>.w1`` as ``mlp.experts.gate_up_proj``;
    exports are written under the names of Mixtral's own checkpoints (as save_pretrained writes
    them), which vLLM's Mixtral loads (``.gate_proj.`` -> ``.w1.`` by its own mapper), and the
    quantization config names modules the same way."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, num_local_experts=4, num_experts_per_tok=2)).save_pretrained(tmp_path / "base")
    model, config = student(tmp_path / "base", "w4a16_int", 32, rules=[{"targets": r"experts$", "preset": "nvfp4_a16"}])
    export_model(model, tmp_path / "base", tmp_path / "ct", "compressed-tensors", config)
    export_model(model, tmp_path / "base", tmp_path / "fake", "fake", config)
    qconfig, tensors = load_export(tmp_path / "ct")
    assert "model.layers.0.block_sparse_moe.experts.3.gate_proj.weight_packed" in tensors
    assert "model.layers.0.block_sparse_moe.gate.weight" in tensors
    assert not any(".mlp." in key for key in tensors)
    _, fake = load_export(tmp_path / "fake")
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in fake and not any(".mlp." in k for k in fake)
    qconfig = qconfig["quantization_config"]
    targets = [t for g in qconfig["config_groups"].values() for t in g["targets"]]
    assert "re:^model\\.layers\\.0\\.block_sparse_moe\\.experts\\.\\d+\\.(gate_proj|up_proj|down_proj|w1|w2|w3)$" in targets
    assert qconfig["ignore"] == ["lm_head", "re:model\\.layers\\.0\\.block_sparse_moe\\.gate(\\..*)?$"]
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fake"), dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_vllm_finds_the_experts_scheme_of_an_export_with_two_schemes(family, student, tiny_moe_dir, tmp_path):
    """With more than one scheme the experts are named in the config, and vLLM looks their
    scheme up by the architecture's checkpoint names: Mixtral's w1/w3/w2.  A pattern over
    gate_proj/up_proj/down_proj only left Mixtral's experts without one: vLLM built them
    unquantized and failed to load the packed weights.  Checked with vLLM's own matching."""
    pytest.importorskip("vllm")
    from torch import nn
    from transformers import MixtralConfig, MixtralForCausalLM
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig)
    from vllm.model_executor.models.mixtral import MixtralForCausalLM as VllmMixtral
    from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM as VllmQwen3Moe

    if family == "mixtral":
        torch.manual_seed(0)
        MixtralForCausalLM(MixtralConfig(
            vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, num_local_experts=4, num_experts_per_tok=2)).save_pretrained(
            tmp_path / "base")
        base, vllm_class, experts, names = tmp_path / "base", VllmMixtral, "model.layers.0.block_sparse_moe.experts", \
            ("w1", "w3", "w2")
    else:
        base, vllm_class, experts, names = tiny_moe_dir, VllmQwen3Moe, "model.layers.0.mlp.experts", PROJECTIONS
    model, config = student(base, "w4a16_int", 32, rules=[{"targets": r"experts$", "preset": "nvfp4_a16"}])
    export_model(model, base, tmp_path / "ct", "compressed-tensors", config)
    qconfig, _ = load_export(tmp_path / "ct")
    vllm_config = CompressedTensorsConfig.from_config(qconfig["quantization_config"])
    vllm_config.packed_modules_mapping = dict(getattr(vllm_class, "packed_modules_mapping", {}))
    if getattr(vllm_class, "hf_to_vllm_mapper", None) is not None:
        vllm_config.apply_vllm_mapper(vllm_class.hf_to_vllm_mapper)
    vllm_config._add_fused_moe_to_target_scheme_map()
    layer = type("RoutedExperts", (nn.Module,), {})()
    for name in names:
        scheme = vllm_config.get_scheme_dict(layer, f"{experts}.0.{name}")
        assert scheme is not None and scheme["format"] == "nvfp4-pack-quantized", (name, scheme)


def test_a_student_with_only_its_experts_quantized_exports(student, tiny_moe_dir, tmp_path):
    model, config = student(tiny_moe_dir, "w4a16_int", 32, ignore=["lm_head", "self_attn"])
    result = export_model(model, tiny_moe_dir, tmp_path / "ct", "compressed-tensors", config)
    info = json.loads((tmp_path / "ct" / "qadpipe_export.json").read_text())
    assert result is not None and list(info["layers"]) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]


#: The MoE method vLLM 0.32 builds for experts exported with each activation-quantizing preset.
MOE_METHODS = {"nvfp4": ("CompressedTensorsW4A4Nvfp4MoEMethod", {"use_a16": False}),
               "fp8": ("CompressedTensorsW8A8Fp8MoEMethod", {}),
               "fp8_static": ("CompressedTensorsW8A8Fp8MoEMethod", {}),
               "w8a8_int": ("CompressedTensorsW8A8Int8MoEMethod", {}),
               "w4a8_fp8": ("CompressedTensorsW4A8Fp8MoEMethod", {}),
               "mxfp8": ("CompressedTensorsW8A8Mxfp8MoEMethod", {}),
               "mxfp4": ("CompressedTensorsW4A4Mxfp4MoEMethod", {})}
#: Each static input scale as vLLM reads it, from the calibrated range (the Linear's convention,
#: checked in test_compressed_tensors.py).
STATIC_INPUT_SCALES = {"nvfp4": ("input_global_scale", lambda amax: 448 * 6 / amax.reshape(1)),
                       "fp8_static": ("input_scale", lambda amax: torch.tensor([float(amax) / 448]))}


@pytest.fixture(scope="module")
def wide_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sizes of 256: vLLM's W4A8 MoE method loads no smaller multiple."""
    return _save_qwen3_moe(tmp_path_factory.mktemp("wide-qwen3-moe"), 256, 1)


def _vllm_moe_method(qconfig: dict, experts: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict]:
    """The MoE method vLLM's own selection (``get_moe_method``) builds for ``experts``, each
    method class replaced by a recorder of its name (building one needs a GPU backend)."""
    import importlib
    import pkgutil

    from torch import nn
    from vllm.model_executor.layers.quantization.compressed_tensors import compressed_tensors_moe as package
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig)
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.compressed_tensors_moe \
        import CompressedTensorsMoEMethod

    for info in pkgutil.iter_modules(package.__path__):
        try:
            module = importlib.import_module(f"{package.__name__}.{info.name}")
        except ImportError:   # a ROCm-only method (flydsl): never chosen here
            continue
        for name in dir(module):
            if name.startswith("CompressedTensors") and name.endswith("MoEMethod") \
                    and name != CompressedTensorsMoEMethod.__name__:
                monkeypatch.setattr(module, name, lambda *args, _name=name, **kwargs: (_name, kwargs))
    layer = type("RoutedExperts", (nn.Module,), {})()
    layer.ckpt_gate_proj_name, layer.ckpt_up_proj_name, layer.ckpt_down_proj_name = PROJECTIONS
    layer.moe_config = None
    return CompressedTensorsMoEMethod.get_moe_method(CompressedTensorsConfig.from_config(qconfig), layer, experts)


@pytest.mark.parametrize("preset", list(MOE_METHODS))
def test_experts_with_quantized_inputs_export_what_vllms_moe_method_for_them_loads(student, wide_moe_dir, tmp_path,
                                                                                    monkeypatch, preset):
    """vLLM picks its W?A? MoE method for the exported scheme (not the weight-only one), and
    every expert's static input scale is the experts module's one calibrated range per
    projection (vLLM serves the max over the experts: that range)."""
    pytest.importorskip("vllm")
    model, config = student(wide_moe_dir, preset)
    export_model(model, wide_moe_dir, tmp_path / "ct", "compressed-tensors", config)
    qconfig, tensors = load_export(tmp_path / "ct")
    name, experts = next(iter(_experts(model).items()))
    assert _vllm_moe_method(qconfig["quantization_config"], name, monkeypatch) == MOE_METHODS[preset]
    inputs = experts.input_quantizers()
    field, expected = STATIC_INPUT_SCALES.get(preset, (None, None))
    for e in range(experts.gate_up_proj.shape[0]):
        for projection in PROJECTIONS:
            written = {k.rsplit(".", 1)[1]: v for k, v in tensors.items()
                       if k.startswith(f"{name}.{e}.{projection}.input")}
            assert set(written) == ({field} if field else set()), (e, projection)
            if field:
                source = inputs["down_proj" if projection == "down_proj" else "gate_up_proj"]
                assert torch.equal(written[field], expected(source.amax.float())), (e, projection)
    info = json.loads((tmp_path / "ct" / "qadpipe_export.json").read_text())
    assert info["layers"][name]["input"]["kind"] == experts.input_spec.kind.value


def test_w4a8_experts_vllm_would_not_load_are_refused_in_one_line(student, tmp_path):
    """vLLM's W4A8 MoE method asserts hidden and intermediate sizes divisible by 256 (its
    create_weights): 128-wide experts train (groups of 128) but do not export."""
    base = _save_qwen3_moe(tmp_path / "base", 128, 1)
    model, config = student(base, "w4a8_fp8")
    with pytest.raises(ExportError, match=r"^model.layers.0.mlp.experts: vLLM 0.32 loads W4A8 experts only with hidden "
                                          r"and intermediate sizes that are multiples of 256 .* these are 128 and 128;"):
        export_model(model, base, tmp_path / "ct", "compressed-tensors", config)
    assert not (tmp_path / "ct").exists()
    export_model(model, base, tmp_path / "fake", "fake", config)
