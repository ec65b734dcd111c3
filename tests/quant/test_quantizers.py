"""Quantizer modules: STE gradients, LSQ step gradient, data-driven init, forward == export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qadpipe.quant.formats import (Granularity, Kind, QuantSpec, dequantize, effective_scale, mse_best_scale,
                                   quantize, w4a8_served_factors)
from qadpipe.quant.quantizers import QuantLinear, Quantizer
from qadpipe.quant.recipe import PRESETS

WEIGHT_SPECS = {name: preset.weight for name, preset in PRESETS.items()}


@pytest.mark.parametrize("name", sorted(n for n, s in WEIGHT_SPECS.items() if s.kind is not Kind.LSQ))
def test_identity_ste_gradient_is_exactly_the_incoming_gradient(name):
    spec = WEIGHT_SPECS[name]
    torch.manual_seed(0)
    x = torch.randn(16, 256, requires_grad=True)
    quantizer = Quantizer(spec)
    if not spec.dynamic:
        quantizer.set_amax(x.detach().abs().amax())
    g = torch.randn(16, 256)
    quantizer(x).backward(g)
    assert torch.equal(x.grad, g)


def unbounded_float_round(y: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """Round to ``mantissa_bits`` with an unbounded exponent (no saturation), half to even:
    what a float element would round to if the format had no largest value."""
    m, e = torch.frexp(y.double())                      # y = m * 2**e, 0.5 <= |m| < 1
    steps = 2.0 ** (mantissa_bits + 1)
    return torch.round(m * steps) / steps * torch.pow(2.0, e.double())


def test_clipped_ste_masks_exactly_the_saturated_elements_fp8():
    # static per-tensor FP8 with amax 448: scale 1.  450..460 round to 448 on their own (the
    # clamp changes nothing); from 465 on, rounding alone would give 480 -- the clamp decides
    x = torch.linspace(-1000, 1000, 401, requires_grad=True)
    quantizer = Quantizer(QuantSpec(Kind.FP8, granularity=Granularity.TENSOR, dynamic=False), ste="clipped")
    quantizer.set_amax(torch.tensor(448.0))
    g = torch.randn(401)
    quantizer(x).backward(g)
    unclamped = unbounded_float_round(x.detach(), mantissa_bits=3)
    assert torch.equal(x.grad, g * (unclamped.abs() <= 448))
    assert x.grad[x.detach() == 460].item() != 0 and x.grad[x.detach() == 465].item() == 0


def test_clipped_ste_nvfp4_saturated_block_scale():
    # global amax 2688 -> global scale 1; block 0 amax 12 -> exact scale 2 (bound 12, no clip);
    # block 1 holds 5000 > 6 * 448: its scale saturates at 448, bound 2688, only 5000 clips
    x = torch.zeros(1, 32)
    x[0, :3] = torch.tensor([12.0, -3.0, 1.0])
    x[0, 16:19] = torch.tensor([5000.0, -100.0, 2000.0])
    x.requires_grad_(True)
    quantizer = Quantizer(QuantSpec(Kind.NVFP4, dynamic=False), ste="clipped")
    quantizer.set_amax(torch.tensor(2688.0))
    quantizer(x).sum().backward()
    expected = torch.ones(1, 32)
    expected[0, 16] = 0.0
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize("amax_fraction", [None, 0.3])
def test_clipped_ste_nvfp4_zeroes_only_what_the_clamp_changed(amax_fraction):
    """Random weights: with dynamic scales nothing clips (a block maximum lands up to ~6.4
    steps out when its FP8 scale rounds down, and rounds to 6 by itself), so no gradient is
    zeroed; with a static global amax below the weights', exactly the elements whose
    unbounded E2M1 rounding exceeds 6 lose theirs."""
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    spec = QuantSpec(Kind.NVFP4, dynamic=amax_fraction is None)
    quantizer = Quantizer(spec, ste="clipped")
    if amax_fraction is not None:
        quantizer.set_amax(w.abs().amax() * amax_fraction)
    x = w.clone().requires_grad_(True)
    quantizer(x).sum().backward()
    q = quantize(w, spec, amax=None if amax_fraction is None else w.abs().amax() * amax_fraction)
    steps = w.reshape(64, -1, 16) / effective_scale(q).reshape(64, -1, 1)
    kept = (unbounded_float_round(steps, mantissa_bits=1).abs() <= 6).reshape(w.shape)
    assert steps.abs().max() > 6                        # block maxima beyond the grid's last value
    assert torch.equal(x.grad, kept.float())
    assert kept.all() == (amax_fraction is None)


def _lsq_reference_grad(x: torch.Tensor, s: float, weights: torch.Tensor, qmin: int, qmax: int) -> float:
    """Esser et al. 2019, eq. 3: dv_hat/ds = -v/s + round(v/s) inside, qmin / qmax when clipped;
    times the gradient scale 1/sqrt(n * Qp) (section 2.2), n = elements per step."""
    v = x.double() / s
    inside = (v >= qmin) & (v <= qmax)
    per_element = torch.where(inside, -v + torch.round(v), torch.where(v < qmin, float(qmin), float(qmax)))
    return float((weights.double() * per_element).sum()) / (x.numel() * qmax) ** 0.5


def _surrogate_finite_difference(x: torch.Tensor, s: float, weights: torch.Tensor,
                                 qmin: int, qmax: int, h: float = 1e-6) -> float:
    """Central difference of the STE surrogate ``(clamp(x/s) + c) * s``: the rounding offsets
    ``c = round(v) - v`` frozen at s, the clamp kept."""
    xd, w = x.double(), weights.double()
    v0 = torch.clamp(xd / s, qmin, qmax)
    offset = torch.round(v0) - v0

    def loss(step: float) -> float:
        return float((w * (torch.clamp(xd / step, qmin, qmax) + offset) * step).sum())

    return (loss(s + h) - loss(s - h)) / (2 * h)


@pytest.mark.parametrize("bits", [2, 4])
def test_lsq_step_gradient_matches_paper_and_finite_differences(bits):
    """Four channels, one step each: the gradient scale counts the elements per step (512),
    not the whole weight's (2048) -- with one channel the two were the same."""
    torch.manual_seed(bits)
    spec = QuantSpec(Kind.LSQ, bits, Granularity.CHANNEL, narrow_range=False)   # the paper's grid
    qmin, qmax = spec.code_range
    x = torch.randn(4, 512)
    quantizer = Quantizer(spec, learnable="lsq", weight=x)
    s = 0.25 if bits == 2 else 0.125                  # exactly representable in bf16
    with torch.no_grad():
        quantizer.step.fill_(s)
    weights = torch.randn(4, 512)
    (quantizer(x) * weights).sum().backward()
    for row in range(4):
        grad = float(quantizer.step.grad.reshape(-1)[row])
        xr, wr = x[row:row + 1], weights[row:row + 1]
        assert grad == pytest.approx(_lsq_reference_grad(xr, s, wr, qmin, qmax), rel=1e-4)
        fd = _surrogate_finite_difference(xr, s, wr, qmin, qmax) / (xr.numel() * qmax) ** 0.5
        assert grad == pytest.approx(fd, rel=1e-4)


def test_learnable_parameters_start_from_the_data():
    torch.manual_seed(5)
    w = torch.randn(32, 128) ** 3
    spec = QuantSpec(Kind.LSQ, 4, Granularity.GROUP, 64, narrow_range=False)
    lsq = Quantizer(spec, learnable="lsq", weight=w)
    assert torch.equal(lsq.step.detach(), mse_best_scale(w, spec).float())
    assert lsq.step.detach().unique().numel() > 10        # one per group, not a constant
    clip = Quantizer(QuantSpec(Kind.INT, 4, Granularity.GROUP, 64), learnable="clip", weight=w)
    ratio = torch.sigmoid(clip.clip_logit.detach())
    assert (ratio <= 0.995 + 1e-6).all() and ratio.min() < 0.9


def test_learnable_starts_do_not_depend_on_the_weights_size():
    """A power of two scales every rounding of the format alike, so weights times 2^-70 must start
    at the same clip ratios and at steps times 2^-70.  The search's squared errors underflowed
    (every ratio tied) and the ratio's 1e-12 floor moved the start of groups below it."""
    torch.manual_seed(6)
    w = torch.randn(16, 64)
    spec = QuantSpec(Kind.INT, 4, Granularity.GROUP, 32)
    tiny = 2.0 ** -70
    clip, clip_tiny = (Quantizer(spec, learnable="clip", weight=x) for x in (w, w * tiny))
    assert torch.equal(clip.clip_logit, clip_tiny.clip_logit)
    assert torch.equal(mse_best_scale(w * tiny, spec), mse_best_scale(w, spec) * tiny)
    assert torch.sigmoid(clip.clip_logit).min() < 0.99    # some groups do clip


def test_a_learned_clip_scale_is_rounded_once_whatever_the_device_computes_in_between():
    """sigmoid(logit) * amax / 7 (symmetric int4: codes -7..7) correctly rounded to fp32 (against mpmath):
    the scale a GPU trains with is the one the CPU export writes.  In fp32 three roundings gave
    another scale for 39% of these groups."""
    import mpmath
    import numpy as np

    torch.manual_seed(6)
    w = torch.randn(64, 256) ** 3
    clip = Quantizer(QuantSpec(Kind.INT, 4, Granularity.GROUP, 32), learnable="clip", weight=w)
    with torch.no_grad():
        clip.clip_logit.add_(torch.randn_like(clip.clip_logit))
    mine = clip._learned_scale(w).detach()
    live = w.abs().reshape(64, 8, 32).amax(-1)
    mpmath.mp.dps = 40
    for logit, amax, got in zip(clip.clip_logit.detach().flatten().tolist(), live.flatten().tolist(),
                                mine.flatten().tolist()):
        exact = mpmath.mpf(amax) / (1 + mpmath.exp(-mpmath.mpf(logit))) / 7
        near = np.float32(float(exact))
        candidates = [np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf))]
        assert got == min(candidates, key=lambda c: abs(mpmath.mpf(float(c)) - exact))


def test_an_all_zero_group_gets_a_step_that_can_train():
    """mse_best_scale gives an all-zero group step 0, where |s| and the zero-scale
    substitute pass no gradient: once its weights moved, the step would stay 0 for good."""
    w = torch.randn(4, 128)
    w[1, :64] = 0.0
    spec = QuantSpec(Kind.LSQ, 4, Granularity.GROUP, 64, narrow_range=False)
    lsq = Quantizer(spec, learnable="lsq", weight=w)
    best = mse_best_scale(w, spec).float()
    assert best[1, 0] == 0 and torch.equal(lsq.step.detach()[best > 0], best[best > 0])
    assert lsq.step.detach()[1, 0] == best[best > 0].min()
    moved = w.clone()
    moved[1, :64] = 0.05 * torch.randn(64)
    (lsq(moved) - moved).pow(2).sum().backward()   # the quantization error the step can shrink
    assert lsq.step.grad[1, 0] != 0


def test_an_lsq_step_that_an_update_made_negative_quantizes_by_its_size():
    """The step is used as |s| (LSQ's scale is a magnitude): an optimizer step past zero must
    not mirror the grid, whose [-8, 7] codes are not symmetric."""
    w = torch.randn(4, 64)
    spec = QuantSpec(Kind.LSQ, 4, Granularity.GROUP, 32, narrow_range=False)
    positive, negative = Quantizer(spec, learnable="lsq", weight=w), Quantizer(spec, learnable="lsq", weight=w)
    with torch.no_grad():
        positive.step.fill_(0.125)
        negative.step.fill_(-0.125)
    assert torch.equal(positive(w), negative(w)) and positive(w).min() >= -8 * 0.125


@pytest.mark.parametrize("preset", ["nvfp4_a16", "fp8_static", "w4a16_int"])
def test_an_all_zero_weight_reloads_calibrated(preset):
    """A weight's amax of 0 is its range (an all-zero Linear), not "never calibrated": a
    reload (--resume, eval of final/) must run it."""
    from qadpipe.quant.recipe import PRESETS

    spec = PRESETS[preset].weight
    zero = nn.Linear(128, 16, bias=False)
    nn.init.zeros_(zero.weight)
    saved = QuantLinear.from_linear(zero, spec, None).state_dict()
    rebuilt = QuantLinear.from_linear(nn.Linear(128, 16, bias=False), spec, None)
    rebuilt.load_state_dict(saved)
    assert torch.equal(rebuilt(torch.randn(3, 128)), torch.zeros(3, 16))


@pytest.mark.parametrize("name,learnable", [(n, "none") for n in sorted(WEIGHT_SPECS)]
                         + [(n, learn) for n in ("w4a16_int", "w8a16_int", "w4a8_fp8") for learn in ("lsq", "clip")])
def test_forward_weight_is_bitwise_what_export_reads(name, learnable):
    spec = WEIGHT_SPECS[name]
    torch.manual_seed(6)
    linear = nn.Linear(256, 48).to(torch.bfloat16)
    if learnable == "lsq":
        from dataclasses import replace
        spec = replace(spec, kind=Kind.LSQ)
    layer = QuantLinear.from_linear(linear, spec, None, learnable=learnable if spec.kind is not Kind.LSQ else "lsq")
    if learnable != "none" or spec.kind is Kind.LSQ:          # move off the initial point
        with torch.no_grad():
            for p in layer.weight_quantizer.parameters():
                p.mul_(0.93)
    seen = {}
    layer.register_forward_pre_hook(lambda m, args: seen.update(w=m.weight_quantizer(m.weight).detach()))
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    y = layer(x)
    assert torch.equal(seen["w"], layer.fake_quantized_weight())
    assert torch.equal(y, torch.nn.functional.linear(x, layer.fake_quantized_weight(), layer.bias))
    q = layer.quantized_weight()
    assert torch.equal(dequantize(q), layer.fake_quantized_weight())
    assert q.codes.shape == (48, 256)


def test_from_linear_keeps_the_same_parameters():
    linear = nn.Linear(64, 32)
    layer = QuantLinear.from_linear(linear, QuantSpec(Kind.INT, 4, Granularity.GROUP, 32), None)
    assert layer.weight is linear.weight and layer.bias is linear.bias


def test_w4a8_weight_uses_fp8_converted_group_scales():
    """The group scales are what vLLM's convert_bf16_scales_to_fp8 makes of the bf16 ones, run
    here through vLLM's own QuantFP8 (its forward_native multiplies by the reciprocal of the row
    scale: 58 of 131072 group scales of a 4096 x 4096 weight differ from dividing).  The weights
    are looked up as vLLM's ops.cutlass_pack_scale_fp8 tables them (CUTLASS packed_scale_t:
    E4M3(s8 * k) for k = 1..8, the sign applied after), then times the row factor."""
    pytest.importorskip("vllm")
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape

    torch.manual_seed(0)
    w = torch.randn(1024, 4096) * 0.02
    spec = WEIGHT_SPECS["w4a8_fp8"]
    q = quantize(w, spec)
    with set_current_vllm_config(VllmConfig()):
        fp8_scales, row_scales = QuantFP8(static=False, group_shape=GroupShape.PER_TOKEN).forward_native(q.scale)
    fp8_scales = (fp8_scales.float() / 8.0).to(torch.float8_e4m3fn)       # as convert_bf16_scales_to_fp8
    s8, row = w4a8_served_factors(q.scale)
    assert torch.equal(s8, fp8_scales.float()) and torch.equal(row, row_scales * 8.0)
    table = torch.stack([(fp8_scales.float() * k).to(torch.float8_e4m3fn).float() for k in range(9)], -1)  # [.., G, 9]
    codes = q.codes.reshape(1024, 32, 128).long()
    looked_up = torch.gather(table, -1, codes.abs()) * codes.sign()
    served = (looked_up * (row_scales * 8.0).unsqueeze(-1)).reshape(1024, 4096)
    assert torch.equal(dequantize(q), served)
    linear = q.codes.float() * (fp8_scales.float() * row_scales * 8.0).repeat_interleave(128, dim=-1)
    differs = (dequantize(q) != linear).float().mean().item()
    assert 0.10 < differs < 0.25, differs   # codes 3, 5, 6, 7 round in the table: ~17% of the weights


def test_w4a8_channel_scale_has_vllms_per_token_fp8_floor():
    """vLLM converts the group scales with its dynamic per-token FP8 quant, whose scale is never
    below 1/(448*512).  Hand-worked, s = [5, 1] * 2**-16: c = 1/229376 (not 5 * 2**-16 / 448),
    s/c = [17.5, 3.5] -> E4M3 [18, 3.5], /8 = [2.25, 0.4375] (exact), effective s8 * 8c.  Without
    the floor: s/c = [448, 89.6 -> 88], effective [5, 0.98] * 2**-16."""
    spec = WEIGHT_SPECS["w4a8_fp8"]
    w = torch.cat([torch.full((1, 128), 35 * 2.0**-16), torch.full((1, 128), 7 * 2.0**-16)], dim=1)
    q = quantize(w, spec)
    assert q.scale.float().tolist() == [[5 * 2.0**-16, 2.0**-16]]
    c = torch.tensor(1 / (448 * 512), dtype=torch.float32)
    s8, row = w4a8_served_factors(q.scale)
    assert s8.tolist() == [[2.25, 0.4375]] and torch.equal(row, (c * 8).reshape(1, 1))
    # the weights: code 7 of the first group is E4M3(7 * 2.25 = 15.75) = 16, code 7 of the second
    # E4M3(7 * 0.4375 = 3.0625) = 3.0 (steps of 1 in [8, 16), of 0.25 in [2, 4))
    assert q.codes[0, 0].item() == 7 and q.codes[0, 128].item() == 7
    assert dequantize(q)[0, [0, 128]].tolist() == (torch.tensor([16.0, 3.0]) * c * 8).tolist()


def test_w4a8_clipped_ste_clips_against_the_scale_the_codes_were_divided_by():
    """Codes are round(w / s_bf16) clamped to [-7, 7]; the FP8-converted scale only dequantizes.
    A group whose converted scale fell below s_bf16 must not zero gradients nothing clipped."""
    torch.manual_seed(0)
    spec = WEIGHT_SPECS["w4a8_fp8"]
    w = torch.randn(4, 256) * 0.02
    w[:, 128:] *= 2e-4        # a group ~5000x smaller than its row's largest: its FP8 scale rounds down
    q = quantize(w, spec)
    assert ((w / q.scale.float().repeat_interleave(128, dim=-1)).abs() <= 7.5).all()   # no code clips
    x = w.clone().requires_grad_(True)
    Quantizer(spec, ste="clipped")(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(w))


def test_w4a8_learned_step_trains_through_the_fp8_scale_conversion():
    """W4A8 with LSQ: codes against the learned bf16 step, values times the FP8 scale vLLM
    derives from it; the conversion's rounding passes the step's gradient straight through."""
    from dataclasses import replace

    torch.manual_seed(0)
    w = torch.randn(16, 256) * 0.02
    spec = replace(WEIGHT_SPECS["w4a8_fp8"], kind=Kind.LSQ)
    quantizer = Quantizer(spec, learnable="lsq", weight=w)
    y = quantizer(w)
    assert torch.equal(y, dequantize(quantize(w, spec, scale=quantizer.step.detach())))
    (y * torch.randn_like(y)).sum().backward()
    assert quantizer.step.grad is not None and quantizer.step.grad.isfinite().all()
    assert (quantizer.step.grad != 0).float().mean() > 0.9
