"""Every output qadpipe stages (cache shards and manifests, run records, checkpoints, the
student, an export) is published with the modes the umask allows, like any file the user
creates -- not mkstemp's, mkdtemp's or safetensors' private 0600/0700: on a shared cluster
filesystem other jobs and users read them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from cache_rows import cache_meta, random_rows, write_cache
from qadpipe.config import load_config
from qadpipe.distill.checkpoint import TrainerState, save_checkpoint
from qadpipe.distill.student import save_student
from qadpipe.export.writer import staged_dir, write_safetensors


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=["umask022", "umask077", "umask002"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def write_everything(root: Path) -> None:
    config = load_config(None)
    write_cache(root / "cache", cache_meta("topk"), random_rows(cache_meta("topk"), 3))
    state = {"w": torch.zeros(4)}
    save_checkpoint(root / "run", state, TrainerState(step=1, optimizer={}, scheduler={}, loader={}, rng={}), config)
    save_student(root / "run", state, config)
    with staged_dir(root / "export") as tmp:
        write_safetensors({"w": torch.zeros(4)}, tmp)


def test_outputs_get_the_umask_modes(tmp_path, umask):
    write_everything(tmp_path)
    entries = [p for p in tmp_path.rglob("*") if not p.name.endswith(".lock")]
    assert len([p for p in entries if p.is_file()]) >= 8
    for path in entries:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path.relative_to(tmp_path)


def _acl(entries: list[tuple[int, int, int]]) -> bytes:
    """A POSIX ACL xattr value (version 2; (tag, perm, id) entries), as setfacl writes it."""
    import struct

    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


def _acl_entries(path: Path) -> list[tuple[int, int, int]]:
    import struct

    raw = os.getxattr(path, "system.posix_acl_access")
    return [struct.unpack("<HHI", raw[4 + 8 * i:12 + 8 * i]) for i in range((len(raw) - 4) // 8)]


def test_outputs_under_a_default_acl_keep_the_acl_s_named_group(tmp_path):
    """A project directory with a default ACL granting a group: the kernel applies the ACL, not
    the umask, to new entries; qadpipe chmod'ed its outputs to 0666 & ~umask, which set the ACL
    mask to --- under umask 077 and shut the group out of every shard, checkpoint and export."""
    undefined, group = 0xFFFFFFFF, 4242
    shared = tmp_path / "project"
    shared.mkdir()
    try:
        os.setxattr(shared, "system.posix_acl_default", _acl([(0x01, 7, undefined), (0x04, 5, undefined),
                                                             (0x08, 7, group), (0x10, 7, undefined),
                                                             (0x20, 0, undefined)]))
    except OSError as exc:
        pytest.skip(f"no POSIX ACLs on this filesystem ({exc.strerror})")
    previous = os.umask(0o077)
    try:
        write_everything(shared)
        plain = shared / "plain.txt"   # what an ordinary open() gets here
        plain.write_text("x")
    finally:
        os.umask(previous)
    entries = [p for p in shared.rglob("*") if not p.name.endswith(".lock")]
    assert len([p for p in entries if p.is_file()]) >= 8
    for path in entries:
        mask = next(perm for tag, perm, _ in _acl_entries(path) if tag == 0x10)
        assert mask == (7 if path.is_dir() else 6), path.relative_to(shared)
        assert (0x08, 7, group) in _acl_entries(path), path.relative_to(shared)
    assert stat.S_IMODE(plain.stat().st_mode) == 0o660
    assert not list(shared.rglob(".qadpipe-mode-probe-*"))


def test_sharing_a_staged_tree_leaves_what_its_links_point_at_alone(tmp_path):
    """A link in a staged output (a model file linked, not copied) names someone else's file:
    chmod through it would change that file's modes, outside the output."""
    from qadpipe.file_modes import share_tree

    outside = tmp_path / "private.bin"
    outside.write_bytes(b"x")
    outside.chmod(0o600)
    staged = tmp_path / "staged"
    staged.mkdir(0o700)
    (staged / "weights.bin").symlink_to(outside)
    (staged / "config.json").write_text("{}")
    share_tree(staged)
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600
