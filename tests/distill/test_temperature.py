"""KD at a temperature (``distill.temperature``): against Hinton's τ²·KL(softmax(t/τ) ‖ softmax(s/τ))
computed naively in float64 over the whole vocabulary, values and gradients; the one-bucket
tail re-tempering of a top-k cache, checked for what it keeps exact and which way it errs."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from qadpipe.cli import cli
from qadpipe.config import load_config
from qadpipe.distill.head_loss import LossSpec, PositionTargets, head_loss
from qadpipe.distill.losses import temper_topk
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


def test_re_tempered_top_k_is_exact_on_s_and_its_one_bucket_tail_errs_the_known_way():
    """Inside S only the normalizer is unknown, so log-prob differences are exactly divided by τ;
    for τ > 1 the one-bucket tail is at most the true tempered tail (Σ x^a ≥ (Σ x)^a, a < 1),
    for τ < 1 at least it."""
    vocab, k = 60, 6
    teacher_logits = 2.0 * torch.randn(N, vocab, generator=torch.Generator().manual_seed(7))
    targets = topk_targets(teacher_logits, k)
    for tau in (0.5, 2.0):
        lp, tail = temper_topk(targets.topk_ids, targets.topk_logprobs, targets.tail_mass, tau)
        torch.testing.assert_close(lp.double().exp().sum(-1) + tail, torch.ones(N, dtype=torch.float64))
        torch.testing.assert_close(lp - lp[:, :1], (targets.topk_logprobs - targets.topk_logprobs[:, :1]) / tau)
        true_tempered = torch.softmax(teacher_logits.double() / tau, -1)
        true_tail = 1 - true_tempered.gather(1, targets.topk_ids).sum(-1)
        assert bool((tail <= true_tail + 1e-12).all() if tau > 1 else (tail >= true_tail - 1e-12).all())
        assert not torch.allclose(tail, true_tail)   # an approximation, not the truth


def test_re_tempering_leaves_padding_and_an_empty_tail_alone():
    ids = torch.tensor([[3, 1, -1], [0, 2, 1]])
    lp = torch.log(torch.tensor([[0.75, 0.25, 0.0], [0.5, 0.3, 0.2]]))
    lp[0, 2] = float("-inf")
    tempered, tail = temper_topk(ids, lp, torch.zeros(2, dtype=torch.float64), 2.0)
    assert tempered[0, 2] == float("-inf") and torch.equal(tail, torch.zeros(2, dtype=torch.float64))
    expected = torch.sqrt(torch.tensor([0.75, 0.25])) / torch.sqrt(torch.tensor([0.75, 0.25])).sum()
    torch.testing.assert_close(tempered[0, :2].exp(), expected)


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
])
def test_a_temperature_the_run_cannot_apply_is_refused_in_one_line(extra, field):
    with pytest.raises(ConfigError, match=f"^distill.temperature: got 2.0, .*{field}"):
        load_config(None, ["distill.temperature=2", *extra])
    with pytest.raises(ConfigError, match="distill.temperature: got 0"):
        load_config(None, ["distill.temperature=0"])
    load_config(None, ["distill.temperature=2", "distill.mode=online", "distill.loss=sampled_ce"])


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
