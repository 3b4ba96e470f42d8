"""experiments/gqa.py --quick runs end to end on a CPU on a tiny model and writes its results."""

from __future__ import annotations

import json
import math

from support import load_experiment, save_tiny_artifact
from test_gqa_reference import one_thread  # noqa: F401


def load_driver():
    return load_experiment("gqa")


def test_quick_experiment_runs_end_to_end(tmp_path):
    from pydoc_data.topics import topics

    model = save_tiny_artifact(tmp_path / "tiny", seed=2, hidden_size=48, num_attention_heads=6,
                               num_key_value_heads=3, num_hidden_layers=2)
    wiki = tmp_path / "data" / "wikitext-2-raw" / "wiki.test.raw"
    wiki.parent.mkdir(parents=True)
    wiki.write_bytes("\r\n".join(topics["assignment"].splitlines()[:60]).encode())
    out = tmp_path / "out"
    data = load_driver().main(["--model", str(model), "--data-dir", str(wiki.parents[1]), "--out", str(out),
                               "--tokens", "1024", "--quick", "--device", "cpu"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"] == data["models"]
    m = saved["models"]["tiny"]
    assert math.isfinite(m["ppl_before"])
    for init in ("mean", "first", "random"):
        row = m[init]
        assert row["train_tokens"] == 1024  # 4 steps x 4 blocks x 64 tokens, the same for every init
        assert math.isfinite(row["converted"]) and math.isfinite(row["uptrained"])
        assert (out / f"tiny-{init}.train_log.jsonl").is_file()
    assert m["kv"]["before"]["kv_heads"] == 3 and m["kv"]["after"]["kv_heads"] == 1
    table = (out / "results.md").read_text()
    assert "| tiny | random |" in table and "KV bytes/token" in table
