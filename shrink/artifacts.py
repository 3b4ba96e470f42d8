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

    @classmethod
    def from_model_dir(cls, path: str | os.PathLike) -> "Artifact":
        """An artifact (read as `load` reads it), or a plain Hugging Face model directory without
        `shrink.json` (e.g. a converted GGUF) with its content hash computed from the model files, so
        what is derived from it (teacher data's lineage and cache key) still names the weights it came from."""
        path = Path(path)
        if (path / META_FILE).is_file():
            return cls.load(path)
        if not (path / "config.json").is_file():
            raise ShrinkError(f"not a model directory (no config.json): {path}")
        return cls(path=path, meta={"content_hash": content_hash(path)})

    @property
    def stage(self) -> str:
        return self.meta.get("stage", "?")

    @property
    def content_hash(self) -> str:
        return self.meta.get("content_hash", "")

    @property
    def metrics(self) -> dict[str, Any]:
        return self.meta.get("metrics", {})

    @property
    def reverted(self) -> bool:
        """Whether its stage's quality gate reverted it (gates.action=revert): no later stage reads it."""
        return bool((self.metrics.get("quality_gate") or {}).get("reverted"))

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


def hashed_files(directory: Path) -> list[Path]:
    return sorted(p for p in Path(directory).rglob("*")
                  if p.is_file() and p.name != META_FILE and p.name.endswith(_HASHED_SUFFIXES))


def content_hash(directory: Path) -> str:
    """sha256 over the names and bytes of the model files (shrink.json itself excluded)."""
    digest = hashlib.sha256()
    for file in hashed_files(directory):
        digest.update(str(file.relative_to(directory)).encode())
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


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

