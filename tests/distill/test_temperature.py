"""KD at a temperature (``distill.temperature``): against Hinton's τ²·KL(softmax(t/τ) ‖ softmax(s/τ))
computed naively in float64 over the whole vocabulary (values and gradients) where the cache
sees all of it, against hand-worked buckets where it does not, and the property that makes
bucket tempering the right one: a student matching the teacher's buckets stays a fixed point."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from qadpipe.cli import cli
from qadpipe.config import load_config
from qadpipe.distill import losses
from qadpipe.distill.head_loss import LossSpec, PositionTargets, head_loss
from qadpipe.errors import ConfigError

from distill_fixtures import settings

N, D = 24, 6


def hinton_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """τ² Σ_v t_v^τ (log t_v^τ − log p_v^τ), in float64, summed over positions."""
    t = torch.log_softmax(teacher_logits.double() / tau, -1)
    p = torch.log_softmax(student_logits.double() / tau, -1)
    return tau ** 2 * (t.exp() * (t - p)).sum()


def fused_and_reference(targets: PositionTargets, spec: LossSpec, teacher_logits: torch.Tensor, vocab: int,
                        chunk: int, teacher_head: nn.Module | None = None):
    gen = torch.Generator().manual_seed(11)
    head = nn.Linear(D, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, D, generator=gen))
    hidden = torch.randn(N, D, generator=gen, requires_grad=True)
    total, stats = head_loss(hidden, head, targets, spec, chunk, teacher_head)
    total.backward()
    got = (total.detach().double(), hidden.grad.double(), head.weight.grad.double())
    hidden.grad, head.weight.grad = None, None
    expected_total = hinton_kd(head(hidden), teacher_logits, spec.temperature)
    expected_total.backward()
    return got, (expected_total.detach(), hidden.grad.double(), head.weight.grad.double()), stats


def topk_targets(teacher_logits: torch.Tensor, k: int) -> PositionTargets:
    """What the cache holds: the temperature-1 top-k log-probs (fp32) and the exact tail mass."""
    logp = torch.log_softmax(teacher_logits.double(), -1)
    values, ids = logp.topk(k, -1)
    tail = 1 - values.exp().sum(-1)
    return PositionTargets(torch.zeros(N, dtype=torch.long), topk_ids=ids, topk_logprobs=values.float(),
                           tail_mass=tail)


@pytest.mark.parametrize("tau", [0.5, 2.0, 4.0])
@pytest.mark.parametrize("chunk", [1, 64])
def test_topk_kd_at_a_temperature_is_hinton_kd_when_the_tail_is_one_token(tau, chunk):
    """k = V − 1: the tail bucket is one real token, so re-tempering it as one bucket is exact."""
    k = 9
    teacher_logits = 2.5 * torch.randn(N, k + 1, generator=torch.Generator().manual_seed(5))
    got, expected, _ = fused_and_reference(topk_targets(teacher_logits, k), LossSpec(temperature=tau),
                                           teacher_logits, k + 1, chunk)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("tau", [0.5, 3.0])
def test_online_kd_at_a_temperature_is_hinton_kd_over_the_whole_vocabulary(tau):
    vocab = 40
    gen = torch.Generator().manual_seed(6)
    teacher_head = nn.Linear(D, vocab, bias=False)
    teacher_hidden = torch.randn(N, D, generator=gen)
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden)
    targets = PositionTargets(torch.zeros(N, dtype=torch.long), teacher_hidden=teacher_hidden)
    got, expected, _ = fused_and_reference(targets, LossSpec(mode="online", temperature=tau), teacher_logits,
                                           vocab, 7, teacher_head)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


def test_bucket_temperature_by_hand():
    """k = 2 of V = 4: teacher S = (0.6, 0.3), tail 0.1; student (0.5, 0.2) on S and 0.15 + 0.15
    off it.  At τ = 2 both bucket vectors become √p renormalized."""
    ids = torch.tensor([[0, 1]])
    teacher_lp = torch.log(torch.tensor([[0.6, 0.3]]))
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.15]], dtype=torch.float64)).float()
    t = [math.sqrt(x) for x in (0.6, 0.3, 0.1)]
    q = [math.sqrt(x) for x in (0.5, 0.2, 0.3)]
    t, q = [x / sum(t) for x in t], [x / sum(q) for x in q]
    expected = sum(a * math.log(a / b) for a, b in zip(t, q))
    got = losses.forward_kl_tail(logp, ids, teacher_lp, torch.tensor([0.1], dtype=torch.float64), temperature=2.0)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    reverse = losses.reverse_kl_tail(logp, ids, teacher_lp, torch.tensor([0.1], dtype=torch.float64),
                                     temperature=2.0)
    assert float(reverse) == pytest.approx(sum(b * math.log(b / a) for a, b in zip(t, q)), rel=1e-5)


def test_a_student_matching_the_teachers_buckets_is_a_fixed_point_at_any_temperature():
    """The student equals the teacher on S and puts the teacher's tail mass off S, in another
    shape: what a top-k cache can ask of it.  Tempered buckets leave it there (zero gradient);
    tempering the teacher's tail as one token against the student's full vocabulary (DistillKit's
    re-tempering) would move it."""
    vocab, k, tau = 60, 6, 2.0
    gen = torch.Generator().manual_seed(9)
    teacher = torch.log_softmax(2.0 * torch.randn(N, vocab, generator=gen, dtype=torch.float64), -1)
    teacher_lp, ids = teacher.topk(k, -1)
    tail = 1 - teacher_lp.exp().sum(-1)
    off_s = torch.ones_like(teacher, dtype=torch.bool).scatter(1, ids, False)
    shape = torch.where(off_s, torch.randn(N, vocab, generator=gen, dtype=torch.float64), float("-inf"))
    student = teacher.clone()
    student[off_s] = (torch.log_softmax(shape, -1) + tail.log()[:, None])[off_s]
    logits = student.float().requires_grad_(True)
    loss = losses.forward_kl_tail(torch.log_softmax(logits, -1), ids, teacher_lp.float(), tail, temperature=tau)
    (gradient,) = torch.autograd.grad(loss.sum(), logits)
    assert float(loss.detach().abs().max()) < 1e-5 and float(gradient.abs().max()) < 1e-5

    one_token_tail = torch.cat([teacher_lp / tau, (tail.log() / tau)[:, None]], 1).log_softmax(-1)
    student_tau = torch.log_softmax(logits / tau, -1)
    student_buckets = torch.cat([student_tau.gather(1, ids), torch.logsumexp(student_tau.masked_fill(
        ~off_s, float("-inf")), -1, keepdim=True)], 1)
    distillkit = (one_token_tail.exp() * (one_token_tail - student_buckets)).sum()
    (moved,) = torch.autograd.grad(distillkit, logits)
    assert float(moved.abs().max()) > 1e-3


def test_renormalized_kl_at_a_temperature_is_exact():
    """KL(t̃_τ ‖ p_τ): the teacher's t^(1/τ) renormalized over S needs no tail; the student is full-vocab."""
    vocab, k, tau = 30, 5, 3.0
    gen = torch.Generator().manual_seed(10)
    teacher_logits = 2.0 * torch.randn(N, vocab, generator=gen, dtype=torch.float64)
    student_logits = torch.randn(N, vocab, generator=gen, dtype=torch.float64)
    teacher_lp, ids = torch.log_softmax(teacher_logits, -1).topk(k, -1)
    renormed = torch.log_softmax(teacher_logits.gather(1, ids) / tau, -1)
    student_tau = torch.log_softmax(student_logits / tau, -1).gather(1, ids)
    expected = (renormed.exp() * (renormed - student_tau)).sum(-1)
    got = losses.renorm_kl(torch.log_softmax(student_logits, -1), ids, teacher_lp, temperature=tau)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)   # fp32 inside


def test_tempered_buckets_ignore_padding():
    gen = torch.Generator().manual_seed(12)
    logp = torch.log_softmax(torch.randn(4, 20, generator=gen), -1)
    ids = torch.tensor([[3, 7], [1, 2], [0, 5], [9, 4]])
    teacher_lp = torch.log(torch.tensor([[0.5, 0.2], [0.6, 0.1], [0.3, 0.3], [0.7, 0.2]]))
    tail = 1 - teacher_lp.double().exp().sum(-1)
    padded_ids = torch.cat([ids, torch.full((4, 1), -1)], 1)
    padded_lp = torch.cat([teacher_lp, torch.full((4, 1), float("-inf"))], 1)
    for name in ("forward_kl", "reverse_kl", "jsd", "cakld", "renorm_kl"):
        plain = losses.topk_kd_loss(name, logp, ids, teacher_lp, tail, cakld_beta=0.3, temperature=2.5)
        padded = losses.topk_kd_loss(name, logp, padded_ids, padded_lp, tail, cakld_beta=0.3, temperature=2.5)
        torch.testing.assert_close(padded, plain)
        assert bool(torch.isfinite(plain).all())


def test_logged_kl_and_top1_stay_at_temperature_one():
    """The figures compare runs: a tempered run logs the served distribution's KL, not its loss."""
    k = 9
    teacher_logits = 2.5 * torch.randn(N, k + 1, generator=torch.Generator().manual_seed(8))
    targets = topk_targets(teacher_logits, k)
    _, _, plain = fused_and_reference(targets, LossSpec(), teacher_logits, k + 1, 64)
    _, _, tempered = fused_and_reference(targets, LossSpec(temperature=3.0), teacher_logits, k + 1, 64)
    for key in ("kl", "top1", "ce", "mass_student"):
        torch.testing.assert_close(tempered[key], plain[key])
    assert abs(float(tempered["loss"]) - float(plain["loss"])) > 1e-3


@pytest.mark.parametrize("extra, field", [
    (["distill.mode=qat"], "mode=qat trains on cross-entropy only"),
    (["distill.loss=sampled_ce"], "cannot be re-tempered"),
    (["distill.loss=mse_logprob"], "has no temperature"),
])
def test_a_temperature_the_run_cannot_apply_is_refused_in_one_line(extra, field):
    with pytest.raises(ConfigError, match=f"^distill.temperature: got 2.0, .*{field}"):
        load_config(None, ["distill.temperature=2", *extra])
    with pytest.raises(ConfigError, match="distill.temperature: got 0"):
        load_config(None, ["distill.temperature=0"])
    load_config(None, ["distill.temperature=2", "distill.mode=online"])


def test_a_tempered_run_trains_and_logs_the_same_first_kl(peaky_llama_dir, topk_cache, tmp_path):
    first = {}
    for tau in (1.0, 2.0):
        out = tmp_path / str(tau)
        args = settings(peaky_llama_dir, topk_cache, f"distill.output_dir={out}", "distill.max_steps=2",
                        f"distill.temperature={tau}", "distill.save=false")
        result = CliRunner().invoke(cli, ["distill", *[a for s in args for a in ("--set", s)]])
        assert result.exit_code == 0, result.output
        rows = [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if "loss" in row]
        first[tau] = rows[0]
    assert first[2.0]["kl"] == pytest.approx(first[1.0]["kl"], rel=1e-5)
    assert first[2.0]["loss"] != pytest.approx(first[1.0]["loss"], rel=1e-3)
