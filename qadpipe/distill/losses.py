"""Distillation losses on cached teacher targets: pure per-position functions, in fp32.

Every function takes the student's *full-vocabulary* log-probs for a chunk of positions
(``logp`` ``[C, V]`` fp32, from :func:`torch.log_softmax` of the chunk's logits, so the
student's normalizer is exact even though the teacher is truncated) and returns one loss per
position ``[C]``.  The caller (:mod:`qadpipe.distill.head_loss`) builds ``logp`` chunk by
chunk, so no ``[batch, seq, vocab]`` tensor ever exists.

Notation for a position: S = the teacher's cached top-k ids, ``t_i`` its probabilities,
``T = Σ_S t_i`` (the cache stores the tail ``1 − T`` exactly, in float64), ``p`` the student,
``P = Σ_S p_i``.  A cached entry that is padding (id < 0) or has probability 0 (log-prob
−inf, the compact encoding's "zero" code) is ignored.

* :func:`forward_kl_tail` (default): KL over the k+1 buckets S ∪ {tail}:
  Σ_S t log(t/p) + (1−T) log((1−T)/(1−P)).  Never exceeds the full KL; its gradient is the
  exact full-KD gradient ``p_j − t_j`` inside S, and it charges the student for its total
  off-S mass without inventing a tail shape.
* :func:`renorm_kl`: KL(t̃‖p) with the teacher renormalized over S (DistillKit ``zero``);
  biased toward over-confidence (its optimum inflates the head by 1/T); kept for comparison.
* :func:`reverse_kl_tail`, :func:`jsd_tail`, :func:`cakld`: the same k+1 coarsening, since
  a top-k cache cannot give the teacher's log-prob where the student puts mass outside S.
  CAKLD (BitDistiller) = β·KL(p‖t) + (1−β)·KL(t‖p) with β the teacher's mean top-1
  probability (a constant the trainer measures on the cache before training).
* :func:`mse_logprob`: mean over S of (log p − log t)², the QAD paper's comparison point.
* :func:`sampled_kl`: sampled caches (Sparse Logit Sampling): target ``count/N``; the value
  is KL(t̂‖p) (cross-entropy plus the constant Σ t̂ log t̂).  Unbiased in expectation for
  full-vocabulary draws (the HF backend); vLLM draws from the top-K plus a tail bucket, and
  the tail draws name no token (:mod:`qadpipe.distill.collate` leaves them out), so there
  the expected target is the top-K renormalized, t/T -- the bias of :func:`renorm_kl`.
* :func:`full_kl`: online mode, the teacher's full distribution.
* :func:`cross_entropy`: LM loss on the data's next tokens (QAT, or mixed in by weight).

Temperature (``distill.temperature`` τ): the top-k losses take ``temperature``.  The bucket
losses soften *both* k+1-bucket distributions, teacher and student alike (log-probs / τ,
renormalized over the buckets).  A cache holds no shape inside the tail, so that is the
temperature it can apply without bias: tempering is one-to-one on the buckets, so the student
is still driven to the teacher's temperature-1 bucket masses.  Re-tempering only the teacher's
tail as if it were one token (DistillKit's approximation) gives the tail far less than the
tempered teacher does, and the student learns to starve it: on the demo at τ = 2 its top-64
mass rose to 0.989 against the teacher's 0.935.  :func:`renorm_kl` lives on S alone and is
tempered exactly there (teacher renormalized over S at τ, student full-vocab at τ).
"""

from __future__ import annotations

import math

import torch

#: Floor for the tail masses inside logs: a teacher (or student) that puts exactly 0 outside
#: S would make the reverse direction infinite; 1e-8 is Megatron-LM's ghost-token epsilon.
#: It also stops noise from setting the reverse-KL (and CAKLD) penalty on the student's mass
#: off S: a cached tail is 1 − Σ exp(top-k log-probs), and an fp32 teacher's log-probs
#: (logit minus a log-sum-exp of magnitude ~10-30) carry absolute errors of ~1e-7 or more, so
#: a tail of 1e-10 or 1e-14 is not measured, and its log (-23 vs -32) would weigh that mass
#: by rounding noise.  Forward KL and JSD barely notice: their tail terms are weighted by the
#: tail itself (JSD's by the mixture, which the student's tail dominates).
TAIL_EPS = 1e-8

#: Rows whose student mass off S is below this sum that mass over the complement of S
#: (see :func:`_student_rest`); above it, log(1 − P) is within ~1e-4 relative.
EXACT_REST_BELOW = 1e-2
#: log of the smallest off-S mass the tail term uses (e^-1000: below fp64's range, so it cuts
#: nothing a model can express but a row of -inf logits off S).
LOG_REST_FLOOR = -1000.0

KD_LOSSES = ("forward_kl", "renorm_kl", "reverse_kl", "jsd", "cakld", "mse_logprob")


def _gather_topk(logp: torch.Tensor, ids: torch.Tensor, teacher_lp: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Student log-probs at the cached ids, and the mask of real cached entries."""
    valid = (ids >= 0) & torch.isfinite(teacher_lp)
    student_lp = logp.gather(1, ids.clamp_min(0).long())
    return student_lp, valid


class _LogMassOffS(torch.autograd.Function):
    """log Σ_{j∉S} exp(logp_j) per row, a log-sum-exp over the complement of S itself.

    In the log domain (the row's largest off-S log-prob taken out first), so a confident
    student's off-S mass keeps its value and gradient however small it is: summing ``exp`` in
    linear space underflows near 1e-38 and needed a floor that cut the tail gradient.
    Forward: the cached entries set to −inf in a copy of ``[C, V]`` (a min-scatter, so padding
    slots and repeated ids leave the row alone), one ``exp`` in place, one sum.  Backward: the
    gradient w.r.t. ``logp_j`` is ``p_j / mass`` off S and 0 on it -- that same tensor, scaled.
    """

    @staticmethod
    def forward(ctx, logp: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        off_s = logp.detach().clone()
        drop = torch.where(valid, float("-inf"), float("inf")).to(off_s.dtype)
        off_s.scatter_reduce_(1, ids.clamp_min(0).long(), drop, reduce="amin")
        peak = off_s.amax(-1, keepdim=True)
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))   # S covers the row
        summed = off_s.sub_(peak).exp_().sum(-1)
        ctx.save_for_backward(off_s, summed)
        ctx.spent = False
        return peak.squeeze(-1) + summed.log()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        if ctx.spent:   # the gradient is built in the saved tensor itself: one backward per forward
            raise RuntimeError("_LogMassOffS: backward ran twice on one forward (retain_graph is not supported)")
        ctx.spent = True
        off_s, summed = ctx.saved_tensors
        scale = torch.where(summed > 0, grad / summed, torch.zeros_like(grad))
        return off_s.mul_(scale[:, None]), None, None


def _student_rest(logp: torch.Tensor, ids: torch.Tensor, student_lp: torch.Tensor, valid: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """log of the student's mass off S, and whether S leaves any of the vocabulary out.

    ``log(1 − P)`` from the gathered log-probs is one cheap op on ``[C, k]``, but the fp32
    log-softmax normalizer carries ~1e-7 of rounding: 1 − P loses every digit once the student
    puts more than 1 − 1e-5 on S (a confident student, common at k = 64), and the tail term's
    gradient comes out wrong, then exactly 0.  When some row has 1 − P < :data:`EXACT_REST_BELOW`
    (where the cancellation would cost more than ~1e-4 of relative precision), the chunk's
    mass off S is taken over the complement (:class:`_LogMassOffS`) and used for those rows.
    """
    lse = torch.logsumexp(student_lp.masked_fill(~valid, float("-inf")), dim=-1)
    rest = torch.log(-torch.expm1(lse.clamp(max=-TAIL_EPS)))
    exact_rows = rest < math.log(EXACT_REST_BELOW)
    if exact_rows.any():
        # floored far below any mass fp32 can hold: only a row whose every off-S log-prob is
        # -inf (a model that rules those tokens out) reaches it, and its loss stays finite
        rest = torch.where(exact_rows, _LogMassOffS.apply(logp, ids, valid).clamp_min(LOG_REST_FLOOR), rest)
    return rest, valid.sum(-1) < logp.shape[-1]


def _buckets(logp: torch.Tensor, ids: torch.Tensor, teacher_lp: torch.Tensor, tail_mass: torch.Tensor,
             temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher and student log-probs over the k+1 buckets S ∪ {tail} (both softened to
    ``temperature``), and the valid mask.

    Invalid slots hold 0 in both (and are masked out by every user), so no −inf − −inf NaN
    can leak into a gradient.
    """
    student_lp, valid = _gather_topk(logp, ids, teacher_lp)
    student_tail, has_rest = _student_rest(logp, ids, student_lp, valid)
    teacher_tail = torch.log(tail_mass.float().clamp_min(TAIL_EPS))
    zeros = torch.zeros_like(student_lp)
    teacher = torch.cat([torch.where(valid, teacher_lp.float(), zeros),
                         torch.where(has_rest, teacher_tail, 0.0)[:, None]], dim=1)
    student = torch.cat([torch.where(valid, student_lp, zeros), torch.where(has_rest, student_tail, 0.0)[:, None]],
                        dim=1)
    mask = torch.cat([valid, has_rest[:, None]], dim=1)
    return _soften(teacher, student, mask, temperature)


def _soften(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor, temperature: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both bucket distributions of :func:`_buckets` at ``temperature`` (themselves at 1)."""
    if temperature == 1.0:
        return teacher, student, mask
    return _temper(teacher, mask, temperature), _temper(student, mask, temperature), mask


def _temper(lp: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs over the masked entries softened to ``temperature``: lp/τ, renormalized
    (0 where the mask is off, as :func:`_buckets` keeps them)."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: expected > 0")
    scaled = torch.where(mask, lp / temperature, float("-inf"))
    return torch.where(mask, scaled - torch.logsumexp(scaled, dim=-1, keepdim=True), torch.zeros_like(lp))


def _kl(a_lp: torch.Tensor, b_lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ exp(a)(a − b) over the masked entries (a, b: log-probs on one support).

    An entry where ``a`` is −inf adds 0 (the 0·log 0 = 0 convention): a student that rules
    out a cached token (a −inf logit) has no mass there for reverse KL, JSD or CAKLD to charge.
    Both operands are replaced there *before* the product, as ``0 · −inf`` would be NaN in
    the value and in the gradient even where :func:`torch.where` discards it.
    """
    live = mask & (a_lp > float("-inf"))
    a = torch.where(live, a_lp, 0.0)
    b = torch.where(live, b_lp, 0.0)
    return torch.where(live, a.exp() * (a - b), 0.0).sum(-1)


def _forward(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    return _kl(teacher, student, mask)


def _reverse(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    return _kl(student, teacher, mask)


def _jsd(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta={beta}: expected 0 < beta < 1")
    mixture = torch.logaddexp(teacher + math.log(beta), student + math.log(1.0 - beta))
    return beta * _kl(teacher, mixture, mask) + (1.0 - beta) * _kl(student, mixture, mask)


def _cakld(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"cakld beta={beta}: expected a teacher confidence in [0, 1]")
    return beta * _kl(student, teacher, mask) + (1.0 - beta) * _kl(teacher, student, mask)


#: The k+1-bucket losses by config name: (teacher, student, mask, β) -> per position.
_BUCKET_LOSSES = {"forward_kl": _forward, "reverse_kl": _reverse, "jsd": _jsd, "cakld": _cakld}


def forward_kl_tail(logp: torch.Tensor, ids: torch.Tensor, teacher_lp: torch.Tensor,
                    tail_mass: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) over S ∪ {tail}: the default QAD loss on a top-k cache."""
    return _forward(*_buckets(logp, ids, teacher_lp, tail_mass, temperature), 0.0)


def reverse_kl_tail(logp: torch.Tensor, ids: torch.Tensor, teacher_lp: torch.Tensor,
                    tail_mass: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(student ‖ teacher) over S ∪ {tail} (mode-seeking)."""
    return _reverse(*_buckets(logp, ids, teacher_lp, tail_mass, temperature), 0.0)


def jsd_tail(logp: torch.Tensor, ids: torch.Tensor, teacher_lp: torch.Tensor,
             tail_mass: torch.Tensor, beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Generalized JSD_β = β·KL(t‖m) + (1−β)·KL(p‖m), m = β·t + (1−β)·p, over S ∪ {tail}
    (TRL/Liger convention: β → 0 approaches forward KL, β → 1 reverse KL)."""
    return _jsd(*_buckets(logp, ids, teacher_lp, tail_mass, temperature), beta)


def cakld(logp: torch.Tensor, ids: torch.Tensor, teacher_lp: torch.Tensor,
          tail_mass: torch.Tensor, beta: float, temperature: float = 1.0) -> torch.Tensor:
    """BitDistiller's confidence-aware KLD: β·KL(p‖t) + (1−β)·KL(t‖p) over S ∪ {tail}."""
    return _cakld(*_buckets(logp, ids, teacher_lp, tail_mass, temperature), beta)


def renorm_kl(logp: torch.Tensor, ids: torch.Tensor, teacher_lp: torch.Tensor,
              tail_mass: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """KL(t̃ ‖ p) with t̃ the teacher renormalized over S; the student stays full-vocab.  At a
    temperature both are exact: renormalizing t^(1/τ) over S needs no tail, and the student's
    log_softmax(logp/τ) is its log_softmax(z/τ)."""
    if temperature != 1.0:
        logp = torch.log_softmax(logp / temperature, dim=-1)
    student_lp, valid = _gather_topk(logp, ids, teacher_lp)
    masked = (teacher_lp.float() / temperature).masked_fill(~valid, float("-inf"))
    renormed = masked - torch.logsumexp(masked, dim=-1, keepdim=True)
    zeros = torch.zeros_like(student_lp)
    return _kl(torch.where(valid, renormed, zeros), torch.where(valid, student_lp, zeros), valid)


def mse_logprob(logp: torch.Tensor, ids: torch.Tensor, teacher_lp: torch.Tensor,
                tail_mass: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the valid cached entries of (log p − log t)²."""
    student_lp, valid = _gather_topk(logp, ids, teacher_lp)
    diff = torch.where(valid, student_lp - teacher_lp.float(), torch.zeros_like(student_lp))
    return (diff * diff).sum(-1) / valid.sum(-1).clamp_min(1)


def sampled_kl(logp: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """KL(t̂ ‖ p) with t̂ = the sampled targets' weights (count/N; 0 on padding, id < 0).

    Equal to the cross-entropy −Σ t̂ log p plus the constant Σ t̂ log t̂, so the gradient is
    the Sparse-Logit-Sampling estimator ``p_j − t̂_j`` and the value reads as a KL.
    """
    valid = (ids >= 0) & (weights > 0)
    student_lp = logp.gather(1, ids.clamp_min(0).long())
    w = torch.where(valid, weights.float(), torch.zeros_like(student_lp))
    entropy_term = torch.special.xlogy(w, w)
    return (entropy_term - w * torch.where(valid, student_lp, torch.zeros_like(student_lp))).sum(-1)


def full_kl(logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) over the whole vocabulary (online mode); tokens the teacher
    gives no mass (a −inf logit, e.g. a masked or padded vocabulary) add 0, not NaN."""
    teacher_logp = teacher_logp.float()
    t = teacher_logp.exp()
    return torch.where(t > 0, t * (teacher_logp - logp), 0.0).sum(-1)   # a scalar 0: no [C, V] of zeros


def cross_entropy(logp: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
    """−log p(next token): the LM loss on the data."""
    return -logp.gather(1, next_tokens.long()[:, None]).squeeze(1)


def topk_kd_loss(name: str, logp: torch.Tensor, ids: torch.Tensor, teacher_lp: torch.Tensor,
                 tail_mass: torch.Tensor, cakld_beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Dispatch a top-k loss by its config name (``distill.loss``), at ``temperature`` (not
    scaled by τ²: the caller weighs the KD term)."""
    return topk_kd_loss_and_kl(name, logp, ids, teacher_lp, tail_mass, cakld_beta, temperature)[0]


def topk_kd_loss_and_kl(name: str, logp: torch.Tensor, ids: torch.Tensor, teacher_lp: torch.Tensor,
                        tail_mass: torch.Tensor, cakld_beta: float = 0.5, temperature: float = 1.0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`topk_kd_loss`, and the temperature-1 :func:`forward_kl_tail` logged beside it
    from the same k+1 buckets: building them costs a pass over ``[C, V]`` for confident rows
    (:func:`_student_rest`), which a second call would pay again."""
    if name in ("renorm_kl", "mse_logprob"):   # losses on S alone: the buckets only serve the figure
        if name == "mse_logprob" and temperature != 1.0:
            raise ValueError(f"mse_logprob has no temperature (got {temperature}): it compares log-probs")
        kd = (renorm_kl(logp, ids, teacher_lp, temperature=temperature) if name == "renorm_kl"
              else mse_logprob(logp, ids, teacher_lp))
        with torch.no_grad():
            return kd, forward_kl_tail(logp, ids, teacher_lp, tail_mass)
    if name not in _BUCKET_LOSSES:
        raise ValueError(f"unknown top-k loss {name!r}; expected one of {KD_LOSSES}")
    buckets = _buckets(logp, ids, teacher_lp, tail_mass)
    kl = _forward(*buckets, 0.0)
    if temperature == 1.0 and name == "forward_kl":
        return kl, kl
    return _BUCKET_LOSSES[name](*_soften(*buckets, temperature), cakld_beta), kl
