"""Static activation ranges from data: the step that turns a recipe into the PTQ baseline.

Weight ranges need no data (``apply_recipe`` sets them from the weights, and dynamic formats
recompute them every call).  Static *input* quantizers -- the NVFP4 W4A4 input global scale,
the per-tensor FP8 input scale -- need the range of real activations: ``calibrate`` runs
``num_batches`` forward passes with those quantizers observing (and passing x through
unquantized, as ModelOpt does), then fixes ``amax`` to the max of |x| over the real tokens
(``attention_mask`` excludes padding), or to a percentile of |x| (max over batches of each
batch's percentile) when ``percentile`` is set.  The calibrated, untrained model is the PTQ
baseline every QAD figure is compared against.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from fractions import Fraction
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn
from tqdm import tqdm

from qadpipe.errors import QuantError
from qadpipe.quant.quantizers import Quantizer

log = logging.getLogger(__name__)


class _Observer:
    """Running range of the real-token activations one quantizer sees."""

    def __init__(self, name: str, percentile: Optional[float]) -> None:
        self.name = name
        self.percentile = percentile
        self.amax: Optional[Tensor] = None
        #: The batch's real tokens, [batch, seq]; None when no row is padded.
        self.token_mask: Optional[Tensor] = None

    def observe(self, x: Tensor) -> None:
        values = x.detach()
        mask = self.token_mask
        if mask is not None:
            if values.shape[:mask.ndim] == mask.shape:
                values = values[mask]
            elif values.shape[0] == mask.numel():   # [batch * seq, ...]: e.g. Qwen2-MoE's shared expert
                values = values[mask.reshape(-1)]
            else:   # the padding cannot be told apart
                raise QuantError(f"calibrate: {self.name} sees activations shaped {tuple(values.shape)}, neither "
                                 f"[batch, seq, ...] = {tuple(mask.shape)} nor [batch * seq, ...] like the batch, so "
                                 "its range would count padded positions; leave it out (quant.ignore)")
        magnitude = values.float().abs().flatten()
        if magnitude.numel() == 0:
            return
        if self.percentile is None:
            batch_amax = magnitude.max()
        else:
            # inverted CDF: the smallest |x| with at least `percentile` % of values <= it
            # the rank from the decimal the user wrote: in binary floats 41000 * 99.9 / 100 is
            # 40959.00000000001, and its ceiling one rank too high
            k = math.ceil(Fraction(repr(self.percentile)) * magnitude.numel() / 100)
            k = max(1, min(magnitude.numel(), k))
            # a NaN or inf would rank above the cut and vanish: keep it visible to the caller's check
            batch_amax = torch.where(magnitude.isfinite().all(), magnitude.kthvalue(k).values, math.nan)
        self.amax = batch_amax if self.amax is None else torch.maximum(self.amax, batch_amax)


#: Quantizers of activations (a Linear's input, the KV cache's keys and values), by name suffix.
ACTIVATION_QUANTIZERS = ("input_quantizer", "key_quantizer", "value_quantizer")


def static_input_quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """Activation quantizers whose range must come from calibration, by module name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, Quantizer) and name.endswith(ACTIVATION_QUANTIZERS) and not m.spec.dynamic}


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[dict[str, Tensor]], num_batches: int,
              percentile: Optional[float] = None, forward: Optional[Callable[..., Any]] = None) -> None:
    """Fix the amax of every static input quantizer from ``num_batches`` batches (each with
    ``input_ids`` and, where a row is padded, ``attention_mask``).  ``forward`` runs ``model``
    on a batch's keyword arguments (default: ``model`` itself; a model sharded with FSDP2 runs
    through the module wrapping it, whose hooks gather its parameters).  Raises QuantError if
    the data runs out first, or a quantizer saw no token, a non-finite value, or only zeros (a
    range it cannot serve)."""
    quantizers = static_input_quantizers(model)
    if not quantizers:
        log.info("calibrate: no static input quantizer in this recipe; nothing to calibrate")
        return
    if num_batches < 1:
        raise QuantError(f"quant.calibration_batches: got {num_batches}, but {len(quantizers)} static "
                         "input quantizers need at least 1 batch")
    observers = {name: _Observer(name, percentile) for name in quantizers}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start, seen, tokens = time.perf_counter(), 0, 0
    with _observing(quantizers, observers):
        iterator = iter(batches)
        for _ in tqdm(range(num_batches), desc="calibrate", unit="batch"):
            batch = next(iterator, None)
            if batch is None:
                raise QuantError(f"quant.calibration_batches: asked for {num_batches} batches, "
                                 f"the data has {seen}")
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")   # absent: no padding
            mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(device).bool()
            padded = not bool(mask.all())
            for observer in observers.values():
                observer.token_mask = mask if padded else None
            (forward or model)(input_ids=ids, attention_mask=mask.long(), use_cache=False)
            seen += 1
            tokens += int(mask.sum())
    model.train(was_training)
    for name, quantizer in quantizers.items():
        amax = observers[name].amax
        if amax is None:
            raise QuantError(f"calibrate: {name} saw no activations (is the module used by forward?)")
        if not torch.isfinite(amax).all():
            raise QuantError(f"calibrate: {name} saw a NaN or infinite activation in {seen} batches; the "
                             "student's forward is not finite on this data (its exported scale would be NaN)")
        if not (amax > 0).all():
            raise QuantError(f"calibrate: {name} saw only zeros in {seen} batches ({tokens} tokens); a static "
                             "range of 0 would clip every later input to ~0 -- raise quant.calibration_batches "
                             "or leave this layer out (quant.ignore)")
        quantizer.set_amax(amax)
    elapsed = time.perf_counter() - start
    log.info("calibrate: %d static input ranges from %d batches, %d tokens in %.1f s (%.0f tok/s)%s",
             len(quantizers), seen, tokens, elapsed, tokens / max(elapsed, 1e-9),
             f", percentile {percentile}" if percentile is not None else "")


@contextlib.contextmanager
def _observing(quantizers: dict[str, Quantizer], observers: dict[str, _Observer]) -> Iterator[None]:
    """Replace each quantizer's forward by observe-and-pass-through for the duration."""
    def make_forward(observer: _Observer):
        def forward(x: Tensor) -> Tensor:
            observer.observe(x)
            return x
        return forward

    try:
        for name, quantizer in quantizers.items():
            quantizer.forward = make_forward(observers[name])
        yield
    finally:
        for quantizer in quantizers.values():
            del quantizer.forward
