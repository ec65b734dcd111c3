"""The distill recipe end to end on a tiny model: it learns, it writes what export reads,
its modes mean what they say, and every bad input is one line with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cache_rows import cache_meta, random_rows, write_cache
from qadpipe.cli import cli
from qadpipe.config import load_config

from distill_fixtures import settings


def distill(model_dir: Path, cache: Path, out: Path, *extra: str, resume: bool = False):
    args = ["distill", *[a for s in settings(model_dir, cache, f"distill.output_dir={out}", *extra)
                         for a in ("--set", s)]]
    return CliRunner().invoke(cli, args + (["--resume"] if resume else []))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_rows(out: Path) -> list[dict]:
    return [row for row in metrics(out) if "loss" in row]


def eval_rows(out: Path) -> list[dict]:
    return [row for row in metrics(out) if "eval_kl" in row]


def test_qad_lowers_held_out_kl_and_writes_a_loadable_final_student(peaky_llama_dir, topk_cache, tmp_path):
    result = distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=6", "distill.eval_every=3")
    assert result.exit_code == 0, result.output
    assert "held-out KL" in result.output
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


@pytest.mark.slow
def test_sampled_cache_trains_with_sampled_ce(peaky_llama_dir, sampled_cache, tmp_path):
    result = distill(peaky_llama_dir, sampled_cache, tmp_path, "distill.loss=sampled_ce", "distill.max_steps=2")
    assert result.exit_code == 0, result.output
    assert all(np.isfinite(r["loss"]) for r in train_rows(tmp_path))


@pytest.mark.slow
def test_packed_batches_give_the_padded_loss(peaky_llama_dir, topk_cache, tmp_path):
    losses = {}
    for name, extra in (("padded", []), ("packed", ["distill.pack_length=64"])):
        out = tmp_path / name
        result = distill(peaky_llama_dir, topk_cache, out, "distill.max_steps=1", *extra)
        assert result.exit_code == 0, result.output
        losses[name] = [r["loss"] for r in train_rows(out)]
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
    line = one_line_error(distill(peaky_llama_dir, cache, tmp_path / "out"))
    assert "tokenizer_fingerprint='sha256:other'" in line and "expects tokenizer_fingerprint='sha256:" in line


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


def test_refuses_a_student_whose_vocab_differs_from_the_cache(peaky_llama_dir, topk_cache, tmp_path):
    from qadpipe.models import load_tokenizer, tokenizer_fingerprint

    meta = cache_meta(tokenizer_fingerprint=tokenizer_fingerprint(load_tokenizer(str(peaky_llama_dir))),
                      vocab_size=50000)
    cache = write_cache(tmp_path / "cache", meta, random_rows(meta, 8))
    line = one_line_error(distill(peaky_llama_dir, cache, tmp_path / "out"))
    assert "cache vocab_size=50000, but the student" in line and "has 49152 output logits" in line


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(peaky_llama_dir, topk_cache,
                                                                                tmp_path):
    result = distill(peaky_llama_dir, topk_cache, tmp_path, "distill.lr=1e30", "distill.warmup_steps=0",
                     "distill.max_grad_norm=0", "distill.save_every=1", "distill.max_steps=20")
    line = one_line_error(result)
    assert "(not finite); stopped without saving this step, the last good checkpoint is" in line
    bad_step = int(line.split("step ")[1].split(":")[0])
    latest = (tmp_path / "checkpoints" / "LATEST").read_text().strip()
    assert bad_step > 1 and latest == f"step-{bad_step - 1:08d}" and latest in line
    state = load_file(str(tmp_path / "checkpoints" / latest / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in state.values())


def test_out_of_memory_is_one_line_naming_the_knobs_and_the_kept_checkpoint(peaky_llama_dir, topk_cache, tmp_path,
                                                                            monkeypatch):
    from qadpipe.distill.student import StudentLoss

    forward, calls = StudentLoss.forward, []

    def runs_out_at_step_3(self, *args, **kwargs):
        calls.append(self.training)
        if sum(calls) == 3:   # training forwards only (the PTQ eval runs first)
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
                    "distill.loss_chunk_tokens (now 32) (--resume accepts both), or, in a fresh distill.output_dir, "
                    "a smaller distill.batch_size with a larger distill.grad_accum (same global batch; now 4 x 1) or "
                    "distill.distributed=fsdp2 under torchrun")
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == latest.name
    monkeypatch.setattr(StudentLoss, "forward", forward)   # what the line says --resume accepts, it does
    resumed = distill(peaky_llama_dir, topk_cache, tmp_path, "distill.save_every=1", "distill.max_steps=5",
                      "distill.grad_accum=1", "distill.activation_checkpointing=true", "distill.loss_chunk_tokens=16",
                      resume=True)
    assert resumed.exit_code == 0, resumed.output


def test_resume_refuses_a_checkpoint_of_another_recipe(peaky_llama_dir, topk_cache, tmp_path, caplog):
    assert distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=2", "distill.save_every=1").exit_code == 0
    line = one_line_error(distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=4", "distill.lr=3e-4",
                                  resume=True))
    assert "--resume of a checkpoint written with another config (distill.lr differ)" in line
    # Only a longer schedule: resumes, and follows the new horizon from its first step.  Cosine,
    # lr 1e-4, warmup 1: step 3 trains at multiplier(2) -- 0 when the decay ended at step 2,
    # (1 + cos(pi/2)) / 2 = half the peak with 3 steps.
    assert distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=3", "distill.save_every=1",
                   resume=True).exit_code == 0
    assert ("distill.max_steps changed from 2 to 3, so the cosine decay is recomputed for the new horizon: "
            "the lr of step 3 is 5e-05 (the old horizon gave 0)") in caplog.text
    assert train_rows(tmp_path)[-1]["step"] == 3


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
    import shutil

    model_copy = tmp_path / "model"
    shutil.copytree(peaky_llama_dir, model_copy)
    before = sorted(p.name for p in model_copy.iterdir())
    line = one_line_error(distill(peaky_llama_dir, topk_cache, model_copy, "distill.max_steps=1"))
    assert line.startswith(f"qadpipe: error: distill.output_dir: {model_copy} holds files distill does not write (")
    assert sorted(p.name for p in model_copy.iterdir()) == before


def test_resume_follows_a_moved_run_but_refuses_a_regenerated_cache(peaky_llama_dir, tmp_path):
    import shutil

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


def test_tensorboard_asked_but_absent_is_said(peaky_llama_dir, topk_cache, tmp_path, caplog, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    from qadpipe.distill.observe import MetricsLog

    MetricsLog(tmp_path, enabled=True, tensorboard=True)
    assert "distill.tensorboard is on but the tensorboard package is not installed" in caplog.text


def test_config_resolves_the_new_distill_fields():
    config = load_config(None, ["distill.pack_length=128", "distill.shuffle_buffer=1"])
    assert config.distill.pack_length == 128 and config.distill.shuffle_buffer == 1


def test_resume_takes_new_memory_knobs_and_a_checkpoint_older_than_a_field(peaky_llama_dir, topk_cache, tmp_path):
    """A run that ran out of memory is resumed with checkpointing on or smaller loss chunks; a
    checkpoint whose qadpipe predates a field resumes as that field's default."""
    import yaml

    assert distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=2", "distill.save_every=1").exit_code == 0
    records = list((tmp_path / "checkpoints").rglob("qadpipe_run.yaml"))
    assert records
    for record in records:   # as written before these fields existed
        saved = yaml.safe_load(record.read_text())
        del saved["config"]["distill"]["activation_checkpointing"], saved["config"]["distill"]["trainable"]
        record.write_text(yaml.safe_dump(saved))
    resumed = distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=3", "distill.save_every=1",
                      "distill.activation_checkpointing=true", "distill.loss_chunk_tokens=8", resume=True)
    assert resumed.exit_code == 0, resumed.output
    assert [row["step"] for row in train_rows(tmp_path)] == [1, 2, 3]
    for record in (tmp_path / "checkpoints").rglob("qadpipe_run.yaml"):   # a field it lacks is no free change
        saved = yaml.safe_load(record.read_text())
        saved["config"]["distill"].pop("trainable", None)
        record.write_text(yaml.safe_dump(saved))
    line = one_line_error(distill(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=4",
                                  "distill.trainable=quant", resume=True))
    assert "another config (distill.trainable differ)" in line


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
    assert "distill.warmup_steps=4 > max_steps=2: the lr ends the run at 0.5 x distill.lr" in caplog.text
    assert [round(row["lr"] / 1e-4, 6) for row in train_rows(tmp_path / "out")] == [0.25, 0.5]
