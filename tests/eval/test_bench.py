"""The benchmark script's arithmetic and workload (its timings need a GPU; these parts do not)."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig

from eval.bench import cli, common
from eval.bench.common import engine_options, weight_bytes
from eval.bench.throughput import KernelWindow, nano_vllm_workload


@pytest.mark.parametrize("tied", [True, False])
def test_weight_bytes_counts_what_one_decode_step_reads(tied):
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    embed = cfg.vocab_size * cfg.hidden_size
    # Every weight once, except the embedding table, of which a step reads a row; the LM head is
    # read whole even when it shares the embedding's storage.
    expected = 2 * (total - embed + (embed if tied else 0))
    assert weight_bytes(cfg) == expected


def test_nano_vllm_workload_is_fixed_by_seed_0():
    a_prompts, a_out = nano_vllm_workload()
    b_prompts, b_out = nano_vllm_workload()
    assert a_prompts == b_prompts and a_out == b_out
    assert len(a_prompts) == 256 and all(100 <= len(p) <= 1024 for p in a_prompts)
    assert all(100 <= n <= 1024 for n in a_out) and all(0 <= t <= 10000 for p in a_prompts for t in p)


def test_capacity_paged_versus_reserved(capsys):
    cli.main(["capacity", "--shape", "tinyllama", "--kv-tokens", "200000"])
    res = common.RESULTS["capacity:tinyllama"]
    assert res["reserved_sequences"] == 200000 // 16 * 16 // 2048
    assert res["paged_sequences"] > res["reserved_sequences"]
    assert res["paged_tokens_held"] <= res["pool_tokens"]
    assert "paged:" in capsys.readouterr().out


def test_host_overhead_reports_every_phase(capsys):
    cli.main(["host", "--batch", "1", "3", "--steps", "8", "--repeat", "1"])
    res = common.RESULTS["host"]
    assert sorted(res) == [1, 3]
    for row in res.values():
        assert set(row) == {"schedule", "prepare", "forward", "advance", "sample", "postprocess", "loop", "host total",
                            "all"}
        assert row["schedule"] > 0 and row["prepare"] > 0 and row["sample"] > 0
        assert row["advance"] > 0  # the CPU's multi-step greedy advance, out of host total
        assert abs(row["all"] - row["host total"] - row["forward"] - row["advance"]) < 1e-6
    assert "host total" in capsys.readouterr().out


def test_host_overhead_of_speculative_rounds_accepts_and_rejects(capsys):
    cli.main(["host", "--batch", "1", "2", "--steps", "64", "--repeat", "1", "--spec", "4", "--clock", "cpu"])
    res = common.RESULTS["host_spec"]
    assert sorted(res) == [1, 2]
    for row in res.values():
        assert row["draft"] > 0 and row["verify"] > 0 and row["postprocess"] > 0
        # The stub's next-token rule is one the n-gram drafter gets partly right: both paths run.
        assert 0 < row["acceptance"] < 1 and 1 < row["tokens per round"] < 5
    assert "tok/round" in capsys.readouterr().out


def test_busy_fraction_merges_overlapping_kernels():
    from eval.bench.decode_profile import busy_fraction

    # [0,10) and [5,15) overlap -> 15; [20,25) -> 5; 20 of a 40-us window.
    assert busy_fraction([(20, 25), (0, 10), (5, 15)], 40) == 0.5
    assert busy_fraction([], 10) == 0.0


def test_kernel_table_sums_per_step():
    from types import SimpleNamespace

    from eval.bench.decode_profile import kernel_table

    def ev(name, us):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(elapsed_us=lambda: us))

    rows = kernel_table([ev("gemv", 4.0), ev("gemv", 6.0), ev("norm", 1.0), ev("gemv", 2.0), ev("norm", 1.0)], steps=2)
    assert rows[0] == {"kernel": "gemv", "per_step": 1.5, "us_per_step": 6.0, "us_each": 4.0}
    assert rows[1]["kernel"] == "norm" and rows[1]["us_per_step"] == 1.0


def test_profile_runs_on_the_cpu(capsys):
    cli.main(["profile", "--shape", "smollm2-135m", "--batch", "1", "--steps", "4", "--top", "3"])
    (res,) = common.RESULTS["profile:smollm2-135m"]
    assert res["step_us"] > 0 and res["tok_s"] > 0 and "graph_us" not in res  # no graphs on the CPU
    assert "profile batch 1 (eager)" in capsys.readouterr().out


def test_profile_of_a_compressed_variant_runs_on_the_cpu(capsys):
    """--variant: the shape's random weights compressed as the quant bench's rows (int8 here), profiled."""
    cli.main(["profile", "--shape", "smollm2-135m", "--batch", "1", "--steps", "3", "--top", "3", "--variant", "int8"])
    (res,) = common.RESULTS["profile:smollm2-135m:int8"]
    assert res["step_us"] > 0 and res["tok_s"] > 0
    with pytest.raises(SystemExit, match="--variant int8"):
        cli.main(["profile", "--model", "some/dir", "--variant", "int8"])


def test_profile_of_a_variant_keeps_its_codes_unless_told(monkeypatch):
    """--variant profiles the compressed kernels: the engine is asked to keep them (its default "auto" may
    serve them dense on a GPU); --engine compressed_weights=... overrides."""
    import eval.bench.decode_profile as decode_profile

    seen = []
    monkeypatch.setattr(decode_profile, "profile_decode", lambda *a, **engine: seen.append(engine) or {})
    cli.main(["profile", "--shape", "smollm2-135m", "--batch", "1", "--variant", "int4_g64@triton"])
    cli.main(["profile", "--shape", "smollm2-135m", "--batch", "1", "--variant", "int8", "--engine",
              "compressed_weights=auto"])
    cli.main(["profile", "--shape", "smollm2-135m", "--batch", "1"])
    assert seen == [{"compressed_weights": "keep", "int4_kernel": "triton"}, {"compressed_weights": "auto"}, {}]


def test_engine_options_parse_typed_values():
    assert engine_options(["num_decode_steps=1", "fused_decode=false", "gpu_memory_utilization=0.5",
                           "prefill_attention=triton"]) == {
        "num_decode_steps": 1, "fused_decode": False, "gpu_memory_utilization": 0.5, "prefill_attention": "triton"}
    with pytest.raises(SystemExit, match="key=value"):
        engine_options(["num_decode_steps"])


def test_kernel_window_traces_only_its_steps():
    import torch

    window = KernelWindow("2:4")
    for step in range(6):
        window.at_step(step)
        torch.ones(64, 64) @ torch.ones(64, 64)
    w = window.result
    assert (w["first_step"], w["last_step"]) == (2, 3) and w["wall_s"] > 0
    assert w["gpu_busy"] == 0.0 and w["kernel_s"] == 0.0  # no GPU here: no kernels to count
    assert KernelWindow(None).result is None
