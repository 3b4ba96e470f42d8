"""Verify what is read rather than trust what was recorded: an artifact's files against the content
hash in its shrink.json (a full hash whenever their sizes or modification times changed), and a
model directory's config.json and safetensors files complete before any work."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from common.errors import ShrinkError
from shrink.artifacts import META_FILE, Artifact, content_hash, hashed_files


def file_stamp(directory: Path) -> str:
    """A cheap fingerprint of the model files: names, sizes and modification times."""
    entries = [(str(f.relative_to(directory)), f.stat().st_size, f.stat().st_mtime_ns)
               for f in hashed_files(directory)]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def verify_artifact(artifact: Artifact, stamps: dict[str, dict]) -> str | None:
    """None when the artifact's files are those its shrink.json recorded, else what is wrong.

    A full hash runs unless `stamps` (kept by the caller between runs) holds the same size+mtime
    fingerprint of files already found to match; a passing check is recorded there."""
    key = str(artifact.path.resolve())
    stamp = file_stamp(artifact.path)
    if stamps.get(key) == {"stamp": stamp, "content_hash": artifact.content_hash}:
        return None
    stamps.pop(key, None)
    if not artifact.content_hash:
        return f"{META_FILE} records no content_hash"
    actual = content_hash(artifact.path)
    if actual != artifact.content_hash:
        weights = sorted(Path(artifact.path).glob("*.safetensors"))
        problems = [p for p in (safetensors_problem(f) for f in weights) if p]
        detail = f" ({'; '.join(problems)})" if problems else ""
        return f"content hash differs from {META_FILE}: the files changed or are damaged{detail}"
    stamps[key] = {"stamp": stamp, "content_hash": actual}
    return None


class Verifier:
    """`verify_artifact` with its stamps kept in a run directory between commands, so an unchanged
    artifact is hashed once, not by every command that reads it."""

    FILE = ".verified.json"

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / self.FILE
        try:
            self.stamps: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.stamps = {}  # a damaged stamp file only costs a re-hash

    def problem(self, artifact: Artifact) -> str | None:
        """None when the artifact is intact, else what is wrong with it."""
        found = verify_artifact(artifact, self.stamps)
        tmp = self.path.with_name(f"{self.FILE}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.stamps))
        os.replace(tmp, self.path)
        return found

    def check(self, artifact: Artifact, what: str) -> None:
        found = self.problem(artifact)
        if found:
            raise ShrinkError(f"{what} {artifact.path} is damaged: {found}")


def safetensors_problem(file: Path) -> str | None:
    """Why a .safetensors file is unreadable (truncated, bad header), or None: the header names every
    tensor's byte range, so a complete file ends exactly where the last range does."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{file.name} is truncated ({size} bytes)"
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            return f"{file.name} is truncated or not safetensors (header of {n} bytes, file of {size})"
        try:
            header = json.loads(f.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, IndexError):
            return f"{file.name} has a corrupt header"
    if 8 + n + end != size:
        return f"{file.name} is truncated ({size} bytes, its header needs {8 + n + end})"
    return None


def check_model_files(path: Path, what: str) -> None:
    """A model directory transformers can load: config.json that parses and complete safetensors."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise ShrinkError(f"{what}: {path} has no config.json (not a model directory)")
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShrinkError(f"{what}: corrupt {config}: {e}") from None
    weights = sorted(Path(path).glob("*.safetensors"))
    if not weights:
        raise ShrinkError(f"{what}: {path} has no .safetensors weights")
    for file in weights:
        problem = safetensors_problem(file)
        if problem:
            raise ShrinkError(f"{what}: {problem} in {path}")
