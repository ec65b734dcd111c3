"""Fused MoE experts (transformers 5's 3-D expert weights) fake-quantized per expert.

The reference is what a per-expert nn.Linear would get: each expert's ``[out, in]`` matrix
through the pure format functions (:func:`qadpipe.quant.formats.fake_quantize`, themselves
checked against the compressed-tensors library elsewhere), with an expert's own tensor-level
range where the format has one -- one range for its gate and up halves together, which vLLM
fuses into one GEMM.  The model's forward and gradients are compared with the same HF model
whose expert weights were replaced by that reference.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qadpipe.errors import QuantError
from qadpipe.quant.calibrate import calibrate
from qadpipe.quant.experts import QuantExperts, experts_layout
from qadpipe.quant.formats import fake_quantize
from qadpipe.quant.recipe import PRESETS as ALL_PRESETS
from qadpipe.quant.recipe import apply_recipe


def _qwen3_moe(seed: int = 0, width: int = 64) -> nn.Module:
    """A random Qwen3-MoE (4 experts, top 2) whose experts' in-features are ``width``."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=256, hidden_size=width, intermediate_size=128, moe_intermediate_size=width, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=width // 2, num_experts=4,
        num_experts_per_tok=2)).eval()


def _gpt_oss(seed: int = 0) -> nn.Module:
    """Experts stored transposed ([E, in, out]), gate/up interleaved, with biases."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    model = GptOssForCausalLM(GptOssConfig(
        vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["full_attention"])).eval()
    with torch.no_grad():   # its init leaves expert weights at 0
        for name, param in model.named_parameters():
            if "experts" in name:
                param.normal_(0, 0.05)
    return model


def _reference_experts(weight: torch.Tensor, spec, transposed: bool) -> torch.Tensor:
    """Each expert's ``[out, in]`` matrix through the pure format functions, its own range."""
    out = []
    for expert in weight:
        matrix = expert.T if transposed else expert
        amax = None if spec.dynamic else matrix.abs().amax()
        q = fake_quantize(matrix, spec, amax=amax)
        out.append(q.T if transposed else q)
    return torch.stack(out)


def _with_reference_experts(original: nn.Module, quantized: nn.Module) -> nn.Module:
    """``original`` with every quantized expert weight replaced by the per-expert reference."""
    reference = copy.deepcopy(original)
    for name, module in quantized.named_modules():
        if isinstance(module, QuantExperts):
            target = reference.get_submodule(name)
            for weight in module.layout.weight_names:
                value = _reference_experts(getattr(target, weight).detach(), module.spec, module.layout.transposed)
                getattr(target, weight).data.copy_(value)
    return reference


PRESETS = [("w4a16_int", 32), ("w4a16_int_asym", 32), ("w8a16_int", None), ("nvfp4_a16", None),
           ("mxfp4_a16", None), ("mxfp8_a16", None), ("ternary_twn", 32), ("bitnet_absmean", 32)]


@pytest.mark.parametrize("preset,group", PRESETS, ids=[p for p, _ in PRESETS])
def test_experts_are_quantized_as_one_linear_per_expert(quant_config, preset, group):
    original = _qwen3_moe()
    student = copy.deepcopy(original)
    recipe = apply_recipe(student, quant_config(preset=preset, group_size=group))
    assert sorted(recipe.experts) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    reference = _with_reference_experts(original, student)
    for name in recipe.experts:
        experts = student.get_submodule(name)
        for weight in experts.layout.weight_names:
            assert torch.equal(experts.fake_quantized(weight), getattr(reference.get_submodule(name), weight)), \
                (name, weight)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    # the Linears are quantized too: compare with the reference's experts AND the student's Linears
    for name, module in student.named_modules():
        if type(module).__name__ == "QuantLinear":
            reference.get_submodule(name).weight.data.copy_(module.fake_quantized_weight())
    assert torch.equal(student(ids).logits, reference(ids).logits)


def test_the_gate_and_up_halves_of_an_expert_share_one_nvfp4_global_scale(quant_config):
    """vLLM fuses an expert's gate and up projections into one GEMM with one global scale."""
    student = _qwen3_moe()
    with torch.no_grad():   # make expert 2's up half ten times larger than its gate half
        student.model.layers[0].mlp.experts.gate_up_proj[2, 64:] *= 10
    apply_recipe(student, quant_config(preset="nvfp4_a16"))
    experts = student.model.layers[0].mlp.experts
    matrices = experts.expert_matrices()
    gate, up = matrices["gate_proj"][2], matrices["up_proj"][2]
    assert torch.equal(gate.global_scale, up.global_scale)
    weight = experts.gate_up_proj[2].detach()
    assert torch.equal(experts.gate_up_proj_quantizer.amax[2], weight.abs().amax())
    assert not torch.equal(matrices["gate_proj"][1].global_scale, gate.global_scale)   # one range per expert


def test_straight_through_gradients_reach_the_expert_weights(quant_config):
    """Identity STE: the expert weights get exactly the gradient the reference model's
    (already quantized) weights get."""
    original = _qwen3_moe()
    student = copy.deepcopy(original)
    apply_recipe(student, quant_config(preset="nvfp4_a16", ignore=["lm_head", "self_attn"]))
    reference = _with_reference_experts(original, student)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    student(ids).logits.square().mean().backward()
    reference(ids).logits.square().mean().backward()
    for layer in range(2):
        for weight in ("gate_up_proj", "down_proj"):
            got = getattr(student.model.layers[layer].mlp.experts, weight).grad
            expected = getattr(reference.model.layers[layer].mlp.experts, weight).grad
            assert got is not None and got.abs().sum() > 0
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_transposed_experts_are_quantized_along_their_in_features(quant_config):
    """gpt-oss stores experts ``[E, in, out]`` with gate/up interleaved and biases: groups run
    along the input dimension, as a Linear's would."""
    original = _gpt_oss()
    layout = experts_layout(original.model.layers[0].mlp.experts)
    assert layout.transposed and not layout.concatenated and layout.biased
    student = copy.deepcopy(original)
    recipe = apply_recipe(student, quant_config(preset="w4a16_int", group_size=16,
                                                ignore=["lm_head", "self_attn", "router"]))
    assert list(recipe.experts) == ["model.layers.0.mlp.experts"]
    reference = _with_reference_experts(original, student)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(student(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert not torch.equal(student(ids).logits, original(ids).logits)


def test_state_dict_keeps_the_weight_names_and_adds_per_expert_ranges(quant_config):
    student = _qwen3_moe()
    before = set(student.state_dict())
    apply_recipe(student, quant_config(preset="nvfp4_a16"))
    after = {key for key in student.state_dict() if ".experts." in key}
    prefix = "model.layers.0.mlp.experts."
    assert after - before == {f"{p}{w}_quantizer.amax" for p in (prefix, prefix.replace(".0.", ".1."))
                              for w in ("gate_up_proj", "down_proj")}
    assert student.state_dict()[prefix + "gate_up_proj_quantizer.amax"].shape == (4,)
    fresh = _qwen3_moe(seed=5)
    apply_recipe(fresh, quant_config(preset="nvfp4_a16"), rebuild=True)
    fresh.load_state_dict(student.state_dict())
    assert torch.equal(fresh.model.layers[0].mlp.experts.fake_quantized("down_proj"),
                       student.model.layers[0].mlp.experts.fake_quantized("down_proj"))


def test_rules_and_ignore_reach_experts_by_module_name(quant_config, caplog):
    student = _qwen3_moe()
    recipe = apply_recipe(student, quant_config(preset="w4a16_int", group_size=32,
                                                rules=[{"targets": r"layers\.1\.mlp\.experts$", "preset": "nvfp4_a16"}],
                                                ignore=["lm_head", r"layers\.0\.mlp\.experts$"]))
    assert recipe.experts["model.layers.1.mlp.experts"].preset == "nvfp4_a16"
    assert "model.layers.0.mlp.experts" in recipe.ignored
    assert not isinstance(student.model.layers[0].mlp.experts, QuantExperts)
    dense = _qwen3_moe()
    with caplog.at_level("WARNING", logger="qadpipe.quant.recipe"):
        recipe = apply_recipe(dense, quant_config(preset="w4a16_int", group_size=32, moe_experts="dense"))
    assert not recipe.experts and "Qwen3MoeExperts" in caplog.text


@pytest.mark.parametrize("fields,said", [
    ({"preset": "w4a16_int", "group_size": 48}, "quant.group_size: w4a16_int group size 48 does not divide "
                                                "in_features 64 of model.layers.0.mlp.experts.gate_up_proj"),
])
def test_what_experts_cannot_take_is_one_line(quant_config, fields, said):
    with pytest.raises(QuantError) as caught:
        apply_recipe(_qwen3_moe(), quant_config(ignore=["lm_head", "self_attn"], **fields))
    assert said in str(caught.value) and "\n" not in str(caught.value)


def test_a_block_format_that_does_not_divide_the_experts_names_the_preset_not_the_group_size(quant_config):
    """NVFP4's blocks of 16 are the format's: the fix is another preset, not a group size."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=40, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts=4, num_experts_per_tok=2))
    with pytest.raises(QuantError, match=r"^quant.preset: nvfp4_a16 cannot quantize model.layers.0.mlp.experts.down_proj: "
                                         r"its in_features 40 is not a multiple of 16 \(its nvfp4 blocks are 16"):
        apply_recipe(model, quant_config(preset="nvfp4_a16", ignore=["lm_head", "self_attn"]))


def test_a_record_without_moe_experts_rebuilds_its_experts_dense(tmp_path):
    """A student recorded before ``quant.moe_experts`` existed trained its experts dense."""
    from qadpipe.config import build_config, recorded_config

    old = {"quant": {"preset": "w4a16_int"}}
    assert build_config(recorded_config(old)).quant.moe_experts == "dense"
    assert build_config(old).quant.moe_experts == "quantize"   # new runs quantize them
    assert old == {"quant": {"preset": "w4a16_int"}}   # the record itself is not changed
    assert build_config(recorded_config({"quant": {"moe_experts": "quantize"}})).quant.moe_experts == "quantize"


@pytest.mark.slow
def test_compiled_experts_train_bit_identical_to_eager(quant_config, caplog):
    """NVFP4 experts, one global scale each, through the compiled per-expert (vmap'd) forward:
    the logits and the clipped-STE gradients of eager, bit for bit, with no fallback logged."""
    caplog.set_level("ERROR", logger="qadpipe.quant.compiled")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4))
    results = {}
    for mode in ("off", "on"):
        student = _qwen3_moe().train()
        apply_recipe(student, quant_config(preset="nvfp4_a16", ste="clipped", compile=mode,
                                           ignore=["lm_head", "self_attn"]))
        logits = student(ids).logits
        logits.logsumexp(-1).sum().backward()
        experts = student.model.layers[0].mlp.experts
        results[mode] = (logits.detach(), experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone())
    assert "differs from eager" not in caplog.text
    for got, want in zip(results["on"], results["off"]):
        assert torch.equal(got, want)


def test_a_shared_expert_gate_stays_dense_as_vllm_serves_it(quant_config):
    """Qwen2-MoE's shared_expert_gate is an nn.Linear(hidden, 1) that vLLM builds with
    quant_config=None: quantized, its weight_packed did not load ("no module or parameter named
    'shared_expert_gate.weight_packed'"), after the training."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from qadpipe.quant.quantizers import QuantLinear

    torch.manual_seed(0)
    student = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
        shared_expert_intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        num_experts=4, num_experts_per_tok=2)).eval()
    recipe = apply_recipe(student, quant_config(preset="w4a16_int", group_size=32))
    mlp = student.model.layers[0].mlp
    assert type(mlp.shared_expert_gate) is nn.Linear and "model.layers.0.mlp.shared_expert_gate" in recipe.ignored
    assert isinstance(mlp.shared_expert.down_proj, QuantLinear)


def test_a_rule_for_experts_kept_dense_names_moe_experts(quant_config):
    """It said the regex "matches no nn.Linear (names look like ...q_proj)"."""
    with pytest.raises(QuantError, match=r"^quant.rules\[0\].targets: regex 'experts\$' matches MoE experts "
                                         r"\(model.layers.0.mlp.experts ...\), which quant.moe_experts: dense keeps "
                                         r"dense; set quant.moe_experts: quantize to quantize them$"):
        apply_recipe(_qwen3_moe(), quant_config(preset="w4a16_int", group_size=32, moe_experts="dense",
                                                rules=[{"targets": "experts$", "preset": "nvfp4_a16"}]))


# ----------------------------------------------------------------- quantized expert inputs
#
# The reference is vLLM's fused MoE as a loop written here: each expert's GEMMs over the
# tokens routed to it (in token order), its input rows fake-quantized by the pure format
# functions with the experts module's one range per projection -- the max over the experts
# that vLLM serves (amax_for_moe_activation_quant) -- then silu(gate) * up, the routing
# weights, and the sum over a token's experts.

ACTIVATION_PRESETS = ["nvfp4", "mxfp4", "mxfp8", "fp8", "fp8_static", "w8a8_int", "w4a8_fp8"]


def _ste(x: torch.Tensor, spec, amax) -> torch.Tensor:
    """fake_quantize with the identity straight-through gradient."""
    return x + (fake_quantize(x, spec, amax=amax) - x).detach()


def _reference_routed(experts: QuantExperts, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                      quantize_inputs: bool = True) -> torch.Tensor:
    """The weights are the student's Q(W) (checked against the pure functions above)."""
    spec = experts.input_spec
    ranges = {name: None if q.spec.dynamic else q.amax for name, q in experts.input_quantizers().items()}
    inputs = (lambda x, name: _ste(x, spec, ranges[name])) if quantize_inputs else (lambda x, name: x)
    gate_up, down = experts.fake_quantized("gate_up_proj"), experts.fake_quantized("down_proj")
    x = inputs(hidden, "gate_up_proj")
    out = torch.zeros_like(hidden)
    for e in range(gate_up.shape[0]):
        tokens, slots = torch.nonzero(index == e, as_tuple=True)   # token order
        if tokens.numel() == 0:
            continue
        gate, up = F.linear(x[tokens], gate_up[e]).chunk(2, dim=-1)
        h = inputs(F.silu(gate) * up, "down_proj")
        out = out.index_add(0, tokens, F.linear(h, down[e]) * weights[tokens, slots, None])
    return out


def _routing(experts_shape: tuple[int, ...], tokens: int, top_k: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(experts_shape[0], generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g).softmax(-1)
    return index, weights


@pytest.mark.parametrize("preset", ACTIVATION_PRESETS)
def test_quantized_expert_inputs_compute_what_vllms_fused_moe_computes(quant_config, preset):
    student = _qwen3_moe(width=128)   # w4a8_fp8's int4 groups are 128 wide
    recipe = apply_recipe(student, quant_config(preset=preset, ignore=["lm_head", "self_attn"]))
    assert recipe.experts["model.layers.0.mlp.experts"].input == ALL_PRESETS[preset].input
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    calibrate(student, [{"input_ids": ids}], 1)
    experts = student.model.layers[0].mlp.experts
    assert set(experts.input_quantizers()) == {"gate_up_proj", "down_proj"}
    hidden = torch.randn(24, 128, generator=torch.Generator().manual_seed(2), requires_grad=True)
    index, weights = _routing(tuple(experts.gate_up_proj.shape), 24)
    got = experts(hidden, index, weights)
    expected = _reference_routed(experts, hidden, index, weights)
    assert torch.equal(got, expected)
    assert not torch.equal(got, _reference_routed(experts, hidden, index, weights, quantize_inputs=False))
    # identity STE: the gradients of the reference, for the hidden states and the expert weights
    got.square().sum().backward()
    grads = (hidden.grad.clone(), experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone())
    for t in (hidden, experts.gate_up_proj, experts.down_proj):
        t.grad = None
    expected.square().sum().backward()
    for mine, reference in zip(grads, (hidden.grad, experts.gate_up_proj.grad, experts.down_proj.grad)):
        assert mine.abs().sum() > 0
        torch.testing.assert_close(mine, reference, rtol=1e-6, atol=1e-7)


def test_under_autocast_the_routed_experts_compute_in_its_dtype_as_linears_do(quant_config):
    """grouped_mm is not autocast-enabled: the routed forward must take bf16 itself, as the
    reference's F.linear does under the GPU's training autocast (here CPU's)."""
    student = _qwen3_moe(width=128)
    apply_recipe(student, quant_config(preset="nvfp4", ignore=["lm_head", "self_attn"]))
    calibrate(student, [{"input_ids": torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))}], 1)
    experts = student.model.layers[0].mlp.experts
    hidden = torch.randn(24, 128, generator=torch.Generator().manual_seed(2))
    index, weights = _routing(tuple(experts.gate_up_proj.shape), 24)
    with torch.no_grad():
        full = experts(hidden, index, weights)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = experts(hidden, index, weights)
            expected = _reference_routed(experts, hidden, index, weights)
    assert torch.equal(got, expected)
    assert not torch.equal(got, full)
    # gpt-oss's biased experts: grouped_mm adds no bias, so it lands after the bf16 rounding
    # that F.linear adds it before -- one bf16 ulp at most
    gpt_oss = _gpt_oss()
    apply_recipe(gpt_oss, quant_config(preset="mxfp8", ignore=["lm_head", "self_attn", "gate$|router"]))
    experts = gpt_oss.model.layers[0].mlp.experts
    hidden = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    index, weights = _routing(tuple(experts.gate_up_proj.shape), 16, seed=4)
    tensors = {name: experts.fake_quantized(name) for name in experts.layout.weight_names}
    tensors.update({n: p for n, p in experts.named_parameters(recurse=False) if n not in tensors})
    expert_of_row, order = torch.sort(index.reshape(-1), stable=True)   # the rows as _routed_forward sorts them
    rows = hidden[order // index.shape[1]]
    ends = torch.searchsorted(expert_of_row, torch.arange(experts.gate_up_proj.shape[0]), right=True).to(torch.int32)
    weight, bias = tensors["gate_up_proj"].transpose(1, 2), tensors["gate_up_proj_bias"]   # [E, out, in]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mine = experts._grouped_linear(rows, tensors, "gate_up_proj", ends, expert_of_row)
        loop = torch.stack([F.linear(row, weight[e], bias[e]) for row, e in zip(rows, expert_of_row.tolist())])
    assert mine.dtype == loop.dtype == torch.bfloat16
    # bf16(bf16(g) + b) vs bf16(g + b): apart by at most the roundings of g and of the sum
    bias_rows = bias[expert_of_row].float()
    apart = (mine.float() - loop.float()).abs()
    assert (apart <= 2 ** -7 * (loop.float().abs() + bias_rows.abs())).all()
    assert apart.max() > 0   # the bias does land after the rounding (else this would be the qwen3 case)


@pytest.mark.parametrize("build", [_qwen3_moe, _gpt_oss], ids=["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("preset", ["fp8", "nvfp4_a16"], ids=["routed", "transformers_own"])
def test_experts_no_token_reached_get_no_gradient_whatever_grouped_mm_says(quant_config, monkeypatch, build,
                                                                            preset):
    """Blackwell's grouped_mm backward writes non-zero weight gradients for empty groups
    (pytorch#172439): simulated here by a grouped_mm whose backward adds ones to every group's,
    under qadpipe's routed forward (quantized inputs) and transformers' own (weight-only)."""
    from qadpipe.quant import experts as experts_module

    real = F.grouped_mm

    class Blackwell(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, offs):
            ctx.save_for_backward(a, b, offs)
            return real(a, b, offs=offs)

        @staticmethod
        def backward(ctx, grad):
            a, b, offs = ctx.saved_tensors
            with torch.enable_grad():
                a_, b_ = a.detach().requires_grad_(), b.detach().requires_grad_()
                grad_a, grad_b = torch.autograd.grad(real(a_, b_, offs=offs), (a_, b_), grad)
            return grad_a, grad_b + 1, None

    student = build()
    apply_recipe(student, quant_config(preset=preset, ignore=["lm_head", "self_attn", "gate$|router"]))
    experts = student.model.layers[0].mlp.experts
    assert bool(experts.input_quantizers()) == (preset == "fp8")
    calls = []

    def blackwell(a, b, offs):
        calls.append(offs)
        return Blackwell.apply(a, b, offs)

    index = torch.tensor([[0, 1], [1, 0], [0, 1]])   # experts 2 and 3 get no token
    monkeypatch.setattr(F, "grouped_mm", blackwell)   # the one transformers calls too
    monkeypatch.setattr(experts_module, "empty_groups_get_gradients", lambda device: True)
    experts(torch.randn(3, 64), index, torch.full((3, 2), 0.5)).square().sum().backward()
    assert len(calls) == 2   # both projections went through it
    for weight in experts.layout.weight_names:
        grad = getattr(experts, weight).grad
        assert grad[2:].abs().sum() == 0 and grad[:2].abs().sum() > 0


@pytest.mark.parametrize("preset", ["fp8", "nvfp4_a16"], ids=["routed", "transformers_own"])
def test_off_blackwell_grouped_mm_itself_leaves_experts_no_token_reached_at_zero(quant_config, preset):
    """Why the mask is applied on Blackwell only: the CPU's grouped_mm (here, unmasked) gives
    empty groups no gradient; capability 10 and up gets the mask, Hopper (9.0) does not."""
    from qadpipe.quant import experts as experts_module

    student = _qwen3_moe()
    apply_recipe(student, quant_config(preset=preset, ignore=["lm_head", "self_attn", "gate$|router"]))
    experts = student.model.layers[0].mlp.experts
    assert not experts_module.empty_groups_get_gradients(experts.down_proj.device)
    index = torch.tensor([[0, 1], [1, 0], [0, 1]])
    experts(torch.randn(3, 64), index, torch.full((3, 2), 0.5)).square().sum().backward()
    for weight in experts.layout.weight_names:
        grad = getattr(experts, weight).grad
        assert grad[2:].abs().sum() == 0 and grad[:2].abs().sum() > 0
    capability = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "get_device_capability", lambda device: capability["now"])
        for capability["now"], masked in (((9, 0), False), ((10, 0), True), ((12, 0), True)):
            assert experts_module.empty_groups_get_gradients(torch.device("cuda", 0)) == masked


@pytest.mark.parametrize("build", [_qwen3_moe, _gpt_oss], ids=["qwen3_moe", "gpt_oss"])
def test_with_inputs_passed_through_the_routed_forward_is_transformers_own(quant_config, build):
    """The experts' own implementation (grouped_mm) on the same fake-quantized weights:
    gpt-oss's transposed, interleaved, biased experts and its clamped gate included."""
    student = build()
    apply_recipe(student, quant_config(preset="mxfp8", ignore=["lm_head", "self_attn", "gate$|router"]))
    experts = student.model.layers[0].mlp.experts
    for quantizer in experts.input_quantizers().values():
        quantizer.forward = lambda x: x
    hidden = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    index, weights = _routing(tuple(experts.gate_up_proj.shape), 16, seed=4)
    tensors = {name: experts.fake_quantized(name) for name in experts.layout.weight_names}
    tensors.update({n: p for n, p in experts.named_parameters(recurse=False) if n not in tensors})
    with torch.no_grad():
        own = torch.func.functional_call(experts._experts, tensors, (hidden, index, weights))
        torch.testing.assert_close(experts(hidden, index, weights), own, rtol=1e-5, atol=1e-6)
        assert not torch.equal(own, torch.zeros_like(own))


def test_calibration_ranges_the_experts_inputs_over_real_tokens_only(quant_config):
    """One range per experts module and projection, the max over the routed real tokens; a
    padded position counts in neither (its embedding, one large channel, survives the RMSNorm
    before the experts as an outlier, which the experts' weights on that channel amplify)."""
    student = _qwen3_moe(width=128)
    pad = 255
    with torch.no_grad():
        student.model.embed_tokens.weight[pad] = 0
        student.model.embed_tokens.weight[pad, 0] = 1000
        student.model.layers[1].mlp.experts.gate_up_proj[:, :, 0] *= 20
    apply_recipe(student, quant_config(preset="nvfp4", ignore=["lm_head", "self_attn"]))
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(5))
    ids[1, 6:] = pad
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 6:] = False
    experts = student.model.layers[1].mlp.experts
    seen = {}
    hook = experts.register_forward_pre_hook(lambda m, args: seen.update(hidden=args[0].detach(), index=args[1]))
    calibrate(student, [{"input_ids": ids, "attention_mask": mask.long()}], 1)
    hook.remove()
    real = mask.reshape(-1)
    hidden, index = seen["hidden"], seen["index"]
    gate_up = experts.fake_quantized("gate_up_proj").detach()
    down_inputs = torch.stack([torch.stack([F.silu(gate) * up for gate, up in
                                            ((gate_up[e] @ hidden[token]).chunk(2) for e in index[token])])
                               for token in range(hidden.shape[0])])   # [tokens, top_k, I]
    inputs = experts.input_quantizers()
    assert inputs["gate_up_proj"].amax.shape == () and inputs["down_proj"].amax.shape == ()
    torch.testing.assert_close(inputs["gate_up_proj"].amax, hidden[real].abs().max(), rtol=0, atol=0)
    torch.testing.assert_close(inputs["down_proj"].amax, down_inputs[real].abs().max(), rtol=1e-6, atol=0)
    # the padded rows were there, and left out
    assert hidden.abs().max() > 2 * inputs["gate_up_proj"].amax
    assert down_inputs.abs().max() > 1.5 * inputs["down_proj"].amax


def test_the_experts_input_ranges_are_state_and_reload_into_a_rebuilt_student(quant_config):
    student = _qwen3_moe()
    apply_recipe(student, quant_config(preset="nvfp4", ignore=["lm_head", "self_attn"]))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(6))
    calibrate(student, [{"input_ids": ids}], 1)
    prefix = "model.layers.0.mlp.experts."
    assert {f"{prefix}gate_up_proj_input_quantizer.amax", f"{prefix}down_proj_input_quantizer.amax"} <= \
        set(student.state_dict())
    fresh = _qwen3_moe(seed=5)
    apply_recipe(fresh, quant_config(preset="nvfp4", ignore=["lm_head", "self_attn"]), rebuild=True)
    with pytest.raises(QuantError, match="used before calibration"):
        fresh(ids)
    fresh.load_state_dict(student.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, student(ids).logits)


def test_the_routed_forward_takes_no_token_and_refuses_expert_parallel_routing(quant_config):
    student = _qwen3_moe()
    apply_recipe(student, quant_config(preset="mxfp8", ignore=["lm_head", "self_attn"]))
    experts = student.model.layers[0].mlp.experts
    nothing = experts(torch.zeros(0, 64), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert nothing.shape == (0, 64)
    experts._experts._is_expert_parallel = True   # what transformers' expert parallelism sets
    with pytest.raises(QuantError, match=r"^Qwen3MoeExperts: experts with quantized inputs take no expert "
                                         r"parallelism$"):
        experts(torch.randn(2, 64), torch.tensor([[0, 4], [1, 2]]), torch.full((2, 2), 0.5))


@pytest.mark.parametrize("learnable", ["lsq", "clip"])
def test_experts_learn_the_scales_a_linear_per_expert_learns(quant_config, learnable):
    """The reference is the Linear path (QuantLinear, checked against finite differences and
    the pure functions in test_quantizers.py): one per expert, initialised from its matrix.
    The experts' fake-quantized weights, and the gradients of their learned scales and weights,
    are those Linears', expert by expert -- an all-zero group's starting step included (its
    expert's smallest, not all the experts')."""
    from qadpipe.quant.quantizers import QuantLinear

    student = _qwen3_moe()
    with torch.no_grad():
        experts = student.model.layers[0].mlp.experts
        for weight, expert in ((experts.gate_up_proj, 1), (experts.down_proj, 2)):
            weight[expert] *= 10               # its smallest step above the other experts' smallest
            weight[expert, 3, :32] = 0         # and one group of it all zero
    apply_recipe(student, quant_config(preset="w4a16_int", group_size=32, learnable=learnable,
                                       ignore=["lm_head", "self_attn"]))
    experts = student.model.layers[0].mlp.experts
    for name in ("gate_up_proj", "down_proj"):
        weight = getattr(experts, name)
        linears = []
        for matrix in weight.detach():
            linear = nn.Linear(matrix.shape[1], matrix.shape[0], bias=False)
            linear.weight = nn.Parameter(matrix.clone())
            linears.append(QuantLinear.from_linear(linear, experts.spec, None, learnable=learnable))
        learned = getattr(experts, f"{name}_quantizer").learned
        if learnable == "lsq":
            assert torch.equal(learned.step.detach(), torch.cat([q.weight_quantizer.step.detach() for q in linears]))
        got = experts.fake_quantized(name)
        expected = torch.stack([q.weight_quantizer(q.weight) for q in linears])
        assert torch.equal(got, expected), name
        direction = torch.randn(got.shape, generator=torch.Generator().manual_seed(7))
        (got * direction).sum().backward()
        (expected * direction).sum().backward()
        param = learned.step if learnable == "lsq" else learned.clip_logit
        reference = torch.cat([(q.weight_quantizer.step if learnable == "lsq" else q.weight_quantizer.clip_logit).grad
                               for q in linears])
        assert param.grad.abs().sum() > 0
        torch.testing.assert_close(param.grad, reference, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(weight.grad, torch.stack([q.weight.grad for q in linears]), rtol=1e-6, atol=1e-9)


def test_clip_is_not_said_to_do_nothing_while_experts_learn_clips(quant_config, caplog):
    """Attention on lsq_int4 by a rule, experts on w4a16_int: the experts learn clips, so the
    warning to set quant.learnable: none (which would turn their clipping off) is not given."""
    config = quant_config(preset="w4a16_int", group_size=32, learnable="clip", ignore=["lm_head"],
                          rules=[{"targets": "self_attn", "preset": "lsq_int4", "group_size": 32}])
    with caplog.at_level("INFO", logger="qadpipe.quant.recipe"):
        recipe = apply_recipe(_qwen3_moe(), config)
    assert recipe.experts["model.layers.0.mlp.experts"].weight.kind.value == "int"
    assert "clip does nothing" not in caplog.text and "learn LSQ steps instead" in caplog.text
