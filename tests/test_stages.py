"""The cluster launchers under stages/, run locally with the SLURM variables simulated.

Each launcher is executed as the real bash script (no SLURM on this machine: the scripts run
their command directly when there is no allocation), and its combined outputs are compared
with a single-process run of the same stage.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from qadpipe.cache.reader import CacheReader

ROOT = Path(__file__).resolve().parents[1]
STAGES = ROOT / "stages"
QADPIPE = str(Path(sys.executable).parent / "qadpipe")  # the console script of this environment
needs_console_script = pytest.mark.skipif(not Path(QADPIPE).is_file(),
                                          reason=f"{QADPIPE} missing: qadpipe is not installed here (pip install -e .)")


def _config(tmp_path: Path, model_dir: Path, **sections: dict) -> Path:
    config = {
        "model": {"path": str(model_dir), "dtype": "float32"},
        "teacher": {"backend": "hf", "dtype": "float32", "device": "cpu", "batch_size": 4},
        "data": {"source": "random", "random": {"num_sequences": 10, "length": 24, "seed": 3}},
        "cache": {"path": str(tmp_path / "cache"), "k": 8, "rows_per_shard": 3},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _rows_by_id(cache: Path) -> dict:
    return {row.id: row for row in CacheReader(str(cache)).iter_sequences()}


def _canonical_topk(row) -> tuple[np.ndarray, np.ndarray]:
    """Entries sorted by (log-prob desc, id): the compact codec orders entries with *equal*
    decoded log-probs by a per-shard id ranking, so the order inside a tie is a property of
    the shard, not of the target (the loss is order-free)."""
    order = np.lexsort((row.topk_ids, -row.topk_logprobs), axis=-1)
    return np.take_along_axis(row.topk_ids, order, -1), np.take_along_axis(row.topk_logprobs, order, -1)


@pytest.mark.slow
@needs_console_script
def test_generate_array_tasks_together_equal_one_process(tmp_path: Path, tiny_llama_dir: Path):
    config = _config(tmp_path, tiny_llama_dir)
    for task in ("0", "1"):
        _run(["bash", str(STAGES / "generate.sbatch")],
             {"CONFIG": str(config), "QADPIPE": QADPIPE, "SLURM_ARRAY_TASK_ID": task, "SLURM_ARRAY_TASK_COUNT": "2"},
             ROOT)
    _run([sys.executable, "-m", "qadpipe.cli", "generate", "-c", str(config),
          "--set", f"cache.path={tmp_path / 'single'}"], {}, ROOT)

    array, single = _rows_by_id(tmp_path / "cache"), _rows_by_id(tmp_path / "single")
    assert len(array) == len(single) == 10 and array.keys() == single.keys()
    for row_id, row in single.items():
        other = array[row_id]
        np.testing.assert_array_equal(other.input_ids, row.input_ids)
        for mine, theirs in zip(_canonical_topk(other), _canonical_topk(row)):
            np.testing.assert_array_equal(mine, theirs)
        np.testing.assert_array_equal(other.tail_mass, row.tail_mass)
    tasks = sorted(p.name for p in (tmp_path / "cache" / "runs").iterdir())
    assert tasks == ["task-00000", "task-00001"]  # each array task recorded its own run


def test_generate_launcher_refuses_a_non_array_submission(tmp_path: Path):
    proc = subprocess.run(["bash", str(STAGES / "generate.sbatch")],
                          env={k: v for k, v in {**os.environ, "CONFIG": "x.yaml"}.items()
                               if not k.startswith("SLURM_")},
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0
    assert "submit as an array job" in proc.stderr


def test_export_launcher_runs_the_export_with_the_config_and_the_arguments_given(tmp_path: Path) -> None:
    """stages/export.sbatch adds nothing and loses nothing: ``qadpipe export -c $CONFIG``, then
    every argument as given (one with a space stays one), in place of the shell (exec: SIGTERM
    from the scheduler reaches the export itself); without CONFIG it refuses."""
    (tmp_path / "argv").write_text('#!/bin/bash\necho "pid $$"\nprintf "<%s>" "$@"\n')
    (tmp_path / "argv").chmod(0o755)
    shown = _run(["bash", "-c", 'echo "shell $$"; exec bash "$0" "$@"', str(STAGES / "export.sbatch"),
                  "--output", "my dir", "--set", "export.format=fake"],
                 {"QADPIPE": str(tmp_path / "argv"), "CONFIG": "c.yaml"}, tmp_path).stdout.splitlines()
    assert shown[2] == "<export><-c><c.yaml><--output><my dir><--set><export.format=fake>"
    assert shown[0].split()[1] == shown[1].split()[1]   # one process all along: the script exec'd the export
    proc = subprocess.run(["bash", str(STAGES / "export.sbatch")], env={k: v for k, v in os.environ.items()
                                                                           if k != "CONFIG"},
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "set CONFIG to the pipeline YAML" in proc.stderr


def test_generate_launcher_splits_by_num_shards_when_only_some_indices_are_resubmitted(tmp_path: Path) -> None:
    """A resubmission of indices 3 and 17 of a 64-task array has SLURM_ARRAY_TASK_COUNT=2."""
    echo = {"QADPIPE": "echo", "CONFIG": "c.yaml", "SLURM_ARRAY_TASK_ID": "17", "SLURM_ARRAY_TASK_COUNT": "2"}
    shown = _run(["bash", str(STAGES / "generate.sbatch")], {**echo, "NUM_SHARDS": "64"}, tmp_path).stdout
    assert "--set generate.num_shards=64 --set generate.shard_index=17" in shown
    shown = _run(["bash", str(STAGES / "generate.sbatch")], echo, tmp_path).stdout
    assert "--set generate.num_shards=2 --set generate.shard_index=17" in shown


def test_distill_launcher_under_slurm_gives_srun_the_cpus_and_sends_sigterm_to_the_tasks(tmp_path: Path) -> None:
    """Inside an allocation the script execs srun (a stand-in here that prints its arguments):
    srun must pass the allocation's CPUs per task on (SLURM 22.05-23.02 srun does not inherit
    them, and all ranks of a node would share one CPU), and SLURM's early SIGTERM must go to the
    step's tasks, not to the batch shell -- which is srun, and srun turns a SIGTERM of its own
    into a SIGKILL of every rank, losing the checkpoint the SIGTERM was for."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/bash\necho "srun $*"\n')
    (fake / "srun").chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "64",
           "SLURM_NNODES": "2", "CONFIG": "c.yaml", "TORCHRUN": "torchrun", "MASTER_ADDR": "node1"}
    shown = _run(["bash", str(STAGES / "distill.sbatch")], env, tmp_path).stdout
    assert "srun --kill-on-bad-exit=1 --cpus-per-task=64 torchrun --nnodes=2" in shown
    # its own rendezvous port: another job on the node with the fixed 29500 joined this one's store
    assert "--rdzv_endpoint=node1:10007" in shown
    env["SLURM_JOB_ID"] = "20008"
    assert "--rdzv_endpoint=node1:10008" in _run(["bash", str(STAGES / "distill.sbatch")], env, tmp_path).stdout
    headers = [line for line in (STAGES / "distill.sbatch").read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --signal=TERM@300" in headers


def test_generate_launcher_refuses_an_array_that_leaves_out_some_shard_indices(tmp_path: Path) -> None:
    """--array=1-4 (or 0-6:2) without NUM_SHARDS: some of 0..N-1 would be no task's."""
    for first, step in (("1", "1"), ("0", "2")):
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "QADPIPE": "echo",
               "CONFIG": "c.yaml", "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4",
               "SLURM_ARRAY_TASK_MIN": first, "SLURM_ARRAY_TASK_STEP": step}
        proc = subprocess.run(["bash", str(STAGES / "generate.sbatch")], env=env, capture_output=True, text=True,
                              cwd=tmp_path)
        assert proc.returncode == 2 and "submit --array=0-N" in proc.stderr and not proc.stdout.count("--set")
    shown = _run(["bash", str(STAGES / "generate.sbatch")],
                 {"QADPIPE": "echo", "CONFIG": "c.yaml", "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4",
                  "SLURM_ARRAY_TASK_MIN": "1", "NUM_SHARDS": "5"}, tmp_path).stdout
    assert "--set generate.num_shards=5 --set generate.shard_index=2" in shown
