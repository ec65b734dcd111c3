"""Fake-quantized MoE experts: transformers 5's fused 3-D expert weights, one Linear per expert.

transformers 5 stores an MoE layer's experts as one module holding 3-D tensors --
``gate_up_proj`` ``[E, 2I, D]`` and ``down_proj`` ``[E, D, I]`` (Qwen2/3-MoE, Mixtral, OLMoE,
DeepSeek ...) -- and says how they are laid out in the attributes its
``use_experts_implementation`` decorator sets (``has_gate``, ``is_transposed``,
``is_concatenated``, ``has_bias``).  Those matrices are most of an MoE model's weights, and
no ``nn.Linear``; :class:`QuantExperts` takes the module's place and fake-quantizes them
*per expert*, as if each expert's projections were Linears -- what vLLM serves, one
quantized GEMM per expert:

* row-local formats (int and ternary per group or channel, MXFP4/MXFP8) are computed on all
  experts at once -- a row's codes do not depend on its expert;
* a format with a tensor-level range (NVFP4's global scale) gets one range per expert, the
  gate and up halves of an expert sharing it (vLLM fuses them into one GEMM, see
  :data:`qadpipe.quant.recipe.FUSED_SIBLINGS`); the per-tensor function runs batched over
  the experts (``torch.vmap``, see :func:`qadpipe.quant.compiled.over_slices`), not in a
  Python loop launching every kernel once per expert.

Weight-only experts run the expert module itself, unchanged, through
``torch.func.functional_call`` with the fake-quantized tensors in place of its own, so every
implementation transformers dispatches to (eager loop, grouped_mm, batched_mm) sees them.
Either way an expert no token reached gets no gradient, on Blackwell too (see
:meth:`QuantExperts.forward`).

Activation quantization (W4A4, W8A8 ...) needs the input of each expert's two GEMMs, which
transformers' implementations compute inside their own loops (the eager one inline).  Such
experts run :meth:`QuantExperts._routed_forward` instead: the routed tokens sorted by expert,
each expert's GEMM over its rows (one grouped GEMM for all), as vLLM's fused MoE computes
them.  The inputs get **one range per experts module and projection**, not one per expert:
vLLM serves a quantized MoE layer with the largest of its experts' input scales
(``amax_for_moe_activation_quant``; its NVFP4 emulation warns and takes the max too), so a
range per expert would train numbers it never serves.  The gate/up input is the layer's
hidden states, quantized once (the formats are row-local, so each expert's copy of a token
quantizes alike); the down input is quantized in token-major order, ``[tokens, top_k, I]``,
so calibration can leave padded tokens out.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from qadpipe.errors import QuantError
from qadpipe.quant.compiled import Compile
from qadpipe.quant.formats import Granularity, Kind, QuantizedTensor, QuantSpec, _groups, quantize
from qadpipe.quant.quantizers import Learnable, Quantizer, Ste, _FakeQuantSTE, _positive_steps


@dataclass(frozen=True)
class ExpertsLayout:
    """How an experts module stores its matrices (transformers' own attributes)."""

    up_name: str            # "gate_up_proj" (gated) or "up_proj"
    gated: bool
    transposed: bool        # stored [E, in, out] rather than [E, out, in]
    concatenated: bool      # gate rows then up rows (else interleaved gate0, up0, gate1, ...)
    biased: bool

    @property
    def weight_names(self) -> tuple[str, str]:
        return (self.up_name, "down_proj")

    def in_last(self, weight: Tensor) -> Tensor:
        """A stored expert weight as ``[E, out, in]`` (a view: transposed layouts store ``[E, in, out]``)."""
        return weight.transpose(1, 2) if self.transposed else weight

    @property
    def servable_layout(self) -> bool:
        """Whether vLLM's per-expert checkpoint names (``<experts>.<e>.gate_proj``, ...) can carry
        it: gate and up concatenated, ``[out, in]``, no biases (the Qwen/Mixtral/OLMoE layout)."""
        return self.gated and self.concatenated and not self.transposed and not self.biased


def experts_layout(module: nn.Module) -> Optional[ExpertsLayout]:
    """The layout of an experts module transformers describes (its ``use_experts_implementation``
    attributes, 3-D weights of its own), or None for any other module."""
    if isinstance(module, QuantExperts) or not all(
            hasattr(module, a) for a in ("has_gate", "is_transposed", "is_concatenated", "has_bias")):
        return None
    up_name = "gate_up_proj" if module.has_gate else "up_proj"
    params = dict(module.named_parameters(recurse=False))
    if any(params.get(name) is None or params[name].dim() != 3 for name in (up_name, "down_proj")):
        return None
    if any(True for child in module.children() for _ in child.parameters()):
        return None   # weights below the module: not the fused layout this wraps
    return ExpertsLayout(up_name, bool(module.has_gate), bool(module.is_transposed),
                         bool(module.is_concatenated), bool(module.has_bias))


def has_fused_experts(model: nn.Module) -> bool:
    """Whether ``model`` holds transformers' fused MoE experts (quantized or not)."""
    return any(isinstance(m, QuantExperts) or experts_layout(m) is not None for m in model.modules())


def _row_local(spec: QuantSpec) -> bool:
    """Whether a row's codes depend on that row only (then all experts quantize in one call)."""
    return spec.granularity in (Granularity.GROUP, Granularity.CHANNEL) and spec.kind is not Kind.NVFP4


class ExpertWeightQuantizer(nn.Module):
    """Fake-quantizes one 3-D expert weight ``[E, out, in]`` expert by expert.

    ``amax`` (buffer ``[E]``, static specs only): each expert's tensor-level range, set from
    the weight when the recipe is applied (as a Linear's is) and kept through training.
    ``learned`` (``learnable`` lsq or clip, symmetric int formats): a :class:`Quantizer` over the
    experts' rows stacked as one ``[E * out, in]`` matrix -- the scales are per row group, so
    each expert's are its own, initialised from its own weights."""

    def __init__(self, spec: QuantSpec, weight: Tensor, *, ste: Ste = "identity", learnable: Learnable = "none",
                 compile_mode: Compile = "off") -> None:
        super().__init__()
        self.spec = spec
        self.ste = ste
        self.compile_mode = compile_mode
        if learnable != "none":
            self.learned = Quantizer(spec, ste=ste, learnable=learnable, weight=_stacked(weight.detach()),
                                     compile_mode=compile_mode)
            if learnable == "lsq" and not weight.is_meta:
                self._floor_steps_per_expert(weight)
        elif not spec.dynamic:
            self.register_buffer("amax", weight.detach().abs().amax(dim=(1, 2)).float())

    @property
    def learnable(self) -> Learnable:
        return self.learned.learnable if "learned" in self._modules else "none"

    @torch.no_grad()
    def _floor_steps_per_expert(self, weight: Tensor) -> None:
        """An all-zero group's LSQ step starts at its own expert's smallest step, as one Linear
        per expert would start it (the stacked Quantizer took the smallest over all experts)."""
        step, experts = self.learned.step, weight.shape[0]
        dead = (_groups(_stacked(weight.detach()).float(), self.spec).abs().amax(-1) == 0).reshape(experts, -1)
        raw = torch.where(dead, 0.0, step.reshape(experts, -1))
        step.copy_(torch.stack([_positive_steps(steps, self.spec) for steps in raw]).reshape(step.shape))

    def forward(self, weight: Tensor) -> Tensor:
        """``weight`` ``[E, out, in]`` -> its fake-quantized value (straight-through gradient)."""
        if self.learnable != "none":
            return self.learned(_stacked(weight)).reshape(weight.shape)
        clipped = self.ste == "clipped"
        if _row_local(self.spec):
            rows = _FakeQuantSTE.apply(_stacked(weight), self.spec, None, clipped, self.compile_mode)
            return rows.reshape(weight.shape)
        amax = None if self.spec.dynamic else self.amax
        return _FakeQuantSTE.apply(weight, self.spec, amax, clipped, self.compile_mode, True)

    @torch.no_grad()
    def quantize_experts(self, weight: Tensor) -> list[QuantizedTensor]:
        """The codes and scales ``forward`` uses for ``weight`` ``[E, out, in]``, one
        ``[out, in]`` matrix per expert."""
        if self.learnable != "none":
            rows = weight.shape[1]
            both = self.learned.quantize(_stacked(weight))
            return [_rows(both, slice(e * rows, (e + 1) * rows)) for e in range(weight.shape[0])]
        return [quantize(matrix, self.spec, amax=None if self.spec.dynamic else self.amax[e])
                for e, matrix in enumerate(weight)]

    def extra_repr(self) -> str:
        group = f", group={self.spec.group_size}" if self.spec.group_size else ""
        return (f"{self.spec.kind.value}, {self.spec.granularity.value}{group}, per expert, ste={self.ste}, "
                f"learnable={self.learnable}")


def _stacked(weight: Tensor) -> Tensor:
    """``[E, out, in]`` -> ``[E * out, in]``: the experts' rows as one matrix."""
    return weight.reshape(-1, weight.shape[-1])


class QuantExperts(nn.Module):
    """Takes an experts module's place: its Parameters under the same names (so the state_dict,
    the optimizer and FSDP see what they saw), a weight quantizer per projection
    (``gate_up_proj_quantizer``, ``down_proj_quantizer``), with ``input_spec`` an input
    quantizer per projection (``gate_up_proj_input_quantizer``, ``down_proj_input_quantizer``),
    and the original module -- no submodule, and left without parameters -- run with the
    fake-quantized weights."""

    def __init__(self, experts: nn.Module, layout: ExpertsLayout, spec: QuantSpec, *, ste: Ste = "identity",
                 learnable: Learnable = "none", compile_mode: Compile = "off",
                 input_spec: Optional[QuantSpec] = None) -> None:
        super().__init__()
        self.__dict__["_experts"] = experts      # not a submodule: its parameters move here
        self.layout = layout
        for name, param in list(experts.named_parameters(recurse=False)):
            # Moved, not shared: FSDP2 swaps ours for shards, and a reference left in ``experts``
            # would keep the unsharded tensor alive.  (register_parameter would find the name
            # through __getattr__.)
            self._parameters[name] = param
            del experts._parameters[name]
        # the module's own argument names (gpt-oss: router_indices, routing_weights), read once
        self._signature = inspect.signature(experts.forward)
        for name in layout.weight_names:
            quantizer = ExpertWeightQuantizer(spec, self.in_last(name), ste=ste, learnable=learnable,
                                              compile_mode=compile_mode)
            self.add_module(f"{name}_quantizer", quantizer.to(getattr(self, name).device))
            if input_spec is not None:   # a static range comes from calibration, as a Linear input's
                inputs = Quantizer(input_spec, ste=ste, compile_mode=compile_mode)
                self.add_module(f"{name}_input_quantizer", inputs.to(getattr(self, name).device))

    @property
    def spec(self) -> QuantSpec:
        """The weight format (both projections share it)."""
        return getattr(self, f"{self.layout.up_name}_quantizer").spec

    def in_last(self, name: str) -> Tensor:
        """Weight ``name`` as ``[E, out, in]`` (see :meth:`ExpertsLayout.in_last`)."""
        return self.layout.in_last(getattr(self, name))

    def fake_quantized(self, name: str) -> Tensor:
        """Q(W) of one projection, in its stored layout and dtype."""
        quantizer = getattr(self, f"{name}_quantizer")
        q = quantizer(self.in_last(name))
        # back to the stored layout, contiguous like the parameter (the matmuls see the same strides)
        return q.transpose(1, 2).contiguous() if self.layout.transposed else q

    @property
    def input_spec(self) -> Optional[QuantSpec]:
        """The activation format (None: weight-only)."""
        inputs = self.input_quantizers()
        return inputs[self.layout.up_name].spec if inputs else None

    def input_quantizers(self) -> dict[str, Quantizer]:
        """Per projection (``gate_up_proj``/``up_proj``, ``down_proj``), its input quantizer
        ({} when weight-only)."""
        return {name: getattr(self, f"{name}_input_quantizer") for name in self.layout.weight_names
                if f"{name}_input_quantizer" in self._modules}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        arguments = tuple(self._signature.bind(*args, **kwargs).arguments.values())
        tensors = dict(self.named_parameters(recurse=False))   # read now: FSDP swaps them around forward
        up = tensors[self.layout.up_name]
        # An expert no token reached must get no gradient, or AdamW moves it.  Blackwell's
        # grouped_mm backward writes non-zero ones for empty groups (pytorch#172439), so there
        # the weights are masked, before either forward (transformers' own, weight-only, too).
        # Only there: the mask copies every expert weight (+13% of a weight-only MoE step on CPU).
        reached = _experts_reached(arguments[1], up.shape[0]) if empty_groups_get_gradients(up.device) else None
        for name in self.layout.weight_names:
            weight = self.fake_quantized(name)
            tensors[name] = weight if reached is None else torch.where(reached[:, None, None], weight, weight.detach())
        inputs = self.input_quantizers()
        if inputs:
            return self._routed_forward(tensors, inputs, *arguments)
        return functional_call(self._experts, tensors, args, kwargs)

    def _routed_forward(self, tensors: dict[str, Tensor], inputs: dict[str, Quantizer], hidden_states: Tensor,
                        top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """The experts with quantized inputs (see the module docstring): ``hidden_states``
        ``[N, D]``, ``top_k_index``/``top_k_weights`` ``[N, k]`` -> ``[N, D]``, the sum over a
        token's experts taken as transformers' grouped and batched implementations take it."""
        up_name = self.layout.up_name
        tokens, top_k = top_k_index.shape
        if tokens == 0:
            return torch.zeros_like(hidden_states)
        if getattr(self, "_is_expert_parallel", False):   # its out-of-range "not on this rank" index
            raise QuantError(f"{type(self._experts).__name__}: experts with quantized inputs take no expert parallelism")
        num_experts = tensors[up_name].shape[0]
        expert_of_row, order = torch.sort(top_k_index.reshape(-1), stable=True)   # (token, slot) pairs by expert
        token_major = torch.argsort(order)                                       # and back
        # where each expert's rows end, computed on the device: qadpipe reads none back (no host sync)
        ends = torch.searchsorted(expert_of_row, torch.arange(num_experts, device=expert_of_row.device),
                                  right=True).to(torch.int32)
        x = inputs[up_name](hidden_states)[order // top_k]
        hidden = self._grouped_linear(x, tensors, up_name, ends, expert_of_row)
        hidden = self._experts._apply_gate(hidden) if self.layout.gated else self._experts.act_fn(hidden)
        hidden = inputs["down_proj"](hidden[token_major].unflatten(0, (tokens, top_k))).flatten(0, 1)[order]
        out = self._grouped_linear(hidden, tensors, "down_proj", ends, expert_of_row)[token_major]
        out = out.unflatten(0, (tokens, top_k)) * top_k_weights.unsqueeze(-1)
        return out.sum(dim=1).to(hidden_states.dtype)

    def _grouped_linear(self, rows: Tensor, tensors: dict[str, Tensor], name: str, ends: Tensor,
                        expert_of_row: Tensor) -> Tensor:
        """Projection ``name`` of ``rows`` (sorted by expert, expert ``e``'s ending at ``ends[e]``):
        each expert's ``F.linear`` over its rows, as one grouped GEMM (``F.grouped_mm``) rather
        than a Python loop launching one per expert -- 128 experts, 48 layers, 3 projections
        are ~18k launches a step forward and back.  The same numbers as the loop on CPU
        (tested), bit-identical but for a bias under autocast: grouped_mm takes none, so it is
        added after the GEMM's bf16 rounding, where ``F.linear`` adds it before (one bf16 ulp
        apart, gpt-oss).  grouped_mm is not autocast-enabled, so the autocast dtype is taken
        here, as ``F.linear`` takes it."""
        weight = tensors[name]
        device = rows.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        weight = weight.to(dtype)
        out = F.grouped_mm(rows.to(dtype), weight if self.layout.transposed else weight.transpose(1, 2), offs=ends)
        bias = tensors.get(f"{name}_bias")
        return out if bias is None else out + bias.to(dtype)[expert_of_row]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:   # num_experts, config, ...: what the MoE block may read
            experts = self.__dict__.get("_experts")
            if experts is None:   # mid-construction (copy, unpickling)
                raise
            return getattr(experts, name)

    @torch.no_grad()
    def expert_matrices(self) -> dict[str, list[QuantizedTensor]]:
        """Per expert, the codes and scales of each projection as vLLM loads it (``gate_proj``,
        ``up_proj``, ``down_proj``, each ``[out, in]``): what a packed export writes."""
        if not self.layout.servable_layout:
            raise ValueError("expert_matrices: only the concatenated, untransposed, unbiased gated layout")
        gate_up = self.gate_up_proj_quantizer.quantize_experts(self.gate_up_proj.detach())
        half = self.gate_up_proj.shape[1] // 2
        # each expert's whole [2I, D] matrix, as forward quantizes it, then split: a per-tensor
        # range is the pair's, not each half's
        return {"gate_proj": [_rows(both, slice(0, half)) for both in gate_up],
                "up_proj": [_rows(both, slice(half, None)) for both in gate_up],
                "down_proj": self.down_proj_quantizer.quantize_experts(self.down_proj.detach())}

    def extra_repr(self) -> str:
        return f"{type(self._experts).__name__}, {getattr(self, self.layout.up_name).shape[0]} experts"


def empty_groups_get_gradients(device: torch.device) -> bool:
    """Whether ``grouped_mm``'s backward on ``device`` writes weight gradients for groups given
    no rows: on Blackwell (CUDA compute capability 10 and up), where pytorch#172439 reports it;
    Hopper's leave them at zero (the issue's H800 run), as the CPU's do (tested)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 10


def _experts_reached(top_k_index: Tensor, num_experts: int) -> Tensor:
    """``[E]`` bool: which experts a token of ``top_k_index`` ``[N, k]`` was routed to, computed
    on the device (no host sync, as ``bincount`` would take).  An index of ``E`` or more --
    expert parallelism's "on another rank" -- reaches none here."""
    reached = torch.zeros(num_experts + 1, dtype=torch.bool, device=top_k_index.device)
    return reached.index_fill_(0, top_k_index.reshape(-1).clamp(0, num_experts), True)[:num_experts]


def _rows(q: QuantizedTensor, rows: slice) -> QuantizedTensor:
    """Rows of a quantized ``[out, in]`` matrix: codes and per-row (channel/group) scales
    sliced, a per-tensor scale kept."""
    def cut(t: Optional[Tensor]) -> Optional[Tensor]:
        return t[rows] if t is not None and t.dim() == 2 and t.shape[0] == q.codes.shape[0] else t
    return QuantizedTensor(q.codes[rows], cut(q.scale), cut(q.zero_point), q.global_scale, q.spec, q.dtype)
