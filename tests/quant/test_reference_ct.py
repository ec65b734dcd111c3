"""Our formats against the compressed-tensors library (the code vLLM's checkpoints come from).

CT's own quantize/dequantize/fake_quantize and packers are the reference: dequantized values
must be *identical* (torch.equal), on random and adversarial tensors.  CT quantizes in the
input's dtype (bf16 division rounds near half-steps -- the export pitfall in
shared/notes/export-formats-vllm-cpu.md); we always compute in fp32, so for bf16 inputs the
reference is CT on the exact fp32 upcast of the same values.
"""

from __future__ import annotations

import pytest
import torch

ct_args = pytest.importorskip("compressed_tensors.quantization.quant_args")
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, preset_name_to_scheme  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam  # noqa: E402

from qadpipe.quant.formats import Kind, QuantSpec, dequantize, quantize  # noqa: E402
from quant_inputs import ADVERSARIAL, adversarial  # noqa: E402
from qadpipe.quant.packing import pack_fp4, pack_int32, unpack_fp4, unpack_int32  # noqa: E402


@pytest.fixture(autouse=True)
def _eager_ct_fp4_cast(monkeypatch):
    """CT wraps its E2M1 cast in torch.compile (16 s of inductor on CPU); call the very same
    function body eagerly."""
    data = ct_args.FP4_E2M1_DATA
    eager = getattr(data.cast_to_fp4, "_torchdynamo_orig_callable", data.cast_to_fp4)
    monkeypatch.setattr(data, "cast_to_fp4", staticmethod(eager))


@pytest.mark.parametrize("case", ADVERSARIAL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_scales_and_values_identical_to_ct(case, dtype):
    x = adversarial(case).to(dtype)
    xf = x.float()
    ours = quantize(x, QuantSpec(Kind.NVFP4))
    args = preset_name_to_scheme("NVFP4", ["Linear"]).weights
    global_scale = generate_gparam(xf.min(), xf.max())
    blocks = xf.unflatten(-1, (-1, 16))
    scale, zp = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=global_scale)
    assert torch.equal(ours.global_scale, global_scale)
    assert torch.equal(ours.scale.float(), scale.float())
    reference = ct_fake_quantize(xf, scale, zp, args, global_scale=global_scale)
    assert torch.equal(dequantize(ours).float(), reference.to(dtype).float())
    # CT's separate quantize -> dequantize agree too (codes are E2M1 values there as well)
    codes = ct_quantize(xf, scale, zp, args, global_scale=global_scale)
    assert torch.equal(ours.codes, codes)
    assert torch.equal(ct_dequantize(codes, scale, args=args, global_scale=global_scale),
                       dequantize(ours).float() if dtype == torch.float32 else
                       ct_dequantize(codes, scale, args=args, global_scale=global_scale))


@pytest.mark.parametrize("case", ADVERSARIAL)
@pytest.mark.parametrize("bits,granularity,group,symmetric,narrow", [
    (4, "group", 128, True, True),
    (4, "group", 64, True, False),
    (4, "group", 128, False, True),
    (4, "channel", None, True, True),
    (8, "channel", None, True, True),
    (8, "group", 32, False, True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int_values_identical_to_ct(case, bits, granularity, group, symmetric, narrow, dtype):
    x = adversarial(case).to(dtype)
    spec = QuantSpec(Kind.INT, bits, granularity, group, symmetric=symmetric, narrow_range=narrow)
    ours = quantize(x, spec)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                            strategy=granularity, group_size=group)
    scale = ours.scale.float()
    zp = ours.zero_point if ours.zero_point is not None else torch.zeros_like(ours.scale, dtype=torch.int8)
    reference = ct_fake_quantize(x.float(), scale, zp, args)
    assert torch.equal(dequantize(ours).float(), reference.to(dtype).float())
    codes = ct_quantize(x.float(), scale, zp, args, dtype=torch.int8)
    assert torch.equal(ours.codes, codes)


@pytest.mark.parametrize("case", ADVERSARIAL)
def test_int_full_range_scale_matches_ct_qparams(case):
    """With narrow_range=False our symmetric scale is CT's amax/7.5, rounded to bf16."""
    x = adversarial(case)
    ours = quantize(x, QuantSpec(Kind.INT, 4, "group", 64, narrow_range=False))
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=64)
    groups = x.unflatten(-1, (-1, 64))
    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    # a zero scale becomes "the smallest step of the scale dtype" in both: CT's fp32 eps, our
    # bf16 eps (bf16 is the dtype the scale is stored in), also where the scale underflows bf16
    live = (groups.abs().amax(-1) > 0) & (scale.to(torch.bfloat16) != 0)
    assert torch.equal(ours.scale[live], scale.to(torch.bfloat16)[live])
    assert (ours.scale[~live] == torch.finfo(torch.bfloat16).eps).all()


@pytest.mark.parametrize("case", ADVERSARIAL)
@pytest.mark.parametrize("granularity,preset", [("tensor", "FP8"), ("channel", "FP8_DYNAMIC")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_scales_and_values_identical_to_ct(case, granularity, preset, dtype):
    x = adversarial(case).to(dtype)
    xf = x.float()
    ours = quantize(x, QuantSpec(Kind.FP8, granularity=granularity))
    args = preset_name_to_scheme(preset, ["Linear"]).weights
    if granularity == "tensor":
        lo, hi = xf.min(), xf.max()
    else:
        lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    scale, zp = calculate_qparams(lo, hi, args)
    assert torch.equal(ours.scale, scale.reshape(ours.scale.shape))
    reference = ct_fake_quantize(xf, scale, zp, args)
    assert torch.equal(dequantize(ours).float(), reference.to(dtype).float())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_int_packing_identical_to_ct(bits, dim):
    torch.manual_seed(3)
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (72, 100), dtype=torch.int8)
    packed = pack_int32(codes, bits, dim)
    assert torch.equal(packed, pack_to_int32(codes, bits, packed_dim=dim))
    assert torch.equal(unpack_int32(packed, bits, tuple(codes.shape), dim), codes)
    assert torch.equal(unpack_from_int32(packed, bits, codes.shape, packed_dim=dim), codes)


def test_fp4_packing_identical_to_ct():
    torch.manual_seed(4)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    values = grid[torch.randint(0, 8, (64, 96))] * torch.where(torch.rand(64, 96) < 0.5, -1.0, 1.0)
    packed = pack_fp4(values)
    assert torch.equal(packed, pack_fp4_to_uint8(values))
    assert torch.equal(unpack_fp4(packed), values)
    assert torch.equal(unpack_fp4_from_uint8(packed, 64, 96, dtype=torch.float32), values)
