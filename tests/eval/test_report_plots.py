"""The report says in plain words how each artifact compares with the teacher; plots are PNGs."""

from __future__ import annotations

import json
from pathlib import Path

from eval.plots import frontier_plot, pareto_front, quality_scale, stage_bars
from eval.report import main, ordered_columns, plain_words, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ROWS = [
    {"artifact": "teacher", "stage": "import", "status": "ok", "size_MB": 310.0, "ppl_wikitext2": 20.0,
     "ppl_heldout": 10.0, "decode_tok_s_b1": 50.0, "decode_tok_s_b4": 150.0, "acc_cqa": 0.5,
     "acc_svamp": 0.4},
    {"artifact": "quantize", "stage": "quantize", "status": "ok", "size_MB": 100.0, "ppl_wikitext2": 22.4,
     "ppl_heldout": 11.0, "decode_tok_s_b1": 70.0, "decode_tok_s_b4": 160.0, "acc_cqa": 0.25, "acc_svamp": 0.5,
     "top1_agreement": 0.8},
    {"artifact": "gqa", "stage": "gqa", "status": "ok", "size_MB": 600.0, "ppl_wikitext2": 19.0,
     "decode_tok_s_b1": 25.0},
    {"artifact": "prune", "stage": "prune", "status": "damaged: content hash differs"},
]


def test_plain_words():
    lines = plain_words(ROWS)
    # task accuracy: the mean change over cqa (-25 points) and svamp (+10 points)
    assert lines[0] == ("quantize: 3.1x smaller, 1.4x faster decode, perplexity +12%, task accuracy -8 points, "
                        "top-1 agreement 80% vs teacher")
    assert lines[1] == "gqa: 1.9x larger, 2.0x slower decode, perplexity -5% vs teacher"
    assert lines[2].startswith("prune: not measured (damaged")
    assert plain_words(ROWS[1:]) == []  # no teacher, nothing to compare with


def test_columns_are_grouped():
    cols = ordered_columns(ROWS)
    assert cols[:4] == ["artifact", "stage", "status", "size_MB"]
    assert cols.index("ppl_heldout") < cols.index("acc_cqa") < cols.index("decode_tok_s_b1")


def test_report_files_and_cli(tmp_path: Path, capsys):
    write_report(tmp_path, "t", ROWS, ["a note"], {"x": 1}, {"teacher": {"k": 1}}, ["frontier.png"])
    md = (tmp_path / "report.md").read_text()
    assert "## Against the teacher" in md and "- quantize: 3.1x smaller, 1.4x faster decode" in md
    assert md.count("| teacher |") == 1 and "![frontier.png](frontier.png)" in md
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["against_teacher"] == plain_words(ROWS) and report["details"] == {"teacher": {"k": 1}}
    assert main([str(tmp_path / "report.json")]) == 0
    out = capsys.readouterr().out
    assert f"report: {(tmp_path / 'report.md').resolve()}" in out and "quantize: 3.1x smaller" in out
    assert main([str(tmp_path / "missing.json")]) == 1


def test_pareto_front():
    points = [("a", 10.0, 5.0), ("b", 20.0, 6.0), ("c", 15.0, 7.0), ("d", 5.0, 5.0)]
    assert [p[0] for p in pareto_front(points)] == ["a", "b"]


def test_plots_are_png_files(tmp_path: Path):
    assert frontier_plot(ROWS, "decode_tok_s_b1", "ppl_wikitext2", tmp_path / "f.png")
    assert stage_bars(ROWS, [("size_MB", "size"), ("decode_tok_s_b1", "speed"), ("ppl_wikitext2", "ppl")],
                      tmp_path / "s.png")
    for name in ("f.png", "s.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert not frontier_plot(ROWS, "nope", "ppl_wikitext2", tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_acc_norm_is_not_counted_as_a_second_task():
    """acc_norm_cqa_mc is acc_cqa_mc normalised: the plain words' mean change counts CommonsenseQA
    multiple choice once."""
    rows = [{"artifact": "teacher", "status": "ok", "acc_cqa_mc": 0.3, "acc_norm_cqa_mc": 0.3},
            {"artifact": "distill", "status": "ok", "acc_cqa_mc": 0.2, "acc_norm_cqa_mc": 0.9}]
    assert plain_words(rows) == ["distill: task accuracy -10 points vs teacher"]


def test_the_generate_baseline_column_sits_beside_its_speeds():
    cols = ordered_columns([{"artifact": "t", "hf_generate": "static cache, compiled", "hf_decode_tok_s_b1": 1.0,
                             "prefill_tok_s_b1": 2.0, "decode_tok_s_b1": 3.0}])
    assert cols == ["artifact", "decode_tok_s_b1", "hf_decode_tok_s_b1", "hf_generate", "prefill_tok_s_b1"]


def test_quality_spanning_more_than_10x_is_plotted_on_a_log_scale():
    """The H200 reference run (2026-11-29): teacher 18.6 beside GQA's 1,050 left the teacher, student
    and speculative points on the axis of a linear plot."""
    assert quality_scale([18.6, 112.8, 1050.1]) == "log"
    assert quality_scale([18.6, 19.0, 27.9]) == "linear"
    assert quality_scale([0.0, 50.0]) == "linear", "log needs positive values"


def test_the_notes_say_how_compressed_weights_were_served():
    from omegaconf import OmegaConf

    from eval.report import measurement_notes
    from eval.settings import HarnessSettings

    raw = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/eval/default.yaml"))
    raw["engine"]["compressed_weights"] = "keep"
    notes = measurement_notes(ROWS, {}, [], HarnessSettings.from_dict(raw), "bf16", "cuda")
    assert any(n.startswith("engine_weights_MB / engine_compressed_linears") and "compressed_weights=keep" in n
               for n in notes)
