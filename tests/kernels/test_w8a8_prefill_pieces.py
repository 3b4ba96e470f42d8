"""experiments/w8a8_prefill_pieces.py's CPU dry run: the quantize kernel equals the torch
quantization and int8_mm the reference on the script's weights, for every linear, M and swept
config; the timings need the GPU."""

from __future__ import annotations

import json

from experiments import w8a8_prefill_pieces


def test_dry_run_checks_every_piece(tmp_path):
    out = tmp_path / "pieces.jsonl"
    w8a8_prefill_pieces.main(["--dry-run", "--json", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    cases = {(n, m) for n in w8a8_prefill_pieces.DRY_LINEARS for m in (17, 40)}
    assert {(r["linear"], r["m"]) for r in records if r["kind"] == "linear"} == cases
    pieces = {(r["path"], r["piece"]) for r in records if r["kind"] == "piece"}
    assert {("int8_triton", "quant"), ("int8_triton", "int8_mm"), ("fp8_triton", "quant"), ("bf16", "total")} <= pieces
    configs = [r for r in records if r["kind"] == "int8_mm_config"]
    assert len(configs) == len(cases) * len(w8a8_prefill_pieces.DRY_SWEEP)
    assert not [r for r in configs if "error" in r]
    totals = [r for r in records if r["kind"] == "model_linears"]
    assert [r["m"] for r in totals] == [17, 40] and all(set(r["ms"]) >= {"bf16", "int8_triton"} for r in totals)
    assert records[-1]["kind"] == "done"
