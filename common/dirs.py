"""Directory writes that never leave a half state: a finished temp directory renamed into place."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def replace_dir_atomically(tmp: Path, dest: Path) -> None:
    """Move a finished temp directory to `dest`, replacing an older one without a half state."""
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
