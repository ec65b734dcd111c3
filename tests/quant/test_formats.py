"""Format numerics against hand-worked values, brute-force references and torch's FP8 cast."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from qadpipe.errors import QuantError
from qadpipe.quant.formats import (
    Kind, MXScaleRule, QuantSpec, dequantize, fake_quantize, inside_range, mse_best_scale,
    exact_quotient, quantize, round_to_bf16, round_to_e2m1, round_to_fp8,
)

GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _e2m1_brute_force(y: torch.Tensor) -> torch.Tensor:
    """Nearest grid point by explicit distance; on an exact tie the one with an even index
    (mantissa bit 0).  Written independently of round_to_e2m1's step trick."""
    a = y.abs().clamp(max=6.0).double()
    dist = (a.unsqueeze(-1) - GRID.double()).abs()
    best = dist.min(-1, keepdim=True).values
    candidates = dist == best
    index = torch.arange(8)
    even_first = torch.where(candidates, index % 2 * 10 + index, torch.full_like(dist, 99, dtype=torch.long))
    chosen = even_first.argmin(-1)
    return torch.copysign(GRID[chosen], y)


def test_e2m1_grid_is_fixed_and_every_tie_goes_to_even():
    assert torch.equal(round_to_e2m1(GRID), GRID)
    assert torch.equal(round_to_e2m1(-GRID), -GRID)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    expected = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0])
    assert torch.equal(round_to_e2m1(ties), expected)
    assert torch.equal(round_to_e2m1(-ties), -expected)
    nudged = torch.nextafter(ties, torch.full_like(ties, 10.0))
    assert torch.equal(round_to_e2m1(nudged), torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]))


def test_e2m1_matches_brute_force_on_a_dense_sweep():
    y = torch.linspace(-6.0, 6.0, 48_001)   # step 2.5e-4 hits every tie exactly
    assert torch.equal(round_to_e2m1(y), _e2m1_brute_force(y))


def test_fp8_cast_saturates_at_448_and_never_makes_nan():
    x = torch.tensor([0.0, 1.0, -3.3, 447.0, 448.0, 464.0, 479.0, 480.0, 1e6, -1e6, -500.0])
    plain = x.to(torch.float8_e4m3fn).float()   # saturates on some builds, NaN on others
    ours = round_to_fp8(x).float()
    assert not torch.isnan(ours).any()
    assert ours[5:].abs().max() == 448.0 and ours[8] == 448.0 and ours[9] == -448.0
    inside = x.abs() <= 448
    assert torch.equal(ours[inside], plain[inside])


@pytest.mark.parametrize("granularity", ["tensor", "channel", "token"])
def test_fp8_fake_quant_matches_a_torch_cast_reference(granularity):
    torch.manual_seed(0)
    x = torch.randn(6, 64) * torch.logspace(-3, 2, 6).unsqueeze(1)
    spec = QuantSpec(Kind.FP8, granularity=granularity)
    amax = x.abs().amax() if granularity == "tensor" else x.abs().amax(-1, keepdim=True)
    s = amax / 448.0
    reference = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    assert torch.equal(fake_quantize(x, spec), reference)


def test_fp8_per_token_scale_has_vllms_floor():
    """vLLM's dynamic per-token FP8 scale is max(amax/448, 1/(448*512)).  Hand-worked for a
    token of amax 1e-4: scale 1/229376; x/scale = 22.94 -> 22, -11.47 -> -11, 4.59 -> 4.5
    (E4M3 steps 2, 1, 0.5 there).  A large token keeps amax/448."""
    x = torch.tensor([[1e-4, -5e-5, 0.0, 2e-5], [448.0, 1.0, -2.0, 0.0]])
    q = quantize(x, QuantSpec(Kind.FP8, granularity="token"))
    floor = torch.tensor(1 / (448 * 512), dtype=torch.float32)
    assert torch.equal(q.scale, torch.stack([floor, torch.tensor(1.0)]).reshape(2, 1))
    assert q.codes.float().tolist() == [[22.0, -11.0, 0.0, 4.5], [448.0, 1.0, -2.0, 0.0]]


def test_int4_symmetric_hand_worked():
    x = torch.tensor([[7.0, -3.5, 0.5, 2.5, -7.0, 1.49, 6.6, 0.0]])
    q = quantize(x, QuantSpec(Kind.INT, 4, "channel"))     # amax 7 -> scale 1, codes in [-7, 7]
    assert q.scale.item() == 1.0
    assert q.codes.tolist() == [[7, -4, 0, 2, -7, 1, 7, 0]]
    full = quantize(x, QuantSpec(Kind.INT, 4, "channel", narrow_range=False))   # scale 7/7.5
    assert full.scale.dtype == torch.bfloat16
    assert full.scale.item() == 239 / 256       # 7/7.5 = 0.9333 -> bf16 1.1101111b x 2^-1
    # x / 0.93359375 = 7.498, -3.749, 0.536, 2.678, -7.498, 1.596, 7.069, 0 -> nearest
    assert full.codes.tolist() == [[7, -4, 1, 3, -7, 2, 7, 0]]


def test_int4_asymmetric_hand_worked():
    x = torch.tensor([[0.0, 1.5, 3.0, 15.0]])    # min 0 (0 always representable), max 15
    q = quantize(x, QuantSpec(Kind.INT, 4, "channel", symmetric=False))
    assert q.scale.item() == 1.0 and q.zero_point.item() == -8
    assert q.codes.tolist() == [[-8, -6, -5, 7]]      # 1.5 -> 2 (half to even), 3 -> 3
    assert dequantize(q).tolist() == [[0.0, 2.0, 3.0, 15.0]]


def _bf16_edge_cases() -> torch.Tensor:
    """Exact ties both ways (low half 0x8000 with the kept part even and odd), one bit either
    side of a tie, subnormals, the largest finite fp32 (rounds to inf), signed zeros, inf, NaN."""
    patterns = [0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x00008000, 0x00018000, 0x00000001,
                0x007FFFFF, 0x7F7FFFFF, 0x7F7F7FFF, 0x00000000, 0x80000000, 0x7F800000, 0x7FC00000]
    bits = torch.tensor(patterns + [p | 0x80000000 for p in patterns], dtype=torch.int64)
    return bits.to(torch.int32).view(torch.float32)


def test_round_to_bf16_matches_torchs_cast_on_ties_subnormals_overflow_and_random_bits():
    """Against torch's own fp32 -> bf16 cast (round to nearest even): a separate implementation."""
    x = torch.cat([_bf16_edge_cases(),
                   torch.randint(-2**31, 2**31, (1 << 20,), generator=torch.Generator().manual_seed(0),
                                 dtype=torch.int64).to(torch.int32).view(torch.float32)])
    want = x.to(torch.bfloat16).float()
    got = round_to_bf16(x)
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(got[finite].view(torch.int32), want[finite].view(torch.int32))


def test_round_to_bf16_survives_a_compiler_that_drops_cast_round_trips():
    """Inductor's default drops ``x.to(bfloat16).float()`` as a no-op (the check below shows it,
    so this test would notice a torch that stopped doing so); the bit arithmetic of
    round_to_bf16 is kept.  torch 2.11 dropped the cast even with ``emulate_precision_casts``,
    and every compiled INT fake-quant then differed from eager."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 1e-2
    torch._dynamo.reset()
    dropped = torch.compile(lambda t: t.to(torch.bfloat16).float() * 3.0)(x)
    assert not torch.equal(dropped, x.to(torch.bfloat16).float() * 3.0), "inductor now keeps the cast"
    kept = torch.compile(lambda t: round_to_bf16(t) * 3.0)(x)
    assert torch.equal(kept, x.to(torch.bfloat16).float() * 3.0)


@pytest.mark.parametrize("constant", [448.0, 6.0, 7.0, 7.5, 127.0, 255.0])
def test_exact_quotient_is_numpys_fp32_division_however_the_fp64_step_is_done(constant):
    """Reference: numpy's IEEE fp32 division.  Also emulates CUDA eager, which divides by a
    scalar as a multiply by the fp64 reciprocal: the fp32 result must not change."""
    import numpy as np

    g = torch.Generator().manual_seed(int(constant))
    x = torch.cat([torch.rand(1 << 18, generator=g) * 10.0 ** torch.randint(-40, 38, (1 << 18,), generator=g),
                   torch.tensor([0.0, 1e-45, 3.4e38, 448.0 * 7.0])]).float()
    want = torch.from_numpy(x.numpy() / np.float32(constant))
    assert torch.equal(exact_quotient(x, constant), want)
    assert torch.equal((x.double() * (1.0 / constant)).float(), want)
    amax = x[x > 0]
    with np.errstate(over="ignore"):   # constant / 1e-45 is inf in both
        assert torch.equal(exact_quotient(constant, amax), torch.from_numpy(np.float32(constant) / amax.numpy()))


def test_int_scale_is_rounded_to_bf16_before_codes():
    x = torch.tensor([[1.0, 0.3337, -0.71]])
    q = quantize(x, QuantSpec(Kind.INT, 8, "channel"))
    s = torch.tensor(1.0 / 127).to(torch.bfloat16).float()
    assert q.scale.float().item() == s.item()
    assert torch.equal(dequantize(q), (torch.round(x / s).clamp(-127, 127) * s))


def test_asymmetric_int_hand_worked_zero_point():
    """int4 asymmetric, one channel [-1.7, 13.3]: scale (13.3 + 1.7) / 15 = 1, zero point
    round(-8 + 1.7) = -6, codes round(x / 1 - 6) = [-8, 7] -> [-2, 13].  (A zero point
    floored to -7 shifts the range a step: -1.7 would clip to -1.)"""
    q = quantize(torch.tensor([[-1.7, 13.3]]), QuantSpec(Kind.INT, 4, "channel", symmetric=False))
    assert q.scale.item() == 1.0 and q.zero_point.tolist() == [[-6]] and q.codes.tolist() == [[-8, 7]]
    assert dequantize(q).tolist() == [[-2.0, 13.0]]


def test_ternary_hand_worked():
    x = torch.tensor([[1.0, -2.0, 0.1, 3.0]])
    twn = quantize(x, QuantSpec(Kind.TWN, granularity="channel"))      # delta = 0.7*1.525 = 1.0675
    assert twn.codes.tolist() == [[0, -1, 0, 1]] and twn.scale.item() == 2.5
    # delta = 0.7*1.55 = 1.085 keeps 1.1 (0.75 would drop it: delta 1.1625)
    twn = quantize(torch.tensor([[1.1, -2.0, 0.1, 3.0]]), QuantSpec(Kind.TWN, granularity="channel"))
    assert twn.codes.tolist() == [[1, -1, 0, 1]]
    assert twn.scale.item() == torch.tensor((1.1 + 2.0 + 3.0) / 3).to(torch.bfloat16).item()
    absmean = quantize(x, QuantSpec(Kind.ABSMEAN, granularity="channel"))   # gamma = 1.525
    assert absmean.codes.tolist() == [[1, -1, 0, 1]]
    assert absmean.scale.item() == torch.tensor(1.525).to(torch.bfloat16).item()
    sherry = quantize(x, QuantSpec(Kind.SHERRY, granularity="channel"))    # drop 0.1 of 4
    assert sherry.codes.tolist() == [[1, -1, 0, 1]] and sherry.scale.item() == 2.0
    # TWN keeps |x| > delta (Li et al.): 7 is exactly 0.7 x mean 10, so it is dropped
    tie = quantize(torch.tensor([[7.0, 13.0, 10.0, 10.0]]), QuantSpec(Kind.TWN, granularity="channel"))
    assert tie.codes.tolist() == [[0, 1, 1, 1]] and tie.scale.item() == 11.0
    # absmean's codes are taken against the stored (bf16) gamma: 4.014 / 4 = 1.0035 is stored as
    # 1.0 (below the 1.00390625 midpoint), so 0.501 rounds to 1 as the exported scale serves it
    # (against 1.0035 it would be 0.499 -> 0)
    near = quantize(torch.tensor([[0.501, 1.171, 1.171, 1.171]]), QuantSpec(Kind.ABSMEAN, granularity="channel"))
    assert near.scale.item() == 1.0 and near.codes.tolist() == [[1, 1, 1, 1]]


#: Groups whose exact scale lies just above a bf16 rounding boundary, reached only when the
#: 4e-7s and 2e-7s count: summed into the 8.03s (6.02s) first, fp32 drops each of them (half
#: an fp32 step there is 4.8e-7 (2.4e-7)).  ABSMEAN: the mean of all 16 is 1.0039063 > the
#: 1.00390625 midpoint; Sherry keeps both big values and ten small ones (three of each four).
_ORDER_SENSITIVE_GROUPS = {
    Kind.ABSMEAN: [8.03125 - 2.0 ** -20] * 2 + [4e-7] * 14,
    Kind.SHERRY: [6.0234375 - 2.0 ** -21, 2e-7, 2e-7, 0.0] * 2 + [2e-7, 2e-7, 2e-7, 0.0] * 2,
}


@pytest.mark.parametrize("kind", list(_ORDER_SENSITIVE_GROUPS))
def test_ternary_scales_do_not_depend_on_the_summation_order(kind):
    """CUDA and CPU sum a group in different orders; in fp32 the stored scale of these groups
    was 1.0 in some orders and 1.0078125 in others, so a student trained on one device and
    exported on the other could get another scale.  Reference: the exact mean (fractions) of
    the values the format keeps, rounded to fp32 and then bf16, whatever the order."""
    from fractions import Fraction
    import random

    group = torch.tensor(_ORDER_SENSITIVE_GROUPS[kind]).tolist()   # as fp32 values
    exact = [Fraction(v) for v in group]
    if kind is Kind.SHERRY:   # Sherry keeps 3 of each run of 4, so shuffle within runs, and runs
        exact = [v for run in range(4) for v in sorted(exact[4 * run:4 * run + 4], reverse=True)[:3]]
    expected = torch.tensor(float(sum(exact) / len(exact)), dtype=torch.float32).to(torch.bfloat16).item()
    shuffle = random.Random(0).shuffle
    for _ in range(50):
        runs = [group[i:i + 4] for i in range(0, len(group), 4)]
        for run in runs:
            shuffle(run)
        shuffle(runs)
        order = [v for run in runs for v in run]
        if kind is Kind.ABSMEAN:
            shuffle(order)
        scale = quantize(torch.tensor([order]), QuantSpec(kind, granularity="channel")).scale.item()
        assert scale == expected, order


def test_sherry_breaks_ties_by_position_lowest_first():
    """Equal magnitudes at the 3:4 boundary (common in bf16 weights): the last of them is
    dropped, on every device alike -- topk's tie order is unspecified (on this CPU it dropped
    index 1 of [3, 2, 2, 2] and of [1, 1, 1, 1])."""
    x = torch.tensor([[3.0, 2.0, -2.0, 2.0, 1.0, 1.0, -1.0, 1.0, 0.5, 2.0, 0.5, 0.5]])
    codes = quantize(x, QuantSpec(Kind.SHERRY, granularity="channel")).codes
    assert codes.tolist() == [[1, 1, -1, 0, 1, 1, -1, 0, 1, 1, 1, 0]]


def test_sherry_keeps_exactly_three_of_every_four():
    torch.manual_seed(1)
    x = torch.randn(16, 128)
    q = quantize(x, QuantSpec(Kind.SHERRY, granularity="group", group_size=32))
    nonzero = (q.codes != 0).reshape(16, 32, 4).sum(-1)
    assert (nonzero == 3).all()
    dropped = (q.codes == 0).reshape(16, 32, 4)
    runs = x.abs().reshape(16, 32, 4)
    assert torch.equal(runs[dropped], runs.min(-1).values.flatten())


# OCP Microscaling spec v1.0 section 6.3: X = 2**(floor(log2(amax)) - emax_elem), elements
# V/X rounded (ties to even) and saturated.  CEIL is ModelOpt's never-clipping rule.
@pytest.mark.parametrize("kind,rule,block,expected,scale_byte", [
    # amax 10: floor(log2 10) = 3, emax 2 -> X = 2; 10/2 = 5 is a tie -> 4 -> 8; 1/2 -> 0.5; -0.3/2 -> 0
    (Kind.MXFP4, MXScaleRule.FLOOR, [10.0, 1.0, -0.3, 0.0], [8.0, 1.0, 0.0, 0.0], 128),
    # amax 7: floor rule X = 1 and 7 saturates to 6, 0.75 tie -> 1; ceil rule X = 2,
    # 7/2 = 3.5 tie -> 4 -> 8, -2.5/2 = -1.25 tie -> -1 -> -2, 0.75/2 = 0.375 -> 0.5 -> 1
    (Kind.MXFP4, MXScaleRule.FLOOR, [7.0, -2.5, 0.75, 0.0], [6.0, -2.0, 1.0, 0.0], 127),
    (Kind.MXFP4, MXScaleRule.CEIL, [7.0, -2.5, 0.75, 0.0], [8.0, -2.0, 1.0, 0.0], 128),
    # amax exactly 6 (= elem max): both rules give X = 1
    (Kind.MXFP4, MXScaleRule.CEIL, [6.0, 5.0, -1.25, 0.0], [6.0, 4.0, -1.0, 0.0], 127),
    # FP8 E4M3: amax 1000: floor(log2 1000) = 9, emax 8 -> X = 2, 500 saturates to 448 -> 896
    (Kind.MXFP8, MXScaleRule.FLOOR, [1000.0, 3.0, -1.0, 0.0], [896.0, 3.0, -1.0, 0.0], 128),
    # ceil: 1000/448 -> X = 4; 250 -> 256 (E4M3 step 16 in [128, 256)); 3/4 = 0.75 exact
    (Kind.MXFP8, MXScaleRule.CEIL, [1000.0, 3.0, -1.0, 0.0], [1024.0, 3.0, -1.0, 0.0], 129),
    # an all-zero block: scale 2**0, exact zeros
    (Kind.MXFP4, MXScaleRule.CEIL, [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], 127),
])
def test_mx_hand_worked_examples(kind, rule, block, expected, scale_byte):
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor(block)
    q = quantize(x, QuantSpec(kind, mx_rule=rule))
    assert q.scale.tolist() == [[scale_byte]]
    assert dequantize(q)[0, :4].tolist() == expected


def test_mx_scale_exponent_is_clamped_to_e8m0_range():
    x = torch.full((1, 32), 1e-44)       # fp32 subnormal: log2 ~ -146 < -127
    q = quantize(x, QuantSpec(Kind.MXFP8, mx_rule=MXScaleRule.FLOOR))
    assert q.scale.item() == 0           # e = -127, biased 0
    assert not torch.isnan(dequantize(q)).any()


@pytest.mark.parametrize("kind", [Kind.MXFP4, Kind.MXFP8])
@pytest.mark.parametrize("poison", [float("inf"), float("-inf"), float("nan")])
def test_mx_block_holding_inf_or_nan_gets_the_nan_scale_and_stays_nan(kind, poison):
    """OCP MX v1.0: the E8M0 code 0xFF is NaN and makes its whole block NaN.  Before, an inf
    came out finite (frexp(inf) has exponent 0) and the block's other values with it."""
    x = torch.ones(2, 32)
    x[0, :3] = torch.tensor([poison, 100.0, 0.01])
    q = quantize(x, QuantSpec(kind))
    assert q.scale[0].item() == 255 and q.scale[1].item() < 255
    y = dequantize(q)
    assert torch.isnan(y[0]).all()
    assert torch.equal(y[1], torch.ones(32))        # a clean block beside it is untouched


def test_nvfp4_hand_worked_single_block():
    # global amax 6*448 -> global scale 1; block amax 6 -> block scale fp8(1) = 1
    x = torch.zeros(1, 32)
    x[0, :16] = torch.tensor([6.0, 5.0, -2.6, 0.25] + [0.0] * 12)
    x[0, 16] = 6.0 * 448
    q = quantize(x, QuantSpec(Kind.NVFP4))
    assert q.global_scale.item() == 1.0
    assert q.scale[0, 0].float().item() == 1.0 and q.scale[0, 1].float().item() == 448.0
    assert dequantize(q)[0, :4].tolist() == [6.0, 4.0, -3.0, 0.0]


def test_nvfp4_static_global_amax_clips_blocks_above_it():
    x = torch.tensor([[100.0] + [1.0] * 15])
    q = quantize(x, QuantSpec(Kind.NVFP4, dynamic=False), amax=torch.tensor(1.0))
    assert q.scale.float().max() == 448.0       # block scale saturated, no NaN
    assert dequantize(q)[0, 0].item() == pytest.approx(1.0, rel=1e-6)   # clipped to 6 * s


def test_inside_range_marks_clipped_elements():
    # amax 1 -> scale bf16(1/7) = 0.142578125: codes saturate beyond 7.5 steps = 1.0693
    x = torch.tensor([[1.0, -1.06, 0.5, 1.07, -2.0]])
    q = quantize(x, QuantSpec(Kind.INT, 4, "channel"), amax=torch.tensor([[1.0]]))
    assert inside_range(x, q).tolist() == [[True, True, True, False, False]]


def test_inside_range_on_the_exact_bound_follows_half_to_even():
    """The bound half a step past the last code is a tie: kept where that code is even (int4's
    -8, E4M3's 448), clipped where it is odd (int4's 7, narrow -7, E2M1's 6).  The mask said
    "inside" for every tie, so the clipped STE passed a gradient for an element the clamp moved."""
    for narrow, expected in ((True, [[False, False, True]]), (False, [[False, True, True]])):
        spec = QuantSpec(Kind.INT, 4, "channel", narrow_range=narrow)
        scale = torch.tensor([[0.125]], dtype=torch.bfloat16)     # exact: x / scale is the tie itself
        qmin, qmax = spec.code_range
        x = torch.tensor([[(qmax + 0.5) * 0.125, (qmin - 0.5) * 0.125, 7.4 * 0.125]])
        assert inside_range(x, quantize(x, spec, scale=scale)).tolist() == expected
        unclamped = torch.round(x / 0.125)                        # the reference: did the clamp move it?
        assert ((unclamped >= qmin) & (unclamped <= qmax)).tolist() == expected
    fp8 = QuantSpec(Kind.FP8, granularity="tensor")
    x = torch.tensor([[448.0, 464.0, 464.03125, -464.0]])
    q = quantize(x, fp8, amax=torch.tensor([448.0]))             # scale 1: 464 rounds to 448
    assert inside_range(x, q).tolist() == [[True, True, False, True]]
    mx = QuantSpec(Kind.MXFP4, mx_rule="floor")                  # amax 7 -> scale 1: 7 ties to 8, clipped
    x = torch.zeros(1, 32)
    x[0, :3] = torch.tensor([7.0, 5.0, -3.0])
    assert fake_quantize(x, mx)[0, 0].item() == 6.0
    assert inside_range(x, quantize(x, mx))[0, :3].tolist() == [False, True, True]


def test_mse_best_scale_never_worse_than_max_scale():
    torch.manual_seed(2)
    x = torch.randn(32, 256) ** 3            # heavy tails: clipping pays
    spec = QuantSpec(Kind.INT, 4, "group", 64)
    best = mse_best_scale(x, spec)
    err_best = ((fake_quantize(x, spec, scale=best) - x) ** 2).reshape(32, 4, 64).sum(-1)
    err_max = ((fake_quantize(x, spec) - x) ** 2).reshape(32, 4, 64).sum(-1)
    assert (err_best <= err_max).all()      # ratio 1 (the max scale) is on the grid
    assert err_best.sum() < 0.97 * err_max.sum()


@pytest.mark.parametrize("kwargs,message", [
    (dict(kind=Kind.NVFP4, group_size=32), "group_size 32 is not allowed"),
    (dict(kind=Kind.INT, bits=9), "bits 9 out of range"),
    (dict(kind=Kind.INT, granularity="group"), "needs a positive group_size"),
    (dict(kind=Kind.FP8, granularity="tensor", symmetric=False), "asymmetric"),
    (dict(kind=Kind.SHERRY, granularity="group", group_size=30), "multiple of M=4"),
])
def test_bad_specs_raise_one_line(kwargs, message):
    with pytest.raises(QuantError, match=message):
        QuantSpec(**kwargs)


def test_group_not_dividing_raises():
    with pytest.raises(QuantError, match="576 is not divisible by the int group size 128"):
        quantize(torch.zeros(4, 576), QuantSpec(Kind.INT, 4, "group", 128))


@pytest.mark.parametrize("preset", ["fp8", "fp8_static", "w4a8_fp8"])
def test_fp8_activation_codes_are_vllms_quant_fp8_codes(preset):
    """vLLM quantizes FP8 activations with ``QuantFP8`` (vLLM-CPU, and the GPU's compiled
    graph): ``x * (1/scale)``, not ``x / scale`` -- the two round ~5e-4 of the codes apart.
    Its own ``forward_native`` is the reference: the same scales and every code, on bf16
    activations with heavy outlier channels."""
    from qadpipe.quant.recipe import PRESETS

    pytest.importorskip("vllm")
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape

    spec = PRESETS[preset].input
    static = not spec.dynamic
    with set_current_vllm_config(VllmConfig()):
        vllm_quant = QuantFP8(static=static, group_shape=GroupShape.PER_TENSOR if static else GroupShape.PER_TOKEN,
                              compile_native=False)
    torch.manual_seed(0)
    x = (torch.randn(512, 1024) * torch.rand(1024) * 4).to(torch.bfloat16)
    x[:, 7] *= 50
    x[3] = 0                                             # a silent token: the floored scale
    if static:
        amax = torch.tensor([208.0])    # a calibrated bf16 amax at which the two roundings part
        ours = quantize(x, spec, amax=amax)
        codes, _ = vllm_quant.forward_native(x, ours.scale.reshape(1))
    else:
        ours = quantize(x, spec)
        codes, scale = vllm_quant.forward_native(x)
        assert torch.equal(ours.scale.reshape(-1), scale.reshape(-1))
    assert torch.equal(ours.codes.view(torch.uint8), codes.view(torch.uint8))
    divided = quantize(x, replace(spec, reciprocal=False), amax=amax if static else None)
    assert not torch.equal(divided.codes.view(torch.uint8), codes.view(torch.uint8)), "x / s would do as well"


def test_int8_per_token_activations_are_the_codes_vllm_computes():
    """vLLM's dynamic int8 quant (``scaled_int8_quant``): scale = fp32 amax / 127 per token,
    codes round(x * fp32(1 / scale)) in [-127, 127].  Independent references: that formula
    written out here, and vLLM's own op (code for code, where vLLM is installed).  Dividing,
    round(x / scale), parted from vLLM on ~3e-4 of the codes; a bf16-rounded scale moved ~a
    quarter of them."""
    from qadpipe.quant.recipe import PRESETS

    spec = PRESETS["w8a8_int"].input
    torch.manual_seed(0)
    x = (torch.randn(512, 576) * torch.rand(512, 1) * 3).to(torch.bfloat16)
    x[5] = 0                                             # a silent token
    scale = x.float().abs().amax(-1, keepdim=True) / 127
    inverse = 1.0 / scale                                # fp32, as vLLM computes it
    codes = torch.round(x.float() * inverse).clamp(-127, 127)
    ours = quantize(x, spec)
    assert ours.scale.dtype == torch.float32
    assert torch.equal(ours.codes[x.float().abs().amax(-1) > 0].float(), codes[x.float().abs().amax(-1) > 0])
    assert torch.equal(ours.codes[5], torch.zeros(576, dtype=torch.int8))
    divided = quantize(x, replace(spec, reciprocal=False))
    assert not torch.equal(divided.codes, ours.codes), "x / s would do as well"
    ops = pytest.importorskip("vllm._custom_ops")
    try:
        vllm_codes, vllm_scale, _ = ops.scaled_int8_quant(x.contiguous(), symmetric=True)
    except (AttributeError, NotImplementedError, RuntimeError) as exc:
        pytest.skip(f"vLLM's int8 op is not available here ({type(exc).__name__})")
    live = x.float().abs().amax(-1) > 0                 # a silent token: codes 0 whatever its scale
    assert torch.equal(ours.scale.reshape(-1)[live], vllm_scale.float().reshape(-1)[live])
    assert torch.equal(ours.codes, vllm_codes)
    assert (divided.codes != vllm_codes).sum() > 0
