"""What qadpipe refuses to trust: remote code, pickles, unsafe YAML, secrets in outputs.

Names that would escape a cache directory are tested where the cache parses them:
tests/cache/test_faults.py::test_manifest_entry_escaping_the_cache_is_refused (shard names),
and a LATEST pointer escaping checkpoints/ in tests/test_bad_input.py (resume-latest-escapes).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from cache_rows import cache_meta, random_rows, write_cache
from qadpipe.cli import cli
from qadpipe.config import load_config
from qadpipe.errors import CacheError, DistillError

PACKAGE = Path(__file__).resolve().parents[1] / "qadpipe"
SECRET = "qadpipe-FAKE-secret-7f3a9c"
KEY_ID = "AKIAQADPIPEFAKEKEY01"


def _subclasses(tree: ast.AST, module: str, bases: set[str]) -> list[ast.ClassDef]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
            and any(isinstance(b, ast.Attribute) and isinstance(b.value, ast.Name) and b.value.id == module
                    and b.attr in bases for b in node.bases)]


def unsafe_calls(source: str) -> list[str]:
    """Calls that can run code hidden in data: pickle/marshal/dill loads, torch.load without
    weights_only=True, yaml.load without a safe loader, eval/exec, np.load(allow_pickle=True).
    A module may import pickle only to subclass ``pickle.Unpickler`` with its own ``find_class``
    (an allowlist: DCP's checkpoint metadata); it may still call no pickle loader itself."""
    found = []
    tree = ast.parse(source)
    safe_loaders = {node.name for node in _subclasses(tree, "yaml", {"SafeLoader", "CSafeLoader"})}
    restricts_pickle = any(isinstance(item, ast.FunctionDef) and item.name == "find_class"
                           for node in _subclasses(tree, "pickle", {"Unpickler"}) for item in node.body)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
            found += [f"import {n}" for n in names if n.split(".")[0] in {"dill", "cloudpickle", "marshal"}
                      or n.split(".")[0] == "pickle" and not (restricts_pickle and isinstance(node, ast.Import))]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        keywords = {k.arg: k.value for k in node.keywords}
        if isinstance(func, ast.Name) and name in {"eval", "exec"}:
            found.append(f"{name}(")
        elif owner == "pickle" and name in {"load", "loads", "Unpickler"}:
            found.append(f"pickle.{name}(")
        elif owner == "torch" and name == "load":
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append("torch.load( without weights_only=True")
        elif owner == "yaml" and name in {"load", "load_all", "unsafe_load", "full_load"}:
            loader = keywords.get("Loader")
            safe = (isinstance(loader, ast.Attribute) and "Safe" in loader.attr) or (
                isinstance(loader, ast.Name) and loader.id in safe_loaders)
            if name != "load" or not safe:
                found.append(f"yaml.{name}( without SafeLoader")
        elif owner in {"np", "numpy"} and name == "load":
            flag = keywords.get("allow_pickle")
            if isinstance(flag, ast.Constant) and flag.value is True:
                found.append("np.load(allow_pickle=True)")
    return found


def test_the_checker_finds_each_unsafe_call():
    """The scanner below is only worth something if it flags what it claims to."""
    bad = ("import pickle\nfrom dill import loads\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
           "yaml.load(s)\nyaml.load(s, Loader=yaml.FullLoader)\nyaml.unsafe_load(s)\neval(x)\nexec(x)\n"
           "np.load(p, allow_pickle=True)\nclass SafeLooking(yaml.Loader): pass\nyaml.load(s, Loader=SafeLooking)\n")
    assert len(unsafe_calls(bad)) == 11
    ok = ("torch.load(p, map_location='cpu', weights_only=True)\nyaml.safe_load(s)\n"
          "yaml.load(s, Loader=yaml.SafeLoader)\nclass Strict(yaml.SafeLoader): pass\nyaml.load(s, Loader=Strict)\n")
    assert unsafe_calls(ok) == []
    restricted = ("import pickle\nclass Allowlist(pickle.Unpickler):\n    def find_class(self, module, name):\n"
                  "        raise pickle.UnpicklingError(name)\nAllowlist(stream).load()\n")
    assert unsafe_calls(restricted) == []
    assert unsafe_calls(restricted + "pickle.loads(data)\npickle.Unpickler(stream).load()\n") == \
        ["pickle.loads(", "pickle.Unpickler("]
    assert unsafe_calls(restricted.replace("find_class", "persistent_load")) == ["import pickle"]


def test_package_source_has_no_unsafe_deserialization():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    problems = {str(f.relative_to(PACKAGE)): unsafe_calls(f.read_text()) for f in files}
    assert {f: p for f, p in problems.items() if p} == {}


def test_trust_remote_code_is_off_by_default_and_never_forced_on():
    assert load_config(None).model.trust_remote_code is False
    forced = [str(f) for f in PACKAGE.rglob("*.py") if "trust_remote_code=True" in f.read_text().replace(" ", "")]
    assert forced == []


@pytest.fixture
def remote_code_model(tmp_path: Path, tiny_llama_dir: Path) -> tuple[Path, Path]:
    """The tiny Llama plus an ``auto_map`` pointing at shipped code that leaves a marker file."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    marker = tmp_path / "remote-code-ran"
    (model / "evil_config.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'llama'\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_config.EvilConfig"}
    (model / "config.json").write_text(json.dumps(config))
    return model, marker


def _generate(model: Path, tmp_path: Path, *extra: str):
    args = ["generate", "--set", f"model.path={model}", "--set", "teacher.backend=hf", "--set",
            "teacher.dtype=float32", "--set", "data.random.num_sequences=2", "--set", "data.random.length=8",
            "--set", f"cache.path={tmp_path / 'cache'}", "--set", "cache.k=4"]
    for item in extra:
        args += ["--set", item]
    return CliRunner().invoke(cli, args)


def test_code_shipped_in_a_checkpoint_does_not_run_by_default(remote_code_model, tmp_path):
    model, marker = remote_code_model
    result = _generate(model, tmp_path)
    assert result.exit_code == 0, result.output
    assert not marker.exists()


def test_trust_remote_code_on_runs_it_and_the_cli_says_so(remote_code_model, tmp_path, caplog):
    """The control for the test above: the same checkpoint with the switch on does run its code."""
    model, marker = remote_code_model
    with caplog.at_level(logging.WARNING, logger="qadpipe.cli"):
        _generate(model, tmp_path, "model.trust_remote_code=true")
    assert any("trust_remote_code is on" in r.getMessage() and str(model) in r.getMessage() for r in caplog.records)
    assert marker.exists()


class _Payload:
    """Unpickling this calls Path.write_text: what a malicious trainer_state.pt would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "pwned")


def test_a_pickle_payload_in_a_checkpoint_is_refused_not_run(tmp_path):
    from safetensors.torch import save_file

    from qadpipe.distill.checkpoint import MODEL_FILE, STATE_FILE, load_checkpoint

    marker = tmp_path / "payload-ran"
    step = tmp_path / "step-00000001"
    step.mkdir()
    save_file({"w": torch.zeros(2)}, str(step / MODEL_FILE))
    torch.save({"step": 1, "optimizer": _Payload(marker)}, step / STATE_FILE)
    with pytest.raises(DistillError, match=r"step-00000001: unreadable checkpoint \(UnpicklingError"):
        load_checkpoint(step)
    assert not marker.exists()
    torch.load(step / STATE_FILE, weights_only=False)  # control: the payload is live
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("uri", ["s3://AKIAX:topsecret@bucket/cache", "s3://bucket/cache?secret_key=topsecret",
                                 "s3://bucket/cache?access_key=AKIAX&region=us-east-1"])
def test_a_cache_uri_carrying_credentials_is_refused_without_echoing_them(uri):
    meta = cache_meta("topk", k=4)
    with pytest.raises(CacheError, match=r"carries credentials.*AWS_ACCESS_KEY_ID") as info:
        write_cache(uri, meta, random_rows(meta, 1))
    assert "topsecret" not in str(info.value) and "AKIAX" not in str(info.value)


def _files_containing(root: Path, needles: tuple[str, ...]) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and any(n.encode() in p.read_bytes() for n in needles)]


@pytest.mark.slow
def test_credentials_in_the_environment_reach_no_output_or_log(tmp_path, tiny_llama_dir):
    """generate -> distill -> export in subprocesses with fake AWS keys in the environment
    (debug logging on): no output file and no line of stdout/stderr contains them."""
    config = {
        "model": {"path": str(tiny_llama_dir), "dtype": "float32"},
        "teacher": {"backend": "hf", "dtype": "float32", "device": "cpu"},
        "data": {"source": "random", "random": {"num_sequences": 6, "length": 12}},
        "cache": {"path": str(tmp_path / "out" / "cache"), "k": 4, "rows_per_shard": 3},
        "quant": {"group_size": 32, "calibration_batches": 1},
        "distill": {"output_dir": str(tmp_path / "out" / "student"), "max_steps": 2, "batch_size": 2,
                    "eval_rows": 2, "save_every": 1, "device": "cpu"},
        "export": {"format": "fake", "output_dir": str(tmp_path / "out" / "export")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_SESSION_TOKEN": SECRET + "-token"}
    logs = ""
    for stage in ("generate", "distill", "export"):
        proc = subprocess.run([sys.executable, "-m", "qadpipe.cli", "-v", stage, "-c", str(path)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        logs += proc.stdout + proc.stderr
    assert "generate" in logs and "distill" in logs  # the logs were really captured
    assert SECRET not in logs and KEY_ID not in logs
    written = list((tmp_path / "out").rglob("*"))
    assert len([p for p in written if p.is_file()]) > 10
    assert _files_containing(tmp_path / "out", (SECRET, KEY_ID)) == []
