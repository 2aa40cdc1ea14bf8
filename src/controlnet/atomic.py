"""Atomic writes: a file or folder is either complete under its name or absent.

Everything a later reader or a resumed run trusts (weights, checkpoints, caches, datasets, sidecars, annotated
maps) is written into a hidden folder beside its destination and renamed into place. A rename within one
filesystem is atomic (POSIX rename(2)), so a killed writer leaves at most a hidden leftover, never a half-written
file under the real name. Standard library only: world/ (numpy/OpenCV) and annotate/ use it as well as io/.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# What to do when the destination exists by the time the block is done.
EXISTS_POLICIES = ("replace", "keep", "error")


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, *, exists: str = "replace", prefix: str | None = None, fsync: bool = False
) -> Iterator[Path]:
    """Yield a temporary path beside `path`; the block writes a file there or makes a folder there; when the
    block succeeds it is renamed onto `path`, when it fails nothing changes at `path`.

    exists: "replace" (default): an existing file is replaced by the rename itself; an existing folder (which
            cannot be renamed over) is first moved into the hidden folder, our result renamed into place, and the
            old one deleted with the hidden folder, so no half-deleted folder is ever left under `path`.
            "keep": an existing `path` wins and ours is dropped (another writer finished the same cache first).
            "error": an existing `path` raises FileExistsError (checked just before the rename).
    prefix: the hidden folder's name prefix (default ".NAME."), for owners that sweep their leftovers by prefix.
    fsync: flush every file written, and then the parent folder's entry, to disk (checkpoints, resume states).
    """
    if exists not in EXISTS_POLICIES:
        raise ValueError(f"exists={exists!r}: expected one of {', '.join(EXISTS_POLICIES)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hidden = Path(tempfile.mkdtemp(prefix=prefix or f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = hidden / path.name
    try:
        yield target
        if fsync:
            for file in [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file()):
                fsync_path(file)
        _rename_into_place(target, path, hidden, exists)
        if fsync:
            fsync_path(path.parent)
    finally:
        shutil.rmtree(hidden, ignore_errors=True)


def _rename_into_place(target: Path, path: Path, hidden: Path, exists: str) -> None:
    if os.path.lexists(path):
        if exists == "keep":
            return
        if exists == "error":
            raise FileExistsError(f"{path}: already exists; it was not replaced")
        if path.is_dir() and not path.is_symlink():
            os.rename(path, hidden / f"{path.name}.replaced")
    try:
        os.replace(target, path)
    except OSError:
        if exists == "keep" and os.path.lexists(path):  # another writer got there between the check and here
            return
        raise


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process's file-creation mask, read without changing it where Linux tells it (/proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only read here)
    os.umask(mask)
    return mask


def give_umask_modes(root: str | os.PathLike) -> None:
    """Give `root` (a file) or every file under it the mode a file created by open() gets (0o666 & ~umask: 0644
    by default). For writers that create their files 0600 (safetensors' `save_file`, which diffusers'
    `save_pretrained` calls), whose weights another user (a web UI's) could not read."""
    root = Path(root)
    mode = 0o666 & ~umask()
    for path in [root] if root.is_file() else root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)
