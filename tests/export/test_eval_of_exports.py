"""``qadpipe eval`` loads a compressed-tensors export as transformers runs it and computes what
its student computed: every weight format, a quantized head, mixed recipes.

Formats whose decompressed weights are bf16 (NVFP4, MXFP4, MXFP8) crashed eval's fp32 forward,
and a quantized ``lm_head`` left packed had no ``weight`` to size the vocabulary by.  The
reference is the student's own fake-quant forward in fp32; an export's weights are bf16, so
weight-only formats agree to bf16 rounding.
"""

from __future__ import annotations

import json

import pytest
import torch

from qadpipe.eval.evaluate import load_model
from qadpipe.export import export_model
from qadpipe.models import check_logits_are_head_of_hidden, output_rows

WEIGHT_ONLY = {
    "mxfp4": ("mxfp4_a16", None, {}),
    "mxfp8": ("mxfp8_a16", None, {}),
    "nvfp4": ("nvfp4_a16", None, {}),
    "int4_quantized_head": ("w4a16_int", 32, {"ignore": ["embed_tokens"]}),
    "int4_and_nvfp4_mlp": ("w4a16_int", 32, {"rules": [{"targets": r"mlp\.", "preset": "nvfp4_a16"}]}),
}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _evaluated_export(student, model_dir, tmp_path, preset, group, quant, **config_fields):
    model, config = student(model_dir, preset, group, **quant)
    export_model(model, model_dir, tmp_path / "export", "compressed-tensors", config)
    if config_fields:   # as a user may edit an export's quantization_config
        path = tmp_path / "export" / "config.json"
        written = json.loads(path.read_text())
        written["quantization_config"].update(config_fields)
        path.write_text(json.dumps(written))
    loaded = load_model(str(tmp_path / "export"), torch.device("cpu"))
    assert output_rows(loaded) == output_rows(model)
    check_logits_are_head_of_hidden(loaded, "export")   # eval's own check, which crashed first
    return _logits(loaded), _logits(model.float())


@pytest.mark.parametrize("case", list(WEIGHT_ONLY))
def test_a_weight_only_export_evaluates_as_its_student_computes(student, tiny_llama_dir, tmp_path, case):
    exported, trained = _evaluated_export(student, tiny_llama_dir, tmp_path, *WEIGHT_ONLY[case])
    torch.testing.assert_close(exported, trained, rtol=0, atol=2 ** -8 * float(trained.abs().max()))


def test_an_export_transformers_decompresses_at_load_evaluates_too(student, tiny_llama_dir, tmp_path):
    """``run_compressed: false``: transformers decompresses it while loading and keeps no
    compressor; its bf16 weights crashed eval's fp32 forward."""
    exported, trained = _evaluated_export(student, tiny_llama_dir, tmp_path, *WEIGHT_ONLY["nvfp4"],
                                          run_compressed=False)
    torch.testing.assert_close(exported, trained, rtol=0, atol=2 ** -8 * float(trained.abs().max()))


def test_an_nvfp4_w4a4_export_evaluates_with_its_inputs_quantized(student, tiny_llama_dir, tmp_path):
    """Its inputs are quantized by compressed-tensors; a bf16 ulp of weight moves a few input
    codes downstream a whole FP4 step, so the logits agree loosely (top-1)."""
    exported, trained = _evaluated_export(student, tiny_llama_dir, tmp_path, "nvfp4", None, {})
    weight_only, _ = _evaluated_export(student, tiny_llama_dir, tmp_path / "a16", "nvfp4_a16", None, {})
    assert (exported.argmax(-1) == trained.argmax(-1)).float().mean() >= 0.9
    assert not torch.allclose(exported, weight_only)   # its inputs were quantized


@pytest.mark.parametrize("decompressed_at_load", [False, True], ids=["packed", "run_compressed-false"])
def test_a_w4a8_export_evaluates_with_the_weights_vllm_serves(student, tiny_llama_dir, tmp_path, decompressed_at_load):
    """vLLM's W4A8 kernel turns the bf16 group scales into FP8 tables at load, as the student
    trained; compressed-tensors' decompression (code x bf16 scale) gave eval weights up to ~4%
    of a layer's largest off -- also when transformers decompresses while loading.  Its inputs
    are FP8 per token in both."""
    model, config = student(tiny_llama_dir, "w4a16_int", 32, dtype="float32",   # fp32 master weights, as distill's
                            rules=[{"targets": r"mlp\.down_proj", "preset": "w4a8_fp8"}])   # K=128
    export_model(model, tiny_llama_dir, tmp_path / "export", "compressed-tensors", config)
    if decompressed_at_load:
        path = tmp_path / "export" / "config.json"
        written = json.loads(path.read_text())
        written["quantization_config"]["run_compressed"] = False
        path.write_text(json.dumps(written))
    loaded = load_model(str(tmp_path / "export"), torch.device("cpu"))
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"):
        trained = model.get_submodule(name).fake_quantized_weight()
        assert torch.equal(loaded.get_submodule(name).weight, trained), name
    exported, reference = _logits(loaded), _logits(model.float())
    assert (exported.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9
