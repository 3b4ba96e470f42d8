"""Where shared data and caches live. Nothing here is a hard-coded absolute path."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
WIKITEXT_FILE = "wikitext-2-raw/wiki.test.raw"  # WikiText-2's raw test split under a data dir


def default_data_dir() -> Path | None:
    """`SHRINK_DATA_DIR` if set, else `../shared/data` beside the checkout (or the cwd) when present."""
    env = os.environ.get("SHRINK_DATA_DIR")
    if env:
        return Path(env)
    for base in (REPO_ROOT, Path.cwd()):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def data_dir(cfg) -> Path | None:
    """A run config's `data_dir=` (shared data: WikiText-2, corpus, reasoning), else default_data_dir()."""
    return Path(str(cfg.data_dir)) if cfg.get("data_dir") else default_data_dir()


def default_cache_dir() -> Path:
    env = os.environ.get("SHRINK_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "shrink" if xdg else Path.home() / ".cache" / "shrink"
