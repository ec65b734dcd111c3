"""calibrate(): static input ranges equal the max (or percentile) of the real-token inputs,
captured independently with forward hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qadpipe.errors import QuantError
from qadpipe.quant.calibrate import calibrate, static_input_quantizers
from qadpipe.quant.recipe import apply_recipe
from quant_inputs import LOUD_TOKEN


def _padded_batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(n):
        mask = torch.ones(3, 10, dtype=torch.long)
        mask[1, 6:] = 0
        mask[2, 3:] = 0
        batches.append({"input_ids": torch.randint(0, LOUD_TOKEN, (3, 10), generator=g), "attention_mask": mask})
    return batches


def _captured_inputs(model, batches, module_name):
    """Inputs the Linear saw on real tokens, from a plain full-precision model with a hook."""
    seen = []
    module = model.get_submodule(module_name)
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
            seen[-1] = seen[-1][batch["attention_mask"].bool()]
    handle.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("percentile", [None, 99.0])
def test_static_input_amax_is_max_or_percentile_of_real_tokens(percentile, make_llama, quant_config):
    batches = _padded_batches(2)
    reference_model = make_llama()
    # weight-only-identical reference: fp8_static weights are per-tensor FP8, so capture the
    # first layer's q_proj input (only embeddings + a norm before it: unaffected by weights)
    inputs = _captured_inputs(reference_model, batches, "model.layers.0.self_attn.q_proj")
    model = make_llama()
    apply_recipe(model, quant_config(preset="fp8_static"))
    calibrate(model, batches, 2, percentile=percentile)
    amax = model.get_submodule("model.layers.0.self_attn.q_proj").input_quantizer.amax
    magnitude = inputs.float().abs()
    if percentile is None:
        expected = magnitude.max()
    else:       # max over batches of each batch's inverted-CDF percentile
        per_batch = [np.percentile(b.float().abs().numpy(), percentile, method="inverted_cdf")
                     for b in (inputs[:int(batches[0]["attention_mask"].sum())],
                               inputs[int(batches[0]["attention_mask"].sum()):])]
        expected = torch.tensor(max(per_batch), dtype=torch.float32)
    assert torch.equal(amax, expected)


def test_padding_does_not_reach_the_range(make_llama, quant_config):
    """The loud token at the padded positions, ~100x any real input, leaves the range as it was."""
    batch = _padded_batches(1)[0]
    padded = batch["attention_mask"] == 0
    name = "model.layers.0.self_attn.q_proj"
    ranges = []
    for ids in (batch["input_ids"], batch["input_ids"].masked_fill(padded, LOUD_TOKEN)):
        model = make_llama(loud_token=LOUD_TOKEN)
        apply_recipe(model, quant_config(preset="fp8_static"))
        calibrate(model, [{"input_ids": ids, "attention_mask": batch["attention_mask"]}], 1)
        ranges.append(model.get_submodule(name).input_quantizer.amax.clone())
    everywhere = {"input_ids": batch["input_ids"].masked_fill(padded, LOUD_TOKEN),
                  "attention_mask": torch.ones_like(batch["attention_mask"])}
    loud = _captured_inputs(make_llama(loud_token=LOUD_TOKEN), [everywhere], name).abs().max()
    assert loud > 10 * ranges[0]      # counted, the padded positions would have moved the range
    assert torch.equal(ranges[1], ranges[0])


def test_every_static_input_gets_a_range_and_model_runs(make_llama, quant_config):
    model = make_llama()
    apply_recipe(model, quant_config(preset="nvfp4"))
    quantizers = static_input_quantizers(model)
    assert len(quantizers) == 14
    calibrate(model, _padded_batches(1), 1)
    assert all(q.calibrated and float(q.amax) > 0 for q in quantizers.values())
    assert torch.isfinite(model(**_padded_batches(1)[0]).logits).all()


@pytest.mark.parametrize("training", [True, False])
def test_calibration_leaves_the_model_in_the_mode_it_found_it(make_llama, quant_config, training):
    model = make_llama()
    apply_recipe(model, quant_config(preset="nvfp4"))
    model.train(training)
    calibrate(model, _padded_batches(1), 1)
    assert model.training is training


def test_running_out_of_batches_is_an_error(make_llama, quant_config):
    model = make_llama()
    apply_recipe(model, quant_config(preset="nvfp4"))
    with pytest.raises(QuantError, match="asked for 3 batches, the data has 1"):
        calibrate(model, _padded_batches(1), 3)


def test_dynamic_recipes_need_no_data(make_llama, quant_config):
    model = make_llama()
    apply_recipe(model, quant_config(preset="fp8"))
    calibrate(model, [], 4)          # nothing static: returns without touching the data
    assert static_input_quantizers(model) == {}


def test_percentile_rank_is_exact_for_the_decimal_given():
    """Of 1..41000, 99.9 % is 40959 values: the inverted-CDF percentile is 40959.  In binary
    floats 41000 * 99.9 / 100 is 40959.00000000001, whose ceiling picked 40960."""
    from qadpipe.quant.calibrate import _Observer

    observer = _Observer("x", 99.9)
    observer.observe(torch.arange(1, 41001, dtype=torch.float32)[torch.randperm(41000)])
    assert observer.amax.item() == 40959.0


@pytest.mark.parametrize("layout", ["flattened", "transposed"])
def test_inputs_seen_in_another_layout_are_masked_or_refused(make_llama, quant_config, layout):
    """An MoE's shared expert sees [batch * seq, features]: masked like [batch, seq, features],
    so the loud padding stays out of its range.  A layout where padding cannot be told apart
    ([seq, batch, ...]) is refused in one line naming the quantizer, not counted silently."""
    reshape = {"flattened": lambda x: x.flatten(0, 1), "transposed": lambda x: x.transpose(0, 1)}[layout]
    batch = _padded_batches(1)[0]
    batch = {**batch, "input_ids": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, LOUD_TOKEN)}
    name = "model.layers.0.self_attn.q_proj"
    plain = make_llama(loud_token=LOUD_TOKEN)
    apply_recipe(plain, quant_config(preset="fp8_static"))
    calibrate(plain, [batch], 1)
    model = make_llama(loud_token=LOUD_TOKEN)
    apply_recipe(model, quant_config(preset="fp8_static"))
    model.get_submodule(name).register_forward_pre_hook(lambda m, args: (reshape(args[0]),))
    if layout == "flattened":
        calibrate(model, [batch], 1)
        assert torch.equal(model.get_submodule(name).input_quantizer.amax, plain.get_submodule(name).input_quantizer.amax)
        return
    with pytest.raises(QuantError, match=r"model\.layers\.0\.self_attn\.q_proj\.input_quantizer sees activations "
                                         r"shaped \(10, 3, 64\), neither \[batch, seq, \.\.\.\] = \(3, 10\) nor "
                                         r"\[batch \* seq, \.\.\.\]"):
        calibrate(model, [batch], 1)


@pytest.mark.parametrize("percentile", [None, 99.0])
@pytest.mark.parametrize("poison, message", [(float("nan"), "saw a NaN or infinite activation"),
                                             (float("inf"), "saw a NaN or infinite activation"),
                                             (0.0, "saw only zeros in 2 batches")])
def test_a_range_that_cannot_be_served_is_refused(make_llama, quant_config, poison, message, percentile):
    """A NaN amax exported input_scale=[nan] (NVFP4 turned it into a silent 1.0); an all-zero
    one an FP8 scale of 1.2e-7 that clips every later input to ~0."""
    model = make_llama()
    apply_recipe(model, quant_config(preset="fp8_static"))
    target = model.get_submodule("model.layers.0.mlp.down_proj")
    if poison == 0.0:
        target.register_forward_pre_hook(lambda module, args: (torch.zeros_like(args[0]),))
    else:   # one poisoned value per batch: a percentile would rank it above the cut and never see it
        def poison_one(module, args):
            x = args[0].clone()
            x[0, 0, 3] = poison
            return (x,)
        target.register_forward_pre_hook(poison_one)
    with pytest.raises(QuantError, match=rf"model\.layers\.0\.mlp\.down_proj\.input_quantizer {message}"):
        calibrate(model, _padded_batches(2), 2, percentile=percentile)


def test_a_saved_state_with_no_range_loads_as_uncalibrated(make_llama, quant_config):
    """An uncalibrated student's state (amax still 0) must not load as calibrated: it would
    quantize every input to ~0 and export an FP8 input_scale of 1.2e-7."""
    model = make_llama()
    apply_recipe(model, quant_config(preset="fp8_static"))
    state = model.state_dict()
    fresh = make_llama()
    apply_recipe(fresh, quant_config(preset="fp8_static"))
    fresh.load_state_dict(state)
    quantizer = fresh.get_submodule("model.layers.0.self_attn.q_proj").input_quantizer
    assert not quantizer.calibrated
    with pytest.raises(QuantError, match="before calibration"):
        fresh(**_padded_batches(1)[0])
    calibrate(model, _padded_batches(1), 1)
    fresh.load_state_dict(model.state_dict())
    assert quantizer.calibrated and torch.equal(quantizer.amax, model.get_submodule(
        "model.layers.0.self_attn.q_proj").input_quantizer.amax)


def test_zero_calibration_batches_is_refused_for_static_ranges(make_llama, quant_config):
    model = make_llama()
    apply_recipe(model, quant_config(preset="fp8_static"))
    with pytest.raises(QuantError, match="quant.calibration_batches: got 0, but 14 static input quantizers need"):
        calibrate(model, [], 0)
