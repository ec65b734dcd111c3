"""What a run logs and does, against figures worked out independently: the rows metrics.jsonl
gets (each log and eval interval, and the last step), the positions and real tokens each
covers (from the cache rows themselves), the loss weights, the held-out figures recomputed
position by position from the saved PTQ student, the lr and the clipping that reach AdamW's
update (read off the weights), and the data order distill.seed picks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cache_rows import cache_meta, random_rows, write_cache
from qadpipe.config import load_config
from qadpipe.distill import trainer

from distill_fixtures import metrics, settings

EVAL_ROWS, BATCH = 3, 2
KD, LM = 0.8, 0.3


def ragged_cache(root: Path, model_dir: Path, num_rows: int = 10):
    """A top-k cache of rows 12 to 24 tokens long (so padded batches hold padding), targets from position 2."""
    from qadpipe.models import load_tokenizer, tokenizer_fingerprint

    meta = cache_meta(tokenizer_fingerprint=tokenizer_fingerprint(load_tokenizer(str(model_dir))), vocab_size=49152)
    rows = random_rows(meta, num_rows, seq_len=24, target_start=2, seed=5)
    return write_cache(root / "cache", meta, rows), rows


def config(model_dir: Path, cache: Path, out: Path, *extra: str):
    return load_config(None, settings(model_dir, cache, f"distill.output_dir={out}", *extra))


@pytest.fixture(scope="module")
def logged_run(peaky_llama_dir, tmp_path_factory):
    """3 steps of 2 rows in cache order (shuffle_buffer=1), logged and evaluated every 2 steps,
    3 held-out rows (batches of 2 and 1); the tokens each log interval counted, by step."""
    root = tmp_path_factory.mktemp("figures")
    cache, rows = ragged_cache(root, peaky_llama_dir)
    out = root / "out"
    tokens: dict[int, int] = {}
    log_train = trainer.DistillRecipe._log_train

    def counting(self, window, progress):
        tokens[self.step] = window.tokens
        return log_train(self, window, progress)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer.DistillRecipe, "_log_train", counting)
        result = trainer.run_distill(config(
            peaky_llama_dir, cache, out, "distill.max_steps=3", "distill.log_every=2", "distill.eval_every=2",
            f"distill.eval_rows={EVAL_ROWS}", f"distill.batch_size={BATCH}", "distill.shuffle_buffer=1",
            f"distill.kd_loss_weight={KD}", f"distill.lm_loss_weight={LM}", "distill.save_every=100"))
    assert result.status == "done"
    return out, rows, tokens


def test_a_row_each_log_and_eval_interval_and_at_the_last_step(logged_run):
    out, _, _ = logged_run
    rows = metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [2, 3]   # 3 is no multiple of log_every: the last step
    assert [(r["tag"], r["step"]) for r in rows if "eval_kl" in r] == [("ptq", 0), ("eval", 2), ("eval", 3)]


def test_each_row_covers_the_positions_and_real_tokens_of_its_interval(logged_run):
    """Steps 1-2 train cache rows 3-6, step 3 rows 7-8 (the first 3 are held out): a row sums
    its own interval (the window starts anew after each log), and tokens/s counts the rows'
    tokens, not the padding of their micro-batches."""
    out, rows, tokens = logged_run
    targets = [row.num_target_rows for row in rows]
    lengths = [len(row.input_ids) for row in rows]
    train = [r for r in metrics(out) if "loss" in r]
    assert [r["positions"] for r in train] == [sum(targets[3:7]), sum(targets[7:9])]
    assert tokens == {2: sum(lengths[3:7]), 3: sum(lengths[7:9])}
    padded = BATCH * (max(lengths[3:5]) + max(lengths[5:7]))
    assert tokens[2] != padded   # the rows are ragged: padding would have been counted
    assert all(r["eval_positions"] == sum(targets[:EVAL_ROWS]) for r in metrics(out) if "eval_kl" in r)


def test_the_training_loss_weighs_kd_and_lm_as_configured(logged_run):
    """forward_kl's KD term is the logged (tail-bucket) kl: loss = kd_loss_weight x kl + lm_loss_weight x ce."""
    out, _, _ = logged_run
    for row in (r for r in metrics(out) if "loss" in r):
        assert row["loss"] == pytest.approx(KD * row["kl"] + LM * row["ce"], rel=1e-6)


def test_held_out_figures_are_per_position_means_over_the_held_out_rows(logged_run):
    """The PTQ eval, recomputed row by row from ptq/ and the cache's targets: each held-out
    position weighs the same, whichever batch (of 2 rows or of 1) it was scored in."""
    from qadpipe.distill.losses import forward_kl_tail
    from qadpipe.distill.student import load_final_student

    out, rows, _ = logged_run
    model, _ = load_final_student(out / "ptq")
    kl, agree = [], []
    with torch.no_grad():
        for row in rows[:EVAL_ROWS]:
            logits = model(input_ids=torch.from_numpy(row.input_ids.astype("int64"))[None], use_cache=False).logits[0]
            logp = torch.log_softmax(logits.double(), -1)[row.target_start:row.target_start + row.num_target_rows]
            ids = torch.from_numpy(row.topk_ids.astype("int64"))
            kl.append(forward_kl_tail(logp, ids, torch.from_numpy(row.topk_logprobs).double(),
                                      torch.from_numpy(row.tail_mass).double()))
            agree.append((logp.argmax(-1) == ids[:, 0]).double())
    ptq = next(r for r in metrics(out) if r.get("tag") == "ptq")
    assert ptq["eval_positions"] == sum(len(x) for x in kl)
    assert ptq["eval_kl"] == pytest.approx(float(torch.cat(kl).mean()), rel=1e-4)
    assert ptq["eval_top1"] == pytest.approx(float(torch.cat(agree).mean()), abs=1e-9)


@pytest.mark.parametrize("max_grad_norm", [1.0, 1e-12])
def test_the_first_update_takes_the_logged_lr_and_the_clipped_gradient(peaky_llama_dir, topk_cache, tmp_path,
                                                                       max_grad_norm):
    """AdamW's first step moves a weight by lr x g / (|g| + 1e-8): by the lr itself wherever
    |g| >> 1e-8.  Linear warmup of 2 steps: step 1 trains at half the peak of 1e-4, the lr its
    metrics row says.  Clipped to a norm of 1e-12, every |g| <= 1e-12 and no weight moves by
    more than 1e-4 x lr (give or take an fp32 rounding of the weight)."""
    result = trainer.run_distill(config(peaky_llama_dir, topk_cache, tmp_path, "distill.max_steps=1",
                                        "distill.warmup_steps=2", "distill.schedule=linear",
                                        f"distill.max_grad_norm={max_grad_norm}"))
    assert result.status == "done"
    name = "model.layers.0.mlp.up_proj.weight"
    moved = float((load_file(str(tmp_path / "final" / "model.safetensors"))[name]
                   - load_file(str(tmp_path / "ptq" / "model.safetensors"))[name]).abs().max())
    assert [r["lr"] for r in metrics(tmp_path) if "loss" in r] == [pytest.approx(5e-5, rel=1e-12)]
    if max_grad_norm == 1.0:
        assert moved == pytest.approx(5e-5, rel=1e-3)
    else:
        assert moved < 1e-3 * 5e-5


def test_distill_seed_picks_the_data_order(peaky_llama_dir, tmp_path):
    """The rows of the first step are the seeded loader's (the held-out rows past, the shuffle
    buffer as configured): another seed, another order."""
    from qadpipe.cache import CacheReader
    from qadpipe.distill.loader import TargetLoader

    cache, _ = ragged_cache(tmp_path, peaky_llama_dir)
    first: dict[int, list[str]] = {}
    collate = trainer.DistillRecipe._collate_train
    for seed in (0, 1):
        seen: list[list[str]] = []

        def spying(self, rows, seen=seen):
            seen.append([row.id for row in rows])
            return collate(self, rows)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(trainer.DistillRecipe, "_collate_train", spying)
            assert trainer.run_distill(config(peaky_llama_dir, cache, tmp_path / f"seed{seed}", "distill.max_steps=1",
                                              f"distill.seed={seed}", f"distill.eval_rows={EVAL_ROWS}",
                                              f"distill.batch_size={BATCH}", "distill.save=false")).status == "done"
        first[seed] = seen[0]
    expected = {seed: [row.id for row in next(iter(TargetLoader(CacheReader(str(cache)), list, batch_size=BATCH,
                                                                 seed=seed, shuffle_buffer=256,
                                                                 holdout_rows=EVAL_ROWS)))]
                for seed in (0, 1)}
    assert expected[0] != expected[1]
    assert first == expected
