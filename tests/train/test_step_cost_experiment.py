"""experiments/distill_step_cost.py (issue 16's GPU measurement) runs every variant on the CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from support import REPO


def test_step_cost_records_every_variant(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("distill_step_cost", REPO / "experiments" / "distill_step_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "cost.jsonl"
    module.main(["--out", str(out), "--shape", "32,64,4,4,2,320", "--student-layers", "2", "--batch", "2",
                 "--block", "16", "--chunk-size", "8", "--steps", "4", "--warmup", "1",
                 "--stage-tokens", str(20 * 8 * 16), "--checkpoint-every", "10", "--variants", ",".join(module.VARIANTS)])
    records = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {"old", "now", "compiled", "batch4x", "compiled_batch4x", "old_syncs", "chunk4096"}
    assert records["now"]["chunk_size"] == 8 and records["chunk4096"]["chunk_size"] == 4096
    assert [records[v]["batch"] for v in ("now", "compiled", "batch4x", "compiled_batch4x")] == [2, 2, 8, 8]
    assert [records[v]["compile_model"] for v in ("now", "compiled", "batch4x", "compiled_batch4x")] == [
        False, True, False, True]
    for r in records.values():
        assert r["steps_timed"] == 2 and r["step_ms_median"] > 0 and r["host_reads_per_step"] == 1
        assert r["checkpoint_bytes"] > 3 * 4 * 32 * 320  # fp32 weights and AdamW's two moments, at least the embedding
        assert 0 < r["stage_checkpoint_share"] < 1
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 16 / (r["step_ms_median"] / 1e3))
        assert r["model_tflops_per_s"] == pytest.approx(r["gflop_per_token"] * r["tokens_per_s"] / 1e3)
        assert 0 < r["ceiling_share"] and r["matmul_ceiling_tflops"] > 0 and r["step_ms_profiled"] > 0


def test_flops_per_token_counts_each_matmul():
    """SmolLM2-135M's shape by hand: 3.54M weights per layer, the head 576 x 49,152."""
    from transformers import LlamaConfig

    spec = importlib.util.spec_from_file_location("distill_step_cost", REPO / "experiments" / "distill_step_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shape = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                 vocab_size=49152)
    teacher, student = LlamaConfig(num_hidden_layers=30, **shape), LlamaConfig(num_hidden_layers=15, **shape)
    flops = module.step_flops_per_token(teacher, student, block=512)
    per_layer = 576 * (2 * 576 + 2 * 192) + 3 * 576 * 1536
    assert per_layer == 3_538_944
    attention = 2 * 2 * 256.5 * 576
    head = 2 * 576 * 49152
    assert flops["teacher_forward"] == pytest.approx(30 * (2 * per_layer + attention) + head)
    assert flops["student_backward"] == pytest.approx(2 * flops["student_forward"])
    assert flops["total"] == pytest.approx(0.805e9, rel=0.01)


def test_a_failing_variant_is_recorded_and_the_others_still_run(tmp_path: Path, monkeypatch):
    spec = importlib.util.spec_from_file_location("distill_step_cost", REPO / "experiments" / "distill_step_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def measure(args, variant, device, scratch, ceiling):
        if variant == "compiled":
            raise RuntimeError("inductor failed")
        return {"variant": variant}

    monkeypatch.setattr(module, "measure", measure)
    monkeypatch.setattr(module, "matmul_ceiling_tflops", lambda device, n: 1.0)
    out = tmp_path / "cost.jsonl"
    with pytest.raises(SystemExit, match="variants failed: compiled"):
        module.main(["--out", str(out), "--variants", "now,compiled,batch4x"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["variant"] for r in records] == ["now", "compiled", "batch4x"]
    assert records[1]["error"] == "RuntimeError: inductor failed" and "error" not in records[2]
