"""`qadpipe demo` skips a step only when its output was made with the config asked for now."""

from __future__ import annotations

from pathlib import Path

from qadpipe.config import load_config
from qadpipe.demo import STEPS
from qadpipe.provenance import save_run_record


def test_a_step_is_done_only_with_the_same_config(tmp_path: Path) -> None:
    def config(*extra: str):
        return load_config(None, [f"distill.output_dir={tmp_path / 'student'}",
                                  f"export.output_dir={tmp_path / 'export'}", f"eval.output_dir={tmp_path / 'eval'}",
                                  *extra])

    made = config()
    outputs = {"distill": (tmp_path / "student" / "final", "model.safetensors"),
               "export": (tmp_path / "export", "config.json"), "eval": (tmp_path / "eval", "report.md")}
    steps = {step.name: step for step in STEPS}
    for name, (directory, marker) in outputs.items():
        directory.mkdir(parents=True)
        assert not steps[name].done(made), f"{name}: nothing written yet"
        (directory / marker).write_text("x")
        assert not steps[name].done(made), f"{name}: an output without a run record"
        save_run_record(made, name, directory)
        assert steps[name].done(made), name
        assert not steps[name].done(config("quant.preset=nvfp4_a16")), f"{name}: made with another preset"
    assert not steps["generate"].done(made) and not steps["serve"].done(made)   # they always run
