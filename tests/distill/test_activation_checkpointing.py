"""``distill.activation_checkpointing``: the same training, with the decoder layers'
intermediates no longer kept for the backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qadpipe.config import load_config
from qadpipe.distill.student import build_student, enable_activation_checkpointing
from qadpipe.errors import DistillError
from qadpipe.quant.calibrate import calibrate

from test_trainer import distill, train_rows


def saved_bytes_and_grads(model: nn.Module, input_ids: torch.Tensor) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes autograd holds for the backward of one decoder forward, and the gradients.

    The outer hook sees what autograd saves outside checkpointed regions; inside them the
    checkpoint's own hooks take over and keep nothing, which is the point."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    hidden.square().mean().backward()
    return total, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset,group_size", [("w4a16_int", 32), ("nvfp4", None), ("lsq_int4", 32)])
def test_checkpointed_layers_keep_less_and_give_the_same_gradients(peaky_llama_dir, preset, group_size):
    config = load_config(None, [f"model.path={peaky_llama_dir}", f"quant.preset={preset}",
                                f"quant.group_size={group_size or 'null'}"])
    model = build_student(config, torch.device("cpu"))
    input_ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    calibrate(model, [{"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}], 1)
    model.train()
    plain_bytes, plain_grads = saved_bytes_and_grads(model, input_ids)
    enable_activation_checkpointing(model)
    checkpointed_bytes, checkpointed_grads = saved_bytes_and_grads(model, input_ids)
    # the tiny model has 2 layers: what stays saved is the embedding and the final norm's inputs
    assert checkpointed_bytes < 0.2 * plain_bytes, (checkpointed_bytes, plain_bytes)
    assert plain_grads.keys() == checkpointed_grads.keys()
    assert any("quantizer" in name for name in plain_grads) == (preset == "lsq_int4")
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("extra", [(), ("quant.preset=lsq_int4", "distill.trainable=quant")],
                         ids=["all-params", "quant-params-only"])
def test_training_with_checkpointing_follows_the_same_loss_curve(peaky_llama_dir, topk_cache, tmp_path, extra,
                                                               monkeypatch):
    """``trainable=quant`` freezes the embeddings, so no layer input needs a gradient; the
    quantizer parameters inside the checkpointed layers must still get theirs."""
    import qadpipe.distill.trainer as trainer

    checkpointed = []

    def spy(model: nn.Module) -> None:
        enable_activation_checkpointing(model)
        checkpointed.append(model.is_gradient_checkpointing)

    monkeypatch.setattr(trainer, "enable_activation_checkpointing", spy)
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        result = distill(peaky_llama_dir, topk_cache, out, "distill.max_steps=3", "distill.save=false",
                         f"distill.activation_checkpointing={flag}", *extra)
        assert result.exit_code == 0, result.output
        runs[flag] = train_rows(out)
        assert checkpointed == ([True] if flag == "true" else [])   # the flag reached the student
    losses = {flag: [row["loss"] for row in rows] for flag, rows in runs.items()}
    grad_norms = {flag: [row["grad_norm"] for row in rows] for flag, rows in runs.items()}
    assert min(grad_norms["false"]) > 0   # there are gradients to lose
    assert grad_norms["true"] == pytest.approx(grad_norms["false"], rel=1e-5)
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5)


def test_a_model_without_checkpointing_support_is_refused_in_one_line():
    class Plain(nn.Module):
        supports_gradient_checkpointing = False

    with pytest.raises(DistillError, match=r"^distill.activation_checkpointing: Plain does not support"):
        enable_activation_checkpointing(Plain())
