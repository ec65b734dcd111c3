"""torchrun with 2 CPU processes (gloo) trains exactly what 1 process trains on the same
global batches: the per-step losses and the final weights agree, for DDP and for FSDP2.

The rank split is by contiguous row ranges, so the two runs read differently ordered copies
of the same rows: with ``shuffle_buffer=1`` (cache order) rank 0 reads a0, a1, ... and rank 1
b0, b1, ...; the single process reads a0, b0, a1, b1, ... two at a time.  Step s therefore
trains on {a_s, b_s} in both runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import yaml
import torch
from safetensors.torch import load_file

from cache_rows import write_cache
from distill_fixtures import make_cache, settings
from qadpipe.cache import CacheReader
from qadpipe.targets import SequenceTargets

STEPS = 3


ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(model_dir: Path, cache: Path, out: Path, nproc: int, *extra: str,
        via_launcher: bool = False, resume: bool = False, entry: Optional[Path] = None) -> dict[str, list[float]]:
    """Train with ``nproc`` processes: torchrun directly, or (``via_launcher``) through
    stages/distill.sbatch as a workstation runs it, with an empty config and the settings as
    ``--set`` arguments the script forwards.  ``entry``: a script to run in place of
    ``python -m qadpipe.cli``, with the same arguments."""
    sets = settings(model_dir, cache, f"distill.output_dir={out}", f"distill.max_steps={STEPS}",
                    "distill.eval_rows=0", "distill.shuffle_buffer=1", "distill.save_every=100",
                    "quant.calibration_batches=0", *extra)
    overrides = [a for s in sets for a in ("--set", s)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if via_launcher:
        config = out.parent / f"{out.name}.yaml"
        config.write_text("{}\n")
        env.update(CONFIG=str(config), GPUS_PER_NODE=str(nproc), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()), TORCHRUN=f"{sys.executable} -m torch.distributed.run")
        env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
        command = ["bash", str(ROOT / "stages" / "distill.sbatch"), *overrides]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
            if nproc > 1 else [sys.executable]
        command = launcher + ([str(entry)] if entry else ["-m", "qadpipe.cli"]) + \
            ["distill", *overrides, *(["--resume"] if resume else [])]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if "loss" in row]
    return {key: [row[key] for row in train] for key in ("loss", "grad_norm")}


def shorten(row: SequenceTargets, length: int) -> SequenceTargets:
    n = length - 1 - row.target_start
    return dataclasses.replace(row, input_ids=row.input_ids[:length], topk_ids=row.topk_ids[:n],
                               topk_logprobs=row.topk_logprobs[:n], tail_mass=row.tail_mass[:n])


@pytest.fixture(scope="module")
def caches(tmp_path_factory, peaky_llama_dir, topk_cache):
    """The same 2×STEPS rows in rank-split order, in interleaved (single-process) order, and in
    the order one process trains them when it resumes two ranks' first step (see
    test_a_run_of_two_processes_resumes_on_one)."""
    reader = CacheReader(str(topk_cache))
    rows = list(reader.iter_sequences())[: 2 * STEPS]
    # rank 1's rows shorter: unequal position counts per rank, which a per-rank mean would weight wrongly
    a, b = rows[:STEPS], [shorten(row, 10 + 2 * i) for i, row in enumerate(rows[STEPS:])]
    root = tmp_path_factory.mktemp("dist-caches")
    split = write_cache(root / "split", reader.meta, a + b)
    interleaved = write_cache(root / "interleaved", reader.meta, [r for pair in zip(a, b) for r in pair])
    two_then_one = write_cache(root / "two-then-one", reader.meta, [a[0], b[0], *a[1:], *b[1:]])
    return Path(split), Path(interleaved), Path(two_then_one)


@pytest.fixture(scope="module")
def single(caches, peaky_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return run(peaky_llama_dir, caches[1], out, 1, "distill.batch_size=2"), out


@pytest.mark.slow
@pytest.mark.parametrize("strategy,via_launcher,extra",      # DDP: as stages/distill.sbatch runs it
                         [("fsdp2", False, ()), ("ddp", True, ()),
                          ("fsdp2", False, ("distill.activation_checkpointing=true",))],
                         ids=["fsdp2", "stages-distill-sbatch-ddp", "fsdp2-activation-checkpointing"])
def test_two_cpu_processes_match_one_process(caches, single, peaky_llama_dir, tmp_path, strategy, via_launcher,
                                             extra):
    """With checkpointed layers, the recompute in backward must re-gather each FSDP2 layer's shards."""
    single_curves, single_out = single
    out = tmp_path / "student"
    curves = run(peaky_llama_dir, caches[0], out, 2, "distill.batch_size=1", f"distill.distributed={strategy}",
                 *extra, via_launcher=via_launcher)
    assert len(curves["loss"]) == len(single_curves["loss"]) == STEPS
    np.testing.assert_allclose(curves["loss"], single_curves["loss"], rtol=2e-4)
    # the gradient itself (Adam's update is nearly blind to how rank gradients are weighted)
    np.testing.assert_allclose(curves["grad_norm"], single_curves["grad_norm"], rtol=1e-4)
    two = load_file(str(out / "final" / "model.safetensors"))
    one = load_file(str(single_out / "final" / "model.safetensors"))
    assert two.keys() == one.keys()
    start = load_file(str(next(peaky_llama_dir.glob("*.safetensors"))))
    for name in one:
        # Adam normalises each element's step, so where a gradient is ~0 (lm_head rows of tokens
        # the batch never favours) the ranks' summation order can change that element's step by
        # a few percent of lr: measured 7.9e-6 on 6 of 3.1M lm_head elements (trained by 2.5e-4)
        # on one CPU, 0 on another.  Bound each tensor's difference by 5% of how far training
        # moved it, and never looser than float noise.
        moved = (one[name].float() - start[name].float()).abs().max().item() if name in start else 0.0
        difference = (two[name].float() - one[name].float()).abs().max().item()
        assert difference <= max(2e-6, 0.05 * moved), (name, difference, moved)
    # and training moved the weights well beyond that tolerance
    moved = (one["model.layers.0.mlp.up_proj.weight"] - start["model.layers.0.mlp.up_proj.weight"]).abs().max()
    assert moved > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint_format", ["full", "sharded"])
def test_a_ddp_run_resumes_under_fsdp2(caches, single, peaky_llama_dir, tmp_path, checkpoint_format):
    """Checkpoints hold full state dicts whatever the strategy, so a DDP run that ran out of
    memory continues under FSDP2 (the out-of-memory line offers it) along the same loss curve.
    Sharded under DDP, where every rank holds the whole state, rank 0 alone writes it (copied
    to its host for the background write, not once per rank)."""
    single_curves, _ = single
    out = tmp_path / "student"
    run(peaky_llama_dir, caches[0], out, 2, "distill.batch_size=1", "distill.distributed=ddp",
        f"distill.max_steps={STEPS - 1}", "distill.save_every=1", f"distill.checkpoint_format={checkpoint_format}")
    if checkpoint_format == "sharded":
        step = out / "checkpoints" / f"step-{STEPS - 1:08d}"
        for part in ("model", "optimizer"):
            assert sorted(p.name for p in (step / part).iterdir() if p.stat().st_size) == [".metadata",
                                                                                          "__0_0.distcp"]
    resumed = run(peaky_llama_dir, caches[0], out, 2, "distill.batch_size=1", "distill.distributed=fsdp2",
                  "distill.save_every=1", f"distill.checkpoint_format={checkpoint_format}", resume=True)
    np.testing.assert_allclose(resumed["loss"], single_curves["loss"], rtol=2e-4)
    np.testing.assert_allclose(resumed["grad_norm"], single_curves["grad_norm"], rtol=1e-4)


@pytest.mark.slow
def test_a_run_of_two_processes_resumes_on_one(caches, peaky_llama_dir, tmp_path):
    """Rank 0 trains a0 a1 a2 and rank 1 b0 b1 b2 (cache order: shuffle_buffer=1).  After their
    first step ({a0, b0}) one process resumes with grad_accum 2 (the same 2-row global batch):
    it trains the rows the two left, a1 a2 b1 b2, in cache order, two a step.  So its loss
    curve is that of one process trained from the start on a0 b0 a1 a2 b1 b2 -- the order
    written by hand here, not by the loader."""
    out = tmp_path / "student"
    run(peaky_llama_dir, caches[0], out, 2, "distill.batch_size=1", "distill.distributed=ddp",
        "distill.max_steps=1", "distill.save_every=1")
    resumed = run(peaky_llama_dir, caches[0], out, 1, "distill.batch_size=1", "distill.grad_accum=2",
                  "distill.save_every=1", resume=True)
    reference = run(peaky_llama_dir, caches[2], tmp_path / "reference", 1, "distill.batch_size=2")
    np.testing.assert_allclose(resumed["loss"], reference["loss"], rtol=2e-4)
    np.testing.assert_allclose(resumed["grad_norm"], reference["grad_norm"], rtol=1e-4)
    record = yaml.safe_load((out / "qadpipe_run.yaml").read_text())
    assert record["resumes"][-1]["changed"] == {"distill.grad_accum": [1, 2], "distill.max_steps": [1, STEPS],
                                                "ranks": [2, 1]}


#: ``qadpipe`` that appends to <QADPIPE_SPY_DIR>/rank-<RANK>.txt the name of each call that reads
#: the whole student: from the model directory, or a checkpoint's weights.
LOAD_SPY = """\
import os
from pathlib import Path
import qadpipe.distill.checkpoint as checkpoint
import qadpipe.models as models
from qadpipe.cli import main
record = Path(os.environ["QADPIPE_SPY_DIR"]) / f"rank-{os.environ.get('RANK', '0')}.txt"
def spied(module, name):
    original = getattr(module, name)
    def call(*args, **kwargs):
        with record.open("a") as out:
            out.write(name + "\\n")
        return original(*args, **kwargs)
    setattr(module, name, call)
spied(models, "load_causal_lm")
spied(checkpoint, "load_file")
main()
"""


def whole_loads(spy_dir: Path, rank: int) -> list[str]:
    record = spy_dir / f"rank-{rank}.txt"
    return record.read_text().split() if record.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [("quant.preset=nvfp4", "quant.group_size=null", "quant.calibration_batches=2"),
                                    ("quant.learnable=lsq",)], ids=["nvfp4-calibrated", "int4-lsq"])
def test_fsdp2_builds_the_student_from_rank_0_alone_and_trains_it_as_ddp_does(caches, peaky_llama_dir, tmp_path,
                                                                              monkeypatch, recipe):
    """FSDP2's sharded build against DDP's whole student on each rank: the same PTQ student bit
    for bit (input ranges calibrated through the sharded forward, LSQ steps set from the
    weights by rank 0), the same loss curve through a stop and a resume, and only rank 0 ever
    reads the whole student, from the model directory or from the checkpoint it resumes."""
    recipe = (*recipe, "distill.eval_rows=2")   # a held-out eval through the sharded student before AdamW exists
    ddp = run(peaky_llama_dir, caches[0], tmp_path / "ddp", 2, "distill.batch_size=1", "distill.distributed=ddp",
              *recipe)
    spy = tmp_path / "spy.py"
    spy.write_text(LOAD_SPY)
    monkeypatch.setenv("QADPIPE_SPY_DIR", str(tmp_path))
    out = tmp_path / "fsdp2"
    fsdp2 = [*recipe, "distill.batch_size=1", "distill.distributed=fsdp2", "distill.save_every=1"]
    run(peaky_llama_dir, caches[0], out, 2, *fsdp2, f"distill.max_steps={STEPS - 1}", entry=spy)
    assert (whole_loads(tmp_path, 0), whole_loads(tmp_path, 1)) == (["load_causal_lm"], [])
    ptq, reference = load_file(str(out / "ptq" / "model.safetensors")), \
        load_file(str(tmp_path / "ddp" / "ptq" / "model.safetensors"))
    assert ptq.keys() == reference.keys()
    assert [name for name in ptq if not torch.equal(ptq[name], reference[name])] == []
    resumed = run(peaky_llama_dir, caches[0], out, 2, *fsdp2, resume=True, entry=spy)
    assert (whole_loads(tmp_path, 0), whole_loads(tmp_path, 1)) == (["load_causal_lm"] * 2 + ["load_file"], [])
    np.testing.assert_allclose(resumed["loss"], ddp["loss"], rtol=2e-4)
    np.testing.assert_allclose(resumed["grad_norm"], ddp["grad_norm"], rtol=1e-4)


@pytest.mark.slow
def test_fsdp2_trains_moe_experts_with_quantized_inputs_as_ddp_does(tied_qwen3_moe_dir, tmp_path):
    """NVFP4 W4A4 experts (one input range per projection, calibrated through the sharded
    forward) under FSDP2's sharded build: DDP's PTQ student bit for bit, and its loss curve
    through a stop and a resume from sharded checkpoints (the tied head stored once)."""
    cache = make_cache(tmp_path / "cache", tied_qwen3_moe_dir)
    recipe = ("quant.preset=nvfp4", "quant.group_size=null", "quant.calibration_batches=2", "distill.batch_size=1",
              "distill.eval_rows=2")
    ddp = run(tied_qwen3_moe_dir, cache, tmp_path / "ddp", 2, *recipe, "distill.distributed=ddp")
    sharded = (*recipe, "distill.distributed=fsdp2", "distill.checkpoint_format=sharded", "distill.save_every=1")
    run(tied_qwen3_moe_dir, cache, tmp_path / "fsdp2", 2, *sharded, f"distill.max_steps={STEPS - 1}")
    fsdp2 = run(tied_qwen3_moe_dir, cache, tmp_path / "fsdp2", 2, *sharded, resume=True)
    ptq, reference = (load_file(str(tmp_path / tag / "ptq" / "model.safetensors")) for tag in ("fsdp2", "ddp"))
    assert any(name.endswith("experts.down_proj_input_quantizer.amax") for name in ptq)
    assert ptq.keys() == reference.keys()
    assert [name for name in ptq if not torch.equal(ptq[name], reference[name])] == []
    assert len(fsdp2["loss"]) == STEPS
    np.testing.assert_allclose(fsdp2["loss"], ddp["loss"], rtol=2e-4)
    np.testing.assert_allclose(fsdp2["grad_norm"], ddp["grad_norm"], rtol=1e-4)


@pytest.mark.slow
def test_a_sharded_checkpoint_of_two_fsdp2_ranks_resumes_on_two_and_on_one_process(caches, single, peaky_llama_dir,
                                                                                   tmp_path, monkeypatch):
    """Each rank writes its own shards (nothing gathered: no full optimizer state is ever built),
    and the checkpoint reshards on load: resumed by the 2 ranks (rank 0 loading no whole student:
    the shards hold every value), or by one process (grad_accum 2: the same global batch), the
    run follows the loss curve of one process trained from the start."""
    single_curves, _ = single
    spy = tmp_path / "spy.py"
    spy.write_text(LOAD_SPY.replace('spied(checkpoint, "load_file")', 'spied(checkpoint, "load_file")\n'
                                    'import qadpipe.distill.distributed as distributed\n'
                                    'spied(distributed, "full_optimizer_state")'))
    monkeypatch.setenv("QADPIPE_SPY_DIR", str(tmp_path))
    out = tmp_path / "student"
    sharded = ["distill.checkpoint_format=sharded", "distill.save_every=1"]
    run(peaky_llama_dir, caches[0], out, 2, *sharded, "distill.batch_size=1", "distill.distributed=fsdp2",
        f"distill.max_steps={STEPS - 1}", entry=spy)
    step = out / "checkpoints" / f"step-{STEPS - 1:08d}"
    assert sorted(p.name for p in (step / "model").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert "full_optimizer_state" not in whole_loads(tmp_path, 0) + whole_loads(tmp_path, 1)
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    resumed = run(peaky_llama_dir, caches[0], out, 2, *sharded, "distill.batch_size=1", "distill.distributed=fsdp2",
                  resume=True, entry=spy)
    assert whole_loads(tmp_path, 0) == ["load_causal_lm"]   # the first run's: the shards hold every value
    np.testing.assert_allclose(resumed["loss"], single_curves["loss"], rtol=2e-4)
    np.testing.assert_allclose(resumed["grad_norm"], single_curves["grad_norm"], rtol=1e-4)
    alone = run(peaky_llama_dir, caches[0], moved, 1, *sharded, "distill.batch_size=1", "distill.grad_accum=2",
                resume=True)
    np.testing.assert_allclose(alone["loss"], single_curves["loss"], rtol=2e-4)
    np.testing.assert_allclose(alone["grad_norm"], single_curves["grad_norm"], rtol=1e-4)


def run_two_ranks(script: Path) -> str:
    """stdout of ``script`` run by 2 gloo processes under torchrun (which must both exit 0)."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_a_write_failing_on_rank_0_stops_every_rank(tmp_path):
    """Rank 0 writes checkpoints while the others wait; when its write failed (a full disk) the
    others sat in a barrier until the process-group timeout (30 minutes under NCCL)."""
    script = tmp_path / "fail.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from qadpipe.distill.distributed import done_by_main\n"
        "dist.init_process_group('gloo')\n"
        "rank = dist.get_rank()\n"
        "def write():\n"
        "    raise OSError(28, 'No space left on device')\n"
        "try:\n"
        "    done_by_main(rank == 0, write)\n"
        "except Exception as exc:\n"
        "    print(f'rank {rank}: {type(exc).__name__}: {exc}', flush=True)\n"
        "dist.destroy_process_group()\n")
    stdout = run_two_ranks(script)
    assert "rank 0: OSError: [Errno 28] No space left on device" in stdout
    assert "rank 1: DistillError: rank 0 could not write its output" in stdout


def test_the_other_ranks_wait_past_the_collective_timeout_for_rank_0s_write(tmp_path):
    """An 8B student's checkpoint on a 50 MB/s shared filesystem takes half an hour, the training
    collectives' timeout: the other ranks waited for it in an NCCL all-reduce, which NCCL's
    watchdog ends.  Here the default group times out after 2 s and rank 0 writes for 5 (the
    group set up by another caller than init_distributed: the control group comes on first use)."""
    script = tmp_path / "slow_write.py"
    script.write_text(
        "import datetime, time, torch.distributed as dist\n"
        "from qadpipe.distill.distributed import done_by_main\n"
        "dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=2))\n"
        "rank = dist.get_rank()\n"
        "print(f'rank {rank}: got {done_by_main(rank == 0, lambda: time.sleep(5) or \"written\")}', flush=True)\n"
        "dist.destroy_process_group()\n")
    stdout = run_two_ranks(script)
    assert "rank 0: got written" in stdout and "rank 1: got None" in stdout


def test_the_control_group_connects_within_the_collectives_timeout_and_then_waits_for_hours(tmp_path):
    """As init_distributed makes it: the control group is connected in the collectives' timeout
    (here 2 s, as the default group's), and then must wait past it for rank 0's 5 s write."""
    script = tmp_path / "slow_write.py"
    script.write_text(
        "import datetime, time, torch.distributed as dist\n"
        "from qadpipe.distill import distributed\n"
        "distributed.COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=2)\n"
        "dist.init_process_group('gloo', timeout=distributed.COLLECTIVE_TIMEOUT)\n"
        "distributed.init_control_group()\n"
        "rank = dist.get_rank()\n"
        "got = distributed.done_by_main(rank == 0, lambda: time.sleep(5) or 'written')\n"
        "print(f'rank {rank}: got {got}', flush=True)\n"
        "dist.destroy_process_group()\n")
    stdout = run_two_ranks(script)
    assert "rank 0: got written" in stdout and "rank 1: got None" in stdout


@pytest.mark.parametrize("waiting_in", ["done_by_main", "BackgroundWriter"])
def test_a_control_group_made_at_first_use_is_connected_before_rank_0s_write(tmp_path, waiting_in):
    """A process group set up by another caller than init_distributed: the control group is made
    at first use.  Made after rank 0's write (in the failure check), the other ranks' connection
    waited for that write and failed after the collectives' timeout (here 2 s)."""
    wait = ("got = distributed.done_by_main(rank == 0, lambda: time.sleep(5) or 'written')\n"
            if waiting_in == "done_by_main" else
            "from qadpipe.distill.background_save import BackgroundWriter\n"
            "writer = BackgroundWriter(is_main=rank == 0)\n"
            "writer.start(lambda: time.sleep(5), 'step 1')\n"
            "writer.finish()\n"
            "got = 'written' if rank == 0 else None\n")
    script = tmp_path / "lazy_group.py"
    script.write_text(
        "import datetime, time, torch.distributed as dist\n"
        "from qadpipe.distill import distributed\n"
        "distributed.COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=2)\n"
        "dist.init_process_group('gloo', timeout=distributed.COLLECTIVE_TIMEOUT)\n"
        "rank = dist.get_rank()\n"
        + wait +
        "print(f'rank {rank}: got {got}', flush=True)\n"
        "dist.destroy_process_group()\n")
    stdout = run_two_ranks(script)
    assert "rank 0: got written" in stdout and "rank 1: got None" in stdout


def test_a_result_computed_by_rank_0_reaches_every_rank_and_so_does_its_error(tmp_path):
    """Every rank gets rank 0's answer, not its own; a failure on rank 0 stops every rank."""
    script = tmp_path / "main.py"
    script.write_text(
        "import torch.distributed as dist\n"
        "from qadpipe.distill.distributed import computed_by_main\n"
        "from qadpipe.errors import CacheError\n"
        "dist.init_process_group('gloo')\n"
        "rank = dist.get_rank()\n"
        "print(f'rank {rank}: got {computed_by_main(rank == 0, lambda: (\"asked on rank\", rank))}', flush=True)\n"
        "def fail():\n"
        "    raise CacheError('cache/manifests: empty cache')\n"
        "try:\n"
        "    computed_by_main(rank == 0, fail)\n"
        "except CacheError as exc:\n"
        "    print(f'rank {rank}: CacheError: {exc}', flush=True)\n"
        "class Unpicklable(Exception):\n"
        "    def __reduce__(self):\n"
        "        raise TypeError('cannot pickle')\n"
        "def fail_oddly():\n"
        "    raise Unpicklable('lost its mount')\n"
        "try:\n"
        "    computed_by_main(rank == 0, fail_oddly)\n"
        "except Exception as exc:\n"
        "    print(f'rank {rank}: {type(exc).__name__}: {exc}', flush=True)\n"
        "dist.destroy_process_group()\n")
    stdout = run_two_ranks(script)
    for rank in (0, 1):
        assert f"rank {rank}: got ('asked on rank', 0)" in stdout
        assert f"rank {rank}: CacheError: cache/manifests: empty cache" in stdout
    assert "rank 0: Unpicklable: lost its mount" in stdout
    assert "rank 1: DistillError: rank 0 failed (Unpicklable: lost its mount); this rank stops too" in stdout


def test_rank_0s_calibrated_ranges_become_every_ranks(tmp_path):
    """GPUs may sum a calibration batch in different orders; FSDP2 would then shard each rank's
    own ranges, so rank 0's are broadcast to all after calibration."""
    script = tmp_path / "ranges.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from qadpipe.distill.distributed import broadcast_from_main\n"
        "dist.init_process_group('gloo')\n"
        "rank = dist.get_rank()\n"
        "amax, step = torch.tensor(1.5 + rank), torch.nn.Parameter(torch.full((3,), 0.25 * (rank + 1)))\n"
        "broadcast_from_main([amax, step])\n"
        "print(f'rank {rank}: {amax.item()} {step.tolist()} {step.requires_grad}', flush=True)\n"
        "dist.destroy_process_group()\n")
    stdout = run_two_ranks(script)
    for rank in (0, 1):
        assert f"rank {rank}: 1.5 [0.25, 0.25, 0.25] True" in stdout


def test_a_sharded_build_holds_rank_0s_whole_student_tie_and_rotary_frequencies_included(tmp_path):
    """FSDP2's sharded build: a meta-device skeleton on each rank, filled from rank 0's whole
    student.  Gathered back it is that student bit for bit; the tied head is still the
    embedding; the rotary frequencies, a buffer outside the state dict (uninitialised memory
    after ``to_empty``), are rank 0's on every rank; and a forward gives the whole student's
    logits exactly."""
    script = tmp_path / "sharded_build.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "from qadpipe.distill.distributed import DistEnv, full_model_state, load_sharded_from_main, wrap\n"
        "from qadpipe.distill.student import StudentLoss\n"
        "dist.init_process_group('gloo')\n"
        "rank = dist.get_rank()\n"
        "config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,\n"
        "                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)\n"
        "config.rope_parameters = {'rope_type': 'default', 'rope_theta': 123.0}\n"
        "torch.manual_seed(0)\n"
        "whole = LlamaForCausalLM(config).eval() if rank == 0 else None\n"
        "with torch.device('meta'):\n"
        "    skeleton = LlamaForCausalLM(config).eval()\n"
        "model = StudentLoss(skeleton, chunk_tokens=8)\n"
        "wrap(model, skeleton.model.layers, 'fsdp2', DistEnv(rank, 2, rank, torch.device('cpu')))\n"
        "load_sharded_from_main(model, whole, torch.device('cpu'), 'student.')\n"
        "gathered = {k[len('student.'):]: v for k, v in full_model_state(model).items()}\n"
        "ids = torch.arange(3, 15).unsqueeze(0)\n"
        "with torch.no_grad():\n"
        "    logits = model({'input_ids': ids, 'use_cache': False}).logits\n"
        "tied = skeleton.lm_head.weight is skeleton.model.embed_tokens.weight\n"
        "inv_freq = skeleton.model.rotary_emb.inv_freq\n"
        "print(f'rank {rank}: tied {tied} inv_freq {inv_freq.tolist()}', flush=True)\n"
        "if rank == 0:\n"
        "    state = whole.state_dict()\n"
        "    same = gathered.keys() == state.keys() and all(torch.equal(gathered[k], state[k]) for k in state)\n"
        "    with torch.no_grad():\n"
        "        gap = (logits - whole(input_ids=ids, use_cache=False).logits).abs().max().item()\n"
        "    print(f'gathered state equal {same}; logits gap {gap}; whole inv_freq '\n"
        "          f'{whole.model.rotary_emb.inv_freq.tolist()}', flush=True)\n"
        "dist.barrier()\n"   # rank 1 leaving while rank 0 still computes aborted it, once under load
        "dist.destroy_process_group()\n")
    stdout = run_two_ranks(script)
    assert "gathered state equal True; logits gap 0.0;" in stdout
    expected = stdout.split("whole inv_freq ")[1].splitlines()[0]
    np.testing.assert_allclose(eval(expected), 1.0 / 123.0 ** (np.arange(0, 8, 2) / 8), rtol=1e-6)   # head_dim 8
    for rank in (0, 1):
        assert f"rank {rank}: tied True inv_freq {expected}" in stdout


@pytest.mark.slow
def test_every_rank_trains_on_the_cache_snapshot_rank_0_opened(peaky_llama_dir, topk_cache, tmp_path):
    """A generate array still committing while distill starts: ranks opening the cache moments
    apart saw different rows (rank 1 trained rank 0's held-out rows; the run recorded rank 0's
    fingerprint).  Here rank 1's own look at the manifests would miss task 1; it must not look."""
    reader = CacheReader(str(topk_cache))
    rows = list(reader.iter_sequences())[:12]
    cache = tmp_path / "cache"
    write_cache(cache, reader.meta, rows[:6], task="task-00000")
    write_cache(cache, reader.meta, rows[6:], task="task-00001")
    wrapper = tmp_path / "late_rank.py"
    wrapper.write_text(
        "import os, sys\n"
        "from qadpipe.cache import manifest, reader\n"
        "real = manifest.load_view\n"
        "def load_view(store):   # rank 1 looks before task 1 committed\n"
        "    view = real(store)\n"
        "    return manifest.CacheView(view.meta, view.tasks[:1]) if os.environ['RANK'] == '1' else view\n"
        "manifest.load_view = reader.load_view = load_view\n"
        "init = reader.CacheReader.__init__\n"
        "def traced(self, *args, **kwargs):\n"
        "    init(self, *args, **kwargs)\n"
        "    print(f\"rank {os.environ['RANK']}: {self.num_rows} rows\", flush=True)\n"
        "reader.CacheReader.__init__ = traced\n"
        "from qadpipe.cli import main\n"
        "sys.argv[0] = 'qadpipe'\n"
        "main()\n")
    sets = settings(peaky_llama_dir, cache, f"distill.output_dir={tmp_path / 'out'}", "distill.max_steps=1",
                    "distill.eval_rows=2", "quant.calibration_batches=0")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(wrapper), "distill", *[a for s in sets for a in ("--set", s)]],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0: 12 rows" in done.stdout and "rank 1: 12 rows" in done.stdout, done.stdout


def test_a_gloo_group_that_cannot_connect_is_one_line_naming_the_interface_setting(monkeypatch):
    from qadpipe.distill import distributed
    from qadpipe.errors import DistillError

    def refuse(**kwargs):
        raise RuntimeError("Gloo connectFullMesh failed with [../third_party/gloo/gloo/transport/tcp/pair.cc:144] "
                           "no error\nmore lines")

    monkeypatch.setattr(distributed.dist, "new_group", refuse)
    with pytest.raises(DistillError) as info:
        distributed.init_control_group()
    assert str(info.value).startswith("distill: cannot connect the ranks' gloo group (Gloo connectFullMesh failed")
    assert "GLOO_SOCKET_IFNAME" in str(info.value) and "\n" not in str(info.value)
