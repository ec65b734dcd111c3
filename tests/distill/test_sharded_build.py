"""FSDP2's sharded build starts from a skeleton: the student's modules, recipe applied, its
state dict on the meta device.  Rank 0's whole student fills it name by name
(``set_model_state_dict``), so the skeleton must have exactly the names and shapes of
:func:`build_student`'s student, whatever the recipe adds (input ranges, LSQ steps, learned
clips, KV-cache quantizers, fused MoE experts), and no value but the buffers its config sets.
The whole-run checks (2 ranks against 1 process) are the slow tests of test_distributed.py."""

from __future__ import annotations

import pytest
import torch

from qadpipe.config import load_config
from qadpipe.distill.student import build_student, build_student_skeleton
from qadpipe.errors import ModelError
from qadpipe.quant.experts import QuantExperts


def shared_names(model: torch.nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one tensor (a tied head)."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return sorted(sorted(names) for names in groups.values() if len(names) > 1)


RECIPES = [("nvfp4", ()), ("w4a16_int", ("quant.group_size=32", "quant.learnable=lsq")),
           ("w4a16_int", ("quant.group_size=32", "quant.learnable=clip")), ("fp8", ("quant.kv_cache=fp8",))]


@pytest.mark.parametrize("preset,extra", RECIPES, ids=[f"{p}-{'-'.join(e)}" for p, e in RECIPES])
def test_the_skeleton_has_the_built_students_names_and_shapes_and_no_value(peaky_llama_dir, preset, extra):
    config = load_config(None, [f"model.path={peaky_llama_dir}", f"quant.preset={preset}", *extra])
    built = build_student(config, torch.device("cpu"))
    whole = built.state_dict()
    skeleton = build_student_skeleton(config)
    shapes = {name: tuple(value.shape) for name, value in skeleton.state_dict().items()}
    assert shapes == {name: tuple(value.shape) for name, value in whole.items()}
    assert all(tensor.is_meta for tensor in skeleton.state_dict().values())
    # the buffers outside the state dict are the config's, as the built student's: a resume from
    # shards, which fill the state dict only, needs nothing else
    outside = {name: buffer for name, buffer in skeleton.named_buffers() if name not in shapes}
    assert outside and all(torch.equal(buffer, dict(built.named_buffers())[name]) for name, buffer in outside.items())
    assert any("quantizer" in name for name in shapes)   # the recipe's state is there to be filled


@pytest.mark.parametrize("recipe", [("quant.preset=w4a16_int", "quant.group_size=32"), ("quant.preset=nvfp4",),
                                    ("quant.preset=w4a16_int", "quant.group_size=32", "quant.learnable=clip")],
                         ids=["w4a16_int", "nvfp4", "int4-clip"])
def test_a_skeleton_of_fused_moe_experts_keeps_the_tie_of_its_embeddings(tied_qwen3_moe_dir, recipe):
    config = load_config(None, [f"model.path={tied_qwen3_moe_dir}", *recipe, "quant.moe_experts=quantize"])
    whole = build_student(config, torch.device("cpu"))
    skeleton = build_student_skeleton(config)
    assert {n: tuple(v.shape) for n, v in skeleton.state_dict().items()} == \
        {n: tuple(v.shape) for n, v in whole.state_dict().items()}
    assert skeleton.get_output_embeddings().weight is skeleton.get_input_embeddings().weight
    assert shared_names(skeleton) == shared_names(whole) == [["lm_head.weight", "model.embed_tokens.weight"]]
    assert isinstance(skeleton.model.layers[0].mlp.experts, QuantExperts)


def test_an_architecture_that_cannot_be_built_on_meta_is_refused_in_one_line(peaky_llama_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    def computes_on_values(*args, **kwargs):
        raise NotImplementedError("Cannot copy out of meta tensor; no data!")

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", computes_on_values)
    config = load_config(None, [f"model.path={peaky_llama_dir}", "quant.preset=fp8"])
    with pytest.raises(ModelError) as info:
        build_student_skeleton(config)
    assert str(info.value) == (f"model.path: {peaky_llama_dir} cannot be built on the meta device for "
                               "distill.distributed: fsdp2's sharded build (NotImplementedError: Cannot copy out of "
                               "meta tensor; no data!); use distill.distributed: ddp, which builds the whole student "
                               "on each GPU")
