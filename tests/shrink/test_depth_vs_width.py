"""experiments/depth_vs_width.py --smoke: depth-only, width-only and both students of one parameter
budget, distilled for the same tokens, each with WikiText-2 and held-out perplexity, as JSON lines."""

from __future__ import annotations

import json
import math
from collections import Counter

from support import load_experiment, save_tiny_artifact


def load_driver():
    return load_experiment("depth_vs_width")


def count_calls(monkeypatch, calls: Counter, module, name: str) -> None:
    fn = getattr(module, name)

    def counted(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


def test_smoke_compares_the_three_students_at_one_budget(tmp_path, monkeypatch):
    from pydoc_data.topics import topics

    import shrink.stages.distill as distill_stage
    import train.importance as importance

    driver = load_driver()
    calls: Counter = Counter()
    for module, name in [(driver, "build_student"), (distill_stage, "build_student"),
                         (importance, "channel_importance"), (importance, "layer_importance")]:
        count_calls(monkeypatch, calls, module, name)

    teacher = save_tiny_artifact(tmp_path / "teacher")
    wiki = tmp_path / "data" / "wikitext-2-raw" / "wiki.test.raw"
    wiki.parent.mkdir(parents=True)
    wiki.write_bytes("\r\n".join(topics["assignment"].splitlines()[:80]).encode())
    out = tmp_path / "out"
    rows = driver.main(["--teacher", str(teacher), "--data-dir", str(wiki.parents[1]), "--out", str(out),
                        "--smoke", "--device", "cpu", "--set", f"cache_dir={tmp_path / 'cache'}"])
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(rows))
    assert [r["model"] for r in lines] == ["teacher", "depth", "width", "both"]
    assert lines[0]["decode_ms_per_token"] > 0
    teacher_row, students = lines[0], {r["model"]: r for r in lines[1:]}
    target = students["depth"]["target_params"]
    assert target == int(0.6 * teacher_row["params"])
    for kind, r in students.items():
        assert r["params"] <= target and r["train_tokens"] == 2048  # 16 steps x 2 blocks x 64 tokens, for each
        assert r["decode_ms_per_token"] > 0
        for key in ("wikitext2_ppl", "heldout_ppl", "wikitext2_ppl_init", "heldout_ppl_init"):
            assert math.isfinite(r[key]) and r[key] > 1
        assert (out / kind / "shrink.json").is_file()
    assert students["depth"]["layers"] < 4 and students["depth"]["hidden_size"] == 64
    assert students["width"]["layers"] == 4 and students["width"]["hidden_size"] < 64
    assert students["both"]["layers"] < 4 and students["both"]["hidden_size"] < 64
    # Each student is built, and its importance measured, once: the one measured at init is the one
    # distilled (the distill stage built it a second time, measuring its importance again).
    assert calls == {"build_student": 3, "channel_importance": 2, "layer_importance": 2}
