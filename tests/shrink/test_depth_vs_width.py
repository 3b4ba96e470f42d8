"""experiments/depth_vs_width.py --smoke: depth-only, width-only and both students of one parameter
budget, distilled for the same tokens, each with WikiText-2 and held-out perplexity, as JSON lines."""

from __future__ import annotations

import json
import math

from support import load_experiment, save_tiny_artifact


def load_driver():
    return load_experiment("depth_vs_width")


def test_smoke_compares_the_three_students_at_one_budget(tmp_path):
    from pydoc_data.topics import topics

    teacher = save_tiny_artifact(tmp_path / "teacher")
    wiki = tmp_path / "data" / "wikitext-2-raw" / "wiki.test.raw"
    wiki.parent.mkdir(parents=True)
    wiki.write_bytes("\r\n".join(topics["assignment"].splitlines()[:80]).encode())
    out = tmp_path / "out"
    rows = load_driver().main(["--teacher", str(teacher), "--data-dir", str(wiki.parents[1]), "--out", str(out),
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
