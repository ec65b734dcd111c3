"""Compile a kernel's C++ source once per machine and load it with ctypes.

The kernels need no torch headers, so a build is one compiler call of ~2 s, not a torch
extension build; ``-march=native`` makes it fast where it runs, so the cached library is keyed
by the source, the compiler and the CPU (a home directory shared by a cluster's different
nodes holds one build per kind of node).  Builds are serialised by a file lock and land under
a temporary name, renamed into place, so concurrent jobs neither race nor load half a file.
The compiler is ``$CXX``, else ``c++`` -- what torch.compile on CPU needs too.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from qadpipe.errors import QadpipeError, first_line
from qadpipe.user_cache import cache_root, file_lock

log = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17",
         # x86 compilers default to 256-bit vectors even where AVX-512 is there (measured 1.2x on the exp-sum)
         *(("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ()))


class KernelBuildError(QadpipeError):
    """The C++ compiler is missing or failed on a kernel."""


#: The /proc/cpuinfo fields that say what -march=native compiles for: x86's model and flags,
#: Arm's implementer/part and Features, POWER's cpu, s390's features.
_CPU_FIELDS = frozenset({"model name", "flags", "Features", "CPU implementer", "CPU architecture", "CPU variant",
                         "CPU part", "CPU revision", "cpu", "features"})
#: Fields that differ between the cores or the boots of one kind of CPU.
_VOLATILE_FIELDS = frozenset({"processor", "BogoMIPS", "bogomips", "cpu MHz", "clock", "core id", "apicid",
                              "initial apicid", "physical id", "siblings", "cpu cores"})


def cpu_signature(cpuinfo: str) -> str:
    """The CPU model and feature flags in ``cpuinfo`` (what -march=native compiles for): a
    cluster's nodes share one kernel build per kind of CPU.  A format with none of the known
    fields keeps every line but the per-core ones, never an empty key (on Arm, model name and
    flags are absent: every Arm node shared one build, -march=native of whichever built it)."""
    fields = [(line.split(":", 1)[0].strip(), line) for line in cpuinfo.splitlines() if ":" in line]
    wanted = [line for name, line in fields if name in _CPU_FIELDS]
    if not wanted:
        wanted = [line for name, line in fields if name not in _VOLATILE_FIELDS]
    return "\n".join(sorted(set(wanted))) or platform.machine()


def _cpu_signature() -> str:
    try:
        return cpu_signature(Path("/proc/cpuinfo").read_text())
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str:
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise KernelBuildError(f"no C++ compiler '{compiler}' on PATH (set CXX): qadpipe's CPU kernels need one")
    return compiler


@functools.cache
def load_kernel(source: Path) -> ctypes.CDLL:
    """The shared library built from ``source`` (a .cpp beside this module), built if needed."""
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256("\0".join([source.read_text(), compiler, *version, *FLAGS, _cpu_signature()]).encode())
    target = cache_root() / "kernels" / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if not target.is_file():
        try:
            with file_lock(target.with_suffix(".lock")):
                if not target.is_file():
                    _compile(compiler, source, target)
        except OSError as exc:
            raise KernelBuildError(f"{source.name}: cannot build into {target.parent} ({exc.strerror or exc}); "
                                   "set QADPIPE_CACHE_DIR to a writable directory") from None
    # torch, already loaded, holds the process's libgomp: the kernel links against the same
    # soname, so its parallel regions run on torch's OpenMP threads rather than a second pool.
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:   # a noexec mount, or a build another node's libraries cannot run
        raise KernelBuildError(f"{target}: built but cannot be loaded ({first_line(exc)}); delete it to rebuild, "
                               "or set QADPIPE_CACHE_DIR to a local directory executables may run from") from None


def _compile(compiler: str, source: Path, target: Path) -> None:
    log.info("building the CPU kernel %s -> %s (once per machine)", source.name, target)
    handle, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        done = subprocess.run([compiler, *FLAGS, str(source), "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["no output"]
            first_error = next((line for line in lines if "error" in line), lines[0])
            raise KernelBuildError(f"{source.name}: {compiler} failed ({first_error.strip()})")
        with open(tmp, "rb") as built:
            os.fsync(built.fileno())
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
