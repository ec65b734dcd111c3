"""Weight decay reaches weight matrices only: norms, biases and quantizer parameters keep
their values under decay, and checkpoints of either layout resume or are refused in one line."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from torch import nn

from qadpipe.config import load_config
from qadpipe.distill import trainer
from qadpipe.distill.optim import adamw, no_decay_names
from qadpipe.errors import DistillError
from qadpipe.quant.quantizers import Quantizer

from distill_fixtures import settings

LR, DECAY = 0.1, 0.5


def test_a_zero_gradient_step_shrinks_matrices_by_one_minus_lr_times_decay_and_nothing_else():
    """With zero gradients Adam's update is exactly 0, so AdamW's step is its decoupled decay
    alone: p <- p * (1 - lr * wd) = p * 0.95 on the decayed tensors, p on the others."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    model.register_parameter("step", nn.Parameter(torch.rand(3, 2) + 0.5))   # stands for an LSQ step
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = adamw(model, LR, DECAY, no_decay_names(model, [model.step, *model[1].parameters()]))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    after = dict(model.named_parameters())
    torch.testing.assert_close(after["0.weight"], before["0.weight"] * 0.95, rtol=0, atol=1e-7)
    for name in ("0.bias", "1.weight", "1.bias", "step"):
        assert torch.equal(after[name], before[name]), name


def test_without_decay_there_is_one_group_as_older_checkpoints_hold():
    model = nn.Linear(4, 3)
    optimizer = adamw(model, LR, 0.0, no_decay_names(model, []))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0]
    assert len(optimizer.param_groups[0]["params"]) == 2


def test_a_checkpoint_from_before_fused_adamw_resumes_fused():
    """Older checkpoints carry fused=None in their param groups; loading one must not switch
    the resumed run to the foreach path (the same numbers, slower on a GPU)."""
    from qadpipe.distill.distributed import load_optimizer_state

    model = nn.Linear(4, 3)
    older = torch.optim.AdamW(model.parameters(), lr=LR)   # torch's default: fused=None
    model(torch.ones(2, 4)).sum().backward()
    older.step()
    optimizer = adamw(model, LR, 0.0, no_decay_names(model, []))
    load_optimizer_state(model, optimizer, older.state_dict())
    assert optimizer.param_groups[0]["fused"] is True
    assert torch.equal(optimizer.state[model.weight]["exp_avg"], older.state[model.weight]["exp_avg"])


def config(model_dir, cache, out, *extra):
    return load_config(None, settings(model_dir, cache, f"distill.output_dir={out}", "distill.max_steps=4",
                                      "distill.save_every=2", "distill.eval_every=100", "distill.shuffle_buffer=4",
                                      "distill.weight_decay=0.1", "quant.learnable=lsq", *extra))


def test_the_student_decays_its_linear_weights_only(peaky_llama_dir, topk_cache, tmp_path):
    recipe = trainer.DistillRecipe(config(peaky_llama_dir, topk_cache, tmp_path))
    try:
        recipe.setup()
        groups = {id(p): g["weight_decay"] for g in recipe.optimizer.param_groups for p in g["params"]}
        decayed = {name for name, p in recipe.model.named_parameters() if groups[id(p)] > 0}
        quantizer_params = {f"{prefix}.{name}" for prefix, module in recipe.model.named_modules()
                            if isinstance(module, Quantizer) for name, _ in module.named_parameters()}
        assert quantizer_params, "quant.learnable=lsq should give the quantizers parameters"
        linear_weights = {f"{prefix}.weight" for prefix, module in recipe.model.named_modules()
                          if isinstance(module, (nn.Linear, nn.Embedding))}
        assert decayed == linear_weights & set(dict(recipe.model.named_parameters()))
        assert not decayed & quantizer_params
        assert not any("norm" in name for name in decayed)
    finally:
        recipe.cleanup()


def test_a_resume_with_two_groups_continues_the_curve_exactly(peaky_llama_dir, topk_cache, tmp_path, monkeypatch):
    trainer.run_distill(config(peaky_llama_dir, topk_cache, tmp_path / "straight"))
    asked = trainer.DistillRecipe._stop_requested
    monkeypatch.setattr(trainer.DistillRecipe, "_stop_requested",
                        lambda self: "SIGTERM" if self.step == 2 else asked(self))
    assert trainer.run_distill(config(peaky_llama_dir, topk_cache, tmp_path / "stopped")).status == "preempted"
    monkeypatch.setattr(trainer.DistillRecipe, "_stop_requested", asked)
    assert trainer.run_distill(config(peaky_llama_dir, topk_cache, tmp_path / "stopped"), resume=True).status == "done"

    def losses(out):
        rows = [json.loads(line) for line in (out / trainer.METRICS_FILE).read_text().splitlines()]
        return [(row["step"], row["loss"]) for row in rows if "loss" in row]

    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")


def test_a_stop_signal_during_a_save_stops_at_that_checkpoint(peaky_llama_dir, topk_cache, tmp_path, monkeypatch):
    """A signal that lands while step 2's checkpoint is written (an 8B student's save takes
    minutes, a preemption grace period not many more) stops there: no step 3, no second save."""
    save = trainer.DistillRecipe.save_checkpoint
    saved = []

    def save_then_signal(self, window):
        save(self, window)
        saved.append(self.step)
        if self.step == 2:
            self._stop.signum = signal.SIGTERM   # as the handler records it

    monkeypatch.setattr(trainer.DistillRecipe, "save_checkpoint", save_then_signal)
    result = trainer.run_distill(config(peaky_llama_dir, topk_cache, tmp_path))   # saves every 2 steps of 4
    assert (result.status, result.step, result.stop_signal, saved) == ("preempted", 2, "SIGTERM", [2])


def test_a_checkpoint_that_decayed_every_parameter_is_refused_in_one_line(peaky_llama_dir, topk_cache, tmp_path,
                                                                         monkeypatch):
    """The layout qadpipe wrote before decay skipped norms and quantizer parameters: one group."""
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "adamw", lambda model, lr, weight_decay, no_decay: torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay))
        trainer.run_distill(config(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=2"))
    with pytest.raises(DistillError) as refused:
        trainer.run_distill(config(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=3"), resume=True)
    message = str(refused.value)
    assert "\n" not in message and "weight decay [0.1]" in message and "[0.1, 0.0]" in message
