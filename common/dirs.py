"""Directory writes that never leave a half state and never touch a directory that is not ours.

A finished temp directory is renamed into place. The directory it replaces must carry the marker
file the project writes into every directory it owns (an artifact's `shrink.json`, a checkpoint's
state file); any other directory at that path belongs to the user and is an error, never removed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from common.errors import ShrinkError

LOCK_FILE = ".shrink.lock"


def check_replaceable(dest: Path, marker: str) -> None:
    """Raise unless `dest` is absent or a directory the project marked as its own with `marker`."""
    dest = Path(dest)
    if not dest.exists() and not dest.is_symlink():
        return
    if dest.is_symlink() or not dest.is_dir():
        raise ShrinkError(f"{dest} is in the way and not a directory shrink wrote; move it or choose another run=")
    if not (dest / marker).is_file():
        raise ShrinkError(f"{dest} exists and was not written by shrink (no {marker}); it will not be "
                          f"replaced: move it or choose another run=")


def replace_dir_atomically(tmp: Path, dest: Path, marker: str) -> None:
    """Move a finished temp directory to `dest`, replacing an older one of ours without a half state."""
    check_replaceable(dest, marker)
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_marked_dir(path: Path, marker: str) -> None:
    """Remove a directory of ours (absent is fine); anything unmarked is refused, never removed."""
    path = Path(path)
    check_replaceable(path, marker)
    if path.exists():
        shutil.rmtree(path)


@contextmanager
def dir_lock(directory: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `directory` for the block; a second holder gets a ShrinkError at once.

    The lock (flock on a hidden file) dies with its process, so a killed run never leaves it stuck."""
    path = Path(directory) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise ShrinkError(f"{what} is in use by another shrink process (pid {holder}); wait for it to "
                              f"finish or choose another run=") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
