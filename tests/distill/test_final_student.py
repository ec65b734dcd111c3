"""A saved student is rebuilt on the meta device and takes final/'s tensors: the same model as
the one trained, without first loading the base model's weights (which final/ holds anyway,
trained) -- half the peak memory of export and eval."""

from __future__ import annotations

import logging

import pytest
import torch

from qadpipe.config import load_config
from qadpipe.distill import student as student_module
from qadpipe.distill.student import build_student, load_final_student, save_student
from qadpipe.errors import ModelError
from qadpipe.quant.calibrate import calibrate


def _trained(model_dir, tmp_path, recipe):
    """A student whose weights and quantizer state moved off the base model's, saved as final/."""
    config = load_config(None, [f"model.path={model_dir}", *recipe])
    model = build_student(config, torch.device("cpu"))
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    calibrate(model, [{"input_ids": ids}], 1)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if tensor.is_floating_point():
                tensor.mul_(1.01)   # training moved everything: nothing may come from the base model
    final = save_student(tmp_path, model.state_dict(), config)
    return model.eval(), final, ids


@pytest.mark.parametrize("fixture, recipe", [
    ("tied_qwen3_moe_dir", ["quant.preset=w4a16_int", "quant.group_size=32", "quant.learnable=clip"]),
    ("tiny_llama_dir", ["quant.preset=nvfp4"]),   # calibrated input ranges: 'calibrated' comes with them
], ids=["tied-moe-learned-clip", "nvfp4-w4a4"])
def test_a_saved_student_is_rebuilt_without_reading_the_base_weights(fixture, recipe, tmp_path, request,
                                                                     monkeypatch):
    trained, final, ids = _trained(request.getfixturevalue(fixture), tmp_path, recipe)
    from qadpipe import models

    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("the base model's weights were read"))
    rebuilt, _ = load_final_student(final)
    assert not any(t.is_meta for t in [*rebuilt.parameters(), *rebuilt.buffers()])
    if rebuilt.config.tie_word_embeddings:
        assert rebuilt.get_output_embeddings().weight is rebuilt.get_input_embeddings().weight
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_a_model_the_meta_device_cannot_build_is_built_whole_with_a_warning(tiny_llama_dir, tmp_path, monkeypatch,
                                                                            caplog):
    trained, final, ids = _trained(tiny_llama_dir, tmp_path, ["quant.preset=w4a16_int", "quant.group_size=32"])

    def refuse(config):
        raise ModelError("model.path: x cannot be built on the meta device for distill.distributed: fsdp2's "
                         "sharded build (ValueError: init reads its weights)")

    monkeypatch.setattr(student_module, "build_student_skeleton", refuse)
    with caplog.at_level(logging.WARNING):
        rebuilt, _ = load_final_student(final)
    assert "the student is built whole, then overwritten by" in caplog.text
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_a_student_too_large_for_the_gpu_is_refused_before_the_copy(tiny_llama_dir, tmp_path, monkeypatch):
    """build_student refused it before loading; the meta-device rebuild went straight to .to(cuda)."""
    from qadpipe.errors import DistillError

    _, final, _ = _trained(tiny_llama_dir, tmp_path, ["quant.preset=w4a16_int", "quant.group_size=32"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 20, 1 << 30))
    with pytest.raises(DistillError, match=r"^model\.path: the student's fp32 weights take .* more than the 0\.0 GiB "
                                           r"free on cuda:0"):
        load_final_student(final, device="cuda:0")
