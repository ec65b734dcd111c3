"""The torch.compile'd fake-quant returns the eager bits (training must round as export packs).

The eager formats are themselves checked against compressed-tensors and the format grids
(test_reference_ct.py, test_formats.py), so "compiled == eager" bit for bit ties the compiled
path to those references (compile time puts the format sweep in the slow suite).  Without ``emulate_precision_casts`` the INT case fails (inductor
drops the bf16 rounding of the stored scale), so these tests can fail.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

import qadpipe.quant.compiled as compiled_module
from qadpipe.quant.compiled import (
    checked_fake_quant_forward, compiled_fake_quant_forward, eager_fake_quant_forward, fake_quant_forward,
    forward_for,
)
from qadpipe.quant.recipe import PRESETS, apply_recipe
from quant_inputs import ADVERSARIAL, adversarial

SHAPES = [(8, 256), (3, 5, 256), (16, 512)]     # weights and [batch, seq, features] activations


@pytest.fixture(autouse=True)
def _no_silent_eager_fallback():
    """Past its recompile limit dynamo would run the eager code and these tests would compare
    eager with eager; make that an error instead."""
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield


def _distinct_specs():
    specs = {}
    for name, preset in PRESETS.items():
        for role, spec in (("weight", preset.weight), ("input", preset.input)):
            if spec is not None:
                specs.setdefault(spec, f"{name}.{role}")
    return specs


def _assert_compiled_equals_eager(spec, clipped: bool, dtype: torch.dtype) -> None:
    compiled = compiled_fake_quant_forward(spec, clipped, False)
    for case in ADVERSARIAL:
        for shape in SHAPES:
            rows = shape[0] * (shape[1] if len(shape) == 3 else 1)
            x = adversarial(case, rows=rows, cols=shape[-1]).reshape(shape).to(dtype)
            amax = None if spec.dynamic else x.abs().amax().float()
            want, want_mask = fake_quant_forward(x, amax, spec=spec, clipped=clipped)
            got, got_mask = compiled(x, amax)
            assert got.dtype == want.dtype
            assert torch.equal(got, want), f"{case} {shape} {dtype}: {(got != want).sum()} values differ"
            if clipped:
                assert torch.equal(got_mask, want_mask), f"{case} {shape}: clip masks differ"


#: Formats with a tensor-level range, the ones MoE experts quantize per slice.
PER_TENSOR_RANGE = {"nvfp4": PRESETS["nvfp4"].weight, "fp8_static": PRESETS["fp8_static"].weight}


def _slices(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Every adversarial case as one slice of a [cases, 8, 256] tensor (ranges 0 to 1e4 side by
    side, so a range leaking from one slice to another changes the codes), and each slice's amax."""
    x = torch.stack([adversarial(case) for case in ADVERSARIAL]).to(dtype)
    return x, x.abs().amax(dim=(1, 2)).float()


@pytest.mark.parametrize("batch", [None, 3], ids=["one-batch", "batches-of-3"])
@pytest.mark.parametrize("clipped", [False, True])
@pytest.mark.parametrize("spec", list(PER_TENSOR_RANGE.values()), ids=list(PER_TENSOR_RANGE))
def test_per_slice_forward_equals_a_loop_over_slices(spec, clipped, batch, monkeypatch):
    """The vmap'd forward against the plain per-tensor one called slice by slice (all 7
    slices in one call, or in eager's element-bounded batches: 3 + 3 + 1)."""
    if batch:
        monkeypatch.setattr(compiled_module, "EAGER_SLICE_BATCH_ELEMENTS", batch * 8 * 256)
    for dtype in (torch.bfloat16, torch.float32):
        x, amax = _slices(dtype)
        got, got_mask = eager_fake_quant_forward(spec, clipped, per_slice=True)(x, amax)
        for i in range(x.shape[0]):
            want, want_mask = fake_quant_forward(x[i], amax[i], spec=spec, clipped=clipped)
            assert torch.equal(got[i], want), (ADVERSARIAL[i], dtype)
            if clipped:
                assert torch.equal(got_mask[i], want_mask), (ADVERSARIAL[i], dtype)


@pytest.mark.slow
@pytest.mark.parametrize("spec", list(PER_TENSOR_RANGE.values()), ids=list(PER_TENSOR_RANGE))
def test_compiled_per_slice_forward_is_bit_identical(spec):
    compiled = compiled_fake_quant_forward(spec, True, True)
    for dtype in (torch.bfloat16, torch.float32):
        x, amax = _slices(dtype)
        (want, want_mask), (got, got_mask) = eager_fake_quant_forward(spec, True, True)(x, amax), compiled(x, amax)
        assert torch.equal(got, want) and torch.equal(got_mask, want_mask), dtype


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_int4_group_fake_quant_is_bit_identical(dtype):
    spec = dataclasses.replace(PRESETS["w4a16_int"].weight, group_size=32)
    _assert_compiled_equals_eager(spec, clipped=False, dtype=dtype)


@pytest.mark.slow
@pytest.mark.parametrize("clipped", [False, True])
@pytest.mark.parametrize("spec", list(_distinct_specs()), ids=list(_distinct_specs().values()))
def test_every_preset_format_compiles_bit_identical(spec, clipped):
    _assert_compiled_equals_eager(spec, clipped=clipped, dtype=torch.bfloat16)


def test_compiled_student_forward_and_gradients_equal_eager(make_llama, quant_config, caplog):
    """The fast-suite guard (~15 s of inductor on 2 cores): INT4 codes of a random Llama's
    weights differ when the stored-scale rounding is dropped, so the logits would too -- and the
    training path's self-check would log it and fall back to eager, hence the log assertion."""
    from torch._dynamo.utils import counters

    caplog.set_level("ERROR", logger="qadpipe.quant.compiled")
    inputs = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    results, graphs = {}, {}
    for mode in ("off", "on"):
        torch._dynamo.reset()      # graphs an earlier test compiled would be reused without a count
        counters.clear()
        model = make_llama(seed=1).train()
        apply_recipe(model, quant_config(preset="w4a16_int", group_size=32, compile=mode))
        logits = model(input_ids=inputs).logits
        logits.float().logsumexp(-1).sum().backward()
        results[mode] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        graphs[mode] = counters["stats"]["unique_graphs"]
    assert graphs["off"] == 0 < graphs["on"]       # "on" ran compiled graphs: not eager against eager
    assert "differs from eager" not in caplog.text
    assert torch.equal(results["on"][0], results["off"][0])
    for name, grad in results["off"][1].items():
        assert torch.equal(results["on"][1][name], grad), name


def test_one_graph_per_feature_size_serves_training_and_evaluation():
    """Dynamo guards on requires_grad: a weight (trains), an activation in training and the same
    activation in a no-grad eval would each take a graph of their own per (dtype, feature size)
    -- a 1.7B student's NVFP4 spec needed 7 of dynamo's 8 before the compiled forward got
    detached inputs, and any further variant silently ran eager.  With the limit at 1 a second
    graph is an error here (the autouse fixture)."""
    from qadpipe.quant.quantizers import Quantizer

    compiled_fake_quant_forward.cache_clear()
    checked_fake_quant_forward.cache_clear()
    try:
        with torch._dynamo.config.patch(recompile_limit=1):
            quantizer = Quantizer(PRESETS["w8a8_int"].input, compile_mode="on")
            x = torch.randn(4, 64, requires_grad=True)
            quantizer(x).sum().backward()
            assert torch.equal(x.grad, torch.ones_like(x))   # the straight-through gradient is kept
            quantizer(torch.randn(3, 64))                     # a frozen tensor
            with torch.no_grad():
                quantizer(torch.randn(5, 64, requires_grad=True))
    finally:
        compiled_fake_quant_forward.cache_clear()
        checked_fake_quant_forward.cache_clear()


def test_auto_compiles_on_cuda_only():
    spec = PRESETS["nvfp4"].weight
    assert forward_for(spec, False, "auto", torch.device("cuda")) is checked_fake_quant_forward(spec, False, False)
    assert forward_for(spec, False, "on", torch.device("cpu")) is checked_fake_quant_forward(spec, False, False)
    for mode, device in (("auto", "cpu"), ("off", "cuda")):
        chosen = forward_for(spec, False, mode, torch.device(device))
        assert chosen is not checked_fake_quant_forward(spec, False, False)
        assert chosen.func is fake_quant_forward


SPEC_G32 = dataclasses.replace(PRESETS["w4a16_int"].weight, group_size=32)


@contextlib.contextmanager
def checked_forward_compiled_by(monkeypatch, compile_stand_in):
    """``checked_fake_quant_forward`` for INT4 g32, built on ``compile_stand_in`` in place of
    torch.compile (the cached forwards cleared before and after, so no other test sees it)."""

    monkeypatch.setattr(compiled_module.torch, "compile", compile_stand_in)
    compiled_fake_quant_forward.cache_clear()
    checked_fake_quant_forward.cache_clear()
    try:
        yield checked_fake_quant_forward(SPEC_G32, False, False)
    finally:
        compiled_fake_quant_forward.cache_clear()
        checked_fake_quant_forward.cache_clear()


def test_a_compiled_forward_that_differs_from_eager_is_dropped_loudly(monkeypatch, caplog):
    """Other backends generate other code than the CPU one these tests check; the first tensor
    per (device, dtype) is compared with eager, and a difference keeps that format eager."""
    calls = []

    def off_by_a_bit(fn, **kwargs):
        def run(x, amax):
            calls.append(x.shape)
            out, mask = fn(x, amax)
            return out * 1.001, mask
        return run

    x = adversarial("random", rows=4, cols=64)
    want, _ = fake_quant_forward(x, None, spec=SPEC_G32, clipped=False)
    with checked_forward_compiled_by(monkeypatch, off_by_a_bit) as forward, \
            caplog.at_level("ERROR", logger="qadpipe.quant.compiled"):
        first, _ = forward(x, None)
        second, _ = forward(x, None)
    assert torch.equal(first, want) and torch.equal(second, want)
    assert len(calls) == 1                      # after the mismatch the compiled code is not used
    assert "differs from eager on cpu torch.float32, 64 features" in caplog.text


def test_each_feature_size_is_checked_on_its_own(monkeypatch, caplog):
    """Features are static: each in_features compiles to its own code, which may be wrong
    where the first size's was right."""
    def wrong_at_128_features(fn, **kwargs):
        def run(x, amax):
            out, mask = fn(x, amax)
            return (out * 1.001 if x.shape[-1] == 128 else out), mask
        return run

    narrow, wide = adversarial("random", rows=4, cols=64), adversarial("random", rows=4, cols=128)
    with checked_forward_compiled_by(monkeypatch, wrong_at_128_features) as forward, \
            caplog.at_level("ERROR", logger="qadpipe.quant.compiled"):
        forward(narrow, None)
        got, _ = forward(wide, None)
    assert torch.equal(got, fake_quant_forward(wide, None, spec=SPEC_G32, clipped=False)[0])
    assert "differs from eager on cpu torch.float32, 128 features" in caplog.text
