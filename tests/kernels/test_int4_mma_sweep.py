"""experiments/int4_mma_sweep.py's code path on CPU (--dry-run: interpreted kernels, tiny shapes):
every path it promises is measured without error for every format, shape and M, the config sweep
and its summaries are there (the timings themselves need the GPU)."""

from __future__ import annotations

import json

import experiments.int4_mma_sweep as sweep
from support import widen_m1_gemv_programs


def test_split_candidates_keep_a_step_per_split():
    for n, k in sweep.SHAPES.values():
        for block_n, block_k, _, _ in sweep.CANDIDATES:
            splits = sweep.split_candidates(n, k, block_n, block_k)
            assert splits and all(k // s >= block_k for s in splits), (n, k, block_n, block_k)
    assert max(sweep.split_candidates(4096, 4096, 64, 256)) * 64 >= sweep.SMS_X2  # o_proj reaches 2 programs / SM


def test_dry_run_flow(monkeypatch, tmp_path):
    # The GEMV baselines at M == 1 run one column a program at these widths (FAST_MIN_PROGRAMS, an H200's
    # occupancy target, and gemv_config without PDL), interpreted one at a time; wider programs run the
    # same kernels and sums (one column a program stays tests/kernels/test_gemv.py's and test_quant_gemv*.py's).
    monkeypatch.setattr("kernels.gemv.FAST_MIN_PROGRAMS", 1)
    widen_m1_gemv_programs(monkeypatch)
    monkeypatch.setattr(sweep, "CANDIDATES", [(64, 256, 4, 1), (32, 256, 2, 3)])
    out = tmp_path / "mma.jsonl"
    formats = ["int4_g64", "int4_g128_zero"]
    sweep.main(["--dry-run", "--formats", *formats, "--m", "1", "2", "--budget-s", "1000", "--json", str(out)])
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert recs[0]["kind"] == "ceiling" and recs[0]["copy_TBps"] > 0 and recs[-1]["kind"] == "done"
    measures = [r for r in recs if r["kind"] == "measure"]
    errors = [r for r in measures if "error" in r]
    assert not errors, errors
    for fmt in formats:
        for shape in sweep.DRY_SHAPES:
            for m in (1, 2):
                got = [r for r in measures if (r["format"], r["shape"], r["M"]) == (fmt, shape, m)]
                paths = {r["path"] for r in got}
                assert {"mma", "mma_sweep", "mma_best", "gemv_exact", "gemv_fast", "tinygemm"} <= paths
                assert all(r["GBps"] > 0 and r["of_copy_ceiling"] > 0 and r["x_bf16"] > 0 for r in got)
    splits = {r["config"][2] for r in measures if r["path"] == "mma_sweep" and r["shape"] == "down"}
    assert max(splits) > 1  # the split-K fixup ran
    bf16 = {(r["shape"], r["M"]) for r in measures if r["path"] == "bf16"}
    assert bf16 == {(s, m) for s in sweep.DRY_SHAPES for m in (1, 2)}
    suggested = {(r["format"], r["M"]) for r in recs if r["kind"] == "suggest"}
    assert suggested == {(f, m) for f in formats for m in (1, 2)}
