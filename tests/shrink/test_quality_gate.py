"""Quality gates: each stage's perplexity ratio on a fixed held-out set, recorded and judged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common.errors import ShrinkError
from shrink.__main__ import compose
from shrink.artifacts import Artifact, content_hash
from shrink.quality_gate import METRIC_KEY, gate_stage

TEXT = "\n".join(f"document {i}: the quick brown fox jumps over the lazy dog number {i * 7}." for i in range(400))


def gate_cfg(tmp_path: Path, *overrides: str):
    data = tmp_path / "docs.txt"
    data.write_text(TEXT)
    return compose([f"data.source={data}", "data.block_size=16", "data.val_fraction=0.3",
                    f"cache_dir={tmp_path / 'cache'}", "gates.windows=2", "gates.context=16", *overrides])


def copy_artifact(src: Path, dest: Path) -> Artifact:
    shutil.copytree(src, dest)
    return Artifact.load(dest)


def fake_measure(values: dict[str, float]):
    calls: list[str] = []

    def measure(art: Artifact, ids, context: int) -> float:
        calls.append(art.path.name)
        return values[art.path.name]

    return measure, calls


def test_real_perplexity_recorded_in_shrink_json(tmp_path, tiny_teacher):
    cfg = gate_cfg(tmp_path)
    out = copy_artifact(tiny_teacher, tmp_path / "prune")
    record = gate_stage(cfg, "prune", Artifact.load(tiny_teacher), out)
    assert record["input_ppl"] > 1 and record["ratio"] == pytest.approx(1.0)
    assert record["passed"] and record["budget"] == 1.5 and record["tokens"] == 32
    on_disk = json.loads((out.path / "shrink.json").read_text())["metrics"][METRIC_KEY]
    assert {k: on_disk[k] for k in ("input_ppl", "output_ppl", "ratio", "budget", "passed")} == \
        {k: record[k] for k in ("input_ppl", "output_ppl", "ratio", "budget", "passed")}
    assert content_hash(out.path) == Artifact.load(out.path).content_hash  # model files untouched


def test_stop_names_stage_ratio_and_budget(tmp_path, tiny_teacher):
    cfg = gate_cfg(tmp_path, "gates.action=stop", "gates.max_ppl_ratio.gqa=1.5")
    src = copy_artifact(tiny_teacher, tmp_path / "distill")
    out = copy_artifact(tiny_teacher, tmp_path / "gqa")
    measure, _ = fake_measure({"distill": 10.0, "gqa": 26.0})
    with pytest.raises(ShrinkError) as err:
        gate_stage(cfg, "gqa", src, out, measure=measure)
    message = str(err.value)
    assert "\n" not in message
    assert "gqa" in message and "2.60" in message and "1.5" in message
    assert json.loads((out.path / "shrink.json").read_text())["metrics"][METRIC_KEY]["passed"] is False


def test_warn_prints_one_line_and_goes_on(tmp_path, tiny_teacher, capsys):
    cfg = gate_cfg(tmp_path, "gates.action=warn", "gates.max_ppl_ratio.prune=1.2")
    src = copy_artifact(tiny_teacher, tmp_path / "gqa")
    out = copy_artifact(tiny_teacher, tmp_path / "prune")
    measure, _ = fake_measure({"gqa": 10.0, "prune": 39.0})
    record = gate_stage(cfg, "prune", src, out, measure=measure)
    assert record["passed"] is False and record["ratio"] == pytest.approx(3.9)
    warnings = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "prune" in warnings[0] and "3.90" in warnings[0] and "1.2" in warnings[0]


def test_input_ppl_reused_from_previous_gate(tmp_path, tiny_teacher):
    cfg = gate_cfg(tmp_path)
    a = copy_artifact(tiny_teacher, tmp_path / "distill")
    b = copy_artifact(tiny_teacher, tmp_path / "gqa")
    c = copy_artifact(tiny_teacher, tmp_path / "prune")
    measure, calls = fake_measure({"distill": 10.0, "gqa": 12.0, "prune": 13.0})
    gate_stage(cfg, "gqa", a, b, measure=measure)
    gate_stage(cfg, "prune", Artifact.load(b.path), c, measure=measure)
    assert calls == ["distill", "gqa", "prune"]  # gqa's output perplexity is read back, not measured again


def test_bad_gate_config_is_one_clear_error(tmp_path):
    with pytest.raises(ShrinkError, match="gates.action"):
        gate_cfg(tmp_path, "gates.action=explode")
    with pytest.raises(ShrinkError, match="gates.max_ppl_ratio.prune"):
        gate_cfg(tmp_path, "gates.max_ppl_ratio.prune=-1")


def test_gate_text_is_checked_before_any_work(tmp_path):
    with pytest.raises(ShrinkError, match="gates.text='wiki': expected heldout or wikitext2"):
        gate_cfg(tmp_path, "gates.text=wiki")
    with pytest.raises(ShrinkError, match=r"gates.text=wikitext2 needs WikiText-2's test split: .*wiki.test.raw is "
                                          r"missing; or gates.text=heldout"):
        gate_cfg(tmp_path, "gates.text=wikitext2", f"data_dir={tmp_path / 'empty'}")


def test_wikitext2_gate_measures_the_reference_text(tmp_path, tiny_teacher):
    """gates.text=wikitext2: the gate's tokens are the first windows x context of WikiText-2's test split read
    as eval/perplexity.py reads it (CRLF rows, no BOS), not the held-out split's; the record says which."""
    import torch

    from eval.perplexity import encode, wikitext2_text
    from shrink.modeling import load_tokenizer

    data = tmp_path / "data"
    (data / "wikitext-2-raw").mkdir(parents=True)
    rows = [f" = Heading {i} = " if i % 5 == 0 else f" line {i} of the reference text , with {i * 3} words ." for i in
            range(200)]
    (data / "wikitext-2-raw" / "wiki.test.raw").write_bytes("\r\n".join(rows).encode())  # as the shared copy: CRLF
    src = copy_artifact(tiny_teacher, tmp_path / "gqa")
    out = copy_artifact(tiny_teacher, tmp_path / "prune")
    seen = {}

    def measure(art: Artifact, ids, context: int) -> float:
        seen.setdefault(art.path.name, []).append(ids)
        return 10.0

    cfg = gate_cfg(tmp_path, "gates.text=wikitext2", f"data_dir={data}")
    wiki = gate_stage(cfg, "prune", src, out, measure=measure)
    expected = encode(load_tokenizer(out), wikitext2_text(data))[: 2 * 16]
    assert torch.equal(seen["gqa"][0], expected) and torch.equal(seen["prune"][0], expected)
    assert wiki["text"] == "wikitext2" and wiki["tokens"] == 32 and wiki["ratio"] == pytest.approx(1.0)
    held = gate_stage(gate_cfg(tmp_path), "prune", Artifact.load(src.path), Artifact.load(out.path), measure=measure)
    assert held["text"] == "heldout" and held["key"] != wiki["key"]
    assert not torch.equal(seen["prune"][1], expected)


def test_revert_goes_on_from_the_input_and_no_later_stage_reads_the_reverted(tmp_path, tiny_teacher, monkeypatch,
                                                                           capsys):
    """gates.action=revert (the default): the H200 reference run's GQA stage cost 4.68x its input's
    perplexity against a 1.5 budget and every later stage built on it. Now the pipeline goes on from the
    over-budget stage's input, the reverted artifact stays in the run marked as such, a stage started
    alone skips it too, and the eval row says so."""
    import functools

    import shrink.stages.pipeline as pipeline
    from shrink.context import StageContext, latest_artifact_before

    run = tmp_path / "run"
    copy_artifact(tiny_teacher, run / "teacher")
    copy_artifact(tiny_teacher, run / "distill")
    seen: dict[str, str] = {}

    def fake_stage(name):
        def stage(cfg, ctx: StageContext) -> Artifact:
            seen[name] = ctx.input.path.name
            out = copy_artifact(ctx.input.path, run / name)
            out.meta["stage"] = name
            (out.path / "shrink.json").write_text(json.dumps(out.meta))
            return Artifact.load(out.path)
        return stage

    monkeypatch.setattr(pipeline, "get_stage", fake_stage)
    measure, _ = fake_measure({"distill": 10.0, "gqa": 46.8, "prune": 11.0})
    monkeypatch.setattr(pipeline, "gate_stage", functools.partial(gate_stage, measure=measure))
    cfg = gate_cfg(tmp_path, f"run={run}", "stage=pipeline", "stage.stages=[gqa,prune]")
    assert cfg.gates.action == "revert"
    result = pipeline.run(cfg, StageContext(cfg, run, inputs=[Artifact.load(run / "distill")]))
    assert seen == {"gqa": "distill", "prune": "distill"}  # prune built on gqa's input
    assert result.path.name == "prune" and not result.reverted
    gqa = Artifact.load(run / "gqa")
    assert gqa.reverted and gqa.metrics[METRIC_KEY]["passed"] is False
    assert latest_artifact_before(run, "prune").path.name == "distill"  # `stage=prune` alone skips it too
    out = capsys.readouterr().out
    assert "reverted (gates.action=revert): the pipeline goes on from distill" in out
    from eval.report import plain_words
    from shrink.stages.evaluate import _gate_fields

    rows = [{"artifact": "teacher", "status": "ok", "size_MB": 2.0},
            {"artifact": "gqa", "status": "ok", "size_MB": 2.0, **_gate_fields(gqa)}]
    assert "gate ratio 4.68 (over its budget, reverted: the pipeline went on without it)" in plain_words(rows)[0]


def test_warn_keeps_an_over_budget_stage_in_the_chain(tmp_path, tiny_teacher):
    cfg = gate_cfg(tmp_path, "gates.action=warn")
    src = copy_artifact(tiny_teacher, tmp_path / "distill")
    out = copy_artifact(tiny_teacher, tmp_path / "gqa")
    measure, _ = fake_measure({"distill": 10.0, "gqa": 46.8})
    record = gate_stage(cfg, "gqa", src, out, measure=measure)
    assert record["passed"] is False and record["reverted"] is False and not Artifact.load(out.path).reverted


def test_medusa_heads_are_recorded_as_skipped_not_measured(tmp_path, tiny_teacher, capsys):
    """Heads (distill=medusa) have no perplexity: the gate records a skip, measures nothing, even with
    gates.action=stop and a budget, and leaves the model files alone."""
    from common.medusa import MedusaHeads
    from shrink.medusa_distill import save_medusa_artifact
    from shrink.modeling import load_tokenizer

    cfg = gate_cfg(tmp_path, "gates.action=stop", "gates.max_ppl_ratio.distill=1.1")
    out = save_medusa_artifact(tmp_path / "distill", MedusaHeads(64, 320, 2), load_tokenizer(tiny_teacher))
    measure, calls = fake_measure({})
    record = gate_stage(cfg, "distill", Artifact.load(tiny_teacher), out, measure=measure)
    assert calls == [] and record["passed"] is True and record["reverted"] is False
    on_disk = json.loads((out.path / "shrink.json").read_text())["metrics"][METRIC_KEY]
    assert on_disk == record and on_disk["skipped"].startswith("Medusa heads")
    assert not Artifact.load(out.path).reverted
    assert content_hash(out.path) == Artifact.load(out.path).content_hash
    assert "quality gate: distill skipped" in capsys.readouterr().out
