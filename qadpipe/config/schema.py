"""The one config schema for the whole pipeline.

Plain dataclasses: the loader reads their type hints to validate YAML, so a field's type,
default and ``metadata`` (ranges, file checks, ``help``) are all the documentation it
needs; the README's config reference is generated from this file.  Why not pydantic:
its multi-line error reports would have to be re-rendered into our one-line form anyway,
and stdlib dataclasses keep the schema importable without extra dependencies.

Cross-field rules live in each section's ``validate()``, which returns a problem string
("field: got …, expected …") or ``None``.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

Dtype = Literal["bfloat16", "float16", "float32"]


def opt(default: Any = None, help: str = "", *, factory: Optional[Callable[[], Any]] = None,
        **checks: Any) -> Any:
    """A schema field: its default, the help text the README shows, and the checks the
    loader enforces (``ge``/``gt``/``le``/``lt`` bounds, ``check`` callable, ``nonempty``,
    ``required``: a file must set it, the default being only the dataclass's);
    ``path=True`` marks a file system path, whose ``~`` the loader expands as a shell would."""
    metadata = {"help": help, **checks}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    """The student model (and the teacher too, unless ``teacher.path`` is set)."""

    path: str = opt("smollm2-135m",
        "HF model directory, or the alias 'smollm2-135m' (embedded SmolLM2-135M-Instruct)", nonempty=True,
        path=True)
    dtype: Dtype = opt("bfloat16",
        "the student's compute dtype: CUDA autocast in training (master weights stay fp32; CPU trains "
        "in fp32) and the dtype export writes (float32 exports as bfloat16, with a warning: vLLM serves "
        "16-bit)")
    trust_remote_code: bool = opt(False,
        "run model code shipped inside the checkpoint; off unless you trust its source")


@dataclass
class TeacherConfig:
    """How stage one serves the full-precision teacher."""

    path: Optional[str] = opt(None, "teacher model; null = model.path", nonempty=True, path=True)
    backend: Literal["vllm", "hf"] = opt("vllm",
        "vllm (fast, production) or hf (transformers reference, no vLLM needed)")
    dtype: Dtype = opt("bfloat16", "teacher weights dtype")
    fp32_head: bool = opt(True,
        "compute the LM head in fp32 so targets are not rounded to bf16 logits")
    tensor_parallel_size: int = opt(1, "vLLM tensor parallel size", ge=1)
    gpu_memory_utilization: float = opt(0.85,
        "vLLM memory fraction (GPU)", gt=0.0, le=1.0)
    kv_cache_gib: float = opt(1.0,
        "vLLM CPU KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)", gt=0.0)
    max_num_batched_tokens: int = opt(2048,
        "tokens per vLLM step; bounds the [tokens, vocab] prompt-logprob peak", ge=16)
    enforce_eager: bool = opt(False, "skip vLLM graph compilation")
    fused_logprobs: bool = opt(True,
        "vLLM: take the top-k log-probs from the logits (qadpipe's vLLM plugin: on CPU one native pass "
        "per block of positions, an exact top-k from the 64-entry blocks that can hold it; on GPU a "
        "compiled logsumexp and torch.topk, in vLLM's V1 runner only: VLLM_USE_V2_MODEL_RUNNER=0, else "
        "vLLM's own path runs, logged) instead of vLLM's full-vocab fp32 log_softmax; same values "
        "to fp32 rounding")
    cpu_reserved_cores: int = opt(0,
        "vLLM-CPU: cores kept free of the engine for its frontend process (vLLM's own default is 1; "
        "scoring leaves the frontend nearly idle, and on 2 cores the engine runs 1.7x faster on both)", ge=0)
    batch_size: int = opt(8, "sequences per HF-backend forward", ge=1)
    chunk_tokens: int = opt(1024,
        "HF backend: positions per LM-head + top-k chunk (bounds the fp32 [tokens, vocab] peak)", ge=1)
    device: str = opt("auto", "HF backend device: auto, cpu, cuda, cuda:N")


@dataclass
class RandomTokensConfig:
    """Uniform random token sequences (the QAD paper shows they still teach)."""

    num_sequences: int = opt(64, "how many sequences", ge=1)
    length: int = opt(256, "tokens per sequence (at most data.max_length, less generate.max_new_tokens in "
                      "generate mode)", ge=2)
    seed: int = opt(0, "RNG seed", ge=0, lt=2**32)


def _is_iso_date(value: str) -> bool:
    """YYYY-MM-DD and a real day (``fromisoformat`` also takes week dates: 2026-W49-1)."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        return False
    try:
        datetime.date.fromisoformat(value)
    except ValueError:
        return False
    return True


@dataclass
class DataConfig:
    """Where the token sequences come from."""

    source: str = opt("random",
        "jsonl/json/parquet/text file, a datasets.save_to_disk directory, or 'random'", nonempty=True, path=True)
    field: Literal["text", "messages", "prompt"] = opt("text",
        "record field: text, messages (chat template) or prompt (+ optional completion)")
    max_length: int = opt(512, "tokens per sequence", ge=2)
    overflow: Literal["truncate", "drop", "pack"] = opt("truncate",
        "sequences longer than max_length: truncate (score: keep the start; generate: keep the prompt's "
        "end, where a chat template's assistant header is), drop, or pack all records into windows")
    limit: Optional[int] = opt(None, "use only the first N records", ge=1)
    chat_template: bool = opt(False,
        "render prompt (+completion) records as a user (+assistant) turn of the teacher's chat template")
    chat_date: Optional[str] = opt(None,
        "YYYY-MM-DD: today's date for a chat template that prints it (strftime_now: Llama 3.x, Granite, "
        "SmolLM3), which such a teacher needs: the wall clock would render other tokens in tasks and "
        "resumes on other days", check=lambda value: None if _is_iso_date(value) else "expected a date as YYYY-MM-DD")
    random: RandomTokensConfig = opt(factory=RandomTokensConfig)


@dataclass
class GenerateConfig:
    """Stage one: score existing sequences or let the teacher write completions."""

    mode: Literal["score", "generate"] = opt("score",
        "score: targets for given sequences; generate: the teacher samples completions first")
    include_prompt: bool = opt(True,
        "also store targets (and train) on prompt positions")
    temperature: float = opt(0.8,
        "sampling temperature for completions (targets stay the raw T=1 distribution)", ge=0.0)
    top_p: float = opt(0.95, "nucleus sampling for completions", gt=0.0, le=1.0)
    max_new_tokens: int = opt(128, "completion length limit", ge=1)
    seed: int = opt(0, "sampling seed: completions, and the draws of a sampled cache", ge=0, lt=2**32)
    num_shards: Optional[int] = opt(None,
        "split records across this many tasks (default: SLURM_ARRAY_TASK_COUNT or 1)", ge=1)
    shard_index: Optional[int] = opt(None,
        "this task's index (default: SLURM_ARRAY_TASK_ID or 0)", ge=0)

    def validate(self) -> Optional[str]:
        if self.num_shards is not None and self.shard_index is not None and self.shard_index >= self.num_shards:
            return f"shard_index: got {self.shard_index}, expected a value < num_shards ({self.num_shards})"
        return None


@dataclass
class CacheConfig:
    """The logit cache written by stage one and read by stage two."""

    path: str = opt("runs/cache", "cache directory, or an object-store URI (s3://, gs://)", nonempty=True,
                    path=True)
    target: Literal["topk", "sampled"] = opt("topk",
        "topk: k highest teacher log-probs + tail mass; sampled: N draws (ids + counts)")
    k: int = opt(64, "top-k entries per position", ge=1, le=4096)
    num_samples: int = opt(50, "draws per position for sampled targets", ge=1, le=4096)
    encoding: Literal["plain", "compact"] = opt("compact",
        "plain: int32 ids + fp32 log-probs; compact: narrowed ids + log-domain quantized probs")
    zstd_level: int = opt(3, "zstd compression level", ge=1, le=22)
    rows_per_shard: int = opt(1024, "sequences per Parquet shard (at most: a shard of long rows closes at 2^28 "
                              "target entries)", ge=1)


@dataclass
class QuantRule:
    """One per-module override of ``quant.preset`` (the first matching rule wins)."""

    targets: str = opt("", "regex searched in the dotted module name, e.g. 'mlp\\.down_proj'", nonempty=True,
                       required=True)
    preset: str = opt("w4a16_int", "preset for the matching Linear modules")
    group_size: Optional[int] = opt(None, "override this preset's weight group size", ge=1)


@dataclass
class QuantConfig:
    """How the student is fake-quantized (and later exported)."""

    preset: str = opt("w4a16_int",
        "named recipe: nvfp4, nvfp4_a16, mxfp4(_a16), mxfp8(_a16), fp8, fp8_static, w4a16_int(_asym), "
        "w8a16_int, w8a8_int, w4a8_fp8, ternary_twn, bitnet_absmean, sherry_3of4, lsq_int4, lsq_int2")
    group_size: Optional[int] = opt(None,
        "override the preset's weight group size (int, ternary and LSQ presets, but w4a8_fp8: 128 only, "
        "vLLM's kernel; default 128 does not divide SmolLM2's 576)", ge=1)
    ignore: list[str] = opt(factory=lambda: ["lm_head", "embed_tokens"], help=
        "regexes of module names left in full precision; 'lm_head' also means the LM head by any "
        "other name (InternLM2's output), and 'embed_tokens' may match nothing (GPT-NeoX's embed_in: embeddings "
        "are never quantized)")
    rules: list[QuantRule] = opt(factory=list, help=
        "per-module overrides: [{targets: regex, preset: name, group_size: n}], first match wins")
    moe_experts: Literal["quantize", "dense"] = opt("quantize",
        "transformers' fused MoE experts (3-D gate_up_proj/down_proj): quantize them per expert with "
        "the preset (or a rule) their module name gets, activations included (one input range per "
        "projection for all the experts, as vLLM serves them); dense: keep them in full precision (a "
        "student recorded before this field existed kept them dense)")
    ste: Literal["identity", "clipped"] = opt("identity",
        "straight-through gradient: identity, or zero where the quantizer clips")
    learnable: Literal["none", "lsq", "clip"] = opt("none",
        "learn int weight scales: lsq (step size) or clip (per-group clip ratio); init from the weights")
    lsq_grid: Literal["preset", "full"] = opt("preset",
        "learnable: lsq on an int preset: its codes stay on the preset's grid (w4a16_int's [-7, 7]), or full: "
        "the LSQ paper's [-2^(b-1), 2^(b-1)-1] (a student recorded before this field existed took full)")
    kv_cache: Optional[Literal["fp8", "fp8_cpu"]] = opt(None,
        "fp8: also fake-quantize the KV cache as vLLM's kv_cache_dtype=fp8 stores it (post-RoPE K "
        "and V, E4M3, one calibrated scale per layer each; export writes k_scale/v_scale); "
        "fp8_cpu: the same, rounded toward zero as vLLM-CPU's cache kernels do")
    compile: Literal["auto", "on", "off"] = opt("auto",
        "run fake-quant through torch.compile (bit-identical to eager, tested; fuses its ~dozen "
        "kernels per tensor): auto = on CUDA only, where it pays; on; off")
    calibration_batches: int = opt(4, "batches used to calibrate amax", ge=0)
    activation_percentile: Optional[float] = opt(None,
        "calibrate static input ranges at this percentile of |x| (e.g. 99.99); null = max",
        gt=0.0, le=100.0)

    def validate(self) -> Optional[str]:
        # Preset names and group sizes are checked here, with the config, so `config show` and
        # every stage refuse a typo before any model loads (the rest needs the model's shapes).
        from qadpipe.errors import QuantError
        from qadpipe.quant.recipe import resolve_preset

        try:
            resolve_preset(self.preset, self.group_size, section="")
            for i, rule in enumerate(self.rules):
                resolve_preset(rule.preset, rule.group_size, section=f"rules[{i}]")
        except QuantError as exc:
            return str(exc)
        patterns = [(f"ignore[{i}]", p) for i, p in enumerate(self.ignore)]
        patterns += [(f"rules[{i}].targets", rule.targets) for i, rule in enumerate(self.rules)]
        for where, pattern in patterns:   # whether each matches a module needs the model: apply_recipe
            try:
                re.compile(pattern)
            except re.error as exc:
                return f"{where}: {pattern!r} is not a valid regex ({exc})"
        return None


@dataclass
class DistillConfig:
    """Stage two: train the fake-quantized student."""

    mode: Literal["qad", "qat", "online"] = opt("qad",
        "qad: KL to cached targets; qat: CE on the data only; online: teacher in the loop")
    loss: Literal["forward_kl", "renorm_kl", "reverse_kl", "jsd", "cakld", "mse_logprob", "sampled_ce"] = opt("forward_kl", "distillation loss on the cached targets")
    kd_loss_weight: float = opt(1.0, "weight of the distillation loss", ge=0.0)
    lm_loss_weight: float = opt(0.0, "weight of LM cross-entropy on data tokens", ge=0.0)
    temperature: float = opt(1.0,
        "KD temperature: teacher and student both softened (a top-k cache: their k+1 buckets), the KD "
        "term scaled by its square; 1 = plain KL, what QAD uses", gt=0.0)
    lr: float = opt(1e-5,
        "peak learning rate (~1e-5 when all weights train, as in ModelOpt/Megatron QAD; ~1e-4 when only "
        "quant params train)", gt=0.0)
    weight_decay: float = opt(0.0,
        "AdamW weight decay, on weight matrices only (norms, biases, LSQ steps and clip ratios get none); "
        "QAD starts at the teacher's weights, keep 0 unless you mean to pull them toward 0",
        ge=0.0)
    warmup_steps: int = opt(10, "linear warmup steps", ge=0)
    schedule: Literal["cosine", "linear", "constant"] = opt("cosine", "decay after warmup")
    max_steps: int = opt(100, "optimizer steps", ge=1)
    batch_size: int = opt(4, "sequences per micro-batch per rank", ge=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step", ge=1)
    max_grad_norm: float = opt(1.0, "gradient clipping (0 = off)", ge=0.0)
    trainable: Literal["all", "quant"] = opt("all",
        "all student parameters, or only quantization parameters + norms")
    loss_chunk_tokens: int = opt(1024,
        "positions per chunk of the fp32 loss (bounds memory)", ge=1)
    activation_checkpointing: bool = opt(False,
        "recompute each decoder layer in backward, keeping only its input (about a third more "
        "compute; for sequences or batches whose activations do not fit)")
    seed: int = opt(0, "RNG seed (data order, init)", ge=0, lt=2**32)
    output_dir: str = opt("runs/student", "checkpoints and metrics", nonempty=True, path=True)
    save_every: int = opt(50, "checkpoint every N steps", ge=1)
    save: bool = opt(True, "write the PTQ student, checkpoints and final/ (false: metrics only, for "
                     "throughput runs; nothing to resume or export)")
    save_in_background: bool = opt(True, "each checkpoint is written on a thread while training goes on (the "
                                   "steps wait for the snapshot, not the disk). full: rank 0 writes it, host "
                                   "memory holding one snapshot until written, as a synchronous save does; "
                                   "sharded: every rank writes a host copy of its shards (one more copy of them "
                                   "in host memory, which a synchronous sharded save does not hold; under DDP "
                                   "rank 0 alone, of the whole state)")
    checkpoint_format: Literal["full", "sharded"] = opt(
        "full", "full: rank 0 gathers the state and writes model.safetensors (12 bytes per trained parameter "
        "on its host); sharded: every rank writes its own shards (torch.distributed.checkpoint), nothing gathered "
        "(for students whose state outgrows rank 0's host; export, eval and --resume on any ranks read both)")
    eval_every: int = opt(25, "held-out eval every N steps", ge=1)
    eval_rows: int = opt(16, "cache rows held out for eval", ge=0)
    log_every: int = opt(5, "log line every N steps", ge=1)
    device: str = opt("auto", "auto, cpu, cuda (each process its LOCAL_RANK's GPU), cuda:N (one process)")
    distributed: Literal["ddp", "fsdp2"] = opt("ddp", "strategy under torchrun; fsdp2 also builds the student "
                                               "sharded (rank 0 loads it on the host, each GPU gets its shards)")
    shuffle_buffer: int = opt(256, "cache rows in the seeded shuffle buffer (1 = cache order)", ge=1)
    prefetch_batches: int = opt(2, "micro-batches read and collated ahead by a background thread, pinned "
                                "for the GPU (0 = read in the training loop)", ge=0)
    pack_length: Optional[int] = opt(None,
        "pack each micro-batch's rows into windows of this many tokens (null = pad each row); at least the "
        "cache's longest row (qadpipe inspect); refused for models whose attention would cross rows (OPT, Bloom, "
        "Falcon: probed before training)", ge=2)
    tensorboard: bool = opt(False, "also write TensorBoard events (needs the tensorboard package)")

    def validate(self) -> Optional[str]:
        if self.mode == "online" and self.loss != "forward_kl":
            return (f"loss: got {self.loss!r}, but mode=online trains the full-vocabulary forward KL (the other "
                    "losses are for a cache's targets); expected 'forward_kl'")
        if self.temperature != 1.0 and self.mode == "qat":
            return f"temperature: got {self.temperature}, but mode=qat trains on cross-entropy only; expected 1"
        if self.mode != "qat" and self.kd_loss_weight == 0.0 and self.lm_loss_weight == 0.0:
            return (f"kd_loss_weight and lm_loss_weight: both 0, so mode={self.mode} would train on a zero loss; "
                    "expected one of them > 0")
        if self.temperature != 1.0 and self.mode == "qad" and self.loss == "sampled_ce":
            return (f"temperature: got {self.temperature}, but loss=sampled_ce trains on draws made at "
                    "temperature 1, which cannot be re-tempered; expected 1 (or a top-k cache and loss)")
        if self.temperature != 1.0 and self.mode == "qad" and self.loss == "mse_logprob":
            return (f"temperature: got {self.temperature}, but loss=mse_logprob compares log-probs and has "
                    "no temperature; expected 1")
        return None


@dataclass
class ExportConfig:
    """How the trained student is written for serving."""

    format: Literal["fake", "compressed-tensors"] = opt("compressed-tensors",
        "fake: BF16 weights = dequantized Q(W); compressed-tensors: real packed checkpoint")
    output_dir: str = opt("runs/export", "export directory", nonempty=True, path=True)


@dataclass
class EvalConfig:
    """Held-out evaluation against the teacher."""

    data: Optional[str] = opt(None,
        "held-out data file (read like data.source, same field) or null = the cache's held-out "
        "rows (the first distill.eval_rows, never trained on)", nonempty=True, path=True)
    models: dict[str, str] = opt(factory=dict, help=
        "name -> directory (a distill final/ or ptq/ dir, or any HF checkpoint, e.g. an export); "
        "empty = ptq and qad from distill.output_dir", path=True)
    max_sequences: int = opt(32, "sequences evaluated", ge=1)
    batch_size: int = opt(4, "sequences per forward", ge=1)
    device: str = opt("auto", "auto, cpu, cuda, cuda:N")
    output_dir: str = opt("runs/eval", "report.json, report.md, plots", nonempty=True, path=True)


@dataclass
class PipelineConfig:
    """Everything one run of qadpipe needs; saved next to every output it produces."""

    model: ModelConfig = opt(factory=ModelConfig)
    teacher: TeacherConfig = opt(factory=TeacherConfig)
    data: DataConfig = opt(factory=DataConfig)
    generate: GenerateConfig = opt(factory=GenerateConfig)
    cache: CacheConfig = opt(factory=CacheConfig)
    quant: QuantConfig = opt(factory=QuantConfig)
    distill: DistillConfig = opt(factory=DistillConfig)
    export: ExportConfig = opt(factory=ExportConfig)
    eval: EvalConfig = opt(factory=EvalConfig)

    @property
    def teacher_path(self) -> str:
        return self.teacher.path or self.model.path

    @property
    def teacher_field(self) -> str:
        """The config field :attr:`teacher_path` comes from (what an error about it names)."""
        return "teacher.path" if self.teacher.path else "model.path"
