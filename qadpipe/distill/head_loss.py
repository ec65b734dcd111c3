"""The student's LM head and the distillation loss, fused and chunked over positions.

Why: at a 150k vocabulary the logits of one 4×2048 batch are 5 GB in fp32, and autograd
would keep them (plus the log-softmax and its gradient) alive until backward.  Here the
model's base returns the final hidden states; only the positions that carry targets are
kept, and the head runs on ``chunk_tokens`` of them at a time: logits → fp32 log-softmax
(the exact full-vocab normalizer) → per-position loss → gradients w.r.t. that chunk's
hidden states and the head's parameters, computed right there (Liger-kernel style).  Peak
memory is one chunk's ``[chunk, vocab]`` fp32, in forward *and* backward, and the head's
matmul is not recomputed (what ``torch.utils.checkpoint`` per chunk would cost).

The gradients are computed inside :meth:`_FusedHeadLoss.forward` with ``autograd.grad``,
which does not touch ``.grad`` or fire DDP/FSDP hooks; the outer backward hands them to
autograd like any op's gradients, so DDP/FSDP2 reduce them as usual.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from qadpipe.distill import losses
from qadpipe.errors import DistillError
from qadpipe.eval.metrics import perplexity
from qadpipe.models import LogitTransform


@dataclass(frozen=True)
class LossSpec:
    """What to optimize: ``mode`` qad (cached targets) | qat (CE only) | online (teacher logits).

    ``temperature`` τ softens both sides of the KD term (online: both logits / τ; a top-k cache:
    both k+1-bucket distributions, see :mod:`qadpipe.distill.losses`) and scales it by τ²
    (Hinton), so its gradient keeps its size; the KL and top-1 figures logged beside it stay at
    τ = 1, the distribution that is served.
    """

    mode: str = "qad"
    loss: str = "forward_kl"
    kd_weight: float = 1.0
    lm_weight: float = 0.0
    cakld_beta: float = 0.5
    temperature: float = 1.0


@dataclass
class PositionTargets:
    """Targets for the ``N`` selected positions, row-aligned with the selected hidden states.

    ``next_tokens`` always; then top-k (``topk_ids`` ``[N, k]``, ``topk_logprobs``,
    ``tail_mass`` ``[N]``), or sampled (``sample_ids`` ``[N, m]`` with −1 padding and
    ``sample_weights`` = count/N), or online (``teacher_hidden`` ``[N, D]``).
    """

    next_tokens: torch.Tensor
    topk_ids: Optional[torch.Tensor] = None
    topk_logprobs: Optional[torch.Tensor] = None
    tail_mass: Optional[torch.Tensor] = None
    sample_ids: Optional[torch.Tensor] = None
    sample_weights: Optional[torch.Tensor] = None
    teacher_hidden: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.next_tokens.shape[0])

    def slice(self, start: int, end: int) -> "PositionTargets":
        return self.select(slice(start, end))

    def select(self, index: slice | torch.Tensor) -> "PositionTargets":
        """The targets of the positions ``index`` picks (a slice or a boolean mask)."""
        return PositionTargets(**{name: (value[index] if value is not None else None)
                                  for name, value in self.__dict__.items()})


#: Summed per-position figures: loss, forward KL to the targets, data CE, top-1 agreement with the
#: teacher, and (top-k targets) the student's and the teacher's probability mass on S.
STAT_KEYS = ("positions", "loss", "ce", "kl_positions", "kl", "top1", "topk_positions", "mass_student",
             "mass_teacher")


def summarize(totals: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-position means of summed :data:`STAT_KEYS`: loss, ce and ppl; with teacher
    targets kl and top1; with top-k targets the student's and teacher's mass on S."""
    positions = float(totals["positions"])
    if positions == 0:
        return {}
    ce = float(totals["ce"]) / positions
    out = {"loss": float(totals["loss"]) / positions, "ce": ce, "ppl": perplexity(ce),
           "positions": positions}
    scored = float(totals["kl_positions"])
    if scored:
        out["kl"] = float(totals["kl"]) / scored
        out["top1"] = float(totals["top1"]) / scored
    with_topk = float(totals["topk_positions"])
    if with_topk:
        out["topk_mass_student"] = float(totals["mass_student"]) / with_topk
        out["topk_mass_teacher"] = float(totals["mass_teacher"]) / with_topk
    return out


def split_lm(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(base returning hidden states, LM head) of an HF causal LM (that its logits are the
    head of the hidden states is :func:`qadpipe.models.check_logits_are_head_of_hidden`'s)."""
    base, head = model.get_decoder(), model.get_output_embeddings()
    if base is None or head is None:
        raise DistillError(f"{type(model).__name__}: expected an HF causal LM with get_decoder() and "
                           "get_output_embeddings()")
    return base, head


def _chunk_loss(logits: torch.Tensor, targets: PositionTargets, spec: LossSpec,
                teacher_logits: Optional[torch.Tensor], stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed loss of one chunk from its logits (fp32 inside); adds the chunk's figures to ``stats``."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    ce = losses.cross_entropy(logp, targets.next_tokens)
    kl, kd, teacher_top1 = None, None, None
    tau = spec.temperature
    if teacher_logits is not None:
        teacher_logits = teacher_logits.float()
        teacher_logp = torch.log_softmax(teacher_logits, dim=-1)
        # Tempered, the τ = 1 KL is only a logged figure: no graph for it.
        with contextlib.nullcontext() if tau == 1.0 else torch.no_grad():
            kl = losses.full_kl(logp, teacher_logp)
        teacher_top1 = teacher_logp.argmax(-1)
        kd = kl if tau == 1.0 else losses.full_kl(torch.log_softmax(logits / tau, dim=-1),
                                                  torch.log_softmax(teacher_logits / tau, dim=-1))
    elif targets.topk_ids is not None:
        kd, kl = losses.topk_kd_loss_and_kl(spec.loss, logp, targets.topk_ids, targets.topk_logprobs,
                                            targets.tail_mass, cakld_beta=spec.cakld_beta, temperature=tau)
        teacher_top1 = targets.topk_ids[:, 0]
    elif targets.sample_ids is not None:
        if tau != 1.0:
            raise DistillError(f"distill.temperature={tau}: sampled targets are draws at temperature 1 and "
                               "cannot be re-tempered; use a top-k cache or temperature 1")
        kl = losses.sampled_kl(logp, targets.sample_ids, targets.sample_weights)
        kd = kl
        teacher_top1 = targets.sample_ids.gather(1, targets.sample_weights.argmax(-1, keepdim=True)).squeeze(1)
    if kd is not None and tau != 1.0:
        kd = kd * tau ** 2
    if spec.mode == "qat":
        loss = ce
    else:
        if kd is None:
            raise DistillError(f"distill.mode={spec.mode}: the batch carries no teacher targets")
        loss = spec.kd_weight * kd + (spec.lm_weight * ce if spec.lm_weight else 0.0)
    with torch.no_grad():
        stats["positions"] += logp.shape[0]
        stats["loss"] += loss.detach().double().sum()
        stats["ce"] += ce.detach().double().sum()
        if kl is not None:
            stats["kl_positions"] += logp.shape[0]
            stats["kl"] += kl.detach().double().sum()
            stats["top1"] += (logp.argmax(-1) == teacher_top1).sum()
        if targets.topk_ids is not None:
            valid = (targets.topk_ids >= 0) & torch.isfinite(targets.topk_logprobs)
            mass = logp.gather(1, targets.topk_ids.clamp_min(0).long()).exp() * valid
            stats["topk_positions"] += logp.shape[0]
            stats["mass_student"] += mass.double().sum()
            stats["mass_teacher"] += (1.0 - targets.tail_mass.double()).sum()
    return loss.sum()


#: ``loss_of(logits, start, end)``: the summed loss of positions ``start:end`` from their logits.
ChunkLoss = Callable[[torch.Tensor, int, int], torch.Tensor]


class _FusedHeadLoss(torch.autograd.Function):
    """Σ over chunks of ``loss_of(head(hidden[chunk]))``, gradients computed chunk by chunk in forward.

    The head's gradient (vocab × hidden, fp32: 1.2 GB at Qwen3-1.7B's 152k × 2048) is built
    once, in forward; backward scales it in place and hands that very tensor on, so autograd
    can keep it as ``.grad`` rather than hold a scaled copy beside it.  Hence one backward
    per forward (``retain_graph`` is refused).

    A plain ``nn.Linear`` head (the usual one) adds each chunk's weight gradient ``dlogitsᵀ x``
    into that tensor itself (:func:`_add_linear_grads`), where ``autograd.grad`` would return
    it as a new vocab × hidden tensor per chunk -- in fp32, after a bf16 one under autocast:
    up to 1.9 GB at Qwen3-1.7B's size beside the accumulator.  Any other head (a quantized
    one, LSQ steps) goes through ``autograd.grad``.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, head: nn.Module, loss_of: ChunkLoss, chunk_tokens: int,
                *params: torch.Tensor) -> torch.Tensor:
        want_hidden = hidden.requires_grad
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_params = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        linear = _is_plain_linear(head, params)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = min(start + chunk_tokens, hidden.shape[0])
            piece = hidden[start:end].detach().requires_grad_(want_hidden)
            with torch.enable_grad():
                logits = head(piece)
                if linear:
                    detached = logits.detach().requires_grad_()
                    loss = loss_of(detached, start, end)
                    (grad_logits,) = torch.autograd.grad(loss, [detached])
                    if want_hidden:   # through the head's input only: its weight is not asked for
                        (grad_hidden[start:end],) = torch.autograd.grad(logits, [piece], grad_logits)
                    _add_linear_grads(head, params, grad_params, grad_logits, piece)
                else:
                    loss = loss_of(logits, start, end)
                    wrt = ([piece] if want_hidden else []) + list(params)
                    grads = list(torch.autograd.grad(loss, wrt, allow_unused=True))
                    if want_hidden:
                        grad_hidden[start:end] = grads.pop(0)
                    for acc, grad in zip(grad_params, grads):
                        if grad is not None:
                            acc += grad
            total += loss.detach()
        # On ctx, not save_for_backward: backward must be able to drop the only other reference.
        ctx.grads = (grad_hidden, grad_params)
        ctx.param_dtypes = [p.dtype for p in params]
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("fused head loss: backward ran twice on one forward (retain_graph is not supported)")
        (stored_hidden, stored_params), ctx.grads = ctx.grads, None
        grad_hidden = None
        if stored_hidden is not None:   # [N, D], small: scaled in fp32 and rounded once
            grad_hidden = (stored_hidden.float() * grad_out).to(stored_hidden.dtype)
        grad_params = [g.mul_(grad_out).to(dtype) for g, dtype in zip(stored_params, ctx.param_dtypes)]
        return (grad_hidden, None, None, None, *grad_params)


def _is_plain_linear(head: nn.Module, params: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``head(x)`` is exactly ``F.linear(x, head.weight, head.bias)`` and those are what
    trains: an ``nn.Linear`` with no hook, no replaced forward and no reparametrized weight
    (``weight_norm`` trains ``weight_g``/``weight_v``), so :func:`_add_linear_grads` may compute
    its gradients by hand."""
    from torch.nn.modules import module

    hooks = (head._forward_hooks, head._forward_pre_hooks, module._global_forward_hooks,
             module._global_forward_pre_hooks)
    return (type(head) is nn.Linear and "forward" not in head.__dict__ and not any(hooks)
            and all(p is head.weight or p is head.bias for p in params))


def _add_linear_grads(head: nn.Linear, params: tuple[torch.Tensor, ...], accumulators: list[torch.Tensor],
                      grad_logits: torch.Tensor, inputs: torch.Tensor) -> None:
    """Add one chunk's weight (``grad_logitsᵀ x``) and bias gradients of ``head`` to the fp32
    ``accumulators`` (one per ``params`` entry), the weight in place where dtypes allow.

    ``x`` is the input as the head's matmul took it: in the logits' dtype (autocast casts both
    operands to it).  Same sums as autograd's, in another order: equal to rounding (tested
    against the autograd path, and against full logits)."""
    x = inputs.detach().to(grad_logits.dtype)
    for param, acc in zip(params, accumulators):
        if param is head.weight:
            if acc.dtype == x.dtype:
                acc.addmm_(grad_logits.t(), x)
            else:   # bf16 operands: a bf16 product, added (no mixed-dtype addmm)
                acc.add_(grad_logits.t().mm(x))
        elif param is head.bias:
            acc.add_(grad_logits.sum(0))


def head_loss(hidden: torch.Tensor, head: nn.Module, targets: PositionTargets, spec: LossSpec,
              chunk_tokens: int, teacher_head: Optional[nn.Module] = None,
              transform: LogitTransform = LogitTransform()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed loss over the ``N`` positions of ``hidden`` ``[N, D]`` (divide by the global
    position count yourself) and the summed figures ``STAT_KEYS`` (0-d tensors); ``transform``
    is the architecture's after the head (Gemma 2's soft-capping, ...)."""
    if len(targets) != hidden.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden states vs {len(targets)} target rows")
    stats = {key: torch.zeros((), dtype=torch.float64, device=hidden.device) for key in STAT_KEYS}

    def loss_of(logits: torch.Tensor, start: int, end: int) -> torch.Tensor:
        chunk = targets.slice(start, end)
        teacher_logits = None
        if chunk.teacher_hidden is not None:
            with torch.no_grad():
                teacher_logits = teacher_head(chunk.teacher_hidden)
        return _chunk_loss(transform(logits), chunk, spec, teacher_logits, stats)

    params = [p for p in head.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
    if torch.is_grad_enabled() and (hidden.requires_grad or params):
        total = _FusedHeadLoss.apply(hidden, head, loss_of, chunk_tokens, *params)
    else:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = min(start + chunk_tokens, hidden.shape[0])
            total = total + loss_of(head(hidden[start:end]), start, end)
    return total, stats
