"""eval verifies what it reads: a damaged artifact is reported as damaged, never with old numbers
(issue 11, finding 2)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from shrink.artifacts import Artifact
from shrink.verify import verify_artifact
from support import run_main, save_tiny_artifact
from test_cli import TINY


def _rows(run: Path) -> dict[str, dict]:
    return {r["artifact"]: r for r in json.loads((run / "eval" / "report.json").read_text())["rows"]}


# The measurements this test reads nothing of, off: the verification runs as each artifact is
# loaded, and perplexity (on) is the cached number a damaged artifact must not be reported with.
ONLY_PERPLEXITY = ["eval.tasks.enabled=false", "eval.agreement.enabled=false", "eval.speed.enabled=false",
                   "eval.load.enabled=false", "eval.plots=false"]


def test_truncated_weights_are_reported_damaged_not_with_cached_numbers(tiny_teacher: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(tiny_teacher, run / "teacher")
    save_tiny_artifact(run / "distill", seed=1)
    first = run_main("stage=eval", f"run={run}", *TINY, *ONLY_PERPLEXITY)
    assert first.returncode == 0, first.stderr[-2000:]
    assert _rows(run)["distill"]["ppl_heldout"] > 1.0
    with open(run / "distill" / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    second = run_main("stage=eval", f"run={run}", *TINY, *ONLY_PERPLEXITY)
    assert second.returncode == 0, second.stderr[-2000:]
    rows = _rows(run)
    assert "damaged" in rows["distill"]["status"].lower()
    assert rows["distill"].get("ppl_heldout") is None
    assert rows["teacher"]["status"] == "ok" and rows["teacher"]["ppl_heldout"] > 1.0
    assert "distill" in second.stdout and "damaged" in second.stdout.lower()


def test_same_size_change_is_caught_by_the_full_hash(tmp_path: Path):
    art = Artifact.load(save_tiny_artifact(tmp_path / "a"))
    stamps: dict = {}
    assert verify_artifact(art, stamps) is None and stamps  # hashed once, stamp recorded
    weights = art.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes, new mtime
    weights.write_bytes(bytes(data))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert "content hash" in verify_artifact(art, stamps)


def test_unchanged_stamp_skips_the_rehash(tmp_path: Path, monkeypatch):
    art = Artifact.load(save_tiny_artifact(tmp_path / "a"))
    stamps: dict = {}
    assert verify_artifact(art, stamps) is None
    import shrink.verify as verify

    def no_hash(_):
        raise AssertionError("re-hashed an unchanged artifact")

    monkeypatch.setattr(verify, "content_hash", no_hash)
    assert verify_artifact(art, stamps) is None


def test_model_file_checks_name_each_problem(tmp_path: Path):
    import pytest

    from common.errors import ShrinkError
    from shrink.verify import check_model_files

    art = save_tiny_artifact(tmp_path / "a")
    check_model_files(art, "input=a")  # a complete artifact passes
    weights = art / "model.safetensors"
    original = weights.read_bytes()
    header = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": 7}}'
    for payload, needle in [(original[:5], "truncated"), (original[:-10], "truncated"),
                            (len(header).to_bytes(8, "little") + header, "corrupt header")]:
        weights.write_bytes(payload)
        with pytest.raises(ShrinkError, match=needle):
            check_model_files(art, "input=a")
    (art / "config.json").write_text("{oops")
    with pytest.raises(ShrinkError, match="corrupt"):
        check_model_files(art, "input=a")
