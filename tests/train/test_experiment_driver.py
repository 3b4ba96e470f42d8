"""experiments/distill.py --quick runs end to end on the CPU on a tiny model and writes every result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import REPO


def test_distill_experiment_quick(tiny_teacher: Path, shared_data_dir: Path, tmp_path: Path):
    out, student = tmp_path / "out", tmp_path / "student"
    result = subprocess.run([sys.executable, "experiments/distill.py", "--teacher", str(tiny_teacher),
                             "--data-dir", str(shared_data_dir), "--out", str(out), "--tokens", "1024", "--quick",
                             "--save-student", str(student)], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert r["teacher_wikitext2_ppl"] > 1
    assert len(r["importance"]["block_influence"]) == 4 and r["importance"]["chosen"]["layers"]
    assert set(r["kd"]["runs"]) == {"ce", "fkl", "jsd", "fkl_layers"}
    assert all(run["train_tokens"] >= 1024 and run["wikitext2_ppl"] > 1 for run in r["kd"]["runs"].values())
    assert {"hf_ce", "chunked_ce", "kd"} <= set(r["speed"])
    assert 0 <= r["dss"]["label_only"]["test_accuracy"] <= 1 and r["dss"]["label_rationale"]["alpha"] == 0.5
    saved = json.loads((student / "shrink.json").read_text())
    assert saved["metrics"]["kept_layers"] == r["importance"]["chosen"]["layers"]
    assert json.loads((student / "config.json").read_text())["num_hidden_layers"] == 2
