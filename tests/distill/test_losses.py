"""Every loss against a naive full-vocabulary reference: values AND gradients.

The references are built independently of the implementation: float64 full-vocab softmaxes,
the k+1 buckets formed by summing the *complement* of S explicitly (not 1 − Σ_S), and the
divergences written out in float64 probabilities.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from qadpipe.distill import losses

V, C, K = 50, 6, 8


def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ a log(a/b) in float64, 0 where a = 0.  Not torch.distributions' Categorical KL: it
    clamps probabilities to fp64's eps (2.2e-16), which the confident-student rows go far below."""
    live = a > 0
    a_live = torch.where(live, a, 1.0)   # so a = 0 sends no 0 · log 0 NaN into the gradient
    return torch.where(live, a_live * (a_live.log() - b.log()), torch.zeros_like(a)).sum(-1)


@pytest.fixture
def case():
    """Teacher logits (peaky and flat rows), student logits, the teacher's top-k cache."""
    gen = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(C, V, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 4, C)[:, None]
    student_logits = torch.randn(C, V, generator=gen, dtype=torch.float64)
    t = teacher_logits.softmax(-1)
    values, ids = t.topk(K, dim=-1)
    complement = torch.ones_like(t, dtype=torch.bool).scatter(1, ids, False)
    tail = (t * complement).sum(-1)  # the mass outside S, summed over the complement
    return dict(t=t, ids=ids, teacher_lp=values.log().float(), tail=tail, complement=complement,
                student_logits=student_logits)


def buckets(probs: torch.Tensor, ids: torch.Tensor, complement: torch.Tensor) -> torch.Tensor:
    return torch.cat([probs.gather(1, ids), (probs * complement).sum(-1, keepdim=True)], dim=1)


def implementation(fn, case, **kw):
    z = case["student_logits"].float().clone().requires_grad_()
    value = fn(torch.log_softmax(z, -1), case["ids"], case["teacher_lp"], case["tail"], **kw)
    value.sum().backward()
    return value.detach().double(), z.grad.double()


def reference(fn, case):
    z = case["student_logits"].clone().requires_grad_()
    p = z.softmax(-1)
    value = fn(p, case)
    value.sum().backward()
    return value.detach(), z.grad


def ref_forward(p, c):
    return kl(buckets(c["t"], c["ids"], c["complement"]), buckets(p, c["ids"], c["complement"]))


def ref_reverse(p, c):
    return kl(buckets(p, c["ids"], c["complement"]), buckets(c["t"], c["ids"], c["complement"]))


def ref_jsd(p, c, beta=0.5):
    tb, pb = buckets(c["t"], c["ids"], c["complement"]), buckets(p, c["ids"], c["complement"])
    m = beta * tb + (1 - beta) * pb
    return beta * kl(tb, m) + (1 - beta) * kl(pb, m)


def ref_cakld(p, c, beta=0.3):
    return beta * ref_reverse(p, c) + (1 - beta) * ref_forward(p, c)


def ref_renorm(p, c):
    t_tilde = torch.zeros_like(c["t"]).scatter(1, c["ids"], c["t"].gather(1, c["ids"]))
    t_tilde = t_tilde / t_tilde.sum(-1, keepdim=True)
    return kl(t_tilde, p)


def ref_mse(p, c):
    return ((p.log().gather(1, c["ids"]) - c["t"].log().gather(1, c["ids"])) ** 2).mean(-1)


@pytest.mark.parametrize("fn, ref, kw", [
    (losses.forward_kl_tail, ref_forward, {}),
    (losses.reverse_kl_tail, ref_reverse, {}),
    (losses.jsd_tail, ref_jsd, {}),
    # β ≠ 0.5: at 0.5 the mixture weights β and 1 − β can be swapped unseen
    (losses.jsd_tail, functools.partial(ref_jsd, beta=0.3), {"beta": 0.3}),
    (losses.cakld, ref_cakld, {"beta": 0.3}),
    (losses.renorm_kl, ref_renorm, {}),
    (losses.mse_logprob, ref_mse, {}),
], ids=["forward_kl", "reverse_kl", "jsd", "jsd_beta0.3", "cakld", "renorm_kl", "mse_logprob"])
def test_topk_loss_matches_full_vocab_reference(case, fn, ref, kw):
    value, grad = implementation(fn, case, **kw)
    ref_value, ref_grad = reference(ref, case)
    torch.testing.assert_close(value, ref_value, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-6)


#: Student logit gaps on S: 1 − P from 0.99 down to 1e-41 -- both sides of the loss's switch
#: to summing the complement (1e-2), the range where 1 − Σ_S p in fp32 has no digit left, and
#: masses below fp32's smallest normal (a linear-space sum needed a floor there that cut the
#: tail gradient to 0; the reviewer's case was a gap of 80).
GAPS = (0.0, 6.0, 9.0, 17.0, 22.0, 30.0, 80.0, 100.0)


def confident_student_case() -> dict:
    """The teacher keeps a quarter of its mass off S; row r of the student puts all but
    ~e^-GAPS[r] of its mass on S."""
    vocab, k = 300, 4
    t = torch.full((len(GAPS), vocab), 0.25 / (vocab - k), dtype=torch.float64)
    t[:, :k] = torch.tensor([0.4, 0.2, 0.1, 0.05], dtype=torch.float64)
    ids = torch.arange(k).expand(len(GAPS), k)
    complement = torch.ones_like(t, dtype=torch.bool).scatter(1, ids, False)
    student_logits = torch.zeros(len(GAPS), vocab, dtype=torch.float64)
    student_logits[:, :k] = torch.tensor(GAPS, dtype=torch.float64)[:, None]
    return dict(t=t, ids=ids, teacher_lp=t[:, :k].log().float(), tail=(t * complement).sum(-1),
                complement=complement, student_logits=student_logits)


@pytest.mark.parametrize("fn, ref, kw", [
    (losses.forward_kl_tail, ref_forward, {}),
    (losses.reverse_kl_tail, ref_reverse, {}),
    (losses.jsd_tail, ref_jsd, {}),
    (losses.cakld, ref_cakld, {"beta": 0.3}),
], ids=["forward_kl", "reverse_kl", "jsd", "cakld"])
def test_tail_losses_stay_exact_when_the_student_puts_almost_everything_on_s(fn, ref, kw):
    case = confident_student_case()
    value, grad = implementation(fn, case, **kw)
    ref_value, ref_grad = reference(ref, case)
    torch.testing.assert_close(value, ref_value, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-7)
    # what pulls mass back off S, row by row: the summed off-S gradient (−0.25 for forward KL), never 0
    # (JSD's and the reverse KL's fall into fp32's subnormals at gap 100, where no relative digit is kept)
    off_s = case["complement"]
    torch.testing.assert_close((grad * off_s).sum(-1), (ref_grad * off_s).sum(-1), rtol=1e-3,
                               atol=torch.finfo(torch.float32).tiny)


def test_forward_kl_tail_gradient_is_exact_kd_inside_s_and_rescaled_tail_outside(case):
    """∂/∂z_j = p_j − t_j on S; p_j (T − P)/(1 − P) off S (hand-derived, DESIGN.md)."""
    _, grad = implementation(losses.forward_kl_tail, case)
    p = case["student_logits"].softmax(-1)
    T, P = 1 - case["tail"], p.gather(1, case["ids"]).sum(-1)
    expected = p * ((T - P) / (1 - P))[:, None]
    expected.scatter_(1, case["ids"], (p - case["t"]).gather(1, case["ids"]))
    torch.testing.assert_close(grad, expected, rtol=1e-3, atol=1e-6)


def test_tail_bucket_kl_is_a_lower_bound_and_exact_when_s_is_the_vocab(case):
    """When S is the whole vocabulary there is no tail bucket: the loss is the full KL to fp32
    noise (~5e-7 here).  A phantom tail bucket (teacher 1e-8, student floored) adds ~1e-5, which
    the old atol=1e-5 / rtol=1e-4 let through."""
    p = case["student_logits"].softmax(-1)
    full = kl(case["t"], p)
    value, _ = implementation(losses.forward_kl_tail, case)
    assert (value <= full + 1e-5).all() and (value > 0).all()
    lp, ids = case["t"].log().float().sort(-1, descending=True)
    whole = losses.forward_kl_tail(torch.log_softmax(case["student_logits"].float(), -1), ids, lp,
                                   torch.zeros(C, dtype=torch.float64))
    torch.testing.assert_close(whole.double(), full, rtol=1e-6, atol=1e-6)


def test_padding_and_zero_probability_entries_are_ignored_values_and_gradients(case):
    padded = dict(case)
    padded["ids"] = torch.cat([case["ids"], torch.full((C, 2), -1), case["ids"][:, :1]], dim=1)
    padded["teacher_lp"] = torch.cat([case["teacher_lp"], torch.zeros(C, 2), torch.full((C, 1), float("-inf"))], 1)
    for fn in (losses.forward_kl_tail, losses.reverse_kl_tail, losses.jsd_tail, losses.renorm_kl,
               losses.mse_logprob):
        value, grad = implementation(fn, padded)
        ref_value, ref_grad = implementation(fn, case)
        assert torch.isfinite(grad).all(), fn.__name__
        torch.testing.assert_close(value, ref_value, msg=fn.__name__)
        torch.testing.assert_close(grad, ref_grad, msg=fn.__name__)


def test_sampled_kl_matches_reference_and_is_unbiased(case):
    gen = torch.Generator().manual_seed(1)
    z = case["student_logits"].float().clone().requires_grad_()
    draws = torch.multinomial(case["t"], 50, replacement=True, generator=gen)
    counts = torch.zeros_like(case["t"]).scatter_add(1, draws, torch.ones_like(draws, dtype=torch.float64))
    t_hat = counts / 50
    # compact (ids, weights) rows with -1 padding, as the collate produces them
    width = int((counts > 0).sum(-1).max()) + 2
    ids = torch.full((C, width), -1, dtype=torch.long)
    weights = torch.zeros(C, width)
    for row in range(C):
        present = counts[row].nonzero().squeeze(-1)
        ids[row, : len(present)] = present
        weights[row, : len(present)] = t_hat[row, present].float()
    value = losses.sampled_kl(torch.log_softmax(z, -1), ids, weights)
    value.sum().backward()
    zr = case["student_logits"].clone().requires_grad_()
    ref = kl(t_hat, zr.softmax(-1))
    ref.sum().backward()
    torch.testing.assert_close(value.detach().double(), ref.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(z.grad.double(), zr.grad, rtol=1e-3, atol=1e-6)
    # unbiased: sampled_kl's gradient, averaged over 400 independent sets of 50 draws, approaches
    # the full-KD gradient p - t (every id a column, the undrawn ones at weight 0)
    sets = 400
    many = torch.multinomial(case["t"], sets * 50, replacement=True, generator=gen).reshape(C, sets, 50)
    counts = torch.zeros(C, sets, V).scatter_add(2, many, torch.ones(C, sets, 50))
    z_many = case["student_logits"].float().clone().requires_grad_()
    logp = torch.log_softmax(z_many, -1).unsqueeze(1).expand(C, sets, V).reshape(C * sets, V)
    losses.sampled_kl(logp, torch.arange(V).expand(C * sets, V), (counts / 50).reshape(C * sets, V)).sum().backward()
    full_kd_gradient = case["student_logits"].softmax(-1) - case["t"]
    assert (z_many.grad.double() / sets - full_kd_gradient).abs().max() < 0.02


def test_full_kl_and_cross_entropy_match_torch(case):
    logp = torch.log_softmax(case["student_logits"].float(), -1)
    t_logp = case["t"].log().float()
    torch.testing.assert_close(losses.full_kl(logp, t_logp).double(),
                               kl(case["t"], case["student_logits"].softmax(-1)), rtol=1e-4, atol=1e-6)
    tokens = torch.arange(C) * 7 % V
    torch.testing.assert_close(losses.cross_entropy(logp, tokens),
                               F.cross_entropy(case["student_logits"].float(), tokens, reduction="none"))


def test_full_kl_ignores_tokens_the_teacher_masks(case):
    """A −inf teacher logit (a padded vocabulary) made online mode's loss NaN (0 · −inf)."""
    masked = case["student_logits"].float().clone()
    masked[:, V - 5:] = float("-inf")
    t_logp = torch.log_softmax(masked, -1)
    logp = torch.log_softmax(case["student_logits"].float(), -1)
    t = t_logp.double().exp()
    reference = (t[:, :V - 5] * (t_logp.double()[:, :V - 5] - logp.double()[:, :V - 5])).sum(-1)
    torch.testing.assert_close(losses.full_kl(logp, t_logp).double(), reference, rtol=1e-5, atol=1e-6)


def test_a_student_ruling_out_every_token_off_s_keeps_a_finite_loss(case):
    """Off-S log-probs all -inf (a model masking those tokens): the log-domain off-S mass is
    -inf, floored far below fp64's range so the tail term stays finite."""
    logits = case["student_logits"].float().clone()
    off_s = torch.ones_like(logits, dtype=torch.bool).scatter(1, case["ids"], False)
    logits[0][off_s[0]] = float("-inf")
    z = logits.requires_grad_()
    value = losses.forward_kl_tail(torch.log_softmax(z, -1), case["ids"], case["teacher_lp"], case["tail"])
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(z.grad[:, :]).all()


def test_reverse_kl_stays_finite_when_the_teacher_tail_is_zero(case):
    zero_tail = dict(case, tail=torch.zeros(C, dtype=torch.float64))
    value, grad = implementation(losses.reverse_kl_tail, zero_tail)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("name, ref", [
    ("forward_kl", ref_forward), ("reverse_kl", ref_reverse), ("jsd", functools.partial(ref_jsd, beta=0.3)),
    ("cakld", ref_cakld), ("renorm_kl", ref_renorm), ("mse_logprob", ref_mse),
])
def test_each_config_name_trains_its_own_loss(case, name, ref):
    """``distill.loss`` reaches the trainer by name (topk_kd_loss_and_kl): a table mapping
    reverse_kl to the forward loss, or swapping jsd and cakld, passed every test that called
    the loss functions directly.  β = 0.3 reaches CAKLD and JSD's mixture (at 0.5 JSD's
    weights could be swapped unseen)."""
    def by_name(logp, ids, teacher_lp, tail):
        loss, kl_figure = losses.topk_kd_loss_and_kl(name, logp, ids, teacher_lp, tail, cakld_beta=0.3)
        torch.testing.assert_close(kl_figure.double(), reference(ref_forward, case)[0], rtol=1e-4, atol=1e-6)
        return loss

    value, grad = implementation(by_name, case)
    ref_value, ref_grad = reference(ref, case)
    torch.testing.assert_close(value, ref_value, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("tail", [0.0, 1e-10, 1e-6])
def test_reverse_kl_floors_the_teachers_tail_at_megatrons_1e_8(case, tail):
    """A cached tail below 1e-8 is rounding noise of the teacher's fp32 log-probs: the reverse
    direction weighs the student's mass off S by log(P / max(tail, 1e-8)), not by that noise."""
    tails = torch.full((C,), tail, dtype=torch.float64)

    def ref(p, c):
        floored = torch.full((C, 1), max(tail, 1e-8), dtype=torch.float64)
        return kl(buckets(p, c["ids"], c["complement"]), torch.cat([c["t"].gather(1, c["ids"]), floored], 1))

    value, grad = implementation(losses.reverse_kl_tail, dict(case, tail=tails))
    ref_value, ref_grad = reference(ref, case)
    torch.testing.assert_close(value, ref_value, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-6)


def test_unknown_loss_name_is_refused():
    with pytest.raises(ValueError, match="unknown top-k loss 'kl2'"):
        losses.topk_kd_loss("kl2", torch.zeros(1, 3), torch.zeros(1, 1, dtype=torch.long),
                            torch.zeros(1, 1), torch.zeros(1))


@pytest.mark.parametrize("fn, ref, kw", [
    (losses.reverse_kl_tail, ref_reverse, {}),
    (losses.jsd_tail, functools.partial(ref_jsd, beta=0.3), {"beta": 0.3}),
    (losses.reverse_kl_tail, None, {"temperature": 2.0}),
], ids=["reverse_kl", "jsd", "reverse_kl_tau2"])
def test_a_student_ruling_out_a_cached_token_adds_nothing_where_it_has_no_mass(case, fn, ref, kw):
    """A −inf student logit on a cached id: the student's bucket there is 0, and 0·log 0 = 0.
    exp(−inf)·(−inf − log t) made the loss and every gradient of its row NaN.  (Forward KL,
    and CAKLD's forward term, are +inf there: the teacher puts mass where the student has none.)"""
    masked = dict(case, student_logits=case["student_logits"].clone())
    masked["student_logits"][0, case["ids"][0, 3]] = float("-inf")
    value, grad = implementation(fn, masked, **kw)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    if ref is not None:
        ref_value, ref_grad = reference(ref, masked)
        torch.testing.assert_close(value, ref_value, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-6)
