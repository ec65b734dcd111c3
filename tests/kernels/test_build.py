"""Building a CPU kernel once per machine: cached by source, atomic, one clear line on failure."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from qadpipe.kernels import build
from qadpipe.kernels.build import KernelBuildError, load_kernel


@pytest.fixture()
def kernel_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("QADPIPE_CACHE_DIR", str(tmp_path / "cache"))
    load_kernel.cache_clear()
    yield tmp_path / "cache" / "kernels"
    load_kernel.cache_clear()


def write_source(path: Path, body: str) -> Path:
    path.write_text('extern "C" int answer(int x) { ' + body + " }\n")
    return path


def test_a_kernel_builds_once_and_a_changed_source_builds_anew(kernel_dir, tmp_path):
    source = write_source(tmp_path / "answer.cpp", "return x + 1;")
    lib = load_kernel(source)
    lib.answer.argtypes, lib.answer.restype = [ctypes.c_int], ctypes.c_int
    assert lib.answer(41) == 42
    [built] = kernel_dir.glob("answer-*.so")
    stamp = built.stat().st_mtime_ns
    load_kernel.cache_clear()
    load_kernel(source)                                   # a new process: the cached build is reused
    assert [p.stat().st_mtime_ns for p in kernel_dir.glob("answer-*.so")] == [stamp]

    write_source(source, "return x * 2;")
    load_kernel.cache_clear()
    doubled = load_kernel(source)
    doubled.answer.argtypes, doubled.answer.restype = [ctypes.c_int], ctypes.c_int
    assert doubled.answer(21) == 42 and len(list(kernel_dir.glob("answer-*.so"))) == 2


def test_a_failing_build_says_so_in_one_line_and_leaves_nothing(kernel_dir, tmp_path):
    source = write_source(tmp_path / "broken.cpp", "return x +;")
    with pytest.raises(KernelBuildError, match=r"^broken\.cpp: c\+\+ failed \(.*\)$") as failure:
        load_kernel(source)
    assert "\n" not in str(failure.value)
    assert not list(kernel_dir.glob("*.so")) and not list(kernel_dir.glob(".tmp-*"))


def test_a_missing_compiler_is_named(kernel_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(KernelBuildError, match="no C\\+\\+ compiler 'no-such-compiler' on PATH \\(set CXX\\)"):
        load_kernel(write_source(tmp_path / "answer.cpp", "return x;"))


def test_a_cache_directory_that_cannot_be_written_is_named(kernel_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("QADPIPE_CACHE_DIR", str(blocker / "cache"))   # a directory under a file
    with pytest.raises(KernelBuildError, match=r"answer\.cpp: cannot build into .*a-file/cache/kernels "
                                               r"\(.*\); set QADPIPE_CACHE_DIR to a writable directory"):
        load_kernel(write_source(tmp_path / "answer.cpp", "return x;"))


def test_a_build_that_cannot_be_loaded_is_one_line_naming_the_file(kernel_dir, tmp_path, monkeypatch):
    """What a noexec cache directory or a build for another node's libraries looks like: the
    file is there, the dynamic loader refuses it."""
    monkeypatch.setattr(build, "_compile", lambda compiler, source, target: target.write_bytes(b"not an ELF file"))
    with pytest.raises(KernelBuildError, match=r"/answer-[0-9a-f]+\.so: built but cannot be loaded \(.*\); "
                                               r"delete it to rebuild"):
        load_kernel(write_source(tmp_path / "answer.cpp", "return x;"))


def test_the_prompt_logprob_plugin_falls_back_to_torch_ops_when_the_kernel_cannot_load(kernel_dir, caplog,
                                                                                       monkeypatch):
    import torch

    from qadpipe.teacher import vllm_fused_logprobs as fused

    monkeypatch.setattr(build, "_compile", lambda compiler, source, target: target.write_bytes(b"not an ELF file"))
    fused._native_kernel_builds.cache_clear()
    try:
        logits = torch.randn(4, 4096)                     # a shape the kernel takes
        ids, logprobs, _ = fused._topk_logprobs(logits, 8, torch.tensor([0, 1, 2, 3]))
    finally:
        fused._native_kernel_builds.cache_clear()
    reference = torch.log_softmax(logits.double(), -1).topk(8)
    assert torch.equal(ids[:, 1:].long(), reference.indices)
    torch.testing.assert_close(logprobs[:, 1:].double(), reference.values, rtol=0, atol=1e-5)
    assert any("built but cannot be loaded" in r.getMessage() and "fall back to torch ops" in r.getMessage()
               for r in caplog.records)


GRAVITON2 = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1
"""
GRAVITON3 = GRAVITON2.replace("0xd0c", "0xd40").replace("asimddp ssbs", "asimddp ssbs sve sve2 bf16")


def test_each_kind_of_cpu_gets_its_own_kernel_build():
    """Arm's cpuinfo has no 'model name' or 'flags': every Arm node got the signature '' and so
    one shared .so, built -march=native for whichever node built it first (SVE on a node without)."""
    from qadpipe.kernels.build import cpu_signature

    n1, v1 = cpu_signature(GRAVITON2), cpu_signature(GRAVITON3)
    assert n1 and v1 and n1 != v1
    assert cpu_signature(GRAVITON2.replace("processor\t: 0", "processor\t: 7")) == n1   # any core of it
    x86 = "processor\t: 0\nmodel name\t: Xeon\nflags\t\t: avx512f\ncpu MHz\t\t: 2100.0\n"
    assert cpu_signature(x86) == cpu_signature(x86.replace("2100.0", "3400.5").replace(": 0", ": 1"))
    assert cpu_signature(x86) != cpu_signature(x86.replace("avx512f", "avx2"))
