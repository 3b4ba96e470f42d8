"""experiments/spec_round_profile.py: the trace's GPU busy time (interval union) and a CPU run end to end
with a tiny model (no GPU: the busy time is zero, the rest of the record is real)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support import load_experiment, save_tiny_artifact


@pytest.fixture(scope="module")
def prof():
    return load_experiment("spec_round_profile")


def test_busy_seconds_is_the_union_of_kernel_and_copy_intervals(prof):
    ev = [{"ph": "X", "cat": "kernel", "ts": 0, "dur": 10}, {"ph": "X", "cat": "kernel", "ts": 5, "dur": 10},  # overlap
          {"ph": "X", "cat": "gpu_memcpy", "ts": 30, "dur": 5}, {"ph": "X", "cat": "kernel", "ts": 31, "dur": 2},  # inside
          {"ph": "X", "cat": "cpu_op", "ts": 0, "dur": 100},  # host: not GPU time
          {"ph": "X", "cat": "gpu_memset", "ts": 50, "dur": 4}]
    busy, window, kernels = prof.busy_seconds({"traceEvents": ev})
    assert busy == pytest.approx((15 + 5 + 4) / 1e6)
    assert window == pytest.approx(54 / 1e6)
    assert kernels == 3
    assert prof.busy_seconds({"traceEvents": []}) == (0.0, 0.0, 0)


def test_cpu_run_records_each_variant(prof, tmp_path, capsys):
    model = save_tiny_artifact(tmp_path / "tiny", num_hidden_layers=2)
    wiki = tmp_path / "data" / "wikitext-2-raw"
    wiki.mkdir(parents=True)
    para = ("The river runs past the old mill and the mill stands by the river. " * 8).strip()
    (wiki / "wiki.test.raw").write_text(" = Title = \r\n" + para + "\r\n")
    out = tmp_path / "out"
    prof.main(["--target", str(model), "--data-dir", str(tmp_path / "data"), "--out", str(out), "--new-tokens", "12",
               "--prompt-tokens", "24", "--variants", "plain_1step,spec", "--json", str(tmp_path / "r.jsonl"),
               "--engine", json.dumps({"device": "cpu", "max_model_len": 256})])
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["plain_1step", "ngram_k4"]
    plain, spec = rows
    assert "error" not in plain and "error" not in spec
    assert plain["tokens"] == spec["tokens"] == 12
    assert plain["steps"] == 12 and plain["tokens_per_step"] == 1.0  # one token a step
    assert spec["spec_metrics"]["num_emitted_tokens"] > 0
    assert plain["spec_metrics"] is None
    for name in ("plain_1step", "ngram_k4"):
        for suffix in (".ops.txt", ".cprofile.txt", ".trace.json.gz"):
            assert (out / f"{name}{suffix}").stat().st_size > 0


def test_unknown_variant_is_refused_before_any_work(prof, tmp_path):
    with pytest.raises(SystemExit):
        prof.main(["--target", str(tmp_path / "missing"), "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"),
                   "--variants", "plain,fast"])
    assert not (tmp_path / "o").exists()
