"""Artifacts: a directory transformers can load, plus `shrink.json` (stage, config, inputs, metrics).

Writes are atomic: everything goes to a hidden temp directory beside the destination, `shrink.json`
last, then one rename puts it in place. A killed write leaves only a `.tmp-*` directory, never a
directory that looks complete; `Artifact.load` refuses a directory without `shrink.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from common.dirs import check_replaceable, replace_dir_atomically
from common.errors import ShrinkError

META_FILE = "shrink.json"
_HASHED_SUFFIXES = (".safetensors", ".json", ".bin", ".model", ".txt")


@dataclass
class Artifact:
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Artifact":
        path = Path(path)
        meta_path = path / META_FILE
        if not path.is_dir():
            raise ShrinkError(f"artifact not found: {path}")
        if not meta_path.is_file():
            raise ShrinkError(f"incomplete artifact (no {META_FILE}): {path}")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ShrinkError(f"corrupt {meta_path}: {e}") from None
        return cls(path=path, meta=meta)

    @property
    def stage(self) -> str:
        return self.meta.get("stage", "?")

    @property
    def content_hash(self) -> str:
        return self.meta.get("content_hash", "")

    @property
    def metrics(self) -> dict[str, Any]:
        return self.meta.get("metrics", {})

    def ref(self) -> dict[str, str]:
        """How a later artifact names this one in its lineage."""
        return {"path": str(self.path.resolve()), "stage": self.stage, "content_hash": self.content_hash}

    def lineage(self) -> list["Artifact"]:
        """This artifact and its first input, recursively, oldest last."""
        chain, current, seen = [self], self, {self.path.resolve()}
        while current.meta.get("inputs"):
            parent = Path(current.meta["inputs"][0]["path"])
            if parent.resolve() in seen or not (parent / META_FILE).is_file():
                break
            current = Artifact.load(parent)
            seen.add(parent.resolve())
            chain.append(current)
        return chain


def _hashed_files(directory: Path) -> list[Path]:
    return sorted(p for p in Path(directory).rglob("*")
                  if p.is_file() and p.name != META_FILE and p.name.endswith(_HASHED_SUFFIXES))


def content_hash(directory: Path) -> str:
    """sha256 over the names and bytes of the model files (shrink.json itself excluded)."""
    digest = hashlib.sha256()
    for file in _hashed_files(directory):
        digest.update(str(file.relative_to(directory)).encode())
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def file_stamp(directory: Path) -> str:
    """A cheap fingerprint of the model files: names, sizes and modification times."""
    entries = [(str(f.relative_to(directory)), f.stat().st_size, f.stat().st_mtime_ns)
               for f in _hashed_files(directory)]
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
        problems = [p for p in (_safetensors_problem(f) for f in weights) if p]
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


def _safetensors_problem(file: Path) -> str | None:
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
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{file.name} has a corrupt header"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
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
        problem = _safetensors_problem(file)
        if problem:
            raise ShrinkError(f"{what}: {problem} in {path}")


def _git_rev() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    import torch
    import transformers

    import shrink

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shrink": shrink.__version__,
    }


def write_artifact(
    dest: str | os.PathLike,
    *,
    stage: str,
    save: Callable[[Path], None],
    config: dict[str, Any] | None = None,
    inputs: list[Artifact] | None = None,
    metrics: dict[str, Any] | None = None,
    started: float | None = None,
) -> Artifact:
    """Run `save(tmp_dir)` to write the payload, add shrink.json, then rename into place."""
    dest = Path(dest)
    check_replaceable(dest, META_FILE)  # before the work: a user's directory is never replaced
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save(tmp)
        meta = {
            "stage": stage,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": config or {},
            "inputs": [a.ref() for a in inputs or []],
            "metrics": metrics or {},
            "wall_time_s": round(time.time() - started, 3) if started else None,
            "versions": _versions(),
            "git_rev": _git_rev(),
            "content_hash": content_hash(tmp),
        }
        tmp_meta = tmp / (META_FILE + ".partial")
        tmp_meta.write_text(json.dumps(meta, indent=2, default=str))
        os.replace(tmp_meta, tmp / META_FILE)
        replace_dir_atomically(tmp, dest, META_FILE)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Artifact(path=dest, meta=meta)

