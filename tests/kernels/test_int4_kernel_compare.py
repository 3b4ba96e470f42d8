"""experiments/int4_kernel_compare.py's CPU dry run: both paths (the fused Triton GEMV, tinygemm
through its CPU op) run on the script's weights and match the reference; the timings need the GPU."""

from __future__ import annotations

import json

from experiments import int4_kernel_compare, quant_gemv_sweep


def test_dry_run_checks_both_paths(tmp_path, capsys, monkeypatch):
    # FAST_MIN_PROGRAMS (an H200's occupancy target) cuts the M == 1 fast GEMV to one column a program
    # at these widths, which the interpreter runs one at a time; at 1 the same kernel and sums run in
    # wider programs (one column a program stays tests/kernels/test_quant_gemv_fast.py's).
    monkeypatch.setattr("kernels.gemv.FAST_MIN_PROGRAMS", 1)
    out = tmp_path / "compare.jsonl"
    int4_kernel_compare.main(["--dry-run", "--formats", "int4_g64", "int4_g128_zero", "--shapes", "o_proj", "gate_up",
                              "--m", "1", "4", "--json", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    measures = [r for r in records if r["kind"] == "measure"]
    assert len(measures) == 2 * 2 * 2 * 2
    assert all(r.get("checked") and "error" not in r for r in measures), [r for r in measures if "error" in r]
    assert {r["path"] for r in measures} == {"triton", "tinygemm"}
    assert records[-1]["kind"] == "done"
    # the sweep module's 7B table and device are restored
    assert quant_gemv_sweep.SHAPES["down"] == (4096, 11008, "residual") and quant_gemv_sweep.DEVICE == "cuda"
