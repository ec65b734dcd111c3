"""Which Linear gets which format: presets, per-module rules, ignore list, fused groups.

``apply_recipe(model, config.quant)`` swaps every matching ``nn.Linear`` for a
:class:`~qadpipe.quant.quantizers.QuantLinear` (and transformers' fused MoE experts for a
:class:`~qadpipe.quant.experts.QuantExperts`) in place and returns a :class:`QuantRecipe`
saying exactly what was done -- per module the weight and input specs, plus the fused groups
-- which is all an exporter needs besides the modules themselves.

Resolution: a Linear (or experts module) whose name matches an ``ignore`` regex stays full
precision; otherwise the first ``rules`` entry whose ``targets`` regex matches decides its
preset, and the top-level ``preset`` covers the rest.  Regexes use ``re.search`` on the dotted module name.

Rebuilding a trained or calibrated student: load the model, ``apply_recipe(model, quant)``
with the same ``quant`` section, then ``model.load_state_dict(state)`` -- quantizer state
(static amax, LSQ steps, clip logits) lives in the state_dict under
``<module>.weight_quantizer.*`` / ``<module>.input_quantizer.*``.
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Optional

from torch import nn

from qadpipe.errors import QuantError
from qadpipe.models import output_head_name
from qadpipe.quant.constants import MX_BLOCK, NVFP4_BLOCK
from qadpipe.quant.experts import ExpertsLayout, QuantExperts, experts_layout
from qadpipe.quant.formats import Granularity, Kind, QuantSpec
from qadpipe.quant.kv_cache import attach_kv_quantizers
from qadpipe.quant.quantizers import QuantLinear, Quantizer

log = logging.getLogger(__name__)

# Sibling Linears vLLM fuses into one GEMM (its models' ``packed_modules_mapping``, vLLM 0.32):
# they must share one weight global scale (NVFP4) or per-tensor scale (static FP8), or vLLM
# serves the fused GEMM with the largest member's scale and the others rescaled.  Longer
# groups first: a layer with q/k/v/g gets the four-member group, not q/k/v.  A test checks
# this table against every mapping of the installed vLLM.  Grouping siblings vLLM keeps
# apart costs precision, not fidelity: the export writes the shared scale they trained with.
FUSED_SIBLINGS = (
    ("q_proj", "k_proj", "v_proj", "g_proj"),     # OLMo hybrid's linear attention
    ("q_proj", "k_proj", "v_proj", "b_proj"),     # Bailing MoE v3
    ("q_proj", "k_proj", "v_proj"),
    ("query", "key", "value"), ("wq", "wk", "wv"), ("q", "k", "v"),
    ("q_a_proj", "kv_a_proj_with_mqa"),           # DeepSeek-V2/V3 MLA, Kimi, GLM-4 MoE lite
    ("in_proj_qkv", "in_proj_z"), ("in_proj_b", "in_proj_a"),   # Qwen3.5 gated delta net
    ("k_proj", "v_proj"), ("q_proj", "k_proj"),   # cross-attention, where q (or v) stands apart
    ("gate_proj", "up_proj"), ("w1", "w3"), ("fc1", "fc3"), ("c_fc_0", "c_fc_1"), ("gate_proj", "dense_h_to_4h"),
)


@dataclass(frozen=True)
class Preset:
    """A named weight (+ optional input) format pair."""

    weight: QuantSpec
    input: Optional[QuantSpec] = None
    note: str = ""


def _int(bits: int, granularity: str = "group", group: Optional[int] = 128, **kw: Any) -> QuantSpec:
    return QuantSpec(Kind.INT, bits, Granularity(granularity), group, **kw)


# Activations: vLLM's quantizers multiply by the scale's reciprocal (see QuantSpec.reciprocal).
_FP8_TOKEN = QuantSpec(Kind.FP8, granularity=Granularity.TOKEN, reciprocal=True)
_G128 = dict(granularity=Granularity.GROUP, group_size=128)

PRESETS: dict[str, Preset] = {
    "nvfp4": Preset(QuantSpec(Kind.NVFP4, dynamic=False), QuantSpec(Kind.NVFP4, dynamic=False),
                    "NVFP4 W4A4: weight global amax from the weight, input global amax calibrated"),
    "nvfp4_a16": Preset(QuantSpec(Kind.NVFP4, dynamic=False), None, "NVFP4 weight-only"),
    "mxfp4": Preset(QuantSpec(Kind.MXFP4), QuantSpec(Kind.MXFP4), "MXFP4 W4A4, dynamic E8M0 blocks"),
    "mxfp4_a16": Preset(QuantSpec(Kind.MXFP4), None, "MXFP4 weight-only"),
    "mxfp8": Preset(QuantSpec(Kind.MXFP8), QuantSpec(Kind.MXFP8), "MXFP8 W8A8, dynamic E8M0 blocks"),
    "mxfp8_a16": Preset(QuantSpec(Kind.MXFP8), None, "MXFP8 weight-only"),
    "fp8": Preset(QuantSpec(Kind.FP8, granularity=Granularity.CHANNEL), _FP8_TOKEN,
                  "FP8 per-channel weights, dynamic per-token inputs (CT FP8_DYNAMIC)"),
    "fp8_static": Preset(QuantSpec(Kind.FP8, granularity=Granularity.TENSOR, dynamic=False),
                         QuantSpec(Kind.FP8, granularity=Granularity.TENSOR, dynamic=False, reciprocal=True),
                         "FP8 per-tensor weights and calibrated per-tensor inputs (CT FP8)"),
    "w4a16_int": Preset(_int(4), None, "int4 symmetric, group 128 (CT W4A16)"),
    "w4a16_int_asym": Preset(_int(4, symmetric=False), None, "int4 asymmetric, group 128"),
    "w8a16_int": Preset(_int(8, "channel", None), None, "int8 per-channel weight-only"),
    "w8a8_int": Preset(_int(8, "channel", None), _int(8, "token", None, reciprocal=True),
                       "int8 per-channel weights, dynamic per-token int8 inputs"),
    "w4a8_fp8": Preset(_int(4, fp8_group_scales=True), _FP8_TOKEN,
                       "int4 group-128 weights (FP8 group scales as vLLM converts them), FP8 per-token inputs"),
    "ternary_twn": Preset(QuantSpec(Kind.TWN, **_G128), None, "TWN ternary, group 128"),
    "bitnet_absmean": Preset(QuantSpec(Kind.ABSMEAN, **_G128), None, "BitNet b1.58 absmean ternary, group 128"),
    "sherry_3of4": Preset(QuantSpec(Kind.SHERRY, **_G128), None, "3:4 sparse ternary, group 128"),
    # the LSQ paper's grid, [-2^(b-1), 2^(b-1) - 1]
    "lsq_int4": Preset(QuantSpec(Kind.LSQ, 4, narrow_range=False, **_G128), None,
                       "LSQ learned step, int4 [-8, 7], group 128"),
    "lsq_int2": Preset(QuantSpec(Kind.LSQ, 2, narrow_range=False, **_G128), None,
                       "LSQ learned step, int2 [-2, 1], group 128"),
}


@dataclass(frozen=True)
class LayerRecipe:
    """What one Linear got."""

    name: str
    preset: str
    weight: QuantSpec
    input: Optional[QuantSpec]
    fused_group: Optional[tuple[str, ...]] = None


@dataclass
class QuantRecipe:
    """Everything apply_recipe did: per-module specs, fused groups, what stayed dense."""

    layers: dict[str, LayerRecipe] = field(default_factory=dict)
    experts: dict[str, LayerRecipe] = field(default_factory=dict)   # fused MoE experts
    fused_groups: list[tuple[str, ...]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    ste: str = "identity"
    learnable: str = "none"
    kv_cache: list[str] = field(default_factory=list)  # attention modules with FP8 K/V quantizers

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for layer in self.layers.values():
            counts[layer.preset] = counts.get(layer.preset, 0) + 1
        parts = ", ".join(f"{n} x {p}" for p, n in counts.items())
        kv = f"; FP8 KV cache in {len(self.kv_cache)} attention modules" if self.kv_cache else ""
        quantized = [f"{len(self.layers)} Linear ({parts})" if self.layers else "",
                     f"{len(self.experts)} MoE experts modules" if self.experts else ""]
        return (f"quantized {', '.join(q for q in quantized if q)}; {len(self.fused_groups)} fused groups; "
                f"full precision: {', '.join(self.ignored) or 'none'}{kv}")


def resolve_preset(name: str, group_size: Optional[int], section: str = "quant") -> Preset:
    """A preset by name, with the group-size override applied where the format allows one.

    ``section`` is the config section holding both fields (``quant`` or ``quant.rules[i]``),
    so an error names the field that is wrong: the preset, or the group size it cannot take."""
    if name not in PRESETS:
        close = [p for p in PRESETS if p == name.lower()] or difflib.get_close_matches(name.lower(), PRESETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise QuantError(f"{_field(section, 'preset')}: unknown preset {name!r}; expected one of {', '.join(PRESETS)}{hint}")
    preset = PRESETS[name]
    if group_size is None:
        return preset
    weight = preset.weight
    why = _fixed_group_reason(weight)
    if why is None and weight.granularity is not Granularity.GROUP:
        why = f"its weights have {weight.granularity.value} scales"
    if why and not (weight.fp8_group_scales and group_size == weight.group_size):
        raise QuantError(f"{_field(section, 'group_size')}: {group_size} cannot apply to preset {name!r} "
                         f"({why}); set group_size: null")
    try:
        return replace(preset, weight=replace(weight, group_size=group_size))
    except QuantError as exc:   # the format's own rule (sherry: a multiple of M)
        raise QuantError(f"{_field(section, 'group_size')}: {group_size} cannot apply to preset {name!r} "
                         f"({exc})") from None


def _fixed_group_reason(weight: QuantSpec) -> Optional[str]:
    """Why a format's weight group size is not the user's to choose (None: it is)."""
    fixed_blocks = {Kind.NVFP4: NVFP4_BLOCK, Kind.MXFP4: MX_BLOCK, Kind.MXFP8: MX_BLOCK}
    if weight.kind in fixed_blocks:
        return f"its {weight.kind.value} blocks are {fixed_blocks[weight.kind]} by the format"
    if weight.fp8_group_scales:
        return f"vLLM's W4A8-FP8 kernel takes int4 in groups of {weight.group_size} only"
    return None


def _field(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


#: Linears vLLM builds dense whatever a checkpoint's quantization config says (``quant_config=None``
#: in its model code: Qwen2-MoE's, Qwen3-Next's and InternS2's one-output shared-expert gate):
#: quantized, their packed tensors would not load.  Kept dense by role, as an LM head can be.
DENSE_IN_VLLM = ("shared_expert_gate",)


def apply_recipe(model: nn.Module, quant: Any, *, rebuild: bool = False) -> QuantRecipe:
    """Replace matching ``nn.Linear`` modules of ``model`` by QuantLinear, and (``quant.moe_experts:
    quantize``) transformers' fused MoE experts by QuantExperts, in place.

    ``rebuild``: the recipe of a student already trained (export, eval, --resume): it is
    applied as it was, without the refusals and warnings about its no-op entries that a new
    recipe gets (a student trained before a refusal existed must still load)."""
    names = [name for name, _ in model.named_modules() if name]
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    experts = {name: (m, layout) for name, m in model.named_modules()
               if (layout := experts_layout(m)) is not None} if quant.moe_experts == "quantize" else {}
    targets = [*linears, *experts]
    kind = "nn.Linear or MoE experts module" if experts else "nn.Linear"   # what rules act on, as errors say
    head = output_head_name(model)
    ignore = _resolve_ignore(quant.ignore, names, head)
    for i, pattern in ignore:
        _check_regex(pattern, f"quant.ignore[{i}]", names, "module")
        if not rebuild:
            _warn_if_ignore_keeps_nothing(model, i, pattern, targets)
    rules = [(i, rule, resolve_preset(rule.preset, rule.group_size, f"quant.rules[{i}]"))
             for i, rule in enumerate(quant.rules)]
    dense_experts = [name for name, m in model.named_modules()
                     if quant.moe_experts != "quantize" and experts_layout(m) is not None]
    for i, rule, _ in rules:
        if dense_experts and not any(re.search(rule.targets, name) for name in targets) \
                and any(re.search(rule.targets, name) for name in dense_experts):
            raise QuantError(f"quant.rules[{i}].targets: regex {rule.targets!r} matches MoE experts "
                             f"({dense_experts[0]} ...), which quant.moe_experts: {quant.moe_experts} keeps dense; "
                             "set quant.moe_experts: quantize to quantize them")
        _check_regex(rule.targets, f"quant.rules[{i}].targets", targets, kind)
    default = resolve_preset(quant.preset, quant.group_size)

    recipe = QuantRecipe(ste=quant.ste, learnable=quant.learnable)
    compile_mode = getattr(quant, "compile", "off")
    chosen: dict[str, tuple[str, Preset]] = {}
    section_of: dict[str, str] = {}
    served_dense = [name for name in linears if name.rsplit(".", 1)[-1] in DENSE_IN_VLLM]
    if served_dense:
        log.info("quant: %d layers (%s ...) stay in full precision: vLLM serves them dense", len(served_dense),
                 served_dense[0])
    for name in targets:
        if any(re.search(p, name) for _, p in ignore) or name in served_dense:
            recipe.ignored.append(name)
            continue
        match = next(((f"quant.rules[{i}]", r.preset, p) for i, r, p in rules if re.search(r.targets, name)),
                     ("quant", quant.preset, default))
        section, preset_name, preset = match
        if name in experts:
            _check_experts(name, *experts[name], preset_name, preset, section)
        else:
            _check_layer(model, name, linears[name], preset_name, preset, section, is_head=name == head)
        chosen[name] = (preset_name, preset)
        section_of[name] = section
    if not rebuild:
        _refuse_dead_rules(quant, targets, section_of, kind)
    if not chosen:
        raise QuantError(f"quant: no nn.Linear left to quantize in {type(model).__name__} "
                         f"(ignore={quant.ignore!r})")

    groups = _fused_groups({n: c for n, c in chosen.items() if n in linears}, set(linears))
    group_of = {member: group for group in groups for member in group}
    for name, (preset_name, preset) in chosen.items():
        weight = _learnable_spec(preset.weight, quant.learnable, quant.lsq_grid, preset_name, section_of[name])
        learnable = _learnable_kind(weight, quant.learnable)
        if name in experts:
            module, layout = experts[name]
            _set_submodule(model, name, QuantExperts(module, layout, weight, ste=quant.ste, learnable=learnable,
                                                     compile_mode=compile_mode, input_spec=preset.input))
            recipe.experts[name] = LayerRecipe(name, preset_name, weight, preset.input)
            continue
        new = QuantLinear.from_linear(linears[name], weight, preset.input, ste=quant.ste, learnable=learnable,
                                      compile_mode=compile_mode)
        _set_submodule(model, name, new)
        recipe.layers[name] = LayerRecipe(name, preset_name, weight, preset.input, group_of.get(name))
    recipe.fused_groups = groups
    if quant.learnable == "clip" and not rebuild:
        _say_where_clip_does_not_apply(recipe)
    _share_fused_amax(model, groups)
    if getattr(quant, "kv_cache", None):
        recipe.kv_cache = attach_kv_quantizers(model, quant.kv_cache, quant.ste, compile_mode)
    if not rebuild:
        _warn_of_dense_matrices(model, recipe.ignored)
    log.info(recipe.summary())
    return recipe


def quant_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters for ``distill.trainable: quant``: every quantizer parameter (LSQ steps,
    clip logits) plus the normalisation weights (AngelSlim's scale-only QAD)."""
    params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, Quantizer):
            params.update({id(p): p for p in module.parameters()})
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            params.update({id(p): p for p in module.parameters(recurse=False)})
    return list(params.values())


def _resolve_ignore(ignore: list[str], names: list[str], head: Optional[str]) -> list[tuple[int, str]]:
    """``quant.ignore`` as applied to this model, each entry with its index in the config.

    The default list's two names are roles, not only regexes: ``lm_head`` keeps the LM head
    dense whatever the architecture calls it (InternLM2 ``output``, ChatGLM ``output_layer``),
    and ``embed_tokens`` matching nothing (GPT-NeoX ``embed_in``) is harmless: embeddings are
    never quantized.  Any other entry matching nothing is a recipe that does not do what it
    says, refused by :func:`_check_regex`."""
    def matches(pattern: str) -> bool:
        return any(re.search(pattern, name) for name in names)

    resolved = []
    for i, pattern in enumerate(ignore):
        if pattern == "lm_head" and not matches(pattern) and head is not None:
            log.info("quant.ignore[%d]: 'lm_head' keeps this model's LM head, '%s', in full precision", i, head)
            resolved.append((i, f"^{re.escape(head)}$"))
        elif not (pattern == "embed_tokens" and not matches(pattern)):
            resolved.append((i, pattern))
    return resolved


def _check_regex(pattern: str, where: str, names: list[str], kind: str) -> None:
    """Refuse a regex that matches none of ``names`` (the modules of ``kind`` it acts on)."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise QuantError(f"{where}: {pattern!r} is not a valid regex ({exc})") from None
    if not any(compiled.search(n) for n in names):
        example = names[0] if names else "<none>"
        raise QuantError(f"{where}: regex {pattern!r} matches no {kind} (names look like {example!r})")


def _warn_if_ignore_keeps_nothing(model: nn.Module, index: int, pattern: str, targets: list[str]) -> None:
    """An ignore entry acts on the modules the recipe quantizes (nn.Linear, MoE experts): one
    matching a module that holds Linears (a decoder layer's name) keeps none of them dense,
    which is said with the pattern that would; one matching modules qadpipe never quantizes
    (an MoE router that is no nn.Linear, the embeddings of the default list) is harmless."""
    if any(re.search(pattern, name) for name in targets):
        return
    name, module = next((name, m) for name, m in model.named_modules() if name and re.search(pattern, name))
    if isinstance(module, nn.Embedding):   # the default list's embed_tokens: documentation, nothing to say
        return
    if not any(type(child) is nn.Linear for child in module.modules()):
        log.info("quant.ignore[%d]: '%s' matches no nn.Linear (e.g. %s, a %s, which qadpipe does not quantize "
                 "anyway)", index, pattern, name, type(module).__name__)
        return
    log.warning("quant.ignore[%d]: regex '%s' matches no nn.Linear (e.g. %s, a %s): ignore acts on nn.Linear modules, "
                "so it keeps nothing in full precision; to keep its Linears dense, match their names (e.g. '%s')",
                index, pattern, name, type(module).__name__, re.escape(name) + r"\.")


def _warn_of_dense_matrices(model: nn.Module, ignored: list[str]) -> None:
    """Weights the recipe cannot reach: matrices of modules other than nn.Linear and
    transformers' fused MoE experts (routers, custom expert or head modules, convolutions;
    experts under ``quant.moe_experts: dense``) stay in full precision, and the export serves
    them so.  What ``quant.ignore`` keeps dense is the user's choice, said in the summary."""
    kinds: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding, QuantExperts, Quantizer)) or name in ignored:
            continue
        for param in module.parameters(recurse=False):
            if param.dim() >= 2:
                kinds[type(module).__name__] = kinds.get(type(module).__name__, 0) + param.numel()
    if kinds:
        share = sum(kinds.values()) / sum(p.numel() for p in model.parameters())
        log.warning("quant: %.1f%% of the model's weights sit in modules that are neither nn.Linear nor "
                    "transformers' fused MoE experts (%s) and stay in full precision", 100 * share,
                    ", ".join(sorted(kinds)))


def _refuse_dead_rules(quant: Any, targets: list[str], section_of: dict[str, str], kind: str) -> None:
    """A rule that decides no module is a recipe that does not do what it says: every module
    it matches is ignored (ignore wins), or an earlier rule took them all (the first match wins)."""
    for i, rule in enumerate(quant.rules):
        where = f"quant.rules[{i}]"
        matched = [name for name in targets if re.search(rule.targets, name)]
        if any(section_of.get(name) == where for name in matched):
            continue
        taken = sorted({section_of[name] for name in matched if name in section_of})
        if taken:
            raise QuantError(f"{where}.targets: every {kind} it matches ({matched[0]}, ...) is taken by "
                             f"{', '.join(taken)} (the first matching rule wins); put this rule first or "
                             "narrow the earlier one")
        raise QuantError(f"{where}.targets: every {kind} it matches ({matched[0]}, ...) is in quant.ignore, "
                         "which wins over rules; remove it from quant.ignore to quantize it")


def _check_experts(name: str, module: nn.Module, layout: ExpertsLayout, preset_name: str, preset: Preset,
                   section: str) -> None:
    """Refuse what fused MoE experts cannot take (groups that divide both projections'
    in-features); errors name the field to change."""
    for weight_name in layout.weight_names:
        in_features = layout.in_last(getattr(module, weight_name)).shape[-1]
        _check_in_features(f"{name}.{weight_name}", in_features, preset_name, preset.weight, section)


def _check_in_features(name: str, in_features: int, preset_name: str, spec: QuantSpec, section: str) -> None:
    """Refuse a weight whose in-features the format's groups (or sherry's M) do not divide,
    naming what to change: the group size where the user picks it, else the preset."""
    where = f"{section}.preset"
    if spec.granularity is Granularity.GROUP and in_features % spec.group_size:
        fixed = _fixed_group_reason(spec)
        if fixed:   # no group size to change: another preset, or keep the layer dense
            raise QuantError(f"{where}: {preset_name} cannot quantize {name}: its in_features "
                             f"{in_features} is not a multiple of {spec.group_size} ({fixed}); "
                             "use another preset for it (a quant.rules entry) or add it to quant.ignore")
        divisors = [g for g in (128, 64, 32, 16) if in_features % g == 0]
        hint = f"; set {section}.group_size to a divisor such as {divisors[0]}" if divisors else ""
        raise QuantError(f"{section}.group_size: {preset_name} group size {spec.group_size} does not divide "
                         f"in_features {in_features} of {name}{hint}")
    if spec.kind is Kind.SHERRY and in_features % spec.sparsity[1]:
        raise QuantError(f"{where}: sherry M={spec.sparsity[1]} does not divide in_features "
                         f"{in_features} of {name}")


def _check_layer(model: nn.Module, name: str, linear: nn.Linear, preset_name: str, preset: Preset,
                 section: str, *, is_head: bool) -> None:
    """Refuse what this Linear cannot take; errors name the field to change in ``section``.
    ``is_head``: it is the model's LM head (found by identity, whatever its name)."""
    where = f"{section}.preset"
    spec = preset.weight
    _check_in_features(name, linear.in_features, preset_name, spec, section)
    if is_head:
        servable = spec.kind in (Kind.INT, Kind.LSQ, Kind.TWN, Kind.ABSMEAN, Kind.SHERRY) \
            and preset.input is None and not spec.fp8_group_scales
        if not servable:
            raise QuantError(f"{where}: the LM head {name} with preset {preset_name!r}: vLLM serves a quantized "
                             f"LM head only as weight-only int (WNA16); use such a preset or keep {name} in "
                             "quant.ignore")
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embeddings is not None and embeddings.weight is linear.weight:
            raise QuantError(f"{where}: the LM head {name} shares its weight with the input embeddings "
                             "(tie_word_embeddings); quantizing it would quantize the embedding "
                             f"too -- keep {name} in quant.ignore")


def _learnable_spec(spec: QuantSpec, learnable: str, lsq_grid: str, preset_name: str, section: str) -> QuantSpec:
    if learnable == "none" or spec.kind is Kind.LSQ:   # an lsq_* preset learns LSQ steps whatever quant.learnable says
        return spec
    if spec.kind is not Kind.INT or not spec.symmetric:
        raise QuantError(f"quant.learnable: {learnable!r} needs a symmetric int weight preset, "
                         f"{section}.preset is {preset_name!r}")
    if learnable == "clip":
        return spec
    # quant.lsq_grid: preset keeps the preset's grid (w4a16_int's [-7, 7]): learning the step alone
    return replace(spec, kind=Kind.LSQ, narrow_range=spec.narrow_range and lsq_grid == "preset")


def _say_where_clip_does_not_apply(recipe: QuantRecipe) -> None:
    """``quant.learnable: clip`` is one setting for the whole recipe, while an ``lsq_*`` preset's
    layers learn LSQ steps whatever it says: said, and warned of when no layer is left to clip."""
    quantized = {**recipe.layers, **recipe.experts}
    lsq = [name for name, layer in quantized.items() if layer.weight.kind is Kind.LSQ]
    if not lsq:
        return
    if len(lsq) == len(quantized):
        log.warning("quant.learnable: clip does nothing here: every quantized layer has an lsq_* preset, which "
                    "learns LSQ steps instead; set quant.learnable: none")
    else:
        log.info("quant.learnable: clip: %d layers with an lsq_* preset (%s ...) learn LSQ steps instead",
                 len(lsq), lsq[0])


def _learnable_kind(spec: QuantSpec, learnable: str) -> str:
    if spec.kind is Kind.LSQ:
        return "lsq"
    return learnable


def partly_quantized_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """The sibling groups of ``model`` (see :func:`sibling_groups`) that only some members of
    are quantized: a student the compressed-tensors export refuses."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    return [members for members in sibling_groups(linears)
            if len({isinstance(linears[m], QuantLinear) for m in members}) > 1]


def sibling_groups(linears: Iterable[str]) -> list[tuple[str, ...]]:
    """The sibling Linears among ``linears`` (module names) that vLLM fuses into one GEMM:
    for each :data:`FUSED_SIBLINGS` entry in order, the groups whose every member is there
    and in no earlier group."""
    names = set(linears)
    grouped: set[str] = set()
    groups = []
    for siblings in FUSED_SIBLINGS:
        for name in sorted(names):
            parent, _, leaf = name.rpartition(".")
            if leaf == siblings[0]:
                members = tuple(f"{parent}.{s}" if parent else s for s in siblings)
                if all(m in names and m not in grouped for m in members):
                    groups.append(members)
                    grouped.update(members)
    return groups


def _fused_groups(chosen: dict[str, tuple[str, Preset]], linears: set[str]) -> list[tuple[str, ...]]:
    """Sibling groups whose members are all quantized; a group only partly quantized trains,
    but cannot be served as one GEMM (the compressed-tensors export refuses it), so it is
    said now rather than after training."""
    groups = []
    for members in sibling_groups(linears):
        present = [m for m in members if m in chosen]
        if not present:
            continue
        if len(present) < len(members):
            log.warning("quant: %s are fused by vLLM into one GEMM but only %s quantized; the compressed-tensors "
                        "export refuses such a student (export it with --format fake)",
                        ", ".join(members), ", ".join(present))
            continue
        if len({chosen[m][1] for m in members}) > 1:
            got = ", ".join(f"{m.rpartition('.')[2]}: {chosen[m][0]}{_group_text(chosen[m][1])}" for m in members)
            raise QuantError(f"quant.rules: {', '.join(members)} are fused by vLLM into one GEMM and must be "
                             f"quantized alike (same preset and group size); they got {got}")
        groups.append(members)
    return groups


def _group_text(preset: Preset) -> str:
    return f" group {preset.weight.group_size}" if preset.weight.group_size else ""


def _share_fused_amax(model: nn.Module, groups: list[tuple[str, ...]]) -> None:
    """One static weight amax per fused group: the max over its members."""
    for members in groups:
        quantizers = [model.get_submodule(m).weight_quantizer for m in members]
        if quantizers[0].spec.dynamic or quantizers[0].amax.is_meta:   # a sharded build's skeleton: see build_student_skeleton
            continue
        shared = max(float(q.amax) for q in quantizers)
        for q in quantizers:
            q.amax.fill_(shared)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)
