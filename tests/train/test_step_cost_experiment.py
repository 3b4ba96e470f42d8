"""experiments/distill_step_cost.py (issue 16's GPU measurement) runs every variant on the CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from support import REPO


def test_step_cost_records_every_variant(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("distill_step_cost", REPO / "experiments" / "distill_step_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "cost.jsonl"
    module.main(["--out", str(out), "--shape", "32,64,4,4,2,320", "--student-layers", "2", "--batch", "2",
                 "--block", "16", "--chunk-size", "8", "--steps", "4", "--warmup", "1", "--stage-steps", "20",
                 "--checkpoint-every", "10"])
    records = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {"now", "old_syncs", "chunk4096"}
    assert records["now"]["chunk_size"] == 8 and records["chunk4096"]["chunk_size"] == 4096
    for r in records.values():
        assert r["steps_timed"] == 2 and r["step_ms_median"] > 0 and r["host_reads_per_step"] == 1
        assert r["checkpoint_bytes"] > 3 * 4 * 32 * 320  # fp32 weights and AdamW's two moments, at least the embedding
        assert 0 < r["stage_checkpoint_share"] < 1
