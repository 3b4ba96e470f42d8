"""Artifacts round-trip through transformers, record lineage, and are written atomically."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from support import REPO, save_tiny_artifact
from shrink.artifacts import META_FILE, Artifact, write_artifact
from common.errors import ShrinkError
from shrink.modeling import load_model, save_model_artifact


def test_round_trip_same_logits_and_lineage(tiny_teacher: Path, tmp_path: Path):
    teacher = Artifact.load(tiny_teacher)
    model = load_model(teacher)
    ids = torch.randint(3, 300, (2, 17))
    child = save_model_artifact(tmp_path / "child", model, None, stage="distill", inputs=[teacher],
                                metrics={"x": 1.5})
    again = AutoModelForCausalLM.from_pretrained(child.path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    loaded = Artifact.load(child.path)
    assert loaded.meta["inputs"][0]["content_hash"] == teacher.content_hash
    assert loaded.metrics == {"x": 1.5}
    assert [a.stage for a in loaded.lineage()] == ["distill", "import"]
    assert len(loaded.content_hash) == 64


def test_failed_save_leaves_nothing(tmp_path: Path):
    def save(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_artifact(tmp_path / "a", stage="x", save=save)
    assert list(tmp_path.iterdir()) == []


def test_killed_write_leaves_no_complete_looking_artifact(tmp_path: Path):
    """A writer killed mid-save leaves only a hidden temp dir; the old artifact stays intact."""
    dest = tmp_path / "art"
    save_tiny_artifact(dest)
    before = Artifact.load(dest).content_hash
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from shrink.artifacts import write_artifact
        def save(tmp):
            (tmp / "config.json").write_text("{{}}")
            (tmp / "model.safetensors").write_bytes(b"x" * 1000)
            print("saving", flush=True)
            time.sleep(60)
        write_artifact(Path({str(dest)!r}), stage="x", save=save)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saving"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert Artifact.load(dest).content_hash == before
    leftovers = [p for p in tmp_path.iterdir() if p.name != "art"]
    assert leftovers and all(p.name.startswith(".art.tmp-") for p in leftovers)
    assert all(not (p / META_FILE).exists() for p in leftovers)


def test_directory_without_meta_is_refused(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ShrinkError, match="incomplete artifact"):
        Artifact.load(tmp_path)


def test_corrupt_meta_is_refused(tmp_path: Path):
    (tmp_path / META_FILE).write_text("{not json")
    with pytest.raises(ShrinkError, match="corrupt"):
        Artifact.load(tmp_path)


def test_plain_model_dir_gets_the_content_hash_of_its_weights(tiny_teacher: Path, tmp_path: Path):
    """A Hugging Face directory without shrink.json (a converted GGUF) is hashed as an artifact's files are:
    the same weights give the same hash as the artifact, other weights another; an artifact reads its own."""
    import shutil

    assert Artifact.from_model_dir(tiny_teacher).meta == Artifact.load(tiny_teacher).meta
    plain = tmp_path / "plain"
    shutil.copytree(tiny_teacher, plain)
    (plain / META_FILE).unlink()
    assert Artifact.from_model_dir(plain).content_hash == Artifact.load(tiny_teacher).content_hash
    other = save_tiny_artifact(tmp_path / "other", seed=1)
    (other / META_FILE).unlink()
    assert Artifact.from_model_dir(other).content_hash not in ("", Artifact.load(tiny_teacher).content_hash)
    with pytest.raises(ShrinkError, match="not a model directory"):
        Artifact.from_model_dir(tmp_path / "missing")
