"""Where a speculative run leaves plain greedy decoding: spec_bench's divergence_report and
greedy_with_margins, and drafter_bench's engine check recording them."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import prompts

from support import load_experiment


@pytest.fixture(scope="module")
def bench():
    return load_experiment("spec_bench")


def test_divergence_report_gives_the_first_differing_position_and_its_margin(bench):
    plain = [[5, 6, 7, 8], [1, 2, 3], [9, 9], [4, 4, 4]]
    margins = [[0.5, 0.25, 0.125, 2.0], [1.0, 1.0, 1.0], [3.0, 3.0], [0.5, 0.75, 1.5]]
    other = [[5, 6, 0, 8], [1, 2, 3], [9, 1], [4, 4]]  # differs at 2, equal, differs at 1, ends short at 2
    r = bench.divergence_report(plain, margins, other)
    assert r["greedy_equal"] is False and r["diverged"] == 3
    assert r["first_divergence"] == [2, None, 1, 2]
    assert r["margin_at_divergence"] == [0.125, None, 3.0, 1.5]
    assert r["max_margin_at_divergence"] == 3.0
    same = bench.divergence_report(plain, margins, [list(p) for p in plain])
    assert same["greedy_equal"] is True and same["diverged"] == 0 and same["max_margin_at_divergence"] is None
    with pytest.raises(ValueError):  # a run of other prompts is not compared
        bench.divergence_report(plain, margins, other[:2])


def test_margins_are_the_top1_minus_top2_logit_of_the_plain_run(bench, model_dir):
    from transformers import AutoModelForCausalLM

    from engine.llm import LLM

    path = model_dir("llama_gqa_untied", with_tokenizer=True)
    ps = prompts(2, seed=5, lo=3, hi=12)
    outputs, margins = bench.greedy_with_margins(LLM(path, device="cpu"), ps, 6)
    assert [len(o) for o in outputs] == [len(m) for m in margins] == [6, 6]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for p, out, marg in zip(ps, outputs, margins):
        with torch.no_grad():
            logits = hf(torch.tensor([p + out])).logits[0, len(p) - 1 : -1]
        top = logits.topk(2).values
        assert logits.argmax(-1).tolist() == out
        torch.testing.assert_close(torch.tensor(marg), (top[:, 0] - top[:, 1]).float(), rtol=1e-4, atol=1e-4)


def test_engine_check_reports_divergences_against_a_plain_run_of_its_settings(tmp_path, monkeypatch):
    """The check runs plain decoding with the speculative run's settings (the acceptance run's context
    was sized for every workload) and records where the speculative output leaves it."""
    drafter_bench = load_experiment("drafter_bench")
    calls: list[dict] = []

    def fake_run_engine(path, kwargs, use, **extra):
        calls.append({**kwargs, **extra})
        if "speculative_config" in extra:
            return [[1, 2, 3], [7, 0, 9]], None
        return [[1, 2, 3], [7, 8, 9]], [[0.5, 0.5, 0.5], [1.0, 0.01, 2.0]]

    monkeypatch.setattr(drafter_bench, "run_engine", fake_run_engine)
    out = tmp_path / "rows.jsonl"
    args = drafter_bench.parse_args(["--teacher", "T", "--data-dir", "D", "--out", str(tmp_path), "--smoke",
                                     "--batch-invariant", "--json", str(out)])
    drafter_bench.check_with_engine(args, tmp_path, "tvd", "DRAFT", [[4, 5], [6]], [[1, 2, 3], [7, 8, 9]])
    row = json.loads(out.read_text())
    assert row["greedy_equal"] is False and row["first_divergence"] == [None, 1]
    assert row["margin_at_divergence"] == [None, 0.01] and row["plain_runs_equal"] is True
    assert row["batch_invariant"] is True
    plain_kwargs, spec_kwargs = calls
    assert spec_kwargs.pop("speculative_config")["num_speculative_tokens"] == args.check_k
    assert plain_kwargs == spec_kwargs and plain_kwargs["batch_invariant"] is True
