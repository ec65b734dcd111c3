"""Sharded checkpoints (``distill.checkpoint_format: sharded``): each rank's shards written by
that rank through torch.distributed.checkpoint, read back resharded.  In one process here: a
run stopped and resumed from one continues loss for loss; export reads the student from it
as from a full checkpoint of the same step; and reading one never executes a pickle -- the
metadata nor an entry.  Several ranks, and a move between rank counts, are in
test_distributed.py (slow)."""

from __future__ import annotations

import pickle
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill_fixtures import make_cache, settings
from qadpipe.distill.sharded_checkpoint import MODEL_SHARDS, OPTIMIZER_SHARDS, is_sharded, load_shards, save_shards
from qadpipe.errors import DistillError
from test_resume import curve


def config(model_dir: Path, cache: Path, out: Path, *extra: str):
    from qadpipe.config import load_config

    return load_config(None, settings(model_dir, cache, f"distill.output_dir={out}", "distill.max_steps=4",
                                      "distill.save_every=2", "distill.eval_every=100", "distill.shuffle_buffer=4",
                                      *extra))


def stopped_at(step: int, monkeypatch, run) -> None:
    from qadpipe.distill import trainer

    asked = trainer.DistillRecipe._stop_requested
    monkeypatch.setattr(trainer.DistillRecipe, "_stop_requested",
                        lambda self: "SIGTERM" if self.step == step else asked(self))
    assert run().status == "preempted"
    monkeypatch.setattr(trainer.DistillRecipe, "_stop_requested", asked)


@pytest.fixture(scope="module")
def full_run(peaky_llama_dir, topk_cache, tmp_path_factory):
    from qadpipe.distill.trainer import run_distill

    out = tmp_path_factory.mktemp("full")
    run_distill(config(peaky_llama_dir, topk_cache, out))
    return out


def test_a_run_resumed_from_a_sharded_checkpoint_continues_loss_for_loss(peaky_llama_dir, topk_cache, full_run,
                                                                         tmp_path, monkeypatch):
    from qadpipe.distill.trainer import run_distill

    out = tmp_path / "sharded"
    sharded = config(peaky_llama_dir, topk_cache, out, "distill.checkpoint_format=sharded", "quant.learnable=lsq")
    reference = tmp_path / "reference"
    run_distill(config(peaky_llama_dir, topk_cache, reference, "quant.learnable=lsq"))
    stopped_at(3, monkeypatch, lambda: run_distill(sharded))
    step = out / "checkpoints" / "step-00000003"
    assert is_sharded(step) and not (step / "model.safetensors").exists()
    assert sorted(p.name for p in (step / MODEL_SHARDS).iterdir()) == [".metadata", "__0_0.distcp"]
    assert run_distill(sharded, resume=True).status == "done"
    assert curve(out) == curve(reference)
    final, expected = load_file(str(out / "final" / "model.safetensors")), \
        load_file(str(reference / "final" / "model.safetensors"))
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)


def test_export_reads_a_sharded_checkpoint_as_the_full_one_of_the_same_step(peaky_llama_dir, topk_cache, full_run,
                                                                            tmp_path):
    from qadpipe.distill.trainer import run_distill
    from qadpipe.export.runner import run_export

    out = tmp_path / "sharded"
    run_distill(config(peaky_llama_dir, topk_cache, out, "distill.checkpoint_format=sharded"))
    exports = {}
    for name, run in (("sharded", out), ("full", full_run)):
        cfg = config(peaky_llama_dir, topk_cache, run)
        exports[name] = tmp_path / f"export-{name}"
        run_export(cfg, checkpoint=str(run / "checkpoints" / "step-00000002"), output=str(exports[name]))
    sharded, full = (load_file(str(exports[name] / "model.safetensors")) for name in ("sharded", "full"))
    assert sharded.keys() == full.keys() and all(torch.equal(sharded[k], full[k]) for k in full)


@pytest.mark.parametrize("background", ["true", "false"])
def test_a_failed_shard_write_leaves_the_previous_checkpoint_latest(peaky_llama_dir, topk_cache, tmp_path,
                                                                    monkeypatch, background):
    from qadpipe.distill import sharded_checkpoint
    from qadpipe.distill.trainer import run_distill

    class FullDisk(sharded_checkpoint.FileSystemWriter):
        def write_data(self, plan, planner):
            if ".step-00000004." in str(self.path):
                raise OSError(28, "No space left on device")
            return super().write_data(plan, planner)

    monkeypatch.setattr(sharded_checkpoint, "FileSystemWriter", FullDisk)
    out = tmp_path / "student"
    with pytest.raises(DistillError) as info:
        run_distill(config(peaky_llama_dir, topk_cache, out, "distill.checkpoint_format=sharded",
                           f"distill.save_in_background={background}"))
    assert str(info.value).endswith("/model: cannot write the shards (rank 0: OSError: [Errno 28] No space left on "
                                    "device); checkpoints/LATEST still names the previous checkpoint")
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["LATEST", "step-00000002"]   # the staged one removed
    assert (checkpoints / "LATEST").read_text().strip() == "step-00000002"


def _dcp_contents(directory: Path, scratch: Path) -> dict:
    """A DCP directory as one nested dict, through DCP's own converter (its unpickling reader:
    these are the test's own files)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    converted = scratch / f"{directory.parent.name}-{directory.name}.pt"
    dcp_to_torch_save(directory, converted)
    return torch.load(converted, weights_only=False)


def _assert_same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


def test_shards_written_while_training_goes_on_are_the_ones_a_synchronous_save_writes(
        peaky_llama_dir, topk_cache, tmp_path, monkeypatch):
    """Each write is held until the next step has trained -- AdamW has updated in place the
    weights and moments the shards were taken from -- and still writes that step's state."""
    from qadpipe.distill import trainer

    every_step = ("distill.checkpoint_format=sharded", "distill.save_every=1", "quant.learnable=lsq")
    trainer.run_distill(config(peaky_llama_dir, topk_cache, tmp_path / "sync", *every_step,
                               "distill.save_in_background=false"))
    write, train_step = trainer.save_shards, trainer.DistillRecipe._train_step
    trained, began = [], []

    def step_then_record(self, micro, window):
        train_step(self, micro, window)
        trained.append(self.step + 1)

    def lagging(directory, model_state, optimizer_state, group):
        step = int(re.search(r"\.step-(\d{8})\.", directory.name).group(1))
        began.append(step)
        deadline = time.monotonic() + 120
        while step < 4 and step + 1 not in trained and time.monotonic() < deadline:
            time.sleep(0.01)
        assert step == 4 or step + 1 in trained, "the write should overlap the next step"
        return write(directory, model_state, optimizer_state, group)

    monkeypatch.setattr(trainer.DistillRecipe, "_train_step", step_then_record)
    monkeypatch.setattr(trainer, "save_shards", lagging)
    assert trainer.run_distill(config(peaky_llama_dir, topk_cache, tmp_path / "background", *every_step)).status == "done"
    assert began == [1, 2, 3, 4]
    for step in (3, 4):   # the two kept
        sync, background = (tmp_path / run / "checkpoints" / f"step-{step:08d}" for run in ("sync", "background"))
        for part in (MODEL_SHARDS, OPTIMIZER_SHARDS):
            _assert_same(_dcp_contents(sync / part, tmp_path), _dcp_contents(background / part, tmp_path),
                         f"step {step} {part}")
        _assert_same(*(torch.load(run / "trainer_state.pt", weights_only=True) for run in (sync, background)),
                     f"step {step} trainer state")


def test_metadata_pickled_by_python_3_13_reads(tmp_path, monkeypatch):
    """DCP's metadata holds the checkpoint's path; Python 3.13 pickles a PosixPath as
    ``pathlib._local.PosixPath``, which the restricted unpickler must take as the path it is
    (reading every sharded checkpoint written under 3.13 failed).  Written here as 3.13 writes it."""
    import pathlib
    import sys
    import types

    save_shards(tmp_path, {"weight": torch.arange(3.0)}, {"param_groups": []})
    metadata_file = tmp_path / MODEL_SHARDS / ".metadata"
    metadata = pickle.loads(metadata_file.read_bytes())   # our own file, just written
    as_in_3_13 = types.ModuleType("pathlib._local")
    as_in_3_13.PosixPath = pathlib.PosixPath
    monkeypatch.setitem(sys.modules, "pathlib._local", as_in_3_13)
    monkeypatch.setattr(pathlib.PosixPath, "__module__", "pathlib._local")
    metadata_file.write_bytes(pickle.dumps(metadata))
    monkeypatch.undo()
    assert b"pathlib._local" in metadata_file.read_bytes()
    loaded = {"weight": torch.zeros(3)}
    load_shards(tmp_path, MODEL_SHARDS, loaded)
    assert torch.equal(loaded["weight"], torch.arange(3.0))


class Payload:
    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_reading_a_sharded_checkpoint_executes_no_pickle(tmp_path):
    """DCP's reader would ``pickle.load`` the metadata and ``torch.load(weights_only=False)``
    each non-tensor entry: a crafted checkpoint would run code.  Both are refused, in one line
    naming the file, and the payload never runs."""
    model = {"weight": torch.arange(6.0).reshape(2, 3)}
    save_shards(tmp_path, model, {"param_groups": [{"lr": 0.5, "betas": (0.9, 0.95)}]})
    loaded = {"weight": torch.zeros(2, 3)}
    load_shards(tmp_path, MODEL_SHARDS, loaded)
    assert torch.equal(loaded["weight"], model["weight"])
    groups = {"param_groups": [{"lr": 0.0, "betas": (0.0, 0.0)}]}
    load_shards(tmp_path, OPTIMIZER_SHARDS, groups)
    assert groups["param_groups"][0]["lr"] == 0.5

    ran = tmp_path / "payload-ran"
    payload = Payload()
    payload.target = str(ran)
    metadata = tmp_path / MODEL_SHARDS / ".metadata"
    metadata.write_bytes(pickle.dumps(payload))
    with pytest.raises(DistillError) as info:
        load_shards(tmp_path, MODEL_SHARDS, {"weight": torch.zeros(2, 3)})
    assert str(info.value).startswith(f"{metadata}: not a sharded checkpoint's metadata (UnpicklingError:")
    assert not ran.exists()

    # an entry: the optimizer's hyperparameters are torch.save bytes in the shard files; DCP's own
    # reader would run this one (the control below), ours refuses it
    save_shards(tmp_path / "evil", model, {"param_groups": [{"lr": payload}]})
    with pytest.raises(DistillError) as info:
        load_shards(tmp_path / "evil", OPTIMIZER_SHARDS, {"param_groups": [{"lr": 0.0}]})
    assert str(info.value) == (f"{tmp_path / 'evil' / OPTIMIZER_SHARDS}: unreadable sharded checkpoint (rank 0: "
                               "UnpicklingError: entry param_groups.0.lr would unpickle getattr, not a tensor or "
                               "plain value)")
    assert not ran.exists()
    import torch.distributed.checkpoint as dcp

    dcp.load({"param_groups": [{"lr": 0.0}]}, checkpoint_id=tmp_path / "evil" / OPTIMIZER_SHARDS)
    assert ran.exists()


def test_a_tied_head_is_stored_once_and_a_checkpoint_storing_it_twice_still_resumes(tied_qwen3_moe_dir, tmp_path,
                                                                                    monkeypatch):
    """DCP would write a tied LM head under both its names; stored once, both are filled on
    reading.  A checkpoint from before, holding both names, resumes the same."""
    from qadpipe.distill import distributed
    from qadpipe.distill.sharded_checkpoint import _SafeReader
    from qadpipe.distill.trainer import run_distill

    cache = make_cache(tmp_path / "cache", tied_qwen3_moe_dir)
    reference = tmp_path / "reference"
    run_distill(config(tied_qwen3_moe_dir, cache, reference))
    stored = {}
    for name, keep_both in (("once", False), ("twice", True)):
        out = tmp_path / name
        sharded = config(tied_qwen3_moe_dir, cache, out, "distill.checkpoint_format=sharded")
        if keep_both:   # as written before: every name of the state dict
            monkeypatch.setattr(distributed, "stored_once", lambda module, state: state)
        stopped_at(3, monkeypatch, lambda: run_distill(sharded))
        monkeypatch.undo()
        step = out / "checkpoints" / "step-00000003" / MODEL_SHARDS
        stored[name] = set(_SafeReader(step).read_metadata().state_dict_metadata)
        assert run_distill(sharded, resume=True).status == "done"
        assert curve(out) == curve(reference), name
        final, expected = load_file(str(out / "final" / "model.safetensors")), \
            load_file(str(reference / "final" / "model.safetensors"))
        assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected), name
    assert stored["twice"] - stored["once"] == {"student.lm_head.weight"}
    assert "student.model.embed_tokens.weight" in stored["once"]
