"""The fused, chunked head loss equals the naive full-logits computation (values, gradients,
figures) for every mode and chunk size, and keeps no [positions, vocab] tensor for backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from qadpipe.distill import losses
from qadpipe.distill.head_loss import LossSpec, PositionTargets, head_loss

N, D, V, K = 40, 8, 50, 5


def make_targets(kind: str, gen: torch.Generator) -> tuple[PositionTargets, nn.Module | None]:
    teacher_head = nn.Linear(D, V, bias=False)
    teacher_hidden = torch.randn(N, D, generator=gen)
    with torch.no_grad():
        t_logp = torch.log_softmax(teacher_head(teacher_hidden) * 3, -1)
    next_tokens = torch.randint(V, (N,), generator=gen)
    if kind == "online":
        return PositionTargets(next_tokens, teacher_hidden=teacher_hidden), teacher_head
    if kind == "sampled":
        draws = torch.multinomial(t_logp.exp(), 10, replacement=True, generator=gen)
        weights = torch.full((N, 10), 0.1)
        return PositionTargets(next_tokens, sample_ids=draws, sample_weights=weights), None
    values, ids = t_logp.topk(K, -1)
    tail = torch.from_numpy(1 - values.double().exp().sum(-1).numpy())
    return PositionTargets(next_tokens, topk_ids=ids, topk_logprobs=values, tail_mass=tail), None


def naive(hidden, head, targets, spec, teacher_head):
    logp = torch.log_softmax(head(hidden).float(), -1)
    ce = losses.cross_entropy(logp, targets.next_tokens)
    if spec.mode == "qat":
        return ce.sum()
    if spec.mode == "online":
        kd = losses.full_kl(logp, torch.log_softmax(teacher_head(targets.teacher_hidden), -1))
    elif targets.sample_ids is not None:
        kd = losses.sampled_kl(logp, targets.sample_ids, targets.sample_weights)
    else:
        kd = losses.topk_kd_loss(spec.loss, logp, targets.topk_ids, targets.topk_logprobs, targets.tail_mass,
                                 cakld_beta=spec.cakld_beta)
    return (spec.kd_weight * kd + spec.lm_weight * ce).sum()


@pytest.mark.parametrize("kind, spec", [
    ("topk", LossSpec()),
    ("topk", LossSpec(loss="jsd", kd_weight=0.7, lm_weight=0.3)),
    ("topk", LossSpec(loss="cakld", cakld_beta=0.4)),
    ("topk", LossSpec(mode="qat")),
    ("sampled", LossSpec(loss="forward_kl")),
    ("online", LossSpec(mode="online")),
])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_equals_naive(kind, spec, chunk):
    gen = torch.Generator().manual_seed(3)
    targets, teacher_head = make_targets(kind, gen)
    head = nn.Linear(D, V, bias=True)
    hidden = torch.randn(N, D, generator=gen, requires_grad=True)
    total, stats = head_loss(hidden, head, targets, spec, chunk, teacher_head)
    total.backward()
    got = (total.detach(), hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    hidden.grad = None
    head.zero_grad()
    expected_total = naive(hidden, head, targets, spec, teacher_head)
    expected_total.backward()
    expected = (expected_total.detach(), hidden.grad, head.weight.grad, head.bias.grad)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert int(stats["positions"]) == N
    torch.testing.assert_close(float(stats["loss"]), float(expected_total.detach()), rtol=1e-5, atol=1e-5)


def test_figures_are_the_tail_kl_and_top1_agreement_whatever_the_training_loss():
    gen = torch.Generator().manual_seed(4)
    targets, _ = make_targets("topk", gen)
    head = nn.Linear(D, V, bias=False)
    hidden = torch.randn(N, D, generator=gen)
    _, stats = head_loss(hidden, head, targets, LossSpec(loss="mse_logprob"), 9)
    with torch.no_grad():
        logp = torch.log_softmax(head(hidden), -1)
    kl = losses.forward_kl_tail(logp, targets.topk_ids, targets.topk_logprobs, targets.tail_mass).sum()
    top1 = (logp.argmax(-1) == targets.topk_ids[:, 0]).sum()
    torch.testing.assert_close(float(stats["kl"]), float(kl), rtol=1e-5, atol=1e-5)
    assert int(stats["top1"]) == int(top1)


def test_figures_mass_on_s_by_hand_padded_slots_excluded():
    """The student's and the teacher's probability mass on the cached top-k: the student's
    summed over the stored ids only (a padded slot, id -1, counts nothing), the teacher's
    1 - tail."""
    gen = torch.Generator().manual_seed(6)
    targets, _ = make_targets("topk", gen)
    targets.topk_ids, targets.topk_logprobs = targets.topk_ids.clone(), targets.topk_logprobs.clone()
    targets.topk_ids[0, -1], targets.topk_logprobs[0, -1] = -1, float("-inf")
    head = nn.Linear(D, V, bias=False)
    hidden = torch.randn(N, D, generator=gen)
    _, stats = head_loss(hidden, head, targets, LossSpec(), 9)
    with torch.no_grad():
        p = torch.softmax(head(hidden).double(), -1)
    student = sum(float(p[n, i]) for n in range(N) for i in targets.topk_ids[n].tolist() if i >= 0)
    assert float(stats["mass_student"]) == pytest.approx(student, rel=1e-5)
    assert float(stats["mass_teacher"]) == pytest.approx(float((1 - targets.tail_mass.double()).sum()), rel=1e-12)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_summarized_figures_are_per_position_means_whatever_the_chunking(chunk):
    """What metrics.jsonl and the held-out eval report (kl, top1, mass on S, loss, ce) are
    means over positions: the summed figures divided by the positions they were summed over,
    not by the number of chunks (or batches) that carried them."""
    from qadpipe.distill.head_loss import summarize

    gen = torch.Generator().manual_seed(10)
    targets, _ = make_targets("topk", gen)
    head = nn.Linear(D, V, bias=False)
    hidden = torch.randn(N, D, generator=gen)
    spec = LossSpec(kd_weight=0.8, lm_weight=0.3)
    with torch.no_grad():
        _, stats = head_loss(hidden, head, targets, spec, chunk)
        logp = torch.log_softmax(head(hidden).double(), -1)
    kl = losses.forward_kl_tail(logp, targets.topk_ids, targets.topk_logprobs.double(), targets.tail_mass.double())
    ce = -logp.gather(1, targets.next_tokens[:, None]).squeeze(1)
    got = summarize(stats)
    assert got["positions"] == N
    assert got["kl"] == pytest.approx(float(kl.mean()), rel=1e-5)
    assert got["top1"] == pytest.approx(float((logp.argmax(-1) == targets.topk_ids[:, 0]).double().mean()), abs=1e-12)
    assert got["ce"] == pytest.approx(float(ce.mean()), rel=1e-5)
    assert got["loss"] == pytest.approx(float((0.8 * kl + 0.3 * ce).mean()), rel=1e-5)
    assert got["topk_mass_student"] == pytest.approx(float(logp.gather(1, targets.topk_ids).exp().sum(-1).mean()),
                                                     rel=1e-5)
    assert got["topk_mass_teacher"] == pytest.approx(float((1 - targets.tail_mass.double()).mean()), rel=1e-9)


def test_sampled_top1_agreement_is_against_the_most_drawn_token():
    """A sampled cache's teacher top-1 is its most-weighted draw: here the student's argmax
    is that draw at 30 of 40 positions and absent from the draws elsewhere.  Not the first
    column: collate orders a position's draws by id, not by weight."""
    gen = torch.Generator().manual_seed(7)
    head = nn.Linear(D, V, bias=False)
    hidden = torch.randn(N, D, generator=gen)
    with torch.no_grad():
        student_top1 = head(hidden).argmax(-1)
    others = torch.stack([(student_top1 + 1 + j) % V for j in range(4)], -1)   # never the student's top-1
    weights = torch.tensor([0.1, 0.4, 0.3, 0.2]).expand(N, 4).clone()
    draws = others.clone()
    draws[:30, 1] = student_top1[:30]                                          # the most-weighted draw
    targets = PositionTargets(torch.randint(V, (N,), generator=gen), sample_ids=draws, sample_weights=weights)
    _, stats = head_loss(hidden, head, targets, LossSpec(), 9)
    assert int(stats["top1"]) == 30


def test_backward_keeps_no_positions_by_vocab_tensor():
    """The naive path saves [N, V] logits for backward; the fused path saves only [N, D] and [V, D]."""
    gen = torch.Generator().manual_seed(5)
    targets, _ = make_targets("topk", gen)
    head = nn.Linear(D, V, bias=False)
    hidden = torch.randn(N, D, generator=gen, requires_grad=True)

    def largest_saved(fn) -> int:
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn()
        return max(sizes)

    fused = largest_saved(lambda: head_loss(hidden, head, targets, LossSpec(), 8))
    plain = largest_saved(lambda: naive(hidden, head, targets, LossSpec(), None))
    assert plain >= N * V
    assert fused <= max(N * D, V * D) < N * V


def test_frozen_head_gets_no_gradient_and_hidden_still_does():
    gen = torch.Generator().manual_seed(6)
    targets, _ = make_targets("topk", gen)
    head = nn.Linear(D, V, bias=False).requires_grad_(False)
    hidden = torch.randn(N, D, generator=gen, requires_grad=True)
    total, _ = head_loss(hidden, head, targets, LossSpec(), 16)
    total.backward()
    assert head.weight.grad is None and hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_backward_hands_the_built_head_gradient_on_scaled_and_refuses_a_second_backward():
    """The head's gradient is built in forward; backward scales that tensor (no copy beside it)."""
    gen = torch.Generator().manual_seed(7)
    targets, _ = make_targets("topk", gen)
    head = nn.Linear(D, V, bias=False)
    hidden = torch.randn(N, D, generator=gen, requires_grad=True)
    total, _ = head_loss(hidden, head, targets, LossSpec(), 16)
    built = total.grad_fn.grads[1][0].data_ptr()   # the address only: a reference would force a copy
    (total * 0.25).backward(retain_graph=True)
    assert head.weight.grad.data_ptr() == built
    got = head.weight.grad.clone()
    head.zero_grad()
    (naive(hidden, head, targets, LossSpec(), None) * 0.25).backward()
    torch.testing.assert_close(got, head.weight.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        total.backward()


@pytest.mark.parametrize("spec", [LossSpec(mode="qat"), LossSpec()], ids=["qat", "forward_kl"])
def test_backward_scales_hidden_and_head_gradients_by_the_incoming_gradient(spec):
    """Guards the fused backward honouring grad_out for *hidden* (not only the head): the trainer
    backpropagates total / N, so a dropped scale makes the body's gradients N x too large.
    Reference: the plain full-logits loss (qat: torch's own cross_entropy), scaled by 0.37."""
    gen = torch.Generator().manual_seed(8)
    targets, _ = make_targets("topk", gen)
    head = nn.Linear(D, V, bias=True)
    hidden = torch.randn(N, D, generator=gen, requires_grad=True)
    total, _ = head_loss(hidden, head, targets, spec, 7)
    (0.37 * total).backward()
    got = (hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    hidden.grad = None
    head.zero_grad()
    if spec.mode == "qat":
        plain = torch.nn.functional.cross_entropy(head(hidden), targets.next_tokens, reduction="sum")
    else:
        plain = naive(hidden, head, targets, spec, None)
    (0.37 * plain).backward()
    for a, b in zip(got, (hidden.grad, head.weight.grad, head.bias.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_grad_chunk_loop_keeps_the_last_partial_chunk():
    """Guards the eval (no-grad) loop: 23 positions in chunks of 9 is 9 + 9 + 5, and the short
    last chunk must be scored (positions == 23, the loss equals the plain full-logits sum)."""
    gen = torch.Generator().manual_seed(9)
    targets, _ = make_targets("topk", gen)
    targets = targets.slice(0, 23)
    head = nn.Linear(D, V, bias=True)
    hidden = torch.randn(23, D, generator=gen)
    for spec in (LossSpec(mode="qat"), LossSpec()):
        with torch.no_grad():
            total, stats = head_loss(hidden, head, targets, spec, 9)
            if spec.mode == "qat":
                plain = torch.nn.functional.cross_entropy(head(hidden), targets.next_tokens, reduction="sum")
            else:
                plain = naive(hidden, head, targets, spec, None)
        assert int(stats["positions"]) == 23
        torch.testing.assert_close(total, plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(float(stats["loss"]), float(plain), rtol=1e-5, atol=1e-5)


class _NewVocabByHidden(TorchDispatchMode):
    """Records every op that allocates a ``[V, D]`` tensor (not a view, not in place), with its dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and tuple(out.shape) in ((V, D), (D, V)):
            storage = out.untyped_storage().data_ptr()
            if not any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == storage for a in args):
                self.made.append((func.overloadpacket.__name__, out.dtype))
        return out


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_a_linear_head_adds_each_chunk_gradient_into_one_fp32_tensor(autocast):
    """autograd.grad returned a new vocab × hidden weight gradient per chunk (fp32, after a bf16
    one under autocast) beside the accumulator; a plain Linear head adds into the accumulator.
    The values against the general path (the same head behind a wrapper, so not a Linear)."""
    gen = torch.Generator().manual_seed(10)
    targets, _ = make_targets("topk", gen)
    head = nn.Linear(D, V, bias=True)
    hidden = torch.randn(N, D, generator=gen, requires_grad=True)
    results = []
    for module in (head, nn.Sequential(head)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), _NewVocabByHidden() as made:
            total, _ = head_loss(hidden, module, targets, LossSpec(), 10)
            total.backward()
        results.append((total.detach(), hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone(),
                        made.made))
        hidden.grad = None
        head.zero_grad()
    (*fused, made_fused), (*general, made_general) = results
    fp32 = [[name for name, dtype in made if dtype == torch.float32] for made in (made_fused, made_general)]
    assert fp32[0] == ["zeros_like"]                                   # the accumulator, and nothing per chunk
    assert fp32[1].count("zeros_like") == 1 and len(fp32[1]) == 1 + N // 10   # autograd.grad: one per chunk
    tolerance = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    for got, want in zip(fused, general):
        torch.testing.assert_close(got, want, **tolerance)


def _weight_normed(head: nn.Linear) -> nn.Module:
    return torch.nn.utils.weight_norm(head)


def _output_doubled(head: nn.Linear) -> nn.Module:
    head.register_forward_hook(lambda module, inputs, output: output * 2)
    return head


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("change", [_weight_normed, _output_doubled], ids=["weight_norm", "forward-hook"])
def test_a_linear_whose_output_is_not_its_weight_times_x_takes_the_general_path(change):
    """Still an nn.Linear, but the weight trains through weight_g/weight_v, or a hook changes
    the logits: the hand-computed gradient would be zero or half the true one."""
    gen = torch.Generator().manual_seed(11)
    targets, _ = make_targets("topk", gen)
    head = change(nn.Linear(D, V, bias=True))
    hidden = torch.randn(N, D, generator=gen, requires_grad=True)
    total, _ = head_loss(hidden, head, targets, LossSpec(), 7)
    total.backward()
    got = [hidden.grad.clone()] + [p.grad.clone() for p in head.parameters()]
    hidden.grad = None
    head.zero_grad()
    naive(hidden, head, targets, LossSpec(), None).backward()
    for a, b in zip(got, [hidden.grad] + [p.grad for p in head.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
