"""gqa.mode=keep: the stage runs and measures, but keeps the KV heads (for presets where pooling costs
more than it buys); the artifact's weights equal its input's and its quality gate ratio is 1."""

from __future__ import annotations

import pytest
import torch
from test_gqa_reference import one_thread  # noqa: F401
from test_gqa_stage import compose, tiny_gqa  # noqa: F401

from shrink.artifacts import Artifact
from shrink.modeling import load_model


def test_keep_is_a_measured_no_op(tiny_gqa, tmp_path):  # noqa: F811
    from shrink.__main__ import run as run_stage

    run = tmp_path / "run"
    cfg = compose(f"input={tiny_gqa}", f"run={run}", f"cache_dir={tmp_path / 'cache'}", "data=pydoc",
                  "data.block_size=64", "data.max_docs=40", "gqa.mode=keep", "gqa.tokens=null",
                  "gqa.eval.datasets=[heldout]", "gqa.eval.context=64", "gqa.eval.stride=64",
                  "gqa.eval.max_windows=4", "gates.context=64", "gates.windows=2")
    run_stage(cfg)
    art = Artifact.load(run / "gqa")
    m = art.metrics
    assert m["mode"] == "keep" and m["budget_source"] == "keep: KV heads unchanged"
    assert m["kv_heads_before"] == m["kv_heads_after"] == 3 and m["kv_bytes_ratio"] == 1
    assert m["ppl_heldout_converted"] == pytest.approx(m["ppl_heldout_before"], rel=1e-2)  # bf16 save aside
    assert "uptrain_steps" not in m
    gate = m["quality_gate"]
    assert gate["passed"] and gate["ratio"] == pytest.approx(1.0, rel=2e-2)
    before, after = load_model(tiny_gqa), load_model(art)
    for (name, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items()):
        torch.testing.assert_close(a.to(torch.bfloat16).float(), b.float(), msg=name)
