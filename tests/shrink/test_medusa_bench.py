"""experiments/medusa_bench.py --smoke: trains Medusa heads on a tiny teacher's samples through `distill=medusa`
and reports each head's agreement and the mean accepted length at every k, untrained and trained (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support import load_experiment


def test_medusa_bench_smoke(tiny_teacher: Path, shared_data_dir: Path, tmp_path: Path, monkeypatch):
    """The script's main() in this process (its training run is still a `python -m shrink`
    subprocess): a process of its own would only add an interpreter and torch start-up."""
    lines = tmp_path / "results.jsonl"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # (its training subprocess: one thread, as before)
    load_experiment("medusa_bench").main(
        ["--teacher", str(tiny_teacher), "--data-dir", str(shared_data_dir), "--out", str(tmp_path / "out"),
         "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--smoke", "--num-heads", "3", "--json",
         str(lines)])
    rows = [json.loads(line) for line in lines.read_text().splitlines()]
    (train,) = [r for r in rows if r["bench"] == "medusa_train"]
    assert train["loss"] == "tvd" and train["num_heads"] == 3 and train["train_tokens"] == 1024
    for key in ("head_agreement", "init_head_agreement"):
        assert len(train[key]) == 3 and all(0.0 <= a <= 1.0 for a in train[key])
    for key in ("mean_accepted_length", "init_mean_accepted_length"):
        assert list(train[key]) == ["1", "2", "3"] and all(1.0 <= v <= int(k) + 1 for k, v in train[key].items())
    assert Path(train["teacher_data"]).is_dir() and train["val_positions"] > 0
    (total,) = [r for r in rows if r["bench"] == "medusa_bench_total"]
    assert total["runs"] == 1 and total["wall_s"] >= train["process_s"] > 0


def test_losses_are_checked():
    bench = load_experiment("medusa_bench")
    assert bench.parse_args(["--teacher", "t", "--data-dir", "d", "--out", "o", "--losses", "forward_kl,tvd"]).losses \
        == ["forward_kl", "tvd"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--teacher", "t", "--data-dir", "d", "--out", "o", "--losses", "ce"])
