"""The distill recipe end to end on a tiny model: it learns, it writes what export reads,
its modes mean what they say, and every bad input is one line with exit code 2."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from cache_rows import cache_meta, random_rows, write_cache
from qadpipe.cli import cli
from qadpipe.config import load_config

from distill_fixtures import make_cache, metrics, settings


def distill(model_dir: Path, cache: Path, out: Path, *extra: str, resume: bool = False):
    args = ["distill", *[a for s in settings(model_dir, cache, f"distill.output_dir={out}", *extra)
                         for a in ("--set", s)]]
    return CliRunner().invoke(cli, args + (["--resume"] if resume else []))


def train_rows(out: Path) -> list[dict]:
    return [row for row in metrics(out) if "loss" in row]


def eval_rows(out: Path) -> list[dict]:
    return [row for row in metrics(out) if "eval_kl" in row]


def test_qad_lowers_held_out_kl_and_writes_a_loadable_final_student(peaky_llama_dir, topk_cache, tmp_path):
    result = distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=6", "distill.eval_every=3")
    assert result.exit_code == 0, result.output
    assert "held-out tail-bucket KL vs cache" in result.output   # what eval calls it, not its full KL
    evals = eval_rows(tmp_path)
    assert [r["tag"] for r in evals] == ["ptq", "eval", "eval"] and [r["step"] for r in evals] == [0, 3, 6]
    assert evals[-1]["eval_kl"] < 0.9 * evals[0]["eval_kl"], evals
    assert 0 < evals[0]["eval_topk_mass_student"] <= 1 and 0 < evals[0]["eval_topk_mass_teacher"] <= 1
    rows = train_rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(r["tokens_per_s"] > 0 and r["mem_gib"] > 0 and 0 <= r["top1"] <= 1 for r in rows)
    # final/ rebuilds into the trained student: same tensors, quantizer state included
    from qadpipe.distill.student import is_student_dir, load_final_student

    model, config = load_final_student(tmp_path / "final")
    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "QuantLinear"
    for name, tensor in saved.items():
        torch.testing.assert_close(model.state_dict()[name], tensor)
    assert config.distill.max_steps == 6
    original = load_file(str(next(peaky_llama_dir.glob("*.safetensors"))))
    assert not torch.equal(saved["model.layers.0.mlp.up_proj.weight"], original["model.layers.0.mlp.up_proj.weight"])
    # ptq/ = the calibrated student before training, same layout (what qadpipe eval calls PTQ)
    assert is_student_dir(tmp_path / "ptq") and is_student_dir(tmp_path / "final")
    assert not is_student_dir(peaky_llama_dir)
    ptq = load_file(str(tmp_path / "ptq" / "model.safetensors"))
    torch.testing.assert_close(ptq["model.layers.0.mlp.up_proj.weight"], original["model.layers.0.mlp.up_proj.weight"])


def test_save_false_trains_the_same_and_writes_metrics_only(peaky_llama_dir, topk_cache, tmp_path):
    """Throughput runs of a large student would write tens of GB (ptq/, a checkpoint, final/)."""
    kept = distill(peaky_llama_dir, topk_cache, tmp_path / "kept", "distill.max_steps=3")
    bare = distill(peaky_llama_dir, topk_cache, tmp_path / "bare", "distill.max_steps=3", "distill.save=false")
    assert kept.exit_code == 0 and bare.exit_code == 0, bare.output
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == ["metrics.jsonl", "qadpipe_run.yaml"]
    assert {"ptq", "final", "checkpoints"} <= {p.name for p in (tmp_path / "kept").iterdir()}
    assert [r["loss"] for r in train_rows(tmp_path / "bare")] == [r["loss"] for r in train_rows(tmp_path / "kept")]
    assert bare.output.strip().endswith("nothing saved (distill.save=false)")


def test_qat_trains_on_data_cross_entropy_only_and_final_keeps_calibrated_quantizer_state(
        peaky_llama_dir, topk_cache, tmp_path):
    result = distill(peaky_llama_dir, topk_cache, tmp_path, "distill.mode=qat", "distill.max_steps=2",
                     "quant.preset=nvfp4_a16", "quant.group_size=null", "quant.calibration_batches=1")
    assert result.exit_code == 0, result.output
    for row in train_rows(tmp_path):
        assert row["loss"] == pytest.approx(row["ce"], rel=1e-9)
        assert "kl" not in row and "top1" not in row   # qat batches carry no cache targets to score
    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    amax = saved["model.layers.0.mlp.up_proj.weight_quantizer.amax"]
    assert torch.isfinite(amax).all() and (amax > 0).all()


@pytest.mark.slow
def test_online_full_kl_bounds_the_cached_tail_bucket_kl_from_above(peaky_llama_dir, topk_cache, tmp_path):
    """Same first batch, same starting student: the full-vocab KL (teacher in the loop) is
    at least the k+1-bucket KL on the cache, which is a coarsening of it."""
    first = {}
    for mode in ("qad", "online"):
        out = tmp_path / mode
        result = distill(peaky_llama_dir, topk_cache, out, f"distill.mode={mode}", "distill.max_steps=1")
        assert result.exit_code == 0, result.output
        first[mode] = train_rows(out)[0]["kl"]
    assert first["online"] >= first["qad"] > 0


@pytest.mark.parametrize("fp32_head", [True, False])
def test_online_targets_follow_teacher_fp32_head(peaky_llama_dir, topk_cache, tmp_path, monkeypatch, fp32_head):
    """A bf16 teacher in the loop computes its LM head as generate's HF backend does: fp32
    logits from the bf16 weights with teacher.fp32_head (the default), so online targets are
    the distribution a cache would hold, not bf16-rounded logits."""
    import qadpipe.distill.head_loss as head_loss

    chunk_loss, seen = head_loss._chunk_loss, []

    def recording(logits, targets, spec, teacher_logits, stats):
        if teacher_logits is not None:
            seen.append((targets.teacher_hidden, teacher_logits))
        return chunk_loss(logits, targets, spec, teacher_logits, stats)

    monkeypatch.setattr(head_loss, "_chunk_loss", recording)
    result = distill(peaky_llama_dir, topk_cache, tmp_path, "distill.mode=online", "distill.max_steps=1",
                     "teacher.dtype=bfloat16", f"teacher.fp32_head={str(fp32_head).lower()}")
    assert result.exit_code == 0, result.output
    head = load_file(str(peaky_llama_dir / "model.safetensors"))["lm_head.weight"].to(torch.bfloat16)
    hidden, logits = seen[0]
    assert hidden.dtype == torch.bfloat16
    if fp32_head:
        assert logits.dtype == torch.float32 and torch.equal(logits, hidden.float() @ head.float().t())
    else:
        assert torch.equal(logits, (hidden @ head.t()).float())


def test_online_teacher_runs_in_its_own_dtype_outside_the_students_autocast(peaky_llama_dir, topk_cache, tmp_path,
                                                                           monkeypatch):
    """On a GPU the student trains under bf16 autocast; the teacher in the loop must not (a
    float32 teacher's targets would come from bf16 matmuls, not the cache's distribution; a
    float16 one's hidden states come out float32 and its head fails).  CPU stands in for CUDA
    by forcing the student's autocast on."""
    import qadpipe.distill.trainer as trainer

    monkeypatch.setattr(trainer.DistillRecipe, "_autocast", lambda self: torch.autocast("cpu", dtype=torch.bfloat16))
    split, under_autocast = trainer.split_lm, []

    def spying(model):
        base, head = split(model)
        base.register_forward_pre_hook(lambda module, args: under_autocast.append(torch.is_autocast_enabled("cpu")))
        return base, head

    monkeypatch.setattr(trainer, "split_lm", spying)
    result = distill(peaky_llama_dir, topk_cache, tmp_path, "distill.mode=online", "distill.max_steps=1",
                     "teacher.dtype=float16", "teacher.fp32_head=false")
    assert result.exit_code == 0, result.output
    assert under_autocast and not any(under_autocast)


def test_qat_says_which_loss_fields_it_does_not_use(peaky_llama_dir, topk_cache, tmp_path, caplog):
    """A shared YAML flipped to qat for the baseline keeps its KD fields (kd_loss_weight=0
    included, which for qad would be a zero loss): they are said to go unused, not refused."""
    with caplog.at_level("WARNING", logger="qadpipe.distill.trainer"):
        result = distill(peaky_llama_dir, topk_cache, tmp_path / "qat", "distill.mode=qat", "distill.loss=reverse_kl",
                         "distill.kd_loss_weight=0", "distill.max_steps=1", "distill.save=false")
    assert result.exit_code == 0, result.output
    assert ("distill.mode=qat trains on the data's cross-entropy alone, unweighted: distill.loss=reverse_kl, "
            "distill.kd_loss_weight=0.0 not used") in caplog.text


@pytest.mark.parametrize("learnable", ["none", "lsq"])
def test_trainable_quant_says_what_trains(peaky_llama_dir, topk_cache, tmp_path, caplog, learnable):
    """Without learnable scales trainable=quant trains the norms alone, and weight decay (on
    matrices only) has nothing to act on: both said, not left to be found in the results."""
    with caplog.at_level("INFO", logger="qadpipe.distill.trainer"):
        result = distill(peaky_llama_dir, topk_cache, tmp_path, "distill.trainable=quant", "distill.max_steps=1",
                         f"quant.learnable={learnable}", "distill.weight_decay=0.1")
    assert result.exit_code == 0, result.output
    steps = int(caplog.text.split("distill.trainable=quant: ")[1].split(" quantizer values")[0])
    assert (steps == 0) == (learnable == "none")
    assert ("only the norms train" in caplog.text) == (learnable == "none")
    assert "distill.weight_decay=0.1 does nothing with distill.trainable=quant" in caplog.text


@pytest.mark.parametrize("warmup, decays", [(0, True), (1, False)])
def test_a_warmup_that_leaves_no_decay_is_said(peaky_llama_dir, topk_cache, tmp_path, caplog, warmup, decays):
    """The decay starts the step after warmup: warmup_steps = max_steps - 1 trains its last
    step at the peak and never decays (longer warmups: the test below)."""
    with caplog.at_level("WARNING", logger="qadpipe.distill.trainer"):
        result = distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=2",
                         f"distill.warmup_steps={warmup}", "distill.save=false")
    assert result.exit_code == 0, result.output
    assert ("the lr never decays" in caplog.text) != decays


def test_cakld_beta_is_measured_on_training_rows_only(peaky_llama_dir, topk_cache, tmp_path, caplog):
    """β (the teacher's mean top-1 probability) is read from the first training rows: the
    held-out rows the eval scores stay unread by training."""
    from qadpipe.cache import CacheReader

    with caplog.at_level("INFO", logger="qadpipe.distill.trainer"):
        result = distill(peaky_llama_dir, topk_cache, tmp_path, "distill.loss=cakld", "distill.max_steps=1",
                         "distill.save=false")
    assert result.exit_code == 0, result.output
    rows = list(CacheReader(str(topk_cache)).iter_sequences())[4:]   # distill.eval_rows=4
    expected = np.concatenate([np.exp(r.topk_logprobs[:, 0].astype(np.float64)) for r in rows[:64]]).mean()
    assert f"cakld: beta = {expected:.4f} (teacher's mean top-1 probability over {min(len(rows), 64)} training " \
           "rows)" in caplog.text


@pytest.mark.slow
def test_sampled_cache_trains_with_sampled_ce(peaky_llama_dir, sampled_cache, tmp_path):
    result = distill(peaky_llama_dir, sampled_cache, tmp_path, "distill.loss=sampled_ce", "distill.max_steps=2")
    assert result.exit_code == 0, result.output
    assert all(np.isfinite(r["loss"]) for r in train_rows(tmp_path))


@pytest.mark.slow
def test_packed_batches_give_the_padded_loss(peaky_llama_dir, topk_cache, tmp_path, monkeypatch):
    import qadpipe.distill.trainer as trainer
    from qadpipe.distill.collate import collate

    layouts = []    # (rows, windows, packed) of each training micro-batch

    def spy(rows, **kwargs):
        batch = collate(rows, **kwargs)
        if "pack_length" in kwargs:          # training batches (eval batches are never packed)
            layouts.append((len(rows), batch.input_ids.shape[0], batch.position_ids is not None))
        return batch

    monkeypatch.setattr(trainer, "collate", spy)
    losses, packed_layouts = {}, {}
    for name, extra in (("padded", []), ("packed", ["distill.pack_length=64"])):
        out = tmp_path / name
        layouts.clear()
        result = distill(peaky_llama_dir, topk_cache, out, "distill.max_steps=1", *extra)
        assert result.exit_code == 0, result.output
        losses[name] = [r["loss"] for r in train_rows(out)]
        packed_layouts[name] = list(layouts)
    assert packed_layouts["padded"] and all(windows == rows and not packed
                                            for rows, windows, packed in packed_layouts["padded"])
    # the packed run laid several rows into one window: the comparison is not padded against padded
    assert packed_layouts["packed"] and all(windows < rows and packed for rows, windows, packed in packed_layouts["packed"])
    np.testing.assert_allclose(losses["packed"], losses["padded"], rtol=1e-4)


def test_activation_percentile_sets_the_ptq_input_ranges(peaky_llama_dir, topk_cache, tmp_path):
    """quant.activation_percentile was accepted and never passed to calibration: the PTQ
    ranges were the max whatever it said."""
    amax = {}
    for percentile in ("null", "50"):
        out = tmp_path / percentile
        result = distill(peaky_llama_dir, topk_cache, out, "distill.max_steps=1", "quant.preset=fp8_static", "quant.group_size=null",
                         f"quant.activation_percentile={percentile}")
        assert result.exit_code == 0, result.output
        ptq = load_file(str(out / "ptq" / "model.safetensors"))
        amax[percentile] = ptq["model.layers.0.mlp.down_proj.input_quantizer.amax"]
    assert amax["50"] < 0.8 * amax["null"]


def test_static_input_ranges_with_no_calibration_batches_is_one_line_and_saves_no_ptq(peaky_llama_dir, topk_cache,
                                                                                    tmp_path):
    """The trainer used to skip calibration at 0 batches and save ptq/ with every amax at 0."""
    line = one_line_error(distill(peaky_llama_dir, topk_cache, tmp_path, "quant.preset=fp8_static",
                                  "quant.group_size=null", "quant.calibration_batches=0"))
    assert "quant.calibration_batches: got 0, but 14 static input quantizers need at least 1 batch" in line
    assert not (tmp_path / "ptq").exists()


def test_more_calibration_batches_than_the_rows_make_calibrate_on_one_pass_and_say_so(peaky_llama_dir, topk_cache,
                                                                                        tmp_path, caplog):
    """The calibration loader cycled epochs: a large count repeated rows silently, keeping every
    batch on the device, and a weight-only recipe (nothing to calibrate) loaded them all first."""
    with caplog.at_level(logging.INFO):
        result = distill(peaky_llama_dir, topk_cache, tmp_path / "static", "quant.preset=fp8_static",
                         "quant.group_size=null", "quant.calibration_batches=100000", "distill.max_steps=1")
    assert result.exit_code == 0, result.output
    made = re.search(r"quant.calibration_batches=100000: the training rows make (\d+) batches of 4; calibrating on "
                     r"those", caplog.text)
    assert made and f"calibrate: 14 static input ranges from {made.group(1)} batches" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        weight_only = distill(peaky_llama_dir, topk_cache, tmp_path / "weights", "quant.calibration_batches=100000",
                              "distill.max_steps=1")
    assert weight_only.exit_code == 0, weight_only.output
    assert "calibrate: no static input quantizer in this recipe; nothing to calibrate" in caplog.text
    assert "the training rows make" not in caplog.text   # no batch was read for it


def test_a_fused_group_quantized_in_part_is_refused_before_training_unless_the_export_is_fake(peaky_llama_dir,
                                                                                               topk_cache, tmp_path):
    """It trained with a warning, then the compressed-tensors export refused the student."""
    partial = ("quant.preset=w4a16_int", "quant.group_size=32", "quant.ignore=[lm_head, 'layers\\.0\\..*k_proj']")
    line = one_line_error(distill(peaky_llama_dir, topk_cache, tmp_path / "ct", *partial))
    assert ("quant: model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj, model.layers.0.self_attn.v_proj "
            "are fused by vLLM into one GEMM, but the recipe quantizes only some of them") in line
    assert not (tmp_path / "ct" / "ptq").exists()
    fake = distill(peaky_llama_dir, topk_cache, tmp_path / "fake", *partial, "export.format=fake", "distill.max_steps=1")
    assert fake.exit_code == 0, fake.output


def test_weight_groups_no_vllm_gpu_kernel_takes_are_said_before_training(peaky_llama_dir, topk_cache, tmp_path,
                                                                         caplog):
    """int4 in groups of 16 trains, exports and serves on vLLM-CPU, but no vLLM GPU kernel takes
    it: the export said so after the hours of training, now distill says it first."""
    with caplog.at_level(logging.INFO):
        result = distill(peaky_llama_dir, topk_cache, tmp_path / "g16", "quant.preset=w4a16_int",
                         "quant.group_size=16", "distill.max_steps=1", "distill.save=false")
    assert result.exit_code == 0, result.output
    lines = [r.getMessage() for r in caplog.records]
    said = [i for i, line in enumerate(lines) if "in groups of 16" in line]
    assert len(said) == 1 and lines[said[0]].startswith("quant.group_size: pack-quantized int4 in groups of 16: vLLM "
                                                        "0.32's GPU kernels for grouped int weights")
    assert said[0] < min(i for i, line in enumerate(lines) if line.startswith("ptq"))   # before the PTQ eval


def test_each_logged_lr_is_the_one_its_step_used(peaky_llama_dir, topk_cache, tmp_path):
    """Linear schedule, peak 1e-4, 2 warmup steps of 4, by hand: 0.5, 1, 1 (decay starts), 0.5."""
    result = distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=4", "distill.warmup_steps=2",
                     "distill.schedule=linear", "distill.save=false", "distill.eval_every=100")
    assert result.exit_code == 0, result.output
    assert [row["lr"] for row in train_rows(tmp_path)] == pytest.approx([5e-5, 1e-4, 1e-4, 5e-5], rel=1e-12)


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("qadpipe: error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_refuses_a_cache_from_another_tokenizer(peaky_llama_dir, tmp_path):
    cache = write_cache(tmp_path / "cache", cache_meta(tokenizer_fingerprint="sha256:other"),
                        random_rows(cache_meta(), 8))
    line = one_line_error(distill(peaky_llama_dir, cache, tmp_path / "runs" / "a" / "out"))
    assert "tokenizer_fingerprint='sha256:other'" in line and "expects tokenizer_fingerprint='sha256:" in line
    assert not (tmp_path / "runs").exists()   # a refused run leaves no (empty) output directories behind


def test_a_refused_run_removes_only_its_own_directories(peaky_llama_dir, tmp_path, monkeypatch):
    """Jobs of a sweep start under one new parent: a refused one must leave the directory a
    sibling made meanwhile (still empty while its model loads)."""
    from qadpipe.distill import trainer

    cache = write_cache(tmp_path / "cache", cache_meta(tokenizer_fingerprint="sha256:other"),
                        random_rows(cache_meta(), 8))
    load_tokenizer = trainer.DistillRecipe._load_tokenizer

    def sibling_starts_meanwhile(self):
        (tmp_path / "runs" / "sweep" / "b").mkdir()
        return load_tokenizer(self)

    monkeypatch.setattr(trainer.DistillRecipe, "_load_tokenizer", sibling_starts_meanwhile)
    one_line_error(distill(peaky_llama_dir, cache, tmp_path / "runs" / "sweep" / "a"))
    assert sorted(p.name for p in (tmp_path / "runs" / "sweep").iterdir()) == ["b"]


def test_refuses_fp16_training_on_cuda_without_touching_the_gpu(peaky_llama_dir, topk_cache, tmp_path, monkeypatch):
    """fp16 autocast without loss scaling underflows gradients; refused before any model loads
    (the device is faked: the check runs before anything touches it)."""
    from qadpipe.distill import trainer

    monkeypatch.setattr(trainer.dist_utils, "init_distributed",
                        lambda device: trainer.dist_utils.DistEnv(0, 1, 0, torch.device("cuda", 0)))
    line = one_line_error(distill(peaky_llama_dir, topk_cache, tmp_path / "out", "model.dtype=float16"))
    assert line == ("qadpipe: error: model.dtype: float16 on CUDA would train without loss scaling (gradients "
                    "underflow in fp16); expected bfloat16 or float32")
    assert not (tmp_path / "out").exists()


def test_refuses_a_cache_without_the_loss_target_kind(peaky_llama_dir, sampled_cache, tmp_path):
    line = one_line_error(distill(peaky_llama_dir, sampled_cache, tmp_path / "out"))
    assert "cache holds sampled targets, but distill.loss=forward_kl needs topk targets" in line


def test_online_without_a_cache_refuses_generate_mode_before_loading_models(peaky_llama_dir, tmp_path):
    """Without a cache online mode reads data.source; in generate mode those are prompts with no
    answers: it trained on prompt positions alone, or (include_prompt false) failed at step 1."""
    line = one_line_error(distill(peaky_llama_dir, tmp_path / "no-cache", tmp_path / "out", "distill.mode=online",
                                  "generate.mode=generate", "generate.include_prompt=false"))
    assert line.startswith("qadpipe: error: distill.mode=online with no cache at"), line
    assert "generate.mode=generate makes them prompts without answers" in line


@pytest.mark.parametrize("teacher", ["padded vocab", "other tokenizer"])
def test_online_refuses_a_teacher_that_reads_tokens_otherwise(peaky_llama_dir, topk_cache, tmp_path, teacher):
    """Online, the KL compares teacher and student id by id: a padded head (Qwen2.5's 152064 rows
    against 151936) or another tokenizer is refused before training, in one line."""
    from qadpipe.models import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(str(peaky_llama_dir), dtype="float32"), load_tokenizer(str(peaky_llama_dir))
    if teacher == "padded vocab":
        model.resize_token_embeddings(49152 + 64)
    else:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|teacher_only|>"]})
    model.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    line = one_line_error(distill(peaky_llama_dir, topk_cache, tmp_path / "out", "distill.mode=online",
                                  f"teacher.path={tmp_path / 'teacher'}"))
    expected = (f"has 49216 output logits, the student {peaky_llama_dir} 49152" if teacher == "padded vocab" else
                f"has another tokenizer than the student {peaky_llama_dir}")
    assert line.startswith(f"qadpipe: error: teacher.path: {tmp_path / 'teacher'} {expected}"), line
    assert not (tmp_path / "out" / "ptq").exists()


def test_grad_accum_weights_micro_batches_by_their_target_positions(peaky_llama_dir, tmp_path):
    """Two micro-batches of 1 row must give the step one batch of both rows gives: each
    position weighs the same, however the rows are split (a per-micro-batch mean would give
    a short row's positions the weight of a long row's)."""
    from qadpipe.models import load_tokenizer, tokenizer_fingerprint

    meta = cache_meta(tokenizer_fingerprint=tokenizer_fingerprint(load_tokenizer(str(peaky_llama_dir))),
                      vocab_size=49152)
    short, long = random_rows(meta, 4, seq_len=6, prefix="short"), random_rows(meta, 4, seq_len=40, prefix="long")
    cache = write_cache(tmp_path / "cache", meta, [row for pair in zip(short, long) for row in pair])
    common = ("distill.max_steps=2", "distill.eval_rows=0", "distill.shuffle_buffer=1", "distill.save=false")
    figures = {}
    for batch, accum in ((2, 1), (1, 2)):
        out = tmp_path / f"{batch}x{accum}"
        result = distill(peaky_llama_dir, cache, out, *common, f"distill.batch_size={batch}",
                         f"distill.grad_accum={accum}")
        assert result.exit_code == 0, result.output
        figures[batch] = [(row["loss"], row["grad_norm"]) for row in train_rows(out)]
    np.testing.assert_allclose(figures[1], figures[2], rtol=1e-5)


def test_refuses_a_student_whose_vocab_differs_from_the_cache(peaky_llama_dir, topk_cache, tmp_path):
    from qadpipe.models import load_tokenizer, tokenizer_fingerprint

    meta = cache_meta(tokenizer_fingerprint=tokenizer_fingerprint(load_tokenizer(str(peaky_llama_dir))),
                      vocab_size=50000)
    cache = write_cache(tmp_path / "cache", meta, random_rows(meta, 8))
    line = one_line_error(distill(peaky_llama_dir, cache, tmp_path / "out"))
    assert "cache vocab_size=50000, but the student" in line and "has 49152 output logits" in line


def test_a_diverged_update_is_never_saved_and_the_run_resumes_with_a_lower_lr(peaky_llama_dir, topk_cache,
                                                                             tmp_path):
    """An update that wrecks the weights (lr 1e30) leaves its own step's loss finite: only the
    next one is NaN.  The weights are scored before every save, so the checkpoint the error
    calls good is one --resume can continue from, with the lr the error advises."""
    common = ("distill.warmup_steps=0", "distill.save_every=1")
    assert distill(peaky_llama_dir, topk_cache, tmp_path, *common, "distill.max_steps=2").exit_code == 0
    line = one_line_error(distill(peaky_llama_dir, topk_cache, tmp_path, *common, "distill.max_steps=4",
                                  "distill.lr=1e30", "distill.max_grad_norm=0", resume=True))
    good = tmp_path / "checkpoints" / "step-00000002"
    assert line == (f"qadpipe: error: step 3: the weights after this step's update give a loss on its last "
                    f"micro-batch of nan; not saved, the last good checkpoint is {good}; lower distill.lr (or set "
                    "distill.max_grad_norm) and --resume from it, or check the cache for broken targets")
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == good.name
    resumed = distill(peaky_llama_dir, topk_cache, tmp_path, *common, "distill.max_steps=4", resume=True)
    assert resumed.exit_code == 0, resumed.output
    # with no checkpoint yet, nothing to resume "from": the advice says --resume starts again
    line = one_line_error(distill(peaky_llama_dir, topk_cache, tmp_path / "fresh", "distill.warmup_steps=0",
                                  "distill.max_steps=4", "distill.lr=1e30", "distill.max_grad_norm=0"))
    assert line.endswith("no checkpoint was written before it; lower distill.lr (or set distill.max_grad_norm) and "
                         "rerun with --resume (it starts from step 0), or check the cache for broken targets")
    assert [row["step"] for row in train_rows(tmp_path)] == [1, 2, 3, 4]
    state = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in state.values())


def test_the_check_before_a_save_leaves_the_random_stream_alone(peaky_llama_dir, topk_cache, tmp_path):
    """The weights are scored before each save with the student in train mode: with dropout
    that forward draws random numbers, which must not shift the next steps' (a run that saves
    every step, or is stopped and resumed, trains as one that does not)."""
    from qadpipe.models import load_causal_lm, load_tokenizer

    student = load_causal_lm(str(peaky_llama_dir), dtype="float32")
    student.config.attention_dropout = 0.2
    student.save_pretrained(tmp_path / "dropout")
    load_tokenizer(str(peaky_llama_dir)).save_pretrained(tmp_path / "dropout")
    losses = {}
    for every in (100, 1):
        result = distill(tmp_path / "dropout", topk_cache, tmp_path / f"save-every-{every}", "distill.max_steps=4",
                         f"distill.save_every={every}")
        assert result.exit_code == 0, result.output
        losses[every] = [row["loss"] for row in train_rows(tmp_path / f"save-every-{every}")]
    assert losses[1] == losses[100]


def test_non_finite_weights_no_batch_reads_are_not_saved(peaky_llama_dir, topk_cache, tmp_path, monkeypatch):
    """An embedding row of a token no batch holds leaves every loss finite: the weights
    themselves are checked before a save."""
    from qadpipe.cache import CacheReader
    from qadpipe.distill import trainer

    seen = {int(t) for row in CacheReader(str(topk_cache)).iter_sequences() for t in row.input_ids}
    unused = next(token for token in range(49152) if token not in seen)
    step = trainer.DistillRecipe._train_step

    def then_poison(self, micro, window):
        step(self, micro, window)
        with torch.no_grad():
            self.model.student.get_input_embeddings().weight[unused] = float("nan")

    monkeypatch.setattr(trainer.DistillRecipe, "_train_step", then_poison)
    line = one_line_error(distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=2"))
    assert line.startswith("qadpipe: error: step 2: the weights after this step's update hold non-finite values; "
                           "not saved, no checkpoint was written before it;"), line
    assert not (tmp_path / "final").exists()


def test_a_run_whose_last_update_diverged_writes_no_final_student(peaky_llama_dir, topk_cache, tmp_path):
    result = distill(peaky_llama_dir, topk_cache, tmp_path, "distill.lr=1e30", "distill.warmup_steps=0",
                     "distill.max_grad_norm=0", "distill.max_steps=1")
    line = one_line_error(result)
    assert line.startswith("qadpipe: error: step 1: the weights after this step's update give a") and \
        "no checkpoint was written before it" in line, line
    assert not (tmp_path / "final").exists() and not (tmp_path / "checkpoints" / "LATEST").exists()

    def refuse(constant: str) -> None:
        raise AssertionError(f"metrics.jsonl holds {constant}, which is not JSON")

    rows = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["eval_kl"] for row in rows if row.get("tag") == "eval"] == [None]   # the held-out KL was NaN


def test_a_non_finite_training_loss_stops_naming_the_last_checkpoint(peaky_llama_dir, topk_cache, tmp_path,
                                                                     monkeypatch):
    """A loss that is NaN before any update (broken targets) stops the step unsaved."""
    from qadpipe.distill.student import StudentLoss

    forward, calls = StudentLoss.forward, []

    def nan_at_step_4(self, *args, **kwargs):
        loss_sum, stats = forward(self, *args, **kwargs)
        calls.append(torch.is_grad_enabled())   # training forwards only
        return (loss_sum * float("nan"), stats) if calls.count(True) == 4 else (loss_sum, stats)

    monkeypatch.setattr(StudentLoss, "forward", nan_at_step_4)
    line = one_line_error(distill(peaky_llama_dir, topk_cache, tmp_path, "distill.save_every=2",
                                  "distill.max_steps=6", "distill.grad_accum=1"))
    good = tmp_path / "checkpoints" / "step-00000002"
    assert line == (f"qadpipe: error: step 4: training loss is nan (not finite); stopped without saving this step, "
                    f"the last good checkpoint is {good}; lower distill.lr (or set distill.max_grad_norm) and "
                    "--resume from it, or check the cache for broken targets")


def test_out_of_memory_is_one_line_naming_the_knobs_and_the_kept_checkpoint(peaky_llama_dir, topk_cache, tmp_path,
                                                                            monkeypatch):
    from qadpipe.distill.student import StudentLoss

    forward, calls = StudentLoss.forward, []

    def runs_out_at_step_3(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        if sum(calls) == 3:   # training forwards only (not the evals, nor the check of the weights before a save)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 79.19 GiB of which 1.2 GiB is free.\nmore detail")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(StudentLoss, "forward", runs_out_at_step_3)
    result = distill(peaky_llama_dir, topk_cache, tmp_path, "distill.save_every=1", "distill.max_steps=5",
                     "distill.grad_accum=1")
    line = one_line_error(result)
    latest = tmp_path / "checkpoints" / "step-00000002"
    assert line == (f"qadpipe: error: step 3: out of memory on cpu with micro-batches of 4 x 24 tokens (CUDA out of "
                    "memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.2 GiB is "
                    f"free.); the last checkpoint is {latest}; try distill.activation_checkpointing=true or a smaller "
                    "distill.loss_chunk_tokens (now 32) or distill.distributed=fsdp2 under torchrun or a smaller "
                    "distill.batch_size with a larger distill.grad_accum (now 4 x 1: keep the product); --resume "
                    "accepts each")
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == latest.name
    monkeypatch.setattr(StudentLoss, "forward", forward)   # what the line says --resume accepts, it does
    resumed = distill(peaky_llama_dir, topk_cache, tmp_path, "distill.save_every=1", "distill.max_steps=5",
                      "distill.grad_accum=2", "distill.batch_size=2", "distill.activation_checkpointing=true",
                      "distill.loss_chunk_tokens=16", resume=True)
    assert resumed.exit_code == 0, resumed.output
    assert [row["step"] for row in train_rows(tmp_path)] == [1, 2, 3, 4, 5]


def test_resume_with_another_batch_says_how_many_rows_a_step_takes(peaky_llama_dir, topk_cache, tmp_path, caplog):
    """grad_accum alone changes the global batch without moving the loader: said all the same;
    with another batch_size the loader shares out the rows left, and says that too."""
    assert distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=2", "distill.save_every=1").exit_code == 0
    with caplog.at_level("WARNING", logger="qadpipe.distill.trainer"):
        assert distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=3", "distill.save_every=1",
                       "distill.grad_accum=2", resume=True).exit_code == 0
    assert "--resume: a step now takes 8 rows (distill.batch_size x grad_accum x ranks: 4 x 2 x 1), step-00000002 " \
           "took 4" in caplog.text
    assert "micro-batches" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="qadpipe.distill.trainer"):
        assert distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=4", "distill.save_every=1",
                       "distill.grad_accum=4", "distill.batch_size=2", resume=True).exit_code == 0
    assert "--resume: step-00000003 was saved by 1 rank(s) of 4-row micro-batches, this run has 1 of 2" in caplog.text
    assert "a step now takes" not in caplog.text
    assert [row["step"] for row in train_rows(tmp_path)] == [1, 2, 3, 4]


def test_a_resume_inside_the_rows_another_batch_size_left_continues_exactly(peaky_llama_dir, topk_cache, tmp_path):
    """A run moved to batches of 2 is itself stopped and resumed: its checkpoint's loader
    position (inside the rows the batches of 4 left) survives the checkpoint round trip, and
    the run goes on as the one never stopped does, loss for loss (a constant lr: stopping at
    another max_steps does not change it)."""
    base = ["distill.save_every=1", "distill.eval_rows=0", "distill.schedule=constant", "distill.warmup_steps=0"]
    assert distill(peaky_llama_dir, topk_cache, tmp_path / "a", *base, "distill.max_steps=2").exit_code == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    moved = [*base, "distill.batch_size=2", "distill.grad_accum=2"]
    assert distill(peaky_llama_dir, topk_cache, tmp_path / "a", *moved, "distill.max_steps=5",
                   resume=True).exit_code == 0
    assert distill(peaky_llama_dir, topk_cache, tmp_path / "b", *moved, "distill.max_steps=3",
                   resume=True).exit_code == 0
    assert distill(peaky_llama_dir, topk_cache, tmp_path / "b", *moved, "distill.max_steps=5",
                   resume=True).exit_code == 0
    straight, stopped = train_rows(tmp_path / "a"), train_rows(tmp_path / "b")
    assert [row["step"] for row in stopped] == [1, 2, 3, 4, 5]
    assert [row["loss"] for row in stopped] == [row["loss"] for row in straight]


def test_resume_refuses_a_checkpoint_of_another_recipe(peaky_llama_dir, topk_cache, tmp_path, caplog):
    assert distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=2", "distill.save_every=1").exit_code == 0
    line = one_line_error(distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=4",
                                  "distill.kd_loss_weight=0.5", resume=True))
    assert "--resume of a checkpoint written with another config (distill.kd_loss_weight differ)" in line
    # Only a longer schedule: resumes, and follows the new horizon from its first step.  Cosine,
    # lr 1e-4, warmup 1: step 3 trains at multiplier(2) -- 0 when the decay ended at step 2,
    # (1 + cos(pi/2)) / 2 = half the peak with 3 steps.
    assert distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=3", "distill.save_every=1",
                   resume=True).exit_code == 0
    assert ("distill.max_steps changed from 2 to 3, so the cosine schedule is recomputed: the lr of step 3 is "
            "5e-05 (the checkpoint's schedule gave 0)") in caplog.text
    assert train_rows(tmp_path)[-1]["step"] == 3
    # the records' config is the resume's (max_steps 3): the history says what steps 1-2 ran with
    for record_dir in (tmp_path, tmp_path / "final", tmp_path / "checkpoints" / "step-00000003"):
        record = yaml.safe_load((record_dir / "qadpipe_run.yaml").read_text())
        assert record["config"]["distill"]["max_steps"] == 3
        assert [{k: v for k, v in entry.items() if k != "at"} for entry in record["resumes"]] == [
            {"checkpoint": "step-00000002", "step": 2, "changed": {"distill.max_steps": [2, 3]}}]


def test_a_resumed_cpu_run_holds_no_map_of_the_checkpoint_it_resumed(peaky_llama_dir, topk_cache, tmp_path,
                                                                    monkeypatch):
    """Loaded on CPU, AdamW's moments stayed views of trainer_state.pt's memory map for the whole
    run: pruning the checkpoint later freed no disk space (on NFS it left .nfs files)."""
    from qadpipe.distill import trainer

    assert distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=2", "distill.save_every=1").exit_code == 0
    train, mapped = trainer.DistillRecipe.train, []

    def train_noting_maps(self):
        maps = Path("/proc/self/maps").read_text()
        mapped.extend(line.split()[-1] for line in maps.splitlines() if str(tmp_path) in line)
        return train(self)

    monkeypatch.setattr(trainer.DistillRecipe, "train", train_noting_maps)
    resumed = distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=3", "distill.save_every=1", resume=True)
    assert resumed.exit_code == 0, resumed.output
    assert mapped == []


def test_resume_ignores_the_settings_of_other_stages_in_a_shared_config(peaky_llama_dir, topk_cache, tmp_path):
    """stages/distill.sbatch always passes --resume, and one YAML serves every stage: editing
    generate's, the cache writer's, eval's or a teacher-in-the-loop's settings (none of which a
    run on a cache reads) must not strand the requeued job."""
    assert distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=2", "distill.save_every=1").exit_code == 0
    resumed = distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=3", "teacher.kv_cache_gib=2",
                      "teacher.batch_size=7", "teacher.dtype=bfloat16", "generate.seed=5", "cache.rows_per_shard=9",
                      "eval.max_sequences=3", "data.max_length=16", resume=True)
    assert resumed.exit_code == 0, resumed.output
    assert train_rows(tmp_path)[-1]["step"] == 3


def test_resume_online_without_a_cache_compares_the_data_and_teacher_it_reads(peaky_llama_dir, tmp_path):
    no_cache = tmp_path / "no-cache"
    args = ("distill.mode=online", "distill.max_steps=2", "distill.save_every=1", "data.random.length=16")
    assert distill(peaky_llama_dir, no_cache, tmp_path, *args).exit_code == 0
    line = one_line_error(distill(peaky_llama_dir, no_cache, tmp_path, *args, "data.random.seed=9", resume=True))
    assert "another config (data.random.seed differ)" in line
    line = one_line_error(distill(peaky_llama_dir, no_cache, tmp_path, *args, "teacher.dtype=bfloat16", resume=True))
    assert "another config (teacher.dtype differ)" in line
    line = one_line_error(distill(peaky_llama_dir, no_cache, tmp_path, *args, "teacher.fp32_head=false", resume=True))
    assert "another config (teacher.fp32_head differ)" in line   # the online targets' head precision


def test_a_student_whose_recipe_a_later_qadpipe_refuses_still_loads(peaky_llama_dir, topk_cache, tmp_path):
    """A final/ written before a recipe check existed (here: a rule an earlier one shadows,
    refused for new runs since) is rebuilt as it was trained, for export and eval."""
    from qadpipe.distill.student import load_final_student

    assert distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=1").exit_code == 0
    record = tmp_path / "final" / "qadpipe_run.yaml"
    saved = yaml.safe_load(record.read_text())
    saved["config"]["quant"]["rules"] = [{"targets": "proj", "preset": "w4a16_int", "group_size": 32},
                                         {"targets": "down_proj", "preset": "w8a16_int"}]
    record.write_text(yaml.safe_dump(saved))
    model, config = load_final_student(tmp_path / "final")
    assert len(config.quant.rules) == 2
    assert model.model.layers[0].mlp.down_proj.weight_quantizer.spec.bits == 4


def test_resume_with_a_horizon_the_checkpoint_went_past_is_refused(peaky_llama_dir, topk_cache, tmp_path):
    assert distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=3", "distill.save_every=1").exit_code == 0
    line = one_line_error(distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=2", resume=True))
    assert "the checkpoint is at step 3, past distill.max_steps=2; resume with max_steps >= 3" in line


def test_a_fresh_run_into_a_previous_runs_directory_is_refused_and_changes_nothing(peaky_llama_dir, topk_cache,
                                                                                 tmp_path):
    assert distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=2", "distill.save_every=1").exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    line = one_line_error(distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=1"))
    assert line == (f"qadpipe: error: {tmp_path}: holds a previous distill run (checkpoints, final, metrics.jsonl); "
                    "pass --resume to continue it, or set a new distill.output_dir (or delete this one)")
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before


def test_an_output_dir_of_other_files_is_refused_and_changes_nothing(peaky_llama_dir, topk_cache, tmp_path):
    """A model directory (or an export, or any folder of the user's) as distill.output_dir:
    checkpoints/, final/ and ptq/ would be mixed into it."""

    model_copy = tmp_path / "model"
    shutil.copytree(peaky_llama_dir, model_copy)
    before = sorted(p.name for p in model_copy.iterdir())
    line = one_line_error(distill(peaky_llama_dir, topk_cache, model_copy, "distill.max_steps=1"))
    assert line.startswith(f"qadpipe: error: distill.output_dir: {model_copy} holds files distill does not write (")
    assert sorted(p.name for p in model_copy.iterdir()) == before


def test_resume_follows_a_moved_run_but_refuses_a_regenerated_cache(peaky_llama_dir, tmp_path):

    from distill_fixtures import make_cache

    cache = make_cache(tmp_path / "a", peaky_llama_dir)
    run = tmp_path / "run"
    assert distill(peaky_llama_dir, cache, run, "distill.max_steps=2", "distill.save_every=1").exit_code == 0
    # The run and its cache moved to other paths (another mount, a copy): same contents, resumes.
    shutil.copytree(run, tmp_path / "run2")
    shutil.copytree(cache, tmp_path / "cache2")
    assert distill(peaky_llama_dir, tmp_path / "cache2", tmp_path / "run2", "distill.max_steps=3",
                   "distill.save_every=1", resume=True).exit_code == 0
    # The cache regenerated in place from other data, with the very same config path: refused.
    other = make_cache(tmp_path / "b", peaky_llama_dir, "data.random.seed=1")
    shutil.rmtree(cache)
    shutil.copytree(other, cache)
    line = one_line_error(distill(peaky_llama_dir, cache, run, "distill.max_steps=3", "distill.save_every=1",
                                  resume=True))
    assert "--resume of a checkpoint trained on other cache contents than" in line


def test_refuses_when_no_rows_are_left_for_this_rank(peaky_llama_dir, topk_cache, tmp_path):
    line = one_line_error(distill(peaky_llama_dir, topk_cache, tmp_path, "distill.eval_rows=30"))
    assert line == ("qadpipe: error: not enough cache rows to train on: 0 left after holding out 24 of 24 for "
                    "eval (distill.eval_rows=30), for 1 rank(s); use a bigger cache, fewer ranks or a smaller "
                    "distill.eval_rows")


def test_tensorboard_asked_but_absent_is_refused_before_anything_is_written(peaky_llama_dir, topk_cache, tmp_path,
                                                                           monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))
    line = one_line_error(distill(peaky_llama_dir, topk_cache, tmp_path / "runs" / "out", "distill.tensorboard=true"))
    assert line == ("qadpipe: error: distill.tensorboard: true needs the tensorboard package (pip install "
                    "tensorboard), which is not installed; install it or set distill.tensorboard: false")
    assert not (tmp_path / "runs").exists()


def test_config_resolves_the_new_distill_fields():
    config = load_config(None, ["distill.pack_length=128", "distill.shuffle_buffer=1"])
    assert config.distill.pack_length == 128 and config.distill.shuffle_buffer == 1


def test_resume_takes_new_memory_knobs_and_a_checkpoint_older_than_a_field(peaky_llama_dir, topk_cache, tmp_path):
    """A run that ran out of memory is resumed with checkpointing on, smaller loss chunks or
    another packing (a row longer than pack_length stopped runs hours in, and the fix was then
    refused); a checkpoint whose qadpipe predates a field resumes as that field's default
    (quant.moe_experts, recorded as dense, matters to MoE students only: this Llama resumes)."""
    assert distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=2", "distill.save_every=1").exit_code == 0
    records = list((tmp_path / "checkpoints").rglob("qadpipe_run.yaml"))
    assert records
    for record in records:   # as written before these fields existed
        saved = yaml.safe_load(record.read_text())
        del saved["config"]["distill"]["activation_checkpointing"], saved["config"]["distill"]["trainable"]
        del saved["config"]["quant"]["moe_experts"]
        record.write_text(yaml.safe_dump(saved))
    resumed = distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=3", "distill.save_every=1",
                      "distill.activation_checkpointing=true", "distill.loss_chunk_tokens=8",
                      "distill.pack_length=4096", resume=True)
    assert resumed.exit_code == 0, resumed.output
    assert [row["step"] for row in train_rows(tmp_path)] == [1, 2, 3]
    for record in (tmp_path / "checkpoints").rglob("qadpipe_run.yaml"):   # a field it lacks is no free change
        saved = yaml.safe_load(record.read_text())
        saved["config"]["distill"].pop("trainable", None)
        record.write_text(yaml.safe_dump(saved))
    line = one_line_error(distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=4",
                                  "distill.trainable=quant", resume=True))
    assert "another config (distill.trainable differ)" in line


def test_a_second_live_run_in_one_output_dir_is_refused_and_the_lock_goes_with_the_run(peaky_llama_dir, topk_cache,
                                                                                        tmp_path):
    """Two runs (stages/distill.sbatch submitted twice: both --resume) trained into one
    directory, logging every step twice and pruning each other's checkpoints."""
    from qadpipe.distill.trainer import OUTPUT_LOCK
    from qadpipe.file_lock import take_lock

    out = tmp_path / "out"
    assert distill(peaky_llama_dir, topk_cache, out, "distill.max_steps=1").exit_code == 0
    assert not (out / OUTPUT_LOCK).exists()
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    live = take_lock(out / OUTPUT_LOCK)   # another process's run, as the kernel sees it: another open file
    try:
        line = one_line_error(distill(peaky_llama_dir, topk_cache, out, "distill.max_steps=2", resume=True))
        assert re.fullmatch(rf"qadpipe: error: distill.output_dir: {re.escape(str(out))} is being trained by pid "
                            rf"{os.getpid()} on \S+ since [\d: -]+; two runs would overwrite each other's "
                            "checkpoints: wait for that run to end, or stop it, then rerun", line), line
        assert sorted(p.relative_to(out) for p in out.rglob("*") if p.name != OUTPUT_LOCK) == before
    finally:
        live.release()
    assert distill(peaky_llama_dir, topk_cache, out, "distill.max_steps=2", resume=True).exit_code == 0
    assert [row["step"] for row in train_rows(out)] == [1, 2] and not (out / OUTPUT_LOCK).exists()


def test_distill_warns_of_a_cache_whose_tasks_split_the_records_different_ways(peaky_llama_dir, topk_cache,
                                                                               tmp_path, caplog):
    """Two arrays with other --num-shards started together: some records are in no task."""
    cache = tmp_path / "cache"
    shutil.copytree(topk_cache, cache)
    manifest = json.loads((cache / "manifests" / "task-00000.json").read_text())
    (cache / "manifests" / "task-00000.json").write_text(json.dumps({**manifest, "num_tasks": 2}))
    (cache / "manifests" / "task-00003.json").write_text(json.dumps({**manifest, "task": "task-00003", "shards": [],
                                                                     "num_tasks": 4}))
    with caplog.at_level("WARNING", logger="qadpipe.distill.trainer"):
        assert distill(peaky_llama_dir, cache, tmp_path / "out", "distill.max_steps=1").exit_code == 0
    assert (f"{cache}: its generate tasks split the records 2 and 4 ways (two arrays or resubmissions started "
            "together): some records are in no task") in caplog.text


def test_a_pack_length_below_the_longest_row_is_refused_before_the_student_loads(peaky_llama_dir, topk_cache,
                                                                                  tmp_path):
    """The row stopped the run only when it was met, possibly hours in; the manifests now record
    each shard's longest row.  A cache whose manifests predate that is still caught, at the row."""
    from qadpipe.cache import CacheReader

    reader = CacheReader(str(topk_cache))
    longest = max(len(row.input_ids) for row in reader.iter_rows(0, reader.num_rows))
    assert [shard.longest_row for shard in reader.view.shards] and longest > 1
    out = tmp_path / "out"
    line = one_line_error(distill(peaky_llama_dir, topk_cache, out, f"distill.pack_length={longest - 1}"))
    assert re.fullmatch(rf"qadpipe: error: {re.escape(str(topk_cache))}: shard shards/task-\d+-\d+\.parquet holds a "
                        rf"row of {longest} tokens, more than distill\.pack_length={longest - 1}; set pack_length to "
                        rf"at least {longest}, or to null \(pad instead of pack\)", line), line
    assert not (out / "ptq").exists()
    assert distill(peaky_llama_dir, topk_cache, out, f"distill.pack_length={longest}",
                   "distill.max_steps=1").exit_code == 0
    old = tmp_path / "old-cache"
    shutil.copytree(topk_cache, old)
    for manifest in (old / "manifests").glob("*.json"):
        raw = json.loads(manifest.read_text())
        for shard in raw["shards"]:
            del shard["longest_row"]
        manifest.write_text(json.dumps(raw))
    line = one_line_error(distill(peaky_llama_dir, old, tmp_path / "old-out", f"distill.pack_length={longest - 1}"))
    assert f"tokens, more than distill.pack_length={longest - 1}" in line and "cache row" in line
    line = one_line_error(distill(peaky_llama_dir, tmp_path / "no-cache", tmp_path / "online", "distill.mode=online",
                                  "data.random.length=16", "distill.pack_length=15"))
    assert re.fullmatch(r"qadpipe: error: data.source row '\S+' has 16 tokens, more than "
                        r"distill.pack_length=15; .*", line), line


def test_every_micro_batch_but_the_last_runs_its_backward_with_gradient_sync_off(peaky_llama_dir, topk_cache,
                                                                                   tmp_path, monkeypatch):
    """FSDP2 decides in its post-backward hook whether to reduce-scatter: the backward ran after
    the no-sync context had closed, so every micro-batch of a grad_accum step communicated."""
    import contextlib

    from qadpipe.distill import distributed

    sync_at_backward, current = [], [None]

    @contextlib.contextmanager
    def recording(module, enabled):
        current[0] = enabled
        try:
            yield
        finally:
            current[0] = None

    backward = torch.Tensor.backward
    monkeypatch.setattr(distributed, "gradient_sync", recording)
    monkeypatch.setattr(torch.Tensor, "backward",
                        lambda self, *args, **kwargs: (sync_at_backward.append(current[0]), backward(self, *args, **kwargs)))
    result = distill(peaky_llama_dir, topk_cache, tmp_path / "out", "distill.max_steps=2", "distill.batch_size=2",
                     "distill.grad_accum=3", "distill.save=false")
    assert result.exit_code == 0, result.output
    assert sync_at_backward == [False, False, True] * 2


def test_a_warmup_longer_than_the_run_is_said(peaky_llama_dir, topk_cache, tmp_path, caplog):
    result = distill(peaky_llama_dir, topk_cache, tmp_path / "out", "distill.max_steps=2", "distill.warmup_steps=4",
                     "distill.save=false")
    assert result.exit_code == 0, result.output
    assert "distill.warmup_steps=4 with max_steps=2: the lr never decays; the last step trains at 0.5 x distill.lr" \
        in caplog.text
    assert [round(row["lr"] / 1e-4, 6) for row in train_rows(tmp_path / "out")] == [0.25, 0.5]


def test_a_moe_student_with_quantized_expert_inputs_calibrates_trains_and_exports_them(tied_qwen3_moe_dir, tmp_path):
    """NVFP4 W4A4 through the experts too: calibration gives each experts module one range per
    projection (in ptq/), training moves the expert weights, and the export writes every
    expert's input_global_scale from the trained student's ranges."""
    cache = make_cache(tmp_path / "cache", tied_qwen3_moe_dir)
    out = tmp_path / "run"
    result = distill(tied_qwen3_moe_dir, cache, out, "quant.preset=nvfp4", "quant.group_size=null",
                     "quant.calibration_batches=1", "distill.max_steps=3", "distill.eval_every=3")
    assert result.exit_code == 0, result.output
    ptq, final = (load_file(str(out / tag / "model.safetensors")) for tag in ("ptq", "final"))
    experts = "model.layers.1.mlp.experts."
    ranges = {p: ptq[f"{experts}{p}_input_quantizer.amax"] for p in ("gate_up_proj", "down_proj")}
    assert all(r.shape == () and r > 0 for r in ranges.values()), ranges
    assert not torch.equal(ptq[experts + "gate_up_proj"], final[experts + "gate_up_proj"])
    assert all(np.isfinite(r["loss"]) for r in train_rows(out))
    exported = CliRunner().invoke(cli, ["export", "--checkpoint", str(out / "final"), "--format",
                                        "compressed-tensors", "--output", str(tmp_path / "ct")])
    assert exported.exit_code == 0, exported.output
    tensors = {}
    for shard in (tmp_path / "ct").glob("*.safetensors"):
        tensors.update(load_file(str(shard)))
    for e in range(4):
        for projection, source in (("gate_proj", "gate_up_proj"), ("up_proj", "gate_up_proj"),
                                   ("down_proj", "down_proj")):
            scale = tensors[f"{experts}{e}.{projection}.input_global_scale"]
            assert torch.equal(scale, 448 * 6 / final[f"{experts}{source}_input_quantizer.amax"].float().reshape(1))


def test_quant_only_training_learns_the_lsq_steps_of_moe_experts_and_leaves_their_weights(tied_qwen3_moe_dir,
                                                                                          tmp_path):
    """distill.trainable: quant trains every quantizer parameter: the experts' LSQ steps too."""
    cache = make_cache(tmp_path / "cache", tied_qwen3_moe_dir)
    out = tmp_path / "run"
    result = distill(tied_qwen3_moe_dir, cache, out, "quant.preset=lsq_int4", "distill.trainable=quant",
                     "distill.max_steps=3", "distill.lr=1e-3")
    assert result.exit_code == 0, result.output
    ptq, final = (load_file(str(out / tag / "model.safetensors")) for tag in ("ptq", "final"))
    experts = "model.layers.1.mlp.experts."
    assert torch.equal(ptq[experts + "down_proj"], final[experts + "down_proj"])
    step = experts + "down_proj_quantizer.learned.step"
    assert step in ptq and not torch.equal(ptq[step], final[step])
    # only the quantizers' parameters and the norms train (AngelSlim's scale-only QAD): every
    # weight matrix, embeddings and linears included, stays as calibrated
    frozen = [key for key in ptq if ptq[key].ndim >= 2 and "quantizer" not in key]
    assert frozen and all(torch.equal(ptq[key], final[key]) for key in frozen)
    assert any(not torch.equal(ptq[key], final[key]) for key in ptq if "norm" in key)


def test_trainable_quant_leaves_biases_frozen():
    """Scale-only QAD trains quantizer parameters and norms, nothing else: a model with biases
    (Qwen2's q/k/v, here a Llama with attention and MLP biases) keeps them as calibrated.  A
    rule by dimension (1-D parameters train) would take the biases with the norms."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    from qadpipe.config import build_config
    from qadpipe.distill.trainer import DistillRecipe
    from qadpipe.quant.recipe import apply_recipe

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, attention_bias=True,
                                         mlp_bias=True))
    config = build_config({"quant": {"preset": "w4a16_int", "group_size": 32, "learnable": "lsq"},
                           "distill": {"trainable": "quant", "weight_decay": 0.0}})
    apply_recipe(model, config.quant)
    DistillRecipe._select_trainable(SimpleNamespace(cfg=config.distill, config=config), model)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    biases = {name for name, _ in model.named_parameters() if name.endswith(".bias")}
    assert len(biases) == 7 and not trained & biases   # q, k, v, o, gate, up, down
    assert {"model.norm.weight", "model.layers.0.input_layernorm.weight"} <= trained
    assert any("quantizer" in name for name in trained)
    assert all("quantizer" in name or "norm" in name for name in trained)
